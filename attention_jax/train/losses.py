"""Losses and token metrics (pure JAX).

The paper trains with label smoothing ε_ls = 0.1 (section 5.4): the target distribution puts
1 - ε on the reference token and spreads ε uniformly over the other V - 1 tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
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
    weights = (targets != pad_id).astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights
    return jnp.sum(per_token * weights), jnp.sum(weights), jnp.sum(correct)


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
