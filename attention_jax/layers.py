"""Flax Linen layers of the Transformer.

Modules own parameters (each with logical axis names for sharding: ``vocab, embed, heads,
kv, mlp, position``) and call the pure functions of attention_jax for the computation.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from attention_jax.attention import multi_head_attention
from attention_jax.config import TransformerConfig

_xavier = nn.initializers.xavier_uniform


def _with_axes(init, axes):
    return nn.with_logical_partitioning(init, axes)


class ProjectionParams(nn.Module):
    """Owns one attention projection's kernel and bias (Flax MultiHeadDotProductAttention's
    layout) and returns them as ``{'kernel', 'bias'}`` for the pure multi-head function."""

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    in_axis: int | tuple[int, ...]
    out_axis: int | tuple[int, ...]
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self) -> dict:
        bias_shape = self.kernel_shape[1:] if self.in_axis == 0 else self.kernel_shape[-1:]
        bias_axes = self.kernel_axes[1:] if self.in_axis == 0 else self.kernel_axes[-1:]
        kernel_init = _xavier(in_axis=self.in_axis, out_axis=self.out_axis)
        return {
            "kernel": self.param(
                "kernel",
                _with_axes(kernel_init, self.kernel_axes),
                self.kernel_shape,
                self.param_dtype,
            ),
            "bias": self.param(
                "bias", _with_axes(nn.initializers.zeros, bias_axes), bias_shape, self.param_dtype
            ),
        }


class MultiHeadAttention(nn.Module):
    """Projections (W_Q, W_K, W_V, W_O) + the pure scaled dot-product attention.

    When the ``intermediates`` collection is mutable, the weights ``[B, N, T, S]`` are sown
    as ``intermediates/<this module>/attention_weights`` (outputs are unchanged).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, kv, mask, *, deterministic: bool, positions=None, kv_positions=None):
        """x [B, T, D], kv [B, S, D], mask bool broadcastable to [B, N, T, S]."""
        cfg = self.config
        D, N, H = cfg.d_model, cfg.num_heads, cfg.head_dim
        proj = dict(kernel_axes=("embed", "heads", "kv"), in_axis=0, out_axis=(1, 2))
        params = {
            name: ProjectionParams(
                kernel_shape=(D, N, H), param_dtype=cfg.param_dtype, name=name, **proj
            )()
            for name in ("query", "key", "value")
        }
        params["out"] = ProjectionParams(
            kernel_shape=(N, H, D),
            kernel_axes=("heads", "kv", "embed"),
            in_axis=(0, 1),
            out_axis=2,
            param_dtype=cfg.param_dtype,
            name="out",
        )()
        dropout = cfg.attention_dropout_rate if not deterministic else 0.0
        capture = self.is_mutable_collection("intermediates")
        result = multi_head_attention(
            params,
            x,
            kv,
            num_heads=N,
            mask=mask,
            dropout_rng=self.make_rng("dropout") if dropout > 0 else None,
            dropout_rate=dropout,
            deterministic=dropout == 0.0,
            dtype=cfg.dtype,
            implementation=cfg.attention_implementation,
            return_weights=capture,
            query_positions=positions,
            key_positions=kv_positions,
        )
        if capture:
            result, weights = result
            self.sow("intermediates", "attention_weights", weights)
        return result  # [B, T, D]


class FeedForward(nn.Module):
    """FFN(x) = act(x·W1 + b1)·W2 + b2, applied to each position (section 3.3)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        h = nn.Dense(
            cfg.d_ff,
            kernel_init=_with_axes(_xavier(), ("embed", "mlp")),
            bias_init=_with_axes(nn.initializers.zeros, ("mlp",)),
            name="wi",
            **dense,
        )(x)  # [B, T, F]
        h = getattr(nn, cfg.activation)(h)
        return nn.Dense(
            cfg.d_model,
            kernel_init=_with_axes(_xavier(), ("mlp", "embed")),
            bias_init=_with_axes(nn.initializers.zeros, ("embed",)),
            name="wo",
            **dense,
        )(h)  # [B, T, D]


def layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=_with_axes(nn.initializers.ones, ("embed",)),
        bias_init=_with_axes(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class Residual(nn.Module):
    """Post-LN ``LayerNorm(x + Dropout(f(x)))`` (the paper) or pre-LN
    ``x + Dropout(f(LayerNorm(x)))``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, sublayer, *, deterministic: bool):
        cfg = self.config
        norm = layer_norm(cfg, "norm")
        drop = nn.Dropout(cfg.dropout_rate)
        if cfg.pre_ln:
            return x + drop(sublayer(norm(x)), deterministic=deterministic)
        return norm(x + drop(sublayer(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a residual block."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool, positions=None):
        cfg = self.config
        attn = MultiHeadAttention(cfg, name="self_attention")
        x = Residual(cfg, name="attention_block")(
            x,
            lambda h: attn(
                h, h, mask, deterministic=deterministic, positions=positions, kv_positions=positions
            ),
            deterministic=deterministic,
        )
        ffn = FeedForward(cfg, name="feed_forward")
        return Residual(cfg, name="ffn_block")(x, ffn, deterministic=deterministic)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder (if `cross`), feed-forward."""

    config: TransformerConfig
    cross: bool = True

    @nn.compact
    def __call__(self, y, encoded, self_mask, cross_mask, *, deterministic: bool, positions=None):
        cfg = self.config
        attn = MultiHeadAttention(cfg, name="self_attention")
        y = Residual(cfg, name="attention_block")(
            y,
            lambda h: attn(
                h,
                h,
                self_mask,
                deterministic=deterministic,
                positions=positions,
                kv_positions=positions,
            ),
            deterministic=deterministic,
        )
        if self.cross:
            cross = MultiHeadAttention(cfg, name="cross_attention")
            y = Residual(cfg, name="cross_block")(
                y,
                lambda h: cross(h, encoded, cross_mask, deterministic=deterministic),
                deterministic=deterministic,
            )
        ffn = FeedForward(cfg, name="feed_forward")
        return Residual(cfg, name="ffn_block")(y, ffn, deterministic=deterministic)


class Embedder(nn.Module):
    """Token embedding (scaled by √D, section 3.4) and, when shared, the pre-softmax
    projection ``logits = y · Eᵀ``."""

    config: TransformerConfig
    vocab_size: int

    def setup(self):
        cfg = self.config
        # std D^-1/2, so the √D-scaled embedding has unit variance like the sinusoids.
        init = nn.initializers.normal(stddev=cfg.d_model**-0.5)
        self.embedding = self.param(
            "embedding",
            _with_axes(init, ("vocab", "embed")),
            (self.vocab_size, cfg.d_model),
            cfg.param_dtype,
        )  # [V, D]

    def __call__(self, tokens):
        """tokens [B, T] -> [B, T, D]. An id outside [0, V) reads a row of NaNs."""
        x = jnp.take(self.embedding, tokens, axis=0, mode="fill", fill_value=jnp.nan)
        return x.astype(self.config.dtype) * math.sqrt(self.config.d_model)  # [B, T, D]

    def attend(self, y):
        """Pre-softmax projection with the embedding matrix: y [B, T, D] -> logits [B, T, V]."""
        return jnp.einsum("BTD,VD->BTV", y, self.embedding.astype(self.config.dtype))
