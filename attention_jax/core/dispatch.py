"""Which implementation runs an attention call: the one place that decides.

:func:`resolve_implementation` is what :func:`attention_jax.core.attention.dot_product_attention`
asks. It validates an explicit ``implementation=`` (a ValueError says why it cannot run the
call) and picks one for ``None`` / ``'auto'`` (:func:`choose_implementation`):

* ``None``: the fastest path that serves **every** transform, mesh and dtype: never a fused
  kernel nor the reverse-only ``'blockwise'``; ``'xla'`` for short sequences (on CPU while
  a head's float32 scores fit 512 KiB, i.e. T·S <= 131072), else ``'blockwise_autodiff'``.
* ``'auto'``: the fastest path, which may be reverse-only: a fused kernel on GPU/TPU when
  one accepts the call (GPU order: :data:`GPU_KERNEL_PREFERENCE`), else ``'blockwise'`` for
  long sequences, ``'xla'`` for short ones. For training steps, which only take ``grad``.
* Either: ``'xla'`` when the caller wants the weights or uses an argument only the dense
  path takes (flax's einsum overrides, ``einsum_dot_general``, a traced ``scale``).

The thresholds and the preference order come from measurements (BUILD_NOTES.md, "Long
context and fast attention" and "A new user's first day", Measurements).

What the fused kernels accept is decided here too, from the jax sources (paths relative
to the installed ``jax``): ``_src/nn/functions.py`` (``dot_product_attention``),
``_src/cudnn/fused_attention_stablehlo.py`` (``check_layout``, ``check_is_flash_attention``,
``combine_bias_and_mask``) and the Pallas kernel files named in
:mod:`attention_jax.core.kernels`; each check names its source.
:func:`unsupported_reason` says why a kernel cannot run a call (None when it can),
:func:`pallas_variant` which Pallas kernel runs, :func:`device_kind` what is known of the
device (it works on a CPU-only host, and a :class:`DeviceKind` can describe another
machine). Legend as in :mod:`attention_jax.core`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from attention_jax.core._checks import check_qkv_shapes

Implementation = Literal["xla", "blockwise", "blockwise_autodiff", "cudnn", "pallas", "auto"]
IMPLEMENTATIONS: tuple[str, ...] = (
    "xla", "blockwise", "blockwise_autodiff", "cudnn", "pallas", "auto"
)  # fmt: skip
PALLAS_VARIANTS: tuple[str, ...] = ("triton", "mgpu", "tpu")
# Order of preference among the fused kernels on GPU (measured on an H200, BUILD_NOTES.md).
GPU_KERNEL_PREFERENCE = ("cudnn", "pallas")
# Arguments only the dense 'xla' path takes (names as the error messages give them).
DENSE_ONLY = (
    "qk_attn_weights_einsum/attn_weights_value_einsum",
    "einsum_dot_general",
    "a traced scale",
)
# On CPU, blockwise beats one dense XLA computation once a head's float32 scores outgrow the
# cache (BUILD_NOTES.md: T = 128 and 256 dense wins, 512 and up blockwise wins).
_CPU_BLOCKWISE_MIN_SCORE_BYTES = 1 << 19
# On accelerators without a usable fused kernel, dense attention until all heads' float32
# scores would take this much memory.
_DENSE_MAX_SCORE_BYTES = 1 << 30


# --------------------------------------------------------------------------------------
# The policy.
# --------------------------------------------------------------------------------------


def resolve_implementation(name: str, implementation, *, features=(), **call) -> str:
    """The implementation that runs this call; an explicit one that cannot gets a ValueError.

    Args:
      name: the calling function, for messages.
      implementation: one of :data:`IMPLEMENTATIONS` or None.
      features: the arguments this call uses that only some implementations take (the
        fused kernels none of them; blockwise not those in :data:`DENSE_ONLY`).
      **call: q_shape, k_shape, v_shape, dtype, has_mask, has_bias, is_causal, has_lengths,
        dropout, want_weights, has_segment_ids: what :func:`unsupported_reason` takes.
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"{name}: implementation must be one of {IMPLEMENTATIONS} or None, "
            f"got {implementation!r}"
        )
    features = tuple(features)
    dense_only = tuple(f for f in features if f in DENSE_ONLY)
    if implementation == "xla":
        return "xla"
    if implementation in ("blockwise", "blockwise_autodiff"):
        if dense_only:
            raise ValueError(
                f"{name}: implementation={implementation!r} cannot take "
                f"{', '.join(dense_only)}; use implementation='xla'"
            )
        return implementation
    if implementation in ("cudnn", "pallas"):
        reason = None
        if features:
            reason = (
                f"the fused kernels cannot take {', '.join(features)}; use "
                "implementation='xla' or 'blockwise'"
            )
        reason = reason or unsupported_reason(implementation, **call)
        if reason is not None:
            raise ValueError(f"{name}: implementation={implementation!r} cannot run here: {reason}")
        return implementation
    (T, N, _), S = call["q_shape"][-3:], call["k_shape"][-3]
    backend = jax.default_backend()
    reasons = {}
    # None serves every transform, so never a kernel (their custom VJPs have no forward
    # mode); 'auto' may pick one, and the VJP-only 'blockwise'.
    if implementation == "auto" and backend in ("gpu", "tpu") and not call["want_weights"]:
        reasons = {nm: unsupported_reason(nm, **call) for nm in ("cudnn", "pallas")}
        if features:
            reasons = dict.fromkeys(reasons, "argument")
    G = math.prod(call["q_shape"][:-3]) * N
    return choose_implementation(backend=backend, T=T, S=S, num_heads=G,
                                 want_weights=call["want_weights"] or bool(dense_only),
                                 kernel_reasons=reasons,
                                 forward_mode=implementation is None)  # fmt: skip


def choose_implementation(*, backend: str, T: int, S: int, num_heads: int, want_weights: bool,
                          kernel_reasons: dict[str, str | None],
                          forward_mode: bool = False) -> str:  # fmt: skip
    """The implementation ``None`` / ``'auto'`` runs.

    Args:
      backend: ``jax.default_backend()``.
      T, S: query and key lengths; num_heads: batch × heads (G).
      want_weights: the caller needs the ``[T, S]`` weights (then the dense ``'xla'``, which
        forms them anyway).
      kernel_reasons: for ``'cudnn'`` and ``'pallas'``, None if the kernel can run this call,
        else why not (:func:`unsupported_reason`); empty for ``None``, which never picks a
        kernel.
      forward_mode: the pick must serve every transform, forward mode included (``None``):
        ``'blockwise_autodiff'`` instead of the reverse-only ``'blockwise'``.
    """
    if want_weights:
        return "xla"
    if backend == "gpu":
        for name in GPU_KERNEL_PREFERENCE:
            if kernel_reasons.get(name, "") is None:
                return name
    if backend == "tpu" and kernel_reasons.get("pallas", "") is None:
        return "pallas"
    tiled = "blockwise_autodiff" if forward_mode else "blockwise"
    if backend == "cpu":
        return tiled if T * S * 4 > _CPU_BLOCKWISE_MIN_SCORE_BYTES else "xla"
    return tiled if num_heads * T * S * 4 > _DENSE_MAX_SCORE_BYTES else "xla"


# --------------------------------------------------------------------------------------
# What the fused kernels accept: their limits.
# --------------------------------------------------------------------------------------

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
TRITON_MIN_BLOCK = 16
_TRITON_MAX_HEAD_TILE = 256  # head dim is padded to a power of two and kept in one tile

# Mosaic GPU kernel (ops/gpu/attention_mgpu.py): blocks are multiples of 64 (TuningConfig),
# head dim a multiple of 64, float16 only (its shared-memory buffers are declared float16:
# bfloat16 inputs fail to trace with "Mixed input dtypes ... lhs=bfloat16, rhs=float16").
MGPU_BLOCK = 64

# Pallas TPU kernel (ops/tpu/flash_attention.py): kv blocks are multiples of 128 lanes
# (MIN_BLOCK_SIZE; the backward tiles m and l by block_k // 128).
_TPU_DTYPES = (_BF16, _F32)
TPU_LANES = 128


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
    has_segment_ids: bool = False,
) -> str | None:
    """None when ``implementation`` can run this call, else a short human reason.

    Args:
      implementation: ``'cudnn'`` or ``'pallas'``.
      q_shape, k_shape, v_shape: ``[..., T, N, H]``, ``[..., S, K, H]``, ``[..., S, K, Hv]``
        (any batch dims, the same for all three; K = N or a divisor of it: grouped-query
        heads, which cuDNN takes natively and the Pallas wrapper by repeating k and v).
      dtype: the dtype the kernel would run in (q, k and v share it).
      has_mask, has_bias, is_causal, has_lengths: which of mask, bias, ``is_causal`` and
        ``key_value_seq_lengths`` the call uses.
      dropout: the attention dropout rate (0.0 = none).
      want_weights: whether the caller needs the ``[..., N, T, S]`` weights.
      has_segment_ids: whether the call gives segment ids (packed rows): the Pallas TPU
        kernel takes them, cuDNN as a mask (so as ``has_mask``), the Pallas GPU kernels not.
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
    dims = _dims(name, q_shape, k_shape, v_shape)
    dtype = jnp.dtype(dtype)
    common = dict(
        dims=dims, dtype=dtype, has_mask=bool(has_mask), has_bias=bool(has_bias),
        is_causal=bool(is_causal), has_lengths=bool(has_lengths), dropout=float(dropout),
        want_weights=bool(want_weights), has_segment_ids=bool(has_segment_ids),
    )  # fmt: skip
    if implementation == "cudnn":
        if interpret or variant is not None:
            raise ValueError(f"{name}: interpret= and variant= are for 'pallas' only")
        platform, device, detected = _resolve_device(name, backend, device_kind)
        return _cudnn_reason(platform=platform, device=device, detected=detected, **common)
    reason, _ = pallas_plan(
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
    :func:`attention_jax.core.kernels.pallas_attention` with ``variant=None`` runs for this
    call; raises NotImplementedError with the reason when none can."""
    name = "pallas_variant"
    reason, chosen = pallas_plan(
        name, dims=_dims(name, q_shape, k_shape, v_shape), dtype=jnp.dtype(dtype),
        has_mask=False, has_bias=False, is_causal=bool(is_causal),
        has_lengths=bool(has_lengths), dropout=0.0, want_weights=False, backend=backend,
        device=device_kind, interpret=interpret, variant=None, has_segment_ids=False,
    )  # fmt: skip
    if reason is not None:
        raise NotImplementedError(f"{name}: {reason}")
    return chosen


def _dims(name, q_shape, k_shape, v_shape):
    """(T, S, N, H, Hv) from ``[..., T, N, H]``, ``[..., S, K, H]``, ``[..., S, K, Hv]``
    (K only has to divide N: no kernel limit here depends on it)."""
    q_shape, k_shape, v_shape = (tuple(int(d) for d in s) for s in (q_shape, k_shape, v_shape))
    check_qkv_shapes(name, q_shape, k_shape, v_shape, names=("q", "k", "v"))
    (T, N, H), S, Hv = q_shape[-3:], k_shape[-3], v_shape[-1]
    return T, S, N, H, Hv


def _cudnn_reason(*, dims, dtype, has_mask, has_bias, is_causal, has_lengths, dropout,
                  want_weights, platform, device, detected, has_segment_ids):  # fmt: skip
    del is_causal, has_lengths  # cuDNN takes both (MaskType.CAUSAL / PADDING[_CAUSAL]).
    # jax.nn.dot_product_attention takes no segment ids: they reach cuDNN as a mask.
    has_mask = has_mask or has_segment_ids
    T, S, _, H, Hv = dims
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
    if Hv != H:  # dot_product_attention checks value [B, S, K, H]
        return (
            "cudnn (through jax.nn.dot_product_attention) needs the value head dim Hv equal "
            f"to H, got H={H}, Hv={Hv}"
        )
    hopper = cc is not None and cc >= (9, 0)
    h_max = _CUDNN_MAX_H_HOPPER if hopper else _CUDNN_MAX_H
    if H > h_max or H % 8:  # check_is_flash_attention
        where = "" if hopper else " (256 on compute capability >= 9.0)"
        return f"cudnn needs head dim H <= {h_max}{where} and a multiple of 8, got H={H}"
    if (has_mask or has_bias) and (T % 2 or S % 2):
        # combine_bias_and_mask turns a mask into a bias; check_is_flash_attention then
        # refuses odd lengths in training (the backward pass).
        what = "segment ids (a mask there)" if has_segment_ids else "a mask or bias"
        return f"cudnn with {what} needs even T and S, got T={T}, S={S}"
    return None


def pallas_plan(name, *, dims, dtype, has_mask, has_bias, is_causal, has_lengths, dropout,
                want_weights, backend, device, interpret, variant,
                has_segment_ids=False):  # fmt: skip
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
    T, S, _, H, Hv = dims
    if platform == "tpu":
        if variant not in (None, "tpu"):
            raise ValueError(f"{name}: variant={variant!r} is a GPU kernel but the backend is tpu")
        return _tpu_reason(T, S, H, Hv, dtype), "tpu"
    if variant == "tpu":
        raise ValueError(f"{name}: variant='tpu' is the TPU kernel but the backend is gpu")
    if has_segment_ids:  # ops/gpu/attention.py: mha reads one segment_ids for q and kv
        return (
            "the pallas GPU kernels take no query and key segment ids (Triton's one "
            "segment_ids array serves both, Mosaic GPU has none); use 'cudnn', 'blockwise' "
            "or 'xla'",
            "triton",
        )
    if variant in (None, "mgpu"):
        reason = _mgpu_reason(T, S, H, Hv, dtype, device, interpret, is_causal, has_lengths)
        if reason is None or variant == "mgpu":
            return reason, "mgpu"
    return _triton_reason(T, S, H, Hv, dtype, device, interpret, has_lengths), "triton"


def _triton_reason(T, S, H, Hv, dtype, device, interpret, has_lengths):
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
    Hp = triton_head_dim(H, Hv, triton_needs_column(T, S, has_lengths))
    if next_pow2(Hp) > _TRITON_MAX_HEAD_TILE:
        return (
            f"head dim too large for the pallas Triton kernel: it keeps a whole head "
            f"(H={H}, Hv={Hv} -> {next_pow2(Hp)}) in one tile, max {_TRITON_MAX_HEAD_TILE}"
        )
    return None


def _mgpu_reason(T, S, H, Hv, dtype, device, interpret, is_causal, has_lengths):
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
    if Hv != H or H % 64 or H > 256:
        return (
            f"the Mosaic GPU kernel needs Hv == H, a multiple of 64 and <= 256, got H={H}, Hv={Hv}"
        )
    if is_causal:
        return (
            "the Mosaic GPU kernel has no causal backward pass (jax raises "
            "NotImplementedError); use variant='triton'"
        )
    if has_lengths:
        return "the Mosaic GPU kernel cannot mask keys, so no key_value_seq_lengths"
    _, block_kv, s_multiple = mgpu_blocks(H, None, None)
    if S % s_multiple or S < 2 * block_kv:
        return (
            f"the Mosaic GPU kernel cannot mask padded keys, so S must be a multiple of "
            f"{s_multiple} and >= {2 * block_kv}, got S={S}"
        )
    return None


def _tpu_reason(T, S, H, Hv, dtype):
    del T, S  # both padded to block multiples here
    if dtype not in _TPU_DTYPES:
        return f"the pallas TPU flash kernel needs bfloat16 or float32 inputs, got {dtype}"
    Hp = max(H, Hv)
    if Hp > TPU_LANES and Hp % TPU_LANES:
        return (
            f"the pallas TPU flash kernel needs head dims <= {TPU_LANES} or a multiple of "
            f"{TPU_LANES}, got H={H}, Hv={Hv}"
        )
    return None


# --------------------------------------------------------------------------------------
# Kernel geometry: shared by the checks above and the wrappers in kernels.py.
# --------------------------------------------------------------------------------------


def triton_needs_column(T, S, has_lengths):
    """Whether padded / length-masked keys need the mask column (see pallas_attention)."""
    return has_lengths or T > S


def triton_head_dim(H, Hv, column):
    """Hp: the one head dim the Triton kernel takes for q, k and v (max(H, Hv) plus the mask
    column), at least Triton's 16."""
    return max(max(H, Hv) + int(column), TRITON_MIN_BLOCK)


def mgpu_blocks(H, block_q, block_k):
    """(block_q, block_kv, S multiple) for the Mosaic GPU kernel (its tests' configs: two
    backward compute warpgroups up to H = 128, one above; smaller kv blocks for H > 128 to
    fit shared memory)."""
    bq = MGPU_BLOCK if block_q is None else block_q
    bkv = (128 if H <= 128 else MGPU_BLOCK) if block_k is None else block_k
    wgs = 2 if H <= 128 else 1
    return bq, bkv, math.lcm(bkv, MGPU_BLOCK * wgs)


def next_pow2(n):
    return 1 << (int(n) - 1).bit_length()
