"""Packed rows (several examples per row, as the data pipeline makes them): no attention
crosses examples, so logits and loss equal those of the same examples one per row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import Transformer, TransformerConfig, TransformerLM
from attention_jax.nn.model import shift_right_packed
from attention_jax.train import step as training

CFG = TransformerConfig.tiny(vocab_size=50, dropout_rate=0.0, max_len=16)
# Three examples (source, target); rows of length 12 hold [0, 1] and [2] when packed.
EXAMPLES = [([5, 6, 7, 1], [8, 9, 1]), ([10, 11, 1], [12, 13, 14, 15, 1]), ([16, 1], [17, 1])]
L = 12


def _row(parts):
    """Packs token lists into one row of length L: tokens, positions, segment ids."""
    tokens, positions, segments = [], [], []
    for i, part in enumerate(parts, start=1):
        tokens += part
        positions += list(range(len(part)))
        segments += [i] * len(part)
    pad = L - len(tokens)
    return tokens + [0] * pad, positions + [0] * pad, segments + [0] * pad


def _batches():
    rows = [[0, 1], [2]]
    packed = {k: [] for k in ("inputs", "inputs_positions", "inputs_segmentation",
                              "targets", "targets_positions", "targets_segmentation")}  # fmt: skip
    for row in rows:
        for side, j in (("inputs", 0), ("targets", 1)):
            tokens, positions, segments = _row([EXAMPLES[i][j] for i in row])
            packed[side].append(tokens)
            packed[f"{side}_positions"].append(positions)
            packed[f"{side}_segmentation"].append(segments)
    packed = {k: jnp.asarray(v, jnp.int32) for k, v in packed.items()}
    unpacked = {
        side: jnp.asarray([_row([ex[j]])[0] for ex in EXAMPLES], jnp.int32)
        for side, j in (("inputs", 0), ("targets", 1))
    }
    return packed, unpacked


def test_shift_right_packed_restarts_each_example():
    tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
    positions = jnp.array([[0, 1, 2, 0, 1, 0]])
    np.testing.assert_array_equal(shift_right_packed(tokens, positions), [[0, 5, 6, 0, 8, 0]])


def test_packed_logits_equal_unpacked():
    packed, unpacked = _batches()
    model = Transformer(CFG)
    params = model.init(jax.random.key(0), unpacked["inputs"], unpacked["targets"])["params"]
    logits_packed = model.apply({"params": params}, **packed)  # [2, L, V]
    logits_single = model.apply({"params": params}, unpacked["inputs"], unpacked["targets"])
    # Example e's target logits sit at its offset in its packed row.
    for e, (row, offset) in enumerate([(0, 0), (0, 3), (1, 0)]):
        n = len(EXAMPLES[e][1])
        np.testing.assert_allclose(
            logits_packed[row, offset : offset + n], logits_single[e, :n], rtol=1e-5, atol=1e-5
        )


def test_packed_loss_equals_unpacked_loss():
    packed, unpacked = _batches()
    model = Transformer(CFG)
    params = model.init(jax.random.key(0), unpacked["inputs"], unpacked["targets"])["params"]
    got = training.eval_step(params, packed, model=model)
    want = training.eval_step(params, unpacked, model=model)
    assert float(got["tokens"]) == float(want["tokens"]) == sum(len(t) for _, t in EXAMPLES)
    assert float(got["loss_sum"]) == pytest.approx(float(want["loss_sum"]), rel=1e-5)
    assert float(got["correct"]) == float(want["correct"])


def test_packed_lm_equals_unpacked():
    packed, unpacked = _batches()
    model = TransformerLM(CFG)
    tokens = unpacked["targets"]
    params = model.init(jax.random.key(0), tokens)["params"]
    lm_packed = {k: packed[k] for k in ("targets", "targets_positions", "targets_segmentation")}
    got = training.eval_step(params, lm_packed, model=model)
    want = training.eval_step(params, {"targets": tokens}, model=model)
    assert float(got["loss_sum"]) == pytest.approx(float(want["loss_sum"]), rel=1e-5)


def test_packing_arrays_are_checked():
    packed, _ = _batches()
    model = Transformer(CFG)
    params = model.init(jax.random.key(0), packed["inputs"], packed["targets"])["params"]
    bad = {**packed, "inputs_positions": packed["inputs_positions"][:, :5]}
    with pytest.raises(ValueError, match="inputs positions must have the tokens' shape"):
        model.apply({"params": params}, **bad)
    bad = {**packed, "targets_segmentation": None}
    with pytest.raises(ValueError, match="both segmentation and source_segmentation"):
        model.apply({"params": params}, **bad)
