"""The arguments dot_product_attention shares with jax.nn and flax, and its numerics.

References: ``jax.nn.dot_product_attention`` and ``flax.linen.dot_product_attention``
(independent implementations) and float64 NumPy / jnp. Tolerances (relative error
max|a - e| / max|e|): float32 1e-5 for values, 5e-5 for gradients; bfloat16 as stated.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import attention_f64, rel_err

import attention_jax as aj
from attention_jax.core import blockwise as bw
from attention_jax.core import dispatch

TOL, GRAD_TOL = 1e-5, 5e-5
CPU_IMPLS = ["xla", "blockwise", "blockwise_autodiff"]
B, T, S, N, H = 2, 24, 40, 2, 8
BLOCKS = dict(query_block=8, key_block=16)


def _qkv(T=T, S=S, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    shapes = ((B, T, N, H), (B, S, N, H), (B, S, N, H))
    return tuple(jnp.asarray(r.standard_normal(s), dtype) for s in shapes)


def _grads(f, q, k, v):
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), jnp.float32)
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * cot), argnums=(0, 1, 2))(q, k, v)


# ---- Flax's mask and dtype rules. ---------------------------------------------------


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_non_bool_masks_mean_nonzero_attends(impl):
    q, k, v = _qkv()
    r = np.random.default_rng(1)
    keep = r.random((B, 1, T, S)) > 0.4
    keep[0, 0, 5] = False  # a query that sees no key: 0 here (flax would average)
    ref = attention_f64(q, k, v, mask=keep)[0]
    for mask in (keep.astype(np.float32), keep.astype(np.int32) * 7,
                 np.where(keep, np.nan, 0.0).astype(np.float32)):  # fmt: skip  # NaN != 0
        out = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        assert rel_err(out, ref) <= TOL


def test_flax_function_semantics_dtype_inference_and_deterministic_default():
    """Positional call with flax's argument order; dtype=None promotes (bf16 query with f32
    key and value computes in f32, as flax); deterministic defaults to False."""
    q, k, v = _qkv()
    qb = q.astype(jnp.bfloat16)
    ours = aj.dot_product_attention(qb, k, v, None, None, True, None, 0.0, False, None)
    theirs = nn.dot_product_attention(qb, k, v, None, None, True, None, 0.0, False, None)
    assert ours.dtype == theirs.dtype == jnp.float32
    assert rel_err(ours, theirs) <= TOL
    # force_fp32_for_softmax: our softmax is always float32, so it changes nothing.
    flag = aj.dot_product_attention(q, k, v, force_fp32_for_softmax=True)
    np.testing.assert_array_equal(flag, aj.dot_product_attention(q, k, v))
    # deterministic=False by default: a rate without an rng is an error, not silently off.
    with pytest.raises(ValueError, match="needs a dropout_rng"):
        aj.dot_product_attention(q, k, v, dropout_rate=0.5)


def test_flax_einsum_overrides_and_dot_general_are_called_and_agree_with_flax():
    q, k, v = _qkv()
    mask = nn.make_causal_mask(jnp.ones((B, T)))[..., :S]  # float32 [B, 1, T, T<S]
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, S - T)))
    calls = []

    def einsum(subscripts, a, b):
        calls.append(subscripts)
        return jnp.einsum(subscripts, a, b)

    kw = dict(qk_attn_weights_einsum=einsum, attn_weights_value_einsum=einsum)
    ours = aj.dot_product_attention(q, k, v, mask=mask, **kw)
    assert calls == ["...qhd,...khd->...hqk", "...hqk,...khd->...qhd"]
    theirs = nn.dot_product_attention(q, k, v, mask=mask, **kw)
    assert rel_err(ours, theirs) <= TOL
    used = []

    def dot_general(*args, **kwargs):
        used.append(1)
        return jax.lax.dot_general(*args, **kwargs)

    ours = aj.dot_product_attention(q, k, v, einsum_dot_general=dot_general)
    assert used and rel_err(ours, nn.dot_product_attention(q, k, v)) <= TOL


# ---- jax.nn's arguments. --------------------------------------------------------------


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_scale_lengths_window_and_residual_equal_jax_nn(impl):
    """scale, query_seq_lengths, key_value_seq_lengths, local_window_size (int and pair,
    with and without is_causal) and return_residual, values and gradients, against
    jax.nn.dot_product_attention with the same arguments."""
    q, k, v = _qkv(T=S)  # self-attention shapes (jax.nn's window assumes T, S positions)
    # Every query sees a key (else jax.nn averages and we give 0: the documented difference).
    q_len, kv_len = jnp.array([S, 29], jnp.int32), jnp.array([38, S], jnp.int32)
    for kw in (
        dict(scale=0.3, query_seq_lengths=q_len, key_value_seq_lengths=kv_len),
        dict(local_window_size=3, key_value_seq_lengths=kv_len),
        dict(local_window_size=(5, 0), is_causal=True, query_seq_lengths=q_len),
    ):

        def ours(q, k, v, kw=kw):
            return aj.dot_product_attention(q, k, v, implementation=impl, **kw)

        theirs = functools.partial(jax.nn.dot_product_attention, **kw)
        out, res = aj.dot_product_attention(q, k, v, implementation=impl, return_residual=True,
                                            **kw)  # fmt: skip
        ref_out, ref_res = theirs(q, k, v, return_residual=True)
        assert rel_err(out, ref_out) <= TOL, kw
        assert res.shape == (B, S, N) and rel_err(res, ref_res) <= TOL, kw
        grads = jax.jit(functools.partial(_grads, ours))(q, k, v)
        ref_grads = jax.jit(functools.partial(_grads, theirs))(q, k, v)
        for g, g_ref in zip(grads, ref_grads, strict=True):
            assert rel_err(g, g_ref) <= GRAD_TOL, kw


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_residual_is_the_float64_logsumexp_and_has_no_gradient(impl):
    q, k, v = _qkv()
    mask = np.ones((B, 1, T, S), bool)
    mask[1, 0, 3] = False  # sees no key
    _, res = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                      return_residual=True)  # fmt: skip  # [B, T, N]
    logits = np.einsum("btnh,bsnh->bnts", *(np.asarray(x, np.float64) for x in (q, k))) / np.sqrt(H)
    lse = np.log(np.sum(np.exp(logits), -1)).transpose(0, 2, 1)  # [B, T, N]
    seen = np.ones((B, T, N), bool)
    seen[1, 3] = False
    assert rel_err(np.asarray(res)[seen], lse[seen]) <= TOL
    assert np.all(np.asarray(res)[~seen] == np.float32(aj.core.attention.NEG))  # jax.nn's value
    g = jax.grad(lambda q: jnp.sum(aj.dot_product_attention(
        q, k, v, implementation=impl, return_residual=True)[1]))(q)  # fmt: skip
    assert np.all(g == 0)  # stop_gradient, as jax.nn


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_weights_from_every_cpu_implementation_with_gradients(impl):
    """return_weights from the blockwise paths: exp(logits - lse), with the gradient of the
    normaliser (the custom VJP's lse cotangent) right."""
    q, k, v = _qkv()
    mask = np.random.default_rng(2).random((1, N, T, S)) > 0.3
    r = jnp.asarray(np.random.default_rng(3).standard_normal((B, N, T, S)), jnp.float32)

    def loss(q, k, impl):
        out, w = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl,
                                          return_weights=True)  # fmt: skip
        return jnp.sum(w * r) + jnp.sum(out)

    w = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl, return_weights=True)[1]
    assert rel_err(w, attention_f64(q, k, v, mask=mask)[1]) <= TOL
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    ours = grad(q, k, impl)
    with jax.enable_x64(True):  # float64 autodiff of the dense path as the reference
        q64, k64 = (jnp.asarray(x, jnp.float64) for x in (q, k))
        ref = grad(q64, k64, "xla")
    for g, g_ref in zip(ours, ref, strict=True):
        assert rel_err(g, g_ref) <= GRAD_TOL


def test_local_window_across_many_tiles_equals_float64(rng):
    """The window's tile bounds with 8 x 16 tiles (several blocks per head), both blockwise
    variants, values and gradients against float64 dense attention with the band mask."""
    q, k, v = (rng.standard_normal((2, 37, 8)).astype(np.float32) for _ in range(3))
    t, s = np.arange(37)[:, None], np.arange(37)[None, :]
    for left, right in ((5, 3), (20, 0)):
        band = (t <= s + left) & (t >= s - right)

        def ours(q, k, v, autodiff, left=left, right=right):
            return bw.blockwise_attention(q, k, v, scale=8**-0.5, local_window=(left, right),
                                          autodiff=autodiff, **BLOCKS)  # fmt: skip

        def ref(q, k, v, band=band):
            out = aj.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                           mask=band, implementation="xla")  # fmt: skip
            return out[:, :, 0]

        ref_out = attention_f64(q[:, :, None], k[:, :, None], v[:, :, None], mask=band)[0]
        with jax.enable_x64(True):
            ref_g = jax.jit(functools.partial(_grads3, ref))(
                *(jnp.asarray(x, jnp.float64) for x in (q, k, v))
            )
        for autodiff in (False, True):
            f = functools.partial(ours, autodiff=autodiff)
            out, grads = jax.jit(lambda *a, f=f: (f(*a), _grads3(f, *a)))(q, k, v)
            assert rel_err(out, ref_out[:, :, 0]) <= TOL, (left, right)
            for g, g_ref in zip(grads, ref_g, strict=True):
                assert rel_err(g, g_ref) <= GRAD_TOL, (left, right, autodiff)


def _grads3(f, q, k, v):
    cot = np.random.default_rng(4).standard_normal(q.shape)
    return jax.grad(lambda *a: jnp.sum(f(*a) * cot.astype(a[0].dtype)), argnums=(0, 1, 2))(q, k, v)


# ---- Numerics: bf16 gradients, no infs. -------------------------------------------------


def test_bfloat16_gradients_where_one_key_dominates_match_jax_nn():
    """Every row puts ~0.99 of its weight on key 0. Against float64 (jax.nn's formula in
    x64), bf16 gradients of 'xla' and 'blockwise_autodiff' are as accurate as jax.nn's own
    (measured: dq 0.0052, dk 0.0061 for all three; dividing after the bf16 matmul, as
    'xla' did, gave 0.022 and 0.13), 'blockwise' (FlashAttention's backward) within 2x."""
    r = np.random.default_rng(0)
    q, k, v = (r.standard_normal((B, 16, N, 16)) for _ in range(3))
    k, v = (np.concatenate([x, x], axis=1) for x in (k, v))  # S = 32
    k[:, 0] = 1.5
    q = q + 1.5
    cot = r.standard_normal(q.shape)
    with jax.enable_x64(True):
        ref = _grads_of(jax.nn.dot_product_attention, q, k, v, cot, jnp.float64)
    theirs = _grads_of(jax.nn.dot_product_attention, q, k, v, cot, jnp.bfloat16)
    for impl, factor in (("xla", 1.05), ("blockwise_autodiff", 1.05), ("blockwise", 2.0)):
        f = functools.partial(aj.dot_product_attention, implementation=impl)
        ours = _grads_of(f, q, k, v, cot, jnp.bfloat16)
        for name, a, b, c in zip("qkv", ours, theirs, ref, strict=True):
            assert rel_err(a, c) <= factor * rel_err(b, c) + 1e-3, (impl, name)
            assert rel_err(a, c) <= 0.02, (impl, name)


def _grads_of(f, q, k, v, cot, dtype):
    args = tuple(jnp.asarray(x, dtype) for x in (q, k, v))
    loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float64 if dtype == jnp.float64  # noqa: E731
                                                      else jnp.float32) * cot)  # fmt: skip
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_masked_inputs_produce_no_inf_under_debug_infs(impl):
    """Masked logits get a finite large negative, never -inf: jax.debug_infs stays quiet in
    the forward and backward passes, fully masked rows included."""
    q, k, v = _qkv()
    mask = np.random.default_rng(5).random((B, 1, T, S)) > 0.5
    mask[0, 0, 2] = False
    lengths = jnp.array([S, 7], jnp.int32)

    def loss(q, k, v):
        out = aj.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl,
                                       key_value_seq_lengths=lengths)  # fmt: skip
        return jnp.sum(out**2)

    with jax.debug_infs(True):
        val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    assert np.isfinite(val) and all(np.all(np.isfinite(g)) for g in grads)


# ---- Dispatch: what None and 'auto' may pick, what the kernels refuse. -----------------


def _call(**kw):
    shape = (B, 4096, N, 64)
    return dict(q_shape=shape, k_shape=shape, v_shape=shape, dtype=jnp.bfloat16,
                has_mask=False, has_bias=False, is_causal=True, has_lengths=False, dropout=0.0,
                want_weights=False, **kw)  # fmt: skip


def test_none_never_picks_a_reverse_only_path_and_auto_may(monkeypatch):
    """On a GPU whose kernels accept the call: 'auto' picks a fused kernel, None (which
    must serve jvp) a path with forward mode; with an argument the kernels cannot take
    'auto' does not pick them either. On CPU None picks 'blockwise_autodiff', 'auto'
    'blockwise' (its custom VJP is faster in reverse mode)."""
    monkeypatch.setattr(dispatch, "unsupported_reason", lambda *a, **kw: None)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    resolve = functools.partial(dispatch.resolve_implementation, "dpa")
    assert resolve("auto", **_call()) in dispatch.GPU_KERNEL_PREFERENCE
    assert resolve(None, **_call()) in ("xla", "blockwise_autodiff")
    assert resolve("auto", **_call(features=["local_window_size"])) not in ("cudnn", "pallas")
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert resolve(None, **_call()) == "blockwise_autodiff"
    assert resolve("auto", **_call()) == "blockwise"
    # Arguments only the dense path takes send None and 'auto' to 'xla' at any length.
    assert resolve(None, **_call(features=["einsum_dot_general"])) == "xla"


@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
@pytest.mark.parametrize(
    "kw,arg",
    [
        (dict(local_window_size=2), "local_window_size"),
        (dict(query_seq_lengths=np.full(B, 3, np.int32)), "query_seq_lengths"),
        (dict(return_residual=True), "return_residual"),
        (dict(einsum_dot_general=jax.lax.dot_general), "einsum_dot_general"),
    ],
)
def test_fused_kernels_refuse_the_arguments_they_cannot_take(impl, kw, arg):
    q, k, v = _qkv(dtype=jnp.bfloat16)
    match = (f"implementation='{impl}' cannot run here: the fused kernels cannot take {arg}; "
             "use implementation='xla' or 'blockwise'")  # fmt: skip
    with pytest.raises(ValueError, match=match):
        aj.dot_product_attention(q, k, v, implementation=impl, **kw)
