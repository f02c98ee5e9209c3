"""Scaled dot-product attention as pure, composable JAX functions (no Flax).

The paper's attention for one head is four steps (section 3.2.1), legend as in
:mod:`attention_jax.core`:

    1. scores  = q · kᵀ                       [T, S]
    2. scaled  = scores / √H                  [T, S]
    3. weights = masked softmax(scaled)       [T, S]  (masked keys get weight exactly 0)
    4. out     = weights · v                  [T, Hv]

:func:`scaled_dot_product_attention` is exactly that and :func:`attention_weights` steps 1-3;
:func:`masked_softmax` is step 3. :func:`dot_product_attention` maps the same one-head
steps over heads and batch, and :func:`multi_head_attention` adds the learned projections
of section 3.2.2.

Ways to run the multi-head map (``implementation=``; which one runs is decided in
:mod:`attention_jax.core.dispatch`):

* ``'xla'``: ``jax.vmap`` of the one-head steps over heads, then over each batch dim;
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
  plain autodiff instead of the custom VJP: O(T) memory too, and every transform; its
  backward is slower than the custom VJP's (autodiff of the online softmax recomputes each
  tile twice under ``jax.checkpoint`` and cannot skip tiles in reverse).
* ``'cudnn'``: cuDNN's fused flash attention through ``jax.nn.dot_product_attention``
  (NVIDIA GPUs, bf16/f16). ``'pallas'``: the flash-attention kernels in
  ``jax.experimental.pallas.ops`` (GPU, TPU); see :mod:`attention_jax.core.kernels`. Both are
  reverse mode only and take none of query_seq_lengths, local_window_size,
  return_residual, the einsum overrides, einsum_dot_general, a traced scale (an explicit
  choice with one of those raises a ValueError naming it).
* ``None``: the fastest path that serves **every** transform, mesh and dtype: ``'xla'``
  for short sequences, else ``'blockwise_autodiff'``.
* ``'auto'``: the fastest path, which may be reverse-only: the fused kernels on GPU/TPU
  when they accept the call, ``'blockwise'`` for long sequences. For training steps, which
  only take ``grad``.

The time and memory of the three pure-JAX paths, which set those choices: BUILD_NOTES.md,
"A new user's first day (issue 14)", Measurements. A custom_jvp with a blockwise tangent
rule and a custom transpose would serve both modes at VJP speed, but needs
``jax._src.custom_transpose`` (private, unversioned): not taken.

Masks that are structure rather than data are best given as such: ``is_causal=True``,
``local_window_size``, ``key_value_seq_lengths``, ``query_seq_lengths`` and the segment ids
of packed rows (``query_segment_ids``, ``key_segment_ids``) cost no ``T × S`` array on
``'blockwise'``, which skips the tiles they hide. Of the kernels, the Pallas TPU kernel takes
segment ids (its ``SegmentIds``) and cuDNN takes them as the same-segment mask (jax.nn has no
segment ids; the mask then costs what a given one does); the Pallas GPU kernels cannot take
them (Triton's one ``segment_ids`` array serves queries and keys alike), so ``'auto'`` passes
them by and an explicit ``'pallas'`` there raises.

Masked logits get a finite large negative (``NEG``, jax.nn's -0.7 × float32 max), never
-inf, so ``jax.debug_infs`` stays quiet. A query that sees no key gets a zero output and
residual ``NEG`` (jax.nn and flax average the values there: a deliberate difference).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax.core import blockwise, dispatch, kernels
from attention_jax.core._checks import (
    check_broadcastable,
    check_floating,
    check_lengths,
    check_qkv_shapes,
    check_segment_ids,
    positive_int,
)
from attention_jax.core.dispatch import IMPLEMENTATIONS, Implementation
from attention_jax.core.positional import apply_rotary_embedding

NEG = blockwise.NEG

_F32 = jnp.float32


def _acc_dtype(x):
    """Accumulation dtype: float32 for bf16/f16/f32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(x.dtype, _F32)


# --------------------------------------------------------------------------------------
# One head: the four steps.
# --------------------------------------------------------------------------------------


def scaled_dot_product_attention(q, k, v, mask=None, bias=None):
    """Attention for one head: softmax(q·kᵀ / √H + bias, masked) · v.

    Args:
      q: queries ``[T, H]``.
      k: keys ``[S, H]``.
      v: values ``[S, Hv]``.
      mask: optional, broadcastable to ``[T, S]``; True (nonzero) = attend. Masked keys get
        weight exactly 0; a query with every key masked gets zero output (never NaN).
      bias: optional float, broadcastable to ``[T, S]``, added to the scaled scores.

    Returns:
      ``(out [T, Hv], weights [T, S])`` in the inputs' dtype. Scores and softmax are
      computed in float32 for bf16/f16 inputs.
    """
    dtype, (q, k, v), mask, bias = _one_head_args("scaled_dot_product_attention", q, k, v,
                                                  mask, bias)  # fmt: skip
    acc = _acc_dtype(q)
    # 1. scores = q · kᵀ: [T, S], float32 even for bf16/f16 inputs.
    scores = jnp.einsum("TH,SH->TS", q, k, preferred_element_type=acc)
    # 2. scale by 1/√H (then add the bias): [T, S].
    logits = _add_bias(scores * (1.0 / math.sqrt(q.shape[-1])), bias)
    # 3. masked softmax over the keys: [T, S], each row sums to 1 (a row that sees no key: 0).
    weights = masked_softmax(logits, mask)
    # 4. weighted sum of the values: [T, Hv].
    out = jnp.einsum("TS,SE->TE", weights.astype(v.dtype), v, preferred_element_type=acc)
    return out.astype(dtype), weights.astype(dtype)


def attention_weights(q, k, mask=None, bias=None):
    """Steps 1-3 of :func:`scaled_dot_product_attention` alone: the weights ``[T, S]``.

    Args:
      q: queries ``[T, H]``.
      k: keys ``[S, H]``.
      mask: optional, broadcastable to ``[T, S]``; True (nonzero) = attend.
      bias: optional float, broadcastable to ``[T, S]``, added to the scaled scores.

    Returns:
      ``weights [T, S]`` in the inputs' dtype: each row sums to 1 over its unmasked keys,
      masked keys get exactly 0, and a query with every key masked a row of zeros.
    """
    dtype, (q, k), mask, bias = _one_head_args("attention_weights", q, k, None, mask, bias)
    # 1. scores = q · kᵀ: [T, S].
    scores = jnp.einsum("TH,SH->TS", q, k, preferred_element_type=_acc_dtype(q))
    # 2. scale by 1/√H (then add the bias): [T, S].
    logits = _add_bias(scores * (1.0 / math.sqrt(q.shape[-1])), bias)
    # 3. masked softmax over the keys: [T, S].
    return masked_softmax(logits, mask).astype(dtype)


def masked_softmax(logits, mask=None, *, return_lse: bool = False):
    """Softmax over the last axis (the keys) of float ``logits [..., S]``, with masked keys.

    Masked keys (``mask`` False) get weight exactly 0, and a row with every key masked
    (or whose bias is all -inf) gets all zeros, so its output is 0, never 0/0 or NaN.
    Masked logits are replaced by the finite ``NEG`` rather than -inf, so no operation
    produces an inf (``jax.debug_infs``).

    Normalising here, in float32, before the weights are cast to the values' dtype for
    step 4, is what keeps bf16 gradients accurate: the softmax backward then forms
    ``p ∘ (dp - rowsum(p ∘ dp))`` from one consistently rounded ``dp``. (Dividing after
    the matmul made ``rowsum`` come from the float32 output instead, and where one key
    dominates a row the difference cancels catastrophically.)

    Args:
      logits: ``[..., S]``, float32 (or float64).
      mask: bool broadcastable to ``logits`` (True = attend), or None.
      return_lse: also return each row's log-sum-exp ``[...]`` (``NEG`` for a row that
        sees no key): the residual of ``dot_product_attention(return_residual=True)``.

    Returns:
      the weights, in ``logits``' dtype (and the log-sum-exp with ``return_lse``).
    """
    if mask is not None:
        logits = jnp.where(mask, logits, NEG)
    # The max is only for stability (softmax is shift-invariant), hence no gradient; a row
    # whose bias is all -inf has max -inf, shifted by 0 instead.
    row_max = lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # [..., 1]
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    e = jnp.exp(logits - row_max)  # [..., S]
    if mask is not None:  # a fully masked row has max NEG: exp(NEG - NEG) = 1, not 0
        e = jnp.where(mask, e, 0.0)
    denom = jnp.sum(e, axis=-1, keepdims=True)  # [..., 1]
    seen = denom > 0  # False only for a row that sees no key
    denom = jnp.where(seen, denom, 1.0)
    weights = e / denom  # [..., S]
    if not return_lse:
        return weights
    return weights, jnp.where(seen, row_max + jnp.log(denom), NEG)[..., 0]


def _add_bias(logits, bias):
    return logits if bias is None else logits + bias.astype(logits.dtype)


def _attend(q, k, v, mask, bias, keep, *, scale, precision, dot_general):
    """The four steps for one head inside the multi-head map, with what that map adds:
    attention dropout, matmul precision, flax's ``einsum_dot_general``, the residual.

    Args:
      q: ``[T, H]``; k: ``[S, H]``; v: ``[S, Hv]``. Or, grouped-query, all heads at once:
        q ``[*b, K, R, T, H]`` (the R = N // K query heads sharing each key/value head),
        k ``[*b, K, S, H]``, v ``[*b, K, S, Hv]``; mask, bias, keep and the results then
        have the dims ``[*b, K, R]`` in front.
      mask: bool broadcastable to ``[T, S]`` (True = attend), or None.
      bias: float broadcastable to ``[T, S]``, added to the scaled scores, or None.
      keep: float ``[T, S]`` dropout multiplier (0 or 1/keep_prob), or None.
      dot_general: replaces ``lax.dot_general`` in both matmuls, or None.

    Returns:
      ``out [T, Hv]``, ``lse [T]`` (``NEG`` for a row that sees no key) and the weights
      ``[T, S]`` before dropout, all in the accumulation dtype.
    """
    mm = dict(precision=precision, preferred_element_type=_acc_dtype(q))
    if dot_general is not None:
        mm["_dot_general"] = dot_general
    if q.ndim > k.ndim:  # grouped-query: q [..., R, T, H], k [..., S, H], v [..., S, Hv]
        qk, av = "...RTH,...SH->...RTS", "...RTS,...SE->...RTE"
    else:
        qk, av = "TH,SH->TS", "TS,SE->TE"
    scores = jnp.einsum(qk, q, k, **mm)  # 1. [T, S]
    logits = _add_bias(scores * scale, bias)  # 2. [T, S]
    weights, lse = masked_softmax(logits, mask, return_lse=True)  # 3. [T, S], [T]
    dropped = weights if keep is None else weights * keep
    out = jnp.einsum(av, dropped.astype(v.dtype), v, **mm)  # 4. [T, Hv]
    return out, lse, weights


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
    query_segment_ids=None,
    key_segment_ids=None,
    return_weights: bool = False,
):
    """Multi-head scaled dot-product attention: the one-head function over heads and batch.

    Takes every argument of ``flax.linen.dot_product_attention`` (same positions, same
    meaning), so it can be passed as ``attention_fn`` to ``flax.linen``'s and ``flax.nnx``'s
    ``MultiHeadAttention`` (which hand it ``module`` when ``sow_weights=True``; the weights
    are then sown into ``intermediates``), and every argument of
    ``jax.nn.dot_product_attention``, grouped-query heads included. One deliberate
    difference from both: a query that sees no key at all gets a zero output (they average
    the values).

    Grouped-query / multi-query attention: key and value may have K heads for the N query
    heads, K dividing N; query head n then uses key/value head ``n // (N // K)`` (jax.nn's
    grouping: the N query heads are K groups of G = N // K consecutive heads), which is
    ``jnp.repeat(key, N // K, axis=-2)`` without the repeat: no implementation copies k
    or v N // K times except the Pallas kernels (see :mod:`attention_jax.core.kernels`),
    and the gradients with respect to key and value sum over each group.

    Args:
      query: ``[..., T, N, H]``.
      key: ``[..., S, K, H]``, K = N (multi-head), K | N (grouped-query) or 1 (multi-query).
      value: ``[..., S, K, Hv]``.
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
      query_segment_ids: optional int ``[..., T]``: packed rows, several examples per row.
        Query t attends only keys s of the same segment, ``query_segment_ids[t] ==
        key_segment_ids[s]``, as the mask of :func:`attention_jax.core.masks.segment_mask`
        (id 0 is not special: pass padding in ``mask`` or the lengths). No ``T × S`` array on
        ``'blockwise'``, which skips the tiles that no query of a tile can see; see the
        module docstring for the kernels.
      key_segment_ids: optional int ``[..., S]`` (default: ``query_segment_ids``, which then
        needs S = T); only with ``query_segment_ids``.
      implementation: ``'xla'``, ``'blockwise'``, ``'blockwise_autodiff'``, ``'cudnn'``,
        ``'pallas'``, None (the fastest that serves every transform) or ``'auto'`` (the
        fastest, possibly reverse-mode only); see the module docstring. An explicit choice
        that cannot run this call raises a ValueError saying why.
      return_residual: also return the log-sum-exp of each row's scaled logits,
        ``[..., T, N]`` in ``dtype`` with its gradient stopped, as jax.nn (``NEG`` =
        -0.7·float32 max for a query that sees no key).
      return_weights: also return the attention weights ``[..., N, T, S]`` (before dropout;
        N query heads also when K < N), e.g. for visualisation (``'blockwise'`` recomputes
        them from its log-sum-exp).

    Returns:
      ``out [..., T, N, Hv]`` in ``dtype``; ``(out, weights)`` with ``return_weights``,
      ``(out, residual)`` with ``return_residual``, ``(out, weights, residual)`` with both.
    """
    name = "dot_product_attention"
    query, key, value = (jnp.asarray(x) for x in (query, key, value))
    dtype = _float_dtype(name, query, key, value, dtype)
    check_qkv_shapes(name, query.shape, key.shape, value.shape, batch_legend=" [...]")
    *batch, T, N, H = query.shape
    S, K = key.shape[-3], key.shape[-2]  # K key/value heads: N, or a divisor of N (GQA)
    target = (*batch, N, T, S)
    legend = "[..., N, T, S]"
    mask = _check_mask(name, mask, target, legend)
    bias = _check_bias(name, bias, target, legend)
    layout = "[..., T, N, H]"
    kv_lengths = check_lengths(name, "key_value_seq_lengths", key_value_seq_lengths,
                               tuple(batch), layout)  # fmt: skip
    q_lengths = check_lengths(name, "query_seq_lengths", query_seq_lengths, tuple(batch), layout)
    segments = _check_segment_ids(name, query_segment_ids, key_segment_ids, tuple(batch), T, S)
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
    impl = dispatch.resolve_implementation(
        name, implementation, q_shape=query.shape, k_shape=key.shape, v_shape=value.shape,
        dtype=dtype, has_mask=mask is not None, has_bias=bias is not None,
        is_causal=bool(is_causal), has_lengths=kv_lengths is not None, dropout=dropout,
        want_weights=want_weights, features=[f for f, used in features.items() if used],
        has_segment_ids=segments is not None,
    )  # fmt: skip
    mask = None if mask is None else _lead_pad(mask, len(target))  # [*b|1, N|1, T|1, S|1]
    bias = None if bias is None else _lead_pad(bias, len(target))

    if impl in ("cudnn", "pallas"):
        q, k, v = (x.astype(dtype) for x in (query, key, value))
        return _kernel_path(impl, q, k, v, mask, bias, kv_lengths, segments,
                            is_causal=bool(is_causal), scale=scale)  # fmt: skip

    # Heads first: [..., T, N, H] -> [..., N, T, H]; k, v: [..., S, K, H] -> [..., K, S, H].
    q, k, v = (jnp.swapaxes(x.astype(dtype), -3, -2) for x in (query, key, value))
    structural = _structural_mask(T, S, bool(is_causal), window, kv_lengths, q_lengths,
                                  len(target), segments)  # fmt: skip
    if impl in ("blockwise", "blockwise_autodiff"):
        try:
            out, lse = blockwise.blockwise_attention(
                q, k, v, mask, bias, scale=scale, is_causal=bool(is_causal),
                kv_lengths=None if kv_lengths is None else kv_lengths[..., None],  # [*b, N=1]
                local_window=window, dropout_rate=dropout, dropout_rng=dropout_rng,
                broadcast_dropout=broadcast_dropout, precision=precision,
                autodiff=impl == "blockwise_autodiff", return_lse=True,
                q_segment_ids=None if segments is None else segments[0][..., None, :],
                kv_segment_ids=None if segments is None else segments[1][..., None, :],
            )  # fmt: skip  # out [*b, N, T, Hv], lse [*b, N, T]; ids [*b, N=1, T|S]
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
            qg = q.reshape(*batch, K, N // K, T, H)  # query heads in K groups of N // K
            kg = k[..., None, :, :]  # [*b, K, 1, S, H]: broadcast over the group
            scores = jnp.einsum("...TH,...SH->...TS", qg, kg, precision=precision,
                                preferred_element_type=_acc_dtype(q))  # fmt: skip
            scores = scores.reshape(*batch, N, T, S)  # from [*b, K, N // K, T, S]
            logits = _add_bias(scores * scale, bias)
            if full is not None:
                logits = jnp.where(full, logits, NEG)
            weights = jnp.exp(logits - lse[..., None])  # [*b, N, T, S]
            if full is not None:
                weights = jnp.where(full, weights, 0.0)
    else:
        if structural is not None:
            mask = structural if mask is None else jnp.logical_and(mask, structural)
        group = N // K  # query heads per key/value head
        if group > 1 and einsums is not None:  # flax's subscripts need N key/value heads
            k, v = (jnp.repeat(x, group, axis=-3) for x in (k, v))  # [..., N, S, H|Hv]
        elif group > 1:  # q [*b, K, group, T, H] against k, v [*b, K, 1, S, H], broadcast
            q = q.reshape(*batch, K, group, T, H)
            k, v = k[..., None, :, :], v[..., None, :, :]
            mask, bias = (blockwise._split_heads(x, len(batch), K, group) for x in (mask, bias))
        out, lse, weights = _xla_path(
            q, k, v, mask, bias, dropout, dropout_rng, broadcast_dropout, scale=scale,
            precision=precision, dot_general=einsum_dot_general, einsums=einsums,
        )  # fmt: skip
        if out.ndim > len(target):  # back from groups: [*b, K, G, ...] -> [*b, N, ...]
            out = out.reshape(*batch, N, T, out.shape[-1])
            lse = lse.reshape(*batch, N, T)
            weights = weights.reshape(*batch, N, T, S)
    out = jnp.swapaxes(out, -3, -2).astype(dtype)  # [..., T, N, Hv]
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


def _structural_mask(T, S, is_causal, window, kv_lengths, q_lengths, rank, segments=None):
    """The causal, window, length and segment masks as one bool [*b|1, 1, T|1, S|1] array
    (None if none applies)."""
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
    if segments is not None:
        mask = _and(mask, _same_segment(*segments))
    return mask


def _same_segment(q_ids, k_ids):
    """bool [*b, 1, T, S] from segment ids [*b, T] and [*b, S]: the same id."""
    return (q_ids[..., :, None] == k_ids[..., None, :])[..., None, :, :]


def _kernel_path(impl, q, k, v, mask, bias, lengths, segments, *, is_causal, scale):
    """A fused kernel on [B, T, N, H] (the batch dims flattened into one B). Segment ids go
    to the Pallas TPU kernel as they are; cuDNN (through jax.nn, which has none) gets them
    as the same-segment mask."""
    *batch, T, N, H = q.shape
    B = math.prod(batch)
    S, K, Hv = k.shape[-3], k.shape[-2], v.shape[-1]
    q, k, v = q.reshape(B, T, N, H), k.reshape(B, S, K, H), v.reshape(B, S, K, Hv)

    def flat(x):  # [*b|1, N|1, T|1, S|1] -> [B|1, N|1, T|1, S|1]
        if x is None:
            return None
        if all(d == 1 for d in x.shape[: len(batch)]):
            return x.reshape(1, *x.shape[len(batch) :])
        return jnp.broadcast_to(x, (*batch, *x.shape[len(batch) :])).reshape(B, *x.shape[-3:])

    lengths = None if lengths is None else lengths.reshape(B)
    q_ids = k_ids = None
    if segments is not None and impl == "cudnn":
        same = _lead_pad(_same_segment(*segments), len(batch) + 3)  # [*b|1, 1, T, S]
        mask = same if mask is None else jnp.logical_and(mask, same)
    elif segments is not None:
        q_ids, k_ids = segments[0].reshape(B, T), segments[1].reshape(B, S)
    if impl == "cudnn":
        out = kernels.cudnn_attention(q, k, v, bias=flat(bias), mask=flat(mask),
                                      is_causal=is_causal, key_value_seq_lengths=lengths,
                                      scale=scale)  # fmt: skip
    else:
        out = kernels.pallas_attention(q, k, v, is_causal=is_causal,
                                       key_value_seq_lengths=lengths, scale=scale,
                                       query_segment_ids=q_ids,
                                       key_segment_ids=k_ids)  # fmt: skip
    return out.reshape(*batch, T, N, Hv).astype(q.dtype)


def _xla_path(q, k, v, mask, bias, dropout, rng, broadcast_dropout, *, scale, precision,
              dot_general=None, einsums=None):  # fmt: skip
    """vmap of the one-head steps over heads, then batch dims: one XLA computation.

    Returns out [*lead, T, Hv] (float32 for bf16/f16/f32), lse [*lead, T] and the weights
    [*lead, T, S]. With flax's einsum overrides (`einsums`), the same steps on the whole
    [..., N, T, S] instead, calling them with flax's subscripts.
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
        weights, lse = masked_softmax(_add_bias(logits.astype(_acc_dtype(q)), bias), mask,
                                      return_lse=True)  # fmt: skip
        dropped = weights if keep is None else weights * keep
        out = av("...hqk,...khd->...qhd", dropped.astype(v.dtype), vt)  # [..., T, N, Hv]
        return jnp.swapaxes(out, -3, -2), lse, weights
    one_head = functools.partial(_attend, scale=scale, precision=precision,
                                 dot_general=dot_general)  # fmt: skip
    if k.shape[:-2] != lead:  # grouped-query: q [*b, K, R, T, H], k, v [*b, K, 1, S, H]
        # One batched computation over all heads, each key/value head against its R query
        # heads (as jax.nn does): XLA's CPU gradient of a vmap over the heads was ~2x slower
        # here than with k and v repeated.
        return one_head(q, k[..., 0, :, :], v[..., 0, :, :], mask, bias, keep)
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
    num_kv_heads: int | None = None,
) -> dict:
    """Parameters for :func:`multi_head_attention`, laid out like Flax's
    ``MultiHeadDotProductAttention`` (so its params can be used directly).

    Kernels use LeCun-normal (truncated) over the fan-in, biases zeros, as Flax does.
    ``num_kv_heads`` K (default N = ``num_heads``, the paper's) gives the key and value
    projections K heads of the same head dim, K dividing N: grouped-query attention (K = 1:
    multi-query). The layout for the default is unchanged.

    Returns:
      ``{'query': {'kernel': [D, N, H], 'bias': [N, H]}, 'key'|'value': {'kernel':
      [Dkv, K, H], 'bias': [K, H]}, 'out': {'kernel': [N, H, Dout], 'bias': [Dout]}}``
      (no 'bias' when ``use_bias=False``).
    """
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    kv_features = in_features if kv_features is None else kv_features
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    for nm, val in (
        ("in_features", in_features),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("qkv_features", qkv_features),
        ("out_features", out_features),
        ("kv_features", kv_features),
    ):
        positive_int("init_multi_head_attention", nm, val)
    if qkv_features % num_heads:
        raise ValueError(
            f"init_multi_head_attention: num_heads={num_heads} must divide the attention "
            f"width qkv_features={qkv_features} (d_model)"
        )
    _check_kv_heads("init_multi_head_attention", num_heads, num_kv_heads)
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
        "key": {"kernel": proj_init(kk, (kv_features, num_kv_heads, head_dim), dtype)},
        "value": {"kernel": proj_init(kv, (kv_features, num_kv_heads, head_dim), dtype)},
        "out": {"kernel": out_init(ko, (num_heads, head_dim, out_features), dtype)},
    }
    if use_bias:
        for nm, heads in (("query", num_heads), ("key", num_kv_heads), ("value", num_kv_heads)):
            params[nm]["bias"] = jnp.zeros((heads, head_dim), dtype)
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
    num_kv_heads: int | None = None,
    query_segment_ids=None,
    key_segment_ids=None,
):
    """MultiHead(Q, K, V) = Concat(head_1..head_N)·W_O with head_i = Attention(Q·W_Qi, K·W_Ki,
    V·W_Vi), as a pure function of a params pytree (see :func:`init_multi_head_attention`).

    Args:
      params: the pytree; kernels ``[D, N, H]`` and ``[N, H, Dout]``.
      inputs_q: ``[..., T, D]``.
      inputs_kv: ``[..., S, Dkv]`` (default: ``inputs_q``, i.e. self-attention).
      num_heads: N; must match the params.
      num_kv_heads: K, the key/value heads (default N); must match the params' key and
        value kernels ``[Dkv, K, H]``. K < N (dividing N) is grouped-query attention.
      mask, bias, dropout_*, deterministic, dtype, precision, implementation,
      return_weights, is_causal, key_value_seq_lengths, query_segment_ids ``[..., T]``,
      key_segment_ids ``[..., S]``: as in :func:`dot_product_attention`.
      query_positions, key_positions: integer ``[..., T]`` and ``[..., S]``; when given, the
        projected queries and keys are rotated by
        :func:`attention_jax.core.positional.apply_rotary_embedding` (rotary positions).

    Returns:
      ``[..., T, Dout]``, or ``(out, weights [..., N, T, S])`` with ``return_weights``.
    """
    name = "multi_head_attention"
    inputs_q = jnp.asarray(inputs_q)
    inputs_kv = inputs_q if inputs_kv is None else jnp.asarray(inputs_kv)
    _check_mha_params(name, params, num_heads, num_kv_heads, inputs_q, inputs_kv)
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
        key_value_seq_lengths=key_value_seq_lengths, query_segment_ids=query_segment_ids,
        key_segment_ids=key_segment_ids,
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
    """The computation dtype: ``dtype``, else the promoted dtype of q, k (and v)."""
    for nm, x in (("query", q), ("key", k), ("value", v)):
        if x is not None:
            check_floating(name, nm, x)
    if dtype is None:
        return jnp.result_type(*(x for x in (q, k, v) if x is not None))
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"{name}: dtype must be a floating-point dtype, got {dtype}")
    return jnp.dtype(dtype)


def _one_head_args(name, q, k, v, mask, bias):
    """Checks one head's arguments (``v`` may be None): returns the dtype, q, k (and v)
    cast to it, and mask (bool) and bias as ``[T|1, S|1]`` arrays or None."""
    q, k = jnp.asarray(q), jnp.asarray(k)
    v = None if v is None else jnp.asarray(v)
    dtype = _float_dtype(name, q, k, v, None)
    if any(x is not None and x.ndim != 2 for x in (q, k, v)):
        got = f"q {q.shape}, k {k.shape}" + ("" if v is None else f", v {v.shape}")
        raise ValueError(
            f"{name} is for one head: expected q [T, H], k [S, H]"
            + ("" if v is None else ", v [S, Hv]")
            + f", got {got} (use dot_product_attention for [..., T, N, H])"
        )
    check_qkv_shapes(name, q.shape, k.shape, None if v is None else v.shape, one_head=True)
    target = (q.shape[0], k.shape[0])
    mask = _check_mask(name, mask, target, "[T, S]")
    bias = _check_bias(name, bias, target, "[T, S]")
    mask = None if mask is None else _lead_pad(mask, 2)
    bias = None if bias is None else _lead_pad(bias, 2)
    arrays = tuple(x.astype(dtype) for x in (q, k, v) if x is not None)
    return dtype, arrays, mask, bias


def _check_mask(name, mask, target, legend):
    """The mask as bool. As in flax (``jnp.where(mask, ...)``) any dtype is accepted and
    nonzero means attend: Flax's ``make_causal_mask``/``make_attention_mask`` give float32."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    check_broadcastable(name, "mask", mask, target, legend)
    return mask if mask.dtype == jnp.bool_ else mask.astype(jnp.bool_)


def _check_bias(name, bias, target, legend):
    if bias is None:
        return None
    bias = jnp.asarray(bias)
    check_floating(name, "bias", bias)
    check_broadcastable(name, "bias", bias, target, legend)
    return bias


def _lead_pad(x, rank):
    return x.reshape((1,) * (rank - x.ndim) + x.shape)


def _check_segment_ids(name, query_ids, key_ids, batch, T, S):
    """(query ids [*b, T], key ids [*b, S]) of one integer dtype, or None when not given."""
    if query_ids is None:
        if key_ids is not None:
            raise ValueError(
                f"{name}: key_segment_ids needs query_segment_ids (give both, or "
                "query_segment_ids alone for self-attention)"
            )
        return None
    query_ids = check_segment_ids(name, "query_segment_ids", query_ids, (*batch, T), "[..., T]")
    if key_ids is None:
        if S != T:
            raise ValueError(
                f"{name}: key_segment_ids [..., S] is needed when S != T (S={S}, T={T}); "
                "only self-attention may give query_segment_ids alone"
            )
        key_ids = query_ids
    key_ids = check_segment_ids(name, "key_segment_ids", key_ids, (*batch, S), "[..., S]")
    dtype = jnp.promote_types(query_ids.dtype, key_ids.dtype)
    return query_ids.astype(dtype), key_ids.astype(dtype)


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


def _check_kv_heads(name, num_heads, num_kv_heads):
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{name}: num_kv_heads={num_kv_heads} must divide num_heads={num_heads} "
            "(grouped-query attention: query head n uses key/value head n // (N // K))"
        )


def _check_mha_params(name, params, num_heads, num_kv_heads, inputs_q, inputs_kv):
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
    K = num_heads if num_kv_heads is None else positive_int(name, "num_kv_heads", num_kv_heads)
    _check_kv_heads(name, num_heads, K)
    kk, vk = params["key"]["kernel"], params["value"]["kernel"]
    if kk.ndim != 3 or vk.ndim != 3 or kk.shape[1] != K or vk.shape[1] != K:
        raise ValueError(
            f"{name}: the key and value kernels must be [Dkv, K={K}, H] (num_kv_heads={K}: "
            f"the same number of heads N={num_heads} as the query unless num_kv_heads is "
            f"given), got key {kk.shape}, value {vk.shape}"
        )
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
    "attention_weights",
    "dot_product_attention",
    "init_multi_head_attention",
    "masked_softmax",
    "multi_head_attention",
    "scaled_dot_product_attention",
]
