"""Flax Linen layers of the Transformer.

Modules own parameters (each with logical axis names for sharding: ``vocab, embed, heads,
kv, mlp, position``; see sharding.py) and call the pure functions of `attention_jax.core`
for the computation.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_jax.core.attention import (
    dot_product_attention,
    merge_heads,
    multi_head_attention,
    project_heads,
)
from attention_jax.core.positional import apply_rotary_embedding
from attention_jax.nn.config import TransformerConfig

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

    With ``decode=True`` it keeps a KV cache in the ``cache`` collection: the first call
    (cache not yet created, ``x`` of the maximum decode length) creates it; each later call
    takes one new position ``x [B, 1, D]``. Self-attention appends the new key and value at
    ``cache_index`` and attends over positions ``<= cache_index``; cross-attention
    (``cross=True``) projects the encoder output once, in the creating call, and reuses it.
    """

    config: TransformerConfig
    cross: bool = False  # attends to another sequence (the encoder output)
    causal: bool = False  # query t sees keys <= t on top of `mask` (given as is_causal)

    @nn.compact
    def __call__(
        self,
        x,
        kv,
        mask,
        *,
        deterministic: bool,
        positions=None,
        kv_positions=None,
        decode: bool = False,
    ):
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
        if decode and self.has_variable("cache", "cached_key"):
            return self._cached_step(params, x, mask, positions)
        if decode:
            self._create_cache(params, x, kv)
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
            is_causal=self.causal,
        )
        if capture:
            result, weights = result
            self.sow("intermediates", "attention_weights", weights)
        return result  # [B, T, D]

    def _create_cache(self, params, x, kv):
        cfg = self.config
        B, S = x.shape[:2]  # S: the longest decode, the cache's key length
        if self.cross:  # the encoder's keys and values, projected once
            for name in ("key", "value"):
                self.variable(
                    "cache", f"cached_{name}", project_heads, params[name], kv, dtype=cfg.dtype
                )
            return
        shape = (B, S, cfg.num_heads, cfg.head_dim)  # [B, S, N, H]
        self.variable("cache", "cached_key", jnp.zeros, shape, cfg.dtype)
        self.variable("cache", "cached_value", jnp.zeros, shape, cfg.dtype)
        # One index per row (all equal), so every cache leaf leads with B and beam search
        # can reorder rows with one gather.
        self.variable("cache", "cache_index", jnp.zeros, (B,), jnp.int32)

    def _cached_step(self, params, x, mask, positions):
        """One position: x [B, 1, D] -> [B, 1, D]."""
        cfg = self.config
        q = project_heads(params["query"], x, dtype=cfg.dtype)  # [B, 1, N, H]
        key, value = self.variable("cache", "cached_key"), self.variable("cache", "cached_value")
        if not self.cross:
            index = self.variable("cache", "cache_index")
            t = index.value[0]
            k = project_heads(params["key"], x, dtype=cfg.dtype)  # [B, 1, N, H]
            v = project_heads(params["value"], x, dtype=cfg.dtype)
            if cfg.positional == "rotary":
                q = apply_rotary_embedding(q, positions)
                k = apply_rotary_embedding(k, positions)
            key.value = jax.lax.dynamic_update_slice(key.value, k, (0, t, 0, 0))
            value.value = jax.lax.dynamic_update_slice(value.value, v, (0, t, 0, 0))
            index.value = index.value + 1
            S = key.value.shape[1]
            mask = (jnp.arange(S) <= t)[None, None, None, :]  # [1, 1, 1, S]: the past only
        heads = dot_product_attention(
            q, key.value, value.value, mask=mask, dtype=cfg.dtype, implementation="xla"
        )  # [B, 1, N, H]
        return merge_heads(params["out"], heads, dtype=cfg.dtype)  # [B, 1, D]


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
    def __call__(
        self,
        y,
        encoded,
        self_mask,
        cross_mask,
        *,
        deterministic: bool,
        positions=None,
        decode: bool = False,
    ):
        cfg = self.config
        attn = MultiHeadAttention(cfg, causal=True, name="self_attention")
        y = Residual(cfg, name="attention_block")(
            y,
            lambda h: attn(
                h,
                h,
                self_mask,
                deterministic=deterministic,
                positions=positions,
                kv_positions=positions,
                decode=decode,
            ),
            deterministic=deterministic,
        )
        if self.cross:
            cross = MultiHeadAttention(cfg, cross=True, name="cross_attention")
            y = Residual(cfg, name="cross_block")(
                y,
                lambda h: cross(h, encoded, cross_mask, deterministic=deterministic, decode=decode),
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
