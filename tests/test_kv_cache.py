"""KV cache: incremental decoding gives the full recompute's logits at every step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import Transformer, TransformerConfig, TransformerLM
from attention_jax.decode import decoding
from attention_jax.nn.model import shift_right

# Padding in the batch: sources of length 5 and 3, targets of length 4 and 6.
INPUTS = jnp.array([[5, 6, 7, 8, 1], [9, 10, 1, 0, 0]])
TARGETS = jnp.array([[11, 12, 13, 1, 0, 0], [14, 15, 16, 17, 18, 1]])


def _in_blocks(run, cache, tokens, first=1):
    """Feeds tokens [B, T] through the cache: positions 0..first-1 as one block, then one
    position per call; returns the logits [B, T, V]."""
    B, T = tokens.shape
    out = []
    for start, stop in [(0, first), *((t, t + 1) for t in range(first, T))]:
        positions = jnp.broadcast_to(jnp.arange(start, stop), (B, stop - start))
        logits, cache = run(cache, tokens[:, start:stop], positions)
        out.append(logits)
    return jnp.concatenate(out, axis=1)


def _assert_equal_where_real(cached, full, targets):
    real = np.array(targets != 0)
    real[:, 0] = True  # the start slot
    np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], atol=1e-5)


def _transformer_decoding(**overrides):
    """A tiny encoder-decoder on INPUTS / TARGETS: ``(run, cache, full)``, where
    ``run(cache, tokens [B, P], positions [B, P]) -> (logits [B, P, V], cache)`` is a jitted
    cached decode block, `cache` the fresh cache (sized for TARGETS, encoder keys in it) and
    `full` the teacher-forced logits [B, T, V]."""
    cfg = TransformerConfig.tiny(vocab_size=30, max_len=16, **overrides)
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), INPUTS, TARGETS)["params"]
    full = model.apply({"params": params}, INPUTS, TARGETS)  # [B, T, V]
    encoded = model.apply({"params": params}, INPUTS, method="encode")
    blank = jnp.zeros_like(TARGETS)  # shapes the cache: the longest decode
    _, created = model.apply(
        {"params": params}, encoded, INPUTS, blank, decode=True, method="decode",
        mutable=["cache"],
    )  # fmt: skip

    @jax.jit
    def run(cache, tokens, positions):
        logits, new = model.apply(
            {"params": params, "cache": cache}, None, INPUTS, tokens, decode=True,
            positions=positions, method="decode", mutable=["cache"],
        )  # fmt: skip
        return logits, new["cache"]

    return run, created["cache"], full


@pytest.mark.parametrize(
    "overrides",
    [{}, {"positional": "rotary", "pre_ln": True}, {"positional": "learned"}],
    ids=["sinusoidal-postln", "rotary-preln", "learned"],
)
def test_transformer_cached_logits_equal_full(overrides):
    run, cache, full = _transformer_decoding(**overrides)
    _assert_equal_where_real(_in_blocks(run, cache, shift_right(TARGETS)), full, TARGETS)


@pytest.mark.parametrize("overrides", [{}, {"num_kv_heads": 2, "positional": "rotary"}])
def test_transformer_block_decode_equals_full(overrides):
    """The encoder-decoder's cache takes blocks too: the first 3 target positions at once,
    then one per call, give the full recompute's logits."""
    run, cache, full = _transformer_decoding(**overrides)
    _assert_equal_where_real(_in_blocks(run, cache, shift_right(TARGETS), 3), full, TARGETS)


def test_lm_cached_logits_equal_full():
    cfg = TransformerConfig.tiny(vocab_size=30, max_len=16)
    model = TransformerLM(cfg)
    tokens = shift_right(TARGETS)
    params = model.init(jax.random.key(1), tokens)["params"]
    full = model.apply({"params": params}, tokens)
    _, created = model.apply({"params": params}, tokens, decode=True, mutable=["cache"])

    @jax.jit
    def step(cache, tok, positions):
        logits, new = model.apply(
            {"params": params, "cache": cache}, tok, positions=positions, decode=True,
            mutable=["cache"],
        )  # fmt: skip
        return logits, new["cache"]

    _assert_equal_where_real(_in_blocks(step, created["cache"], tokens), full, TARGETS)


def test_cache_layout_leads_with_batch():
    """Every cache leaf leads with B (beam search reorders rows with one gather); the
    cross-attention cache holds the encoder's projected keys [B, S, N, H]."""
    cfg = TransformerConfig.tiny(vocab_size=30, max_len=16)
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), INPUTS, TARGETS)["params"]
    encoded = model.apply({"params": params}, INPUTS, method="encode")
    _, created = model.apply(
        {"params": params}, encoded, INPUTS, jnp.zeros((2, 7), jnp.int32), decode=True,
        method="decode", mutable=["cache"],
    )  # fmt: skip
    layer = created["cache"]["decoder"]["layer_0"]
    assert layer["self_attention"]["cached_key"].shape == (2, 7, 4, 8)
    assert layer["self_attention"]["cache_index"].shape == (2,)
    assert layer["cross_attention"]["cached_key"].shape == (2, 5, 4, 8)
    assert all(leaf.shape[0] == 2 for leaf in jax.tree.leaves(created["cache"]))


def test_gqa_cache_stores_kv_heads():
    """Grouped-query attention's memory saving: the caches hold K key/value heads."""
    cfg = TransformerConfig.tiny(vocab_size=30, max_len=16, num_kv_heads=1)
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), INPUTS, TARGETS)["params"]
    encoded = model.apply({"params": params}, INPUTS, method="encode")
    _, created = model.apply(
        {"params": params}, encoded, INPUTS, jnp.zeros((2, 7), jnp.int32), decode=True,
        method="decode", mutable=["cache"],
    )  # fmt: skip
    layer = created["cache"]["decoder"]["layer_0"]
    assert layer["self_attention"]["cached_key"].shape == (2, 7, 1, 8)
    assert layer["self_attention"]["cached_value"].shape == (2, 7, 1, 8)
    assert layer["cross_attention"]["cached_key"].shape == (2, 5, 1, 8)


def test_decode_step_without_encoder_output_needs_decode():
    cfg = TransformerConfig.tiny(vocab_size=30, max_len=16)
    model = Transformer(cfg)
    params = model.init(jax.random.key(0), INPUTS, TARGETS)["params"]
    with pytest.raises(ValueError, match="only a cached decode step may omit it"):
        model.apply({"params": params}, None, INPUTS, TARGETS, method="decode")


@pytest.mark.parametrize("beam_size", [1, 4])
def test_empty_source_row_decodes_and_leaves_others_alone(beam_size):
    """An all-padding source (an empty sentence) decodes without NaNs, and the other rows of
    its batch decode exactly as they do alone."""
    cfg = TransformerConfig.tiny(vocab_size=30, max_len=16)
    model = Transformer(cfg)
    inputs = jnp.array([[0, 0, 0, 0], [5, 6, 7, 1]])
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    both = decoding.translate(model, params, inputs, max_length=8, beam_size=beam_size)
    alone = decoding.translate(model, params, inputs[1:], max_length=8, beam_size=beam_size)
    assert both.shape == (2, 8) and np.all((np.asarray(both) >= 0) & (np.asarray(both) < 30))
    np.testing.assert_array_equal(both[1:], alone)
