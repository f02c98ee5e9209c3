"""Argument checks shared by the core.

Each reads only shapes, dtypes and Python values, so it raises at trace time under ``jit``
as it does eagerly, and names the function (``fn``), the argument, what was expected and
what came. Legend as in :mod:`attention_jax.core`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

QKV = ("query", "key", "value")


def check_floating(fn: str, arg: str, x) -> None:
    """TypeError unless ``x`` has a floating-point dtype."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{fn}: {arg} must be a floating-point array, got dtype {x.dtype}")


def check_integer(fn: str, arg: str, x, must: str = "be an integer array") -> None:
    """TypeError unless ``x`` has an integer dtype (``must`` says what it must be)."""
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{fn}: {arg} must {must}, got dtype {x.dtype}")


def check_same_dtype(fn: str, names, *arrays) -> None:
    """TypeError unless ``arrays`` share one dtype."""
    if len({x.dtype for x in arrays}) > 1:
        dtypes = ", ".join(str(x.dtype) for x in arrays)
        raise TypeError(
            f"{fn}: {', '.join(names[:-1])} and {names[-1]} need one dtype, got {dtypes}"
        )


def positive_int(fn: str, arg: str, value) -> int:
    """``value`` as an int; ValueError unless it is a Python (or NumPy) int >= 1, not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: {arg} must be a positive Python int, got {value!r}")
    return int(value)


def check_broadcastable(fn: str, arg: str, x, target, legend: str) -> None:
    """ValueError unless ``x`` broadcasts to ``target`` (described as ``legend``, e.g.
    ``'[..., N, T, S]'``) without adding dims to it or growing any."""
    fits = x.ndim <= len(target) and all(
        s in (1, t) for s, t in zip(x.shape[::-1], target[::-1], strict=False)
    )
    if not fits:
        raise ValueError(
            f"{fn}: {arg} of shape {x.shape} is not broadcastable to {legend} = {target}"
        )


def check_lengths(fn: str, arg: str, lengths, batch: tuple, layout: str):
    """Sequence lengths: integers of the batch shape ``batch`` of a query laid out as
    ``layout``; returned as int32 (None stays None)."""
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    check_integer(fn, arg, lengths)
    if lengths.shape != batch:
        raise ValueError(
            f"{fn}: {arg} must have the batch shape {batch} of query {layout}, got {lengths.shape}"
        )
    return lengths.astype(jnp.int32)


def check_segment_ids(fn: str, arg: str, ids, shape: tuple, legend: str):
    """Segment ids: integers of exactly ``shape`` (the batch dims and a length), described
    as ``legend`` (e.g. ``'[..., T]'``); returned as arrays (None stays None)."""
    if ids is None:
        return None
    ids = jnp.asarray(ids)
    check_integer(fn, arg, ids, must=f"be an integer array {legend}")
    if ids.shape != tuple(shape):
        raise ValueError(f"{fn}: {arg} must have shape {legend} = {tuple(shape)}, got {ids.shape}")
    return ids


def check_qkv_shapes(fn: str, q_shape, k_shape, v_shape, *, one_head=False, names=QKV,
                     batch_legend="") -> None:  # fmt: skip
    """Query, key and value shapes that fit together.

    Multi-head: ``[..., T, N, H]``, ``[..., S, K, H]``, ``[..., S, K, Hv]`` of one rank >= 3,
    the same batch dims ``...``, key and value with the same heads K, and K dividing the
    query heads N (grouped-query attention, as ``jax.nn.dot_product_attention``: query head
    n uses key/value head ``n // (N // K)``; K = N is plain multi-head, K = 1 multi-query).
    ``one_head``: ``[T, H]``, ``[S, H]``, ``[S, Hv]`` (the rank is then the caller's check).
    ``v_shape`` None: query and key only. ``names``: how the message calls q, k and v;
    ``batch_legend``: how it calls the batch dims (e.g. ``' [...]'``).
    """
    given = zip(names, (q_shape, k_shape, v_shape), strict=True)
    shapes = {nm: tuple(x) for nm, x in given if x is not None}
    got = ", ".join(f"{nm} {x}" for nm, x in shapes.items())
    q, k, v = names
    qkv = f"{q}, {k} and {v}" if len(shapes) == 3 else f"{q} and {k}"
    ranks = {len(x) for x in shapes.values()}
    if not one_head and (len(ranks) > 1 or min(ranks) < 3):
        expected = f"{q} [..., T, N, H], {k} [..., S, K, H]"
        expected += f", {v} [..., S, K, Hv]" if len(shapes) == 3 else ""
        raise ValueError(f"{fn}: expected {expected} of the same rank >= 3, got {got}")
    batch = 0 if one_head else len(q_shape) - 3
    if len({x[:batch] for x in shapes.values()}) > 1:
        raise ValueError(f"{fn}: {qkv} need the same batch dims{batch_legend}, got {got}")
    if not one_head:
        if v_shape is not None and k_shape[-2] != v_shape[-2]:
            raise ValueError(
                f"{fn}: {k} and {v} need the same number of key/value heads K (layout "
                f"[..., S, K, H]), got {k} {shapes[k]}, {v} {shapes[v]}"
            )
        N, K = q_shape[-2], k_shape[-2]
        if K and N % K:  # (K = 0: the empty-dimension error below)
            raise ValueError(
                f"{fn}: the key/value heads K must divide the query heads N (grouped-query "
                f"attention: query head n uses key/value head n // (N // K)), got N={N} "
                f"from {q} {shapes[q]} and K={K} from {k} {shapes[k]}"
            )
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"{fn}: {q} and {k} need the same head dim H (last axis), got {got}")
    s_axis = 0 if one_head else -3
    if v_shape is not None and k_shape[s_axis] != v_shape[s_axis]:
        raise ValueError(
            f"{fn}: {k} and {v} need the same length S, got {k} {shapes[k]}, {v} {shapes[v]}"
        )
    for nm, x in shapes.items():
        if 0 in x:
            raise ValueError(f"{fn}: {nm} has an empty dimension: {x}")
