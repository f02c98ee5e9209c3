"""Orbax checkpoints of the train state (params, optimizer state, step, RNG), metadata (the
model's shape, the vocabulary's fingerprint) and the data iterator's state (grain's).

Saves are asynchronous and atomic: Orbax writes ``<step>.orbax-checkpoint-tmp`` and renames
it to ``<step>`` once every file is written, so a run killed while saving never leaves a
checkpoint that looks complete. A training run's Checkpointer (``cleanup=True``) removes
such unfinished directories when it starts.

Nothing is unpickled: arrays are read by TensorStore (OCDBT/zarr), the metadata and grain's
iterator state are JSON.

A checkpoint that does not read back whole (a truncated or missing file) is moved aside to
``checkpoints/corrupt-<step>`` (kept as evidence, never deleted) and the next older one is
tried; see `Checkpointer.restore_newest`. One written by a different model is refused with
`IncompatibleCheckpointError`, and nothing is changed.

Orbax stores no checksums, so a flipped bit inside an array file would be restored silently.
Each checkpoint therefore gets ``<step>/digests.json``: the sha256 of every other file in
it, written in Orbax's save thread once every file is written and before the directory is
renamed to ``<step>`` (Orbax's post-finalization callback): a checkpoint that looks complete
has its digests, and the training loop never waits for them unless it waits for the save.
Restoring checks them (the metadata's first, the arrays' while they are read; the state is
used only if they match); a file that does not match, or is missing, or is not listed,
makes the checkpoint damaged, like a truncated one. A checkpoint without ``digests.json``
(written before digests existed) is restored as before; `verify_digests` calls it "no
digests". In a multi-host run process 0
writes and checks the manifest over every file it sees (Orbax's multi-host saves need a
file system all processes share).
"""

from __future__ import annotations

import collections
import concurrent.futures
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from attention_jax import multihost
from attention_jax.nn.config import is_int
from attention_jax.workdir import checkpoints_dir

CORRUPT_PREFIX = "corrupt-"  # checkpoints/corrupt-<step>: a damaged checkpoint, moved aside
DIGESTS_FILE = "digests.json"  # <step>/digests.json: the sha256 of each of the step's files
# sha256: hashlib's fastest digest where the CPU has SHA extensions (x86 since 2017-2019,
# ARMv8): 1.3 GB/s on one core here, blake2b 0.65 GB/s; files are hashed in parallel.
DIGEST = "sha256"
_ALL_FILES, _ARRAY_FILES, _METADATA_FILES = "all", "arrays", "metadata"  # which to check


class IncompatibleCheckpointError(ValueError):
    """A checkpoint of a different model, optimizer or vocabulary than the one restoring it."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (a full disk, a lost mount, ...); the older ones are intact."""


class Checkpointer:
    """`CheckpointManager` over ``<workdir>/checkpoints``: keep the last `keep`, save every
    `every` steps (and whenever `force` is passed).

    `cleanup`: remove unfinished checkpoints (left by a run killed while saving) now. Only
    the training run should: a reader (evaluation while training runs) would delete the
    save in progress. `log`: where messages about damaged or unfinished checkpoints go
    (process 0 only). `create`: create ``<workdir>/checkpoints`` if it is missing (readers
    pass False: they write nothing).
    """

    def __init__(
        self,
        workdir: str,
        *,
        keep: int = 3,
        every: int = 1000,
        data_state: bool = True,
        cleanup: bool = False,
        create: bool = True,
        log: Callable[[str], None] = print,
    ):
        self.directory = checkpoints_dir(os.path.abspath(workdir))
        self._log = log if jax.process_index() == 0 else (lambda message: None)
        self._pending = None  # the step of the last save started and not yet known complete
        self._digests_checked = set()  # (step, which files) that matched their digests
        self._sealing = collections.deque()  # steps saved whose digests are not written yet
        if cleanup:
            unfinished = _unfinished_steps(self.directory)
            if unfinished:
                self._log(
                    f"checkpoints: removing the unfinished checkpoint(s) of step(s) {unfinished} "
                    f"in {self.directory} (a run stopped while writing them)"
                )
            # Now, not in the background as Orbax's cleanup (below; it covers object stores)
            # would: that one is only awaited by the next save, which may never come.
            if jax.process_index() == 0:
                for name in _unfinished_names(self.directory):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            multihost.sync("checkpoint_cleanup")
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        if data_state:  # grain writes one small JSON file per process
            handlers["data"] = grain.checkpoint.CheckpointHandler()
        policies = ocp.checkpoint_managers
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                # Orbax's default policy, spelled out: every `every` steps, the first step
                # of a fresh run, and the step a multi-host preemption notice agrees on.
                save_decision_policy=policies.AnySavePolicy(
                    [
                        policies.FixedIntervalPolicy(every),
                        policies.PreemptionCheckpointingPolicy(),
                        policies.InitialSavePolicy(),
                    ]
                ),
                preservation_policy=policies.LatestN(keep),
                cleanup_tmp_directories=cleanup,
                create=create,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            ),
            item_handlers=handlers,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """Whether a multi-host run's processes agreed to stop at `step` (JAX's preemption
        notice, delivered as SIGTERM to any process); always False in one process."""
        return self.manager.reached_preemption(step)

    # ---- Saving. ---------------------------------------------------------------------

    def save(
        self, step: int, state, meta: dict, *, force: bool = False, data_iterator=None
    ) -> bool:
        """Saves (asynchronously) if `step` is due or `force`; with `data_iterator`, its
        state too, so a resumed run continues the exact data stream.

        Raises `CheckpointSaveError` if this save, or the previous one still being written,
        fails; the checkpoints written before stay complete and restorable."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._sealing.append(step)  # if Orbax starts this save, its finalize seals it
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # the previous async save's error surfaces here too
            raise self._save_failed(step, e) from e
        if started:
            self._pending = step
        elif self._sealing and self._sealing[-1] == step:
            self._sealing.pop()
        return started

    def _seal(self) -> None:
        """Orbax's post-finalization callback (its save thread), once every file of the
        oldest save in `_sealing` is written and before its directory is renamed to
        ``<step>`` (or marked committed): writes the digests (process 0). Saves finalize
        one at a time and in order, so the oldest is the one finalizing."""
        if not self._sealing:  # not a save of ours: nothing to name it by (no digests)
            return
        step = self._sealing.popleft()
        if jax.process_index() != 0:
            return
        final = os.path.join(self.directory, str(step))
        unfinished = [
            os.path.join(self.directory, n)
            for n in _unfinished_names(self.directory)
            if re.match(ocp.path.step.TMP_DIR_STEP_PATTERN, n)
            and int(re.match(ocp.path.step.TMP_DIR_STEP_PATTERN, n).group(1)) == step
        ]
        if len(unfinished) == 1:
            write_digests(unfinished[0])
        elif not unfinished and os.path.isdir(final):  # object stores: no rename
            write_digests(final)
        else:
            raise RuntimeError(
                f"digests for step {step}: expected one unfinished directory, found {unfinished}"
            )

    def wait(self):
        """Blocks until the save in progress is complete (raises `CheckpointSaveError` if
        it failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(None, e) from e
        self._pending = None

    def close(self):
        try:
            self.wait()
        except CheckpointSaveError:
            self.abandon()
            raise
        self.manager.close()

    def abandon(self):
        """Closes without raising: for error paths, where the error that matters is already
        on its way."""
        try:
            self.manager.close()
        except Exception:
            pass

    def _save_failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
        """The error to raise for a failed save, naming the step that failed and the newest
        complete checkpoint; the failed step's partial files are removed."""
        pending, self._pending = self._pending, None
        try:  # no writes may be in flight while partial directories are removed
            self.manager.wait_until_finished()
        except Exception:
            pass  # the pending save's error: it is `error`, or is told by its missing step
        self._sealing.clear()  # (after the wait) a failed save is never finalized
        if pending is not None and not os.path.isdir(os.path.join(self.directory, str(pending))):
            step = pending  # the previous (asynchronous) save is the one that failed
        if jax.process_index() == 0:
            for name in _unfinished_names(self.directory):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self.manager.reload()
        good = self.manager.latest_step()
        which = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
        message = (
            f"saving {which} to {self.directory} failed: {type(error).__name__}: {error}\n"
            + (
                f"the newest complete checkpoint is step {good}"
                if good is not None
                else "there is no complete checkpoint yet"
            )
            + "; fix the cause (free disk space, ...) and rerun the same command to resume"
        )
        code = getattr(error, "errno", None)
        return CheckpointSaveError(code, message) if code else CheckpointSaveError(message)

    # ---- Restoring. ------------------------------------------------------------------

    def restore(self, step: int, abstract_state, *, data_iterator=None):
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (and
        the data iterator's position into `data_iterator`, in place)."""
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["meta"]

    def newest_meta(self) -> tuple[int | None, dict | None]:
        """``(step, meta)`` of the newest checkpoint whose metadata reads back, or
        ``(None, None)``; newer ones whose metadata does not read back, or whose files do
        not match their digests, are moved aside as damaged."""
        for step in reversed(self.steps()):
            meta, problem = None, None
            try:
                meta = self.read_meta(step)
            except Exception as e:
                if not _is_damage(e):
                    _reraise(e)
                problem = f"its metadata does not read back ({_brief(e)})"
            # What did read back is trusted only if it matches its digests: the small files
            # (metadata) here, the array data while it is read (restore_newest). A file that
            # does not read back at all is reported as such (the reader's words).
            problem = problem or self._digest_problem(step, _METADATA_FILES)
            if _everywhere(problem is None):
                return step, meta
            self._move_aside(step, problem or "its metadata does not read back on every process")
        return None, None

    def restore_newest(self, abstract_state, *, check_meta=None, data_iterator=None):
        """Restores the newest checkpoint that reads back whole; returns ``(step, state)``,
        or ``(None, None)`` if there is none.

        Each candidate's metadata goes through ``check_meta(step, meta)`` (raise
        `IncompatibleCheckpointError` to refuse it) and its tree of arrays is compared with
        `abstract_state` (paths, shapes, dtypes): a mismatch raises
        `IncompatibleCheckpointError` and changes nothing. A checkpoint whose files do not
        read back (truncated, missing) or do not match their digests is reported, moved to
        ``corrupt-<step>`` and the next older one is tried.
        """
        while True:
            step, meta = self.newest_meta()
            if step is None:
                return None, None
            if check_meta is not None:
                check_meta(step, meta)
            problem = None
            try:
                saved = self.manager.item_metadata(step)["state"]
            except Exception as e:
                if not _is_damage(e):
                    _reraise(e)
                problem = f"its array metadata does not read back ({_brief(e)})"
            else:
                check_same_tree(step, saved, abstract_state)
                # The array files' digests are checked while Orbax reads them (hashing is
                # CPU, reading mostly waits): the state is returned only if they match.
                with (
                    concurrent.futures.ThreadPoolExecutor(1) as pool,
                    _AbandonedReads() as abandoned,
                ):
                    digests = pool.submit(self._digest_problem, step, _ARRAY_FILES)
                    try:
                        state, _ = self.restore(step, abstract_state, data_iterator=data_iterator)
                        jax.block_until_ready(state)
                    except Exception as e:
                        if not _is_damage(e):
                            _reraise(e)
                        problem = f"its arrays do not read back ({_brief(e)})"
                    changed = digests.result()
                    problem = problem or changed  # a read error first, as in newest_meta
                    if problem is not None:
                        state = None
                        abandoned.settle()
            if _everywhere(problem is None):
                return step, state
            self._move_aside(step, problem or "it does not read back on every process")

    def _digest_problem(self, step: int, files: str = _ALL_FILES) -> str | None:
        """What is wrong with `step`'s `files` (`_ALL_FILES`, `_ARRAY_FILES`,
        `_METADATA_FILES`) by their digests (process 0 checks; None on the others, and for a
        checkpoint without digests). Each is checked once per step and process."""
        if jax.process_index() != 0 or (step, files) in self._digests_checked:
            return None
        select = {_ALL_FILES: None, _ARRAY_FILES: _array_data}.get(
            files, lambda name: not _array_data(name)
        )
        ok, problem = verify_digests(os.path.join(self.directory, str(step)), select)
        if ok is not False:
            self._digests_checked.add((step, files))
        return problem

    def _move_aside(self, step: int, problem: str) -> None:
        """Renames the damaged checkpoint of `step` to ``corrupt-<step>`` (``.1``, ``.2``,
        ... if that exists), so it is neither restored nor deleted, and says so."""
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self.directory, f"{CORRUPT_PREFIX}{step}")
        n = 0
        while os.path.exists(target if n == 0 else f"{target}.{n}"):
            n += 1
        target = target if n == 0 else f"{target}.{n}"
        if jax.process_index() == 0:
            os.rename(source, target)
        multihost.sync(f"checkpoint_move_aside_{step}")
        older = [s for s in self.steps() if s < step]
        self._log(
            f"checkpoint of step {step} is damaged: {problem}; moved it to {target}; "
            + (f"trying step {older[-1]}" if older else "no older checkpoint")
        )
        self.manager.reload()

    def restore_on_one_device(self, step: int) -> dict:
        """The state saved at `step` as a plain tree on the first local device, whatever
        mesh or number of hosts wrote it: for evaluation, decoding and averaging on a
        machine other than the one that trained."""
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = self.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"]

    def intact(self, *, check_meta=None):
        """``(step, meta, params)`` of each checkpoint that reads back whole, newest first,
        on one device: for readers (translation, evaluation, averaging).

        Unlike `restore_newest`, nothing is moved or changed: a damaged checkpoint (metadata
        or arrays that do not read back, files that do not match their digests) is reported
        in one line (the Checkpointer's `log`) and skipped.
        ``check_meta(step, meta)`` may raise (e.g. `IncompatibleCheckpointError`) to refuse
        a checkpoint; that error propagates.
        """
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:
                if not _is_damage(e):
                    _reraise(e)
                self._log(self._damaged(step, f"its metadata does not read back ({_brief(e)})"))
                continue
            problem = self._digest_problem(step, _METADATA_FILES)
            if problem is not None:
                self._log(self._damaged(step, problem))
                continue
            if check_meta is not None:
                check_meta(step, meta)
            with _AbandonedReads() as abandoned:
                try:
                    params = self.restore_on_one_device(step)["params"]
                    jax.block_until_ready(params)
                except Exception as e:
                    if not _is_damage(e):
                        _reraise(e)
                    problem = f"its arrays do not read back ({_brief(e)})"
                if problem is not None:  # (the error, and the reads its frames hold, gone)
                    abandoned.settle()
            problem = problem or self._digest_problem(step, _ARRAY_FILES)  # trusted only so
            if problem is not None:
                self._log(self._damaged(step, problem))
                continue
            yield step, meta, params

    def _damaged(self, step: int, problem: str) -> str:
        self.manager.reload()
        older = [s for s in self.steps() if s < step]
        what = "is damaged"
        if not os.path.isdir(os.path.join(self.directory, str(step))):
            what = "was deleted while being read (a training run keeps only its newest)"
        return f"checkpoint of step {step} in {self.directory} {what}: {problem}; " + (
            f"trying step {older[-1]}" if older else "no older checkpoint"
        )

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]


# ---- Digests. ------------------------------------------------------------------------


# Orbax's top-level files rewritten when it commits a checkpoint, after the digests: its
# commit mark and its step metadata (times, handler names; no arrays, and JSON that fails
# to parse if damaged). Every other file, the items' commit marks included, is digested.
_WRITTEN_AT_COMMIT = ("commit_success.txt", "_CHECKPOINT_METADATA")


def _files(step_dir: str) -> list[str]:
    """The files under `step_dir` (relative, '/'-separated, sorted), but the manifest, its
    temporary and the files Orbax rewrites at the commit (`_WRITTEN_AT_COMMIT`)."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if not relative.startswith(DIGESTS_FILE) and relative not in _WRITTEN_AT_COMMIT:
                found.append(relative)
    return sorted(found)


def _digest(path: str, chunk: int = 16 << 20) -> str:
    h = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)  # releases the GIL: files hash in parallel threads
    return h.hexdigest()


def file_digests(step_dir: str, names: list[str] | None = None) -> dict[str, str]:
    """``{relative path: sha256 hex}`` of `names` (default: every file of the checkpoint
    but the manifest)."""
    names = _files(step_dir) if names is None else names
    workers = max(1, min(8, os.cpu_count() or 1, len(names)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        hexes = pool.map(lambda n: _digest(os.path.join(step_dir, n)), names)
        return dict(zip(names, hexes, strict=True))


def write_digests(step_dir: str) -> dict[str, str]:
    """Writes ``<step_dir>/digests.json`` (to a temporary name, then renamed: never half a
    manifest) and returns the digests. Not fsynced, as Orbax does not sync its own files:
    on ext4 a sync here would flush the whole checkpoint (+45% save time, measured); after
    a power loss an unreadable manifest makes the checkpoint damaged, not trusted."""
    digests = file_digests(step_dir)
    path = os.path.join(step_dir, DIGESTS_FILE)
    temporary = f"{path}.tmp"
    with open(temporary, "w") as f:
        json.dump({"algorithm": DIGEST, "files": digests}, f, indent=0, sort_keys=True)
    os.replace(temporary, path)
    return digests


def _array_data(name: str) -> bool:
    """Whether a checkpoint's file holds array bytes (OCDBT's ``.../d/<hash>``): the large
    ones; the others are small metadata (JSON, OCDBT manifests)."""
    return "/d/" in f"/{name}"


def verify_digests(step_dir: str, select=None) -> tuple[bool | None, str | None]:
    """``(True, None)`` if every file of the checkpoint in `step_dir` matches its digest,
    ``(None, None)`` if it has no digests (an older checkpoint), ``(False, problem)``
    naming the first file that is changed, missing or not listed. ``select(name)``: only
    the files it accepts (default: all). Reads no arrays: no JAX."""
    path = os.path.join(step_dir, DIGESTS_FILE)
    if not os.path.exists(path):
        return None, None
    try:
        with open(path) as f:
            manifest = json.load(f)
        expected, algorithm = manifest["files"], manifest["algorithm"]
        if not isinstance(expected, dict) or algorithm not in hashlib.algorithms_available:
            raise ValueError(f"files {type(expected).__name__}, algorithm {algorithm!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"its {DIGESTS_FILE} does not read back ({type(e).__name__}: {e})"
    present = _files(step_dir)
    if select is not None:
        present = [n for n in present if select(n)]
        expected = {n: d for n, d in expected.items() if select(n)}
    missing = sorted(set(expected) - set(present))
    if missing:
        return False, f"its file {missing[0]} is missing (listed in {DIGESTS_FILE})"
    extra = sorted(set(present) - set(expected))
    if extra:
        return False, f"its file {extra[0]} is not in {DIGESTS_FILE}"
    if algorithm != DIGEST:
        return False, f"its {DIGESTS_FILE} uses {algorithm!r}, this version reads {DIGEST!r}"
    actual = file_digests(step_dir, present)
    for name in present:
        if actual[name] != expected[name]:
            return False, f"its file {name} does not match its {DIGEST} digest"
    return True, None


def _abandoned_read_echo(unraisable) -> bool:
    """Whether an unraisable exception is an echo of a checkpoint read that failed.

    When one array of a checkpoint fails to read, Orbax abandons the restore's other reads
    and closes its event loop. Python then reports each abandoned read, with a screen of
    TensorStore spec each, at any later moment:
    - "RuntimeError: Event loop is closed", when a read completes (TensorStore's threads);
    - "Exception ignored in: <coroutine object _read_array_index_and_device_put>", when its
      coroutine is garbage-collected.
    The failure itself is reported in one line (`Checkpointer.intact`)."""
    if issubclass(unraisable.exc_type, RuntimeError) and (
        str(unraisable.exc_value) == "Event loop is closed"
    ):
        return True
    code = getattr(unraisable.object, "cr_code", None)
    return (
        code is not None
        and f"{os.sep}orbax{os.sep}" in code.co_filename
        and issubclass(unraisable.exc_type, Exception)
    )


class _AbandonedReads:
    """While a checkpoint is read: its failed reads' echoes (`_abandoned_read_echo`) are
    dropped; `settle` (after a failure) waits for the abandoned reads to end, so that their
    echoes come while they are dropped."""

    def settle(self, seconds: float = 0.3) -> None:
        time.sleep(seconds)
        gc.collect()  # the abandoned coroutines: finalized now, not in someone else's code

    def __enter__(self):
        self.previous = sys.unraisablehook

        def hook(unraisable):
            if not _abandoned_read_echo(unraisable):
                self.previous(unraisable)

        sys.unraisablehook = hook
        return self

    def __exit__(self, *exc):
        sys.unraisablehook = self.previous
        return False


def quiet_abandoned_reads() -> None:
    """For command-line tools: drops the echoes of a failed checkpoint read for the rest of
    the process (`_abandoned_read_echo`; and asyncio's logged "Task / Future exception was
    never retrieved" of the same reads: in a command-line tool only Orbax runs asyncio)."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _abandoned_read_echo(unraisable):
            previous(unraisable)

    class NeverRetrieved(logging.Filter):
        def filter(self, record):
            return "exception was never retrieved" not in record.getMessage()

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(NeverRetrieved())


def _unfinished_names(directory: str) -> list[str]:
    """Orbax's temporary directories (``<step>.orbax-checkpoint-tmp``) in `directory`."""
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if ocp.path.step.TMP_DIR_SUFFIX in n)


def _unfinished_steps(directory: str) -> list[int]:
    steps = []
    for name in _unfinished_names(directory):
        match = re.match(ocp.path.step.TMP_DIR_STEP_PATTERN, name)
        if match:
            steps.append(int(match.group(1)))
    return sorted(steps)


def _is_damage(error: Exception) -> bool:
    """Whether an error reading a checkpoint means its files are damaged, rather than the
    machine failing (memory, permissions) or the user pressing Ctrl-C (Orbax's restore
    threads hand the KeyboardInterrupt back wrapped), which must not get a checkpoint moved
    aside. TensorStore raises plain Exception / ValueError for missing and truncated files."""
    if isinstance(error, (MemoryError, PermissionError)) or _interruption(error):
        return False
    text = str(error)
    return not any(s in text for s in ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "Out of memory"))


def _interruption(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in `error`'s chain of causes: an interrupted restore,
    which Orbax's threads hand back wrapped. (Not asyncio's CancelledError: Orbax cancels
    the other reads of a checkpoint when one fails, so damage brings those too.)"""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reraise(error: Exception) -> NoReturn:
    """Raises `error`, which is not damage; as a KeyboardInterrupt if it is an interruption
    (so that a command stops as on Ctrl-C, not with a restore error)."""
    if _interruption(error):
        raise KeyboardInterrupt from error
    raise error


def _brief(error: Exception, limit: int = 300) -> str:
    """The root cause of `error`, on one line: TensorStore's own message (which file, which
    byte range) is at the bottom of Orbax's chain."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
        if id(error) in seen:
            break
        seen.add(id(error))
    text = " ".join(str(error).split())
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(error).__name__}: {text}"


def _path_name(path) -> str:
    """One key of a tree path as text: dict keys, attributes and indices alike (Orbax's
    metadata tree has dicts where the state has dataclasses and named tuples)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def check_same_tree(step: int, saved, abstract) -> None:
    """Raises `IncompatibleCheckpointError` naming the arrays whose paths, shapes or dtypes
    differ between the checkpoint's metadata and the state restoring it (arrays only on one
    side are counted per subtree: a changed optimizer differs in hundreds)."""
    ours = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    theirs = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    differences = []
    for only, there, here in ((ours, "model", "checkpoint"), (theirs, "checkpoint", "model")):
        other = theirs if only is ours else ours
        groups = {}
        for k in only.keys() - other.keys():
            group = "/".join(k.split("/")[:2])
            groups[group] = groups.get(group, 0) + 1
        differences += [
            f"{g}{'/...' if g not in only else ''}: {n} array(s) in the {there}, not in the {here}"
            for g, n in groups.items()
        ]
    for k in sorted(ours.keys() & theirs.keys()):
        a, b = ours[k], theirs[k]
        if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
            differences.append(
                f"{k}: checkpoint {np.dtype(b.dtype).name}{list(b.shape)}, "
                f"model {np.dtype(a.dtype).name}{list(a.shape)}"
            )
    if differences:
        shown = sorted(differences)[:8]
        more = len(differences) - len(shown)
        raise IncompatibleCheckpointError(
            f"the checkpoint of step {step} holds a different train state than this run "
            "builds:\n  "
            + "\n  ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
            + "\nuse the config that wrote it (model, optimizer: clip_norm, ...), or a new "
            "--workdir"
        )


def _everywhere(ok: bool) -> bool:
    """`ok` on every process (one process: `ok`)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def average_checkpoints(
    workdir: str, last_k: int, *, check_meta=None, log: Callable[[str], None] | None = None
):
    """The mean of the params of the last `last_k` checkpoints in `workdir` (the paper averages
    the last 5 checkpoints for base models and 20 for big ones, section 6.1).

    Returns ``(params, steps)``: params as host NumPy arrays (float32 sums, cast back to each
    leaf's dtype) and the steps averaged. A damaged checkpoint is skipped (reported through
    `log`, nothing is moved) and the next older one taken; raises if fewer than `last_k`
    checkpoints read back. ``check_meta(step, meta)``: see `Checkpointer.intact`.
    """
    if not is_int(last_k) or last_k < 1:
        raise ValueError(f"last_k must be a positive int, got {last_k!r}")
    ckpt = Checkpointer(workdir, create=False, log=log or print)
    try:
        total, dtypes, steps = None, None, []
        for step, _, restored in ckpt.intact(check_meta=check_meta):
            params = jax.tree.map(np.asarray, restored)
            if total is None:
                dtypes = jax.tree.map(lambda x: x.dtype, params)
                total = jax.tree.map(lambda x: x.astype(np.float32), params)
            else:
                total = jax.tree.map(lambda t, x: t + x.astype(np.float32), total, params)
            steps.append(step)
            if len(steps) == last_k:
                break
        if len(steps) < last_k:
            every = ckpt.steps()
            damaged = sorted(set(every) - set(steps))
            raise ValueError(
                f"average_checkpoints: asked for the last {last_k} checkpoints, but "
                f"{ckpt.directory} holds {len(every)} ({every})"
                + (f", of which {damaged} do not read back" if damaged else "")
            )
    finally:
        ckpt.close()
    mean = jax.tree.map(lambda t, d: (t / len(steps)).astype(d), total, dtypes)
    return mean, sorted(steps)
