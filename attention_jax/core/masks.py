"""Attention masks: small pure functions, bool, ``True`` = attend.

Every mask here is broadcastable to the ``[..., N, T, S]`` shape that
:func:`attention_jax.core.attention.dot_product_attention` takes (legend as in
:mod:`attention_jax.core`). Build them outside the model and pass them in.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attention_jax.core._checks import check_integer, positive_int


def causal_mask(length: int, kv_length: int | None = None, *, offset: int = 0) -> jnp.ndarray:
    """Query ``i`` may attend key ``j`` iff ``j <= i + offset``.

    Args:
      length: T, the number of queries.
      kv_length: S, the number of keys (default: T).
      offset: shift of the diagonal. With the default 0 the mask is aligned top-left, as
        ``jax.nn.dot_product_attention(is_causal=True)``; ``offset = S - T`` aligns it
        bottom-right (the last T of S positions are the queries, as when decoding).

    Returns:
      bool ``[T, S]``.
    """
    length = positive_int("causal_mask", "length", length)
    kv_length = positive_int("causal_mask", "kv_length", length if kv_length is None else kv_length)
    integer = (
        jnp.issubdtype(offset.dtype, jnp.integer) and offset.ndim == 0
        if hasattr(offset, "dtype")  # a (possibly traced) int scalar
        else isinstance(offset, int) and not isinstance(offset, bool)
    )
    if not integer:
        raise TypeError(f"causal_mask: offset must be an int, got {offset!r}")
    q = jnp.arange(length)[:, None]  # [T, 1]
    k = jnp.arange(kv_length)[None, :]  # [1, S]
    return k <= q + offset  # [T, S]


def padding_mask(tokens, kv_tokens=None, *, pad_id: int = 0) -> jnp.ndarray:
    """Query × key mask that is False wherever the query or the key is padding.

    Args:
      tokens: integer token ids ``[..., T]`` (the queries' side).
      kv_tokens: integer token ids ``[..., S]`` of the keys (default: ``tokens``, i.e.
        self-attention). Leading dims must match ``tokens``'.
      pad_id: the padding id.

    Returns:
      bool ``[..., 1, T, S]`` (the 1 broadcasts over heads).
    """
    q_ok, k_ok = _query_key_ids("padding_mask", "tokens", tokens, kv_tokens)  # [..., T], [..., S]
    q_ok, k_ok = q_ok != pad_id, k_ok != pad_id
    return (q_ok[..., :, None] & k_ok[..., None, :])[..., None, :, :]  # [..., 1, T, S]


def segment_mask(segment_ids, kv_segment_ids=None) -> jnp.ndarray:
    """Mask for packed sequences: a query attends only keys of its own segment.

    Args:
      segment_ids: integer ``[..., T]``; 0 conventionally marks padding, which this
        function does not treat specially (combine with :func:`padding_mask`).
      kv_segment_ids: integer ``[..., S]`` (default: ``segment_ids``).

    Returns:
      bool ``[..., 1, T, S]``.
    """
    q_ids, k_ids = _query_key_ids("segment_mask", "segment_ids", segment_ids, kv_segment_ids)
    return (q_ids[..., :, None] == k_ids[..., None, :])[..., None, :, :]  # [..., 1, T, S]


def combine_masks(*masks) -> jnp.ndarray | None:
    """Logical AND of the given bool masks (``None`` entries are skipped).

    Returns ``None`` when every mask is ``None``; the result has the broadcast shape.
    """
    present = [jnp.asarray(m) for m in masks if m is not None]
    if not present:
        return None
    for i, m in enumerate(present):
        if m.dtype != jnp.bool_:
            raise TypeError(
                f"combine_masks: masks must be bool (True = attend); mask {i} has dtype {m.dtype}"
            )
    try:
        shape = np.broadcast_shapes(*(m.shape for m in present))
    except ValueError:
        shapes = ", ".join(str(m.shape) for m in present)
        raise ValueError(
            f"combine_masks: mask shapes do not broadcast together: {shapes}"
        ) from None
    # Equal ranks first, so this works under jax_numpy_rank_promotion='raise'.
    present = [m.reshape((1,) * (len(shape) - m.ndim) + m.shape) for m in present]
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def _query_key_ids(fn, name, ids, kv_ids):
    """Checks integer ids [..., T] and kv ids [..., S] (default: the same) with equal leading
    dims; returns both as arrays."""
    ids = jnp.asarray(ids)
    kv_ids = ids if kv_ids is None else jnp.asarray(kv_ids)
    for nm, x in ((name, ids), (f"kv_{name}", kv_ids)):
        check_integer(fn, nm, x, must="hold integer ids")
        if x.ndim < 1:
            raise ValueError(f"{fn}: {nm} must be [..., length], got a scalar")
    if ids.shape[:-1] != kv_ids.shape[:-1]:
        raise ValueError(
            f"{fn}: {name} [..., T] and kv_{name} [..., S] need the same leading dims, "
            f"got {ids.shape} and {kv_ids.shape}"
        )
    return ids, kv_ids
