"""Decoding a trained Transformer: greedy search under `jit`.

Greedy decoding recomputes the decoder over the prefix at each step (no KV cache yet), which
is fine for the short sentences of the built-in corpus.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attention_jax.model import Transformer, shift_right


@functools.partial(jax.jit, static_argnames=("model", "max_length", "eos_id"))
def greedy_decode(model: Transformer, params, inputs, *, max_length: int, eos_id: int = 1):
    """inputs [B, S] -> output ids [B, max_length]: argmax at every step, then padding after
    each row's first EOS (kept). Stops early once every row has emitted EOS."""
    pad = model.config.pad_id
    variables = {"params": params}
    encoded = model.apply(variables, inputs, method="encode")  # [B, S, D]
    B = inputs.shape[0]

    def step(carry):
        t, out, done = carry
        logits = model.apply(
            variables, encoded, inputs, shift_right(out, pad), method="decode"
        )  # [B, max_length, V]: position t sees only out[:, :t] (causal)
        token = jnp.argmax(logits[:, t], axis=-1).astype(out.dtype)  # [B]
        token = jnp.where(done, pad, token)
        out = out.at[:, t].set(token)
        return t + 1, out, done | (token == eos_id)

    def more(carry):
        t, _, done = carry
        return (t < max_length) & ~jnp.all(done)

    start = (0, jnp.full((B, max_length), pad, jnp.int32), jnp.zeros((B,), bool))
    _, out, _ = jax.lax.while_loop(more, step, start)
    return out
