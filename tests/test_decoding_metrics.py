"""Greedy decoding (against a step-by-step eager reference) and BLEU/chrF (hand cases)."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import Transformer, TransformerConfig
from attention_jax.decode import metrics
from attention_jax.decode.decoding import greedy_decode


def test_greedy_matches_eager_argmax_loop():
    cfg = TransformerConfig.tiny(vocab_size=20, max_len=16)
    model = Transformer(cfg)
    inputs = jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    params = model.init(jax.random.key(3), inputs, inputs)["params"]
    got = np.asarray(greedy_decode(model, params, inputs, max_length=8))
    out = np.zeros((2, 8), np.int32)
    done = np.zeros(2, bool)
    for t in range(8):  # the obvious loop: full forward pass, argmax of position t
        logits = model.apply({"params": params}, inputs, jnp.asarray(out))  # reads shift_right
        scores = np.asarray(logits[:, t]).copy()
        scores[:, 0] = -np.inf  # padding is never generated
        token = np.where(done, 0, np.argmax(scores, -1))
        out[:, t] = token
        done |= token == 1
    np.testing.assert_array_equal(got, out)


def test_greedy_stops_at_eos_and_pads():
    cfg = TransformerConfig.tiny(vocab_size=6, max_len=16)
    model = Transformer(cfg)
    inputs = jnp.array([[2, 3, 1]])
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    params = nn.unbox(params)
    # Force EOS at every step: the last LayerNorm outputs a constant 1-vector, and the shared
    # embedding's EOS row is 5 · ones, so EOS's logit (5·D = 160) beats every random row's.
    params["decoder"]["layer_1"]["ffn_block"]["norm"]["scale"] *= 0
    params["decoder"]["layer_1"]["ffn_block"]["norm"]["bias"] = jnp.ones(cfg.d_model)
    params["embedding"]["embedding"] = params["embedding"]["embedding"].at[1].set(5.0)
    out = np.asarray(greedy_decode(model, params, inputs, max_length=5))
    assert out[0, 0] == 1 and (out[0, 1:] == 0).all()


def test_bleu_hand_cases():
    score, signature = metrics.bleu(["the cat sat on the mat ."], ["the cat sat on the mat ."])
    assert score == pytest.approx(100.0)
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    # Shared prefix "a b c d": 4 of 6 unigrams match, 3 of 5 bigrams, 2 of 4 trigrams, 1 of 3
    # four-grams; equal lengths, so no brevity penalty: BLEU = geometric mean.
    score, _ = metrics.bleu(["a b c d x y"], ["a b c d e f"])
    p = [4 / 6, 3 / 5, 2 / 4, 1 / 3]
    assert score == pytest.approx(100 * np.exp(np.mean(np.log(p))), rel=1e-6)
    assert metrics.bleu(["Haus"], ["haus"])[0] < 100  # case-sensitive
    chrf, signature = metrics.chrf(["abc"], ["abc"])
    assert chrf == pytest.approx(100.0) and signature.startswith("nrefs:1|case:mixed")


def test_metrics_bad_input():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no sentences"):
        metrics.chrf([], [])


def test_bleu_equals_sacrebleu_command_line(tmp_path):
    """Our corpus BLEU and chrF equal what `sacrebleu REF -i HYP` prints for the same files."""
    hyps = ["The cat sat on the mat.", "It is raining heavily today!", "Ein Haus am See."]
    refs = ["The cat sat on a mat.", "It rains heavily today!", "Ein Haus am See."]
    (tmp_path / "hyp").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref").write_text("\n".join(refs) + "\n")
    for metric, ours in (("bleu", metrics.bleu), ("chrf", metrics.chrf)):
        out = subprocess.run(
            [sys.executable, "-m", "sacrebleu", str(tmp_path / "ref"), "-i",
             str(tmp_path / "hyp"), "-m", metric, "-b", "-w", "6"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert ours(hyps, refs)[0] == pytest.approx(float(out.strip()), abs=1e-6)
