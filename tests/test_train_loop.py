"""End-to-end training runs on the reversal task: resume, bad input, configs."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from shared_fixtures import build_once

from attention_jax import Transformer
from attention_jax.train import loop as train_loop
from attention_jax.train import step as training
from attention_jax.workdir.checkpoint import Checkpointer, average_checkpoints
from attention_jax.workdir.experiment import model_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _default_config():
    spec = importlib.util.spec_from_file_location(
        "reversal_config", ROOT / "experiments" / "configs" / "reversal.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _tiny_config(steps, **overrides):
    config = _default_config()
    config.model.update(d_model=32, num_heads=4, d_ff=64, dropout_rate=0.1)
    config.batch_size = 8
    config.num_train_steps = steps
    config.log_every = 1
    config.eval_every = 1000
    config.eval_batches = 1
    config.checkpoint_every = 10
    config.update(overrides)
    return config


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]


def _final_state(workdir, step):
    ckpt = Checkpointer(workdir)
    state = ckpt.restore_on_one_device(step)
    ckpt.close()
    return state


def _final_params(workdir, step):
    return _final_state(workdir, step)["params"]


def test_end_to_end_tiny_run(tmp_path_factory, tmp_path, monkeypatch):
    """Six steps with the loss computed over chunks (config.loss_chunk reaches the train and
    eval steps) train as the plain loss does: the same losses as the shared plain run's."""
    chunks = []  # the chunk size of each traced chunked loss

    def spy(*args, chunk, **kwargs):
        chunks.append(chunk)
        return chunked(*args, chunk=chunk, **kwargs)

    chunked = training.chunked_smoothed_cross_entropy_terms
    monkeypatch.setattr(training, "chunked_smoothed_cross_entropy_terms", spy)
    final = train_loop.train_and_evaluate(_tiny_config(6, loss_chunk=5), str(tmp_path))
    assert len(chunks) >= 2 and set(chunks) == {5}  # the train step and the eval step
    assert set(final) == {"loss", "accuracy", "exact_match"}
    assert np.isfinite(final["loss"])
    losses = _losses(tmp_path)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert Checkpointer(str(tmp_path)).latest_step() == 6
    plain = _losses(_ten_steps(tmp_path_factory, tmp_path / "plain"))[:6]
    np.testing.assert_allclose([x for _, x in losses], [x for _, x in plain], rtol=1e-5)


def _ten_steps(tmp_path_factory, path: pathlib.Path) -> str:
    """A copy at `path` (the test's to change) of a run of _tiny_config(10), trained once
    per session whichever xdist worker asks first (shared_fixtures.build_once)."""

    def train(shared):
        train_loop.train_and_evaluate(_tiny_config(10), str(shared))

    shutil.copytree(build_once(tmp_path_factory, "train_loop_10_steps", train), path)
    return str(path)


def test_exact_resume_equals_uninterrupted_run(tmp_path_factory, tmp_path):
    straight = str(tmp_path / "straight")
    train_loop.train_and_evaluate(_tiny_config(20), straight)
    resumed = _ten_steps(tmp_path_factory, tmp_path / "resumed")  # "stopped" at 10
    train_loop.train_and_evaluate(_tiny_config(20), resumed)  # restarted, same workdir
    assert _losses(resumed) == _losses(straight)  # per-step losses, bit for bit
    a, b = _final_params(straight, 20), _final_params(resumed, 20)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_checkpoint_of_a_different_model_is_refused_and_kept(tmp_path_factory, tmp_path):
    work = _ten_steps(tmp_path_factory, tmp_path / "w")  # a finished run's workdir
    before = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir())
    config = _tiny_config(20)
    config.model.num_layers = 3
    with pytest.raises(ValueError, match="holds a checkpoint of a different model"):
        train_loop.train_and_evaluate(config, work)
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "change, err, match",
    [
        (lambda c: c.model.update(n_layers=2), ValueError, "unknown fields"),
        (lambda c: c.model.update(dtype="float8"), ValueError, "dtype must be one of"),
        (lambda c: c.update(batch_size=6), ValueError, "not divisible by the data-parallel"),
        (lambda c: c.mesh.update(data=8, model=2), ValueError, "needs 16 devices, but 8"),
        (lambda c: c.data.update(min_len=5, max_len=3), ValueError, "1 <= min_len <= max_len"),
    ],
)
def test_bad_configs(tmp_path, change, err, match):
    config = _tiny_config(2)
    change(config)
    with pytest.raises(err, match=match):
        train_loop.train_and_evaluate(config, str(tmp_path))


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError):
        train_loop.train_and_evaluate(_tiny_config(2), str(blocker / "workdir"))


def _cli(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "train.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_missing_config_file(tmp_path):
    r = _cli("--config=/nonexistent/config.py", f"--workdir={tmp_path}")
    assert r.returncode != 0
    assert "/nonexistent/config.py" in r.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_unknown_override_key(tmp_path):
    cfg = ROOT / "experiments" / "configs" / "default.py"
    r = _cli(f"--config={cfg}", f"--workdir={tmp_path}", "--config.num_trian_steps=5")
    assert r.returncode != 0
    assert "num_trian_steps" in r.stderr
    assert not any(tmp_path.iterdir())


def test_average_checkpoints_is_the_mean_of_the_last_k(tmp_path):
    config = _tiny_config(4, checkpoint_every=1, keep_checkpoints=5)
    train_loop.train_and_evaluate(config, str(tmp_path))
    mean, steps = average_checkpoints(str(tmp_path), 3)
    assert steps == [2, 3, 4]
    per_step = [_final_params(str(tmp_path), s) for s in steps]
    for m, *xs in zip(*(jax.tree.leaves(t) for t in [mean, *per_step]), strict=True):
        np.testing.assert_allclose(m, np.mean(np.stack(xs), 0), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="asked for the last 9 checkpoints"):
        average_checkpoints(str(tmp_path), 9)


@pytest.mark.parametrize(
    "name, params_m, dropout",
    [("wmt14_base", 63.1e6, 0.1), ("wmt14_big", 214.2e6, 0.3)],  # counted at V=37000
)
def test_wmt14_configs_are_the_papers(name, params_m, dropout):
    """The paper's settings (Table 3, sections 5.1-5.4) in the experiment configs."""
    spec = importlib.util.spec_from_file_location(
        name, ROOT / "experiments" / "configs" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    cfg = model_config(config)
    assert (cfg.vocab_size, cfg.num_layers, cfg.dropout_rate) == (37000, 6, dropout)
    assert (config.warmup_steps, config.lr_factor, config.label_smoothing) == (4000, 1.0, 0.1)
    assert config.data.tokens_per_batch == 25000
    assert (config.data.dataset, config.data.direction) == ("wmt14_translate/de-en", "en-de")
    shapes = jax.eval_shape(
        lambda: Transformer(cfg).init(
            jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32)
        )
    )
    count = sum(x.size for x in jax.tree.leaves(shapes))
    assert count == pytest.approx(params_m, rel=1e-3)


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # A learning rate of ~1e30 blows the parameters up: the loss turns NaN/Inf in a few steps.
    config = _tiny_config(12, lr_factor=1e33, checkpoint_every=2, log_every=3)
    with pytest.raises(train_loop.NonFiniteError, match=r"step \d+: the loss or a gradient"):
        train_loop.train_and_evaluate(config, str(tmp_path))
    latest = Checkpointer(str(tmp_path)).latest_step()
    state = _final_state(str(tmp_path), latest)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
    assert int(state["nonfinite_steps"]) == 0  # saved before the first bad step
    # 'skip' goes on without the bad updates and counts them in metrics.jsonl.
    skip = _tiny_config(6, lr_factor=1e33, nonfinite="skip")
    train_loop.train_and_evaluate(skip, str(tmp_path / "skip"))
    with open(tmp_path / "skip" / "metrics.jsonl") as f:
        counts = [json.loads(line).get("nonfinite_steps", 0) for line in f]
    assert max(counts) >= 1
    with pytest.raises(ValueError, match=r"config\.nonfinite must be one of"):
        train_loop.train_and_evaluate(_tiny_config(1, nonfinite="ignore"), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
