"""Memory-efficient attention in pure JAX: blocks of queries and keys, an online softmax, and a
custom VJP that recomputes block scores in the backward pass.

Dense attention materialises the ``T × S`` scores: at T = 100,000 that is 40 GB per head in
float32. Here each head is computed in tiles of ``query_block × key_block`` (legend as in
:mod:`attention_jax.core`; G = batch × heads, flattened):

* **Forward.** For each block of queries, a loop over the key blocks keeps a running row max
  ``m``, a running sum ``l`` of ``exp(logits - m)`` and a running output ``o``; when a new block
  raises the max, ``l`` and ``o`` are rescaled by ``exp(m_old - m_new)`` (the online softmax of
  Milakov & Gimelshein 2018, as in FlashAttention). At the end ``out = o / l`` and the row's
  log-sum-exp ``lse = m + log l`` is kept: ``T`` floats instead of ``T × S``.
* **Backward** (``jax.custom_vjp``). Each tile's weights are recomputed exactly as
  ``P = exp(logits - lse)``; with ``delta = rowsum(dO ∘ O)``:
  ``dV = Pᵀ·dO``, ``dP = dO·Vᵀ``, ``dL = P ∘ (dP - delta)``, ``dQ = scale·dL·K``,
  ``dK = scale·dLᵀ·Q`` and ``dBias = dL``. The loop runs over key blocks (carrying that
  block's ``dK``, ``dV``) and, inside, over query blocks (adding into one ``[T, H]`` ``dQ``).
  Saved for the backward pass: q, k, v, out, lse — O(T), not O(T²).
* **Skipping.** With ``is_causal`` a query block only visits the key blocks on or below the
  diagonal (about half the tiles for T = S); with ``kv_lengths`` no block past a head's length
  is visited. Masks and bias are sliced per tile from their broadcastable ``[T|1, S|1]`` form,
  so a mask shared across rows (``[1, S]``) stays O(S).
* **Segments** (packed rows). With segment ids (query t sees key s only if their ids are
  equal) each tile applies that equality, and the loops skip tiles by the ids' per-tile
  min and max (of the nonzero ids, and whether the tile holds id 0, padding by convention):
  a query block visits only the key blocks from the first to the last whose
  id range meets its own (the backward pass likewise for query blocks), and
  ``autodiff=True`` skips every tile whose ranges are disjoint. Correct for any ids; the
  skipping is exact for packed rows (each segment contiguous, ids increasing), where the
  visible tiles of a block are contiguous.

Causal masking is top-left aligned, as in ``jax.nn.dot_product_attention``: query ``t`` sees
keys ``s <= t`` (for T = S that is the usual decoder mask). A local window ``(left, right)``
(jax.nn's ``local_window_size``) limits query ``t`` to keys ``t - left <= s <= t + right``,
and its tiles outside the band are skipped too.

* **Two ways to differentiate.** The custom VJP above serves reverse mode only (a
  ``jax.custom_vjp`` has no forward mode). ``autodiff=True`` runs the same forward with
  static loop bounds (a ``lax.cond`` skips the invisible tiles), ``jax.checkpoint`` on each
  query block and each tile step, and leaves differentiation to JAX: every transform
  (``jvp``, ``jacfwd``, ``hessian``, ``vmap`` of ``grad``), memory still O(T), backward
  slower (see BUILD_NOTES.md, "A new user's first day (issue 14)", Measurements). Its
  P·V product runs in float32 for bf16/f16 (see ``_forward``); still, autodiff of
  ``o / l`` forms the softmax gradient as a difference of two separately rounded terms,
  so where one key takes all but ~1e-13 of a row's weight the (near-zero) gradient of that
  row is only float32-accurate in absolute terms, not relative ones (the custom VJP and
  ``'xla'`` are).
* **Masking without infinities.** Masked logits get ``NEG`` (finite) and the masked
  entries of ``exp`` are zeroed explicitly, so no inf is ever computed (``jax.debug_infs``).
* **Meshes.** Inside ``jax.shard_map`` the loop carries are made varying over the manual
  axes their inputs vary over (``lax.pcast``); lead dims sharded over an explicit mesh axis
  (``AxisType.Explicit``) are ``vmap``-ped rather than ``lax.map``-ped, since ``lax.map``
  cannot scan over a sharded axis.

* **Grouped-query heads.** k and v may have K heads for q's N (K dividing N, query head n
  using key/value head ``n // (N // K)``, as jax.nn): the map then runs over the key/value
  heads, each step taking one head's k and v and the N // K query heads that share them
  (vmapped, or mapped when more than a step's budget), so k and v are never repeated and
  their gradients sum over the group.

Heads run in groups (``lax.map`` with ``batch_size``: vmapped inside a group, groups in
sequence) sized so one group's float32 tiles fit a per-backend budget: on CPU about the L2
cache, which is also what makes this faster than dense XLA attention there (BUILD_NOTES.md).

This file is a leaf: it imports nothing from the package. Whether it runs for a call is
decided in :mod:`attention_jax.core.dispatch`; :func:`blockwise_attention` trusts its
caller (:func:`attention_jax.core.attention.dot_product_attention`) to have checked the inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F32 = jnp.float32

# Tile sizes and the bytes of float32 tiles one step of the head map may hold, per backend.
# CPU: 256 x 512 tiles (512 KiB) in groups within ~2 MiB of L2 (measured, BUILD_NOTES.md).
# Accelerators: larger tiles, many heads at once (the pure-JAX path there is the fallback
# for shapes the fused kernels refuse, and for memory; the kernels are the fast path).
_BLOCKS = {"cpu": (256, 512), "gpu": (1024, 1024), "tpu": (1024, 1024)}
_TILE_BUDGET_BYTES = {"cpu": 1 << 21, "gpu": 1 << 30, "tpu": 1 << 30}


# A large finite negative (jax.nn's choice, -0.7 × the float32 max) for masked logits instead
# of -inf: no operation ever produces an inf (``jax.debug_infs`` stays quiet), and
# ``NEG - m`` stays finite for every finite row max m. It is also the log-sum-exp reported
# for a row that sees no key.
NEG = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static configuration of one blockwise attention call (hashable: a jit/VJP constant).

    ``window``: ``(left, right)``: query t sees keys ``t - left <= s <= t + right`` (None: all).
    ``autodiff``: static loop bounds, ``jax.checkpoint`` and plain autodiff instead of the
    custom VJP: serves every transform (``jvp``, ``jacfwd``, ``hessian``) at the cost of a
    slower backward pass and no tile skipping under ``vmap`` of per-head lengths.
    """

    query_block: int
    key_block: int
    scale: float
    causal: bool = False
    dropout_rate: float = 0.0
    precision: Any = None
    window: tuple[int, int] | None = None
    autodiff: bool = False


def default_plan(T: int, S: int, *, scale: float, causal: bool = False, dropout_rate: float = 0.0,
                 precision=None, window=None, autodiff: bool = False,
                 query_block: int | None = None, key_block: int | None = None,
                 backend: str | None = None) -> Plan:  # fmt: skip
    """The tile sizes for this backend, shrunk to T and S when those are shorter."""
    qb, kb = _BLOCKS.get(backend or jax.default_backend(), _BLOCKS["gpu"])
    qb, kb = query_block or qb, key_block or kb
    for nm, b in (("query_block", qb), ("key_block", kb)):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1:
            raise ValueError(f"blockwise attention: {nm} must be a positive int, got {b!r}")
    window = None if window is None else (int(window[0]), int(window[1]))
    return Plan(min(int(qb), T), min(int(kb), S), float(scale), bool(causal),
                float(dropout_rate), precision, window, bool(autodiff))  # fmt: skip


def heads_per_step(plan: Plan, num_heads: int, backend: str | None = None) -> int:
    """How many heads one step of the head map runs (vmapped), within the tile budget."""
    budget = _TILE_BUDGET_BYTES.get(backend or jax.default_backend(), 1 << 30)
    return max(1, min(num_heads, budget // (plan.query_block * plan.key_block * 4)))


# --------------------------------------------------------------------------------------
# Tiles.
# --------------------------------------------------------------------------------------


def _cdiv(a, b):
    return -(-a // b)


def _pad_axis(x, axis, size, value):
    """Pads `axis` of x up to `size` (an axis of size 1 is a broadcast and left alone)."""
    if x is None or x.shape[axis] in (1, size):
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _tile(x, i, j, plan):
    """The [query_block|1, key_block|1] tile (i, j) of a [T|1, S|1] mask or bias."""
    if x is None:
        return None
    if x.shape[0] != 1:
        x = lax.dynamic_slice_in_dim(x, i * plan.query_block, plan.query_block, 0)
    if x.shape[1] != 1:
        x = lax.dynamic_slice_in_dim(x, j * plan.key_block, plan.key_block, 1)
    return x


def _rows(x, i, block):
    return lax.dynamic_slice_in_dim(x, i * block, block, 0)


def _vary(tree, *refs):
    """`tree` made varying over every manual mesh axis that one of `refs` varies over.

    Inside ``jax.shard_map`` a loop carry must keep its type, and that includes the manual
    axes it varies over: a carry initialised from constants (``jnp.zeros``) is invariant,
    the body's output (computed from sharded q, k, v) is varying. Outside shard_map: a no-op.
    """
    axes = set()
    for r in refs:
        if r is not None:
            axes |= _varying_axes(r)
    if not axes:
        return tree

    def cast(x):
        missing = tuple(sorted(axes - _varying_axes(x)))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def _varying_axes(x) -> set:
    """The manual mesh axes x varies over (its type's ``{V:...}``; empty outside shard_map)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if mat is not None:
        return set(mat.varying)
    return set(getattr(aval, "vma", None) or ())  # older jax


def _logits(plan, q_i, k_j, mask, bias, rng, limit, i, j, acc, seg=None, *, edge=True):
    """Scaled, biased, masked logits of tile (i, j), [qb, kb], its dropout multiplier and its
    bool validity ([qb|1, kb|1], None when every key is visible).

    `limit` (traced int or None): keys at or past it are masked (key padding, tile padding).
    `seg`: the padded segment ids (q [Tp], k [Sp]) or None; applied on every tile.
    `edge`: the tile may cross the diagonal, the window or the limit, so those are applied;
    False for the tiles the loop bounds know to be wholly visible (most of them).
    """
    qb, kb = plan.query_block, plan.key_block
    s = jnp.einsum("TH,SH->TS", q_i, k_j, precision=plan.precision, preferred_element_type=acc)
    s = s * plan.scale
    b = _tile(bias, i, j, plan)
    if b is not None:
        s = s + b.astype(acc)
    valid = _tile(mask, i, j, plan)
    cols = j * kb + lax.broadcasted_iota(jnp.int32, (1, kb), 1)
    rows = i * qb + lax.broadcasted_iota(jnp.int32, (qb, 1), 0)
    if plan.causal and edge:
        valid = _and(valid, rows >= cols)
    if plan.window is not None and edge:
        left, right = plan.window
        valid = _and(valid, (rows <= cols + left) & (rows >= cols - right))
    if limit is not None and edge:
        valid = _and(valid, cols < limit)
    if seg is not None:  # same segment: [qb, 1] == [1, kb]
        q_ids, k_ids = _rows(seg[0], i, qb), _rows(seg[1], j, kb)
        valid = _and(valid, q_ids[:, None] == k_ids[None, :])
    if valid is not None:
        s = jnp.where(valid, s, NEG)
    keep = None
    if plan.dropout_rate:
        tile_rng = jax.random.fold_in(jax.random.fold_in(rng, i), j)
        kept = jax.random.bernoulli(tile_rng, 1.0 - plan.dropout_rate, (qb, kb))
        keep = kept.astype(acc) / (1.0 - plan.dropout_rate)
    return s, keep, valid


def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)


def _key_limit(S, padded_S, kv_len):
    """Keys at or past this index are masked (None when nothing is)."""
    if kv_len is None:
        return None if padded_S == S else S
    return jnp.clip(kv_len, 0, S).astype(jnp.int32)


def _key_blocks(plan, i, limit, nk, spans=None):
    """(start, whole, end) for query block i: it visits key blocks [start, end); blocks
    [start, whole) are wholly visible to every row (no causal, window or length masking),
    blocks [whole, end) need it. `spans` (see `_segment_spans`) narrows [start, end) to the
    key blocks from the first to the last whose segment ids can meet the block's."""
    start, whole, end = _structural_key_blocks(plan, i, limit, nk)
    if spans is None:
        return start, whole, end
    q_spans, k_spans = spans
    return _narrow(start, whole, end, *_span(tuple(x[i] for x in q_spans), k_spans))


def _query_blocks(plan, j, limit, nq, spans=None):
    """(start, whole, stop) for key block j: query blocks [start, stop) see some of its
    keys; [start, whole) need causal, window or length masking, [whole, stop) see them all.
    `spans` narrows [start, stop) as in `_key_blocks`."""
    start, whole, stop = _structural_query_blocks(plan, j, limit, nq)
    if spans is None:
        return start, whole, stop
    q_spans, k_spans = spans
    return _narrow(start, whole, stop, *_span(tuple(x[j] for x in k_spans), q_spans))


def _segment_spans(seg, nq, qb, nk, kb):
    """((lo, hi, zero) [nq] of the query tiles, the same [nk] of the key tiles): each tile's
    least and greatest nonzero segment id and whether it holds id 0, from the padded ids
    (padded by repeating the last id, so padding adds no new id). Id 0 (padding, by
    convention) is kept apart so that a row's trailing padding does not stretch the range
    of its last tile over every segment."""

    def spans(ids, n, b):  # ids [n * b] -> three [n]
        ids = ids.reshape(n, b)
        info = jnp.iinfo(ids.dtype)
        zero = ids == 0
        lo = jnp.where(zero, info.max, ids).min(1)  # all zero: an empty range (max, min)
        hi = jnp.where(zero, info.min, ids).max(1)
        return lo, hi, zero.any(1)

    return spans(seg[0], nq, qb), spans(seg[1], nk, kb)


def _meets(a, b):
    """Whether tiles with spans a and b (``(lo, hi, zero)`` each) may hold a query and a key
    of one id: their nonzero ranges intersect or both hold id 0. If not, no id of one
    equals an id of the other."""
    (a_lo, a_hi, a_zero), (b_lo, b_hi, b_zero) = a, b
    return ((b_hi >= a_lo) & (b_lo <= a_hi)) | (a_zero & b_zero)


def _span(a, b):
    """[lo, hi): from the first to one past the last tile of b (spans [n]) that meets tile a
    (an empty [0, 0) when none does)."""
    meets = _meets(a, b)  # [n]
    n = meets.shape[0]
    found = jnp.any(meets)
    lo = jnp.argmax(meets).astype(jnp.int32)
    hi = (n - jnp.argmax(meets[::-1])).astype(jnp.int32)
    return jnp.where(found, lo, 0), jnp.where(found, hi, 0)


def _narrow(start, whole, end, lo, hi):
    """[start, end) intersected with [lo, hi), `whole` kept inside it."""
    start = jnp.maximum(start, lo)
    end = jnp.maximum(jnp.minimum(end, hi), start)
    return start, jnp.clip(whole, start, end), end


def _structural_key_blocks(plan, i, limit, nk):
    qb, kb = plan.query_block, plan.key_block
    start, end = 0, nk
    if plan.causal:  # the block's last row, i*qb + qb - 1, sees keys up to that index
        end = jnp.minimum(end, ((i + 1) * qb - 1) // kb + 1)
    if plan.window is not None:  # rows [i*qb, (i+1)*qb) see keys [i*qb - left, .. + right]
        left, right = plan.window
        start = jnp.maximum(0, (i * qb - left) // kb)
        end = jnp.minimum(end, ((i + 1) * qb - 1 + right) // kb + 1)
    if limit is not None:
        end = jnp.minimum(end, _cdiv(limit, kb))
        if plan.window is not None:  # the band starts at or past the limit: nothing
            end = jnp.where(i * qb - plan.window[0] >= limit, start, end)
    end = jnp.maximum(end, start)
    if plan.window is not None:
        return start, start, end
    whole = end
    if plan.causal:  # block j's last key, (j+1)*kb - 1, is <= the block's first row i*qb
        whole = jnp.minimum(whole, (i * qb + 1) // kb)
    if limit is not None:
        whole = jnp.minimum(whole, limit // kb)
    return start, jnp.maximum(whole, start), end


def _structural_query_blocks(plan, j, limit, nq):
    qb, kb = plan.query_block, plan.key_block
    start, stop = 0, nq
    if plan.causal:
        start = (j * kb) // qb
    if plan.window is not None:  # key s is seen by rows [s - right, s + left]
        left, right = plan.window
        last = (j + 1) * kb - 1 if limit is None else jnp.minimum((j + 1) * kb, limit) - 1
        start = jnp.maximum(start, jnp.maximum(0, (j * kb - right) // qb))
        stop = jnp.minimum(stop, (last + left) // qb + 1)
    if limit is not None:
        start = jnp.where(j * kb < limit, start, nq)
    start = jnp.minimum(start, nq)  # never past the last query block: [start, stop) empty
    stop = jnp.maximum(stop, start)
    if plan.window is not None:
        return start, stop, stop
    whole = start
    if plan.causal:  # the block's first row i*qb is >= the key block's last key
        whole = jnp.maximum(whole, _cdiv((j + 1) * kb - 1, qb))
    if limit is not None:  # a key block crossing the limit is masked for every query
        whole = jnp.where((j + 1) * kb <= limit, whole, nq)
    return start, jnp.minimum(whole, stop), stop


# --------------------------------------------------------------------------------------
# One head: forward with online softmax, custom VJP.
# --------------------------------------------------------------------------------------


def _padded(plan, q, k, v, mask, bias, seg=None):
    nq, nk = _cdiv(q.shape[0], plan.query_block), _cdiv(k.shape[0], plan.key_block)
    Tp, Sp = nq * plan.query_block, nk * plan.key_block
    q, k, v = _pad_axis(q, 0, Tp, 0), _pad_axis(k, 0, Sp, 0), _pad_axis(v, 0, Sp, 0)
    mask = _pad_axis(_pad_axis(mask, 0, Tp, True), 1, Sp, True)  # padded keys: see limit
    bias = _pad_axis(_pad_axis(bias, 0, Tp, 0), 1, Sp, 0)
    if seg is not None:  # the last id repeated: the tiles' id ranges stay those of real ids
        seg = tuple(
            jnp.pad(x, (0, n - x.shape[0]), mode="edge") for x, n in zip(seg, (Tp, Sp), strict=True)
        )
    return nq, nk, q, k, v, mask, bias, seg


def _forward(plan, q, k, v, mask, bias, kv_len, rng, seg=None):
    """out [T, Hv] and lse [T] of one head, in the accumulation dtype; lse is NEG for a row
    that sees no key (its output is 0). `seg`: segment ids (q [T], k [S]) or None."""
    T, S, Hv = q.shape[0], k.shape[0], v.shape[1]
    acc = jnp.promote_types(q.dtype, _F32)
    nq, nk, qp, kp, vp, mask, bias, segp = _padded(plan, q, k, v, mask, bias, seg)
    limit = _key_limit(S, kp.shape[0], kv_len)
    qb, kb = plan.query_block, plan.key_block
    spans = None if seg is None else _segment_spans(segp, nq, qb, nk, kb)
    mm = dict(precision=plan.precision, preferred_element_type=acc)
    refs = (q, k, v, mask, bias, kv_len, rng)

    def query_block(i):
        q_i = _rows(qp, i, qb)

        def key_block(j, carry, edge):
            m, l, o = carry  # [qb], [qb], [qb, Hv]
            k_j = _rows(kp, j, kb)
            s, keep, valid = _logits(plan, q_i, k_j, mask, bias, rng, limit, i, j, acc, segp,
                                     edge=edge)  # fmt: skip
            # The max only stabilises (the result does not depend on it): no gradient.
            m_new = lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a -inf bias row: shift 0
            p = jnp.exp(s - m_safe[:, None])  # [qb, kb]
            if valid is not None:  # a row masked so far has m = NEG: exp(NEG - NEG) = 1
                p = jnp.where(valid, p, 0.0)
            alpha = jnp.exp(m - m_safe)  # rescales the old sums (0 when m was NEG)
            l = l * alpha + jnp.sum(p, axis=-1)
            p = p if keep is None else p * keep
            # Under plain autodiff the gradient of o / l pairs the cotangent of this product
            # with one taken from o; for bf16/f16 a low-precision product would round the
            # first and not the second, and where one key dominates a row their difference
            # (the gradient) cancels catastrophically. So that variant multiplies in acc.
            # (The custom VJP forms both from the same dO·Vᵀ, so it keeps v's dtype.)
            pv_dtype = acc if plan.autodiff else v.dtype
            v_j = _rows(vp, j, kb).astype(pv_dtype)
            pv = jnp.einsum("TS,SE->TE", p.astype(pv_dtype), v_j, **mm)
            return m_new, l, o * alpha[:, None] + pv

        init = (jnp.full((qb,), NEG, acc), jnp.zeros((qb,), acc), jnp.zeros((qb, Hv), acc))
        init = _vary(init, *refs)
        start, whole, end = _key_blocks(plan, i, limit, nk, spans)
        if plan.autodiff:  # static bounds: a scan, which reverse mode can differentiate

            def step(j, carry):
                inside = (j >= start) & (j < end)
                if spans is not None:  # also skip the tiles inside [start, end) no id meets
                    q_spans, k_spans = spans
                    inside = inside & _meets(tuple(x[i] for x in q_spans),
                                             tuple(x[j] for x in k_spans))  # fmt: skip
                return lax.cond(inside, functools.partial(key_block, j, edge=True),
                                lambda c: c, carry)  # fmt: skip

            m, l, o = lax.fori_loop(0, nk, jax.checkpoint(step), init)
        else:
            carry = lax.fori_loop(start, whole, functools.partial(key_block, edge=False), init)
            m, l, o = lax.fori_loop(whole, end, functools.partial(key_block, edge=True), carry)
        seen = l > 0  # False for a row with every key masked: output 0, never 0/0
        l_safe = jnp.where(seen, l, 1.0)
        out = o / l_safe[:, None]
        lse = jnp.where(seen, m + jnp.log(l_safe), NEG)
        return out, lse

    if plan.autodiff:
        query_block = jax.checkpoint(query_block)
    if nq == 1:
        out, lse = query_block(0)
    else:
        out, lse = lax.map(query_block, jnp.arange(nq))
        out, lse = out.reshape(nq * qb, Hv), lse.reshape(nq * qb)
    return out[:T], lse[:T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_attention(plan, q, k, v, mask, bias, kv_len, rng, seg):
    """Attention of one head: out [T, Hv] and lse [T] in the accumulation dtype."""
    return _forward(plan, q, k, v, mask, bias, kv_len, rng, seg)


def _head_attention_fwd(plan, q, k, v, mask, bias, kv_len, rng, seg):
    out, lse = _forward(plan, q, k, v, mask, bias, kv_len, rng, seg)
    return (out, lse), (q, k, v, mask, bias, kv_len, rng, seg, out, lse)


def _head_attention_bwd(plan, res, cotangents):
    q, k, v, mask, bias, kv_len, rng, seg, out, lse = res
    d_out, d_lse = cotangents
    T, S, H, Hv = q.shape[0], k.shape[0], q.shape[1], v.shape[1]
    acc = jnp.promote_types(q.dtype, _F32)
    nq, nk, qp, kp, vp, maskp, biasp, segp = _padded(plan, q, k, v, mask, bias, seg)
    limit = _key_limit(S, kp.shape[0], kv_len)
    qb, kb = plan.query_block, plan.key_block
    spans = None if seg is None else _segment_spans(segp, nq, qb, nk, kb)
    mm = dict(precision=plan.precision, preferred_element_type=acc)
    refs = (q, k, v, mask, bias, kv_len, rng, d_out, d_lse, lse)
    d_out = d_out.astype(acc)
    # d lse / d logits = P, so an lse cotangent enters as dL = P ∘ (dP - delta + d_lse).
    delta = jnp.sum(d_out * out.astype(acc), axis=-1) - d_lse.astype(acc)  # [T]
    lse = jnp.where(lse > 0.5 * NEG, lse, 0.0)  # a row that sees no key: P = exp(NEG) = 0
    # Padded query rows: q = 0, dO = 0, delta = 0: they add nothing.
    dop = _pad_axis(d_out, 0, nq * qb, 0).astype(v.dtype)
    lsep, deltap = _pad_axis(lse, 0, nq * qb, 0), _pad_axis(delta, 0, nq * qb, 0)

    def key_block(carry, j):
        dq, dbias = carry  # [Tp, H] acc, bias-shaped acc or None
        k_j, v_j = _rows(kp, j, kb), _rows(vp, j, kb)

        def query_block(i, inner, edge):
            dq, dbias, dk, dv = inner
            q_i, do_i = _rows(qp, i, qb), _rows(dop, i, qb)
            s, keep, _ = _logits(plan, q_i, k_j, maskp, biasp, rng, limit, i, j, acc, segp,
                                 edge=edge)  # fmt: skip
            p = jnp.exp(s - _rows(lsep, i, qb)[:, None])  # [qb, kb]
            pd = p if keep is None else p * keep
            dv = dv + jnp.einsum("TS,TE->SE", pd.astype(v.dtype), do_i, **mm)
            dp = jnp.einsum("TE,SE->TS", do_i, v_j, **mm)
            dp = dp if keep is None else dp * keep
            dl = p * (dp - _rows(deltap, i, qb)[:, None])  # [qb, kb]
            dq_i = jnp.einsum("TS,SH->TH", dl.astype(q.dtype), k_j, **mm) * plan.scale
            dq = lax.dynamic_update_slice_in_dim(dq, _rows(dq, i, qb) + dq_i, i * qb, 0)
            dk = dk + jnp.einsum("TS,TH->SH", dl.astype(q.dtype), q_i, **mm)
            if dbias is not None:
                dbias = _add_tile(dbias, dl, i, j, plan)
            return dq, dbias, dk, dv

        zeros = _vary((jnp.zeros((kb, H), acc), jnp.zeros((kb, Hv), acc)), *refs)
        init = (dq, dbias, *zeros)
        start, whole, stop = _query_blocks(plan, j, limit, nq, spans)
        inner = lax.fori_loop(start, whole, functools.partial(query_block, edge=True), init)
        dq, dbias, dk, dv = lax.fori_loop(
            whole, stop, functools.partial(query_block, edge=False), inner
        )
        return (dq, dbias), (dk * plan.scale, dv)

    dbias0 = None if bias is None else jnp.zeros(biasp.shape, acc)
    init = _vary((jnp.zeros((nq * qb, H), acc), dbias0), *refs)
    (dq, dbias), (dk, dv) = lax.scan(key_block, init, jnp.arange(nk))
    dk, dv = dk.reshape(nk * kb, H)[:S], dv.reshape(nk * kb, Hv)[:S]
    if dbias is not None:
        dbias = dbias[: bias.shape[0], : bias.shape[1]].astype(bias.dtype)
    d_seg = None if seg is None else (None, None)
    return (dq[:T].astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, dbias, None,
            None, d_seg)  # fmt: skip


def _add_tile(dbias, dl, i, j, plan):
    """Adds tile (i, j) of dLogits into dbias, summed over the axes the bias broadcasts."""
    if dbias.shape[0] == 1:
        dl = jnp.sum(dl, axis=0, keepdims=True)
    if dbias.shape[1] == 1:
        dl = jnp.sum(dl, axis=1, keepdims=True)
    r0 = 0 if dbias.shape[0] == 1 else i * plan.query_block
    c0 = 0 if dbias.shape[1] == 1 else j * plan.key_block
    old = lax.dynamic_slice(dbias, (r0, c0), dl.shape)
    return lax.dynamic_update_slice(dbias, old + dl, (r0, c0))


_head_attention.defvjp(_head_attention_fwd, _head_attention_bwd)


def _one_head(plan, q, k, v, mask, bias, kv_len, rng, seg=None):
    if plan.autodiff:
        return _forward(plan, q, k, v, mask, bias, kv_len, rng, seg)
    return _head_attention(plan, q, k, v, mask, bias, kv_len, rng, seg)


# --------------------------------------------------------------------------------------
# Many heads.
# --------------------------------------------------------------------------------------


def blockwise_attention(q, k, v, mask=None, bias=None, *, scale: float, is_causal: bool = False,
                        kv_lengths=None, local_window=None, dropout_rate: float = 0.0,
                        dropout_rng=None, broadcast_dropout: bool = True, precision=None,
                        autodiff: bool = False, return_lse: bool = False,
                        query_block: int | None = None, key_block: int | None = None,
                        q_segment_ids=None, kv_segment_ids=None):  # fmt: skip
    """Blockwise attention over every head, in the heads-first layout.

    Inputs are already validated (use :func:`attention_jax.dot_product_attention` with
    ``implementation='blockwise'`` for the checked ``[..., T, N, H]`` interface).

    Args:
      q: ``[*lead, T, H]``, lead = (*batch, N); k: ``[*batch, K, S, H]``; v:
        ``[*batch, K, S, Hv]``. K = N is plain multi-head; K < N (dividing N) is
        grouped-query attention: query head n uses key/value head ``n // (N // K)`` (as
        ``jax.nn.dot_product_attention``), without repeating k and v in memory (the N // K
        query heads of a group run against one key/value head; its gradient sums over them).
      mask: bool ``[*lead|1, T|1, S|1]`` (True = attend) or None.
      bias: float ``[*lead|1, T|1, S|1]`` added to the scaled scores, or None.
      scale: the logit scale, normally ``1/√H``.
      is_causal: query t sees keys s <= t (top-left aligned), skipping tiles above the diagonal.
      kv_lengths: int ``[*lead|1]``: keys at or past a head's length are masked and skipped.
      local_window: ``(left, right)``: query t sees keys ``t - left <= s <= t + right``; tiles
        outside the band are skipped.
      dropout_rate, dropout_rng, broadcast_dropout: attention dropout; the same tile pattern
        for every head when ``broadcast_dropout``.
      precision: matmul precision.
      autodiff: differentiate by plain autodiff of a checkpointed, static-bound loop (every
        transform, forward mode included) instead of the custom VJP (reverse mode only).
      return_lse: also return the log-sum-exp of each row's logits, ``[*lead, T]`` (NEG for
        a row that sees no key); differentiable.
      query_block, key_block: tile sizes (default: per backend, see ``_BLOCKS``).
      q_segment_ids, kv_segment_ids: integer ``[*lead|1, T]`` and ``[*lead|1, S]`` (given
        together, one integer dtype): query t sees key s only if their ids are equal (id 0
        is not special); tiles whose id ranges do not meet are skipped.

    Returns:
      ``out [*lead, T, Hv]`` in the accumulation dtype (float32 for bf16/f16/f32 inputs), or
      ``(out, lse)`` with ``return_lse``.
    """
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    mask, bias, kv_lengths = (
        None if x is None else jnp.asarray(x) for x in (mask, bias, kv_lengths)
    )
    seg = None
    if q_segment_ids is not None:
        seg = (jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids))
    T, S = q.shape[-2], k.shape[-2]
    lead = q.shape[:-2]
    group = 1
    if k.shape[:-2] != lead:  # grouped-query: heads (*b, N) -> (*b, K, group), k/v (*b, K, 1)
        K = k.shape[-3]
        group = lead[-1] // K
        q = q.reshape(*lead[:-1], K, group, T, q.shape[-1])  # [*b, K, G, T, H]
        k, v = k[..., None, :, :], v[..., None, :, :]  # [*b, K, 1, S, H|Hv]
        mask, bias = (_split_heads(x, len(lead) - 1, K, group) for x in (mask, bias))
        kv_lengths = _split_heads(kv_lengths, len(lead) - 1, K, group)
        if seg is not None:
            seg = tuple(_split_heads(x, len(lead) - 1, K, group) for x in seg)
    plan = default_plan(T, S, scale=scale, causal=is_causal, dropout_rate=dropout_rate,
                        precision=precision, window=local_window, autodiff=autodiff,
                        query_block=query_block, key_block=key_block)  # fmt: skip
    rng = dropout_rng if dropout_rate else None
    out, lse = _all_heads(plan, q, k, v, mask, bias, kv_lengths, rng, bool(broadcast_dropout),
                          seg)  # fmt: skip
    if group > 1:  # [*b, K, group, T, Hv] -> [*b, N, T, Hv]
        out, lse = out.reshape(*lead, T, out.shape[-1]), lse.reshape(*lead, T)
    return (out, lse) if return_lse else out


def _split_heads(x, axis, K, group):
    """Splits the heads axis ``axis`` of x (N = K·group, or a broadcast 1) into
    (K, group) (or (1, 1))."""
    if x is None:
        return None
    split = (K, group) if x.shape[axis] != 1 else (1, 1)
    return x.reshape(*x.shape[:axis], *split, *x.shape[axis + 1 :])


def _all_heads(plan, q, k, v, mask, bias, kv_lengths, rng, broadcast_dropout, seg=None):
    """The head map. Lead dims that are explicitly sharded (``AxisType.Explicit`` meshes) are
    vmapped, one at a time (``lax.map`` cannot scan over a sharded axis); the rest are
    flattened and run in groups of :func:`heads_per_step` heads.

    k and v have q's lead dims, or (grouped-query) the same with the last one 1: then each
    key/value head serves the ``lead[-1]`` query heads of its group, which run together
    against it (k and v are never repeated)."""
    lead = q.shape[:-2]
    q_seg, kv_seg = (None, None) if seg is None else seg
    d = _explicitly_sharded_dim(len(lead), q, k, v, mask, bias, kv_lengths, q_seg, kv_seg)
    if d is not None:
        args = (q, k, v, mask, bias, kv_lengths, q_seg, kv_seg)
        axes = tuple(None if x is None or x.shape[d] == 1 else d for x in args)
        rngs, rng_axis = rng, None
        if rng is not None and not broadcast_dropout:  # a different pattern per slice
            rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(lead[d]))
            rng_axis = 0

        def sliced(q, k, v, mask, bias, kv_lengths, q_seg, kv_seg, rng):
            seg = None if q_seg is None else (q_seg, kv_seg)
            return _all_heads(plan, q, k, v, mask, bias, kv_lengths, rng, broadcast_dropout, seg)

        fn = jax.vmap(sliced, in_axes=(*axes, rng_axis), out_axes=(d, d), axis_size=lead[d])
        return fn(*args, rngs)
    T, H, S, Hv = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    G = math.prod(lead)
    mask_flat, mask_idx = _flatten_lead(mask, lead)
    bias_flat, bias_idx = _flatten_lead(bias, lead)
    len_flat, len_idx = _flatten_lead(kv_lengths, lead)
    qs_flat, qs_idx = _flatten_lead(q_seg, lead)
    ks_flat, ks_idx = _flatten_lead(kv_seg, lead)

    def head(xs):
        g, q1, k1, v1 = xs
        m1 = None if mask is None else mask_flat[mask_idx[g]]  # [T|1, S|1]
        b1 = None if bias is None else bias_flat[bias_idx[g]]
        n1 = None if kv_lengths is None else len_flat[len_idx[g]]  # scalar
        s1 = None if seg is None else (qs_flat[qs_idx[g]], ks_flat[ks_idx[g]])  # [T], [S]
        r1 = None
        if rng is not None:
            r1 = rng if broadcast_dropout else jax.random.fold_in(rng, g)
        return _one_head(plan, q1, k1, v1, m1, b1, n1, r1, s1)

    per_step = heads_per_step(plan, G)
    group = 1 if k.shape[:-2] == lead else lead[-1]
    if group == 1:
        qg, kg, vg = q.reshape(G, T, H), k.reshape(G, S, H), v.reshape(G, S, Hv)
        if G == 1:
            out, lse = head((0, qg[0], kg[0], vg[0]))
            out, lse = out[None], lse[None]
        else:
            out, lse = lax.map(head, (jnp.arange(G), qg, kg, vg), batch_size=per_step)
        return out.reshape(*lead, T, Hv), lse.reshape(*lead, T)

    KV = G // group  # key/value heads (times batch)
    qg = q.reshape(KV, group, T, H)
    kg, vg = k.reshape(KV, S, H), v.reshape(KV, S, Hv)

    def kv_head(xs):  # one key/value head and the `group` query heads that share it
        c, qs, k1, v1 = xs  # [], [group, T, H], [S, H], [S, Hv]

        def query_head(j, q1):  # k1, v1 shared: their cotangents sum over the group
            return head((c * group + j, q1, k1, v1))

        js = jnp.arange(group)
        if group <= per_step:
            return jax.vmap(query_head)(js, qs)
        return lax.map(lambda a: query_head(*a), (js, qs), batch_size=per_step)

    if KV == 1:
        out, lse = kv_head((0, qg[0], kg[0], vg[0]))
        out, lse = out[None], lse[None]
    else:
        xs = (jnp.arange(KV), qg, kg, vg)
        out, lse = lax.map(kv_head, xs, batch_size=max(1, per_step // group))
    return out.reshape(*lead, T, Hv), lse.reshape(*lead, T)


def _explicitly_sharded_dim(rank, *arrays):
    """The first of the `rank` leading dims that some array shards over an explicit mesh
    axis (None when there is none, the usual case: no mesh, auto axes, or shard_map)."""
    for d in range(rank):
        for x in arrays:
            if x is None or x.shape[d] == 1:
                continue
            spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
            if spec is not None and len(spec) > d and spec[d] is not None:
                return d
    return None


def _flatten_lead(x, lead):
    """x [*lead|1, ...] -> (x with its leading dims flattened, index array [G]) such that
    ``x_flat[index[g]]`` is the slice for the g-th (flattened) head."""
    if x is None:
        return None, None
    lead_x = x.shape[: len(lead)]
    flat = x.reshape(math.prod(lead_x), *x.shape[len(lead) :])
    multi = np.unravel_index(np.arange(math.prod(lead)), lead)
    multi = [m if size != 1 else np.zeros_like(m) for m, size in zip(multi, lead_x, strict=True)]
    index = np.ravel_multi_index(multi, lead_x) if lead_x else np.zeros(1, np.int64)
    return flat, jnp.asarray(index, jnp.int32)
