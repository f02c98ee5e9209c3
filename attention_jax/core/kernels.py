"""The fused attention kernels JAX ships, behind one multi-head interface.

Legend as in :mod:`attention_jax.core`, plus the padded sizes the kernels see: Tp, Sp
(T, S padded to block multiples), P (T and S padded to one common length, Triton), Hp (one
head dim for q, k and v; Hqk that of q and k before Triton's mask column).

Every function takes ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]`` (one batch
dim; the caller flattens the others; K = N, or K dividing N for grouped-query attention,
query head n using key/value head ``n // (N // K)`` as in jax.nn) and returns
``out [B, T, N, Hv]`` in q's dtype. cuDNN takes K < N natively; the Pallas kernels take one
head count, so :func:`pallas_attention` repeats k and v to N heads first (an N // K times
larger copy of k and v; the gradient of the repeat sums over each group). All
compose with ``jax.jit`` and ``jax.grad`` (the kernels bring their own custom VJPs; forward
mode is not defined through them). ``scale`` is a Python float (the kernels take it as a
static parameter). A query row that sees no key at all (``key_value_seq_lengths`` 0, or a
mask row of all False) gives 0, as in :mod:`attention_jax.core.attention`, not the kernels'
uniform average of the values.

* :func:`cudnn_attention`: cuDNN's flash attention via
  ``jax.nn.dot_product_attention(implementation='cudnn')``. NVIDIA GPUs only.
* :func:`pallas_attention`: the flash-attention kernels in ``jax.experimental.pallas.ops``.
  Three variants (``variant=``; None picks one,
  :func:`attention_jax.core.dispatch.pallas_variant` says which):

  - ``'triton'`` (``ops/gpu/attention.py: mha``): any NVIDIA GPU of compute capability
    >= 8.0; runs on CPU with ``interpret=True, backend='gpu'``.
  - ``'mgpu'`` (``ops/gpu/attention_mgpu.py: attention``, FlashAttention-3 style, Mosaic
    GPU): Hopper only (compute capability 9.x), float16 only, no masking of any kind and no
    causal backward; cannot be interpreted. Chosen automatically on 9.x when the call
    qualifies, else ``'triton'``.
  - ``'tpu'`` (``ops/tpu/flash_attention.py: flash_attention``): TPUs; runs on CPU with
    ``interpret=True, backend='tpu'`` (TPU interpret mode).

  Lengths that are not block multiples are padded here and the padding is masked: see
  :func:`pallas_attention`.

Which calls a kernel can run, and why not, is decided in :mod:`attention_jax.core.dispatch`
(:func:`~attention_jax.core.dispatch.unsupported_reason`); the wrappers here ask it and
raise NotImplementedError with its reason.

The Pallas kernel modules are imported inside the functions that call them: they are
experimental, heavy to import, and only a GPU/TPU run (or interpret mode) needs them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.core._checks import (
    check_broadcastable,
    check_floating,
    check_lengths,
    check_qkv_shapes,
    check_same_dtype,
    check_segment_ids,
)
from attention_jax.core.dispatch import (
    MGPU_BLOCK,
    TPU_LANES,
    TRITON_MIN_BLOCK,
    mgpu_blocks,
    next_pow2,
    pallas_plan,
    triton_head_dim,
    triton_needs_column,
    unsupported_reason,
)

_F16, _F32 = jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)
_TRITON_BWD_BLOCK = 32  # ops/gpu/attention.py: BlockSizes.get_default()'s backward blocks
_TPU_SUBLANES = 8  # ops/tpu/flash_attention.py: q blocks are multiples of 8 sublanes


# --------------------------------------------------------------------------------------
# cuDNN.
# --------------------------------------------------------------------------------------


def cudnn_attention(
    q, k, v, *, bias=None, mask=None, is_causal=False, key_value_seq_lengths=None, scale
):
    """cuDNN flash attention: ``jax.nn.dot_product_attention(..., implementation='cudnn')``.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, H]`` (cuDNN through jax
        needs Hv == H; K = N, or K | N for grouped-query heads), all float16 or bfloat16.
      bias: optional float, broadcastable to ``[B, N, T, S]``; added to the scaled scores.
      mask: optional bool, broadcastable to ``[B, N, T, S]``; True = attend.
      is_causal: query t attends keys s <= t (top-left aligned when T != S).
      key_value_seq_lengths: optional int ``[B]``: keys at or past the length are masked.
      scale: the score scale (a Python float), usually ``1/√H``.

    Returns:
      ``out [B, T, N, Hv]`` in q's dtype.

    Raises:
      NotImplementedError: with :func:`~attention_jax.core.dispatch.unsupported_reason`'s
        reason when cuDNN cannot run it.
    """
    name = "cudnn_attention"
    q, k, v, lengths, scale = _check_call(name, q, k, v, key_value_seq_lengths, scale)
    B, T, N, _ = q.shape
    S = k.shape[1]
    target, legend = (B, N, T, S), "[B, N, T, S]"
    mask = _check_4d(name, "mask", mask, target, legend, kind="bool")
    bias = _check_4d(name, "bias", bias, target, legend, kind="float")
    reason = unsupported_reason(
        "cudnn", q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=q.dtype,
        has_mask=mask is not None, has_bias=bias is not None, is_causal=is_causal,
        has_lengths=lengths is not None,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"{name}: {reason}")
    # cuDNN wants the bias's T and S dims in full (check_layout); B and N may stay 1.
    if bias is not None:
        bias = jnp.broadcast_to(bias, (*bias.shape[:2], T, S)).astype(q.dtype)
    full_mask = None if mask is None else jnp.broadcast_to(mask, (*mask.shape[:2], T, S))
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=full_mask, scale=scale, is_causal=is_causal,
        key_value_seq_lengths=lengths, implementation="cudnn",
    )  # fmt: skip
    return _zero_empty_rows(out, full_mask, lengths, is_causal=is_causal)


def _zero_empty_rows(out, mask, lengths, *, is_causal):
    """``out [B, T, N, Hv]`` with the rows that see no key set to 0.

    Without a mask only ``lengths == 0`` empties a row (top-left causal always keeps key 0).
    """
    if mask is None:
        if lengths is None:
            return out
        rows = (lengths > 0)[:, None, None, None]  # [B, 1, 1, 1]
        return jnp.where(rows, out, jnp.zeros((), out.dtype))
    T, S = out.shape[1], mask.shape[-1]
    visible = mask  # [B|1, N|1, T, S]
    if is_causal:
        visible = visible & (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None, None]
    if lengths is not None:
        visible = visible & (jnp.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    rows = jnp.any(visible, axis=-1)  # [B|1, N|1, T]
    rows = jnp.transpose(rows, (0, 2, 1))[..., None]  # [B|1, T, N|1, 1]
    return jnp.where(rows, out, jnp.zeros((), out.dtype))


# --------------------------------------------------------------------------------------
# Pallas.
# --------------------------------------------------------------------------------------


def pallas_attention(
    q,
    k,
    v,
    *,
    is_causal=False,
    key_value_seq_lengths=None,
    scale,
    interpret=False,
    backend=None,
    variant=None,
    block_q=None,
    block_k=None,
    query_segment_ids=None,
    key_segment_ids=None,
):
    """Flash attention with the Pallas kernels in ``jax.experimental.pallas.ops``.

    Padding: the kernels need block-multiple lengths, so T and S are zero-padded here and
    the padded keys masked; padded query rows are dropped from the output.

    * ``'triton'``: T and S are padded to one common length P (its fused backward needs as
      many query blocks as key blocks). Padded or length-masked keys are masked by one extra
      head-dim column (q gets a constant, k a large negative number on masked keys), because
      the kernel's ``segment_ids`` is one ``[B, P]`` array read for queries and keys alike:
      the T real queries need one id, and every position carrying it is also an attended
      key, so keys at positions < T cannot be hidden (``key_value_seq_lengths`` < T, or
      padded keys when T > S). The column is free when max(H, Hv) is not a power of two,
      else it doubles the kernel's head tile. Without lengths and with T <= S the padding
      is masked by ``segment_ids`` (or by causality alone), at no cost. float32 matmuls run
      in TF32 on GPU (Triton's default precision); exact in interpret mode.
    * ``'mgpu'``: q is pre-scaled (the kernel has no scale: one extra rounding of q unless
      ``scale`` is a power of two); T is padded to a block multiple; S must already be one.
    * ``'tpu'``: layout ``[B, N, T, H]``; S padded to a multiple of 128 and masked with the
      kernel's separate kv ``segment_ids``, which also carry ``key_value_seq_lengths`` and
      the caller's segment ids (masked keys get an id no query of the row has: one past the
      row's largest query id, or one below its smallest when that is the int32 maximum).

    Hv != H ('triton', 'tpu') is handled by zero-padding the narrower head dim: the kernels
    take one head dim Hp for q, k and v. Grouped-query k and v (K < N heads) are repeated
    to N heads (``jnp.repeat(k, N // K, axis=2)``): the kernels take one head count.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]`` (K = N, or K | N);
        one floating dtype.
      is_causal: query t attends keys s <= t (top-left aligned when T != S).
      key_value_seq_lengths: optional int ``[B]``: keys at or past the length are masked.
      scale: the score scale (a Python float), usually ``1/√H``.
      interpret: run the kernel in Pallas interpret mode (on CPU); ``backend`` then picks
        the kernel: ``'gpu'`` (Triton) or ``'tpu'`` (TPU interpret mode).
      backend: ``'gpu'`` or ``'tpu'``; default ``jax.default_backend()``.
      variant: ``'triton'``, ``'mgpu'`` or ``'tpu'``; None = the choice of
        :func:`~attention_jax.core.dispatch.pallas_variant`.
      block_q, block_k: query and key block sizes (default: the kernel's, 128 mostly).
        Triton: powers of two >= 16; mgpu: multiples of 64; TPU: block_q a multiple of 8,
        block_k a multiple of 128.
      query_segment_ids, key_segment_ids: optional int ``[B, T]`` and ``[B, S]``, given
        together (packed rows): query t sees key s only if their ids are equal. TPU only.

    Returns:
      ``out [B, T, N, Hv]`` in q's dtype.

    Raises:
      NotImplementedError: with :func:`~attention_jax.core.dispatch.unsupported_reason`'s
        reason when no kernel can run it.
    """
    name = "pallas_attention"
    q, k, v, lengths, scale = _check_call(name, q, k, v, key_value_seq_lengths, scale)
    (T, N, H), S, Hv = q.shape[1:], k.shape[1], v.shape[-1]
    segments = _check_segments(name, query_segment_ids, key_segment_ids, q.shape[0], T, S)
    is_causal = bool(is_causal)
    reason, chosen = pallas_plan(
        name, dims=(T, S, N, H, Hv), dtype=q.dtype,
        has_mask=False, has_bias=False, is_causal=is_causal, has_lengths=lengths is not None,
        dropout=0.0, want_weights=False, backend=backend, device=None,
        interpret=bool(interpret), variant=variant, has_segment_ids=segments is not None,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"{name}: {reason}")
    if k.shape[2] != N:  # grouped-query: the kernels take N heads for q, k and v alike
        k, v = (jnp.repeat(x, N // k.shape[2], axis=2) for x in (k, v))  # [B, S, N, H|Hv]
    call = dict(is_causal=is_causal, scale=scale, block_q=block_q, block_k=block_k)
    if chosen == "triton":
        out = _triton_attention(name, q, k, v, lengths, interpret=bool(interpret), **call)
    elif chosen == "mgpu":
        out = _mgpu_attention(name, q, k, v, **call)
    else:
        out = _tpu_attention(name, q, k, v, lengths, segments, interpret=bool(interpret), **call)
    if segments is not None:
        return _zero_unsegmented_rows(out, segments, lengths, is_causal=is_causal)
    return _zero_empty_rows(out, None, lengths, is_causal=is_causal)


def _zero_unsegmented_rows(out, segments, lengths, *, is_causal):
    """``out [B, T, N, Hv]`` with the rows that see no key of their segment set to 0 (a
    reduction over [B, T, S] that XLA fuses: the bool array is not kept)."""
    q_ids, k_ids = segments
    T, S = q_ids.shape[1], k_ids.shape[1]
    visible = q_ids[:, :, None] == k_ids[:, None, :]  # [B, T, S]
    if is_causal:
        visible = visible & (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None]
    if lengths is not None:
        visible = visible & (jnp.arange(S)[None, None, :] < lengths[:, None, None])
    rows = jnp.any(visible, axis=-1)[:, :, None, None]  # [B, T, 1, 1]
    return jnp.where(rows, out, jnp.zeros((), out.dtype))


def _triton_attention(name, q, k, v, lengths, *, is_causal, scale, interpret, block_q, block_k):
    """``ops/gpu/attention.py: mha`` on T, S padded to P and head dims padded to Hp."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    B, T, N, H = q.shape
    S, Hv = k.shape[1], v.shape[-1]
    column = triton_needs_column(T, S, lengths is not None)
    Hp = triton_head_dim(H, Hv, column)
    # Blocks of 128 rows up to 256 bytes a row (jax's default, for 16-bit Hp <= 128); 64
    # above, so the q, k, v tiles (k, v double-buffered) fit in shared memory.
    default = 128 if next_pow2(Hp) * q.dtype.itemsize <= 256 else 64
    bq = _pow2_block(name, "block_q", block_q, default)
    bk = _pow2_block(name, "block_k", block_k, default)
    cap = max(TRITON_MIN_BLOCK, next_pow2(max(T, S)))  # no block longer than needed
    bq, bk = min(bq, cap), min(bk, cap)
    P = _round_up(max(T, S), max(bq, bk))
    bb = min(_TRITON_BWD_BLOCK, bq, bk)
    blocks = triton_attention.BlockSizes(
        block_q=bq, block_k=bk, block_q_dkv=bb, block_kv_dkv=bb, block_q_dq=bb, block_kv_dq=bb
    )
    Hqk = Hp - int(column)
    qp = _pad_to(q, {1: P, 3: Hqk})  # [B, P, N, Hqk]
    kp = _pad_to(k, {1: P, 3: Hqk})  # [B, P, N, Hqk]
    vp = _pad_to(v, {1: P, 3: Hp})  # [B, P, N, Hp]
    segment_ids = None
    if column:
        keys_ok = _keys_ok(B, P, S, lengths)  # [B, P]
        c, neg = _mask_column_values(q.dtype, scale)
        q_col = jnp.full((B, P, N, 1), c, q.dtype)
        k_col = jnp.where(keys_ok, jnp.zeros((), k.dtype), jnp.asarray(neg, k.dtype))
        k_col = jnp.broadcast_to(k_col[:, :, None, None], (B, P, N, 1))
        qp = jnp.concatenate([qp, q_col], axis=-1)  # [B, P, N, Hp]; logit += c * neg
        kp = jnp.concatenate([kp, k_col], axis=-1)  # [B, P, N, Hp]
    elif P > S and not is_causal:  # T <= S here: query rows t < T read segment id 1
        segment_ids = _keys_ok(B, P, S, None).astype(jnp.int32)  # [B, P]
    # (causal with T <= S: padded keys s >= S > t are masked by causality already)
    out = triton_attention.mha(
        qp, kp, vp, segment_ids, sm_scale=scale, causal=is_causal, block_sizes=blocks,
        interpret=interpret,
    )  # fmt: skip  # [B, P, N, Hp]
    return out[:, :T, :, :Hv]


def _mask_column_values(dtype, scale):
    """(c, neg) with scale * c * neg <= -1e4, both finite in ``dtype``: masked logits end up
    >= 1e4 below the row's real ones (exp underflows to exactly 0), but stay finite so a
    fully masked row gives no NaN (its output is zeroed afterwards)."""
    need = 1e4 / scale
    cap = 2.0**14 if jnp.dtype(dtype) == _F16 else 2.0**60
    if need <= cap:
        return 1.0, -float(need)
    return min(2.0 ** math.ceil(math.log2(need / cap)), cap), -cap


def _mgpu_attention(name, q, k, v, *, is_causal, scale, block_q, block_k):
    """``ops/gpu/attention_mgpu.py: attention`` (non-causal, float16, S a block multiple)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    del is_causal  # refused by _mgpu_reason (no causal backward)
    T, H = q.shape[1], q.shape[3]
    S = k.shape[1]
    for nm, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and (b <= 0 or b % MGPU_BLOCK):
            raise ValueError(f"{name}: {nm} must be a multiple of {MGPU_BLOCK}, got {b}")
    bq, bkv, s_multiple = mgpu_blocks(H, block_q, block_k)
    if S % s_multiple or S < 2 * bkv:
        raise ValueError(
            f"{name}: variant='mgpu' with block_k={bkv} needs S a multiple of {s_multiple} "
            f"and >= {2 * bkv}, got S={S}"
        )
    wgs = 2 if H <= 128 else 1
    config = attention_mgpu.TuningConfig(
        block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=False, compute_wgs_bwd=wgs,
        block_q_dkv=MGPU_BLOCK, block_kv_dkv=MGPU_BLOCK, block_q_dq=MGPU_BLOCK,
        block_kv_dq=MGPU_BLOCK,
    )  # fmt: skip
    Tp = _round_up(T, math.lcm(2 * bq, MGPU_BLOCK * wgs))  # two compute warpgroups per tile
    qs = _pad_to((q.astype(_F32) * scale).astype(q.dtype), {1: Tp})  # [B, Tp, N, H]
    out = attention_mgpu.attention(qs, k, v, config)  # [B, Tp, N, H]
    return out[:, :T]


def _tpu_attention(name, q, k, v, lengths, segments, *, is_causal, scale, interpret, block_q,
                   block_k):  # fmt: skip
    """``ops/tpu/flash_attention.py: flash_attention`` in its ``[B, N, T, H]`` layout."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    B, T, _, H = q.shape
    S, Hv = k.shape[1], v.shape[-1]
    Hp = max(H, Hv)
    bq = TPU_LANES if block_q is None else block_q
    bk = TPU_LANES if block_k is None else block_k
    if bq <= 0 or bq % _TPU_SUBLANES:
        raise ValueError(f"{name}: block_q must be a multiple of {_TPU_SUBLANES}, got {bq}")
    if bk <= 0 or bk % TPU_LANES:
        raise ValueError(f"{name}: block_k must be a multiple of {TPU_LANES}, got {bk}")
    if T <= bq:  # one query block spanning the whole (unpadded) T
        bq, Tp = T, T
    else:
        Tp = _round_up(T, bq)
    Sp = _round_up(S, TPU_LANES)
    if Sp <= bk:
        bk = Sp
    else:
        Sp = _round_up(S, bk)
    blocks = tpu_flash.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq,
    )  # fmt: skip
    segment_ids = None
    if segments is not None:  # masked keys get an id none of the row's queries has
        q_ids, k_ids = (x.astype(jnp.int32) for x in segments)  # [B, T], [B, S]
        top, bottom = jnp.max(q_ids, axis=1), jnp.min(q_ids, axis=1)  # [B]
        none = jnp.where(top < np.iinfo(np.int32).max, top + 1, bottom - 1)  # [B]
        k_ids = jnp.where(_keys_ok(B, Sp, S, lengths), _pad_to(k_ids, {1: Sp}), none[:, None])
        segment_ids = tpu_flash.SegmentIds(q=_pad_to(q_ids, {1: Tp}), kv=k_ids)  # [B, Tp|Sp]
    elif lengths is not None or (Sp > S and not (is_causal and T <= S)):
        segment_ids = tpu_flash.SegmentIds(
            q=jnp.ones((B, Tp), jnp.int32),  # [B, Tp]
            kv=_keys_ok(B, Sp, S, lengths).astype(jnp.int32),  # [B, Sp]
        )
    qt = _pad_to(jnp.swapaxes(q, 1, 2), {2: Tp, 3: Hp})  # [B, N, Tp, Hp]
    kt = _pad_to(jnp.swapaxes(k, 1, 2), {2: Sp, 3: Hp})  # [B, N, Sp, Hp]
    vt = _pad_to(jnp.swapaxes(v, 1, 2), {2: Sp, 3: Hp})  # [B, N, Sp, Hp]
    call = functools.partial(_tpu_flash_call, causal=is_causal, sm_scale=scale, block_sizes=blocks)
    if interpret:
        out = _tpu_interpreted(call, qt, kt, vt, segment_ids)
    else:
        out = call(qt, kt, vt, segment_ids)  # [B, N, Tp, Hp]
    return jnp.swapaxes(out[:, :, :T, :Hv], 1, 2)  # [B, T, N, Hv]


def _tpu_flash_call(q, k, v, segment_ids, **kw):
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    return tpu_flash.flash_attention(q, k, v, None, segment_ids, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tpu_interpreted(call, q, k, v, segment_ids):
    """``call`` under TPU interpret mode, forward and backward.

    ``force_tpu_interpret_mode`` only affects kernels traced inside it, and the kernel's
    backward is traced later, when the caller's ``grad`` transposes; so the backward is
    re-entered in the context here (the forward's ``jax.vjp`` closure is the residual).
    """
    with _tpu_interpret_mode():
        return call(q, k, v, segment_ids)


def _tpu_interpreted_fwd(call, q, k, v, segment_ids):
    with _tpu_interpret_mode():
        out, vjp = jax.vjp(lambda q, k, v: call(q, k, v, segment_ids), q, k, v)
    return out, vjp


def _tpu_interpreted_bwd(call, vjp, g):
    del call
    with _tpu_interpret_mode():
        dq, dk, dv = vjp(g)
    return dq, dk, dv, None


_tpu_interpreted.defvjp(_tpu_interpreted_fwd, _tpu_interpreted_bwd)


def _tpu_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.force_tpu_interpret_mode()


# --------------------------------------------------------------------------------------
# Small helpers and boundary checks.
# --------------------------------------------------------------------------------------


def _keys_ok(B, P, S, lengths):
    """bool ``[B, P]``: key s is real (s < S) and within its row's length."""
    ok = jnp.arange(P) < S  # [P]
    if lengths is None:
        return jnp.broadcast_to(ok[None, :], (B, P))
    return ok[None, :] & (jnp.arange(P)[None, :] < lengths[:, None])  # [B, P]


def _pad_to(x, sizes):
    """Zero-pad ``x`` at the end of each axis in ``sizes`` ({axis: new length})."""
    widths = [(0, sizes.get(a, n) - n) for a, n in enumerate(x.shape)]
    if not any(hi for _, hi in widths):
        return x
    return jnp.pad(x, widths)


def _round_up(n, m):
    return -(-n // m) * m


def _pow2_block(name, nm, block, default):
    if block is None:
        return default
    if block < TRITON_MIN_BLOCK or block & (block - 1):
        raise ValueError(
            f"{name}: {nm} for the Triton kernel must be a power of two >= "
            f"{TRITON_MIN_BLOCK}, got {block}"
        )
    return block


def _check_call(name, q, k, v, lengths, scale):
    """Arrays in, (q, k, v, lengths int32 [B] | None, scale float) out, or a clear error."""
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(
            f"{name}: expected q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    check_qkv_shapes(name, q.shape, k.shape, v.shape, names=("q", "k", "v"))
    for nm, x in (("q", q), ("k", k), ("v", v)):
        check_floating(name, nm, x)
    check_same_dtype(name, ("q", "k", "v"), q, k, v)
    if isinstance(scale, jax.core.Tracer) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(
            f"{name}: scale must be a Python float (the kernels take it as a static "
            f"parameter), got {type(scale).__name__}"
        )
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"{name}: scale must be > 0, got {scale}")
    lengths = check_lengths(name, "key_value_seq_lengths", lengths, q.shape[:1], "[B, T, N, H]")
    return q, k, v, lengths, scale


def _check_segments(name, q_ids, k_ids, B, T, S):
    """(query ids [B, T], key ids [B, S]) or None; both or neither."""
    if (q_ids is None) != (k_ids is None):
        raise ValueError(f"{name}: give both query_segment_ids and key_segment_ids, or neither")
    if q_ids is None:
        return None
    q_ids = check_segment_ids(name, "query_segment_ids", q_ids, (B, T), "[B, T]")
    k_ids = check_segment_ids(name, "key_segment_ids", k_ids, (B, S), "[B, S]")
    return q_ids, k_ids


def _check_4d(name, nm, x, target, legend, *, kind):
    """``x`` broadcastable to ``target`` = [B, N, T, S], returned 4-D (leading 1s added)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if kind == "bool" and x.dtype != jnp.bool_:
        raise TypeError(f"{name}: {nm} must be bool (True = attend), got dtype {x.dtype}")
    if kind == "float":
        check_floating(name, nm, x)
    check_broadcastable(name, nm, x, target, legend)
    return x.reshape((1,) * (4 - x.ndim) + x.shape)
