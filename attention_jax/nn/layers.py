"""Flax Linen layers of the Transformer.

Modules own parameters (each with logical axis names for sharding: ``vocab, embed, heads,
kv_heads, kv, mlp, position``; see sharding.py) and call the pure functions of
`attention_jax.core` for the computation.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from attention_jax.core.attention import dot_product_attention, merge_heads, project_heads
from attention_jax.core.positional import apply_rotary_embedding
from attention_jax.nn.config import REMATS, TransformerConfig

_xavier = nn.initializers.xavier_uniform


def _with_axes(init, axes):
    return nn.with_logical_partitioning(init, axes)


# Logical axes of the activations (the rules that map them to the mesh: nn/sharding.py).
# Without a mesh and rules in context, nn.with_logical_constraint returns its input as is.
HEADS_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
KV_HEADS_AXES = ("activation_batch", "activation_length", None, "activation_kv")  # K < N
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")


class ProjectionParams(nn.Module):
    """Owns one attention projection's kernel and (``use_bias``) bias, in Flax
    MultiHeadDotProductAttention's layout, and returns them as ``{'kernel', 'bias'?}`` for the
    pure multi-head function (which takes the bias as optional)."""

    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    in_axis: int | tuple[int, ...]
    out_axis: int | tuple[int, ...]
    param_dtype: object = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self) -> dict:
        bias_shape = self.kernel_shape[1:] if self.in_axis == 0 else self.kernel_shape[-1:]
        bias_axes = self.kernel_axes[1:] if self.in_axis == 0 else self.kernel_axes[-1:]
        kernel_init = _xavier(in_axis=self.in_axis, out_axis=self.out_axis)
        params = {
            "kernel": self.param(
                "kernel",
                _with_axes(kernel_init, self.kernel_axes),
                self.kernel_shape,
                self.param_dtype,
            )
        }
        if self.use_bias:
            params["bias"] = self.param(
                "bias", _with_axes(nn.initializers.zeros, bias_axes), bias_shape, self.param_dtype
            )
        return params


class MultiHeadAttention(nn.Module):
    """Projections (W_Q, W_K, W_V, W_O) + the pure scaled dot-product attention.

    With ``config.num_kv_heads = K < N`` (grouped-query; K = 1: multi-query) W_K and W_V
    produce K heads ``[D, K, H]`` and query head n reads key/value head ``n // (N / K)``, as
    in ``jax.nn.dot_product_attention``. Their logical head axis is then ``kv_heads`` (no
    rule in the default table: replicated, so any K works on any ``model`` axis).

    When the ``intermediates`` collection is mutable, the weights ``[B, N, T, S]`` are sown
    as ``intermediates/<this module>/attention_weights`` (outputs are unchanged).

    With ``decode=True`` it keeps a KV cache in the ``cache`` collection: the first call
    (cache not yet created, ``x`` of the maximum decode length S) creates it; each later call
    takes a block of P >= 1 new positions ``x [B, P, D]`` (P > 1: a prompt's prefill) with
    their ``cache_positions [B, P]``. Self-attention writes each new key and value into the
    cache slot of its position (per row, so rows may be at different positions), and query
    p attends to slots ``<= p``: causal inside the block and against everything the row
    wrote before. A row's slots below p must hold its own earlier positions (feed each row
    its positions in order); slots above p may hold anything (right padding of a prefill).
    Without ``cache_positions`` the block goes to each row's next ``cache_index`` slots.
    The cache stores K heads ``[B, S, K, H]``. Cross-attention (``cross=True``) projects the
    encoder output once, in the creating call, and reuses it.

    Packed rows (several examples per row) give ``segment_ids [B, T]`` and
    ``kv_segment_ids [B, S]`` (default: ``segment_ids``): query t attends key s only if
    their ids are equal (``core.dot_product_attention``'s ``query_segment_ids`` /
    ``key_segment_ids``: no ``[B, 1, T, S]`` array, tiles skipped by ``'blockwise'``); the
    mask then only needs the padding. A KV-cached decode step takes none.

    The projected heads q, k, v and the attention output heads ``[B, T, N, H]`` carry the
    logical axes ``HEADS_AXES`` (k and v, when K < N: no rule for their head axis, as for
    their kernels).
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
        cache_positions=None,
        segment_ids=None,
        kv_segment_ids=None,
    ):
        """x [B, T, D], kv [B, S, D], mask bool broadcastable to [B, N, T, S]; `positions`,
        `kv_positions`: rotary positions (or None); `cache_positions` [B, T]: the cache
        slots of a decode block (see the class docstring); `segment_ids` [B, T],
        `kv_segment_ids` [B, S]: packed rows (see the class docstring)."""
        cfg = self.config
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
        common = dict(in_axis=0, out_axis=(1, 2), param_dtype=cfg.param_dtype,
                      use_bias=cfg.attention_bias)  # fmt: skip
        kv_axis = "heads" if K == N else "kv_heads"  # K = N: exactly the layout of the paper's
        params = {
            "query": ProjectionParams(
                kernel_shape=(D, N, H), kernel_axes=("embed", "heads", "kv"), name="query",
                **common,
            )()
        }  # fmt: skip
        for name in ("key", "value"):
            params[name] = ProjectionParams(
                kernel_shape=(D, K, H), kernel_axes=("embed", kv_axis, "kv"), name=name, **common
            )()
        params["out"] = ProjectionParams(
            kernel_shape=(N, H, D),
            kernel_axes=("heads", "kv", "embed"),
            in_axis=(0, 1),
            out_axis=2,
            param_dtype=cfg.param_dtype,
            use_bias=cfg.attention_bias,
            name="out",
        )()
        if decode and self.has_variable("cache", "cached_key"):
            if segment_ids is not None or kv_segment_ids is not None:
                raise ValueError(
                    "MultiHeadAttention: a KV-cached decode step takes no segment ids (one "
                    "example per row), got segment_ids or kv_segment_ids"
                )
            return self._cached_step(params, x, mask, positions, cache_positions)
        if decode:
            self._create_cache(params, x, kv)
        dropout = cfg.attention_dropout_rate if not deterministic else 0.0
        capture = self.is_mutable_collection("intermediates")
        # MultiHead(Q, K, V) as core.multi_head_attention computes it, with the heads'
        # logical axes between its steps.
        q = project_heads(params["query"], x, dtype=cfg.dtype)  # [B, T, N, H]
        k = project_heads(params["key"], kv, dtype=cfg.dtype)  # [B, S, K, H]
        v = project_heads(params["value"], kv, dtype=cfg.dtype)  # [B, S, K, H]
        if (positions is None) != (kv_positions is None):
            raise ValueError("MultiHeadAttention: give both positions and kv_positions, or neither")
        if positions is not None:  # rotary
            q = apply_rotary_embedding(q, positions)
            k = apply_rotary_embedding(k, kv_positions)
        kv_axes = HEADS_AXES if K == N else KV_HEADS_AXES
        q = nn.with_logical_constraint(q, HEADS_AXES)
        k, v = (nn.with_logical_constraint(a, kv_axes) for a in (k, v))
        result = dot_product_attention(
            q,
            k,
            v,
            None,
            mask,
            dropout_rng=self.make_rng("dropout") if dropout > 0 else None,
            dropout_rate=dropout,
            deterministic=dropout == 0.0,
            dtype=cfg.dtype,
            implementation=cfg.attention_implementation,
            return_weights=capture,
            is_causal=self.causal,
            query_segment_ids=segment_ids,
            key_segment_ids=kv_segment_ids,
        )
        heads, weights = result if capture else (result, None)  # [B, T, N, H], [B, N, T, S]
        heads = nn.with_logical_constraint(heads, HEADS_AXES)
        out = merge_heads(params["out"], heads, dtype=cfg.dtype)  # [B, T, D]
        if capture:
            self.sow("intermediates", "attention_weights", weights)
        return out  # [B, T, D]

    def _create_cache(self, params, x, kv):
        cfg = self.config
        B, S = x.shape[:2]  # S: the longest decode, the cache's key length
        if self.cross:  # the encoder's keys and values, projected once: [B, S_enc, K, H]
            for name in ("key", "value"):
                self.variable(
                    "cache", f"cached_{name}", project_heads, params[name], kv, dtype=cfg.dtype
                )
            return
        shape = (B, S, cfg.kv_heads, cfg.head_dim)  # [B, S, K, H]: K heads, GQA's saving
        self.variable("cache", "cached_key", jnp.zeros, shape, cfg.dtype)
        self.variable("cache", "cached_value", jnp.zeros, shape, cfg.dtype)
        # Per row: one past the last slot written. Every cache leaf leads with B, so beam
        # search can reorder rows with one gather.
        self.variable("cache", "cache_index", jnp.zeros, (B,), jnp.int32)

    def _cached_step(self, params, x, mask, positions, slots):
        """A block of P positions through the cache: x [B, P, D] -> [B, P, D]."""
        cfg = self.config
        q = project_heads(params["query"], x, dtype=cfg.dtype)  # [B, P, N, H]
        key, value = self.variable("cache", "cached_key"), self.variable("cache", "cached_value")
        if not self.cross:
            B, P = x.shape[:2]
            S = key.value.shape[1]
            index = self.variable("cache", "cache_index")
            if slots is None:  # the next P slots of each row
                slots = index.value[:, None] + jnp.arange(P, dtype=jnp.int32)[None]  # [B, P]
            slots = jnp.broadcast_to(jnp.asarray(slots, jnp.int32), (B, P))
            if not isinstance(slots, jax.core.Tracer) and (
                int(slots.min()) < 0 or int(slots.max()) >= S
            ):
                raise ValueError(
                    f"decode positions must be in [0, {S}) (the cache's length, the longest "
                    f"decode), got min {int(slots.min())}, max {int(slots.max())}"
                )
            k = project_heads(params["key"], x, dtype=cfg.dtype)  # [B, P, K, H]
            v = project_heads(params["value"], x, dtype=cfg.dtype)
            if cfg.positional == "rotary":
                q = apply_rotary_embedding(q, positions)
                k = apply_rotary_embedding(k, positions)
            rows = jnp.arange(B)[:, None]  # [B, 1], against slots [B, P]
            key.value = key.value.at[rows, slots].set(k.astype(key.value.dtype), mode="drop")
            value.value = value.value.at[rows, slots].set(v.astype(value.value.dtype), mode="drop")
            index.value = slots[:, -1] + 1
            # Query p sees the slots <= p: its row's past and the block's earlier positions.
            mask = jnp.arange(S)[None, None, None, :] <= slots[:, None, :, None]  # [B,1,P,S]
        heads = dot_product_attention(
            q, key.value, value.value, mask=mask, dtype=cfg.dtype, implementation="xla"
        )  # [B, P, N, H]
        return merge_heads(params["out"], heads, dtype=cfg.dtype)  # [B, P, D]


class FeedForward(nn.Module):
    """The position-wise feed-forward (section 3.3), one of ``config.feed_forward``:

    - ``'mlp'`` (the paper): ``FFN(x) = act(x·W1 + b1)·W2 + b2``, W1 ``wi`` [D, F], W2 ``wo``;
    - ``'swiglu'`` (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
      ``FFN(x) = (Swish(x·W) ⊙ x·V)·W2`` with W ``wi_0`` [D, F], V ``wi_1`` [D, F], W2 ``wo``
      [F, D] and, as there, no biases; Swish = SiLU, whatever ``activation`` says. F is
      ``d_ff`` (the paper of SwiGLU shrinks it to 2/3 to keep the parameter count: set it).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        swiglu = cfg.feed_forward == "swiglu"
        dense = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=not swiglu)

        def up(name):  # x [B, T, D] -> [B, T, F]
            return nn.Dense(
                cfg.d_ff,
                kernel_init=_with_axes(_xavier(), ("embed", "mlp")),
                bias_init=_with_axes(nn.initializers.zeros, ("mlp",)),
                name=name,
                **dense,
            )(x)

        if swiglu:
            h = nn.silu(up("wi_0")) * up("wi_1")  # [B, T, F]
        else:
            h = getattr(nn, cfg.activation)(up("wi"))  # [B, T, F]
        h = nn.with_logical_constraint(h, MLP_AXES)
        return nn.Dense(
            cfg.d_model,
            kernel_init=_with_axes(_xavier(), ("mlp", "embed")),
            bias_init=_with_axes(nn.initializers.zeros, ("embed",)),
            name="wo",
            **dense,
        )(h)  # [B, T, D]


def normalization(cfg: TransformerConfig, name: str) -> nn.Module:
    """The normalisation of ``config.norm``: LayerNorm (the paper; Ba et al. 2016) or RMSNorm
    ``x / sqrt(mean(x²) + ε) · g`` (Zhang & Sennrich 2019: no centring, no bias)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=cfg.layer_norm_epsilon,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            scale_init=_with_axes(nn.initializers.ones, ("embed",)),
            name=name,
        )
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_epsilon,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        scale_init=_with_axes(nn.initializers.ones, ("embed",)),
        bias_init=_with_axes(nn.initializers.zeros, ("embed",)),
        name=name,
    )


class Residual(nn.Module):
    """Post-LN ``Norm(x + Dropout(f(x)))`` (the paper) or pre-LN ``x + Dropout(f(Norm(x)))``;
    Norm is LayerNorm or RMSNorm (`normalization`)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, sublayer, *, deterministic: bool):
        cfg = self.config
        norm = normalization(cfg, "norm")
        drop = nn.Dropout(cfg.dropout_rate)
        if cfg.pre_ln:
            return x + drop(sublayer(norm(x)), deterministic=deterministic)
        return norm(x + drop(sublayer(x), deterministic=deterministic))


# config.remat -> the policy of jax.checkpoint around each layer: what the forward pass
# keeps for the backward pass (the rest is recomputed there). 'dots' keeps the outputs of
# the matmuls with the weights (projections, feed-forward: [B, T, D|F]), not the attention
# scores and weights [B, N, T, S] (batched matmuls), whose memory grows with T·S.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
}
assert set(REMAT_POLICIES) == set(REMATS) - {"none"}, "config.REMATS and REMAT_POLICIES differ"


def _rematerialised(method, cfg: TransformerConfig, static_argnums: tuple[int, ...]):
    """`method` (a layer's compact method, called as ``method(module, ...)``) under
    ``nn.remat`` with the policy of ``cfg.remat`` ('none': `method` itself). The bools
    (deterministic, decode) are passed positionally and static: jax.checkpoint traces every
    keyword and positional argument that is not static."""
    if cfg.remat == "none":
        return method
    return nn.remat(method, policy=REMAT_POLICIES[cfg.remat], static_argnums=static_argnums)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each in a residual block; under ``nn.remat`` when
    ``config.remat`` is not 'none' (the parameters are the same either way)."""

    config: TransformerConfig

    def __call__(self, x, mask, *, deterministic: bool, positions=None, segment_ids=None):
        """x [B, S, D], mask broadcastable to [B, N, S, S] -> [B, S, D]; `segment_ids`
        [B, S]: packed rows (the mask then only needs the padding)."""
        layer = _rematerialised(EncoderLayer._layer, self.config, static_argnums=(5,))
        return layer(self, x, mask, positions, segment_ids, deterministic)

    @nn.compact
    def _layer(self, x, mask, positions, segment_ids, deterministic: bool):
        cfg = self.config
        attn = MultiHeadAttention(cfg, name="self_attention")
        x = Residual(cfg, name="attention_block")(
            x,
            lambda h: attn(
                h,
                h,
                mask,
                deterministic=deterministic,
                positions=positions,
                kv_positions=positions,
                segment_ids=segment_ids,
                kv_segment_ids=segment_ids,
            ),
            deterministic=deterministic,
        )
        ffn = FeedForward(cfg, name="feed_forward")
        return Residual(cfg, name="ffn_block")(x, ffn, deterministic=deterministic)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder (if `cross`), feed-forward;
    under ``nn.remat`` when ``config.remat`` is not 'none', except in a KV-cached decode
    (no backward pass to save memory for)."""

    config: TransformerConfig
    cross: bool = True

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
        cache_positions=None,
        segment_ids=None,
        encoder_segment_ids=None,
    ):
        """y [B, T, D], encoded [B, S, D] (or None) -> [B, T, D]. `positions`: rotary
        positions (or None); `cache_positions` [B, T]: the positions of a KV-cached decode
        block (see MultiHeadAttention); `segment_ids` [B, T] and `encoder_segment_ids`
        [B, S]: packed rows (the masks then only need the padding)."""
        layer = DecoderLayer._layer
        if not decode:
            layer = _rematerialised(layer, self.config, static_argnums=(9, 10))
        return layer(
            self, y, encoded, self_mask, cross_mask, positions, cache_positions, segment_ids,
            encoder_segment_ids, deterministic, decode,
        )  # fmt: skip

    @nn.compact
    def _layer(
        self, y, encoded, self_mask, cross_mask, positions, cache_positions, segment_ids,
        encoder_segment_ids, deterministic: bool, decode: bool,
    ):  # fmt: skip
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
                cache_positions=cache_positions,
                segment_ids=segment_ids,
                kv_segment_ids=segment_ids,
            ),
            deterministic=deterministic,
        )
        if self.cross:
            cross = MultiHeadAttention(cfg, cross=True, name="cross_attention")
            y = Residual(cfg, name="cross_block")(
                y,
                lambda h: cross(
                    h,
                    encoded,
                    cross_mask,
                    deterministic=deterministic,
                    decode=decode,
                    segment_ids=segment_ids,
                    kv_segment_ids=encoder_segment_ids,
                ),
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
