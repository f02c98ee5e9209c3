"""experiments/rnn_vs_transformer.py: its --tiny run end to end (JSON, matched parameter
counts, PNG), and the LSTM encoder-decoder against a float64 NumPy LSTM."""

import importlib.util
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location(
        "rnn_vs_transformer", ROOT / "experiments" / "rnn_vs_transformer.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(script, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("rnn_vs_transformer")
    settings = script.Settings.tiny()
    script.run(settings, str(out_dir), log=lambda *args: None)
    return settings, out_dir


@pytest.mark.slow  # nearly all XLA compiles (4 train steps, 4 forwards, 2 inits)
def test_tiny_run_writes_both_models_at_every_length(tiny_run):
    settings, out_dir = tiny_run
    results = json.loads((out_dir / "results.json").read_text())
    params = results["params"]
    gap = abs(params["lstm"] - params["transformer"]) / params["transformer"]
    assert gap <= settings.param_tolerance <= 0.1, params
    assert [r["T"] for r in results["timing"]] == list(settings.time_lengths) == [8, 16]
    assert [r["T"] for r in results["accuracy"]] == list(settings.task_lengths) == [8, 16]
    for row in results["timing"]:
        for name in ("lstm", "transformer"):
            for key in (f"{name}_ms", f"{name}_tokens_per_s"):
                assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["lstm_over_transformer"] == pytest.approx(row["lstm_ms"] / row["transformer_ms"])
    for row in results["accuracy"]:
        for name in ("lstm", "transformer"):
            for key in ("token_accuracy", "sequence_accuracy"):
                assert 0.0 <= row[f"{name}_{key}"] <= 1.0, (key, row)
            assert math.isfinite(row[f"{name}_final_loss"]), row
    png = (out_dir / "rnn_vs_transformer.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def _numpy_lstm(p, x, c, h):
    """float64 LSTM over x [B, T, E] from state (c, h) [B, H]: (c, h, outputs [B, T, H])."""

    def pre(g, xt, ht):  # gate g before its nonlinearity: input part + recurrent part
        return xt @ p[f"i{g}"]["kernel"] + ht @ p[f"h{g}"]["kernel"] + p[f"h{g}"]["bias"]

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    outputs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        i, f = sigmoid(pre("i", xt, h)), sigmoid(pre("f", xt, h))
        g, o = np.tanh(pre("g", xt, h)), sigmoid(pre("o", xt, h))
        c = f * c + i * g
        h = o * np.tanh(c)
        outputs.append(h)
    return c, h, np.stack(outputs, axis=1)


def test_lstm_matches_numpy_and_the_decoder_sees_only_the_final_state(script, rng):
    """Logits equal a float64 NumPy LSTM encoder-decoder in which the decoder starts from the
    encoder's final (c, h) and reads nothing else of the source; gradients are finite."""
    V, H, B, S, T = 11, 6, 3, 7, 5
    model = script.LSTMSeq2Seq(vocab_size=V, hidden=H, num_layers=1)
    inputs = jnp.asarray(rng.integers(1, V, size=(B, S)), jnp.int32)
    targets = jnp.asarray(rng.integers(1, V, size=(B, T)), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs, targets)["params"]
    params = jax.tree.map(  # random weights, large enough that every gate matters
        lambda x: jnp.asarray(rng.normal(0.0, 0.5, x.shape), jnp.float32), shapes
    )

    def loss(params):  # any scalar of the logits, for the gradient check
        logits = model.apply({"params": params}, inputs, targets)  # [B, T, V]
        return jnp.mean(logits**2), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert logits.shape == (B, T, V)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["encoder_0"]["cell"]["ii"]["kernel"]).max()) > 0.0

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    table = p["embed"]["embedding"]  # [V, H]
    zeros = np.zeros((B, H))
    c, h, _ = _numpy_lstm(p["encoder_0"]["cell"], table[np.asarray(inputs)], zeros, zeros)
    shifted = np.concatenate([np.zeros((B, 1), int), np.asarray(targets)[:, :-1]], axis=1)
    _, _, y = _numpy_lstm(p["decoder_0"]["cell"], table[shifted], c, h)  # from (c, h) only
    expected = y @ p["logits"]["kernel"] + p["logits"]["bias"]  # [B, T, V]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)

    state = jax.eval_shape(lambda: model.apply({"params": params}, inputs, method=model.encode))
    assert [x.shape for x in jax.tree.leaves(state)] == [(B, H), (B, H)]  # no [B, S, ...] path
