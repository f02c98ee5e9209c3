"""The fused attention kernels JAX ships, behind one multi-head interface.

Dimension legend (as in :mod:`attention_jax.core.attention`):
B batch · T query length · S key/value length · N heads · H head dim (queries, keys) ·
V head dim of values · L a sequence length padded to a block multiple · D a padded head dim.

Every function takes ``q [B, T, N, H]``, ``k [B, S, N, H]``, ``v [B, S, N, V]`` (one batch
dim; the caller flattens the others) and returns ``out [B, T, N, V]`` in q's dtype. All
compose with ``jax.jit`` and ``jax.grad`` (the kernels bring their own custom VJPs; forward
mode is not defined through them). ``scale`` is a Python float (the kernels take it as a
static parameter). A query row that sees no key at all (``key_value_seq_lengths`` 0, or a
mask row of all False) gives 0, as in :mod:`attention_jax.core.attention`, not the kernels'
uniform average of the values.

* :func:`cudnn_attention`: cuDNN's flash attention via
  ``jax.nn.dot_product_attention(implementation='cudnn')``. NVIDIA GPUs only.
* :func:`pallas_attention`: the flash-attention kernels in ``jax.experimental.pallas.ops``.
  Three variants (``variant=``; None picks one, :func:`pallas_variant` says which):

  - ``'triton'`` (``ops/gpu/attention.py: mha``): any NVIDIA GPU of compute capability
    >= 8.0; runs on CPU with ``interpret=True, backend='gpu'``.
  - ``'mgpu'`` (``ops/gpu/attention_mgpu.py: attention``, FlashAttention-3 style, Mosaic
    GPU): Hopper only (compute capability 9.x), float16 only, no masking of any kind and no
    causal backward; cannot be interpreted. Chosen automatically on 9.x when the call
    qualifies (see :func:`unsupported_reason` with ``variant='mgpu'``), else ``'triton'``.
  - ``'tpu'`` (``ops/tpu/flash_attention.py: flash_attention``): TPUs; runs on CPU with
    ``interpret=True, backend='tpu'`` (TPU interpret mode).

  Lengths that are not block multiples are padded here and the padding is masked: see
  :func:`pallas_attention`.
* :func:`unsupported_reason`: None when a kernel can run a call, else a short reason; the
  dispatcher in :mod:`attention_jax.core.attention` uses it. :func:`device_kind` describes the
  device it checks against (and works on a CPU-only host).

The constraints below come from the jax sources (paths relative to the installed ``jax``):
``_src/nn/functions.py`` (``dot_product_attention``), ``_src/cudnn/fused_attention_stablehlo.py``
(``check_layout``, ``check_is_flash_attention``, ``combine_bias_and_mask``) and the three
kernel files above; each check names its source.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

KernelImplementation = Literal["cudnn", "pallas"]
PallasVariant = Literal["triton", "mgpu", "tpu"]
PALLAS_VARIANTS: tuple[str, ...] = ("triton", "mgpu", "tpu")

_F16, _BF16, _F32 = jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)

# cuDNN (fused_attention_stablehlo.py: check_layout, check_is_flash_attention). The SM80
# floor is cuDNN's own: "cudnn SDPA operation requires SM80 (Ampere) or newer"
# (https://docs.nvidia.com/cudnn/operations/Attention.md); jax does not check it.
_CUDNN_DTYPES = (_F16, _BF16)
_CUDNN_MIN_CC = (8, 0)
_CUDNN_MAX_H = 128  # 256 on compute capability >= 9.0
_CUDNN_MAX_H_HOPPER = 256

# Pallas Triton kernel (ops/gpu/attention.py). Block sizes feed pl.dslice / jnp.arange, so
# they are powers of two; Triton's dot needs tiles of at least 16 on each side.
_TRITON_DTYPES = (_F16, _BF16, _F32)
_TRITON_MIN_CC = (8, 0)
_TRITON_MIN_BLOCK = 16
_TRITON_MAX_HEAD_TILE = 256  # head dim is padded to a power of two and kept in one tile
_TRITON_BWD_BLOCK = 32  # BlockSizes.get_default()'s backward blocks

# Mosaic GPU kernel (ops/gpu/attention_mgpu.py): blocks are multiples of 64 (TuningConfig),
# head dim a multiple of 64, float16 only (its shared-memory buffers are declared float16:
# bfloat16 inputs fail to trace with "Mixed input dtypes ... lhs=bfloat16, rhs=float16").
_MGPU_BLOCK = 64

# Pallas TPU kernel (ops/tpu/flash_attention.py): kv blocks are multiples of 128 lanes
# (MIN_BLOCK_SIZE; the backward tiles m and l by block_k // 128), q blocks of 8 sublanes.
_TPU_DTYPES = (_BF16, _F32)
_TPU_LANES = 128
_TPU_SUBLANES = 8


# --------------------------------------------------------------------------------------
# The device.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """What the capability checks need to know about a device.

    Attributes:
      platform: ``'cpu'``, ``'gpu'`` or ``'tpu'`` (``jax.Device.platform``).
      name: ``jax.Device.device_kind``, e.g. ``'NVIDIA H200'`` (informational).
      compute_capability: ``(major, minor)`` for NVIDIA (CUDA) GPUs, else None.
    """

    platform: str
    name: str = ""
    compute_capability: tuple[int, int] | None = None


def device_kind(backend: str | None = None) -> DeviceKind | None:
    """The first device of ``backend`` (default: ``jax.default_backend()``), or None when
    this host has no such backend. Never raises on a CPU-only host."""
    try:
        device = jax.devices(backend)[0]
    except RuntimeError:  # "Unknown backend" / "failed to initialize"
        return None
    return DeviceKind(
        platform=device.platform,
        name=str(getattr(device, "device_kind", "")),
        compute_capability=_parse_cc(getattr(device, "compute_capability", None)),
    )


def _parse_cc(cc) -> tuple[int, int] | None:
    """'9.0' -> (9, 0); anything else (None, a ROCm gfx name) -> None."""
    try:
        major, minor = str(cc).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def _cudnn_version() -> int | None:
    """cuDNN's version as jax sees it (e.g. 91000), or None without jax's CUDA plugin."""
    try:
        from jax._src.lib import cuda_versions  # private: best effort
    except ImportError:
        return None
    if cuda_versions is None:
        return None
    try:
        return int(cuda_versions.cudnn_get_version())
    except Exception:  # a broken plugin means: no cuDNN
        return None


def _fmt_cc(cc) -> str:
    return "unknown" if cc is None else f"{cc[0]}.{cc[1]}"


def _resolve_device(name, backend, device, *, detect=True):
    """(platform, device, detected): the platform the call targets and what is known of it.

    ``device`` None is detected from this host unless ``detect`` is False; it stays None when
    the host lacks that backend (then arch-dependent limits use their conservative values).
    """
    if device is not None and not isinstance(device, DeviceKind):
        raise TypeError(f"{name}: device_kind must be a DeviceKind or None, got {device!r}")
    platform = backend or (device.platform if device is not None else jax.default_backend())
    if device is not None and device.platform != platform:
        raise ValueError(
            f"{name}: device_kind is a {device.platform!r} device but backend={platform!r}"
        )
    detected = False
    if device is None and detect:
        device = device_kind(platform)
        detected = device is not None
    return platform, device, detected


# --------------------------------------------------------------------------------------
# Capability checks.
# --------------------------------------------------------------------------------------


def unsupported_reason(
    implementation: str,
    *,
    q_shape,
    k_shape,
    v_shape,
    dtype,
    has_mask: bool = False,
    has_bias: bool = False,
    is_causal: bool = False,
    has_lengths: bool = False,
    dropout: float = 0.0,
    want_weights: bool = False,
    backend: str | None = None,
    device_kind: DeviceKind | None = None,
    interpret: bool = False,
    variant: str | None = None,
) -> str | None:
    """None when ``implementation`` can run this call, else a short human reason.

    Args:
      implementation: ``'cudnn'`` or ``'pallas'``.
      q_shape, k_shape, v_shape: ``[..., T, N, H]``, ``[..., S, N, H]``, ``[..., S, N, V]``
        (any batch dims, the same for all three).
      dtype: the dtype the kernel would run in (q, k and v share it).
      has_mask, has_bias, is_causal, has_lengths: which of mask, bias, ``is_causal`` and
        ``key_value_seq_lengths`` the call uses.
      dropout: the attention dropout rate (0.0 = none).
      want_weights: whether the caller needs the ``[..., N, T, S]`` weights.
      backend: ``'gpu'``, ``'tpu'``, ``'cpu'``; default ``jax.default_backend()``.
      device_kind: the device to check against (a :class:`DeviceKind`); default: detected
        from this host's ``backend``. When the host lacks that backend (planning for another
        machine) the arch-dependent limits take their conservative values.
      interpret: ``'pallas'`` only: run the kernel in interpret mode on CPU (then
        ``backend`` picks which kernel, ``'gpu'`` or ``'tpu'``).
      variant: ``'pallas'`` only: ``'triton'``, ``'mgpu'`` or ``'tpu'``; None = whichever
        :func:`pallas_variant` picks.
    """
    name = "unsupported_reason"
    if implementation not in ("cudnn", "pallas"):
        raise ValueError(
            f"{name}: implementation must be 'cudnn' or 'pallas', got {implementation!r}"
        )
    dims = _check_shapes(name, q_shape, k_shape, v_shape)
    dtype = jnp.dtype(dtype)
    common = dict(
        dims=dims, dtype=dtype, has_mask=bool(has_mask), has_bias=bool(has_bias),
        is_causal=bool(is_causal), has_lengths=bool(has_lengths), dropout=float(dropout),
        want_weights=bool(want_weights),
    )  # fmt: skip
    if implementation == "cudnn":
        if interpret or variant is not None:
            raise ValueError(f"{name}: interpret= and variant= are for 'pallas' only")
        platform, device, detected = _resolve_device(name, backend, device_kind)
        return _cudnn_reason(platform=platform, device=device, detected=detected, **common)
    reason, _ = _pallas_plan(
        name, backend=backend, device=device_kind, interpret=interpret, variant=variant, **common
    )
    return reason


def pallas_variant(
    *,
    q_shape,
    k_shape,
    v_shape,
    dtype,
    is_causal: bool = False,
    has_lengths: bool = False,
    backend: str | None = None,
    device_kind: DeviceKind | None = None,
    interpret: bool = False,
) -> str:
    """The Pallas kernel (``'triton'``, ``'mgpu'`` or ``'tpu'``) that
    :func:`pallas_attention` with ``variant=None`` runs for this call; raises
    NotImplementedError with the reason when none can."""
    name = "pallas_variant"
    reason, chosen = _pallas_plan(
        name, dims=_check_shapes(name, q_shape, k_shape, v_shape), dtype=jnp.dtype(dtype),
        has_mask=False, has_bias=False, is_causal=bool(is_causal),
        has_lengths=bool(has_lengths), dropout=0.0, want_weights=False, backend=backend,
        device=device_kind, interpret=interpret, variant=None,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"{name}: {reason}")
    return chosen


def _check_shapes(name, q_shape, k_shape, v_shape):
    """(T, S, N, H, V) from ``[..., T, N, H]``, ``[..., S, N, H]``, ``[..., S, N, V]``."""
    q_shape, k_shape, v_shape = (tuple(int(d) for d in s) for s in (q_shape, k_shape, v_shape))
    shapes = f"q {q_shape}, k {k_shape}, v {v_shape}"
    if not (len(q_shape) == len(k_shape) == len(v_shape) >= 3):
        raise ValueError(
            f"{name}: expected q [..., T, N, H], k [..., S, N, H], v [..., S, N, V] of the same "
            f"rank >= 3, got {shapes}"
        )
    if not q_shape[:-3] == k_shape[:-3] == v_shape[:-3]:
        raise ValueError(f"{name}: q, k and v need the same batch dims, got {shapes}")
    (T, N, H), (S, Nk, Hk), (Sv, Nv, V) = q_shape[-3:], k_shape[-3:], v_shape[-3:]
    if not N == Nk == Nv:
        raise ValueError(f"{name}: q, k and v need the same number of heads N, got {shapes}")
    if H != Hk:
        raise ValueError(f"{name}: q and k need the same head dim H, got {shapes}")
    if S != Sv:
        raise ValueError(f"{name}: k and v need the same length S, got {shapes}")
    if 0 in q_shape + k_shape + v_shape:
        raise ValueError(f"{name}: empty dimension in {shapes}")
    return T, S, N, H, V


def _cudnn_reason(*, dims, dtype, has_mask, has_bias, is_causal, has_lengths, dropout,
                  want_weights, platform, device, detected):  # fmt: skip
    del is_causal, has_lengths  # cuDNN takes both (MaskType.CAUSAL / PADDING[_CAUSAL]).
    T, S, _, H, V = dims
    if want_weights:
        return "cudnn does not return the attention weights"
    if dropout:
        return (
            "attention dropout is not supported by cudnn here "
            "(jax.nn.dot_product_attention has no dropout argument)"
        )
    if platform != "gpu":
        return f"cudnn needs an NVIDIA GPU (the backend is {platform})"
    cc = None if device is None else device.compute_capability
    if device is not None:
        if cc is None:
            return (
                f"cudnn needs an NVIDIA (CUDA) GPU; {device.name or 'this GPU'} reports no "
                "CUDA compute capability"
            )
        if cc < _CUDNN_MIN_CC:
            return f"cudnn flash attention needs compute capability >= 8.0, got {_fmt_cc(cc)}"
        if detected:  # this host's GPU: jax's cuDNN must be there too (check_cudnn_version)
            version = _cudnn_version()
            if version is None:
                return "cuDNN is not detected (jax's CUDA plugin does not report it)"
            if cc == (10, 3) and version < 91100:  # check_is_flash_attention
                return f"compute capability 10.3 needs cuDNN >= 9.11, got {version}"
    if dtype not in _CUDNN_DTYPES:  # check_layout
        return f"cudnn needs bfloat16 or float16 inputs, got {dtype}"
    if V != H:  # dot_product_attention checks value [B, S, K, H]
        return (
            "cudnn (through jax.nn.dot_product_attention) needs the value head dim V equal "
            f"to H, got H={H}, V={V}"
        )
    hopper = cc is not None and cc >= (9, 0)
    h_max = _CUDNN_MAX_H_HOPPER if hopper else _CUDNN_MAX_H
    if H > h_max or H % 8:  # check_is_flash_attention
        where = "" if hopper else " (256 on compute capability >= 9.0)"
        return f"cudnn needs head dim H <= {h_max}{where} and a multiple of 8, got H={H}"
    if (has_mask or has_bias) and (T % 2 or S % 2):
        # combine_bias_and_mask turns a mask into a bias; check_is_flash_attention then
        # refuses odd lengths in training (the backward pass).
        return f"cudnn with a mask or bias needs even T and S, got T={T}, S={S}"
    return None


def _pallas_plan(name, *, dims, dtype, has_mask, has_bias, is_causal, has_lengths, dropout,
                 want_weights, backend, device, interpret, variant):  # fmt: skip
    """(reason, variant): why no Pallas kernel can run the call (else None) and which runs."""
    if variant is not None and variant not in PALLAS_VARIANTS:
        raise ValueError(
            f"{name}: variant must be one of {PALLAS_VARIANTS} or None, got {variant!r}"
        )
    if want_weights:
        return "the pallas kernels do not return the attention weights", None
    if dropout:
        return "attention dropout is not supported by the pallas kernels", None
    if has_mask:
        return (
            "pallas kernels do not take an arbitrary mask; pass is_causal / key_value_seq_lengths",
            None,
        )
    if has_bias:
        return "the pallas kernels here take no bias", None
    platform, device, _ = _resolve_device(name, backend, device, detect=not interpret)
    if platform not in ("gpu", "tpu"):
        which = "given" if backend else "default"
        if interpret:
            return (
                f"interpret=True needs backend='gpu' or 'tpu' to say which kernel to "
                f"interpret (the {which} backend is {platform})",
                None,
            )
        return (
            f"pallas kernels need a GPU or TPU (the {which} backend is {platform}); "
            "kernels.pallas_attention can interpret one on CPU (interpret=True, "
            "backend='gpu' or 'tpu')",
            None,
        )
    T, S, _, H, V = dims
    if platform == "tpu":
        if variant not in (None, "tpu"):
            raise ValueError(f"{name}: variant={variant!r} is a GPU kernel but the backend is tpu")
        return _tpu_reason(T, S, H, V, dtype), "tpu"
    if variant == "tpu":
        raise ValueError(f"{name}: variant='tpu' is the TPU kernel but the backend is gpu")
    if variant in (None, "mgpu"):
        reason = _mgpu_reason(T, S, H, V, dtype, device, interpret, is_causal, has_lengths)
        if reason is None or variant == "mgpu":
            return reason, "mgpu"
    return _triton_reason(T, S, H, V, dtype, device, interpret, has_lengths), "triton"


def _triton_reason(T, S, H, V, dtype, device, interpret, has_lengths):
    if not interpret and device is not None:
        cc = device.compute_capability
        if cc is None:
            return (
                f"the pallas Triton kernel needs an NVIDIA (CUDA) GPU; "
                f"{device.name or 'this GPU'} reports no CUDA compute capability"
            )
        if cc < _TRITON_MIN_CC:
            return f"the pallas Triton kernel needs compute capability >= 8.0, got {_fmt_cc(cc)}"
    if dtype not in _TRITON_DTYPES:
        return f"the pallas Triton kernel needs float16, bfloat16 or float32 inputs, got {dtype}"
    D = _triton_head_dim(H, V, _triton_needs_column(T, S, has_lengths))
    if _next_pow2(D) > _TRITON_MAX_HEAD_TILE:
        return (
            f"head dim too large for the pallas Triton kernel: it keeps a whole head "
            f"(H={H}, V={V} -> {_next_pow2(D)}) in one tile, max {_TRITON_MAX_HEAD_TILE}"
        )
    return None


def _mgpu_reason(T, S, H, V, dtype, device, interpret, is_causal, has_lengths):
    del T  # padded up to a block multiple; padded query rows are simply dropped
    if interpret:
        return "the Mosaic GPU kernel (variant='mgpu') cannot run in interpret mode"
    cc = None if device is None else device.compute_capability
    if cc is None or cc[0] != 9:
        return (
            "the Mosaic GPU kernel (variant='mgpu') needs a Hopper GPU (compute capability "
            f"9.x), got {_fmt_cc(cc)}"
        )
    if dtype != _F16:
        return (
            "the Mosaic GPU kernel needs float16 inputs (its shared-memory buffers are "
            f"float16), got {dtype}"
        )
    if V != H or H % 64 or H > 256:
        return f"the Mosaic GPU kernel needs V == H, a multiple of 64 and <= 256, got H={H}, V={V}"
    if is_causal:
        return (
            "the Mosaic GPU kernel has no causal backward pass (jax raises "
            "NotImplementedError); use variant='triton'"
        )
    if has_lengths:
        return "the Mosaic GPU kernel cannot mask keys, so no key_value_seq_lengths"
    _, block_kv, s_multiple = _mgpu_blocks(H, None, None)
    if S % s_multiple or S < 2 * block_kv:
        return (
            f"the Mosaic GPU kernel cannot mask padded keys, so S must be a multiple of "
            f"{s_multiple} and >= {2 * block_kv}, got S={S}"
        )
    return None


def _tpu_reason(T, S, H, V, dtype):
    del T, S  # both padded to block multiples here
    if dtype not in _TPU_DTYPES:
        return f"the pallas TPU flash kernel needs bfloat16 or float32 inputs, got {dtype}"
    D = max(H, V)
    if D > _TPU_LANES and D % _TPU_LANES:
        return (
            f"the pallas TPU flash kernel needs head dims <= {_TPU_LANES} or a multiple of "
            f"{_TPU_LANES}, got H={H}, V={V}"
        )
    return None


# --------------------------------------------------------------------------------------
# cuDNN.
# --------------------------------------------------------------------------------------


def cudnn_attention(
    q, k, v, *, bias=None, mask=None, is_causal=False, key_value_seq_lengths=None, scale
):
    """cuDNN flash attention: ``jax.nn.dot_product_attention(..., implementation='cudnn')``.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, N, H]``; v: ``[B, S, N, H]`` (cuDNN through jax
        needs V == H), all float16 or bfloat16.
      bias: optional float, broadcastable to ``[B, N, T, S]``; added to the scaled scores.
      mask: optional bool, broadcastable to ``[B, N, T, S]``; True = attend.
      is_causal: query t attends keys s <= t (top-left aligned when T != S).
      key_value_seq_lengths: optional int ``[B]``: keys at or past the length are masked.
      scale: the score scale (a Python float), usually ``1/√H``.

    Returns:
      ``out [B, T, N, V]`` in q's dtype.

    Raises:
      NotImplementedError: with :func:`unsupported_reason`'s reason when cuDNN cannot run it.
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
    """``out [B, T, N, V]`` with the rows that see no key set to 0.

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
):
    """Flash attention with the Pallas kernels in ``jax.experimental.pallas.ops``.

    Padding: the kernels need block-multiple lengths, so T and S are zero-padded here and
    the padded keys masked; padded query rows are dropped from the output.

    * ``'triton'``: T and S are padded to one common length L (its fused backward needs as
      many query blocks as key blocks). Padded or length-masked keys are masked by one extra
      head-dim column (q gets a constant, k a large negative number on masked keys), because
      the kernel's ``segment_ids`` is one ``[B, L]`` array read for queries and keys alike:
      the T real queries need one id, and every position carrying it is also an attended
      key, so keys at positions < T cannot be hidden (``key_value_seq_lengths`` < T, or
      padded keys when T > S). The column is free when max(H, V) is not a power of two,
      else it doubles the kernel's head tile. Without lengths and with T <= S the padding
      is masked by ``segment_ids`` (or by causality alone), at no cost. float32 matmuls run
      in TF32 on GPU (Triton's default precision); exact in interpret mode.
    * ``'mgpu'``: q is pre-scaled (the kernel has no scale: one extra rounding of q unless
      ``scale`` is a power of two); T is padded to a block multiple; S must already be one.
    * ``'tpu'``: layout ``[B, N, T, H]``; S padded to a multiple of 128 and masked with the
      kernel's separate kv ``segment_ids``, which also carry ``key_value_seq_lengths``.

    V != H ('triton', 'tpu') is handled by zero-padding the narrower head dim: the kernels
    take one head dim D for q, k and v.

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, N, H]``; v: ``[B, S, N, V]``; one floating dtype.
      is_causal: query t attends keys s <= t (top-left aligned when T != S).
      key_value_seq_lengths: optional int ``[B]``: keys at or past the length are masked.
      scale: the score scale (a Python float), usually ``1/√H``.
      interpret: run the kernel in Pallas interpret mode (on CPU); ``backend`` then picks
        the kernel: ``'gpu'`` (Triton) or ``'tpu'`` (TPU interpret mode).
      backend: ``'gpu'`` or ``'tpu'``; default ``jax.default_backend()``.
      variant: ``'triton'``, ``'mgpu'`` or ``'tpu'``; None = :func:`pallas_variant`'s choice.
      block_q, block_k: query and key block sizes (default: the kernel's, 128 mostly).
        Triton: powers of two >= 16; mgpu: multiples of 64; TPU: block_q a multiple of 8,
        block_k a multiple of 128.

    Returns:
      ``out [B, T, N, V]`` in q's dtype.

    Raises:
      NotImplementedError: with :func:`unsupported_reason`'s reason when no kernel can run it.
    """
    name = "pallas_attention"
    q, k, v, lengths, scale = _check_call(name, q, k, v, key_value_seq_lengths, scale)
    is_causal = bool(is_causal)
    reason, chosen = _pallas_plan(
        name, dims=_check_shapes(name, q.shape, k.shape, v.shape), dtype=q.dtype,
        has_mask=False, has_bias=False, is_causal=is_causal, has_lengths=lengths is not None,
        dropout=0.0, want_weights=False, backend=backend, device=None,
        interpret=bool(interpret), variant=variant,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"{name}: {reason}")
    call = dict(is_causal=is_causal, scale=scale, block_q=block_q, block_k=block_k)
    if chosen == "triton":
        out = _triton_attention(name, q, k, v, lengths, interpret=bool(interpret), **call)
    elif chosen == "mgpu":
        out = _mgpu_attention(name, q, k, v, **call)
    else:
        out = _tpu_attention(name, q, k, v, lengths, interpret=bool(interpret), **call)
    return _zero_empty_rows(out, None, lengths, is_causal=is_causal)


def _triton_needs_column(T, S, has_lengths):
    """Whether padded / length-masked keys need the mask column (see pallas_attention)."""
    return has_lengths or T > S


def _triton_head_dim(H, V, column):
    """D: one head dim for q, k, v (plus the mask column), at least Triton's 16."""
    return max(max(H, V) + int(column), _TRITON_MIN_BLOCK)


def _triton_attention(name, q, k, v, lengths, *, is_causal, scale, interpret, block_q, block_k):
    """``ops/gpu/attention.py: mha`` on T, S padded to L and head dims padded to D."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    B, T, N, H = q.shape
    S, V = k.shape[1], v.shape[-1]
    column = _triton_needs_column(T, S, lengths is not None)
    D = _triton_head_dim(H, V, column)
    # Blocks of 128 rows up to 256 bytes a row (jax's default, for 16-bit D <= 128); 64
    # above, so the q, k, v tiles (k, v double-buffered) fit in shared memory.
    default = 128 if _next_pow2(D) * q.dtype.itemsize <= 256 else 64
    bq = _pow2_block(name, "block_q", block_q, default)
    bk = _pow2_block(name, "block_k", block_k, default)
    cap = max(_TRITON_MIN_BLOCK, _next_pow2(max(T, S)))  # no block longer than needed
    bq, bk = min(bq, cap), min(bk, cap)
    L = _round_up(max(T, S), max(bq, bk))
    bb = min(_TRITON_BWD_BLOCK, bq, bk)
    blocks = triton_attention.BlockSizes(
        block_q=bq, block_k=bk, block_q_dkv=bb, block_kv_dkv=bb, block_q_dq=bb, block_kv_dq=bb
    )
    Dm = D - int(column)
    qp = _pad_to(q, {1: L, 3: Dm})  # [B, L, N, Dm]
    kp = _pad_to(k, {1: L, 3: Dm})  # [B, L, N, Dm]
    vp = _pad_to(v, {1: L, 3: D})  # [B, L, N, D]
    segment_ids = None
    if column:
        keys_ok = _keys_ok(B, L, S, lengths)  # [B, L]
        c, neg = _mask_column_values(q.dtype, scale)
        q_col = jnp.full((B, L, N, 1), c, q.dtype)
        k_col = jnp.where(keys_ok, jnp.zeros((), k.dtype), jnp.asarray(neg, k.dtype))
        k_col = jnp.broadcast_to(k_col[:, :, None, None], (B, L, N, 1))
        qp = jnp.concatenate([qp, q_col], axis=-1)  # [B, L, N, D]; logit += c * neg
        kp = jnp.concatenate([kp, k_col], axis=-1)  # [B, L, N, D]
    elif L > S and not is_causal:  # T <= S here: query rows t < T read segment id 1
        segment_ids = _keys_ok(B, L, S, None).astype(jnp.int32)  # [B, L]
    # (causal with T <= S: padded keys s >= S > t are masked by causality already)
    out = triton_attention.mha(
        qp, kp, vp, segment_ids, sm_scale=scale, causal=is_causal, block_sizes=blocks,
        interpret=interpret,
    )  # fmt: skip  # [B, L, N, D]
    return out[:, :T, :, :V]


def _mask_column_values(dtype, scale):
    """(c, neg) with scale * c * neg <= -1e4, both finite in ``dtype``: masked logits end up
    >= 1e4 below the row's real ones (exp underflows to exactly 0), but stay finite so a
    fully masked row gives no NaN (its output is zeroed afterwards)."""
    need = 1e4 / scale
    cap = 2.0**14 if jnp.dtype(dtype) == _F16 else 2.0**60
    if need <= cap:
        return 1.0, -float(need)
    return min(2.0 ** math.ceil(math.log2(need / cap)), cap), -cap


def _mgpu_blocks(H, block_q, block_k):
    """(block_q, block_kv, S multiple) for the Mosaic GPU kernel (its tests' configs: two
    backward compute warpgroups up to H = 128, one above; smaller kv blocks for H > 128 to
    fit shared memory)."""
    bq = _MGPU_BLOCK if block_q is None else block_q
    bkv = (128 if H <= 128 else _MGPU_BLOCK) if block_k is None else block_k
    wgs = 2 if H <= 128 else 1
    return bq, bkv, math.lcm(bkv, _MGPU_BLOCK * wgs)


def _mgpu_attention(name, q, k, v, *, is_causal, scale, block_q, block_k):
    """``ops/gpu/attention_mgpu.py: attention`` (non-causal, float16, S a block multiple)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    del is_causal  # refused by _mgpu_reason (no causal backward)
    T, H = q.shape[1], q.shape[3]
    S = k.shape[1]
    for nm, b in (("block_q", block_q), ("block_k", block_k)):
        if b is not None and (b <= 0 or b % _MGPU_BLOCK):
            raise ValueError(f"{name}: {nm} must be a multiple of {_MGPU_BLOCK}, got {b}")
    bq, bkv, s_multiple = _mgpu_blocks(H, block_q, block_k)
    if S % s_multiple or S < 2 * bkv:
        raise ValueError(
            f"{name}: variant='mgpu' with block_k={bkv} needs S a multiple of {s_multiple} "
            f"and >= {2 * bkv}, got S={S}"
        )
    wgs = 2 if H <= 128 else 1
    config = attention_mgpu.TuningConfig(
        block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=False, compute_wgs_bwd=wgs,
        block_q_dkv=_MGPU_BLOCK, block_kv_dkv=_MGPU_BLOCK, block_q_dq=_MGPU_BLOCK,
        block_kv_dq=_MGPU_BLOCK,
    )  # fmt: skip
    Lq = _round_up(T, math.lcm(2 * bq, _MGPU_BLOCK * wgs))  # two compute warpgroups per tile
    qs = _pad_to((q.astype(_F32) * scale).astype(q.dtype), {1: Lq})  # [B, Lq, N, H]
    out = attention_mgpu.attention(qs, k, v, config)  # [B, Lq, N, H]
    return out[:, :T]


def _tpu_attention(name, q, k, v, lengths, *, is_causal, scale, interpret, block_q, block_k):
    """``ops/tpu/flash_attention.py: flash_attention`` in its ``[B, N, T, H]`` layout."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    B, T, _, H = q.shape
    S, V = k.shape[1], v.shape[-1]
    D = max(H, V)
    bq = _TPU_LANES if block_q is None else block_q
    bk = _TPU_LANES if block_k is None else block_k
    if bq <= 0 or bq % _TPU_SUBLANES:
        raise ValueError(f"{name}: block_q must be a multiple of {_TPU_SUBLANES}, got {bq}")
    if bk <= 0 or bk % _TPU_LANES:
        raise ValueError(f"{name}: block_k must be a multiple of {_TPU_LANES}, got {bk}")
    if T <= bq:  # one query block spanning the whole (unpadded) T
        bq, Lq = T, T
    else:
        Lq = _round_up(T, bq)
    Lk = _round_up(S, _TPU_LANES)
    if Lk <= bk:
        bk = Lk
    else:
        Lk = _round_up(S, bk)
    blocks = tpu_flash.BlockSizes(
        block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
        block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
        block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq,
    )  # fmt: skip
    segment_ids = None
    if lengths is not None or (Lk > S and not (is_causal and T <= S)):
        segment_ids = tpu_flash.SegmentIds(
            q=jnp.ones((B, Lq), jnp.int32),  # [B, Lq]
            kv=_keys_ok(B, Lk, S, lengths).astype(jnp.int32),  # [B, Lk]
        )
    qt = _pad_to(jnp.swapaxes(q, 1, 2), {2: Lq, 3: D})  # [B, N, Lq, D]
    kt = _pad_to(jnp.swapaxes(k, 1, 2), {2: Lk, 3: D})  # [B, N, Lk, D]
    vt = _pad_to(jnp.swapaxes(v, 1, 2), {2: Lk, 3: D})  # [B, N, Lk, D]
    call = functools.partial(_tpu_flash_call, causal=is_causal, sm_scale=scale, block_sizes=blocks)
    if interpret:
        out = _tpu_interpreted(call, qt, kt, vt, segment_ids)
    else:
        out = call(qt, kt, vt, segment_ids)  # [B, N, Lq, D]
    return jnp.swapaxes(out[:, :, :T, :V], 1, 2)  # [B, T, N, V]


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


def _keys_ok(B, L, S, lengths):
    """bool ``[B, L]``: key s is real (s < S) and within its row's length."""
    ok = jnp.arange(L) < S  # [L]
    if lengths is None:
        return jnp.broadcast_to(ok[None, :], (B, L))
    return ok[None, :] & (jnp.arange(L)[None, :] < lengths[:, None])  # [B, L]


def _pad_to(x, sizes):
    """Zero-pad ``x`` at the end of each axis in ``sizes`` ({axis: new length})."""
    widths = [(0, sizes.get(a, n) - n) for a, n in enumerate(x.shape)]
    if not any(hi for _, hi in widths):
        return x
    return jnp.pad(x, widths)


def _round_up(n, m):
    return -(-n // m) * m


def _next_pow2(n):
    return 1 << (int(n) - 1).bit_length()


def _pow2_block(name, nm, block, default):
    if block is None:
        return default
    if block < _TRITON_MIN_BLOCK or block & (block - 1):
        raise ValueError(
            f"{name}: {nm} for the Triton kernel must be a power of two >= "
            f"{_TRITON_MIN_BLOCK}, got {block}"
        )
    return block


def _check_call(name, q, k, v, lengths, scale):
    """Arrays in, (q, k, v, lengths int32 [B] | None, scale float) out, or a clear error."""
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    if not (q.ndim == k.ndim == v.ndim == 4):
        raise ValueError(
            f"{name}: expected q [B, T, N, H], k [B, S, N, H], v [B, S, N, V], got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    _check_shapes(name, q.shape, k.shape, v.shape)
    for nm, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: {nm} must be a floating-point array, got dtype {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{name}: q, k and v need one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if isinstance(scale, jax.core.Tracer) or not isinstance(scale, (int, float, np.floating)):
        raise TypeError(
            f"{name}: scale must be a Python float (the kernels take it as a static "
            f"parameter), got {type(scale).__name__}"
        )
    scale = float(scale)
    if not scale > 0:
        raise ValueError(f"{name}: scale must be > 0, got {scale}")
    if lengths is not None:
        lengths = jnp.asarray(lengths)
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(
                f"{name}: key_value_seq_lengths must be an integer array, got dtype {lengths.dtype}"
            )
        if lengths.shape != (q.shape[0],):
            raise ValueError(
                f"{name}: key_value_seq_lengths must be [B] = ({q.shape[0]},), got {lengths.shape}"
            )
        lengths = lengths.astype(jnp.int32)
    return q, k, v, lengths, scale


def _check_4d(name, nm, x, target, legend, *, kind):
    """``x`` broadcastable to ``target`` = [B, N, T, S], returned 4-D (leading 1s added)."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if kind == "bool" and x.dtype != jnp.bool_:
        raise TypeError(f"{name}: {nm} must be bool (True = attend), got dtype {x.dtype}")
    if kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: {nm} must be a floating-point array, got dtype {x.dtype}")
    ok = x.ndim <= 4 and all(s in (1, t) for s, t in zip(x.shape[::-1], target[::-1], strict=False))
    if not ok:
        raise ValueError(
            f"{name}: {nm} of shape {x.shape} is not broadcastable to {legend} = {target}"
        )
    return x.reshape((1,) * (4 - x.ndim) + x.shape)
