"""The sinusoidal positional encoding against the paper's formula (section 3.5).

References: literals computed by hand with ``math.sin``/``math.cos``, a float64 NumPy
evaluation of PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D)),
and rotation matrices built in float64 from the same formula (sharing no code with the
library). The library computes the angles in float32, so an angle a is off by up to about
a · 2^-23; tolerances below follow from that.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj

pe = aj.sinusoidal_positional_encoding


def _inv_freq(d_model, max_timescale=10000.0):
    """1 / max_timescale^(2i / D) for i = 0 .. D/2 - 1, in float64."""
    return max_timescale ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)


def _pe_f64(positions, d_model, max_timescale=10000.0):
    angles = np.asarray(positions, np.float64)[..., None] * _inv_freq(d_model, max_timescale)
    out = np.empty((*angles.shape[:-1], d_model))
    out[..., 0::2] = np.sin(angles)
    out[..., 1::2] = np.cos(angles)
    return out


# ---- Literal values. ------------------------------------------------------------------


def test_position_zero_is_sin0_cos0_interleaved():
    row = pe(1, 8)[0]
    np.testing.assert_array_equal(row, [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])


def test_literal_values_from_the_paper_formula():
    d = 4  # frequencies 1/10000^(0/4) = 1 and 1/10000^(2/4) = 1/100
    table = pe(5, d)
    assert table.shape == (5, 4) and table.dtype == jnp.float32
    expected = {
        (1, 0): math.sin(1.0),
        (1, 1): math.cos(1.0),
        (1, 2): math.sin(1.0 / 100.0),
        (1, 3): math.cos(1.0 / 100.0),
        (2, 2): math.sin(2.0 / 100.0),
        (2, 3): math.cos(2.0 / 100.0),
        (3, 0): math.sin(3.0),
        (4, 1): math.cos(4.0),
    }
    for (pos, col), value in expected.items():
        np.testing.assert_allclose(float(table[pos, col]), value, rtol=1e-6, atol=1e-7)


def test_literal_values_wide_model():
    d = 512
    table = pe(10, d)
    # Column 2i uses 10000^(-2i/512); i = 128 gives 10000^(-1/2) = 1/100, i = 1 gives
    # 10000^(-2/512).
    np.testing.assert_allclose(float(table[7, 0]), math.sin(7.0), rtol=1e-6)
    np.testing.assert_allclose(float(table[7, 256]), math.sin(7.0 / 100.0), rtol=1e-6)
    np.testing.assert_allclose(float(table[7, 257]), math.cos(7.0 / 100.0), rtol=1e-6)
    w1 = 10000.0 ** (-2.0 / 512.0)
    np.testing.assert_allclose(float(table[9, 2]), math.sin(9.0 * w1), rtol=1e-6)
    np.testing.assert_allclose(float(table[9, 3]), math.cos(9.0 * w1), rtol=1e-6)
    # Lowest frequency (i = 255): 10000^(-510/512).
    w_last = 10000.0 ** (-510.0 / 512.0)
    np.testing.assert_allclose(float(table[9, 510]), math.sin(9.0 * w_last), rtol=1e-6)


def test_custom_max_timescale():
    table = pe(4, 4, max_timescale=16.0)  # frequencies 1 and 16^(-1/2) = 1/4
    np.testing.assert_allclose(float(table[3, 2]), math.sin(3.0 / 4.0), rtol=1e-6)
    np.testing.assert_allclose(float(table[3, 3]), math.cos(3.0 / 4.0), rtol=1e-6)


@pytest.mark.parametrize("d_model", [2, 6, 64])
def test_table_matches_float64_formula(d_model):
    T = 200
    # |angle error| <= ~ angle · 2^-23 <= 200 · 1.2e-7 = 2.4e-5 in the worst case.
    np.testing.assert_allclose(pe(T, d_model), _pe_f64(np.arange(T), d_model), rtol=0, atol=2.5e-5)
    # Small positions: the angles are nearly exact.
    np.testing.assert_allclose(pe(8, d_model), _pe_f64(np.arange(8), d_model), rtol=0, atol=1e-6)


def test_zero_length_gives_empty_table():
    assert pe(0, 8).shape == (0, 8)


# ---- Properties. ----------------------------------------------------------------------


def test_every_position_is_distinct():
    T, d = 2048, 64
    x = np.asarray(pe(T, d), np.float64)
    sq = np.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d2, np.inf)
    min_dist = math.sqrt(max(float(d2.min()), 0.0))
    # The nearest pair is ~1.47 apart (float64 formula), far above float32 noise (~1e-5).
    assert min_dist > 1.0, min_dist
    # Every row has norm sqrt(D/2) (sin² + cos² = 1 per pair).
    np.testing.assert_allclose(np.sqrt(sq), math.sqrt(d / 2), rtol=1e-6)


def _rotation(k, d_model):
    """Block-diagonal M_k with PE(pos + k) = M_k @ PE(pos), from the addition formulas."""
    w = _inv_freq(d_model)
    c, s = np.cos(k * w), np.sin(k * w)
    M = np.zeros((d_model, d_model))
    for i in range(d_model // 2):
        M[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c[i], s[i]], [-s[i], c[i]]]
    return M


@pytest.mark.parametrize("k", [1, 2, 5, 17, 50])
def test_offset_is_a_fixed_linear_map(k):
    d, P = 32, 200
    table = np.asarray(pe(P + k, d), np.float64)
    M = _rotation(k, d)
    # M_k is fixed (independent of pos) and orthogonal.
    np.testing.assert_allclose(M @ M.T, np.eye(d), atol=1e-12)
    # The float64 formula satisfies the identity to rounding: the reference M_k is right.
    exact = _pe_f64(np.arange(P + k), d)
    np.testing.assert_allclose(exact[k:], exact[:P] @ M.T, rtol=0, atol=1e-12)
    # The library, for all pos < 200 at once. Each side carries float32 angle rounding of up to
    # ~1e-5 at positions near 200 (measured <= 8e-6 per entry), hence 2e-5.
    np.testing.assert_allclose(table[k:], table[:P] @ M.T, rtol=0, atol=2e-5)
    # Near the origin the angles are small and the identity is tight.
    np.testing.assert_allclose(table[k : k + 16], table[:16] @ M.T, rtol=0, atol=2e-6)


# ---- Positions arrays, jit, dtype. ----------------------------------------------------


def test_positions_array_gives_rows_of_the_length_form():
    table = np.asarray(pe(40, 16))
    positions = np.array([[0, 3, 7, 39], [5, 5, 1, 20], [38, 0, 2, 11]], np.int32)  # [B=3, T=4]
    out = pe(jnp.asarray(positions), 16)
    assert out.shape == (3, 4, 16) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, table[positions], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, _pe_f64(positions, 16), rtol=0, atol=1e-5)


def test_numpy_int64_positions_and_numpy_int_length():
    table = np.asarray(pe(np.int64(12), 8))
    assert table.shape == (12, 8)
    out = pe(np.arange(3, 12, dtype=np.int64), 8)
    np.testing.assert_allclose(out, table[3:12], rtol=1e-6, atol=1e-6)


def test_traced_positions_under_jit():
    f = jax.jit(lambda off: pe(off + jnp.arange(5), 16))
    out = f(7)
    assert out.shape == (5, 16)
    np.testing.assert_allclose(out, np.asarray(pe(20, 16))[7:12], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, _pe_f64(np.arange(7, 12), 16), rtol=0, atol=1e-5)
    # A second offset reuses the trace and still gives the right rows.
    np.testing.assert_allclose(f(13), np.asarray(pe(20, 16))[13:18], rtol=1e-6, atol=1e-6)


def test_dtype_argument_is_honoured():
    out = pe(50, 32, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and out.shape == (50, 32)
    # bfloat16 has 8 bits of mantissa: values in [-1, 1] are within 2^-8 of the truth.
    ref = _pe_f64(np.arange(50), 32)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0, atol=2**-8)
    pos = pe(jnp.arange(4).reshape(2, 2), 8, dtype=jnp.bfloat16)
    assert pos.dtype == jnp.bfloat16 and pos.shape == (2, 2, 8)


# ---- Bad input. -----------------------------------------------------------------------


@pytest.mark.parametrize("d_model", [1, 3, 7, 33])
def test_odd_d_model_raises(d_model):
    with pytest.raises(ValueError, match="even"):
        pe(4, d_model)


@pytest.mark.parametrize("d_model", [0, -2, 4.0, True])
def test_non_positive_or_non_int_d_model_raises(d_model):
    with pytest.raises(ValueError, match="d_model"):
        pe(4, d_model)


@pytest.mark.parametrize(
    "positions", [jnp.array([0.0, 1.0]), np.array([[1.5]]), 3.0, jnp.array([True, False])]
)
def test_non_integer_positions_raise_type_error(positions):
    with pytest.raises(TypeError, match="integer"):
        pe(positions, 8)


@pytest.mark.parametrize("length", [-1, -100, np.int32(-3)])
def test_negative_length_raises(length):
    with pytest.raises(ValueError, match=">= 0"):
        pe(length, 8)


# ---- Rotary embeddings. ---------------------------------------------------------------


def _rope_f64(x, positions, max_timescale=10000.0):
    """Independent reference: each pair (x[2i], x[2i+1]) as a complex number times e^{iθ}."""
    x = np.asarray(x, np.float64)
    H = x.shape[-1]
    theta = np.asarray(positions, np.float64)[:, None] * max_timescale ** (-np.arange(0, H, 2) / H)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * theta)[:, None, :]  # [T, N, H/2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def test_rotary_matches_complex_reference_and_depends_on_offsets_only():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 2, 8)).astype(np.float32)  # [T, N, H]
    pos = np.arange(6) + 3
    got = aj.apply_rotary_embedding(x, pos)
    np.testing.assert_allclose(got, _rope_f64(x, pos), rtol=1e-5, atol=1e-5)
    # <rope(q, m), rope(k, n)> is the same for (m, n) and (m + 7, n + 7).
    q, k = x[:1], x[1:2]
    a = jnp.sum(aj.apply_rotary_embedding(q, [2]) * aj.apply_rotary_embedding(k, [5]))
    b = jnp.sum(aj.apply_rotary_embedding(q, [9]) * aj.apply_rotary_embedding(k, [12]))
    np.testing.assert_allclose(a, b, rtol=1e-5)
    np.testing.assert_allclose(aj.apply_rotary_embedding(x, np.zeros(6, int)), x, rtol=1e-6)


def test_rotary_bad_inputs():
    x = jnp.ones((4, 2, 8))
    with pytest.raises(ValueError, match="H even"):
        aj.apply_rotary_embedding(jnp.ones((4, 2, 7)), jnp.arange(4))
    with pytest.raises(TypeError, match="positions must be integers"):
        aj.apply_rotary_embedding(x, jnp.arange(4.0))
    with pytest.raises(ValueError, match="must match x"):
        aj.apply_rotary_embedding(x, jnp.arange(5))
