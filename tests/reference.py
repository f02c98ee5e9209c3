"""Independent float64 NumPy reference for attention (shares no code with the library)."""

import numpy as np


def attention_f64(q, k, v, mask=None, bias=None):
    """q [..., T, N, H], k [..., S, N, H], v [..., S, N, V] -> (out [..., T, N, V],
    weights [..., N, T, S]), all float64. Fully masked rows give zero output and weights."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("...tnh,...snh->...nts", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    if mask is None:
        mask = np.ones(logits.shape, bool)
    mask = np.broadcast_to(np.asarray(mask), logits.shape)
    logits = np.where(mask, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(mask, np.exp(logits - row_max), 0.0)
    denom = e.sum(-1, keepdims=True)
    weights = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)
    out = np.einsum("...nts,...snv->...tnv", weights, v)
    return out, weights


def rel_err(actual, expected):
    """max |a - e| / max |e| (a relative error that is stable near zeros)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = max(np.max(np.abs(expected)), 1e-30)
    return float(np.max(np.abs(actual - expected)) / scale)
