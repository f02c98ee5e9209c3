"""The workdir contract: what a training run keeps in its ``--workdir``, and who may write it.

    <workdir>/config.json      the experiment config, as resolved by the run that trained it
                               (model.vocab_size from the vocabulary, data.data_dir absolute);
                               translate / evaluate rebuild the model and find the data from it
    <workdir>/vocab.model      the SentencePiece vocabulary (translation tasks)
    <workdir>/checkpoints/     Orbax checkpoints, one folder per step (checkpoint.py)
    <workdir>/metrics.jsonl    one JSON object per line: {"step": int, name: number | null}
    <workdir>/tensorboard/     TensorBoard event files (tensorboardX)
    <workdir>/train.lock       held (flock) by the one training run writing the workdir

Only one training run may write a workdir at a time: a second one would interleave
metrics.jsonl records, write a second event file and race the first one's checkpoints.
`lock` takes an exclusive ``fcntl.flock`` on ``train.lock``; the kernel drops it when the
holder's process ends, however it ends (SIGKILL, power loss on a local disk), so a killed run
never leaves the workdir stuck. The file itself stays (it only says who held it last).

config.json, metrics.jsonl and the vocabulary are written to a temporary name next to them
and renamed, so a reader never sees half a file; `stale_temporaries` finds what a run killed
mid-write left behind.

No JAX or Flax here: the data layer and the command-line tools read these names too.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import socket
import time

import ml_collections

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.model"
CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LOCK_FILE = "train.lock"
PROFILE_DIR = "profile"  # config.profile_steps' jax.profiler trace

try:
    import fcntl
except ImportError:  # Windows: no flock; the workdir is then not guarded
    fcntl = None


class WorkdirInUseError(RuntimeError):
    """Another training run holds the workdir's lock."""


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def vocab_path(workdir: str) -> str:
    return os.path.join(workdir, VOCAB_FILE)


def checkpoints_dir(workdir: str) -> str:
    return os.path.join(workdir, CHECKPOINTS)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def tensorboard_dir(workdir: str) -> str:
    return os.path.join(workdir, TENSORBOARD)


def profile_dir(workdir: str) -> str:
    return os.path.join(workdir, PROFILE_DIR)


def lock_path(workdir: str) -> str:
    return os.path.join(workdir, LOCK_FILE)


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the experiment config as ``<workdir>/config.json`` (atomically)."""
    path = config_path(workdir)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The experiment config a training run saved in `workdir`; a missing or damaged file,
    or JSON that is not a run's config, raises an error naming the file."""
    path = config_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: is {workdir!r} the --workdir of a training run?"
        )
    with open(path, encoding="utf-8") as f:
        try:
            fields = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"{path} is not a valid config JSON file ({e})") from None
    missing = [k for k in ("model", "data") if not isinstance(fields, dict) or k not in fields]
    if missing:
        raise ValueError(
            f"{path} is not the config.json of a training run: it has no {missing} section "
            f"(found {sorted(fields) if isinstance(fields, dict) else type(fields).__name__})"
        )
    return ml_collections.ConfigDict(fields)


def stale_temporaries(workdir: str) -> list[str]:
    """The half-written files a run killed mid-write left in `workdir`: config.json
    (`save_config`), metrics.jsonl (train/reporting.py) and the vocabulary
    (data/tokenizer.py) are each written to one of these names and renamed."""
    where = glob.escape(workdir)
    patterns = (f"{CONFIG_FILE}.tmp.*", f"{METRICS_FILE}.tmp", f".{VOCAB_FILE}.*.tmp")
    found = [p for pattern in patterns for p in glob.glob(os.path.join(where, pattern))]
    return [p for p in found if os.path.isfile(p)]


class WorkdirLock:
    """An exclusive, non-blocking lock on ``<workdir>/train.lock`` (see the module docstring).

    `acquire` raises `WorkdirInUseError` at once, naming the holder (pid, host, start time),
    if another process, or another `WorkdirLock` of this process, holds it. On a file system
    without flock (some network mounts answer ENOLCK / EOPNOTSUPP) it prints a warning and
    goes on unguarded rather than refusing to train."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = lock_path(workdir)
        self._fd = None

    def acquire(self) -> WorkdirLock:
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec by default
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirInUseError(
                    f"workdir {self.workdir!r} is in use by another training run"
                    + (f" ({holder})" if holder else "")
                    + f"; wait for it to finish or stop it, or use another --workdir "
                    f"(the lock is {self.path}, released when that process ends)"
                ) from None
            print(
                f"warning: cannot lock {self.path} ({e.strerror or e}); nothing stops a "
                "second training run from writing this workdir at the same time",
                flush=True,
            )
            return self
        # Who holds it, for the message a second run prints; written in place (the lock is
        # on the file, so it is not replaced by a rename).
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    return ""


def lock(workdir: str) -> WorkdirLock:
    """``with workdir.lock(path): ...``: holds `path`'s training lock for the block."""
    return WorkdirLock(workdir)
