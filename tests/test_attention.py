"""attention_jax's attention against independent references.

References: a float64 NumPy implementation (tests/reference.py), jax.nn.dot_product_attention,
hand-computed literals, and finite differences. Tolerances: relative error (max |a - e| /
max |e|) <= 1e-5 in float32, <= 2e-2 in bfloat16.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import attention_f64, rel_err

import attention_jax as aj
from attention_jax.core.attention import attention_weights

IMPLS = ["xla", "blockwise"]
F32_TOL = 1e-5
BF16_TOL = 2e-2


def _qkv(rng, batch, T, S, N, H, V=None, dtype=np.float32):
    V = H if V is None else V
    q = rng.standard_normal((*batch, T, N, H)).astype(dtype)
    k = rng.standard_normal((*batch, S, N, H)).astype(dtype)
    v = rng.standard_normal((*batch, S, N, V)).astype(dtype)
    return q, k, v


def _mask(kind, rng, batch, N, T, S):
    if kind is None:
        return None
    if kind == "causal":
        return np.tril(np.ones((T, S), bool))  # [T, S]
    if kind == "padding":
        lengths = rng.integers(1, S + 1, size=batch)  # keys past each length are padding
        keep = np.arange(S) < lengths[..., None]  # [*batch, S]
        return keep[..., None, None, :]  # [*batch, 1, 1, S]
    if kind == "random":  # arbitrary, per batch and head, with some fully masked rows
        m = rng.random((*batch, N, T, S)) < 0.6
        m[..., 0, :] = False
        return m
    raise ValueError(kind)


CASES = [
    # (batch, T, S, N, H, V)
    ((2,), 16, 16, 4, 8, None),  # square
    ((2,), 12, 20, 3, 8, None),  # T != S
    ((2,), 10, 14, 2, 8, 5),  # Hv != H
    ((2, 3), 9, 7, 2, 4, None),  # several leading batch dims
    ((), 6, 6, 2, 4, None),  # no batch dim
    ((1,), 300, 280, 2, 8, 6),  # several query blocks, T not a multiple of the block
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", [None, "causal", "padding", "random"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"_{c[1:]}")
def test_matches_float64_reference(impl, mask_kind, case, rng):
    batch, T, S, N, H, V = case
    q, k, v = _qkv(rng, batch, T, S, N, H, V)
    mask = _mask(mask_kind, rng, batch, N, T, S)
    ref_out, ref_w = attention_f64(q, k, v, mask=mask)
    if impl == "xla":  # the only implementation that forms the weights
        out, weights = aj.dot_product_attention(
            q, k, v, mask=mask, implementation=impl, return_weights=True
        )
        assert out.shape == ref_out.shape and out.dtype == jnp.float32
        assert weights.shape == ref_w.shape
        assert rel_err(out, ref_out) <= F32_TOL
        assert rel_err(weights, ref_w) <= F32_TOL
    # Without weights requested, every implementation gives the same values.
    plain = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    assert plain.shape == ref_out.shape and plain.dtype == jnp.float32
    assert rel_err(plain, ref_out) <= F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_bias_matches_reference(impl, rng):
    q, k, v = _qkv(rng, (2,), 11, 13, 3, 8)
    bias = rng.standard_normal((3, 11, 13)).astype(np.float32)  # per head, broadcast over batch
    mask = _mask("padding", rng, (2,), 3, 11, 13)
    out = aj.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)
    assert rel_err(out, attention_f64(q, k, v, mask=mask, bias=bias)[0]) <= F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_jax_nn(impl, causal, with_bias, rng):
    B, T, N, H = 2, 40, 4, 16
    q, k, v = _qkv(rng, (B,), T, T, N, H)
    bias = rng.standard_normal((1, N, T, T)).astype(np.float32) if with_bias else None
    mask = aj.causal_mask(T) if causal else None
    ours = aj.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)
    theirs = jax.nn.dot_product_attention(
        q, k, v, bias=bias, is_causal=causal, implementation="xla"
    )
    assert rel_err(ours, theirs) <= F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", [None, "padding", "random"])
def test_bfloat16(impl, mask_kind, rng):
    q, k, v = _qkv(rng, (2,), 24, 20, 2, 16)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    mask = _mask(mask_kind, rng, (2,), 2, 24, 20)
    out = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    assert out.dtype == jnp.bfloat16
    # Reference on the same (bf16-rounded) inputs, in float64.
    ref = attention_f64(*(np.asarray(x, np.float64) for x in (q, k, v)), mask=mask)[0]
    assert rel_err(out, ref) <= BF16_TOL


def test_bfloat16_one_head_weights_are_normalised_in_float32(rng):
    q, k, v = (jnp.asarray(rng.standard_normal((7, 8)), jnp.bfloat16) for _ in range(3))
    out, w = aj.scaled_dot_product_attention(q, k, v)
    assert out.dtype == w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(w, np.float32).sum(-1), 1.0, atol=2e-2)


# ---- The one-head function, by hand. -------------------------------------------------


def test_one_head_literal_weights_are_1_e_over_1_plus_e():
    # H = 4, so the scale is 1/2: scores (0, 2) become logits (0, 1), weights [1, e]/(1+e).
    q = jnp.array([[2.0, 0.0, 0.0, 0.0]])  # [T=1, H=4]
    k = jnp.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # [S=2, H=4]
    v = jnp.array([[1.0, 0.0, 3.0], [0.0, 1.0, 3.0]])  # [S=2, V=3]
    out, w = aj.scaled_dot_product_attention(q, k, v)
    e = math.e
    np.testing.assert_allclose(w, [[1 / (1 + e), e / (1 + e)]], rtol=1e-6)
    np.testing.assert_allclose(out, [[1 / (1 + e), e / (1 + e), 3.0]], rtol=1e-6)


def test_one_head_equal_keys_give_uniform_weights_and_mean_of_values():
    q = jnp.array([[0.3, -1.0], [5.0, 2.0]])
    k = jnp.ones((4, 2))
    v = jnp.arange(8.0).reshape(4, 2)
    out, w = aj.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(w, np.full((2, 4), 0.25), rtol=1e-6)
    np.testing.assert_allclose(out, np.tile([3.0, 4.0], (2, 1)), rtol=1e-6)


def test_one_head_masked_keys_get_exactly_zero_weight():
    q = jnp.array([[1.0, 2.0]])
    k = jnp.array([[100.0, 100.0], [0.0, 0.0], [1.0, -1.0]])  # key 0 would dominate
    v = jnp.eye(3)
    mask = jnp.array([[False, True, True]])
    out, w = aj.scaled_dot_product_attention(q, k, v, mask=mask)
    assert float(w[0, 0]) == 0.0 and float(out[0, 0]) == 0.0
    # The other two: logits 0 and (1 - 2)/√2.
    logits = np.array([0.0, -1.0 / math.sqrt(2.0)])
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(w[0, 1:], expected, rtol=1e-6)


def test_one_head_matches_multi_head_slice(rng):
    q, k, v = _qkv(rng, (2,), 9, 11, 3, 4, 6)
    out = aj.dot_product_attention(q, k, v)
    one, w = aj.scaled_dot_product_attention(q[1, :, 2], k[1, :, 2], v[1, :, 2])
    assert rel_err(one, out[1, :, 2]) <= F32_TOL
    assert rel_err(w, attention_f64(q, k, v)[1][1, 2]) <= F32_TOL


# ---- Fully masked rows: zeros, never NaN. --------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fully_masked_rows_give_zeros_and_finite_gradients(impl, with_bias, rng):
    B, T, S, N, H = 2, 6, 5, 2, 4
    q, k, v = _qkv(rng, (B,), T, S, N, H)
    mask = np.ones((B, N, T, S), bool)
    mask[0, 1, 2, :] = False  # one row of one head
    mask[1, :, :, :] = False  # a whole example
    bias = rng.standard_normal((N, T, S)).astype(np.float32) if with_bias else None

    def f(q, k, v):
        return aj.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)

    out = f(q, k, v)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 2, 1], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.all(np.isfinite(g))
    # No key is visible to example 1, so nothing flows back to its queries, keys or values.
    for g in grads:
        np.testing.assert_array_equal(g[1], 0.0)


def test_one_head_fully_masked_row_and_minus_inf_bias_are_finite():
    q, k, v = jnp.ones((3, 4)), jnp.ones((5, 4)), jnp.ones((5, 2))
    mask = jnp.ones((3, 5), bool).at[1].set(False)
    bias = jnp.zeros((3, 5)).at[2].set(-jnp.inf)  # a row fully masked by bias alone
    out, w = aj.scaled_dot_product_attention(q, k, v, mask=mask, bias=bias)
    np.testing.assert_array_equal(w[1:], 0.0)
    np.testing.assert_array_equal(out[1:], 0.0)
    g = jax.grad(lambda q: jnp.sum(aj.scaled_dot_product_attention(q, k, v, mask, bias)[0]))(q)
    assert np.all(np.isfinite(g))


# ---- attention_weights: steps 1-3 of the one head alone. -----------------------------


def _one_head_weights_f64(q, k, mask=None, bias=None):
    """float64 weights [T, S] from the multi-head reference, one batch and head."""
    v = np.zeros((k.shape[0], 1))  # the weights do not depend on v
    m = None if mask is None else np.asarray(mask)[None, None]  # [1, 1, T, S]
    b = None if bias is None else np.asarray(bias, np.float64)[None, None]
    _, w = attention_f64(q[None, :, None], k[None, :, None], v[None, :, None], m, b)
    return w[0, 0]  # [T, S]


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_attention_weights_match_float64_reference(with_mask, with_bias, rng):
    T, S, H = 7, 11, 8
    q = rng.standard_normal((T, H)).astype(np.float32)
    k = rng.standard_normal((S, H)).astype(np.float32)
    mask = rng.random((T, S)) < 0.7 if with_mask else None
    bias = rng.standard_normal((1, S)).astype(np.float32) if with_bias else None
    w = attention_weights(q, k, mask=mask, bias=bias)
    assert w.shape == (T, S) and w.dtype == jnp.float32
    assert rel_err(w, _one_head_weights_f64(q, k, mask, bias)) <= F32_TOL


def test_attention_weights_rows_sum_to_one_and_masked_entries_are_zero(rng):
    T, S, H = 6, 9, 4
    q = rng.standard_normal((T, H)).astype(np.float32)
    k = rng.standard_normal((S, H)).astype(np.float32)
    mask = rng.random((T, S)) < 0.5
    mask[:, 0] = True  # every row sees a key
    w = np.asarray(attention_weights(q, k, mask=mask))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=F32_TOL)
    np.testing.assert_array_equal(w[~mask], 0.0)  # exactly 0, not merely small
    assert np.all(w[mask] > 0)


def test_attention_weights_fully_masked_rows_are_zero_and_gradients_finite():
    q, k = jnp.ones((3, 4)), jnp.arange(20.0).reshape(5, 4) / 20
    mask = jnp.ones((3, 5), bool).at[1].set(False)
    bias = jnp.zeros((3, 5)).at[2].set(-jnp.inf)  # a row fully masked by bias alone
    w = attention_weights(q, k, mask=mask, bias=bias)
    np.testing.assert_array_equal(w[1:], 0.0)
    np.testing.assert_allclose(w[0].sum(), 1.0, rtol=F32_TOL)
    g = jax.grad(lambda q: jnp.sum(attention_weights(q, k, mask, bias)[0] ** 2))(q)
    assert np.all(np.isfinite(g))


def test_attention_weights_are_the_weights_of_scaled_dot_product_attention(rng):
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((5, 8), (6, 8), (6, 3)))
    mask = np.tril(np.ones((5, 6), bool))
    _, w = aj.scaled_dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_array_equal(attention_weights(q, k, mask=mask), w)


def test_attention_weights_literal_1_e_over_1_plus_e():
    # Two keys whose scaled scores differ by exactly 1: weights [1, e] / (1 + e).
    q = jnp.array([[2.0, 0.0, 0.0, 0.0]])  # H = 4, 1/sqrt(H) = 1/2
    k = jnp.array([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    w = attention_weights(q, k)
    np.testing.assert_allclose(w, [[1 / (1 + math.e), math.e / (1 + math.e)]], rtol=1e-6)


# ---- Composability: jit, grad, vmap, checkpoint. -------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_jit_equals_eager(impl, rng):
    q, k, v = _qkv(rng, (2,), 10, 12, 2, 8)
    mask = _mask("random", rng, (2,), 2, 10, 12)
    f = lambda q, k, v: aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)  # noqa: E731
    np.testing.assert_allclose(jax.jit(f)(q, k, v), f(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", [None, "random"])
def test_grad_matches_finite_differences_float64(impl, mask_kind):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        q, k, v = _qkv(rng, (2,), 5, 6, 2, 3, 4, dtype=np.float64)
        mask = _mask(mask_kind, rng, (2,), 2, 5, 6)
        bias = rng.standard_normal((2, 5, 6))

        def f(q, k, v, bias):
            out = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
            out_b = aj.dot_product_attention(q, k, v, bias=bias, implementation=impl)
            assert out.dtype == jnp.float64
            return jnp.sum(jnp.sin(out)) + jnp.sum(out_b**2)

        check_grads(f, (q, k, v, bias), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("mask_kind", [None, "causal", "random"])
def test_blockwise_custom_vjp_gradients_equal_xla_autodiff(mask_kind, rng):
    # T = 300 spans two CPU query blocks (256 + padded 44), so the blocked backward is exercised.
    q, k, v = _qkv(rng, (2,), 300, 270, 2, 8, 6)
    mask = _mask(mask_kind, rng, (2,), 2, 300, 270)
    cot = rng.standard_normal((2, 300, 2, 6)).astype(np.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(
            cot * aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
        )

    g_ours = jax.grad(loss("blockwise"), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert rel_err(a, b) <= F32_TOL


def test_forward_mode_works_with_xla_implementation(rng):
    q, k, v = _qkv(rng, (1,), 4, 5, 2, 3)
    with jax.enable_x64(True):
        q, k, v = (x.astype(np.float64) for x in (q, k, v))
        f = lambda q, k, v: aj.dot_product_attention(q, k, v, implementation="xla")  # noqa: E731
        check_grads(f, (q, k, v), order=1, modes=("fwd",), eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_nested_vmap_equals_leading_batch_dims(impl, rng):
    q, k, v = _qkv(rng, (3, 2), 7, 9, 2, 4)
    mask = _mask("random", rng, (3, 2), 2, 7, 9)
    direct = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    f = lambda q, k, v, m: aj.dot_product_attention(q, k, v, mask=m, implementation=impl)  # noqa: E731
    mapped = jax.vmap(jax.vmap(f))(q, k, v, mask)
    np.testing.assert_allclose(mapped, direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_works_under_checkpoint(impl, rng):
    q, k, v = _qkv(rng, (2,), 10, 10, 2, 4)
    mask = aj.causal_mask(10)

    def loss(q, k, v):
        return jnp.sum(aj.dot_product_attention(q, k, v, mask=mask, implementation=impl) ** 2)

    plain = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- Dropout on the attention weights. ------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("broadcast", [False, True])
def test_dropout_zeroes_weights_and_rescales_the_rest(impl, broadcast, rng):
    # With V = identity ([S, N, S]), the output row *is* the dropped-out weight row.
    B, T, S, N, H, rate = 2, 40, 64, 3, 8, 0.25
    q, k, _ = _qkv(rng, (B,), T, S, N, H)
    v = np.broadcast_to(np.eye(S, dtype=np.float32)[:, None, :], (B, S, N, S))
    kwargs = dict(dropout_rate=rate, broadcast_dropout=broadcast, implementation=impl)
    out = aj.dot_product_attention(
        q, k, v, dropout_rng=jax.random.key(3), deterministic=False, **kwargs
    )
    dropped = np.moveaxis(np.asarray(out), 1, 2)  # [B, N, T, S]
    w = attention_f64(q, k, v)[1]  # [B, N, T, S]
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], w[kept] / (1 - rate), rtol=1e-5)
    assert abs(1 - kept.mean() - rate) < 0.02  # 23,040 Bernoulli draws: sd ~0.003
    if broadcast:  # one pattern shared by every batch element and head
        assert np.all(kept == kept[:1, :1])
    else:
        assert not np.all(kept == kept[:1, :1])
    again = aj.dot_product_attention(
        q, k, v, dropout_rng=jax.random.key(3), deterministic=False, **kwargs
    )
    np.testing.assert_array_equal(out, again)  # a fixed key is reproducible
    # flax's default is deterministic=False: the same draws without saying so.
    default = aj.dot_product_attention(q, k, v, dropout_rng=jax.random.key(3), **kwargs)
    np.testing.assert_array_equal(default, out)
    off = aj.dot_product_attention(
        q, k, v, dropout_rng=jax.random.key(3), deterministic=True, **kwargs
    )
    assert rel_err(np.moveaxis(np.asarray(off), 1, 2), w) <= F32_TOL


# ---- Permutation equivariance and word order (the seed's section 3). -----------------

SENTENCE = "the cat sat on the mat".split()
SWAPPED = "the mat sat on the cat".split()


def _embed(words, d_model=32):
    vocab = sorted(set(SENTENCE))
    table = np.random.default_rng(7).standard_normal((len(vocab), d_model)).astype(np.float32)
    return jnp.asarray(table[[vocab.index(w) for w in words]])  # [T, D]


def test_self_attention_without_positions_is_permutation_equivariant():
    params = aj.init_multi_head_attention(jax.random.key(0), 32, num_heads=4)
    x = _embed(SENTENCE)
    perm = np.random.default_rng(0).permutation(len(SENTENCE))
    out = aj.multi_head_attention(params, x, num_heads=4)
    out_perm = aj.multi_head_attention(params, x[perm], num_heads=4)
    np.testing.assert_allclose(out_perm, out[perm], rtol=1e-5, atol=1e-6)
    # So "the mat sat on the cat" is just a reordering of the same output vectors:
    swapped = aj.multi_head_attention(params, _embed(SWAPPED), num_heads=4)
    np.testing.assert_allclose(swapped.mean(0), out.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(swapped[5], out[1], rtol=1e-5, atol=1e-6)  # "cat" is "cat"


def test_sinusoidal_positions_make_word_order_matter():
    params = aj.init_multi_head_attention(jax.random.key(0), 32, num_heads=4)
    pe = aj.sinusoidal_positional_encoding(len(SENTENCE), 32)
    out = aj.multi_head_attention(params, _embed(SENTENCE) + pe, num_heads=4)
    swapped = aj.multi_head_attention(params, _embed(SWAPPED) + pe, num_heads=4)
    # The sentence-level representation now differs, and so does "cat" in its two places.
    assert rel_err(swapped.mean(0), out.mean(0)) > 1e-2
    assert rel_err(swapped[5], out[1]) > 1e-2


# ---- The pure multi-head block. -------------------------------------------------------


def test_multi_head_attention_matches_numpy_projections(rng):
    D, N, Dkv = 12, 3, 10
    params = aj.init_multi_head_attention(jax.random.key(1), D, N, kv_features=Dkv)
    params = jax.tree.map(
        lambda p: p + 0.1 * rng.standard_normal(p.shape), params
    )  # nonzero biases
    x = rng.standard_normal((2, 5, D)).astype(np.float32)
    y = rng.standard_normal((2, 7, Dkv)).astype(np.float32)
    mask = _mask("padding", rng, (2,), N, 5, 7)
    out, w = aj.multi_head_attention(params, x, y, num_heads=N, mask=mask, return_weights=True)
    P = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    q = np.einsum("btd,dnh->btnh", x, P["query"]["kernel"]) + P["query"]["bias"]
    k = np.einsum("bsd,dnh->bsnh", y, P["key"]["kernel"]) + P["key"]["bias"]
    v = np.einsum("bsd,dnh->bsnh", y, P["value"]["kernel"]) + P["value"]["bias"]
    heads, ref_w = attention_f64(q, k, v, mask=mask)
    ref = np.einsum("btnh,nhd->btd", heads, P["out"]["kernel"]) + P["out"]["bias"]
    assert out.shape == (2, 5, D) and w.shape == (2, N, 5, 7)
    assert rel_err(out, ref) <= F32_TOL
    assert rel_err(w, ref_w) <= F32_TOL


def test_init_multi_head_attention_shapes_and_scale():
    p = aj.init_multi_head_attention(jax.random.key(0), 512, 8)
    assert p["query"]["kernel"].shape == (512, 8, 64)
    assert p["out"]["kernel"].shape == (8, 64, 512)
    assert p["value"]["bias"].shape == (8, 64) and p["out"]["bias"].shape == (512,)
    # LeCun normal over the fan-in of 512: std ~ 1/√512 (truncated normal, variance-preserving).
    std = float(jnp.std(p["query"]["kernel"]))
    assert abs(std * math.sqrt(512) - 1.0) < 0.02
    no_bias = aj.init_multi_head_attention(jax.random.key(0), 16, 4, use_bias=False)
    assert "bias" not in no_bias["query"] and "bias" not in no_bias["out"]


def test_blockwise_plan_fits_the_cpu_cache_budget():
    plan = aj.core.blockwise.default_plan(2048, 2048, scale=0.125, backend="cpu")
    assert (plan.query_block, plan.key_block) == (256, 512)
    heads = aj.core.blockwise.heads_per_step(plan, 64, backend="cpu")
    assert heads * 256 * 512 * 4 <= aj.core.blockwise._TILE_BUDGET_BYTES["cpu"] and heads >= 1
    small = aj.core.blockwise.default_plan(100, 90, scale=0.125, backend="cpu")
    assert (small.query_block, small.key_block) == (100, 90)  # short: one tile
