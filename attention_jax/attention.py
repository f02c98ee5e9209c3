"""Scaled dot-product attention as pure, composable JAX functions (no Flax).

Dimension legend (used in every einsum and shape comment):
B batch · T query length · S key/value length · N heads · H head dim (queries, keys) ·
V head dim of values (Hv) · D model width · G = batch × heads, flattened.

The paper's attention for one head is four steps (section 3.2.1):

    1. scores  = q · kᵀ                       [T, S]
    2. scaled  = scores / √H
    3. weights = softmax(scaled)              (masked keys get weight exactly 0)
    4. out     = weights · v                  [T, V]

:func:`scaled_dot_product_attention` is exactly that. :func:`dot_product_attention` maps the
same one-head function over heads and batch, and :func:`multi_head_attention` adds the
learned projections of section 3.2.2.

Ways to run the multi-head map (``implementation=``):

* ``'xla'``: ``jax.vmap`` of the one-head function over heads, then over each batch dim;
  one batched XLA computation that materialises the ``T × S`` scores, differentiated by
  plain autodiff (any transform works, forward mode included). The only one that can
  return the weights.
* ``'blockwise'``: :mod:`attention_jax.blockwise`, the same math in tiles of queries and
  keys with an online softmax and a recomputing custom VJP: O(T) memory instead of
  O(T·S), causal tiles above the diagonal skipped. Pure JAX, any device; on CPU also faster
  than ``'xla'`` once a head's scores outgrow the cache (BUILD_NOTES.md).
* ``'cudnn'``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``
  (NVIDIA GPUs, bf16/f16).
* ``'pallas'``: the flash-attention kernels in ``jax.experimental.pallas.ops`` (GPU, TPU);
  see :mod:`attention_jax.kernels`.
* ``None`` / ``'auto'``: the fastest valid one for the device, dtype and shape
  (:func:`attention_jax.blockwise.choose_implementation`).

Masks that are structure rather than data are best given as such: ``is_causal=True`` and
``key_value_seq_lengths`` cost no ``T × S`` array, let ``'blockwise'`` skip tiles, and are
what the fused kernels accept.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax import blockwise
from attention_jax.positional import apply_rotary_embedding

Implementation = Literal["xla", "blockwise", "cudnn", "pallas", "auto"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "blockwise", "cudnn", "pallas", "auto")

_F32 = jnp.float32


def _acc_dtype(x):
    """Accumulation dtype: float32 for bf16/f16/f32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(x.dtype, _F32)


# --------------------------------------------------------------------------------------
# The one head: the four steps.
# --------------------------------------------------------------------------------------


def _attend(q, k, v, mask, bias, keep, *, scale, precision, want_weights):
    """The four steps for one head (or one block of its queries).

    Args:
      q: [T, H]; k: [S, H]; v: [S, V].
      mask: bool broadcastable to [T, S] (True = attend), or None.
      bias: float broadcastable to [T, S], added to the scaled scores, or None.
      keep: float [T, S] dropout multiplier (0 or 1/keep_prob), or None.

    Returns:
      out [T, V] float32, lse [T] float32 (log-sum-exp of each row's logits; 0 for a fully
      masked row), weights [T, S] float32 or None.
    """
    acc = _acc_dtype(q)
    # 1. scores (float32 even for bf16/f16 inputs).
    scores = jnp.einsum("TH,SH->TS", q, k, precision=precision, preferred_element_type=acc)
    # 2. scale by 1/√H.
    logits = scores * scale  # [T, S]
    if bias is not None:
        logits = logits + bias.astype(acc)
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    # 3. softmax. The max is only for stability (softmax is shift-invariant), hence no
    # gradient; a fully masked row has max -inf, shifted by 0 instead so exp gives exact
    # zeros and no NaN in values or gradients.
    row_max = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [T, 1]
    maybe_empty = mask is not None or bias is not None  # else every row max is finite
    if maybe_empty:
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(logits - row_max)  # [T, S]; masked keys -> exactly 0
    denom = jnp.sum(e, axis=-1, keepdims=True)  # [T, 1]
    if maybe_empty:
        denom = jnp.where(denom > 0, denom, 1.0)  # fully masked row -> out 0, not 0/0
    # 4. weighted sum of the values. Normalising after the matmul costs T×V divisions
    # instead of T×S.
    p = e if keep is None else e * keep
    out = jnp.einsum(
        "TS,SV->TV", p.astype(v.dtype), v, precision=precision, preferred_element_type=acc
    )
    out = out / denom  # [T, V]
    lse = (row_max + jnp.log(denom))[:, 0]  # [T]
    weights = e / denom if want_weights else None
    return out, lse, weights


def scaled_dot_product_attention(q, k, v, mask=None, bias=None):
    """Attention for one head: softmax(q·kᵀ / √H + bias, masked) · v.

    Args:
      q: queries ``[T, H]``.
      k: keys ``[S, H]``.
      v: values ``[S, V]``.
      mask: optional bool, broadcastable to ``[T, S]``; True = attend. Masked keys get
        weight exactly 0; a query with every key masked gets zero output (never NaN).
      bias: optional float, broadcastable to ``[T, S]``, added to the scaled scores.

    Returns:
      ``(out [T, V], weights [T, S])`` in the inputs' dtype. Scores and softmax are
      computed in float32 for bf16/f16 inputs.
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    dtype = _float_dtype("scaled_dot_product_attention", q, k, v, None)
    if q.ndim != 2 or k.ndim != 2 or v.ndim != 2:
        raise ValueError(
            "scaled_dot_product_attention is for one head: expected q [T, H], k [S, H], "
            f"v [S, V], got q {q.shape}, k {k.shape}, v {v.shape} "
            "(use dot_product_attention for [..., T, N, H])"
        )
    _check_qkv("scaled_dot_product_attention", q, k, v, batch_rank=0)
    target = (q.shape[0], k.shape[0])
    mask = _check_mask("scaled_dot_product_attention", mask, target, "[T, S]")
    bias = _check_bias("scaled_dot_product_attention", bias, target, "[T, S]")
    mask = None if mask is None else _lead_pad(mask, 2)
    bias = None if bias is None else _lead_pad(bias, 2)
    out, _, weights = _attend(
        q.astype(dtype),
        k.astype(dtype),
        v.astype(dtype),
        mask,
        bias,
        None,
        scale=1.0 / math.sqrt(q.shape[-1]),
        precision=None,
        want_weights=True,
    )
    return out.astype(dtype), weights.astype(dtype)


# --------------------------------------------------------------------------------------
# Multi-head attention over [..., T, N, H].
# --------------------------------------------------------------------------------------


def dot_product_attention(
    query,
    key,
    value,
    bias=None,
    mask=None,
    *,
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dtype=None,
    precision=None,
    implementation: Implementation | None = None,
    return_weights: bool = False,
    module: Any = None,
    is_causal: bool = False,
    key_value_seq_lengths=None,
):
    """Multi-head scaled dot-product attention: the one-head function over heads and batch.

    Signature-compatible with ``flax.linen.dot_product_attention``, so it can be passed as
    ``attention_fn`` to ``flax.linen.MultiHeadDotProductAttention`` (which also hands it
    ``module`` when ``sow_weights=True``; the weights are then sown into ``intermediates``).

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, N, H]``.
      value: ``[..., S, N, V]``.
      bias: optional float, broadcastable to ``[..., N, T, S]``, added to the scaled scores.
      mask: optional bool, broadcastable to ``[..., N, T, S]``; True = attend.
      broadcast_dropout: share one dropout pattern across batch and heads (flax's default).
      dropout_rng: PRNG key for attention dropout.
      dropout_rate: probability of dropping an attention weight, in [0, 1).
      deterministic: if True (the default), no dropout.
      dtype: computation dtype (default: the promoted dtype of query, key, value).
      precision: matmul precision (``jax.lax.Precision``), as in flax.
      implementation: ``'xla'``, ``'blockwise'``, ``'cudnn'``, ``'pallas'``, or
        None/``'auto'`` for the fastest valid one (see the module docstring). An explicit
        choice that cannot run this call raises a ValueError saying why.
      return_weights: also return the attention weights ``[..., N, T, S]`` (before dropout),
        computed by the same code path, e.g. for visualisation.
      module: a Flax module to ``sow`` the weights into (``intermediates/attention_weights``).
      is_causal: query t attends only keys s <= t (top-left aligned when T != S, as in
        ``jax.nn.dot_product_attention``); combined with ``mask`` if both are given.
      key_value_seq_lengths: optional int ``[...]`` (the batch dims): keys at or past the
        length are masked (right padding).

    Returns:
      ``out [..., T, N, V]`` in ``dtype``, or ``(out, weights)`` with ``return_weights``.
    """
    name = "dot_product_attention"
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    dtype = _float_dtype(name, query, key, value, dtype)
    if query.ndim < 3 or query.ndim != key.ndim or query.ndim != value.ndim:
        raise ValueError(
            f"{name}: expected query [..., T, N, H], key [..., S, N, H], value [..., S, N, V] "
            f"of the same rank >= 3, got query {query.shape}, key {key.shape}, "
            f"value {value.shape}"
        )
    _check_qkv(name, query, key, value, batch_rank=query.ndim - 3)
    *batch, T, N, H = query.shape
    S = key.shape[-3]
    target = (*batch, N, T, S)
    legend = "[..., N, T, S]"
    mask = _check_mask(name, mask, target, legend)
    bias = _check_bias(name, bias, target, legend)
    lengths = _check_lengths(name, key_value_seq_lengths, tuple(batch))
    dropout = _check_dropout(name, dropout_rate, deterministic, dropout_rng)
    want_weights = return_weights or module is not None
    impl = _resolve_implementation(
        name, implementation, q_shape=query.shape, k_shape=key.shape, v_shape=value.shape,
        dtype=dtype, has_mask=mask is not None, has_bias=bias is not None,
        is_causal=bool(is_causal), has_lengths=lengths is not None, dropout=dropout,
        want_weights=want_weights,
    )  # fmt: skip
    mask = None if mask is None else _lead_pad(mask, len(target))  # [*b|1, N|1, T|1, S|1]
    bias = None if bias is None else _lead_pad(bias, len(target))
    scale = 1.0 / math.sqrt(H)

    if impl in ("cudnn", "pallas"):
        q, k, v = (x.astype(dtype) for x in (query, key, value))
        return _kernel_path(impl, q, k, v, mask, bias, lengths, is_causal=bool(is_causal),
                            scale=scale)  # fmt: skip

    # Heads first: [..., T, N, H] -> [..., N, T, H].
    q, k, v = (jnp.swapaxes(x.astype(dtype), -3, -2) for x in (query, key, value))
    if impl == "blockwise":
        out = blockwise.blockwise_attention(
            q, k, v, mask, bias, scale=scale, is_causal=bool(is_causal),
            kv_lengths=None if lengths is None else lengths[..., None],  # [*b, N=1]
            dropout_rate=dropout, dropout_rng=dropout_rng,
            broadcast_dropout=broadcast_dropout, precision=precision,
        )  # fmt: skip
        return jnp.swapaxes(out, -3, -2).astype(dtype)  # [..., T, N, V]

    structural = _structural_mask(T, S, bool(is_causal), lengths, len(target))
    if structural is not None:
        mask = structural if mask is None else jnp.logical_and(mask, structural)
    out, weights = _xla_path(
        q, k, v, mask, bias, dropout, dropout_rng, broadcast_dropout,
        scale=scale, precision=precision, want_weights=want_weights,
    )  # fmt: skip
    out = jnp.swapaxes(out, -3, -2).astype(dtype)  # [..., T, N, V]
    if want_weights:
        weights = weights.astype(dtype)  # [..., N, T, S]
        if module is not None:
            module.sow("intermediates", "attention_weights", weights)
        if return_weights:
            return out, weights
    return out


def _structural_mask(T, S, is_causal, lengths, rank):
    """The causal and key-length masks as one bool [*b|1, 1, T|1, S] array (None if neither)."""
    mask = None
    if is_causal:  # top-left aligned: query t sees keys s <= t
        mask = _lead_pad(jnp.arange(T)[:, None] >= jnp.arange(S)[None, :], rank)
    if lengths is not None:
        keys = _lead_pad(jnp.arange(S), rank) < lengths[..., None, None, None]  # [*b, 1, 1, S]
        mask = keys if mask is None else jnp.logical_and(mask, keys)
    return mask


def _kernel_path(impl, q, k, v, mask, bias, lengths, *, is_causal, scale):
    """A fused kernel on [B, T, N, H] (the batch dims flattened into one B)."""
    from attention_jax import kernels

    *batch, T, N, H = q.shape
    B = math.prod(batch)
    S, V = k.shape[-3], v.shape[-1]
    q, k, v = q.reshape(B, T, N, H), k.reshape(B, S, N, H), v.reshape(B, S, N, v.shape[-1])

    def flat(x):  # [*b|1, N|1, T|1, S|1] -> [B|1, N|1, T|1, S|1]
        if x is None:
            return None
        if all(d == 1 for d in x.shape[: len(batch)]):
            return x.reshape(1, *x.shape[len(batch) :])
        return jnp.broadcast_to(x, (*batch, *x.shape[len(batch) :])).reshape(B, *x.shape[-3:])

    lengths = None if lengths is None else lengths.reshape(B)
    if impl == "cudnn":
        out = kernels.cudnn_attention(q, k, v, bias=flat(bias), mask=flat(mask),
                                      is_causal=is_causal, key_value_seq_lengths=lengths,
                                      scale=scale)  # fmt: skip
    else:
        out = kernels.pallas_attention(q, k, v, is_causal=is_causal,
                                       key_value_seq_lengths=lengths, scale=scale)  # fmt: skip
    return out.reshape(*batch, T, N, V).astype(q.dtype)


def _xla_path(q, k, v, mask, bias, dropout, rng, broadcast_dropout, *, scale, precision,
              want_weights):  # fmt: skip
    """vmap of the one-head function over heads, then batch dims: one XLA computation."""
    lead = q.shape[:-2]  # (*batch, N)
    keep = None
    if dropout:
        shape = (1,) * len(lead) if broadcast_dropout else lead
        kept = jax.random.bernoulli(rng, 1.0 - dropout, (*shape, q.shape[-2], k.shape[-2]))
        keep = kept.astype(_acc_dtype(q)) / (1.0 - dropout)  # [*lead|1, T, S]
    one_head = functools.partial(
        _attend, scale=scale, precision=precision, want_weights=want_weights
    )

    def head(q, k, v, mask, bias, keep):
        out, _, w = one_head(q, k, v, mask, bias, keep)
        return out, w

    return _vmap_leading(head, (q, k, v, mask, bias, keep), lead)


def _vmap_leading(fn, args, lead):
    """vmaps fn over the leading dims `lead` of every array in args; an arg whose leading
    dim is 1 (or that is None) is broadcast (in_axes=None) instead of materialised."""
    if not lead:
        return fn(*args)
    squeezed, axes = [], []
    for a in args:
        if a is None or a.shape[0] == 1:
            squeezed.append(None if a is None else a[0])
            axes.append(None)
        else:
            squeezed.append(a)
            axes.append(0)
    inner = functools.partial(_vmap_leading, fn, lead=lead[1:])
    mapped = jax.vmap(lambda *xs: inner(xs), in_axes=tuple(axes), axis_size=lead[0])
    return mapped(*squeezed)


# --------------------------------------------------------------------------------------
# Projections: the whole multi-head block as a function of a params pytree.
# --------------------------------------------------------------------------------------


def init_multi_head_attention(
    rng,
    in_features: int,
    num_heads: int,
    *,
    qkv_features: int | None = None,
    out_features: int | None = None,
    kv_features: int | None = None,
    use_bias: bool = True,
    dtype=jnp.float32,
) -> dict:
    """Parameters for :func:`multi_head_attention`, laid out like Flax's
    ``MultiHeadDotProductAttention`` (so its params can be used directly).

    Kernels use LeCun-normal (truncated) over the fan-in, biases zeros, as Flax does.

    Returns:
      ``{'query'|'key'|'value': {'kernel': [D, N, H], 'bias': [N, H]},
      'out': {'kernel': [N, H, Dout], 'bias': [Dout]}}`` (no 'bias' when ``use_bias=False``).
    """
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    kv_features = in_features if kv_features is None else kv_features
    for nm, val in (
        ("in_features", in_features),
        ("num_heads", num_heads),
        ("qkv_features", qkv_features),
        ("out_features", out_features),
        ("kv_features", kv_features),
    ):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"init_multi_head_attention: {nm} must be a positive int, got {val!r}")
    if qkv_features % num_heads:
        raise ValueError(
            f"init_multi_head_attention: num_heads={num_heads} must divide the attention "
            f"width qkv_features={qkv_features} (d_model)"
        )
    head_dim = qkv_features // num_heads
    proj_init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
    )
    out_init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )
    kq, kk, kv, ko = jax.random.split(rng, 4)
    params = {
        "query": {"kernel": proj_init(kq, (in_features, num_heads, head_dim), dtype)},
        "key": {"kernel": proj_init(kk, (kv_features, num_heads, head_dim), dtype)},
        "value": {"kernel": proj_init(kv, (kv_features, num_heads, head_dim), dtype)},
        "out": {"kernel": out_init(ko, (num_heads, head_dim, out_features), dtype)},
    }
    if use_bias:
        for nm in ("query", "key", "value"):
            params[nm]["bias"] = jnp.zeros((num_heads, head_dim), dtype)
        params["out"]["bias"] = jnp.zeros((out_features,), dtype)
    return params


def multi_head_attention(
    params: dict,
    inputs_q,
    inputs_kv=None,
    *,
    num_heads: int,
    mask=None,
    bias=None,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = True,
    dtype=None,
    precision=None,
    implementation: Implementation | None = None,
    return_weights: bool = False,
    query_positions=None,
    key_positions=None,
    is_causal: bool = False,
    key_value_seq_lengths=None,
):
    """MultiHead(Q, K, V) = Concat(head_1..head_N)·W_O with head_i = Attention(Q·W_Qi, K·W_Ki,
    V·W_Vi), as a pure function of a params pytree (see :func:`init_multi_head_attention`).

    Args:
      params: the pytree; kernels ``[D, N, H]`` and ``[N, H, Dout]``.
      inputs_q: ``[..., T, D]``.
      inputs_kv: ``[..., S, Dkv]`` (default: ``inputs_q``, i.e. self-attention).
      num_heads: N; must match the params.
      mask, bias, dropout_*, deterministic, dtype, precision, implementation,
      return_weights, is_causal, key_value_seq_lengths: as in :func:`dot_product_attention`.
      query_positions, key_positions: integer ``[..., T]`` and ``[..., S]``; when given, the
        projected queries and keys are rotated by
        :func:`attention_jax.positional.apply_rotary_embedding` (rotary positions).

    Returns:
      ``[..., T, Dout]``, or ``(out, weights [..., N, T, S])`` with ``return_weights``.
    """
    name = "multi_head_attention"
    inputs_q = jnp.asarray(inputs_q)
    inputs_kv = inputs_q if inputs_kv is None else jnp.asarray(inputs_kv)
    _check_mha_params(name, params, num_heads, inputs_q, inputs_kv)
    if dtype is None:
        dtype = jnp.result_type(inputs_q, inputs_kv, *jax.tree.leaves(params))
    q = project_heads(params["query"], inputs_q, dtype=dtype, precision=precision)  # [...TNH]
    k = project_heads(params["key"], inputs_kv, dtype=dtype, precision=precision)  # [...SNH]
    v = project_heads(params["value"], inputs_kv, dtype=dtype, precision=precision)  # [...SNH]
    if (query_positions is None) != (key_positions is None):
        raise ValueError(f"{name}: give both query_positions and key_positions, or neither")
    if query_positions is not None:
        q = apply_rotary_embedding(q, query_positions)
        k = apply_rotary_embedding(k, key_positions)
    result = dot_product_attention(
        q, k, v, bias, mask, dropout_rng=dropout_rng, dropout_rate=dropout_rate,
        deterministic=deterministic, dtype=dtype, precision=precision,
        implementation=implementation, return_weights=return_weights, is_causal=is_causal,
        key_value_seq_lengths=key_value_seq_lengths,
    )  # fmt: skip
    heads, weights = result if return_weights else (result, None)
    out = merge_heads(params["out"], heads, dtype=dtype, precision=precision)  # [..., T, Dout]
    return (out, weights) if return_weights else out


def project_heads(params: dict, x, *, dtype, precision=None):
    """One input projection of multi-head attention: ``x [..., T, D] -> [..., T, N, H]``
    with ``params = {'kernel': [D, N, H], 'bias': [N, H]}`` (the bias is optional)."""
    y = jnp.einsum("...TD,DNH->...TNH", x.astype(dtype), params["kernel"].astype(dtype),
                   precision=precision)  # fmt: skip
    return y + _lead_pad(params["bias"].astype(dtype), y.ndim) if "bias" in params else y


def merge_heads(params: dict, heads, *, dtype, precision=None):
    """The output projection W_O: ``heads [..., T, N, H] -> [..., T, Dout]`` with
    ``params = {'kernel': [N, H, Dout], 'bias': [Dout]}`` (the bias is optional)."""
    out = jnp.einsum("...TNH,NHD->...TD", heads.astype(dtype), params["kernel"].astype(dtype),
                     precision=precision)  # fmt: skip
    return out + _lead_pad(params["bias"].astype(dtype), out.ndim) if "bias" in params else out


# --------------------------------------------------------------------------------------
# Boundary checks: raised at trace time, naming what was expected and what came.
# --------------------------------------------------------------------------------------


def _float_dtype(name, q, k, v, dtype):
    for nm, x in (("query", q), ("key", k), ("value", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: {nm} must be a floating-point array, got dtype {x.dtype}")
    if dtype is None:
        return jnp.result_type(q, k, v)
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"{name}: dtype must be a floating-point dtype, got {dtype}")
    return jnp.dtype(dtype)


def _check_qkv(name, q, k, v, *, batch_rank):
    shapes = f"query {q.shape}, key {k.shape}, value {v.shape}"
    if q.shape[:batch_rank] != k.shape[:batch_rank] or k.shape[:batch_rank] != v.shape[:batch_rank]:
        raise ValueError(
            f"{name}: query, key and value need the same batch dims [...], got {shapes}"
        )
    if q.ndim > 2:  # multi-head layout [..., T|S, N, H]
        if not q.shape[-2] == k.shape[-2] == v.shape[-2]:
            raise ValueError(
                f"{name}: query, key and value need the same number of heads N "
                f"(layout [..., T|S, N, H]), got {shapes}"
            )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{name}: query and key need the same head dim H (last axis), got {shapes}"
        )
    s_axis = -3 if q.ndim > 2 else 0
    if k.shape[s_axis] != v.shape[s_axis]:
        raise ValueError(
            f"{name}: key and value need the same length S, got key {k.shape}, value {v.shape}"
        )
    for nm, x in (("query", q), ("key", k), ("value", v)):
        if 0 in x.shape:
            raise ValueError(f"{name}: {nm} has an empty dimension: {x.shape}")


def _broadcastable(shape, target) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(shape[::-1], target[::-1], strict=False))


def _check_mask(name, mask, target, legend):
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"{name}: mask must be bool (True = attend), got dtype {mask.dtype}; "
            "for additive float masks use bias="
        )
    if not _broadcastable(mask.shape, target):
        raise ValueError(
            f"{name}: mask of shape {mask.shape} is not broadcastable to {legend} = {target}"
        )
    return mask


def _check_bias(name, bias, target, legend):
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"{name}: bias must be a floating-point array, got dtype {bias.dtype}")
    if not _broadcastable(bias.shape, target):
        raise ValueError(
            f"{name}: bias of shape {bias.shape} is not broadcastable to {legend} = {target}"
        )
    return bias


def _lead_pad(x, rank):
    return x.reshape((1,) * (rank - x.ndim) + x.shape)


def _check_lengths(name, lengths, batch):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(
            f"{name}: key_value_seq_lengths must be an integer array, got dtype {lengths.dtype}"
        )
    if lengths.shape != batch:
        raise ValueError(
            f"{name}: key_value_seq_lengths must have the batch shape {batch} of query "
            f"[..., T, N, H], got {lengths.shape}"
        )
    return lengths.astype(jnp.int32)


def _resolve_implementation(name, implementation, **call) -> str:
    """The implementation that runs this call; an explicit one that cannot gets a ValueError.

    `call`: q_shape, k_shape, v_shape, dtype, has_mask, has_bias, is_causal, has_lengths,
    dropout, want_weights (what :func:`attention_jax.kernels.unsupported_reason` takes).
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"{name}: implementation must be one of {IMPLEMENTATIONS} or None, "
            f"got {implementation!r}"
        )
    if implementation == "xla":
        return "xla"
    if implementation == "blockwise":
        if call["want_weights"]:
            raise ValueError(
                f"{name}: implementation='blockwise' never forms the [T, S] weights, so it "
                "cannot return or sow them; use implementation='xla' for weights"
            )
        return "blockwise"
    if implementation in ("cudnn", "pallas"):
        from attention_jax import kernels

        reason = kernels.unsupported_reason(implementation, **call)
        if reason is not None:
            raise ValueError(f"{name}: implementation={implementation!r} cannot run here: {reason}")
        return implementation
    (T, N, _), S = call["q_shape"][-3:], call["k_shape"][-3]
    backend = jax.default_backend()
    reasons = {}
    if backend in ("gpu", "tpu") and not call["want_weights"]:
        from attention_jax import kernels

        reasons = {nm: kernels.unsupported_reason(nm, **call) for nm in ("cudnn", "pallas")}
    G = math.prod(call["q_shape"][:-3]) * N
    return blockwise.choose_implementation(backend=backend, T=T, S=S, num_heads=G,
                                           want_weights=call["want_weights"],
                                           kernel_reasons=reasons)  # fmt: skip


def _check_dropout(name, rate, deterministic, rng) -> float:
    """Returns the active dropout rate (0.0 when dropout is off)."""
    if deterministic:
        return 0.0
    if isinstance(rate, jax.core.Tracer):
        raise TypeError(f"{name}: dropout_rate must be a Python float, got a traced value")
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"{name}: dropout_rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return 0.0
    if rng is None:
        raise ValueError(
            f"{name}: dropout_rate={rate} with deterministic=False needs a dropout_rng"
        )
    return float(rate)


def _check_mha_params(name, params, num_heads, inputs_q, inputs_kv):
    for nm in ("query", "key", "value", "out"):
        if not isinstance(params, dict) or nm not in params or "kernel" not in params[nm]:
            raise ValueError(
                f"{name}: params must hold '{nm}': {{'kernel', 'bias'?}} "
                "(see init_multi_head_attention)"
            )
    qk = params["query"]["kernel"]
    if qk.ndim != 3 or qk.shape[1] != num_heads:
        raise ValueError(
            f"{name}: query kernel must be [D, N={num_heads}, H], got {qk.shape}; "
            f"num_heads={num_heads} does not match the params"
        )
    if inputs_q.ndim < 2 or inputs_q.shape[-1] != qk.shape[0]:
        raise ValueError(
            f"{name}: inputs_q must be [..., T, D={qk.shape[0]}], got {inputs_q.shape}"
        )
    kk = params["key"]["kernel"]
    if inputs_kv.ndim != inputs_q.ndim or inputs_kv.shape[-1] != kk.shape[0]:
        raise ValueError(
            f"{name}: inputs_kv must be [..., S, D={kk.shape[0]}] with the rank of inputs_q "
            f"{inputs_q.shape}, got {inputs_kv.shape}"
        )
    for nm in ("query", "key", "value", "out"):
        if "bias" not in params[nm]:
            continue
        kernel = params[nm]["kernel"]
        want = kernel.shape[-1:] if nm == "out" else kernel.shape[1:]  # [Dout] or [N, H]
        if tuple(jnp.shape(params[nm]["bias"])) != tuple(want):
            raise ValueError(
                f"{name}: params['{nm}']['bias'] must have shape {tuple(want)} to match its "
                f"kernel {kernel.shape}, got {jnp.shape(params[nm]['bias'])}"
            )


__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "dot_product_attention",
    "init_multi_head_attention",
    "multi_head_attention",
    "scaled_dot_product_attention",
]
