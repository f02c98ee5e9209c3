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
"""

from __future__ import annotations

import gc
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
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # the previous async save's error surfaces here too
            raise self._save_failed(step, e) from e
        if started:
            self._pending = step
        return started

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
        ``(None, None)``; newer ones whose metadata does not are moved aside as damaged."""
        for step in reversed(self.steps()):
            meta, problem = None, None
            try:
                meta = self.read_meta(step)
            except Exception as e:
                if not _is_damage(e):
                    _reraise(e)
                problem = f"its metadata does not read back ({_brief(e)})"
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
        read back (truncated, missing) is reported, moved to ``corrupt-<step>`` and the
        next older one is tried.
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
                with _AbandonedReads() as abandoned:
                    try:
                        state, _ = self.restore(step, abstract_state, data_iterator=data_iterator)
                        jax.block_until_ready(state)
                    except Exception as e:
                        if not _is_damage(e):
                            _reraise(e)
                        problem = f"its arrays do not read back ({_brief(e)})"
                    if problem is not None:
                        abandoned.settle()
            if _everywhere(problem is None):
                return step, state
            self._move_aside(step, problem or "it does not read back on every process")

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
        or arrays that do not read back) is reported in one line (the Checkpointer's `log`)
        and skipped.
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
            if check_meta is not None:
                check_meta(step, meta)
            problem = None
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
