"""Search algorithms against independent float64 NumPy references.

The step functions here score a tiny vocabulary (V = 4: pad 0, EOS 1, tokens 2 and 3 — pad
is an ordinary token to the search) from the whole prefix: the cache holds the tokens fed
so far, and the logits are a random table indexed by (row, step, hash of the prefix). Beam
search must then reorder the cache correctly to score anything right. The reference
enumerates every sequence (ending at EOS or at the row's length) in float64.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.decode import search

PAD, EOS, BOS = 0, 1, 0
V = 4
M = 5  # prefix hash buckets


# ---- Step functions and their float64 twins. ----


class Table:
    """Random logits [R, T, M, V] looked up by (row id, step, prefix hash mod M).

    ``step_fn`` is the JAX step function (cache: the fed prefix [N, T] and the row id [N]);
    ``logp(row, fed)`` the float64 reference for the next token after the fed tokens
    ``[BOS, y_0, ..., y_{t-1}]``."""

    def __init__(self, rng, rows, T, *, scale=1.5, eos_logit=None):
        table = rng.normal(size=(rows, T, M, V)) * scale
        if eos_logit is not None:
            table[..., EOS] = eos_logit
        self.table = table.astype(np.float32)
        self.weights = rng.integers(1, 50, size=T)
        self.T = T

    def cache(self, rows):
        rows = np.asarray(rows, np.int32)
        return {"prefix": jnp.zeros((len(rows), self.T), jnp.int32), "row": jnp.asarray(rows)}

    def step_fn(self, tokens, cache, step):
        prefix = jax.lax.dynamic_update_index_in_dim(cache["prefix"], tokens, step, axis=1)
        h = jnp.sum(prefix * jnp.asarray(self.weights)[None, :], axis=1) % M  # [N]
        logits = jnp.asarray(self.table)[cache["row"], step, h]  # [N, V]
        return logits, {**cache, "prefix": prefix}

    def logp(self, row, fed):
        h = int(np.dot(fed, self.weights[: len(fed)])) % M
        return _log_softmax64(self.table[row, len(fed) - 1, h])


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = np.max(x)
    return x - m - np.log(np.sum(np.exp(x - m)))


def _bigram(probs):
    """Step function whose next-token distribution depends only on the last token:
    ``probs[last]`` [V]; no cache (an empty pytree). -> (step_fn, reference logp)."""
    with np.errstate(divide="ignore"):
        logits = np.log(np.asarray(probs, np.float64))  # [V (last), V]

    def step_fn(tokens, cache, step):
        return jnp.asarray(logits, jnp.float32)[tokens], cache

    def logp(row, fed):
        return _log_softmax64(logits[fed[-1]].astype(np.float32))

    return step_fn, logp


def _gnmt(length, alpha):
    return ((5.0 + length) / 6.0) ** alpha


def enumerate_all(logp, row, n, alpha):
    """Every sequence of nonzero probability that ends at EOS or at length n (the row's limit):
    {tokens: (log P, score)} in float64."""
    out = {}

    def grow(y, lp):
        nxt = logp(row, [BOS, *y])
        for tok in range(V):
            if not np.isfinite(nxt[tok]):
                continue
            seq, total = (*y, tok), lp + nxt[tok]
            if tok == EOS or len(seq) == n:
                out[seq] = (total, total / _gnmt(len(seq), alpha))
            else:
                grow(seq, total)

    grow((), 0.0)
    return out


def parse(seq, n):
    """Output row -> its tokens (through the first EOS, else the first n); checks that
    everything after them is pad."""
    seq = [int(x) for x in seq]
    end = seq.index(EOS) + 1 if EOS in seq[:n] else n
    assert all(x == PAD for x in seq[end:]), f"not padded after the end: {seq} (length {n})"
    return tuple(seq[:end])


def ref_score(logp, row, tokens, alpha):
    total = sum(logp(row, [BOS, *tokens[:i]])[tok] for i, tok in enumerate(tokens))
    return total / _gnmt(len(tokens), alpha)


def ref_greedy(logp, row, n):
    y = []
    while len(y) < n and (not y or y[-1] != EOS):
        y.append(int(np.argmax(logp(row, [BOS, *y]))))
    return tuple(y)


def _beam(step_fn, cache, **kw):
    seqs, scores = search.beam_search(step_fn, cache, **kw)
    return np.asarray(seqs), np.asarray(scores, np.float64)


# ---- Beam search. ----


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_exhaustive_beam_is_exact_top_k(alpha):
    # K = 3^(T-1) holds every non-EOS prefix, so the finished set must be the exact top K of
    # all sequences; per-row lengths 5, 3, 4 (with row-specific tables) in one batch.
    T, lengths = 5, [5, 3, 4]
    K = 3 ** (T - 1)
    table = Table(np.random.default_rng(1), 3, T)
    seqs, scores = _beam(
        table.step_fn, table.cache([0, 1, 2]), batch_size=3, beam_size=K, alpha=alpha,
        max_length=T, lengths=np.array(lengths, np.int32),
    )  # fmt: skip
    assert seqs.shape == (3, K, T) and scores.shape == (3, K)
    for b, n in enumerate(lengths):
        every = enumerate_all(table.logp, b, n, alpha)
        ranked = sorted(every.items(), key=lambda kv: -kv[1][1])
        want = np.full(K, -np.inf)
        top = [s for _, (_, s) in ranked[:K]]
        want[: len(top)] = top
        np.testing.assert_allclose(scores[b], want, atol=1e-5)
        assert ranked[0][1][1] - ranked[1][1][1] > 1e-4  # the best is unambiguous
        assert parse(seqs[b, 0], n) == ranked[0][0]
        for k in range(min(K, len(every))):
            tokens = parse(seqs[b, k], n)
            assert abs(every[tokens][1] - scores[b, k]) < 1e-5
        assert len({parse(s, n) for s in seqs[b, : len(every)]}) == min(K, len(every))
        assert np.all(seqs[b, len(every) :] == PAD)  # empty slots: pad, score -inf


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("beam_size", [2, 3])
def test_small_beam_returns_valid_sequences_with_their_scores(seed, beam_size):
    T, lengths, alpha = 6, [6, 4], 0.6
    table = Table(np.random.default_rng(seed), 2, T)
    seqs, scores = _beam(
        table.step_fn, table.cache([0, 1]), batch_size=2, beam_size=beam_size, alpha=alpha,
        max_length=T, lengths=np.array(lengths, np.int32),
    )  # fmt: skip
    for b, n in enumerate(lengths):
        assert np.all(np.diff(scores[b]) <= 0), scores[b]  # best first
        found = [parse(s, n) for s in seqs[b]]
        assert len(set(found)) == beam_size
        for tokens, score in zip(found, scores[b], strict=True):
            np.testing.assert_allclose(score, ref_score(table.logp, b, tokens, alpha), atol=1e-5)
        best = max(s for _, s in enumerate_all(table.logp, b, n, alpha).values())
        assert scores[b, 0] <= best + 1e-5


def test_beam_finds_what_greedy_misses():
    # First token 2 (p = 0.6) has only poor continuations; 3 (p = 0.4) is then followed by
    # EOS with p = 0.98. Greedy takes 2, 2, 2 (p = 0.078); beam search with K = 2 finds
    # [3, EOS] (p = 0.392), which the brute force confirms as the best.
    probs = np.array(
        [
            [0.0, 0.0, 0.6, 0.4],  # after BOS (= pad)
            [0.25, 0.25, 0.25, 0.25],  # after EOS (never used)
            [0.0, 0.3, 0.36, 0.34],  # after 2
            [0.0, 0.98, 0.01, 0.01],  # after 3
        ]
    )
    step_fn, logp = _bigram(probs)
    every = enumerate_all(logp, 0, 3, 0.6)
    assert max(every, key=lambda y: every[y][1]) == (3, EOS)
    greedy = search.greedy_search(step_fn, {}, batch_size=1, max_length=3)
    np.testing.assert_array_equal(greedy, [[2, 2, 2]])
    seqs, scores = _beam(step_fn, {}, batch_size=1, beam_size=2, alpha=0.6, max_length=3)
    np.testing.assert_array_equal(seqs[0, 0], [3, EOS, PAD])
    np.testing.assert_allclose(scores[0, 0], math.log(0.4 * 0.98) / _gnmt(2, 0.6), atol=1e-6)


def test_beam_of_one_is_greedy_without_eos():
    # With EOS impossible, K = 1 keeps exactly the argmax path and finishes it at the row's
    # length, as greedy does (batch, per-row lengths). With EOS possible the two differ in
    # general (the test below): beam search also keeps every EOS extension it passes.
    T, lengths = 6, np.array([6, 2, 4], np.int32)
    table = Table(np.random.default_rng(5), 3, T, eos_logit=-np.inf)
    cache = table.cache([0, 1, 2])
    kw = dict(batch_size=3, max_length=T, lengths=lengths)
    greedy = np.asarray(search.greedy_search(table.step_fn, cache, **kw))
    seqs, _ = _beam(table.step_fn, cache, beam_size=1, **kw)
    np.testing.assert_array_equal(seqs[:, 0], greedy)
    for b, n in enumerate(lengths):
        assert parse(greedy[b], n) == ref_greedy(table.logp, b, n)


@pytest.mark.parametrize("seed", [6, 7])
def test_beam_of_one_scores_at_least_greedy(seed):
    # Greedy's output is always one of the candidates a K = 1 beam keeps (the beam follows
    # the best non-EOS token, and greedy's EOS, or its last token, is an extension of it).
    T, lengths, alpha = 6, np.array([6, 3, 5, 6], np.int32), 0.6
    table = Table(np.random.default_rng(seed), 4, T, scale=1.0)
    cache = table.cache([0, 1, 2, 3])
    kw = dict(batch_size=4, max_length=T, lengths=lengths)
    greedy = np.asarray(search.greedy_search(table.step_fn, cache, **kw))
    _, scores = _beam(table.step_fn, cache, beam_size=1, alpha=alpha, **kw)
    for b, n in enumerate(lengths):
        tokens = parse(greedy[b], n)
        assert tokens == ref_greedy(table.logp, b, n)
        assert scores[b, 0] >= ref_score(table.logp, b, tokens, alpha) - 1e-5


def test_eos_first_gives_eos_then_pad():
    probs = np.full((V, V), 0.01)
    probs[:, EOS] = 0.97
    step_fn, _ = _bigram(probs)
    seqs, scores = _beam(step_fn, {}, batch_size=2, beam_size=3, max_length=5)
    np.testing.assert_array_equal(seqs[:, 0], [[EOS, PAD, PAD, PAD, PAD]] * 2)
    np.testing.assert_allclose(scores[:, 0], math.log(0.97) / _gnmt(1, 0.6), atol=1e-6)
    for s in seqs.reshape(-1, 5):
        parse(s, 5)  # every beam: pad after its EOS
    greedy = search.greedy_search(step_fn, {}, batch_size=2, max_length=5)
    np.testing.assert_array_equal(greedy, [[EOS, PAD, PAD, PAD, PAD]] * 2)
    drawn = search.sample(step_fn, {}, jax.random.key(0), batch_size=2, max_length=5, temperature=0)
    np.testing.assert_array_equal(drawn, [[EOS, PAD, PAD, PAD, PAD]] * 2)


def test_beam_stops_early():
    # EOS has p ~ 0.99986 at every step: after a few steps no alive beam (log P ~ -10 per
    # token) can beat the finished ones even with the penalty at length 50.
    logits = np.zeros((V, V), np.float32)
    logits[:, EOS] = 10.0
    steps = []

    def step_fn(tokens, cache, step):
        jax.debug.callback(steps.append, step)
        return jnp.asarray(logits)[tokens], cache

    seqs, _ = _beam(step_fn, {}, batch_size=1, beam_size=2, max_length=50)
    np.testing.assert_array_equal(seqs[0, 0, :2], [EOS, PAD])
    assert 1 < len(steps) < 10, len(steps)


@pytest.mark.parametrize("beam_size", [1, 2])
def test_early_stop_keeps_long_winners(beam_size):
    # alpha = 2 rewards length: [EOS] (p = 0.5) is found first, but 2, 2, 2, 2, 2, 2 (p =
    # 0.5 * 0.9^5) scores better. The stopping bound must use the penalty at the row's
    # length, not the alive beam's current one, or the search would stop at step 1.
    probs = np.array(
        [[0.0, 0.5, 0.5, 0.0], [0.25] * 4, [0.0, 0.1, 0.9, 0.0], [0.25] * 4]
    )  # rows: after BOS, EOS, 2, 3
    step_fn, logp = _bigram(probs)
    every = enumerate_all(logp, 0, 6, 2.0)
    best = max(every, key=lambda y: every[y][1])
    assert best == (2,) * 6
    seqs, scores = _beam(step_fn, {}, batch_size=1, beam_size=beam_size, alpha=2.0, max_length=6)
    assert parse(seqs[0, 0], 6) == best
    np.testing.assert_allclose(scores[0, 0], every[best][1], atol=1e-6)


def test_beam_and_greedy_under_jit_batched_equal_per_row():
    T, alpha = 6, 0.6
    table = Table(np.random.default_rng(8), 3, T)
    lengths = np.array([6, 3, 5], np.int32)

    @functools.partial(jax.jit, static_argnames="batch_size")
    def run(cache, lengths, batch_size):
        kw = dict(batch_size=batch_size, max_length=T, lengths=lengths)
        beams = search.beam_search(table.step_fn, cache, beam_size=3, alpha=alpha, **kw)
        return beams, search.greedy_search(table.step_fn, cache, **kw)

    (seqs, scores), greedy = run(table.cache([0, 1, 2]), lengths, 3)
    eager_seqs, eager_scores = _beam(
        table.step_fn, table.cache([0, 1, 2]), batch_size=3, beam_size=3, alpha=alpha,
        max_length=T, lengths=lengths,
    )  # fmt: skip
    np.testing.assert_array_equal(seqs, eager_seqs)
    np.testing.assert_allclose(scores, eager_scores, atol=1e-6)
    for b in range(3):
        (one, one_scores), one_greedy = run(table.cache([b]), lengths[b : b + 1], 1)
        np.testing.assert_array_equal(one[0], seqs[b])
        np.testing.assert_allclose(one_scores[0], scores[b], atol=1e-6)
        np.testing.assert_array_equal(one_greedy[0], greedy[b])


# ---- Sampling. ----


def _sample(step_fn, cache, key=0, **kw):
    return np.asarray(search.sample(step_fn, cache, jax.random.key(key), **kw))


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 0.0},
        {"temperature": 1e-6},
        {"top_k": 1},
        {"top_p": 1e-6},
        {"top_k": 3, "top_p": 1e-6, "temperature": 2.0},
    ],
    ids=["t0", "t1e-6", "topk1", "topp-tiny", "all"],
)
def test_degenerate_sampling_is_greedy(settings):
    T = 7
    table = Table(np.random.default_rng(9), 4, T)
    cache = table.cache([0, 1, 2, 3])
    greedy = np.asarray(search.greedy_search(table.step_fn, cache, batch_size=4, max_length=T))
    drawn = _sample(table.step_fn, cache, batch_size=4, max_length=T, **settings)
    np.testing.assert_array_equal(drawn, greedy)


def test_sampling_is_reproducible_and_depends_on_the_key():
    step_fn, _ = _bigram(np.full((V, V), 0.25))  # flat: EOS ends a row at 1/4 per step
    kw = dict(batch_size=8, max_length=10)
    first = _sample(step_fn, {}, 0, **kw)
    np.testing.assert_array_equal(first, _sample(step_fn, {}, 0, **kw))
    assert not np.array_equal(first, _sample(step_fn, {}, 1, **kw))
    for row in first:
        parse(row, 10)  # pad after the first EOS


def _expected_distribution(logits, temperature, top_k, top_p):
    """Float64 reference for one draw: softmax(logits / t), top-k, then nucleus."""
    p = np.exp(_log_softmax64(np.asarray(logits, np.float64) / temperature))
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    keep[order[: top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / np.sum(np.where(keep, p, 0.0))
    before = np.cumsum(p[order]) - p[order]
    nucleus = np.zeros(len(p), bool)
    nucleus[order[before < top_p]] = True
    return np.where(nucleus, p, 0.0) / np.sum(np.where(nucleus, p, 0.0))


DIST_LOGITS = np.array([0.3, -1.0, 1.2, 0.0, 0.9, -0.4], np.float32)  # V = 6 here


@functools.cache
def _first_tokens(top_k):
    """jit(key, temperature, top_p) -> one sampled token for each of 20,000 rows [n]; the
    temperature and top_p are traced, so each top_k compiles once."""

    def step_fn(tokens, cache, step):
        return jnp.broadcast_to(jnp.asarray(DIST_LOGITS), (tokens.shape[0], 6)), cache

    @jax.jit
    def run(key, temperature, top_p):
        return search.sample(
            step_fn, {}, key, batch_size=20_000, max_length=1, temperature=temperature,
            top_k=top_k, top_p=top_p,
        )[:, 0]  # fmt: skip

    return run


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 0, 0.8), (1.0, 2, 1.0), (2.0, 4, 0.7)],
)
def test_first_token_distribution(temperature, top_k, top_p):
    drawn = np.asarray(_first_tokens(top_k)(jax.random.key(3), temperature, top_p))
    n = len(drawn)
    freq = np.bincount(drawn, minlength=6) / n
    p = _expected_distribution(DIST_LOGITS, temperature, top_k, top_p)
    assert np.all(freq[p == 0] == 0), (freq, p)  # never outside the top k / nucleus
    tol = 5 * np.sqrt(p * (1 - p) / n) + 1e-12
    assert np.all(np.abs(freq - p) <= tol), (freq, p)


def test_prompt_is_kept_and_fed_in_order():
    T, B = 8, 3
    prompt = np.array([[2, 3, 2, 0], [3, 0, 0, 0], [2, 2, 3, 3]], np.int32)  # lengths 3, 1, 4
    lens = [3, 1, 4]
    table = Table(np.random.default_rng(10), B, T, eos_logit=-1.0)
    seen = []  # (step, prefix cache after the write) for every step

    def step_fn(tokens, cache, step):
        logits, cache = table.step_fn(tokens, cache, step)
        jax.debug.callback(lambda s, p: seen.append((int(s), np.asarray(p))), step, cache["prefix"])
        return logits, cache

    out = _sample(step_fn, table.cache(range(B)), 4, batch_size=B, max_length=T, prompt=prompt)
    for b in range(B):
        np.testing.assert_array_equal(out[b, : lens[b]], prompt[b, : lens[b]])
        parse(out[b], T)
    fed = np.concatenate([np.full((B, 1), BOS), out[:, :-1]], axis=1)  # [B, T]
    assert [s for s, _ in seen] == list(range(len(seen)))
    for s, prefix in seen:
        np.testing.assert_array_equal(prefix[:, : s + 1], fed[:, : s + 1])


def test_sample_under_jit_equals_eager():
    T = 8
    table = Table(np.random.default_rng(11), 2, T)
    prompt = np.array([[2, 3, 0], [3, 0, 0]], np.int32)
    kw = dict(batch_size=2, max_length=T, top_k=3, top_p=0.9)

    @jax.jit
    def run(cache, key, prompt, temperature, top_p):
        return search.sample(
            table.step_fn, cache, key, batch_size=2, max_length=T, prompt=prompt,
            temperature=temperature, top_k=3, top_p=top_p,
        )  # fmt: skip

    key = jax.random.key(5)
    eager = search.sample(table.step_fn, table.cache([0, 1]), key, prompt=prompt, **kw)
    jitted = run(table.cache([0, 1]), key, prompt, 1.0, 0.9)
    np.testing.assert_array_equal(jitted, eager)
    # A traced temperature of 0 is still greedy.
    greedy = search.greedy_search(table.step_fn, table.cache([0, 1]), batch_size=2, max_length=T)
    no_prompt = np.full((2, 0), PAD, np.int32)
    np.testing.assert_array_equal(run(table.cache([0, 1]), key, no_prompt, 0.0, 0.9), greedy)


def _prefix_step_fn(table):
    """A Table step function that also takes per-row steps [N] and hashes only the prefix
    up to each row's step (slots after it may hold a prefill's padding, as in the model's
    cache), and a prefill that runs it position by position."""

    def step_fn(tokens, cache, step):
        N, T = cache["prefix"].shape
        step = jnp.broadcast_to(step, (N,))
        here = jnp.arange(T)[None, :] == step[:, None]  # [N, T]
        prefix = jnp.where(here, tokens[:, None], cache["prefix"])
        seen = jnp.where(jnp.arange(T)[None, :] <= step[:, None], prefix, 0)
        h = jnp.sum(seen * jnp.asarray(table.weights)[None, :], axis=1) % M  # [N]
        return jnp.asarray(table.table)[cache["row"], step, h], {**cache, "prefix": prefix}

    def prefill_fn(tokens, cache, last):
        out = []
        for t in range(tokens.shape[1]):
            logits, cache = step_fn(tokens[:, t], cache, jnp.int32(t))
            out.append(logits)
        every = jnp.stack(out, axis=1)  # [N, P, V]
        return jnp.take_along_axis(every, last[:, None, None], axis=1)[:, 0], cache

    return step_fn, prefill_fn


@pytest.mark.parametrize(
    "settings",
    [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 1.5, "top_k": 3, "top_p": 0.9}],
    ids=["greedy", "t1", "all"],
)
def test_prefill_gives_the_ids_of_feeding_the_prompt(settings):
    T, B = 9, 4
    prompt = np.array([[2, 3, 2, 0], [3, 0, 0, 0], [2, 2, 3, 3], [0, 0, 0, 0]], np.int32)
    table = Table(np.random.default_rng(12), B, T, eos_logit=-0.5)
    step_fn, prefill_fn = _prefix_step_fn(table)
    kw = dict(batch_size=B, max_length=T, prompt=prompt, **settings)
    for key in range(3):
        fed = _sample(step_fn, table.cache(range(B)), key, **kw)
        pre = _sample(step_fn, table.cache(range(B)), key, prefill_fn=prefill_fn, **kw)
        np.testing.assert_array_equal(pre, fed)
        for b, n in enumerate([3, 1, 4, 0]):
            np.testing.assert_array_equal(pre[b, :n], prompt[b, :n])
            parse(pre[b], T)


def _sample_by_hand(table, prompt, limits, T):
    """Greedy over the Table in float64, one row at a time: row b copies its prompt, then
    takes the argmax until EOS or column ``limits[b]`` (exclusive); pad after."""
    out = np.full((len(prompt), T), PAD, np.int32)
    for b, row in enumerate(prompt):
        n = int(np.argmin(np.append(row != PAD, False)))
        out[b, :n] = row[:n]
        for t in range(n, limits[b]):
            fed = np.concatenate([[BOS], out[b, :t]])
            out[b, t] = int(np.argmax(table.logp(b, fed)))
            if out[b, t] == EOS:
                break
    return out


@pytest.mark.parametrize("prefill", [False, True], ids=["fed", "prefill"])
def test_per_row_max_new_tokens(prefill):
    """Row b stops after max_new_tokens[b] new tokens, counted from its own prompt length,
    and the loop ends when the last row does (not at T)."""
    T, B = 12, 4
    prompt = np.array([[2, 3, 2, 0], [3, 0, 0, 0], [2, 2, 3, 3], [0, 0, 0, 0]], np.int32)
    lens, new = np.array([3, 1, 4, 0]), np.array([2, 3, 1, 4])
    table = Table(np.random.default_rng(13), B, T, eos_logit=-9.0)  # EOS never wins
    step_fn, prefill_fn = _prefix_step_fn(table)
    steps = []  # the step argument of every call of the step function

    def counted(tokens, cache, step):
        jax.debug.callback(lambda s: steps.append(np.asarray(s)), step)
        return step_fn(tokens, cache, step)

    got = _sample(counted, table.cache(range(B)), 0, batch_size=B, max_length=T,
                  prompt=prompt, max_new_tokens=new, temperature=0.0,
                  prefill_fn=prefill_fn if prefill else None)  # fmt: skip
    limits = lens + new  # [5, 4, 5, 4]: every row ends well before T
    np.testing.assert_array_equal(got, _sample_by_hand(table, prompt, limits, T))
    assert np.all(got[np.arange(T)[None, :] >= limits[:, None]] == PAD)
    # Fed: one call per column up to the last row's end. Prefill: the first new token
    # comes from the prefill, then one call per further token of the longest-running row.
    assert len(steps) == (max(limits) if not prefill else max(new) - 1), steps
    # An int limits every row alike, and T caps it.
    same = _sample(step_fn, table.cache(range(B)), 0, batch_size=B, max_length=T,
                   prompt=prompt, max_new_tokens=20, temperature=0.0,
                   prefill_fn=prefill_fn if prefill else None)  # fmt: skip
    np.testing.assert_array_equal(same, _sample_by_hand(table, prompt, [T] * B, T))


# ---- Bad arguments. ----

_T = Table(np.random.default_rng(0), 2, 4)
_C = _T.cache([0, 1])
_KEY = jax.random.key(0)


def _bs(**kw):
    return search.beam_search(_T.step_fn, _C, **{"batch_size": 2, "max_length": 4, **kw})


def _gs(**kw):
    return search.greedy_search(_T.step_fn, _C, **{"batch_size": 2, "max_length": 4, **kw})


def _sa(**kw):
    return search.sample(_T.step_fn, _C, _KEY, **{"batch_size": 2, "max_length": 4, **kw})


_PS = _prefix_step_fn(_T)[0]  # takes per-row steps, as sample with a prefill_fn needs


def _wrong_logits(tokens, cache, step):
    return jnp.zeros((tokens.shape[0], 2, V)), cache


def _wrong_cache(tokens, cache, step):
    return jnp.zeros((tokens.shape[0], V)), {**cache, "row": cache["row"].astype(jnp.float32)}


BAD = [
    (lambda: _bs(beam_size=0), "beam_search: expected beam_size to be a positive int, got 0"),
    (lambda: _bs(alpha=-0.1), "beam_search: expected alpha with alpha >= 0, got -0.1"),
    (lambda: _bs(max_length=0), "expected max_length to be a positive int, got 0"),
    (lambda: _bs(batch_size=3), "every cache leaf must lead with B = batch_size = 3"),
    (lambda: _bs(lengths=np.array([4])), "expected integer lengths [B] with B = batch_size = 2"),
    (lambda: _bs(lengths=np.array([4, 5])), "expected every length in [1, max_length = 4]"),
    (lambda: _gs(lengths=np.array([0, 2])), "expected every length in [1, max_length = 4]"),
    (lambda: _gs(lengths=np.array([2.0, 2.0])), "got shape (2,) and dtype float"),
    (lambda: _gs(eos_id=-1), "greedy_search: expected eos_id to be an int >= 0, got -1"),
    (lambda: _gs(eos_id=4), "expected eos_id < V = 4"),
    (lambda: _sa(temperature=-1.0), "sample: expected temperature with temperature >= 0"),
    (lambda: _sa(top_k=-1), "sample: expected top_k to be an int >= 0, got -1"),
    (lambda: _sa(top_p=0.0), "sample: expected top_p with 0 < top_p <= 1, got 0.0"),
    (lambda: _sa(top_p=1.5), "sample: expected top_p with 0 < top_p <= 1, got 1.5"),
    (
        lambda: _sa(prompt=np.zeros((2, 4), np.int32)),
        "expected the prompt length P < max_length = 4",
    ),
    (lambda: _sa(prompt=np.zeros((3, 2), np.int32)), "expected an integer prompt [B, P]"),
    (
        lambda: search.sample(
            _PS,
            _C,
            _KEY,
            batch_size=2,
            max_length=4,
            prompt=np.zeros((2, 2), np.int32),
            prefill_fn=lambda t, c, last: (jnp.zeros((*t.shape, V)), c),
        ),
        "expected float logits [B, V] = (2, 4) (each row's at its prompt length) from prefill_fn",
    ),
    (lambda: _sa(max_new_tokens=0), "sample: expected max_new_tokens >= 1, got 0"),
    (lambda: _sa(max_new_tokens=np.array([2, 0])), "expected max_new_tokens >= 1, got [2, 0]"),
    (
        lambda: _sa(max_new_tokens=np.array([1, 2, 3])),
        "expected max_new_tokens to be an int or integer [B] with B = batch_size = 2",
    ),
    (lambda: _sa(max_new_tokens=1.5), "expected max_new_tokens to be an int or integer [B]"),
    (
        lambda: search.sample(_PS, _C, _KEY, batch_size=2, max_length=4, prefill_fn=3),
        "prefill_fn must be callable, got 3",
    ),
    (
        lambda: search.greedy_search(_wrong_logits, _C, batch_size=2, max_length=4),
        "expected float logits [R = 2, V]",
    ),
    (
        lambda: search.beam_search(_wrong_cache, _C, batch_size=2, max_length=4),
        "must return a cache of the same structure, shapes and dtypes",
    ),
    (
        lambda: search.greedy_search(_T.step_fn, {"x": jnp.zeros(())}, batch_size=2, max_length=4),
        "every cache leaf must lead with B = batch_size = 2, got shape () at ['x']",
    ),
]


@pytest.mark.parametrize(("call", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_traced_arguments_are_not_checked_by_value():
    # Under jit the values of lengths / temperature / top_p are unknown: no error, and
    # lengths are clipped to [1, max_length].
    @jax.jit
    def run(lengths):
        return search.greedy_search(_T.step_fn, _C, batch_size=2, max_length=4, lengths=lengths)

    np.testing.assert_array_equal(
        run(np.array([9, 4], np.int32)), _gs(lengths=np.array([4, 4], np.int32))
    )
