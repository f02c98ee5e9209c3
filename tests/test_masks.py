"""Attention masks against hand-written bool matrices, np.tril, and attention references.

References: literal matrices written out by hand, ``np.tril``, jax.nn.dot_product_attention
(``is_causal=True``) and the float64 NumPy attention of tests/reference.py computed on the
unpadded (sliced) sequences. Tolerance: relative error <= 1e-5 in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import attention_f64, rel_err

import attention_jax as aj

IMPLS = ["xla", "blockwise"]
F32_TOL = 1e-5
T_, F_ = True, False


def _qkv(rng, batch, T, S, N, H):
    q = rng.standard_normal((*batch, T, N, H)).astype(np.float32)
    k = rng.standard_normal((*batch, S, N, H)).astype(np.float32)
    v = rng.standard_normal((*batch, S, N, H)).astype(np.float32)
    return q, k, v


# ---- causal_mask. ---------------------------------------------------------------------


def test_causal_mask_literal_square():
    m = aj.causal_mask(3)
    assert m.shape == (3, 3) and m.dtype == jnp.bool_
    expected = np.array(
        [
            [T_, F_, F_],
            [T_, T_, F_],
            [T_, T_, T_],
        ]
    )
    np.testing.assert_array_equal(m, expected)


def test_causal_mask_literal_rectangular_top_left():
    m = aj.causal_mask(2, 4)
    assert m.shape == (2, 4)
    np.testing.assert_array_equal(m, [[T_, F_, F_, F_], [T_, T_, F_, F_]])
    m = aj.causal_mask(4, 2)
    np.testing.assert_array_equal(m, [[T_, F_], [T_, T_], [T_, T_], [T_, T_]])


def test_causal_mask_literal_bottom_right_offset():
    # Queries are the last 2 of 4 positions: query 0 is position 2, query 1 is position 3.
    m = aj.causal_mask(2, 4, offset=2)
    np.testing.assert_array_equal(m, [[T_, T_, T_, F_], [T_, T_, T_, T_]])
    # A negative offset excludes the diagonal too.
    m = aj.causal_mask(3, offset=-1)
    np.testing.assert_array_equal(m, [[F_, F_, F_], [T_, F_, F_], [T_, T_, F_]])


@pytest.mark.parametrize("T", [1, 2, 7, 33])
def test_causal_mask_square_is_tril(T):
    np.testing.assert_array_equal(aj.causal_mask(T), np.tril(np.ones((T, T), bool)))
    np.testing.assert_array_equal(aj.causal_mask(T, T), np.tril(np.ones((T, T), bool)))


@pytest.mark.parametrize(("T", "S"), [(3, 8), (8, 3), (5, 5), (1, 6)])
def test_causal_mask_offset_is_shifted_tril(T, S):
    for offset in (-2, 0, 1, S - T):
        expected = np.tril(np.ones((T, S), bool), k=offset)
        np.testing.assert_array_equal(aj.causal_mask(T, S, offset=offset), expected)


def test_causal_mask_bottom_right_is_last_rows_of_full_mask():
    T, S = 3, 7
    full = np.tril(np.ones((S, S), bool))
    np.testing.assert_array_equal(aj.causal_mask(T, S, offset=S - T), full[S - T :])


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_mask_in_attention_equals_jax_nn_is_causal(impl, rng):
    B, T, N, H = 2, 12, 3, 8
    q, k, v = _qkv(rng, (B,), T, T, N, H)
    ours = aj.dot_product_attention(q, k, v, mask=aj.causal_mask(T), implementation=impl)
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert rel_err(ours, theirs) <= F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_bottom_right_causal_mask_in_attention_matches_decoding(impl, rng):
    # The last T queries of a length-S causal sequence, against the float64 reference.
    B, T, S, N, H = 2, 3, 9, 2, 4
    q, k, v = _qkv(rng, (B,), T, S, N, H)
    mask = aj.causal_mask(T, S, offset=S - T)
    out = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    ref = attention_f64(q, k, v, mask=np.tril(np.ones((T, S), bool), k=S - T))[0]
    assert rel_err(out, ref) <= F32_TOL


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, None])
def test_causal_mask_rejects_bad_length(bad):
    with pytest.raises(ValueError, match="length must be a positive Python int"):
        aj.causal_mask(bad)


@pytest.mark.parametrize("bad", [0, -3, 1.5, False])
def test_causal_mask_rejects_bad_kv_length(bad):
    with pytest.raises(ValueError, match="kv_length must be a positive Python int"):
        aj.causal_mask(3, bad)


# ---- padding_mask. --------------------------------------------------------------------


def test_padding_mask_literal_self_attention():
    tokens = jnp.array([[5, 7, 0], [3, 0, 0]])  # [B=2, T=3]
    m = aj.padding_mask(tokens)
    assert m.shape == (2, 1, 3, 3) and m.dtype == jnp.bool_
    expected = np.array(
        [
            [
                [
                    [T_, T_, F_],
                    [T_, T_, F_],
                    [F_, F_, F_],
                ]
            ],
            [
                [
                    [T_, F_, F_],
                    [F_, F_, F_],
                    [F_, F_, F_],
                ]
            ],
        ]
    )
    np.testing.assert_array_equal(m, expected)


def test_padding_mask_literal_cross_attention_and_pad_id():
    tokens = jnp.array([4, -1])  # [T=2], pad_id -1
    kv_tokens = jnp.array([-1, 9, 8, -1])  # [S=4]
    m = aj.padding_mask(tokens, kv_tokens, pad_id=-1)
    assert m.shape == (1, 2, 4)
    np.testing.assert_array_equal(m, [[[F_, T_, T_, F_], [F_, F_, F_, F_]]])
    # 0 is an ordinary token when pad_id is -1.
    m = aj.padding_mask(jnp.array([0, 1]), pad_id=-1)
    np.testing.assert_array_equal(m, np.ones((1, 2, 2), bool))


def test_padding_mask_extra_leading_dims():
    tokens = np.array([[[1, 0], [0, 2]], [[3, 3], [0, 0]]], np.int32)  # [2, 2, T=2]
    m = aj.padding_mask(tokens)
    assert m.shape == (2, 2, 1, 2, 2)
    np.testing.assert_array_equal(m[0, 0, 0], [[T_, F_], [F_, F_]])
    np.testing.assert_array_equal(m[0, 1, 0], [[F_, F_], [F_, T_]])
    np.testing.assert_array_equal(m[1, 0, 0], [[T_, T_], [T_, T_]])
    np.testing.assert_array_equal(m[1, 1, 0], [[F_, F_], [F_, F_]])


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_mask_equals_attention_on_unpadded_sequence(impl, rng):
    B, T, N, H = 3, 8, 2, 4
    tokens = np.array(
        [
            [4, 9, 2, 7, 7, 1, 3, 5],  # no padding
            [6, 2, 8, 1, 0, 0, 0, 0],  # trailing padding
            [0, 3, 0, 5, 5, 0, 2, 0],  # padding scattered through
        ],
        np.int32,
    )
    q, k, v = _qkv(rng, (B,), T, T, N, H)
    out = aj.dot_product_attention(q, k, v, mask=aj.padding_mask(tokens), implementation=impl)
    for b in range(B):
        keep = tokens[b] != 0
        alone = attention_f64(q[b, keep], k[b, keep], v[b, keep])[0]  # no mask at all
        assert rel_err(out[b][keep], alone) <= F32_TOL
        # Pad queries see no key: zero output by the library's documented convention.
        np.testing.assert_array_equal(np.asarray(out[b])[~keep], 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_mask_cross_attention_equals_unpadded_keys(impl, rng):
    B, T, S, N, H = 2, 4, 6, 2, 4
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 0]], np.int32)
    kv_tokens = np.array([[1, 1, 1, 0, 0, 0], [2, 0, 2, 2, 2, 2]], np.int32)
    q, k, v = _qkv(rng, (B,), T, S, N, H)
    mask = aj.padding_mask(tokens, kv_tokens)
    assert mask.shape == (B, 1, T, S)
    out = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    for b in range(B):
        qk, kk = tokens[b] != 0, kv_tokens[b] != 0
        alone = attention_f64(q[b, qk], k[b, kk], v[b, kk])[0]
        assert rel_err(out[b][qk], alone) <= F32_TOL


@pytest.mark.parametrize(
    "tokens", [jnp.array([1.0, 0.0]), np.array([[1.5, 2.0]]), jnp.array([True, False])]
)
def test_padding_mask_non_integer_tokens_raise(tokens):
    with pytest.raises(TypeError, match="tokens must hold integer ids"):
        aj.padding_mask(tokens)


def test_padding_mask_non_integer_kv_tokens_raise():
    with pytest.raises(TypeError, match="kv_tokens must hold integer ids"):
        aj.padding_mask(jnp.array([1, 2]), jnp.array([1.0, 0.0]))


def test_padding_mask_scalar_raises():
    with pytest.raises(ValueError, match="got a scalar"):
        aj.padding_mask(jnp.int32(3))


def test_padding_mask_mismatched_leading_dims_raise():
    with pytest.raises(ValueError, match="same leading dims"):
        aj.padding_mask(jnp.ones((2, 4), jnp.int32), jnp.ones((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="same leading dims"):
        aj.padding_mask(jnp.ones((2, 4), jnp.int32), jnp.ones((5,), jnp.int32))


# ---- segment_mask. --------------------------------------------------------------------


def test_segment_mask_literal():
    m = aj.segment_mask(jnp.array([1, 1, 2, 2, 0]))  # [T=5]
    assert m.shape == (1, 5, 5) and m.dtype == jnp.bool_
    expected = np.array(
        [
            [T_, T_, F_, F_, F_],
            [T_, T_, F_, F_, F_],
            [F_, F_, T_, T_, F_],
            [F_, F_, T_, T_, F_],
            [F_, F_, F_, F_, T_],  # 0 is not special: padding attends padding
        ]
    )
    np.testing.assert_array_equal(m[0], expected)


def test_segment_mask_literal_cross_and_batched():
    seg = jnp.array([[1, 2], [3, 3]])  # [B=2, T=2]
    kv_seg = jnp.array([[2, 1, 1], [1, 3, 2]])  # [B=2, S=3]
    m = aj.segment_mask(seg, kv_seg)
    assert m.shape == (2, 1, 2, 3)
    np.testing.assert_array_equal(m[0, 0], [[F_, T_, T_], [T_, F_, F_]])
    np.testing.assert_array_equal(m[1, 0], [[F_, T_, F_], [F_, T_, F_]])


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_segments_with_causal_equal_separate_causal_sequences(impl, rng):
    # Two sequences of lengths 3 and 4 packed into one row, plus one pad position.
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    T, N, H = 8, 2, 4
    q, k, v = _qkv(rng, (1,), T, T, N, H)
    mask = aj.combine_masks(aj.causal_mask(T), aj.segment_mask(seg), aj.padding_mask(seg))
    out = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    for s in (1, 2):
        idx = seg[0] == s
        n = int(idx.sum())
        causal = np.tril(np.ones((n, n), bool))
        alone = attention_f64(q[0, idx], k[0, idx], v[0, idx], mask=causal)[0]
        assert rel_err(out[0][idx], alone) <= F32_TOL
    np.testing.assert_array_equal(np.asarray(out[0, 7]), 0.0)


def test_segment_mask_mismatched_leading_dims_raise():
    with pytest.raises(ValueError, match="same leading dims"):
        aj.segment_mask(jnp.ones((2, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="same leading dims"):
        aj.segment_mask(jnp.ones((2, 3, 4), jnp.int32), jnp.ones((2, 4), jnp.int32))


# ---- combine_masks. -------------------------------------------------------------------


def test_combine_masks_is_logical_and():
    a = jnp.array([[T_, T_], [F_, T_]])
    b = jnp.array([[T_, F_], [T_, T_]])
    c = jnp.array([[T_, T_], [T_, F_]])
    np.testing.assert_array_equal(aj.combine_masks(a, b), [[T_, F_], [F_, T_]])
    np.testing.assert_array_equal(aj.combine_masks(a, b, c), [[T_, F_], [F_, F_]])
    out = aj.combine_masks(a)
    assert out.dtype == jnp.bool_
    np.testing.assert_array_equal(out, a)


def test_combine_masks_broadcasts_same_rank():
    causal = np.tril(np.ones((3, 3), bool))[None, None]  # [1, 1, T, S]
    keys = np.array([[T_, T_, F_], [T_, F_, F_]])[:, None, None, :]  # [B=2, 1, 1, S]
    out = aj.combine_masks(causal, keys)
    assert out.shape == (2, 1, 3, 3) and out.dtype == jnp.bool_
    np.testing.assert_array_equal(out[0, 0], _CAUSAL_AND_KEYS_0)
    np.testing.assert_array_equal(out[1, 0], _CAUSAL_AND_KEYS_1)


_CAUSAL_AND_KEYS_0 = [[T_, F_, F_], [T_, T_, F_], [T_, T_, F_]]
_CAUSAL_AND_KEYS_1 = [[T_, F_, F_], [T_, F_, F_], [T_, F_, F_]]


def test_combine_masks_broadcasts_across_ranks_with_rank_promotion_allowed():
    # The AND itself is right when JAX may rank-promote (the default 'allow' config).
    keys = np.array([[T_, T_, F_], [T_, F_, F_]])[:, None, None, :]  # [B=2, 1, 1, S]
    with jax.numpy_rank_promotion("allow"):
        out = aj.combine_masks(aj.causal_mask(3), keys)  # [T, S] & [B, 1, 1, S]
    assert out.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], _CAUSAL_AND_KEYS_0)
    np.testing.assert_array_equal(out[1, 0], _CAUSAL_AND_KEYS_1)


def test_combine_masks_broadcasts_across_ranks_under_strict_rank_promotion():
    tokens = jnp.array([[4, 2, 0], [7, 0, 0]])  # [B=2, T=3]
    out = aj.combine_masks(aj.causal_mask(3), aj.padding_mask(tokens))  # [T, S] & [B, 1, T, S]
    assert out.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [[T_, F_, F_], [T_, T_, F_], [F_, F_, F_]])
    np.testing.assert_array_equal(out[1, 0], [[T_, F_, F_], [F_, F_, F_], [F_, F_, F_]])


def test_combine_masks_skips_none():
    a = jnp.array([T_, F_, T_])
    b = jnp.array([T_, T_, F_])
    np.testing.assert_array_equal(aj.combine_masks(None, a, None), a)
    np.testing.assert_array_equal(aj.combine_masks(a, None, b), [T_, F_, F_])


def test_combine_masks_all_none_is_none():
    assert aj.combine_masks(None) is None
    assert aj.combine_masks(None, None, None) is None
    assert aj.combine_masks() is None


@pytest.mark.parametrize(
    "bad", [jnp.array([1, 0, 1]), np.array([1.0, 0.0, 1.0]), jnp.array([1, 0, 1], jnp.int8)]
)
def test_combine_masks_non_bool_raises(bad):
    with pytest.raises(TypeError, match="must be bool"):
        aj.combine_masks(jnp.array([T_, T_, F_]), bad)
    with pytest.raises(TypeError, match="mask 0 has dtype"):
        aj.combine_masks(None, bad)


def test_combine_masks_non_broadcastable_raises():
    with pytest.raises(ValueError, match="do not broadcast together"):
        aj.combine_masks(np.ones((3, 4), bool), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"\(2, 1, 3, 3\), \(4, 4\)"):
        aj.combine_masks(np.ones((2, 1, 3, 3), bool), None, np.ones((4, 4), bool))


def test_segment_mask_rejects_float_ids_and_scalars():
    with pytest.raises(TypeError, match="segment_ids must hold integer ids"):
        aj.segment_mask(jnp.ones((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="got a scalar"):
        aj.segment_mask(jnp.int32(3))
