"""Losses and token metrics (pure JAX).

The paper trains with label smoothing ε_ls = 0.1 (section 5.4): the target distribution puts
1 - ε on the reference token and spreads ε uniformly over the other V - 1 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothed_cross_entropy_terms(logits, targets, *, label_smoothing: float = 0.1):
    """Per-token terms: ``(loss [..., T], correct [..., T])``, padding included.

    The loss is the cross-entropy against the smoothed distribution minus that
    distribution's entropy (float32), so a perfect prediction of the smoothed target scores
    0; ``correct`` is whether the argmax is the target (bool). With ``label_smoothing=0``
    the loss is the negative log-likelihood of the target. The one place this math lives:
    `smoothed_cross_entropy_sums` applies it to all logits, the chunked loss to one chunk
    at a time."""
    V = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (V - 1)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [..., T, V]
    on_target = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # [..., T]
    # Σ_v q_v log p_v with q = low everywhere except `confidence` at the target.
    cross = confidence * on_target + low * (jnp.sum(log_p, axis=-1) - on_target)
    # Entropy of q (a constant), so the minimum of the loss is 0.
    entropy = -(confidence * jnp.log(confidence) + (V - 1) * low * jnp.log(low + 1e-20))
    per_token = -cross - entropy  # [..., T]
    return per_token, jnp.argmax(logits, axis=-1) == targets


def masked_sums(per_token, correct, targets, *, pad_id: int = 0):
    """``(loss_sum, num_tokens, num_correct)`` of per-token terms over ``targets != pad_id``."""
    weights = (targets != pad_id).astype(jnp.float32)
    correct = correct.astype(jnp.float32) * weights
    return jnp.sum(per_token * weights), jnp.sum(weights), jnp.sum(correct)


def _check_label_smoothing(label_smoothing):
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def smoothed_cross_entropy_sums(logits, targets, *, label_smoothing: float = 0.1, pad_id: int = 0):
    """Sums over non-padding target tokens: (loss sum, token count, correct count).

    Returning sums (not means) lets gradient accumulation and data parallelism combine
    microbatches exactly: mean = total loss / total tokens.

    Args:
      logits: ``[..., T, V]`` (any float dtype; computed in float32).
      targets: integer ``[..., T]``; positions equal to ``pad_id`` do not count.
      label_smoothing: ε in [0, 1).

    Returns:
      ``(loss_sum, num_tokens, num_correct)``, float32 scalars. The loss is the
      cross-entropy against the smoothed distribution minus that distribution's entropy,
      so a perfect prediction of the smoothed target scores 0.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits [..., T, V] and targets [..., T] disagree: {logits.shape} vs {targets.shape}"
        )
    _check_label_smoothing(label_smoothing)
    per_token, correct = smoothed_cross_entropy_terms(
        logits, targets, label_smoothing=label_smoothing
    )
    return masked_sums(per_token, correct, targets, pad_id=pad_id)


def chunked_smoothed_cross_entropy_terms(
    hidden, project, targets, *, chunk: int, label_smoothing: float = 0.1, pad_id: int = 0
):
    """`smoothed_cross_entropy_terms` of ``project(hidden)`` without the full logits.

    The B·T tokens (flattened, padded with ``pad_id`` targets to a multiple of `chunk`) are
    projected `chunk` at a time (chunk i of C: tokens i, i + C, ...) in a ``lax.map`` whose
    body is ``jax.checkpoint``-ed: the forward keeps only each chunk's per-token terms, and
    the backward pass recomputes the chunk's logits, so at most ``[chunk, V]`` logits are
    alive (not ``[B, T, V]``).

    Args:
      hidden: ``[..., T, D]`` states before the output projection (any float dtype).
      project: ``hidden [N, D] -> logits [N, V]`` (`nn.model.output_projection`).
      targets: integer ``[..., T]``.
      chunk: tokens per chunk, >= 1 (a chunk larger than B·T is cut to B·T).

    Returns:
      ``(loss [..., T], correct [..., T])`` as `smoothed_cross_entropy_terms` gives them.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"loss chunk must be a positive int (tokens per chunk), got {chunk!r}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden [..., T, D] and targets [..., T] disagree: {hidden.shape} vs {targets.shape}"
        )
    _check_label_smoothing(label_smoothing)
    D = hidden.shape[-1]
    flat_h = hidden.reshape(-1, D)  # [N, D], N = B·T
    flat_t = targets.reshape(-1)  # [N]
    N = flat_t.shape[0]
    chunk = min(chunk, N)
    num_chunks = -(-N // chunk)
    extra = num_chunks * chunk - N
    # Strided chunks: chunk i holds tokens i, i + C, i + 2C, ... ([N] -> [c, C] -> [C, c]),
    # so each chunk spans the whole (data-sharded) token axis and the map runs over an
    # axis no device mesh splits.
    flat_h = jnp.pad(flat_h, ((0, extra), (0, 0))).reshape(chunk, num_chunks, D)  # [c, C, D]
    flat_t = jnp.pad(flat_t, (0, extra), constant_values=pad_id).reshape(chunk, num_chunks)
    flat_h, flat_t = jnp.swapaxes(flat_h, 0, 1), flat_t.T  # [C, c, D], [C, c]

    @jax.checkpoint  # the backward pass recomputes this chunk's logits: none are saved
    def one_chunk(xs):
        h, t = xs  # [c, D], [c]
        return smoothed_cross_entropy_terms(project(h), t, label_smoothing=label_smoothing)

    per_token, correct = jax.lax.map(one_chunk, (flat_h, flat_t))  # [C, c] each
    unchunk = lambda x: x.T.reshape(-1)[:N].reshape(targets.shape)  # noqa: E731  [C, c] -> [..., T]
    return unchunk(per_token), unchunk(correct)


def chunked_smoothed_cross_entropy_sums(
    hidden, project, targets, *, chunk: int, label_smoothing: float = 0.1, pad_id: int = 0
):
    """``smoothed_cross_entropy_sums(project(hidden), targets, ...)`` computed over chunks of
    `chunk` tokens, so the ``[B, T, V]`` logits never exist at once (forward or backward);
    see `chunked_smoothed_cross_entropy_terms`. Same ``(loss_sum, num_tokens,
    num_correct)``, equal up to float rounding of the chunked matmul."""
    per_token, correct = chunked_smoothed_cross_entropy_terms(
        hidden, project, targets, chunk=chunk, label_smoothing=label_smoothing, pad_id=pad_id
    )
    return masked_sums(per_token, correct, targets, pad_id=pad_id)


def smoothed_cross_entropy(logits, targets, *, label_smoothing: float = 0.1, pad_id: int = 0):
    """Label-smoothed cross-entropy averaged over non-padding target tokens."""
    loss, count, _ = smoothed_cross_entropy_sums(
        logits, targets, label_smoothing=label_smoothing, pad_id=pad_id
    )
    return loss / jnp.maximum(count, 1.0)


def token_accuracy(logits, targets, *, pad_id: int = 0):
    """Fraction of non-padding target tokens whose argmax prediction is right."""
    _, count, correct = smoothed_cross_entropy_sums(logits, targets, pad_id=pad_id)
    return correct / jnp.maximum(count, 1.0)
