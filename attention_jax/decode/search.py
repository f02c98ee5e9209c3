"""Search over a one-token step function: beam search, greedy search and sampling.

Pure JAX (no Flax), batched, and `jit`-compilable: each search is one `lax.while_loop` over
output positions with static shapes. Dimensions: B batch, T output length (``max_length``),
V vocabulary, as everywhere in the library; and, here only, W beam width (``beam_size``)
and R the rows the step function sees: B, or B * W in beam search.

The model enters only through the step function::

    tokens_to_logits(tokens int32 [R], cache, step int32 []) -> (logits [R, V], new_cache)

``tokens`` is the last token of each row (``bos_id`` at step 0), ``step`` the 0-based
position being predicted, and ``cache`` any pytree whose leaves lead with R. Logits may be
unnormalised; the searches take ``log_softmax`` in float32. Only :func:`sample` with a
``prefill_fn`` passes ``step`` as int32 ``[R]``: each row's own position.

Token ids default to the package's (`attention_jax.data.tokenizer`): ``eos_id=EOS_ID``,
``pad_id=PAD_ID``, and ``bos_id=PAD_ID`` (the decoder's start slot holds the pad id).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attention_jax.data.tokenizer import EOS_ID, PAD_ID

StepFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]
# prefill_fn(tokens int32 [B, P], cache, last int32 [B]) -> (logits [B, V], new_cache): P
# positions at once; the logits of row b at its position last[b].
PrefillFn = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def length_penalty(length, alpha):
    """GNMT length penalty ``((5 + |Y|) / 6) ** alpha`` (Wu et al. 2016, eq. 14), float32."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(
    tokens_to_logits: StepFn,
    init_cache,
    *,
    batch_size: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_length: int,
    lengths=None,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    bos_id: int = PAD_ID,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with the GNMT length penalty, as in tensor2tensor / flax's WMT example.

    A hypothesis Y scores ``log P(Y) / length_penalty(|Y|, alpha)``, where |Y| counts its
    tokens including the final EOS. Each row keeps W *alive* beams (best log P, no EOS yet)
    and W *finished* ones (best score). At every step each alive beam's EOS extension is a
    finished candidate; at a row's last position (``lengths[b]``, default ``max_length``)
    every extension is, so a row without EOS is finished there with |Y| = ``lengths[b]``.
    A row stops once its worst finished score is at least the best alive log P divided by
    the penalty at the row's maximum length: log P only falls and (alpha >= 0) the penalty
    only grows, so no alive beam can still enter the finished set, and stopping early never
    changes the result. The loop ends when every row has stopped, or at ``max_length``.

    Args:
      tokens_to_logits: the step function (module docstring); here R = B * W.
      init_cache: pytree with leaves ``[B, ...]``; each row is repeated W times
        (``[B * W, ...]``, row ``b * W + w``) and gathered whenever beams are reselected.
      batch_size: B.
      beam_size: W >= 1.
      alpha: length-penalty exponent >= 0 (0: plain log P).
      max_length: T, the static length of the outputs.
      lengths: optional int ``[B]``, each row's maximum output length in ``[1, T]``, such as
        source length + 50. Checked when concrete; under `jit` clipped to ``[1, T]``.
      eos_id, pad_id, bos_id: end token; filler after EOS or a row's length; the token fed
        at step 0.

    Returns:
      ``(sequences int32 [B, W, T], scores float32 [B, W])``, best first. Sequences keep
      their EOS and hold ``pad_id`` after it (or from ``lengths[b]`` on). When a row has
      fewer than W hypotheses of nonzero probability the remaining slots are all pad with
      score ``-inf``.
    """
    name = "beam_search"
    B, T = _check_sizes(name, batch_size, max_length)
    W = _positive_int(name, "beam_size", beam_size)
    alpha = _nonnegative_real(name, "alpha", alpha)
    eos_id, pad_id, bos_id = _check_ids(name, eos_id, pad_id, bos_id)
    lengths = _row_lengths(name, lengths, B, T)  # [B]
    cache = _check_cache(name, init_cache, B)
    # Row b's beams are rows b * W .. b * W + W - 1.
    cache = jax.tree.map(lambda x: jnp.repeat(x, W, axis=0), cache)
    V = _check_step_fn(name, tokens_to_logits, cache, B * W, eos_id)

    max_penalty = length_penalty(lengths, alpha)  # [B]

    def rows_done(step, alive_logp, fin_scores):  # -> bool [B]
        # alive_logp <= 0, so the best an alive beam can still score is bounded by its log P
        # over the largest penalty; an unfilled finished slot (-inf) never meets the bound
        # unless no beam is alive either.
        best_alive = jnp.max(alive_logp, axis=1) / max_penalty  # [B]
        return (step >= lengths) | (jnp.min(fin_scores, axis=1) >= best_alive)

    def extend(seqs, flat, step):
        """seqs [B, W, T], flat indices [B, W'] into W * V -> the chosen beams with the chosen
        token at `step`: [B, W', T]."""
        beam, token = flat // V, flat % V  # [B, W'], [B, W']
        chosen = jnp.take_along_axis(seqs, beam[:, :, None], axis=1)  # [B, W', T]
        return lax.dynamic_update_index_in_dim(chosen, token, step, axis=2), beam

    def more(state):
        step, _, alive_logp, _, fin_scores, _ = state
        return (step < T) & ~jnp.all(rows_done(step, alive_logp, fin_scores))

    def body(state):
        step, alive_seqs, alive_logp, fin_seqs, fin_scores, cache = state
        # A stopped row takes no new candidates, so its result is final.
        done = rows_done(step, alive_logp, fin_scores)  # [B]
        alive_logp = jnp.where(done[:, None], -jnp.inf, alive_logp)  # [B, W]

        last = jnp.where(step == 0, bos_id, _column(alive_seqs, step - 1))  # [B, W]
        logits, cache = tokens_to_logits(last.reshape(B * W), cache, step)  # [B*W, V]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, W, V)
        cand = alive_logp[:, :, None] + logp  # [B, W, V]: log P of every extension
        ends = (jnp.arange(V) == eos_id)[None, None, :] | (step + 1 >= lengths)[:, None, None]

        # Alive: the W best extensions that do not end here.
        new_alive_logp, flat = lax.top_k(jnp.where(ends, -jnp.inf, cand).reshape(B, W * V), W)
        new_alive_seqs, beam = extend(alive_seqs, flat, step)  # [B, W, T], [B, W]
        rows = (jnp.arange(B)[:, None] * W + beam).reshape(B * W)  # [B*W]
        cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), cache)

        # Finished: the W best of the old finished and the extensions that end here. The old
        # ones come first, so they win ties (lax.top_k keeps the lower index).
        ended = jnp.where(ends, cand / length_penalty(step + 1, alpha), -jnp.inf)  # [B, W, V]
        new_scores, flat = lax.top_k(ended.reshape(B, W * V), W)  # [B, W]
        new_seqs, _ = extend(alive_seqs, flat, step)  # [B, W, T]
        fin_scores, keep = lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), W)
        both = jnp.concatenate([fin_seqs, new_seqs], axis=1)  # [B, 2W, T]
        fin_seqs = jnp.take_along_axis(both, keep[:, :, None], axis=1)  # [B, W, T]
        return step + 1, new_alive_seqs, new_alive_logp, fin_seqs, fin_scores, cache

    pads = jnp.full((B, W, T), pad_id, jnp.int32)
    # Only beam 0 is live at the start: the W copies of a row would otherwise fill the beam
    # with W identical hypotheses.
    alive_logp = jnp.full((B, W), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    fin_scores = jnp.full((B, W), -jnp.inf, jnp.float32)
    start = (jnp.int32(0), pads, alive_logp, pads, fin_scores, cache)
    # Empty finished slots stay all pad: top_k puts the old -inf slots before new ones.
    _, _, _, fin_seqs, fin_scores, _ = lax.while_loop(more, body, start)
    return fin_seqs, fin_scores


def greedy_search(
    tokens_to_logits: StepFn,
    init_cache,
    *,
    batch_size: int,
    max_length: int,
    lengths=None,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    bos_id: int = PAD_ID,
) -> jax.Array:
    """Argmax at every step: ids int32 ``[B, T]`` with each row's EOS kept and ``pad_id``
    after it (or from ``lengths[b]`` on, see :func:`beam_search`). Stops early once every
    row has ended."""
    name = "greedy_search"
    B, T = _check_sizes(name, batch_size, max_length)
    eos_id, pad_id, bos_id = _check_ids(name, eos_id, pad_id, bos_id)
    lengths = _row_lengths(name, lengths, B, T)  # [B]
    cache = _check_cache(name, init_cache, B)
    _check_step_fn(name, tokens_to_logits, cache, B, eos_id)

    def body(state):
        step, seqs, done, cache = state
        last = jnp.where(step == 0, bos_id, _column(seqs, step - 1))  # [B]
        logits, cache = tokens_to_logits(last, cache, step)  # [B, V]
        token = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)  # [B]
        token = jnp.where(done, pad_id, token)
        done = done | (token == eos_id) | (step + 1 >= lengths)
        return step + 1, lax.dynamic_update_index_in_dim(seqs, token, step, axis=1), done, cache

    start = (jnp.int32(0), jnp.full((B, T), pad_id, jnp.int32), jnp.zeros((B,), bool), cache)
    _, seqs, _, _ = lax.while_loop(_not_all_done(T), body, start)
    return seqs


def sample(
    tokens_to_logits: StepFn,
    init_cache,
    rng,
    *,
    batch_size: int,
    max_length: int,
    prompt=None,
    max_new_tokens=None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = EOS_ID,
    pad_id: int = PAD_ID,
    bos_id: int = PAD_ID,
    prefill_fn: PrefillFn | None = None,
) -> jax.Array:
    """Ancestral sampling for decoder-only LMs: ids int32 ``[B, T]``.

    The output starts with each row's prompt. Without `prefill_fn` the prompt is fed one
    token per step (teacher forcing, so the cache fills); with it, one call reads
    ``[bos, prompt]`` [B, P + 1] at once and gives each row's logits at the row's prompt
    length, from which its first new token comes; then every row goes on one token per
    step from its own position (the step function gets ``step`` [B]). Both feed the model
    the same tokens at the same positions and draw with the same keys, so (given a step
    function and prefill that agree) they return the same ids.

    Each new token is drawn from ``softmax(logits / temperature)`` restricted first to the
    ``top_k`` largest logits (ties at the k-th are kept) and then to the smallest set of
    tokens whose probability adds up to ``top_p`` (nucleus sampling; the most likely token
    is always kept). A row ends at its first sampled EOS (prompt tokens never end it), after
    its `max_new_tokens`, or at T, and holds ``pad_id`` after it; the loop stops once every
    row has ended (so with prompts of different lengths, short ones do not run on to T).

    Args:
      tokens_to_logits: the step function (module docstring); R = B.
      init_cache: pytree with leaves ``[B, ...]``.
      rng: a PRNG key; the token of row b at position t is drawn with
        ``fold_in(fold_in(rng, t), b)``, so a fixed key reproduces, with or without prefill.
      batch_size: B.
      max_length: T.
      prompt: optional int ``[B, P]`` with P < T, right-padded with ``pad_id`` (row b's
        prompt is the tokens before its first pad).
      max_new_tokens: optional int >= 1, or int ``[B]`` (one per row): row b generates at
        most this many tokens after its prompt (so it ends at column ``prompt length +
        max_new_tokens[b]``, or T if sooner). Default: up to T. Checked when concrete;
        under `jit` clipped to >= 1.
      temperature: >= 0; 0 is argmax (greedy).
      top_k: keep the k largest logits; 0 = off.
      top_p: in ``(0, 1]``; 1 = off.
      eos_id, pad_id, bos_id: as in :func:`beam_search`.
      prefill_fn: optional ``(tokens int32 [B, P + 1], cache, last int32 [B]) -> (logits
        [B, V], cache)``: the positions 0..P at once, returning row b's logits at position
        ``last[b]`` (its prompt length) alone; a row's positions after its prompt hold
        padding, and the step function must overwrite what they left in the cache as the
        row reaches them.
    """
    name = "sample"
    B, T = _check_sizes(name, batch_size, max_length)
    top_k = _nonnegative_int(name, "top_k", top_k)
    temperature = _nonnegative_real(name, "temperature", temperature)
    top_p = _real_in(name, "top_p", top_p, "0 < top_p <= 1", lambda p: 0.0 < p <= 1.0)
    eos_id, pad_id, bos_id = _check_ids(name, eos_id, pad_id, bos_id)
    seqs = jnp.full((B, T), pad_id, jnp.int32)
    prompt_len = jnp.zeros((B,), jnp.int32)
    if prompt is None:
        prompt = jnp.zeros((B, 0), jnp.int32)
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[0] != B or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"{name}: expected an integer prompt [B, P] with B = batch_size = {B}, got "
            f"shape {prompt.shape} and dtype {prompt.dtype}"
        )
    P = prompt.shape[1]
    if P >= T:
        raise ValueError(
            f"{name}: expected the prompt length P < max_length = {T} (room for a "
            f"sampled token), got P = {P}"
        )
    prompt = prompt.astype(jnp.int32)
    # Right-padded: the prompt is everything before the first pad.
    prompt_len = jnp.argmin(
        jnp.concatenate([prompt != pad_id, jnp.zeros((B, 1), bool)], axis=1), axis=1
    ).astype(jnp.int32)  # [B]
    seqs = seqs.at[:, :P].set(prompt)
    # Row b's last column + 1: it ends there (at the latest).
    limit = jnp.minimum(prompt_len + _max_new_tokens(name, max_new_tokens, B), T)  # [B]
    cache = _check_cache(name, init_cache, B)
    per_row = prefill_fn is not None
    if per_row and not callable(prefill_fn):
        raise ValueError(f"{name}: prefill_fn must be callable, got {prefill_fn!r}")
    V = _check_step_fn(name, tokens_to_logits, cache, B, eos_id, per_row_step=per_row)
    if per_row:
        _check_prefill_fn(name, prefill_fn, cache, (B, P + 1), V)

    def draw(logits, column):  # logits [B, V], column int32 [B] -> token int32 [B]
        keys = jax.vmap(lambda t, b: jax.random.fold_in(jax.random.fold_in(rng, t), b))(
            column, jnp.arange(B)
        )  # [B] keys
        return _draw(keys, logits, V, temperature, top_k, top_p)

    if not per_row:

        def body(state):
            step, seqs, done, cache = state
            last = jnp.where(step == 0, bos_id, _column(seqs, step - 1))  # [B]
            logits, cache = tokens_to_logits(last, cache, step)  # [B, V]
            forced = step < prompt_len  # [B]
            drawn = draw(logits, jnp.full((B,), step, jnp.int32))
            token = jnp.where(forced, _column(seqs, step), drawn)  # [B]
            token = jnp.where(done, pad_id, token)
            done = done | (~forced & (token == eos_id)) | (step + 1 >= limit)
            seqs = lax.dynamic_update_index_in_dim(seqs, token, step, axis=1)
            return step + 1, seqs, done, cache

        start = (jnp.int32(0), seqs, jnp.zeros((B,), bool), cache)
        _, seqs, _, _ = lax.while_loop(_not_all_done(T), body, start)
        return seqs

    # Prefill: positions 0..P at once; row b's first new token is at column prompt_len[b].
    fed = jnp.concatenate([jnp.full((B, 1), bos_id, jnp.int32), prompt], axis=1)  # [B, P+1]
    logits, cache = prefill_fn(fed, cache, prompt_len)  # [B, V]

    def emit(seqs, column, logits, done):
        """Draws row b's token at column[b] (pad once done) and writes it where not done."""
        token = jnp.where(done, pad_id, draw(logits, column))  # [B]
        write = (jnp.arange(T)[None, :] == column[:, None]) & ~done[:, None]  # [B, T]
        seqs = jnp.where(write, token[:, None], seqs)
        return seqs, token, done | (token == eos_id) | (column + 1 >= limit)

    seqs, token, done = emit(seqs, prompt_len, logits, jnp.zeros((B,), bool))

    def more(state):
        return ~jnp.all(state[2])

    def step_body(state):
        column, seqs, done, cache, last = state
        column = jnp.where(done, column, column + 1)  # [B]: the column predicted now
        logits, cache = tokens_to_logits(last, cache, column)  # [B, V]
        seqs, token, done = emit(seqs, column, logits, done)
        return column, seqs, done, cache, token

    _, seqs, _, _, _ = lax.while_loop(more, step_body, (prompt_len, seqs, done, cache, token))
    return seqs


def _draw(keys, logits, V, temperature, top_k, top_p):
    """One token per row from logits [B, V] with row b's key ``keys[b]`` -> int32 [B] (see
    :func:`sample`)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    if _static(temperature) == 0.0:
        return greedy
    temperature = jnp.asarray(temperature, jnp.float32)
    # A traced temperature may be 0: divide by 1 instead and pick the argmax below.
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)  # [B, V]
    if 0 < top_k < V:
        kth = lax.top_k(scaled, top_k)[0][:, -1:]  # [B, 1]
        scaled = jnp.where(scaled >= kth, scaled, -jnp.inf)
    if _static(top_p) != 1.0:
        ordered = lax.top_k(scaled, V)[0]  # [B, V], descending
        probs = jax.nn.softmax(ordered, axis=-1)
        above = jnp.cumsum(probs, axis=-1) - probs  # [B, V]: mass of the tokens before
        keep = (above < top_p) | (top_p >= 1.0) | (jnp.arange(V) == 0)[None, :]
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)  # [B]
    return jnp.where(temperature > 0, drawn, greedy)


def _not_all_done(T):
    def more(state):
        step, _, done, _ = state
        return (step < T) & ~jnp.all(done)

    return more


def _column(seqs, t):
    """seqs [..., T] at the traced position ``max(t, 0)`` -> [...]."""
    return lax.dynamic_index_in_dim(seqs, jnp.maximum(t, 0), axis=-1, keepdims=False)


# ---- Argument checks (at the boundary; traced values are checked where they can be). ----


def _static(x):
    """The Python float value of `x`, or None when it is traced."""
    if isinstance(x, jax.core.Tracer):
        return None
    return float(np.asarray(x))


def _positive_int(fn, name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{fn}: expected {name} to be a positive int, got {value!r}")
    return int(value)


def _nonnegative_int(fn, name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{fn}: expected {name} to be an int >= 0, got {value!r}")
    return int(value)


def _check_sizes(fn, batch_size, max_length) -> tuple[int, int]:
    """-> (B, T), both positive ints."""
    return _positive_int(fn, "batch_size", batch_size), _positive_int(fn, "max_length", max_length)


def _check_ids(fn, eos_id, pad_id, bos_id) -> tuple[int, int, int]:
    """-> (eos_id, pad_id, bos_id), each an int >= 0 (``eos_id < V`` is `_check_step_fn`'s)."""
    ids = (("eos_id", eos_id), ("pad_id", pad_id), ("bos_id", bos_id))
    return tuple(_nonnegative_int(fn, name, value) for name, value in ids)


def _real_in(fn, name, value, rule, ok):
    if isinstance(value, bool) or jnp.ndim(value) != 0:
        raise ValueError(f"{fn}: expected {name} to be a real scalar ({rule}), got {value!r}")
    v = _static(value)
    if v is not None and not (np.isfinite(v) and ok(v)):
        raise ValueError(f"{fn}: expected {name} with {rule}, got {v!r}")
    return value


def _nonnegative_real(fn, name, value):
    return _real_in(fn, name, value, f"{name} >= 0", lambda v: v >= 0.0)


def _row_lengths(fn, lengths, B, T):
    """-> int32 [B]: the rows' maximum output lengths (default T)."""
    if lengths is None:
        return jnp.full((B,), T, jnp.int32)
    lengths = jnp.asarray(lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"{fn}: expected integer lengths [B] with B = batch_size = {B}, got shape "
            f"{lengths.shape} and dtype {lengths.dtype}"
        )
    if not isinstance(lengths, jax.core.Tracer):
        bad = np.asarray(lengths)
        if np.any(bad < 1) or np.any(bad > T):
            raise ValueError(
                f"{fn}: expected every length in [1, max_length = {T}], got {bad.tolist()}"
            )
    return jnp.clip(lengths.astype(jnp.int32), 1, T)


def _max_new_tokens(fn, max_new_tokens, B):
    """-> int32 [B]: each row's most new tokens (default: no limit before T)."""
    if max_new_tokens is None:
        return jnp.full((B,), np.iinfo(np.int32).max // 2, jnp.int32)
    value = jnp.asarray(max_new_tokens)
    if (
        isinstance(max_new_tokens, bool)
        or value.shape not in ((), (B,))
        or not jnp.issubdtype(value.dtype, jnp.integer)
    ):
        raise ValueError(
            f"{fn}: expected max_new_tokens to be an int or integer [B] with B = batch_size "
            f"= {B}, got {max_new_tokens!r}"
        )
    if not isinstance(value, jax.core.Tracer) and np.any(np.asarray(value) < 1):
        raise ValueError(f"{fn}: expected max_new_tokens >= 1, got {np.asarray(value).tolist()}")
    return jnp.broadcast_to(jnp.maximum(value.astype(jnp.int32), 1), (B,))


def _check_cache(fn, cache, B):
    """-> the cache as JAX arrays, once every leaf is checked to lead with B."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        shape = jnp.shape(leaf)
        if not shape or shape[0] != B:
            raise ValueError(
                f"{fn}: every cache leaf must lead with B = batch_size = {B}, got shape "
                f"{shape} at {jax.tree_util.keystr(path)}"
            )
    return jax.tree.map(jnp.asarray, cache)


def _check_step_fn(fn, tokens_to_logits, cache, R, eos_id, per_row_step=False) -> int:
    """Traces one step abstractly (``step`` int32 [] or, `per_row_step`, [R]); checks
    ``(logits [R, V], cache like the input)``; -> V."""
    if not callable(tokens_to_logits):
        raise ValueError(f"{fn}: tokens_to_logits must be callable, got {tokens_to_logits!r}")
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)
    tokens = jax.ShapeDtypeStruct((R,), jnp.int32)
    step = jax.ShapeDtypeStruct((R,) if per_row_step else (), jnp.int32)
    out = jax.eval_shape(tokens_to_logits, tokens, spec, step)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"{fn}: tokens_to_logits must return (logits, cache), got {out}")
    logits, new = out
    if (
        not hasattr(logits, "shape")
        or len(logits.shape) != 2
        or logits.shape[0] != R
        or not jnp.issubdtype(logits.dtype, jnp.floating)
    ):
        raise ValueError(
            f"{fn}: expected float logits [R = {R}, V] from tokens_to_logits, got {logits}"
        )

    _check_same_cache(fn, "tokens_to_logits", spec, new)
    V = logits.shape[1]
    if eos_id >= V:
        raise ValueError(f"{fn}: expected eos_id < V = {V} (the logits' width), got {eos_id}")
    return V


def _check_same_cache(fn, what, spec, new):
    def shapes(tree):
        return [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]

    if jax.tree.structure(new) != jax.tree.structure(spec) or shapes(new) != shapes(spec):
        raise ValueError(
            f"{fn}: {what} must return a cache of the same structure, shapes and "
            f"dtypes as it was given; expected {spec}, got {new}"
        )


def _check_prefill_fn(fn, prefill_fn, cache, shape, V):
    """Traces the prefill abstractly on tokens `shape` [B, P + 1] and ``last`` int32 [B];
    checks ``(logits [B, V], cache like the input)``."""
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), cache)
    B = shape[0]
    out = jax.eval_shape(
        prefill_fn,
        jax.ShapeDtypeStruct(shape, jnp.int32),
        spec,
        jax.ShapeDtypeStruct((B,), jnp.int32),
    )
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(f"{fn}: prefill_fn must return (logits, cache), got {out}")
    logits, new = out
    if (
        not hasattr(logits, "shape")
        or tuple(logits.shape) != (B, V)
        or not jnp.issubdtype(logits.dtype, jnp.floating)
    ):
        raise ValueError(
            f"{fn}: expected float logits [B, V] = {(B, V)} (each row's at its prompt "
            f"length) from prefill_fn, got {logits}"
        )
    _check_same_cache(fn, "prefill_fn", spec, new)
