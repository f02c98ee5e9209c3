"""Checkpoints that go wrong: damaged files, a different model, an unwritable workdir, a
full disk; and checkpoints load without unpickling anything.

Training runs are `experiments/train.py` subprocesses on one CPU device (the helpers of
benchmarks/chaos.py, with the session's JAX compilation cache); each test copies one
trained workdir (12 steps, checkpoints 4, 8, 12).
"""

import errno
import hashlib
import importlib.util
import json
import os
import pathlib
import pickle
import shutil
import subprocess

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from attention_jax.train import loop as train_loop
from attention_jax.workdir import LOCK_FILE
from attention_jax.workdir.checkpoint import Checkpointer, CheckpointSaveError
from tests.chaos_support import chaos, session_env, trained_once

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, EVERY = 12, 4


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return session_env(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env):
    """Trained once per session (read only: each test that runs on it copies it first)."""
    workdir = trained_once(tmp_path_factory, "recovery_trained", STEPS, EVERY, env)
    assert chaos.finished_steps(workdir) == [4, 8, 12]
    return workdir


def _copy(trained, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    return workdir


def _snapshot(workdir) -> dict:
    """Every directory and file under `workdir`, files with the sha256 of their bytes."""
    tree = {}
    for root, dirs, files in os.walk(workdir):
        for d in dirs:
            tree[os.path.relpath(os.path.join(root, d), workdir)] = "dir"
        for f in files:
            if os.path.relpath(os.path.join(root, f), workdir) == LOCK_FILE:
                continue  # the training lock says who ran last: not the workdir's data
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                tree[os.path.relpath(path, workdir)] = hashlib.sha256(fh.read()).hexdigest()
    return tree


# ---- Damaged checkpoints. -------------------------------------------------------------


def _truncate_largest_array_file(step_dir):
    # Array bytes live in OCDBT data files (`.../d/<hash>`); with a tiny model the tree's
    # JSON metadata (`_METADATA`, `_sharding`) can be larger than any of them, and truncating
    # that is the metadata case, not this one.
    files = [
        p
        for p in pathlib.Path(step_dir, "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    largest = max(files, key=lambda p: p.stat().st_size)
    size = largest.stat().st_size // 2
    os.truncate(largest, size)
    return largest.relative_to(step_dir), size, "its arrays do not read back"


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "meta", "metadata"))
    return pathlib.Path("meta", "metadata"), None, "its metadata does not read back"


@pytest.mark.parametrize("damage", [_truncate_largest_array_file, _delete_metadata])
def test_a_damaged_newest_checkpoint_is_reported_moved_aside_and_training_goes_on(
    trained, env, tmp_path, damage
):
    workdir = _copy(trained, tmp_path)
    damaged, size, problem = damage(os.path.join(workdir, "checkpoints", "12"))
    code, out = chaos.run_to_completion(workdir, STEPS, EVERY, env, str(tmp_path / "log"))
    assert code == 0, out
    reports = [line for line in out.splitlines() if "is damaged" in line]
    assert len(reports) == 1, out
    aside = os.path.join(workdir, "checkpoints", "corrupt-12")
    assert reports[0].startswith(f"checkpoint of step 12 is damaged: {problem}"), reports
    assert f"moved it to {aside}; trying step 8" in reports[0], reports
    assert chaos.resumed_step(out) == 8
    # The evidence is kept as it was found ...
    evidence = pathlib.Path(aside, damaged)
    assert os.path.isdir(os.path.join(aside, "state"))
    if size is None:
        assert not evidence.exists()
    else:
        assert evidence.stat().st_size == size
    # ... and steps 9-12 were trained again to the very same state and log.
    comparison = chaos.compare(trained, workdir, STEPS)
    assert comparison["identical_state"], comparison["differing_arrays"]
    assert comparison["identical_metrics"]
    assert comparison["same_checkpoints"] and not comparison["debris"], comparison


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ("--config.model.d_model=64", "--config.model.d_ff=128"),
            [
                "holds a checkpoint of a different model (step 12)",
                "d_ff: checkpoint 64, config 128",
                "d_model: checkpoint 32, config 64",
            ],
        ),
        (  # same model, another optimizer: its state has another structure
            ("--config.clip_norm=1.0",),
            ["the checkpoint of step 12 holds a different train state", "opt_state/"],
        ),
    ],
    ids=["model", "optimizer"],
)
def test_a_checkpoint_of_another_model_is_refused_and_nothing_changes(
    trained, env, tmp_path, overrides, expected
):
    workdir = _copy(trained, tmp_path)
    before = _snapshot(workdir)
    code, out = chaos.run_to_completion(
        workdir, STEPS, EVERY, env, str(tmp_path / "log"), *overrides
    )
    assert code != 0
    for text in expected:
        assert text in out, out
    assert "is damaged" not in out
    assert _snapshot(workdir) == before


# ---- Unwritable workdir, full disk. -----------------------------------------------------


def _config():
    config = _load("reversal_config", ROOT / "experiments" / "configs" / "reversal.py").get_config()
    config.model.update(d_model=32, num_heads=4, d_ff=64)
    config.update(batch_size=8, num_train_steps=2, eval_batches=1)
    return config


def test_a_workdir_that_cannot_be_created_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"  # a path under a regular file: no one can create it
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"workdir .*a_file/workdir' cannot be created"):
        train_loop.train_and_evaluate(_config(), str(blocker / "workdir"))
    assert blocker.read_text() == "not a directory"


def _writes_anyway(directory) -> bool:
    """Whether this process writes into a read-only directory (root, CAP_DAC_OVERRIDE)."""
    probe = os.path.join(directory, "probe")
    try:
        with open(probe, "w"):
            pass
    except OSError:
        return False
    os.remove(probe)
    return True


# Root writes into read-only directories (CAP_DAC_OVERRIDE): the entry point then runs
# without that capability (util-linux setpriv), so the permission bits apply to it.
_NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("read_only", ["workdir", "checkpoints"])
def test_a_read_only_workdir_fails_before_training(env, tmp_path, read_only):
    workdir = tmp_path / "w"
    target = workdir if read_only == "workdir" else workdir / "checkpoints"
    (workdir / "checkpoints").mkdir(parents=True)
    target.chmod(0o555)
    try:
        if not _writes_anyway(target):
            with pytest.raises(OSError, match=r"is not writable .*use a writable --workdir"):
                train_loop.train_and_evaluate(_config(), str(workdir))
        elif os.geteuid() == 0 and shutil.which("setpriv"):
            proc = subprocess.run(
                _NO_OVERRIDE + chaos.train_command(str(workdir), STEPS, EVERY),
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode != 0
            expected = f"workdir '{workdir}' is not writable ({target}: Permission denied)"
            assert expected in proc.stderr, proc.stderr
            assert "use a writable --workdir" in proc.stderr
        else:
            pytest.skip("this process writes despite chmod (root) and setpriv is not installed")
        assert sorted(p.name for p in workdir.rglob("*")) == ["checkpoints"]
    finally:
        target.chmod(0o755)


# The real entry point, with the checkpoint manager's save failing at one step as on a full
# disk (a fault injected into this process only).
_FULL_DISK_AT = """
import errno, runpy, sys
import orbax.checkpoint as ocp
step_to_fail, sys.argv = int(sys.argv[1]), sys.argv[2:]  # then: train.py --flags ...
real_save = ocp.CheckpointManager.save
def save(self, step, *args, **kwargs):
    if step == step_to_fail:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = save
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_failed_save_is_reported_and_the_previous_checkpoint_stays_restorable(env, tmp_path):
    workdir = str(tmp_path / "w")
    command = chaos.train_command(workdir, STEPS, EVERY)
    command[1:1] = ["-c", _FULL_DISK_AT, "8"]  # python -c SCRIPT 8 train.py --flags ...
    proc = chaos.launch(command, env, str(tmp_path / "log"))
    code = chaos.finish(proc, timeout=600)
    out = (tmp_path / "log").read_text()
    assert code != 0
    # One line (issue 14: the useful line was line 1,086 of 1,918), saying what is intact.
    assert code == 1 and "Traceback" not in out, out
    (line,) = [x for x in out.splitlines() if "error:" in x]
    assert line.startswith("train.py: error: disk full: saving the checkpoint of step 8"), out
    assert "No space left on device" in line
    assert "the newest complete checkpoint is step 4" in line
    assert chaos.finished_steps(workdir) == [1, 4] and not chaos.unfinished(workdir)
    ckpt = Checkpointer(workdir)
    state = ckpt.restore_on_one_device(4)
    ckpt.close()
    assert int(state["step"]) == 4


def test_an_asynchronous_save_that_fails_is_reported_at_the_next_save(tmp_path, monkeypatch):
    """The write itself fails in Orbax's background thread (ENOSPC from a commit future):
    the error surfaces at the next save, naming the step that failed; its partial directory
    is removed and the step before stays restorable."""
    ckpt = Checkpointer(str(tmp_path), every=1, data_state=False, cleanup=True)
    ckpt.save(1, {"w": jnp.arange(4.0)}, {"n": 1})
    ckpt.wait()

    class Full:
        def result(self, timeout=None):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = ocp.StandardCheckpointHandler.async_save

    async def failing(self, *args, **kwargs):
        return [*(await real(self, *args, **kwargs) or []), Full()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing)
    assert ckpt.save(2, {"w": jnp.arange(4.0) + 1}, {"n": 2})  # started in the background
    monkeypatch.undo()
    with pytest.raises(CheckpointSaveError, match=r"step 2 .* No space left on device") as e:
        ckpt.save(3, {"w": jnp.arange(4.0) + 2}, {"n": 3})
    assert e.value.errno == errno.ENOSPC
    assert "the newest complete checkpoint is step 1" in str(e.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]  # nothing partial left
    np.testing.assert_array_equal(ckpt.restore_on_one_device(1)["w"], np.arange(4.0))
    assert ckpt.save(3, {"w": jnp.arange(4.0) + 2}, {"n": 3})  # and saving works again
    ckpt.close()


# ---- No code execution from data. -------------------------------------------------------


class _NoUnpickler:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")


def _refuse(*args, **kwargs):
    raise AssertionError("a checkpoint was unpickled")


def _is_pickle(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return path.suffix in (".pkl", ".pickle") or (
        len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode
    )


def test_checkpoints_load_without_pickle(trained, tmp_path, monkeypatch):
    workdir = _copy(trained, tmp_path)
    # A grain iterator's state too (the translation task checkpoints one).
    iterator = iter(grain.MapDataset.range(50).shuffle(seed=3).to_iter_dataset())
    seen = [next(iterator) for _ in range(7)]
    ckpt = Checkpointer(str(tmp_path / "data"), every=1)
    ckpt.save(7, {"w": jnp.arange(3.0)}, {"n": 7}, data_iterator=iterator)
    ckpt.close()
    expected_next = next(iterator)

    files = [p for d in (workdir, tmp_path / "data") for p in pathlib.Path(d).rglob("*")]
    files = [p for p in files if p.is_file() and "tensorboard" not in p.parts]
    assert files and not [p for p in files if _is_pickle(p)]

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, _refuse)
    monkeypatch.setattr(pickle, "Unpickler", _NoUnpickler)
    ckpt = Checkpointer(workdir)
    state = ckpt.restore_on_one_device(STEPS)
    meta = ckpt.read_meta(STEPS)
    ckpt.close()
    assert int(state["step"]) == STEPS and meta["model"]["d_model"] == 32
    resumed = iter(grain.MapDataset.range(50).shuffle(seed=3).to_iter_dataset())
    ckpt = Checkpointer(str(tmp_path / "data"), every=1)
    abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    state, meta = ckpt.restore(7, abstract, data_iterator=resumed)
    ckpt.close()
    assert meta == {"n": 7} and len(seen) == 7
    assert next(resumed) == expected_next  # the iterator continues where it was saved


# ---- The metrics log across restarts. ---------------------------------------------------


def test_resuming_drops_log_rows_past_the_checkpoint_the_test_report_and_a_torn_line(tmp_path):
    from attention_jax.train.reporting import MetricsWriter

    rows = [{"step": s, "train_loss": 1.0 / s} for s in (1, 2, 3, 4)]
    rows += [{"step": 4, "eval_loss": 0.5}, {"step": 4, "test_loss": 0.4}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "train_lo'  # killed
    (tmp_path / "metrics.jsonl").write_text(text)
    MetricsWriter(str(tmp_path), resume_step=4).close()  # a restart from step 4's checkpoint
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:5]  # the test report is written again by the run that resumed
    MetricsWriter(str(tmp_path), resume_step=2).close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == rows[:2]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "tensorboard"]


def test_rerunning_a_finished_run_reports_again_and_clears_debris(trained, env, tmp_path):
    """What a run killed mid-write leaves (an unfinished checkpoint directory, temporary
    files of the config, the log and the vocabulary) is removed by the next run, which
    otherwise changes nothing but writing its test report again (once)."""
    workdir = _copy(trained, tmp_path)
    before = chaos.metrics_rows(workdir)
    unfinished = pathlib.Path(workdir, "checkpoints", "16.orbax-checkpoint-tmp")
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "manifest.ocdbt").write_bytes(b"partial")
    for name in ("config.json.tmp.4242", "metrics.jsonl.tmp", ".vocab.model.x1y2.tmp"):
        pathlib.Path(workdir, name).write_text("partial")
    code, out = chaos.run_to_completion(workdir, STEPS, EVERY, env, str(tmp_path / "log"))
    assert code == 0, out
    assert "removing the unfinished checkpoint(s) of step(s) [16]" in out
    assert chaos.resumed_step(out) == STEPS and "final test metrics" in out
    assert chaos.metrics_rows(workdir) == before  # one test report, the same one
    assert chaos.finished_steps(workdir) == [4, 8, 12]
    assert not [p for p in pathlib.Path(workdir).rglob("*") if "tmp" in p.name]
