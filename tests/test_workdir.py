"""The workdir contract (attention_jax/workdir/__init__.py): one training run per workdir.

Issue 14: two trainings on one workdir both ran to completion, interleaving metrics.jsonl
records and writing two event files. A second run is now refused at once; a run killed
outright (SIGKILL) does not leave the workdir locked.
"""

import os
import pathlib
import signal
import subprocess
import sys

import pytest

from attention_jax import workdir
from attention_jax.train import loop as train_loop
from attention_jax.workdir import WorkdirInUseError, WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Holds the lock of argv[1] until killed; loads workdir.py alone (no JAX: starts in ~0.1 s).
_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("workdir", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _snapshot(path: pathlib.Path) -> dict:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
    }


def test_the_contract_names():
    assert (workdir.CONFIG_FILE, workdir.VOCAB_FILE, workdir.CHECKPOINTS) == (
        "config.json", "vocab.model", "checkpoints",
    )  # fmt: skip
    assert (workdir.METRICS_FILE, workdir.LOCK_FILE) == ("metrics.jsonl", "train.lock")
    assert workdir.config_path("w") == os.path.join("w", "config.json")


def test_a_second_lock_is_refused_until_the_first_is_released(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirInUseError) as info:
            WorkdirLock(str(tmp_path)).acquire()
        message = str(info.value)
        assert "is in use by another training run" in message
        assert f"pid {os.getpid()}" in message and "use another --workdir" in message
        assert "\n" not in message
    with WorkdirLock(str(tmp_path)) as again:  # released: free again
        assert again.held


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """SIGKILL runs no cleanup: the kernel drops a flock with its process."""
    command = [
        sys.executable,
        "-c",
        _HOLDER,
        str(tmp_path),
        str(ROOT / "attention_jax/workdir/__init__.py"),
    ]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as holder:
        try:
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(WorkdirInUseError, match=f"pid {holder.pid} "):
                WorkdirLock(str(tmp_path)).acquire()
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
    assert (tmp_path / workdir.LOCK_FILE).exists()  # the file stays; the lock does not
    with WorkdirLock(str(tmp_path)) as lock:
        assert lock.held


def test_training_refuses_a_workdir_in_use_before_writing(tmp_path):
    from test_train_loop import _tiny_config

    (tmp_path / "w").mkdir()
    with WorkdirLock(str(tmp_path / "w")):
        before = _snapshot(tmp_path / "w")
        with pytest.raises(WorkdirInUseError, match="in use by another training run"):
            train_loop.train_and_evaluate(_tiny_config(2), str(tmp_path / "w"))
        assert _snapshot(tmp_path / "w") == before  # no config, checkpoint or metrics


def test_the_cli_refuses_a_workdir_in_use_with_one_line(tmp_path):
    """As a user meets it: a second `train.py` on a workdir that a run holds."""
    work = tmp_path / "w"
    work.mkdir()
    with WorkdirLock(str(work)):
        result = subprocess.run(
            [sys.executable, str(ROOT / "experiments" / "train.py"), "--config=reversal",
             f"--workdir={work}", "--config.num_train_steps=2"],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"train.py: error: workdir '{work}' is in use by another")
    assert sorted(p.name for p in work.iterdir()) == [workdir.LOCK_FILE]
