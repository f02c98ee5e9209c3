"""Chaos: a training run SIGKILLed at random (seeded) moments, also while an asynchronous
checkpoint is being written, and restarted with the same workdir until it completes, ends
bit-identical to a run never killed; SIGTERM and Ctrl-C save the current step and exit with
143 / 130, and a restart resumes from exactly that step.

The harness is benchmarks/chaos.py, whose command line is the long mode (12 kills and
more); here 3 kills. Every run is `experiments/train.py` in a subprocess on one CPU device,
with a JAX compilation cache shared by the session, so that a restart costs seconds.
"""

import pathlib
import re
import signal
import time

import pytest

from tests.chaos_support import chaos, session_env, trained_once

ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS, EVERY = 24, 4  # checkpoints at 1 (a fresh run's first step), 4, 8, ...; keep 3


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return session_env(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env):
    """A run never interrupted (trained once per session, read only)."""
    return trained_once(tmp_path_factory, "chaos_reference", STEPS, EVERY, env)


def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_state(reference, env, tmp_path):
    workdir = str(tmp_path / "w")
    result = chaos.chaos(
        workdir,
        kills=3,
        seed=0,
        steps=STEPS,
        every=EVERY,
        env=env,
        logs=str(tmp_path / "logs"),
        modes=("save", "step", "startup"),  # one of each, a checkpoint write first
    )
    comparison = chaos.compare(reference, workdir, STEPS)
    figures = chaos.report(result, comparison)
    print(figures)  # shown with -s, and with the failure
    assert result["final_returncode"] == 0, figures
    assert len(result["kills"]) == 3, figures
    assert all(k.survived for k in result["kills"]), figures  # newest finished, never partial
    assert any(k.mid_write for k in result["kills"]), figures  # a save was cut short
    assert not result["damage_reports"], figures
    assert comparison["identical_state"], comparison["differing_arrays"]
    assert comparison["identical_metrics"], figures
    assert comparison["same_checkpoints"], figures
    assert not comparison["debris"], comparison["debris"]


@pytest.mark.parametrize(
    "signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"]
)
def test_a_stop_signal_saves_the_current_step_and_a_restart_resumes_there(
    reference, env, tmp_path, signum, status
):
    workdir, log = str(tmp_path / "w"), tmp_path / "stopped.log"
    command = chaos.train_command(workdir, STEPS, EVERY)
    command[:1] = chaos.WITH_CTRL_C  # SIGINT as at a terminal, however pytest was started
    proc = chaos.launch(command, env, str(log))
    deadline = time.monotonic() + 300
    while max(chaos.logged_steps(log.read_text()) or [0]) < 5:  # between checkpoints 4 and 8
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.002)
    proc.send_signal(signum)
    code = chaos.finish(proc, timeout=300)
    out = log.read_text()
    assert code == status, out
    name = signal.Signals(signum).name
    match = re.search(rf"^{name}: stopped after step (\d+) and saved its checkpoint", out, re.M)
    assert match, out
    stopped = int(match.group(1))
    assert stopped == max(chaos.logged_steps(out)), out  # the step it had reached: none lost
    assert stopped < STEPS
    assert chaos.finished_steps(workdir)[-1] == stopped  # complete when the process exited
    assert not chaos.unfinished(workdir)

    code, out = chaos.run_to_completion(workdir, STEPS, EVERY, env, str(tmp_path / "resumed.log"))
    assert code == 0, out
    assert chaos.resumed_step(out) == stopped
    comparison = chaos.compare(reference, workdir, STEPS)
    assert comparison["identical_state"], comparison["differing_arrays"]
    assert comparison["identical_metrics"]
    assert comparison["same_checkpoints"] and not comparison["debris"], comparison
