"""Positional encodings (pure JAX, no Flax).

Self-attention is permutation-equivariant: it has no notion of order until position
information is added to the token embeddings. The paper adds fixed sinusoids (section 3.5):

    PE(pos, 2i)   = sin(pos / max_timescale^(2i / D))
    PE(pos, 2i+1) = cos(pos / max_timescale^(2i / D))

so that for any offset k, PE(pos + k) is a fixed linear map of PE(pos) (a 2-D rotation per
frequency), which lets attention learn relative offsets.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention_jax.core._checks import check_floating, check_integer, positive_int


def sinusoidal_positional_encoding(
    length_or_positions, d_model: int, max_timescale: float = 10000.0, *, dtype=jnp.float32
) -> jnp.ndarray:
    """The paper's interleaved sinusoidal positional encoding.

    Args:
      length_or_positions: a Python int T (positions ``0 .. T-1``) or an integer array of
        positions of any shape ``[...]`` (may be traced, e.g. an offset while decoding).
      d_model: D, the (even) model width.
      max_timescale: the 10000 of the paper.
      dtype: dtype of the result; the angles are computed in float32.

    Returns:
      ``[T, D]`` for an int length, ``[..., D]`` for a positions array; even columns are
      sines, odd columns cosines of the same frequency.
    """
    fn = "sinusoidal_positional_encoding"
    d_model = positive_int(fn, "d_model", d_model)
    if d_model % 2:
        raise ValueError(
            f"{fn}: d_model must be even (sine and cosine come in pairs), got d_model={d_model}"
        )
    if isinstance(length_or_positions, (int, np.integer)) and not isinstance(
        length_or_positions, bool
    ):
        if length_or_positions < 0:
            raise ValueError(f"{fn}: length must be >= 0, got {length_or_positions}")
        positions = jnp.arange(int(length_or_positions))  # [T]
    else:
        positions = jnp.asarray(length_or_positions)
        must = "be an int or an integer array of positions"
        check_integer(fn, "length_or_positions", positions, must=must)
    _check_timescale(fn, max_timescale)
    # 1 / max_timescale^(2i / D) for i = 0 .. D/2 - 1, computed in float64 on the host.
    inv_freq = np.power(max_timescale, -np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    inv_freq = jnp.asarray(inv_freq, jnp.float32).reshape((1,) * positions.ndim + (-1,))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., D/2]
    # [..., D/2, 2] -> [..., D]: column 2i is sin, column 2i+1 is cos of the same angle.
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return pe.reshape(*angles.shape[:-1], d_model).astype(dtype)


def apply_rotary_embedding(x, positions, max_timescale: float = 10000.0) -> jnp.ndarray:
    """Rotary position embedding (RoFormer): rotates each pair ``(x[2i], x[2i+1])`` of every
    head by the angle ``pos / max_timescale^(2i / H)``, so that the dot product of a rotated
    query at position m and a rotated key at position n depends on m - n only.

    Args:
      x: ``[..., T, N, H]`` queries or keys (H even).
      positions: integer ``[..., T]`` (leading dims broadcastable to x's), or ``[T]``.
      max_timescale: as in :func:`sinusoidal_positional_encoding`.

    Returns:
      ``[..., T, N, H]`` in x's dtype (the rotation is computed in float32).
    """
    x = jnp.asarray(x)
    positions = jnp.asarray(positions)
    if x.ndim < 3 or x.shape[-1] % 2:
        raise ValueError(
            f"apply_rotary_embedding: x must be [..., T, N, H] with H even, got {x.shape}"
        )
    check_floating("apply_rotary_embedding", "x", x)
    check_integer("apply_rotary_embedding", "positions", positions, must="be integers")
    _check_timescale("apply_rotary_embedding", max_timescale)
    if positions.shape[-1] != x.shape[-3]:
        raise ValueError(
            f"apply_rotary_embedding: positions [..., T] must match x [..., T, N, H], got "
            f"positions {positions.shape} and x {x.shape}"
        )
    H = x.shape[-1]
    inv_freq = np.power(max_timescale, -np.arange(0, H, 2, dtype=np.float64) / H)
    inv_freq = jnp.asarray(inv_freq, jnp.float32).reshape((1,) * positions.ndim + (-1,))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., T, H/2]
    angles = angles[..., None, :]  # [..., T, 1, H/2]: the same rotation for every head
    angles = angles.reshape((1,) * (x.ndim - angles.ndim) + angles.shape)
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], H // 2, 2)  # [..., T, N, H/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


def _check_timescale(name, max_timescale):
    if isinstance(max_timescale, bool) or not isinstance(max_timescale, (int, float, np.number)):
        raise TypeError(f"{name}: max_timescale must be a number, got {max_timescale!r}")
    if not max_timescale > 1:  # 1 gives constant encodings, below 1 inf/NaN ones
        raise ValueError(f"{name}: max_timescale must be > 1, got {max_timescale!r}")
