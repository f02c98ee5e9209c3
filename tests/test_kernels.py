"""The fused-kernel wrappers of attention_jax.core.kernels, on CPU.

The Pallas kernels run in interpret mode: the GPU (Triton) kernel through Pallas'
``interpret=True``, the TPU kernel through TPU interpret mode. Each is compared, forward and
gradients of q, k, v, with the float64 NumPy attention written out below (its gradients
by hand). Tolerance: relative error <= 1e-5 in float32 (2e-3 for the one float16 case).
cuDNN and the Mosaic GPU kernel
cannot run on CPU, so only their capability logic is checked.
"""

import jax
import numpy as np
import pytest
from reference import rel_err

from attention_jax.core import dispatch, kernels

F32_TOL = 1e-5
H100 = dispatch.DeviceKind("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = dispatch.DeviceKind("gpu", "NVIDIA A100-SXM4-80GB", (8, 0))
T4 = dispatch.DeviceKind("gpu", "Tesla T4", (7, 5))


# ---- float64 reference: out and the vjp of a cotangent g. -----------------------------


def attention_vjp_f64(q, k, v, g, *, scale, is_causal=False, lengths=None):
    """q [B, T, N, H], k [B, S, N, H], v [B, S, N, V], g [B, T, N, V] -> out, (dq, dk, dv).

    Rows that see no key give 0 (and no gradient)."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
    (B, T, _, _), S = q.shape, k.shape[1]
    ok = np.ones((B, 1, T, S), bool)
    if is_causal:
        ok &= np.tril(np.ones((T, S), bool))
    if lengths is not None:
        ok &= (np.arange(S) < np.asarray(lengths)[:, None])[:, None, None, :]
    logits = np.where(ok, np.einsum("btnh,bsnh->bnts", q, k) * scale, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    e = np.where(ok, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)  # [B, N, T, S]
    out = np.einsum("bnts,bsnv->btnv", p, v)
    dv = np.einsum("bnts,btnv->bsnv", p, g)
    dp = np.einsum("btnv,bsnv->bnts", g, v)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))  # softmax backward
    dq = np.einsum("bnts,bsnh->btnh", ds, k) * scale
    dk = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    return out, (dq, dk, dv)


def test_reference_vjp_matches_jax_autodiff(rng):
    """The hand-written gradients against jax.vjp of jax.nn.dot_product_attention."""
    q, k, v, g = _inputs(rng, 2, 5, 7, 2, 4, 4)
    lengths = np.array([7, 3], np.int32)
    out, grads = attention_vjp_f64(q, k, v, g, scale=0.4, is_causal=True, lengths=lengths)

    def f(q, k, v):
        return jax.nn.dot_product_attention(
            q, k, v, scale=0.4, is_causal=True, key_value_seq_lengths=lengths
        )

    expected_out, vjp = jax.vjp(f, q, k, v)
    assert rel_err(out, expected_out) < F32_TOL
    for got, want in zip(grads, vjp(g), strict=True):
        assert rel_err(got, want) < F32_TOL


def _inputs(rng, B, T, S, N, H, V):
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, N, H)).astype(np.float32)
    v = rng.standard_normal((B, S, N, V)).astype(np.float32)
    g = rng.standard_normal((B, T, N, V)).astype(np.float32)
    return q, k, v, g


def _check_against_reference(rng, B, T, S, N, H, V, is_causal, lengths, **kernel_kw):
    q, k, v, g = _inputs(rng, B, T, S, N, H, V)
    lengths = None if lengths is None else np.asarray(lengths, np.int32)
    scale = 1.0 / np.sqrt(H)

    @jax.jit  # the lengths are traced too
    def out_and_grads(q, k, v, g, lengths):
        def f(q, k, v):
            return kernels.pallas_attention(
                q, k, v, is_causal=is_causal, key_value_seq_lengths=lengths, scale=scale,
                **kernel_kw,
            )  # fmt: skip

        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(g)

    out, grads = out_and_grads(q, k, v, g, lengths)
    want_out, want_grads = attention_vjp_f64(
        q, k, v, g, scale=scale, is_causal=is_causal, lengths=lengths
    )
    assert out.shape == (B, T, N, V) and out.dtype == np.float32
    errors = {"out": rel_err(out, want_out)}
    errors.update({nm: rel_err(a, b) for nm, a, b in zip("qkv", grads, want_grads, strict=True)})
    assert max(errors.values()) < F32_TOL, errors
    if lengths is not None and (lengths == 0).any():
        assert np.all(np.asarray(out)[lengths == 0] == 0)


# ---- Pallas GPU (Triton) kernel, interpreted. -----------------------------------------

# (B, T, S, N, H, V, is_causal, lengths): which padding / masking path each one takes.
TRITON_CASES = {
    # T = S = 32, blocks of 16: no padding, no mask.
    "plain": (2, 32, 32, 2, 16, 16, False, None),
    # T = S = 40 padded to L = 48; causality alone hides the padded keys.
    "causal_T_not_block_multiple": (1, 40, 40, 2, 32, 32, True, None),
    # T < S, S padded, no lengths: the padded keys are masked by segment_ids.
    "segment_ids_T_lt_S": (1, 20, 40, 2, 16, 16, False, None),
    # lengths (T < S, V != H): the mask column.
    "lengths": (2, 24, 40, 2, 16, 24, False, [40, 9]),
    # causal, T > S, a zero length: the mask column; the empty batch row gives 0.
    "causal_lengths_T_gt_S": (2, 40, 24, 2, 24, 24, True, [24, 0]),
}


@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_interpret_matches_reference(rng, case):
    B, T, S, N, H, V, is_causal, lengths = TRITON_CASES[case]
    _check_against_reference(
        rng, B, T, S, N, H, V, is_causal, lengths,
        interpret=True, backend="gpu", block_q=16, block_k=16,
    )  # fmt: skip


def test_triton_mask_column_in_float16_with_a_tiny_scale(rng):
    """float16 caps the column's large negative number at 2**14; with scale 1e-3 the
    query's constant then grows (c = 2**10) so masked logits still vanish."""
    q, k, v, g = _inputs(rng, 2, 24, 40, 2, 16, 16)
    lengths = np.array([40, 5], np.int32)

    def f(q, k, v):
        return kernels.pallas_attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths, scale=1e-3,
            interpret=True, backend="gpu",
        )  # fmt: skip

    half = [x.astype(np.float16) for x in (q, k, v, g)]
    out, vjp = jax.vjp(f, *half[:3])
    grads = vjp(half[3])
    want_out, want_grads = attention_vjp_f64(*half, scale=1e-3, is_causal=True, lengths=lengths)
    assert out.dtype == np.float16
    assert rel_err(out, want_out) < 2e-3  # float16 rounding of out
    for got, want in zip(grads, want_grads, strict=True):
        assert rel_err(got, want) < 2e-3


def test_triton_is_the_interpreted_gpu_variant():
    shapes = dict(q_shape=(1, 8, 2, 16), k_shape=(1, 8, 2, 16), v_shape=(1, 8, 2, 16))
    assert dispatch.pallas_variant(**shapes, dtype="float32", interpret=True, backend="gpu") == (
        "triton"
    )


# ---- Pallas TPU flash kernel, in TPU interpret mode. ----------------------------------

# (B, T, S, N, H, V, is_causal, lengths, block_q)
TPU_CASES = {
    # S = 128: one kv block, no segment ids.
    "plain_one_kv_block": (1, 32, 128, 2, 32, 32, False, None, None),
    # S = 200 padded to 256 (two kv blocks of 128), lengths as kv segment ids, V != H.
    "causal_lengths_two_kv_blocks": (2, 40, 200, 2, 32, 16, True, [200, 77], None),
    # T = 136 padded to 192 (query blocks of 64), T > S: padded keys need segment ids.
    "causal_T_gt_S_padded": (1, 136, 100, 1, 16, 16, True, None, 64),
}


@pytest.mark.parametrize("case", TPU_CASES)
def test_tpu_interpret_matches_reference(rng, case):
    B, T, S, N, H, V, is_causal, lengths, block_q = TPU_CASES[case]
    _check_against_reference(
        rng, B, T, S, N, H, V, is_causal, lengths,
        interpret=True, backend="tpu", block_q=block_q,
    )  # fmt: skip


# ---- Running where no kernel can. -----------------------------------------------------


def test_kernels_refuse_to_run_on_cpu_with_the_reason(rng):
    q, k, v, _ = _inputs(rng, 1, 8, 8, 2, 16, 16)
    with pytest.raises(NotImplementedError, match="need a GPU or TPU"):
        kernels.pallas_attention(q, k, v, scale=0.25)
    with pytest.raises(NotImplementedError, match="NVIDIA GPU"):
        kernels.cudnn_attention(q, k, v, scale=0.25)
    with pytest.raises(NotImplementedError, match="interpret mode"):
        kernels.pallas_attention(q, k, v, scale=0.25, interpret=True, backend="gpu", variant="mgpu")


def test_bad_inputs_are_named(rng):
    q, k, v, _ = _inputs(rng, 2, 8, 8, 2, 16, 16)
    kw = dict(scale=0.25, interpret=True, backend="gpu")
    with pytest.raises(TypeError, match="one dtype"):
        kernels.pallas_attention(q, k.astype(np.float16), v, **kw)
    with pytest.raises(
        ValueError, match=r"must have the batch shape \(2,\) of query \[B, T, N, H\], got \(3,\)"
    ):
        kernels.pallas_attention(q, k, v, key_value_seq_lengths=np.ones(3, np.int32), **kw)
    with pytest.raises(TypeError, match="scale must be a Python float"):
        kernels.pallas_attention(q, k, v, **{**kw, "scale": np.ones(1)})
    with pytest.raises(ValueError, match="power of two"):
        kernels.pallas_attention(q, k, v, block_q=24, **kw)
    with pytest.raises(ValueError, match="same head dim H"):
        dispatch.unsupported_reason("cudnn", q_shape=(2, 8, 2, 16), k_shape=(2, 8, 2, 8),
                                   v_shape=(2, 8, 2, 16), dtype="bfloat16")  # fmt: skip


# ---- Capability checks. ---------------------------------------------------------------


def _call(T=128, S=128, N=4, H=64, V=None, batch=(2,), dtype="bfloat16", **kw):
    shapes = dict(
        q_shape=(*batch, T, N, H), k_shape=(*batch, S, N, H), v_shape=(*batch, S, N, V or H)
    )
    return dict(shapes, dtype=dtype, **kw)


def test_device_kind_on_cpu():
    assert dispatch.device_kind() == dispatch.DeviceKind("cpu", "cpu", None)
    assert dispatch.device_kind("gpu") is None  # no GPU here: None, not an error


def test_reasons_on_this_cpu_host():
    reason = dispatch.unsupported_reason("cudnn", **_call())
    assert reason == "cudnn needs an NVIDIA GPU (the backend is cpu)"
    reason = dispatch.unsupported_reason("pallas", **_call())
    assert "pallas kernels need a GPU or TPU (the default backend is cpu)" in reason
    assert "interpret=True" in dispatch.unsupported_reason("pallas", **_call(), interpret=True)
    for backend in ("gpu", "tpu"):
        assert dispatch.unsupported_reason(
            "pallas", **_call(dtype="float32"), interpret=True, backend=backend
        ) is None  # fmt: skip


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (_call(), None),
        (_call(batch=(), T=10, S=6, is_causal=True, has_lengths=True, has_mask=True), None),
        (_call(H=256, batch=(2, 3)), None),  # Hopper allows H up to 256
        (_call(dtype="float32"), "cudnn needs bfloat16 or float16 inputs, got float32"),
        (_call(H=100), "head dim H <= 256 and a multiple of 8, got H=100"),
        (_call(H=64, V=32), "Hv equal to H, got H=64, Hv=32"),
        (_call(T=7, has_bias=True), "even T and S, got T=7, S=128"),
        (_call(dropout=0.1), "dropout is not supported by cudnn"),
        (_call(want_weights=True), "does not return the attention weights"),
        (_call(backend="tpu", device_kind=None), "cudnn needs an NVIDIA GPU (the backend is tpu)"),
    ],
)
def test_cudnn_reasons(call, expected):
    call.setdefault("backend", "gpu")
    call.setdefault("device_kind", H100)
    reason = dispatch.unsupported_reason("cudnn", **call)
    assert reason is None if expected is None else expected in reason, reason


def test_cudnn_arch_limits():
    gpu = dict(backend="gpu")
    assert dispatch.unsupported_reason("cudnn", **_call(H=256), **gpu, device_kind=A100) == (
        "cudnn needs head dim H <= 128 (256 on compute capability >= 9.0) and a multiple of "
        "8, got H=256"
    )
    assert "compute capability >= 8.0, got 7.5" in dispatch.unsupported_reason(
        "cudnn", **_call(), **gpu, device_kind=T4
    )
    rocm = dispatch.DeviceKind("gpu", "AMD Instinct MI300X", None)
    assert "NVIDIA (CUDA) GPU" in dispatch.unsupported_reason(
        "cudnn", **_call(), **gpu, device_kind=rocm
    )
    # Planning for a GPU this host lacks: no device to check, conservative head-dim limit.
    assert dispatch.unsupported_reason("cudnn", **_call(H=128), **gpu) is None
    assert "H <= 128" in dispatch.unsupported_reason("cudnn", **_call(H=256), **gpu)


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (_call(is_causal=True, has_lengths=True, T=100, S=37), None),
        (_call(dtype="float32", H=24, V=40), None),
        (_call(has_mask=True), "do not take an arbitrary mask; pass is_causal"),
        (_call(has_bias=True), "take no bias"),
        (_call(dropout=0.1), "dropout is not supported by the pallas kernels"),
        (_call(want_weights=True), "do not return the attention weights"),
        (_call(dtype="float64"), "float16, bfloat16 or float32 inputs, got float64"),
        (_call(H=512), "head dim too large for the pallas Triton kernel"),
        (_call(device_kind=T4), "compute capability >= 8.0, got 7.5"),
    ],
)
def test_pallas_gpu_reasons(call, expected):
    call.setdefault("backend", "gpu")
    call.setdefault("device_kind", A100)
    reason = dispatch.unsupported_reason("pallas", **call)
    assert reason is None if expected is None else expected in reason, reason


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (_call(dtype="float16", S=1024, H=128), None),
        (_call(dtype="bfloat16", S=1024), "needs float16 inputs"),
        (_call(dtype="float16", S=1024, is_causal=True), "no causal backward pass"),
        (_call(dtype="float16", S=1024, has_lengths=True), "no key_value_seq_lengths"),
        (_call(dtype="float16", S=1000), "S must be a multiple of 128"),
        (_call(dtype="float16", S=1024, H=96), "multiple of 64"),
        (_call(dtype="float16", S=1024, device_kind=A100), "Hopper GPU"),
    ],
)
def test_pallas_mgpu_reasons_and_automatic_choice(call, expected):
    call.setdefault("backend", "gpu")
    call.setdefault("device_kind", H100)
    reason = dispatch.unsupported_reason("pallas", **call, variant="mgpu")
    assert reason is None if expected is None else expected in reason, reason
    # variant=None takes the Mosaic GPU kernel exactly when it qualifies, else Triton.
    assert dispatch.pallas_variant(**call) == ("mgpu" if expected is None else "triton")


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (_call(dtype="float32", T=100, S=37, is_causal=True, has_lengths=True), None),
        (_call(H=256, V=128), None),
        (_call(dtype="float16"), "bfloat16 or float32 inputs, got float16"),
        (_call(H=192), "head dims <= 128 or a multiple of 128, got H=192"),
    ],
)
def test_pallas_tpu_reasons(call, expected):
    reason = dispatch.unsupported_reason("pallas", **call, backend="tpu")
    assert reason is None if expected is None else expected in reason, reason
    if expected is None:
        assert dispatch.pallas_variant(**call, backend="tpu") == "tpu"


def test_variant_must_fit_the_backend():
    with pytest.raises(ValueError, match="variant='tpu' is the TPU kernel"):
        dispatch.unsupported_reason("pallas", **_call(), backend="gpu", variant="tpu")
    with pytest.raises(ValueError, match="backend='gpu'"):
        dispatch.unsupported_reason(
            "pallas", **_call(), backend="gpu", device_kind=dispatch.DeviceKind("tpu")
        )
