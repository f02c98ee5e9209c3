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
  plain autodiff (any transform works, forward mode included). The only one that takes
  flax's einsum overrides, ``einsum_dot_general`` or a traced ``scale``.
* ``'blockwise'``: :mod:`attention_jax.core.blockwise`, the same math in tiles of queries and
  keys with an online softmax and a recomputing custom VJP: O(T) memory instead of
  O(T·S), causal / window / length tiles skipped. Pure JAX, any device. **Reverse mode
  only** (``jax.custom_vjp`` has no forward mode): under ``jvp``, ``jacfwd`` or ``hessian``
  it raises a TypeError naming ``'blockwise_autodiff'`` (where jax raises inside this call;
  ``jvp`` of an already jitted function gets jax's own message).
* ``'blockwise_autodiff'``: the same tiles with static loop bounds, ``jax.checkpoint`` and
  plain autodiff instead of the custom VJP: O(T) memory too, and every transform.
* ``'cudnn'``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``
  (NVIDIA GPUs, bf16/f16). ``'pallas'``: the flash-attention kernels in
  ``jax.experimental.pallas.ops`` (GPU, TPU); see :mod:`attention_jax.core.kernels`. Both are
  reverse mode only and take none of query_seq_lengths, local_window_size,
  return_residual, the einsum overrides, einsum_dot_general, a traced scale (an explicit
  choice with one of those raises a ValueError naming it).
* ``None``: the fastest path that serves **every** transform, mesh and dtype
  (:func:`attention_jax.core.blockwise.choose_implementation` with ``forward_mode=True``): never
  a fused kernel or ``'blockwise'``; ``'xla'`` for short sequences (on CPU while a head's
  float32 scores fit 512 KiB, i.e. T·S <= 131072), else ``'blockwise_autodiff'``.
* ``'auto'``: the fastest path, which may be reverse-only: the fused kernels on GPU/TPU
  when they accept the call, ``'blockwise'`` for long sequences. For training steps, which
  only take ``grad``.

Why ``None`` is ``'blockwise_autodiff'`` above the threshold, not ``'blockwise'`` nor
``'xla'`` (2-core CPU, G = 4 heads, H = 64, float32, min of 3, ``memory_analysis`` temp
bytes; ms / MiB; noisy, the machine was shared):

====== ========= ================ ================ ==================
T      pass      xla (dense)      blockwise (VJP)  blockwise_autodiff
====== ========= ================ ================ ==================
1024   fwd       15 / 0           19 / 6           18 / 6
1024   fwd+bwd   80 / 64          66 / 9           99 / 13
2048   fwd+bwd   357 / 256        387 / 9          406 / 19
4096   fwd       192 / 0          145 / 7          139 / 7
4096   fwd+bwd   1495 / 1024      478 / 13         909 / 31
4096c  fwd+bwd   718 / 768        263 / 13         586 / 34
====== ========= ================ ================ ==================

(c: causal.) The autodiff variant's forward costs the same as the custom VJP's, its
backward 1.2-2.2× more (autodiff of the online softmax recomputes each tile twice under
``jax.checkpoint`` and cannot skip tiles in reverse), its memory stays O(T); dense
``'xla'`` needs O(T·S) and is slower in reverse from T = 4096. A custom_jvp with a
blockwise tangent rule and a custom transpose would serve both modes at VJP speed, but
needs ``jax._src.custom_transpose`` (private, unversioned): not taken. ``'auto'`` keeps
the faster reverse-only paths for callers that never take forward derivatives.

Masks that are structure rather than data are best given as such: ``is_causal=True``,
``local_window_size``, ``key_value_seq_lengths`` and ``query_seq_lengths`` cost no
``T × S`` array and let ``'blockwise'`` skip tiles.

Masked logits get a finite large negative (``NEG``, jax.nn's -0.7 × float32 max), never
-inf, so ``jax.debug_infs`` stays quiet. A query that sees no key gets a zero output and
residual ``NEG`` (jax.nn and flax average the values there: a deliberate difference).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax.core import blockwise
from attention_jax.core.positional import apply_rotary_embedding

Implementation = Literal["xla", "blockwise", "blockwise_autodiff", "cudnn", "pallas", "auto"]
IMPLEMENTATIONS: tuple[str, ...] = (
    "xla", "blockwise", "blockwise_autodiff", "cudnn", "pallas", "auto"
)  # fmt: skip
_BLOCKWISE = ("blockwise", "blockwise_autodiff")
# Arguments only the dense 'xla' path takes.
_DENSE_ONLY = (
    "qk_attn_weights_einsum/attn_weights_value_einsum",
    "einsum_dot_general",
    "a traced scale",
)
NEG = blockwise.NEG

_F32 = jnp.float32


def _acc_dtype(x):
    """Accumulation dtype: float32 for bf16/f16/f32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(x.dtype, _F32)


# --------------------------------------------------------------------------------------
# The one head: the four steps.
# --------------------------------------------------------------------------------------


def _attend(q, k, v, mask, bias, keep, *, scale, precision, want_weights, dot_general=None):
    """The four steps for one head (or one block of its queries).

    Args:
      q: [T, H]; k: [S, H]; v: [S, V].
      mask: bool broadcastable to [T, S] (True = attend), or None.
      bias: float broadcastable to [T, S], added to the scaled scores, or None.
      keep: float [T, S] dropout multiplier (0 or 1/keep_prob), or None.
      dot_general: replaces ``lax.dot_general`` in both matmuls (flax's
        ``einsum_dot_general``), or None.

    Returns:
      out [T, V] float32, lse [T] float32 (log-sum-exp of each row's logits; ``NEG`` for a
      fully masked row), weights [T, S] float32 or None.
    """
    acc = _acc_dtype(q)
    mm = dict(precision=precision, preferred_element_type=acc)
    if dot_general is not None:
        mm["_dot_general"] = dot_general
    # 1. scores (float32 even for bf16/f16 inputs).
    scores = jnp.einsum("TH,SH->TS", q, k, **mm)
    # 2. scale by 1/√H.
    logits = scores * scale  # [T, S]
    # 3. softmax, normalised in float32.
    p, lse = _softmax(logits, mask, bias)
    # 4. weighted sum of the values.
    pd = p if keep is None else p * keep
    out = jnp.einsum("TS,SV->TV", pd.astype(v.dtype), v, **mm)  # [T, V]
    return out, lse, (p if want_weights else None)


def _softmax(logits, mask, bias):
    """Softmax over the last axis of float32 `logits` [..., S] after adding `bias` and masking.

    Returns ``(p, lse)``: the normalised weights in the logits' dtype (masked keys exactly
    0; a row with every key masked all 0, so its output is 0, never 0/0 or NaN) and each
    row's log-sum-exp (``NEG`` for such a row).

    Normalising here, in float32, before the weights are cast to the values' dtype for the
    last matmul, is what keeps bf16 gradients accurate: the softmax backward then forms
    ``p ∘ (dp - rowsum(p ∘ dp))`` from one consistently rounded ``dp``. (Dividing after the
    matmul, as before, made ``rowsum`` come from the float32 output instead, and where one
    key dominates a row the difference cancels catastrophically.) Masked logits get the
    finite ``NEG`` rather than -inf, so no operation produces an inf (``jax.debug_infs``).
    """
    if bias is not None:
        logits = logits + bias.astype(logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG)
    # The max is only for stability (softmax is shift-invariant), hence no gradient; a row
    # whose bias is all -inf has max -inf, shifted by 0 instead.
    row_max = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [..., 1]
    if bias is not None:
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(logits - row_max)  # [..., S]
    if mask is not None:  # a fully masked row has max NEG: exp(NEG - NEG) = 1, not 0
        e = jnp.where(mask, e, 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)  # [..., 1]
    if mask is None and bias is None:  # every row has a key with e = 1
        return e / denom, (row_max + jnp.log(denom))[..., 0]
    seen = denom > 0
    denom = jnp.where(seen, denom, 1.0)
    lse = jnp.where(seen, row_max + jnp.log(denom), NEG)[..., 0]
    return e / denom, lse


def scaled_dot_product_attention(q, k, v, mask=None, bias=None):
    """Attention for one head: softmax(q·kᵀ / √H + bias, masked) · v.

    Args:
      q: queries ``[T, H]``.
      k: keys ``[S, H]``.
      v: values ``[S, V]``.
      mask: optional, broadcastable to ``[T, S]``; True (nonzero) = attend. Masked keys get
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
    broadcast_dropout: bool = True,
    dropout_rng=None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype=None,
    precision=None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general=None,
    qk_attn_weights_einsum=None,
    attn_weights_value_einsum=None,
    *,
    scale=None,
    is_causal: bool = False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    return_weights: bool = False,
):
    """Multi-head scaled dot-product attention: the one-head function over heads and batch.

    Takes every argument of ``flax.linen.dot_product_attention`` (same positions, same
    meaning), so it can be passed as ``attention_fn`` to ``flax.linen``'s and ``flax.nnx``'s
    ``MultiHeadAttention`` (which hand it ``module`` when ``sow_weights=True``; the weights
    are then sown into ``intermediates``), and every keyword argument of
    ``jax.nn.dot_product_attention`` except grouped-query heads (key/value heads K != N).
    One deliberate difference from both: a query that sees no key at all gets a zero output
    (they average the values).

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, N, H]``.
      value: ``[..., S, N, V]``.
      bias: optional float, broadcastable to ``[..., N, T, S]``, added to the scaled scores.
      mask: optional, broadcastable to ``[..., N, T, S]``; True = attend. Any dtype: as in
        flax, nonzero = attend (Flax's ``make_causal_mask`` gives float32 0/1).
      broadcast_dropout: share one dropout pattern across batch and heads (flax's default).
      dropout_rng: PRNG key for attention dropout.
      dropout_rate: probability of dropping an attention weight, in [0, 1).
      deterministic: no dropout if True. As in flax the default is False, and dropout happens
        only when ``dropout_rate > 0`` (then a ``dropout_rng`` is required).
      dtype: computation dtype (default: the promoted dtype of query, key, value, as flax).
      precision: matmul precision (``jax.lax.Precision``), as in flax.
      module: a Flax module to ``sow`` the weights into (``intermediates/attention_weights``).
      force_fp32_for_softmax: accepted for flax; the softmax here is always float32 (or
        float64 for float64 inputs), so it changes nothing.
      einsum_dot_general: replaces ``jax.lax.dot_general`` in both matmuls, as in flax.
      qk_attn_weights_einsum, attn_weights_value_einsum: flax's einsum overrides, given
        together and not with ``precision``/``einsum_dot_general``: called as
        ``qk('...qhd,...khd->...hqk', query / √H, key)`` and
        ``av('...hqk,...khd->...qhd', weights, value)``. Only ``'xla'`` runs them.
      scale: the logit scale (default ``1/√H``), as in jax.nn. A traced value only runs on
        ``'xla'``.
      is_causal: query t attends only keys s <= t (top-left aligned when T != S, as in
        ``jax.nn.dot_product_attention``); combined with ``mask`` if both are given.
      query_seq_lengths: optional int ``[...]`` (the batch dims): queries at or past the
        length get a zero output (and weights, and residual ``NEG``), as jax.nn.
      key_value_seq_lengths: optional int ``[...]``: keys at or past the length are masked.
      local_window_size: ``(left, right)`` or an int w for ``(w, w)``: query t attends only
        keys ``t - left <= s <= t + right`` (jax.nn's sliding window).
      implementation: ``'xla'``, ``'blockwise'``, ``'blockwise_autodiff'``, ``'cudnn'``,
        ``'pallas'``, None (the fastest that serves every transform) or ``'auto'`` (the
        fastest, possibly reverse-mode only); see the module docstring. An explicit choice
        that cannot run this call raises a ValueError saying why.
      return_residual: also return the log-sum-exp of each row's scaled logits,
        ``[..., T, N]`` in ``dtype`` with its gradient stopped, as jax.nn (``NEG`` =
        -0.7·float32 max for a query that sees no key).
      return_weights: also return the attention weights ``[..., N, T, S]`` (before dropout),
        e.g. for visualisation (``'blockwise'`` recomputes them from its log-sum-exp).

    Returns:
      ``out [..., T, N, V]`` in ``dtype``; ``(out, weights)`` with ``return_weights``,
      ``(out, residual)`` with ``return_residual``, ``(out, weights, residual)`` with both.
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
    kv_lengths = _check_lengths(name, "key_value_seq_lengths", key_value_seq_lengths,
                                tuple(batch))  # fmt: skip
    q_lengths = _check_lengths(name, "query_seq_lengths", query_seq_lengths, tuple(batch))
    window = _check_window(name, local_window_size)
    scale = _check_scale(name, scale, H)
    einsums = _check_einsums(name, precision, einsum_dot_general, qk_attn_weights_einsum,
                             attn_weights_value_einsum)  # fmt: skip
    dropout = _check_dropout(name, dropout_rate, deterministic, dropout_rng)
    want_weights = bool(return_weights) or module is not None
    # What only some implementations can take (the fused kernels none of these).
    features = {
        "query_seq_lengths": q_lengths is not None,
        "local_window_size": window is not None,
        "return_residual": bool(return_residual),
        "qk_attn_weights_einsum/attn_weights_value_einsum": einsums is not None,
        "einsum_dot_general": einsum_dot_general is not None,
        "a traced scale": not isinstance(scale, float),
    }
    impl = _resolve_implementation(
        name, implementation, q_shape=query.shape, k_shape=key.shape, v_shape=value.shape,
        dtype=dtype, has_mask=mask is not None, has_bias=bias is not None,
        is_causal=bool(is_causal), has_lengths=kv_lengths is not None, dropout=dropout,
        want_weights=want_weights, features=[f for f, used in features.items() if used],
    )  # fmt: skip
    mask = None if mask is None else _lead_pad(mask, len(target))  # [*b|1, N|1, T|1, S|1]
    bias = None if bias is None else _lead_pad(bias, len(target))

    if impl in ("cudnn", "pallas"):
        q, k, v = (x.astype(dtype) for x in (query, key, value))
        return _kernel_path(impl, q, k, v, mask, bias, kv_lengths, is_causal=bool(is_causal),
                            scale=scale)  # fmt: skip

    # Heads first: [..., T, N, H] -> [..., N, T, H].
    q, k, v = (jnp.swapaxes(x.astype(dtype), -3, -2) for x in (query, key, value))
    structural = _structural_mask(T, S, bool(is_causal), window, kv_lengths, q_lengths,
                                  len(target))  # fmt: skip
    if impl in _BLOCKWISE:
        try:
            out, lse = blockwise.blockwise_attention(
                q, k, v, mask, bias, scale=scale, is_causal=bool(is_causal),
                kv_lengths=None if kv_lengths is None else kv_lengths[..., None],  # [*b, N=1]
                local_window=window, dropout_rate=dropout, dropout_rng=dropout_rng,
                broadcast_dropout=broadcast_dropout, precision=precision,
                autodiff=impl == "blockwise_autodiff", return_lse=True,
            )  # fmt: skip  # out [*b, N, T, V], lse [*b, N, T]
        except TypeError as e:  # jvp of the custom VJP, caught where jax raises it in here
            if "forward-mode" not in str(e):
                raise
            raise TypeError(
                f"{name}: implementation='blockwise' has a custom VJP, so it serves reverse "
                "mode only (grad, vjp); for jvp, jacfwd or hessian use "
                "implementation='blockwise_autodiff' (the same O(T) memory, every transform), "
                "'xla', or None"
            ) from e
        if q_lengths is not None:  # queries past their length: output 0, as jax.nn
            rows = _lead_pad(jnp.arange(T), len(batch) + 2) < q_lengths[..., None, None]
            out = jnp.where(rows[..., None], out, 0.0)
            lse = jnp.where(rows, lse, NEG)
        weights = None
        if want_weights:  # exp(logits - lse): the normaliser from the blockwise pass
            full = structural if mask is None else _and(mask, structural)
            logits = jnp.einsum("...TH,...SH->...TS", q, k, precision=precision,
                                preferred_element_type=_acc_dtype(q)) * scale  # fmt: skip
            if bias is not None:
                logits = logits + bias.astype(logits.dtype)
            if full is not None:
                logits = jnp.where(full, logits, NEG)
            weights = jnp.exp(logits - lse[..., None])  # [*b, N, T, S]
            if full is not None:
                weights = jnp.where(full, weights, 0.0)
    else:
        if structural is not None:
            mask = structural if mask is None else jnp.logical_and(mask, structural)
        out, lse, weights = _xla_path(
            q, k, v, mask, bias, dropout, dropout_rng, broadcast_dropout, scale=scale,
            precision=precision, want_weights=want_weights, dot_general=einsum_dot_general,
            einsums=einsums,
        )  # fmt: skip
    out = jnp.swapaxes(out, -3, -2).astype(dtype)  # [..., T, N, V]
    result = [out]
    if want_weights:
        weights = weights.astype(dtype)  # [..., N, T, S]
        if module is not None:
            module.sow("intermediates", "attention_weights", weights)
        if return_weights:
            result.append(weights)
    if return_residual:  # [..., N, T] -> [..., T, N], as jax.nn
        result.append(lax.stop_gradient(jnp.swapaxes(lse, -2, -1).astype(dtype)))
    return result[0] if len(result) == 1 else tuple(result)


def _and(a, b):
    return b if a is None else (a if b is None else jnp.logical_and(a, b))


def _structural_mask(T, S, is_causal, window, kv_lengths, q_lengths, rank):
    """The causal, window and length masks as one bool [*b|1, 1, T|1, S|1] array (None if
    none applies)."""
    mask = None
    rows, cols = jnp.arange(T)[:, None], jnp.arange(S)[None, :]  # [T, 1], [1, S]
    if is_causal:  # top-left aligned: query t sees keys s <= t
        mask = _lead_pad(rows >= cols, rank)
    if window is not None:  # jax.nn: t - left <= s <= t + right
        left, right = window
        mask = _and(mask, _lead_pad((rows <= cols + left) & (rows >= cols - right), rank))
    if kv_lengths is not None:
        keys = _lead_pad(jnp.arange(S), rank) < kv_lengths[..., None, None, None]  # [*b,1,1,S]
        mask = _and(mask, keys)
    if q_lengths is not None:
        queries = _lead_pad(rows, rank) < q_lengths[..., None, None, None]  # [*b, 1, T, 1]
        mask = _and(mask, queries)
    return mask


def _kernel_path(impl, q, k, v, mask, bias, lengths, *, is_causal, scale):
    """A fused kernel on [B, T, N, H] (the batch dims flattened into one B)."""
    from attention_jax.core import kernels

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
              want_weights, dot_general=None, einsums=None):  # fmt: skip
    """vmap of the one-head function over heads, then batch dims: one XLA computation.

    Returns out [*lead, T, V] (float32 for bf16/f16/f32), lse [*lead, T], weights or None.
    With flax's einsum overrides (`einsums`), the same steps on the whole [..., N, T, S]
    instead, calling them with flax's subscripts.
    """
    lead = q.shape[:-2]  # (*batch, N)
    keep = None
    if dropout:
        shape = (1,) * len(lead) if broadcast_dropout else lead
        kept = jax.random.bernoulli(rng, 1.0 - dropout, (*shape, q.shape[-2], k.shape[-2]))
        keep = kept.astype(_acc_dtype(q)) / (1.0 - dropout)  # [*lead|1, T, S]
    if einsums is not None:
        qk, av = einsums
        # flax's layout and subscripts: [..., T, N, H] in, [..., N, T, S] weights.
        qt, kt, vt = (jnp.swapaxes(x, -3, -2) for x in (q, k, v))
        logits = qk("...qhd,...khd->...hqk", qt * jnp.asarray(scale, q.dtype), kt)
        p, lse = _softmax(logits.astype(_acc_dtype(q)), mask, bias)
        pd = p if keep is None else p * keep
        out = av("...hqk,...khd->...qhd", pd.astype(v.dtype), vt)  # [..., T, N, V]
        return jnp.swapaxes(out, -3, -2), lse, (p if want_weights else None)
    one_head = functools.partial(_attend, scale=scale, precision=precision,
                                 want_weights=want_weights, dot_general=dot_general)  # fmt: skip
    return _vmap_leading(one_head, (q, k, v, mask, bias, keep), lead)


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
        :func:`attention_jax.core.positional.apply_rotary_embedding` (rotary positions).

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
                f"(layout [..., T|S, N, H]), got {shapes}; grouped-query attention "
                "(key/value heads K != N) is not supported, repeat the key and value "
                "heads to N (jnp.repeat(x, N // K, axis=-2))"
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
    """The mask as bool. As in flax (``jnp.where(mask, ...)``) any dtype is accepted and
    nonzero means attend: Flax's ``make_causal_mask``/``make_attention_mask`` give float32."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if not _broadcastable(mask.shape, target):
        raise ValueError(
            f"{name}: mask of shape {mask.shape} is not broadcastable to {legend} = {target}"
        )
    return mask if mask.dtype == jnp.bool_ else mask.astype(jnp.bool_)


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


def _check_lengths(name, argname, lengths, batch):
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name}: {argname} must be an integer array, got dtype {lengths.dtype}")
    if lengths.shape != batch:
        raise ValueError(
            f"{name}: {argname} must have the batch shape {batch} of query "
            f"[..., T, N, H], got {lengths.shape}"
        )
    return lengths.astype(jnp.int32)


def _check_window(name, window):
    """local_window_size as (left, right) Python ints >= 0, or None."""
    if window is None:
        return None
    pair = (window, window) if isinstance(window, (int, np.integer)) else window
    ok = isinstance(pair, (tuple, list)) and len(pair) == 2
    ok = ok and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in pair)
    if not ok or min(pair) < 0:
        raise ValueError(
            f"{name}: local_window_size must be an int >= 0 or a (left, right) pair of ints "
            f">= 0, got {window!r}"
        )
    return int(pair[0]), int(pair[1])


def _check_scale(name, scale, H):
    """The logit scale: a Python float when it is static (what blockwise and the kernels
    take), else the traced 0-d array (only 'xla' runs it)."""
    if scale is None:
        return 1.0 / math.sqrt(H)
    if isinstance(scale, jax.core.Tracer):
        if jnp.ndim(scale) != 0 or not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
            raise TypeError(f"{name}: scale must be a float scalar, got {jax.typeof(scale)}")
        return scale
    if np.ndim(scale) != 0 or isinstance(scale, bool):
        raise TypeError(f"{name}: scale must be a float scalar, got {scale!r}")
    return float(scale)


def _check_einsums(name, precision, dot_general, qk, av):
    """flax's rules: the two einsum overrides come together and exclude precision and
    einsum_dot_general. Returns (qk, av) or None."""
    if (qk is None) != (av is None):
        raise ValueError(
            f"{name}: qk_attn_weights_einsum and attn_weights_value_einsum must be specified "
            "together"
        )
    if qk is None:
        return None
    if precision is not None or dot_general is not None:
        raise ValueError(
            f"{name}: precision/einsum_dot_general and qk_attn_weights_einsum/"
            "attn_weights_value_einsum are mutually exclusive; give only one of them"
        )
    return qk, av


def _resolve_implementation(name, implementation, *, features=(), **call) -> str:
    """The implementation that runs this call; an explicit one that cannot gets a ValueError.

    `call`: q_shape, k_shape, v_shape, dtype, has_mask, has_bias, is_causal, has_lengths,
    dropout, want_weights (what :func:`attention_jax.core.kernels.unsupported_reason` takes).
    `features`: the arguments this call uses that only some implementations take (the fused
    kernels none; blockwise not the einsum overrides, einsum_dot_general, a traced scale).
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"{name}: implementation must be one of {IMPLEMENTATIONS} or None, "
            f"got {implementation!r}"
        )
    features = tuple(features)
    dense_only = tuple(f for f in features if f in _DENSE_ONLY)
    if implementation == "xla":
        return "xla"
    if implementation in _BLOCKWISE:
        if dense_only:
            raise ValueError(
                f"{name}: implementation={implementation!r} cannot take "
                f"{', '.join(dense_only)}; use implementation='xla'"
            )
        return implementation
    if implementation in ("cudnn", "pallas"):
        from attention_jax.core import kernels

        reason = None
        if features:
            reason = (
                f"the fused kernels cannot take {', '.join(features)}; use "
                "implementation='xla' or 'blockwise'"
            )
        reason = reason or kernels.unsupported_reason(implementation, **call)
        if reason is not None:
            raise ValueError(f"{name}: implementation={implementation!r} cannot run here: {reason}")
        return implementation
    (T, N, _), S = call["q_shape"][-3:], call["k_shape"][-3]
    backend = jax.default_backend()
    reasons = {}
    # None serves every transform, so never a kernel (their custom VJPs have no forward
    # mode); 'auto' may pick one, and the VJP-only 'blockwise'.
    if implementation == "auto" and backend in ("gpu", "tpu") and not call["want_weights"]:
        from attention_jax.core import kernels

        reasons = {nm: kernels.unsupported_reason(nm, **call) for nm in ("cudnn", "pallas")}
        if features:
            reasons = dict.fromkeys(reasons, "argument")
    G = math.prod(call["q_shape"][:-3]) * N
    return blockwise.choose_implementation(backend=backend, T=T, S=S, num_heads=G,
                                           want_weights=call["want_weights"] or bool(dense_only),
                                           kernel_reasons=reasons,
                                           forward_mode=implementation is None)  # fmt: skip


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
