"""Training FLOPs of the Transformer and the peak FLOP/s of devices: the two halves of MFU.

Model FLOPs utilization = (model FLOPs per step × steps per second) / (devices × peak FLOP/s).
Model FLOPs follow PaLM (Chowdhery et al., 2022, appendix B): a training step costs 3× the
forward pass (forward + backward for activations + backward for weights), a matmul costs 2
FLOPs per multiply-add, so each token costs ``6 × (weights it meets in matmuls)`` plus
``12 × L × D × (length attended over)`` per attention sublayer for QKᵀ and weights·V. Like
PaLM we count causal attention in full (the dense kernels compute the full square) and leave
out embedding lookups, layer norms, softmax and biases (a few percent at D >= 512).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from attention_jax.nn.config import TransformerConfig

# Dense bf16 peak FLOP/s of one JAX device, by a substring of `device.device_kind` (most
# specific first). Vendor spec sheets; TPU v2/v3 expose each core as a device.
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918e12),  # Trillium ("TPU v6 lite")
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e ("TPU v5 lite")
    ("TPU v4", 275e12),
    ("TPU v3", 61.5e12),  # per core
    ("TPU v2", 22.5e12),  # per core
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe is 756e12
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 125e12),  # fp16 tensor core, as the spec sheet gives it
    ("V100", 125e12),  # fp16 tensor core
    ("T4", 65e12),  # fp16 tensor core
)


def peak_flops_per_device(device=None) -> float | None:
    """The table's peak for `device` (default: the first device), or None if unknown (CPUs)."""
    device = jax.devices()[0] if device is None else device
    for kind, flops in PEAK_FLOPS:
        if kind in device.device_kind:
            return flops
    return None


def _layer_weights(cfg: TransformerConfig) -> tuple[int, int]:
    """Matmul weights of one encoder layer and one decoder layer (biases left out)."""
    d, f = cfg.d_model, cfg.d_ff
    kv = cfg.kv_heads * cfg.head_dim  # K·H: narrower than D with grouped-query attention
    attention = 2 * d * d + 2 * d * kv  # W_q [D, N, H], W_o [N, H, D]; W_k, W_v [D, K, H]
    ffn = (3 if cfg.feed_forward == "swiglu" else 2) * d * f  # SwiGLU: gate, up and down
    return attention + ffn, 2 * attention + ffn  # decoder: self- and cross-attention


def transformer_train_flops(
    cfg: TransformerConfig,
    *,
    source_tokens: float,
    target_tokens: float,
    source_len: int,
    target_len: int,
) -> float:
    """Model FLOPs of one training step of the encoder-decoder `Transformer`.

    `source_tokens` / `target_tokens` are the tokens the step learns from (non-padding);
    `source_len` / `target_len` the padded lengths S and T each token attends over.
    """
    enc, dec = _layer_weights(cfg)
    d, enc_layers, dec_layers = cfg.d_model, cfg.num_layers, cfg.decoder_layers
    per_source = 6 * enc_layers * enc + 12 * enc_layers * d * source_len
    per_target = (
        6 * dec_layers * dec
        + 12 * dec_layers * d * (target_len + source_len)  # self- and cross-attention
        + 6 * d * cfg.output_vocab_size  # pre-softmax projection
    )
    return float(per_source * source_tokens + per_target * target_tokens)


def lm_train_flops(cfg: TransformerConfig, *, tokens: float, seq_len: int) -> float:
    """Model FLOPs of one training step of the decoder-only `TransformerLM`."""
    enc, _ = _layer_weights(cfg)  # an LM layer is an encoder layer with a causal mask
    layers, d = cfg.decoder_layers, cfg.d_model
    per_token = 6 * layers * enc + 12 * layers * d * seq_len + 6 * d * cfg.output_vocab_size
    return float(per_token * tokens)


def measure_matmul_peak(
    n: int = 2048, dtype=jnp.float32, *, repeats: int = 5, device=None
) -> float:
    """Best FLOP/s of an ``n × n @ n × n`` matmul on `device`: a practical peak for devices
    the table does not know (CPUs)."""
    device = jax.devices()[0] if device is None else device
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
