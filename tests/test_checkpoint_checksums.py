"""Checkpoint digests (issue 19): each checkpoint's ``digests.json`` (the sha256 of every
file, written once the asynchronous save is complete), checked before a restore, and the
``verify`` command that checks a workdir without restoring.

The training runs are `experiments/train.py` subprocesses on one CPU device (the helpers of
benchmarks/chaos.py); the trained workdir (12 steps, checkpoints 4, 8, 12) is the one
tests/test_checkpoint_recovery.py uses, built once per session and copied before any change.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.workdir import checkpoint
from attention_jax.workdir.checkpoint import (
    DIGESTS_FILE,
    Checkpointer,
    file_digests,
    verify_digests,
)
from tests.chaos_support import chaos, session_env, trained_once

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, EVERY = 12, 4  # as tests/test_checkpoint_recovery.py: the same trained workdir


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return session_env(tmp_path_factory)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, env):
    """Shared and read only: copy it before changing anything."""
    workdir = trained_once(tmp_path_factory, "recovery_trained", STEPS, EVERY, env)
    assert chaos.finished_steps(workdir) == [4, 8, 12]
    return workdir


def _copy(trained, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(trained, workdir)
    return workdir


def _largest_array_file(step_dir) -> pathlib.Path:
    """The largest OCDBT data file (``.../d/<hash>``: where the array bytes are)."""
    files = [
        p
        for p in pathlib.Path(step_dir, "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path: pathlib.Path) -> None:
    """One bit of the byte in the middle of `path` inverted, its size unchanged."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _verify(*args, module=False):
    command = (
        [sys.executable, "-m", "attention_jax", "verify", *args]
        if module
        else [sys.executable, str(ROOT / "experiments" / "verify.py"), *args]
    )
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


# ---- The manifest. --------------------------------------------------------------------


def test_every_checkpoint_of_a_run_has_digests_of_all_its_files(trained):
    for step in (4, 8, 12):
        step_dir = os.path.join(trained, "checkpoints", str(step))
        with open(os.path.join(step_dir, DIGESTS_FILE)) as f:
            manifest = json.load(f)
        assert manifest["algorithm"] == "sha256"
        on_disk = {
            str(p.relative_to(step_dir))
            for p in pathlib.Path(step_dir).rglob("*")
            if p.is_file() and p.name != DIGESTS_FILE
        } - {"commit_success.txt", "_CHECKPOINT_METADATA"}  # Orbax rewrites them at the commit
        assert set(manifest["files"]) == on_disk
        assert any(n.startswith("state/") and "/d/" in n for n in on_disk)  # the arrays
        for name, digest in manifest["files"].items():  # hashlib, read whole: independent
            assert hashlib.sha256(pathlib.Path(step_dir, name).read_bytes()).hexdigest() == digest
        assert verify_digests(step_dir) == (True, None)


def test_digests_are_written_once_every_file_is_and_before_the_checkpoint_looks_complete(
    tmp_path, monkeypatch
):
    sealed = []  # (step, directory written, files in it then, thread)
    write = checkpoint.write_digests

    def spy(step_dir):
        files = sorted(
            str(p.relative_to(step_dir)) for p in pathlib.Path(step_dir).rglob("*") if p.is_file()
        )
        sealed.append((os.path.basename(step_dir), files, threading.current_thread()))
        return write(step_dir)

    monkeypatch.setattr(checkpoint, "write_digests", spy)
    ckpt = Checkpointer(str(tmp_path), every=1, keep=2, data_state=False)
    state = {"w": jnp.arange(4096, dtype=jnp.float32)}
    for step in (1, 2, 3):
        assert ckpt.save(step, jax.tree.map(lambda x: x + step, state), {"m": step})  # noqa: B023
    ckpt.close()
    directory = tmp_path / "checkpoints"
    assert sorted(os.listdir(directory)) == ["2", "3"]  # step 1: removed (keep=2)
    # Each save was sealed once, in Orbax's save thread, in its unfinished directory (so no
    # directory named <step> ever lacked digests), with every array file already written.
    assert [name for name, _, _ in sealed] == [f"{s}.orbax-checkpoint-tmp" for s in (1, 2, 3)]
    assert all(t is not threading.main_thread() for _, _, t in sealed)
    for (_, files, _), step in zip(sealed, (1, 2, 3), strict=True):
        assert "state/commit_success.txt" in files and "meta/metadata" in files, files
        if step > 1:
            final = json.loads((directory / str(step) / DIGESTS_FILE).read_text())["files"]
            assert sorted(final) == sorted(f for f in files if f != "_CHECKPOINT_METADATA")
            assert verify_digests(str(directory / str(step))) == (True, None)


@pytest.fixture
def checkpoint_copy(trained, tmp_path) -> pathlib.Path:
    step_dir = tmp_path / "12"
    shutil.copytree(os.path.join(trained, "checkpoints", "12"), step_dir)
    return step_dir


def test_verify_digests_names_a_changed_missing_or_unlisted_file(checkpoint_copy):
    step_dir = checkpoint_copy
    largest = _largest_array_file(step_dir)
    name = str(largest.relative_to(step_dir))
    original = largest.read_bytes()
    _flip_byte(largest)
    assert verify_digests(str(step_dir)) == (
        False,
        f"its file {name} does not match its sha256 digest",
    )
    largest.write_bytes(original)
    assert verify_digests(str(step_dir)) == (True, None)
    (step_dir / "meta" / "metadata").rename(step_dir / "stray")
    assert verify_digests(str(step_dir)) == (
        False,
        f"its file meta/metadata is missing (listed in {DIGESTS_FILE})",
    )
    (step_dir / "stray").rename(step_dir / "meta" / "metadata")
    (step_dir / "state" / "extra").write_bytes(b"x")
    assert verify_digests(str(step_dir)) == (
        False,
        f"its file state/extra is not in {DIGESTS_FILE}",
    )
    (step_dir / "state" / "extra").unlink()
    (step_dir / DIGESTS_FILE).write_text('{"files": ')  # a truncated manifest
    ok, problem = verify_digests(str(step_dir))
    assert ok is False and problem.startswith(f"its {DIGESTS_FILE} does not read back"), problem
    (step_dir / DIGESTS_FILE).unlink()  # a checkpoint from before digests
    assert verify_digests(str(step_dir)) == (None, None)
    assert file_digests(str(step_dir))[name] == hashlib.sha256(original).hexdigest()


# ---- Restoring. -----------------------------------------------------------------------


def test_a_flipped_byte_in_the_newest_checkpoint_is_caught_and_the_run_ends_identical(
    trained, env, tmp_path
):
    workdir = _copy(trained, tmp_path)
    largest = _largest_array_file(os.path.join(workdir, "checkpoints", "12"))
    name = str(largest.relative_to(os.path.join(workdir, "checkpoints", "12")))
    size = largest.stat().st_size
    _flip_byte(largest)
    code, out = chaos.run_to_completion(workdir, STEPS, EVERY, env, str(tmp_path / "log"))
    assert code == 0, out
    reports = [line for line in out.splitlines() if "is damaged" in line]
    assert len(reports) == 1, out
    aside = os.path.join(workdir, "checkpoints", "corrupt-12")
    assert reports[0] == (
        f"checkpoint of step 12 is damaged: its file {name} does not match its sha256 "
        f"digest; moved it to {aside}; trying step 8"
    ), reports
    assert chaos.resumed_step(out) == 8
    evidence = pathlib.Path(aside, name)  # kept as found: same size, one byte changed
    assert evidence.stat().st_size == size
    different = np.flatnonzero(
        np.frombuffer(evidence.read_bytes(), np.uint8)
        != np.frombuffer(pathlib.Path(trained, "checkpoints", "12", name).read_bytes(), np.uint8)
    )
    assert different.tolist() == [size // 2]
    # Steps 9-12 trained again: the same per-step losses (metrics.jsonl) and final state
    # as the uninterrupted run, and the new step 12 has digests that match.
    comparison = chaos.compare(trained, workdir, STEPS)
    assert comparison["identical_metrics"]
    assert comparison["identical_state"], comparison["differing_arrays"]
    assert comparison["same_checkpoints"] and not comparison["debris"], comparison
    losses = [
        (r["step"], r["train_loss"]) for r in chaos.metrics_rows(workdir) if "train_loss" in r
    ]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)), losses
    reference = [
        (r["step"], r["train_loss"]) for r in chaos.metrics_rows(trained) if "train_loss" in r
    ]
    assert losses == reference
    assert verify_digests(os.path.join(workdir, "checkpoints", "12")) == (True, None)


# ---- The verify command. ----------------------------------------------------------------


def test_verify_says_ok_for_each_checkpoint_of_a_clean_workdir(trained):
    result = _verify(f"--workdir={trained}", module=True)  # attention-jax verify
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["step 4: ok", "step 8: ok", "step 12: ok"]


def test_verify_names_the_damaged_file_and_fails(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    checkpoints = pathlib.Path(workdir, "checkpoints")
    largest = _largest_array_file(checkpoints / "12")
    _flip_byte(largest)
    os.remove(checkpoints / "4" / DIGESTS_FILE)  # as written before digests existed
    before = {str(p): p.stat().st_mtime_ns for p in checkpoints.rglob("*")}
    result = _verify(f"--workdir={workdir}")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        "step 4: no digests",
        "step 8: ok",
        f"step 12: damaged: its file {largest.relative_to(checkpoints / '12')} does not "
        "match its sha256 digest",
    ]
    assert {str(p): p.stat().st_mtime_ns for p in checkpoints.rglob("*")} == before  # read only


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_verify_of_a_workdir_without_checkpoints_is_one_line(tmp_path, where):
    workdir = tmp_path / "w"
    if where == "empty":
        workdir.mkdir()
    result = _verify(f"--workdir={workdir}")
    assert result.returncode == 1
    assert result.stdout == ""
    expected = (
        f"verify.py: error: --workdir {workdir}: no such directory"
        if where == "missing"
        else f"verify.py: error: {workdir / 'checkpoints'} holds no checkpoint"
    )
    assert result.stderr.strip().splitlines() == [expected], result.stderr


def test_a_reader_skips_a_changed_checkpoint_and_moves_nothing(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    largest = _largest_array_file(os.path.join(workdir, "checkpoints", "12"))
    name = largest.relative_to(os.path.join(workdir, "checkpoints", "12"))
    _flip_byte(largest)
    said = []
    ckpt = Checkpointer(workdir, create=False, log=said.append)
    step, _, params = next(ckpt.intact())
    ckpt.close()
    assert step == 8 and jax.tree.leaves(params)
    assert said == [
        f"checkpoint of step 12 in {ckpt.directory} is damaged: its file {name} does not "
        "match its sha256 digest; trying step 8"
    ]
    assert chaos.finished_steps(workdir) == [4, 8, 12]  # a reader moves nothing
