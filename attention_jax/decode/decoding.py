"""Decoding trained models with the KV cache: greedy and beam search for the encoder-decoder,
sampling for the LM. The search algorithms themselves are model-free (attention_jax.decode.search);
this module gives them a one-token step function over the model's cache.

Paper settings (section 6.1): beam 4, length penalty alpha 0.6, maximum output length =
input length + 50.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.data.tokenizer import EOS_ID
from attention_jax.decode import search
from attention_jax.nn.model import Transformer, TransformerLM


def init_cache(model: Transformer, params, inputs, max_length: int) -> dict:
    """Encodes `inputs` [B, S] and creates the decoder's cache for `max_length` steps: the
    search's cache pytree ``{'model': flax cache, 'inputs': inputs}`` (every leaf leads
    with B; the source tokens travel with it, as beam search reorders rows)."""
    variables = {"params": params}
    encoded = model.apply(variables, inputs, method="encode")  # [B, S, D]
    blank = jnp.zeros((inputs.shape[0], max_length), jnp.int32)  # shapes the cache
    _, created = model.apply(
        variables, encoded, inputs, blank, decode=True, method="decode", mutable=["cache"]
    )
    return {"model": created["cache"], "inputs": inputs}


def step_fn(model: Transformer | TransformerLM, params):
    """``tokens_to_logits(tokens [R], cache, step) -> (logits [R, V], cache)``: one decoder
    position through the KV cache for R rows (B, or B * W in beam search); ``step`` is the
    position, int32 [] or each row's [R]; the pad id's logit is -inf."""

    def tokens_to_logits(tokens, cache, step):
        R = tokens.shape[0]
        positions = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (R,))[:, None]  # [R, 1]
        variables = {"params": params, "cache": cache["model"]}
        if isinstance(model, TransformerLM):
            logits, new = model.apply(
                variables, tokens[:, None], positions=positions, decode=True, mutable=["cache"]
            )
        else:
            logits, new = model.apply(
                variables, None, cache["inputs"], tokens[:, None], decode=True,
                positions=positions, method="decode", mutable=["cache"],
            )  # fmt: skip
        # Padding is not a word: never generate it (a generated pad would be read as padding
        # by the full-sequence model but not by the cache, and would end nothing).
        logits = logits[:, 0].at[:, model.config.pad_id].set(-jnp.inf)  # [R, V]
        return logits, {**cache, "model": new["cache"]}

    return tokens_to_logits


def prefill_fn(model: TransformerLM, params):
    """``prefill(tokens [B, P], cache, last [B]) -> (logits [B, V], cache)``: positions
    0..P-1 of every row through the LM's KV cache in one forward pass (writing P cache
    slots), and the logits of row b at position ``last[b]`` alone (the output projection
    onto V runs on B positions, not B * P); the pad id's logit is -inf, as in `step_fn`."""

    def prefill(tokens, cache, last):
        B, P = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))  # [B, P]
        logits, new = model.apply(
            {"params": params, "cache": cache["model"]}, tokens, positions=positions,
            decode=True, logit_positions=jnp.asarray(last, jnp.int32)[:, None],
            mutable=["cache"],
        )  # fmt: skip
        logits = logits[:, 0].at[:, model.config.pad_id].set(-jnp.inf)  # [B, V]
        return logits, {**cache, "model": new["cache"]}

    return prefill


@functools.partial(
    jax.jit, static_argnames=("model", "max_length", "beam_size", "alpha", "extra_length")
)
def translate(
    model: Transformer,
    params,
    inputs,
    *,
    max_length: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    extra_length: int = 50,
):
    """inputs [B, S] (right-padded) -> output ids [B, max_length], cut after EOS.

    Beam search with the GNMT length penalty (``beam_size=1`` is greedy); each row stops at
    its source length + `extra_length` tokens, and every row at `max_length`.
    """
    pad = model.config.pad_id
    B = inputs.shape[0]
    lengths = jnp.minimum(jnp.sum(inputs != pad, axis=-1) + extra_length, max_length)  # [B]
    cache = init_cache(model, params, inputs, max_length)
    tokens_to_logits = step_fn(model, params)
    if beam_size == 1:
        return search.greedy_search(
            tokens_to_logits, cache, batch_size=B, max_length=max_length, lengths=lengths,
            eos_id=EOS_ID, pad_id=pad, bos_id=pad,
        )  # fmt: skip
    sequences, _ = search.beam_search(
        tokens_to_logits, cache, batch_size=B, beam_size=beam_size, alpha=alpha,
        max_length=max_length, lengths=lengths, eos_id=EOS_ID, pad_id=pad, bos_id=pad,
    )  # fmt: skip
    return sequences[:, 0]  # the best beam


def greedy_decode(model: Transformer, params, inputs, *, max_length: int):
    """inputs [B, S] -> output ids [B, max_length] by greedy search (KV cache), no
    per-row length limit beyond `max_length`."""
    return translate(
        model, params, inputs, max_length=max_length, beam_size=1, extra_length=max_length
    )


def generate(
    model: TransformerLM,
    params,
    prompt,
    rng,
    *,
    max_length: int,
    max_new_tokens=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    prefill: bool = True,
):
    """Samples continuations of `prompt` [B, P] (right-padded with the pad id; prompts of
    different lengths in one batch) from the LM: output ids [B, max_length] starting with
    the prompt, cut after EOS. ``temperature=0``: greedy. Jitted (`model`, `max_length`,
    `top_k`, `prefill` static).

    ``max_new_tokens`` (int >= 1 or int [B]; default: up to `max_length`): row b stops
    after that many new tokens, at column ``its prompt length + max_new_tokens`` (pad
    after it); the loop ends when every row has, so short prompts do not run on to
    `max_length`.

    ``prefill=True``: one forward pass reads every prompt position at once and fills the
    KV cache, projecting onto the vocabulary only each row's last prompt position; each
    row then samples one token per step from the end of its own prompt (rows at different
    positions). ``prefill=False``: the prompt is fed one token per step (the same ids for
    the same `rng`; slower to the first new token)."""
    if max_new_tokens is not None and not isinstance(max_new_tokens, jax.core.Tracer):
        if isinstance(max_new_tokens, bool) or not np.all(np.asarray(max_new_tokens) >= 1):
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
    return _generate(
        model, params, prompt, rng, max_length=max_length, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, prefill=prefill,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("model", "max_length", "top_k", "prefill"))
def _generate(
    model, params, prompt, rng, *, max_length, max_new_tokens, temperature, top_k, top_p, prefill
):
    B = prompt.shape[0]
    blank = jnp.zeros((B, max_length), jnp.int32)  # shapes the cache [B, max_length, K, H]
    _, created = model.apply({"params": params}, blank, decode=True, mutable=["cache"])
    return search.sample(
        step_fn(model, params), {"model": created["cache"]}, rng, batch_size=B,
        max_length=max_length, prompt=prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_id=EOS_ID,
        pad_id=model.config.pad_id, bos_id=model.config.pad_id,
        prefill_fn=prefill_fn(model, params) if prefill else None,
    )  # fmt: skip
