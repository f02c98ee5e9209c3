"""MFU's two halves (model FLOPs, device peaks) and the run's logs (metrics.jsonl, TensorBoard)."""

import json
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import optax
import pytest
from tensorboardX.proto import event_pb2
from test_train_loop import _tiny_config

from attention_jax import Transformer, TransformerConfig, TransformerLM
from attention_jax.train import flops
from attention_jax.train import loop as train_loop
from attention_jax.train.reporting import MetricsWriter


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"]


CFG = TransformerConfig(
    vocab_size=1000, d_model=256, num_heads=4, num_layers=2, num_decoder_layers=1, d_ff=1024,
    dropout_rate=0.0, max_len=64, attention_implementation="xla",
)  # fmt: skip


def test_transformer_flops_match_xla_cost_analysis():
    """The PaLM-style count (6N + 12·L·D·S) against XLA's count of the compiled gradient."""
    model, (b, s, t) = Transformer(CFG), (4, 48, 32)
    inputs, targets = jnp.full((b, s), 3), jnp.full((b, t), 3)
    params = model.init(jax.random.key(0), inputs, targets)["params"]

    def loss(p):
        logits = model.apply({"params": p}, inputs, targets)  # [B, T, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    counted = flops.transformer_train_flops(
        CFG, source_tokens=b * s, target_tokens=b * t, source_len=s, target_len=t
    )
    assert counted == pytest.approx(_xla_flops(jax.grad(loss), params), rel=0.03)


@pytest.mark.parametrize(
    "overrides", [{}, {"num_kv_heads": 1, "feed_forward": "swiglu"}], ids=["paper", "mqa-swiglu"]
)
def test_lm_flops_match_xla_cost_analysis(overrides):
    cfg = CFG.replace(**overrides)
    model, (b, t) = TransformerLM(cfg), (4, 64)
    tokens = jnp.full((b, t), 3)
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss(p):
        logits = model.apply({"params": p}, tokens)  # [B, T, V]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

    counted = flops.lm_train_flops(cfg, tokens=b * t, seq_len=t)
    assert counted == pytest.approx(_xla_flops(jax.grad(loss), params), rel=0.03)


def test_flops_hand_count():
    """One encoder and one decoder layer, D=2, F=4, V=3, one token each of length 1:
    encoder 6·(4·4 + 2·8) + 12·2·1 = 216; decoder 6·(2·16 + 16) + 12·2·2 + 6·2·3 = 372."""
    cfg = TransformerConfig(vocab_size=3, d_model=2, num_heads=1, num_layers=1, d_ff=4)
    got = flops.transformer_train_flops(
        cfg, source_tokens=1, target_tokens=1, source_len=1, target_len=1
    )
    assert got == 216 + 372


def test_peak_flops_lookup():
    def device(kind):
        return types.SimpleNamespace(device_kind=kind)

    assert flops.peak_flops_per_device(device("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.peak_flops_per_device(device("TPU v5 lite")) == 197e12
    assert flops.peak_flops_per_device(device("TPU v5p")) == 459e12
    assert flops.peak_flops_per_device(device("cpu")) is None


def test_measure_matmul_peak_is_plausible():
    peak = flops.measure_matmul_peak(256, repeats=2)
    assert 1e8 < peak < 1e14  # between a slow laptop core and a big accelerator


def _read_events(directory) -> dict:
    """{tag: [(step, value)]} from TensorBoard event files, read as TFRecords by hand."""
    scalars = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    log = MetricsWriter(str(tmp_path))
    log.write(1, {"train_loss": 2.5, "tokens_per_s": 10.0})
    log.write(2, {"train_loss": 2.0, "eval_loss": 2.25})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "train_loss": 2.5, "tokens_per_s": 10.0},
        {"step": 2, "train_loss": 2.0, "eval_loss": 2.25},
    ]
    events = _read_events(tmp_path / "tensorboard")
    assert events["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert events["eval/loss"] == [(2, 2.25)]
    assert events["tokens_per_s"] == [(1, 10.0)]

    resumed = MetricsWriter(str(tmp_path), resume_step=1)  # restart from step 1's checkpoint
    resumed.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1]


def test_metrics_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports torch when it is installed (~9 s on 2 cores, every training
    process); the writer loads it without. Run in a fresh process: this one may hold torch."""
    code = (
        "import sys\n"
        "from attention_jax.train.reporting import MetricsWriter\n"
        f"log = MetricsWriter({str(tmp_path)!r})\n"
        "log.write(3, {'train_loss': 1.5})\n"
        "log.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch  # still importable afterwards\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert _read_events(tmp_path / "tensorboard")["train/loss"] == [(3, 1.5)]


def test_training_run_logs_mfu_and_tensorboard(tmp_path, capsys):
    config = _tiny_config(4, peak_flops_per_device=1e11)
    train_loop.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in train)
    assert {"test_loss", "test_accuracy", "test_exact_match"} <= set(records[-1])
    events = _read_events(tmp_path / "tensorboard")
    assert [s for s, _ in events["train/loss"]] == [1, 2, 3, 4]
    assert events["train/loss"][-1][1] == pytest.approx(train[-1]["train_loss"])
    out = capsys.readouterr().out
    assert "step 4/4" in out and "MFU" in out and "ETA" in out
    assert "final test metrics" in out and "tensorboard --logdir" in out


def test_metrics_jsonl_is_strict_json_with_nan_as_null(tmp_path):
    """Issue 14: a diverged loss was written as the bare word NaN, which is not JSON."""
    from attention_jax.train.reporting import read_metrics

    log = MetricsWriter(str(tmp_path))
    log.write(1, {"train_loss": float("nan"), "train_accuracy": 0.5, "x": float("-inf")})
    log.close()

    def refuse(word):
        raise ValueError(f"not JSON: {word}")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x, parse_constant=refuse) for x in lines] == [
        {"step": 1, "train_loss": None, "train_accuracy": 0.5, "x": None}
    ]
    (record,) = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert record["train_loss"] != record["train_loss"] and record["train_accuracy"] == 0.5
    # A file written before the fix (bare NaN) still reads.
    (tmp_path / "old.jsonl").write_text('{"step": 2, "train_loss": NaN}\n')
    assert read_metrics(str(tmp_path / "old.jsonl"))[0]["step"] == 2
