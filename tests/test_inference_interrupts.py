"""Ctrl-C reaches translate / evaluate as one line and exit status 130, wherever it lands:
inside a restore (Orbax hands it back wrapped: it must not read as a damaged checkpoint) or
inside a callback Python cannot raise from (a gc callback: it would be printed and lost)."""

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from attention_jax.cli import errors
from attention_jax.workdir.checkpoint import _is_damage, _reraise


def _wrapped(inner: BaseException) -> Exception:
    try:
        try:
            raise inner
        except BaseException as e:
            raise RuntimeError("restore failed in a worker thread") from e
    except RuntimeError as outer:
        return outer


def test_an_interrupted_restore_is_not_damage_and_is_raised_as_an_interrupt():
    interrupted = _wrapped(KeyboardInterrupt())
    assert not _is_damage(interrupted)
    with pytest.raises(KeyboardInterrupt):
        _reraise(interrupted)
    cancelled = _wrapped(asyncio.CancelledError())  # Orbax cancels the other reads of a
    assert _is_damage(cancelled)  # checkpoint when one fails: that is damage, not Ctrl-C
    truncated = _wrapped(ValueError("OUT_OF_RANGE: Requested byte range [0, 3871) is not valid"))
    assert _is_damage(truncated)
    with pytest.raises(RuntimeError, match="restore failed"):
        _reraise(truncated)


# Run in a fresh process, as the commands are: the test process's signal state is shared
# with everything else pytest ran.
REDELIVERY = """
import signal, sys, time
from attention_jax.cli import errors

signal.signal(signal.SIGINT, signal.default_int_handler)  # as run() does

class RaisesInDel:
    def __del__(self):
        raise KeyboardInterrupt  # as when Ctrl-C lands in a gc callback or a __del__

errors.redeliver_swallowed_interrupts()
try:
    RaisesInDel()  # dropped at once: __del__ raises, Python calls the unraisable hook
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.001)  # the main thread, where the interrupt arrives again
except KeyboardInterrupt:
    print("interrupted")
"""


def test_an_interrupt_python_cannot_raise_is_delivered_again():
    r = subprocess.run(
        [sys.executable, "-c", REDELIVERY], capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    here = signal.getsignal(signal.SIGINT)  # (a clue if this fails: inherited dispositions)
    assert r.returncode == 0 and r.stdout == "interrupted\n", (r.stdout, r.stderr, here)
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_other_unraisable_errors_are_still_reported(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    errors.redeliver_swallowed_interrupts()

    class Fails:
        def __del__(self):
            raise ValueError("in __del__")

    Fails()
    assert len(seen) == 1 and seen[0].exc_type is ValueError
