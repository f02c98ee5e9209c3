"""Expensive test fixtures built once per test session, even under pytest-xdist.

A module- or session-scoped fixture is per *process*: with ``make test``'s xdist workers
each worker would train its own copy of, say, the translate CLI's workdir (a minute each).
``--dist loadgroup`` was meant to keep such tests on one worker, but with pytest 9.2 and
pytest-xdist 3.8 it does not group them (reproduced: one group, both workers), so the
sharing is done here, with the workers' common temp root and a file lock: the first worker
to ask builds, the others wait and reuse the result.
"""

from __future__ import annotations

import fcntl
import pathlib
import shutil
from collections.abc import Callable


def shared_root(tmp_path_factory) -> pathlib.Path:
    """The temp folder all xdist workers of this session share (the basetemp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if base.name.startswith("popen-gw") else base


def build_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """``build(path)`` the first time any worker asks for `name`; the same path after that.

    A build that raised leaves no done-marker, so the next request builds again (and fails
    the same way, in its own test)."""
    root = shared_root(tmp_path_factory)
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            done.write_text("")
    return path
