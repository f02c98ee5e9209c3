"""`train_and_evaluate(config, workdir)`: the whole training run behind experiments/train.py.

Restarting with the same workdir resumes from the latest complete checkpoint. The built-in
task's batches are a pure function of the step, so the resumed run sees exactly the data an
uninterrupted run would have.

Stopping: SIGTERM or Ctrl-C (SIGINT) makes the run finish its step, save that step's
checkpoint, wait for it to be complete, and raise `Interrupted` (a SystemExit with status
128 + the signal's number: 143 / 130); a second signal acts at once. A run killed outright
(SIGKILL, power) resumes from its newest complete checkpoint. See checkpoint.py for
unfinished and damaged checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attention_jax.data import pipeline, tasks
from attention_jax.decode import decoding, metrics
from attention_jax.nn import sharding
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.model import Transformer, TransformerLM
from attention_jax.train import flops
from attention_jax.train import step as training
from attention_jax.train.reporting import MetricsWriter, Progress
from attention_jax.workdir import (
    VOCAB_FILE,
    WorkdirInUseError,
    WorkdirLock,
    checkpoints_dir,
    metrics_path,
    profile_dir,
    save_config,
    stale_temporaries,
    vocab_path,
)
from attention_jax.workdir.checkpoint import Checkpointer, IncompatibleCheckpointError
from attention_jax.workdir.experiment import (
    check_experiment,
    eval_split,
    model_config,
    model_kind,
    model_signature,
    nonfinite_policy,
    signature_differences,
    signature_hint,
)


def _check_workdir(workdir: str) -> None:
    """Fails before anything is trained if the workdir (or its checkpoints/) cannot be
    written: a missing parent that cannot be created, a path under a file, no permission."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise OSError(
            e.errno,
            f"workdir {workdir!r} cannot be created ({e.strerror or e}); use another --workdir",
        ) from e
    for directory in (workdir, checkpoints_dir(workdir)):
        if not os.path.isdir(directory):
            continue
        try:  # an anonymous file: nothing is left behind, whatever happens
            with tempfile.TemporaryFile(dir=directory) as f:
                f.write(b"ok")
        except OSError as e:
            raise OSError(
                e.errno,
                f"workdir {workdir!r} is not writable ({directory}: {e.strerror or e}); "
                "checkpoints and metrics could not be saved: use a writable --workdir",
            ) from e


def _lock_workdir(workdir: str) -> WorkdirLock:
    """The workdir's training lock (workdir.py), taken before anything in it is written.

    Multi-host: only process 0 takes it. The processes of one run share the workdir (and, on a
    network file system, one process's flock would refuse the others), and every process
    learns process 0's answer, so that all of them stop together instead of waiting forever
    for a process that refused alone."""
    lock, refused = WorkdirLock(workdir), ""
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirInUseError as e:
            refused = str(e)
    if jax.process_count() > 1:
        in_use = multihost_utils.broadcast_one_to_all(np.int32(bool(refused)))
        if int(in_use) and not refused:
            refused = f"workdir {workdir!r} is in use by another training run (see process 0)"
    if refused:
        raise WorkdirInUseError(refused)
    return lock


def resolve_config(
    config: ml_collections.ConfigDict, workdir: str | None
) -> ml_collections.ConfigDict:
    """A copy of `config` with what the run found out written in: ``model.vocab_size`` from
    the vocabulary (tasks.resolve_vocab_size) and ``data.data_dir`` made absolute (from
    ``$TFDS_DATA_DIR`` when unset). It is what config.json records, so translation and
    evaluation rebuild the same model and read the same data. `workdir` None: a new one."""
    resolved = config.copy_and_resolve_references()
    if config.data.dataset == "reversal":
        return resolved
    if tasks.task_kind(config) == "lm" and "task" not in resolved.data:
        with resolved.unlocked():  # recorded, so that the workdir says it holds an LM
            resolved.data.task = "lm"
    size, source = tasks.resolve_vocab_size(config, workdir)
    if size != config.model.vocab_size and jax.process_index() == 0:
        print(
            f"model.vocab_size: {size}, the size of the vocabulary {source} (the config "
            f"says {config.model.vocab_size})",
            flush=True,
        )
    resolved.model.vocab_size = size
    if "data_dir" in resolved.data:
        resolved.data.data_dir = tasks.data_dir(config)
    return resolved


def _remove_stale_temporaries(workdir: str) -> None:
    """Half-written files of a run killed mid-write (workdir.stale_temporaries). Harmless,
    but not left to pile up (only process 0 writes them)."""
    if jax.process_index() != 0:
        return
    for path in stale_temporaries(workdir):
        os.remove(path)


def _warn_if_short_of_space(directory: str, state, keep: int) -> None:
    """A warning when the disk cannot hold `keep` + 1 checkpoints of `state` (the newest
    is written before the oldest is deleted)."""
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    free = shutil.disk_usage(directory).free
    if jax.process_index() == 0 and free < size * (keep + 1):
        print(
            f"warning: {free / 2**20:.0f} MiB free in {directory}, but {keep + 1} checkpoints "
            f"of {size / 2**20:.1f} MiB are written there; saving may fail (disk full)",
            flush=True,
        )


def _check_model(workdir: str, step: int, saved: dict, cfg: TransformerConfig, kind: str) -> None:
    """Refuses a checkpoint of a different model (or kind of model: an LM's checkpoint for
    an encoder-decoder, or the reverse), naming the fields that differ."""
    theirs_kind = saved.get("model_kind", "encoder_decoder")  # written before LMs: one kind
    if theirs_kind != kind:
        raise IncompatibleCheckpointError(
            f"workdir {workdir!r} holds a checkpoint of a {_KIND_NAMES[theirs_kind]} (step "
            f"{step}) but the config trains a {_KIND_NAMES[kind]}; use a new --workdir, or "
            "the config that wrote it"
        )
    ours = model_signature(cfg)
    theirs = saved.get("model") or {}
    differ = signature_differences(ours, theirs)
    if differ:
        raise IncompatibleCheckpointError(
            f"workdir {workdir!r} holds a checkpoint of a different model (step {step}):\n  "
            + "\n  ".join(
                f"{k}: checkpoint {theirs.get(k)!r}, config {ours.get(k)!r}" for k in differ
            )
            + "\nuse a new --workdir, or the config that wrote it"
            + (f"\n{hint}" if (hint := signature_hint(differ)) else "")
        )


_KIND_NAMES = {"lm": "language model (TransformerLM)", "encoder_decoder": "Transformer"}


def _check_vocabulary(workdir: str, step: int, saved: dict, meta: dict) -> None:
    if saved.get("vocab_fingerprint") != meta.get("vocab_fingerprint"):
        raise IncompatibleCheckpointError(
            f"workdir {workdir!r}: the checkpoint (step {step}) was trained with vocabulary "
            f"{saved.get('vocab_fingerprint')} but {VOCAB_FILE} there is "
            f"{meta.get('vocab_fingerprint')}; use the vocabulary it was trained with"
        )


class Interrupted(SystemExit):
    """`train_and_evaluate` stopped on SIGTERM or SIGINT (Ctrl-C) after saving the checkpoint
    of `step` (complete when this is raised). Its exit status is 128 + the signal's number
    (143 for SIGTERM, 130 for Ctrl-C), as for a process the signal ended; rerunning the same
    command resumes from `step`. A SystemExit, like KeyboardInterrupt not an Exception."""

    def __init__(self, signum: int, step: int):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step


class _StopSignals:
    """While active, SIGTERM and SIGINT only set `received`: the loop then saves and stops.
    The first one puts the previous handlers back, so a second acts at once (Ctrl-C:
    KeyboardInterrupt; SIGTERM: the process ends).

    Not installed off the main thread (Python allows handlers only there), for a signal that
    is ignored (a background job's SIGINT), or in a multi-process run: there a process
    stopping alone would hang the others, and SIGTERM belongs to JAX's preemption service,
    which makes all processes save the same step (`Checkpointer.reached_preemption`)."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def install(self):
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_IGN and previous is not None:
                self._previous[signum] = previous
                signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.received = signum
        self.uninstall()

    def uninstall(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def _save_and_stop(signum: int, step: int, state, meta: dict, task, ckpt, also_close=()):
    """Saves `step` (unless it just was), waits until its checkpoint is complete, closes the
    logs, says so and raises `Interrupted`."""
    if ckpt.latest_step() != step:
        ckpt.save(step, state, meta, force=True, data_iterator=task_iterator(task))
    ckpt.close()
    for writer in also_close:
        writer.close()
    if jax.process_index() == 0:
        print(
            f"{signal.Signals(signum).name}: stopped after step {step} and saved its "
            f"checkpoint ({os.path.join(ckpt.directory, str(step))}); rerun the same command "
            "to resume from it",
            flush=True,
        )
    raise Interrupted(signum, step)


def _local_rows(batch: dict) -> dict:
    """This process's rows of a global batch (each process feeds its share to shard_batch)."""
    i, n = jax.process_index(), jax.process_count()
    return {k: v[i * len(v) // n : (i + 1) * len(v) // n] for k, v in batch.items()}


def evaluate(eval_fn, decode_fn, params, task, mesh, split: str = "validation") -> dict:
    """Teacher-forced loss / accuracy / exact match over the split's evaluation batches and,
    for tasks with text, sacreBLEU and chrF of greedy translations. A language model
    (`tasks.LMTask`): loss (nats per token), perplexity and bits per byte (`evaluate_lm`)."""
    if isinstance(task, tasks.LMTask):
        return evaluate_lm(eval_fn, params, task, mesh, split)
    data = task.eval_data(split)
    totals, hypotheses = None, []
    for batch in data.batches:
        valid = batch.get("valid")
        arrays = {k: v for k, v in batch.items() if k != "valid"}
        global_batch = sharding.shard_batch(_local_rows(arrays), mesh)
        sums = eval_fn(params, global_batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        if data.references is not None:
            ids = multihost_utils.process_allgather(
                decode_fn(params, global_batch["inputs"]), tiled=True
            )
            rows = np.asarray(ids)[valid] if valid is not None else np.asarray(ids)
            hypotheses += [task.tokenizer.decode(row) for row in rows]
    totals = jax.device_get(totals)
    out = {
        "loss": float(totals["loss_sum"] / max(totals["tokens"], 1.0)),
        "accuracy": float(totals["correct"] / max(totals["tokens"], 1.0)),
        "exact_match": float(totals["exact"] / max(totals["sequences"], 1.0)),
    }
    if data.references is not None:
        out["bleu"], _ = metrics.bleu(hypotheses, data.references)
        out["chrf"], _ = metrics.chrf(hypotheses, data.references)
    return out


def lm_sums(eval_fn, params, batches, mesh) -> dict[str, float]:
    """``{nll, tokens, bytes, correct}`` summed over LM evaluation `batches`
    (`step.lm_eval_step` on each, added on the host in float64: exact counts on any split)."""
    totals = {"nll": 0.0, "tokens": 0.0, "bytes": 0.0, "correct": 0.0}
    for batch in batches:
        arrays = {k: v for k, v in batch.items() if k != "valid"}
        sums = jax.device_get(eval_fn(params, sharding.shard_batch(_local_rows(arrays), mesh)))
        for key in totals:
            totals[key] += float(np.float64(sums[key]))
    return totals


def evaluate_lm(eval_fn, params, task, mesh, split: str = "validation") -> dict:
    """Loss (nats per token), perplexity and bits per byte of the split (every token once,
    no label smoothing; `pipeline.language_model_scores`), and next-token accuracy."""
    totals = lm_sums(eval_fn, params, task.eval_data(split).batches, mesh)
    scores = pipeline.language_model_scores(totals["nll"], totals["tokens"], totals["bytes"])
    scores["accuracy"] = totals["correct"] / max(totals["tokens"], 1.0)
    return scores


def score_lm_texts(config: ml_collections.ConfigDict, model, params, tokenizer, texts) -> dict:
    """An LM's ``{nll, tokens, bytes, correct}`` sums and ``{loss, perplexity,
    bits_per_byte}`` on `texts` (``[{"text": ...}]``), on one device (the params whole on
    it, as translate and generate use them), every token once, as training evaluates."""
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    eval_fn = training.jit_eval_step(
        model, NamedSharding(mesh, PartitionSpec()), mesh, loss_chunk=config.get("loss_chunk", 0)
    )
    data = tasks.lm_eval_data(config, tokenizer, texts, data_parallel=1)
    sums = lm_sums(eval_fn, params, data.batches, mesh)
    return {**sums, **pipeline.language_model_scores(sums["nll"], sums["tokens"], sums["bytes"])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final
    held-out metrics."""
    check_experiment(config)  # also for notebooks, which skip the command's checks
    if config.data.dataset != "reversal":  # not prepared: refused before the workdir is made
        tasks.check_dataset(config)
    _check_workdir(workdir)
    lock = _lock_workdir(workdir)
    try:
        with compilation_cache_in(config.get("compilation_cache_dir", "")):
            return _train_locked(config, workdir)
    finally:
        lock.release()


# The settings `compilation_cache_in` makes: the folder, and every compiled program written
# (JAX's defaults skip those compiled in under 1 s: a small model's every step).
_CACHE_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes")  # fmt: skip


@contextlib.contextmanager
def compilation_cache_in(directory: str | None):
    """JAX's persistent compilation cache in `directory` (``config.compilation_cache_dir``)
    while the context is open: each program compiled is written there, and one compiled
    before, by this or an earlier process (a resumed or repeated run), is read back instead
    of compiled. The key hashes the program, the devices, the compile options and the JAX
    version, so a stale entry is never read. On exit the previous settings are back (a
    notebook's later work is not cached there). ``''`` / None: nothing changes.

    The cache is trusted: whoever can write to the folder can make this process run code."""
    if not directory:
        yield
        return
    os.makedirs(directory, exist_ok=True)
    previous = [getattr(jax.config, name) for name in _CACHE_SETTINGS]
    _set_cache((os.path.abspath(directory), 0.0, -1))  # -1: entries of any size
    try:
        yield
    finally:
        _set_cache(previous)


def _set_cache(values) -> None:
    for name, value in zip(_CACHE_SETTINGS, values, strict=True):
        jax.config.update(name, value)
    # JAX opens the cache once, at the first compilation that uses it: make it open again
    # with these settings (a no-op if it was never opened).
    compilation_cache.reset_cache()


class _Profile:
    """``config.profile_steps = (start, stop)``: a ``jax.profiler`` trace of the train steps
    ``start <= state.step < stop`` (0-based: ``(0, 1)`` is the first step, compilation
    included) in ``<workdir>/profile/plugins/profile/<time>/*.xplane.pb``, each step (batch
    preparation included) under a ``StepTraceAnnotation``. TensorBoard's profile plugin
    (``tensorboard --logdir <workdir>/profile``) or xprof read it. Only process 0 traces;
    empty or None: no trace."""

    def __init__(self, steps, workdir: str, say: Callable[[str], None] = print):
        self.start, self.stop = tuple(steps) if steps else (0, 0)
        self.say = say
        self.directory = profile_dir(workdir)
        self.enabled = self.start < self.stop and jax.process_index() == 0
        self.active = False

    def step(self, step: int):
        """The context of train step `step` (its trace starts with the first step traced)."""
        if self.enabled and not self.active and self.start <= step < self.stop:
            jax.profiler.start_trace(self.directory)
            self.active = True
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, done: int, outputs) -> None:
        """After the step that leaves `done` steps taken: at `stop`, waits for `outputs` (the
        step's work) and writes the trace."""
        if self.active and done >= self.stop:
            jax.block_until_ready(outputs)
            self.close()
            self.say(f"profile of steps [{self.start}, {self.stop}): {self.directory}")

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()


@dataclasses.dataclass(frozen=True)
class _Run:
    """What a run is, before anything is read from its workdir."""

    config: ml_collections.ConfigDict  # resolved (resolve_config)
    workdir: str
    cfg: TransformerConfig
    model: Transformer | TransformerLM  # model_kind(config)
    optimizer: optax.GradientTransformation
    mesh: Mesh
    rules: tuple
    ckpt: Checkpointer


@dataclasses.dataclass(frozen=True)
class _Steps:
    """The compiled steps of a run."""

    train: Callable  # (state, batch) -> (state, metrics); sharded, the state donated
    eval: Callable  # (params, batch) -> sums (training.eval_step)
    # (params, inputs) -> ids: greedy, for periodic validation (None: a language model)
    decode: Callable | None
    # beam search (config.beam_size, config.alpha), for the test report (None: an LM)
    final_decode: Callable | None


@dataclasses.dataclass(frozen=True)
class _Session:
    """What the training loop and the final report use, once the train state exists."""

    run: _Run
    task: tasks.ReversalTask | tasks.TranslationTask | tasks.LMTask
    splits: tuple[str, ...]  # the task's (validation and test, if it has them)
    eval_split: str  # the one periodic evaluation reads (config.data.eval_split)
    meta: dict  # what each checkpoint records: the model's signature, the vocabulary's
    steps: _Steps
    log: MetricsWriter
    progress: Progress


def _train_locked(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """`train_and_evaluate` once the workdir's lock is held."""
    config = resolve_config(config, workdir)
    cfg = model_config(config)
    model = TransformerLM(cfg) if model_kind(config) == "lm" else Transformer(cfg)
    optimizer = training.make_optimizer(
        cfg.d_model,
        warmup_steps=config.warmup_steps,
        lr_factor=config.lr_factor,
        clip_norm=config.clip_norm or None,
    )
    mesh = sharding.make_mesh(**config.mesh)
    rules = sharding.complete_rules(config.sharding_rules)  # + any missing activation rules
    _remove_stale_temporaries(workdir)
    ckpt = Checkpointer(
        workdir, keep=config.keep_checkpoints, every=config.checkpoint_every,
        data_state=config.data.dataset != "reversal", cleanup=True,
    )  # fmt: skip
    run = _Run(config, workdir, cfg, model, optimizer, mesh, rules, ckpt)
    stop = _StopSignals()
    try:
        return _resume_and_train(run, stop)
    except Exception:
        ckpt.abandon()  # lets a save in progress complete
        raise
    finally:
        stop.uninstall()


def _resume_and_train(run: _Run, stop: _StopSignals) -> dict:
    """The phases of a run once its checkpointer exists; `stop` is installed around the
    training loop."""
    newest = _refuse_incompatible_workdir(run)  # before anything is created or written
    data_parallel = run.mesh.shape["data"] * run.mesh.shape["fsdp"]
    task = tasks.make_task(run.config, run.workdir, data_parallel=data_parallel)
    start, state, shardings, meta = _init_or_restore(run, task, newest)
    _warn_if_short_of_space(run.ckpt.directory, state, run.config.keep_checkpoints)
    if jax.process_index() == 0:  # for translate.py / evaluate.py; the checks above passed
        save_config(run.config, run.workdir)
    log = MetricsWriter(run.workdir, start)
    progress = Progress(run.config.num_train_steps, start)
    steps = _compile_steps(run, shardings)
    session = _Session(run, task, task.splits(), eval_split(run.config), meta, steps, log, progress)
    state, last_validation = _train_steps(session, state, start, stop)
    stop.uninstall()  # the final evaluation can be interrupted as usual
    progress.close()
    run.ckpt.close()
    return _final_report(session, state, start, last_validation)


def _refuse_incompatible_workdir(run: _Run) -> int | None:
    """The newest checkpoint's step (None: none), after refusing a workdir whose newest
    checkpoint is of another model, or whose vocabulary is missing."""
    workdir = run.workdir
    newest, saved = run.ckpt.newest_meta()
    if newest is not None:
        _check_model(workdir, newest, saved, run.cfg, model_kind(run.config))
    if (saved or {}).get("vocab_fingerprint") and not os.path.exists(vocab_path(workdir)):
        raise FileNotFoundError(
            f"workdir {workdir!r} holds checkpoints trained with the vocabulary "
            f"{saved['vocab_fingerprint']}, but its {VOCAB_FILE} is missing; put it "
            "back or use a new --workdir"
        )
    return newest


def _init_or_restore(run: _Run, task, newest: int | None):
    """``(start, state, shardings, meta)``: the train state created sharded and, if the
    workdir holds a checkpoint (`newest`), restored from the newest one that reads back
    whole (with the data iterator's position). `meta` is what each checkpoint records."""
    state, shardings = training.create_train_state(
        run.model, run.optimizer, task.example_batch(), jax.random.key(run.config.seed),
        run.mesh, run.rules,
    )  # fmt: skip
    meta = {"model": model_signature(run.cfg), "model_kind": model_kind(run.config), **task.meta()}
    if newest is None:
        return 0, state, shardings, meta

    def check(step, saved):
        _check_model(run.workdir, step, saved, run.cfg, model_kind(run.config))
        _check_vocabulary(run.workdir, step, saved, meta)

    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    ckpt = run.ckpt
    restored_step, restored = ckpt.restore_newest(
        abstract, check_meta=check, data_iterator=task_iterator(task)
    )
    if restored_step is None:
        raise NoIntactCheckpointError(
            f"no checkpoint in {ckpt.directory} reads back whole (the damaged ones were "
            "moved aside, see above); rerun to start from step 0, or put good ones back"
        )
    if jax.process_index() == 0:
        print(f"resumed from step {restored_step} ({ckpt.directory})", flush=True)
    return restored_step, restored, shardings, meta


def _compile_steps(run: _Run, shardings) -> _Steps:
    """The jitted train and eval steps and the decoders. Periodic validation decodes
    greedily (fast); the final test report uses beam search (config.beam_size,
    config.alpha; the paper: 4 and 0.6), as translate.py does."""
    config, model = run.config, run.model
    train = training.jit_train_step(
        model, run.optimizer, shardings, run.mesh, rules=run.rules,
        label_smoothing=config.label_smoothing, accum_steps=config.accum_steps,
        nonfinite=nonfinite_policy(config), loss_chunk=config.get("loss_chunk", 0),
    )  # fmt: skip
    eval_options = dict(loss_chunk=config.get("loss_chunk", 0))
    if not isinstance(model, TransformerLM):  # an LM is scored without label smoothing
        eval_options["label_smoothing"] = config.label_smoothing
    eval_step = training.jit_eval_step(
        model, shardings.params, run.mesh, rules=run.rules, **eval_options
    )
    if isinstance(model, TransformerLM):  # scored, not decoded
        return _Steps(train=train, eval=eval_step, decode=None, final_decode=None)
    max_decode = min(config.data.get("max_length", 0) + 50, run.cfg.max_len)
    return _Steps(
        train=train,
        eval=eval_step,
        decode=functools.partial(decoding.translate, model, max_length=max_decode, beam_size=1),
        final_decode=functools.partial(
            decoding.translate, model, max_length=max_decode,
            beam_size=config.get("beam_size", 4), alpha=config.get("alpha", 0.6),
        ),
    )  # fmt: skip


class _Throughput:
    """Tokens/s, target padding and MFU over each logging interval (the first one includes
    compilation), counted on the host from the batches fed; evaluation time is left out."""

    def __init__(self, cfg: TransformerConfig, peak: float | None, devices: int, step: int):
        self.cfg, self.peak, self.devices = cfg, peak, devices
        self.restart(step)

    def restart(self, step: int) -> None:
        self.mark_step, self.mark_time = step, time.perf_counter()
        self.tokens = self.flops = self.slots = 0.0

    def add(self, batch: dict) -> None:
        """Counts this process's `batch` (every process feeds a share of the same size)."""
        tokens, step_flops = _count(self.cfg, batch)
        self.tokens += tokens * jax.process_count()
        self.flops += step_flops * jax.process_count()
        self.slots += batch["targets"].size * jax.process_count()

    def exclude(self, seconds: float) -> None:
        self.mark_time += seconds

    def record(self, done: int) -> tuple[dict, float]:
        """The interval's figures up to step `done`, and its steps per second."""
        seconds = max(time.perf_counter() - self.mark_time, 1e-9)
        record = {
            "tokens_per_s": self.tokens / seconds,  # target tokens
            # target slots holding no token (padding, or the end of packed rows)
            "target_padding": 1.0 - self.tokens / max(self.slots, 1.0),
        }
        if self.peak:
            record["mfu"] = self.flops / seconds / (self.peak * self.devices)
        return record, (done - self.mark_step) / seconds


def _train_steps(session: _Session, state, start: int, stop: _StopSignals):
    """Steps `start` .. config.num_train_steps: logging, periodic validation, the
    non-finite policy, checkpoints, and stopping on a signal or a preemption. Returns the
    final state and the last validation scores (None: none ran)."""
    run, task, steps = session.run, session.task, session.steps
    config, ckpt, mesh = run.config, run.ckpt, run.mesh
    log, progress = session.log, session.progress
    validate = session.eval_split in session.splits
    if not validate and jax.process_index() == 0:
        print(
            f"no {session.eval_split} split in {config.data.dataset}: no periodic evaluation",
            flush=True,
        )
    last_validation = None
    total = config.num_train_steps
    peak = (config.peak_flops_per_device or flops.peak_flops_per_device()) or None
    # The host reads metrics only at logging steps.
    throughput = _Throughput(run.cfg, peak, mesh.size, start)
    stop_on_nonfinite = nonfinite_policy(config) == "stop"
    profile = _Profile(config.get("profile_steps", None), run.workdir, progress.print)
    stop.install()
    try:
        for step in range(start, total):
            with profile.step(step):
                batch = task.next_batch(step)
                state, metrics = steps.train(state, sharding.shard_batch(batch, mesh))
            profile.after(step + 1, (state, metrics))
            throughput.add(batch)
            done = step + 1
            last = done == total
            if done % config.log_every == 0 or last:
                m = jax.device_get(metrics)
                rates, steps_per_s = throughput.record(done)
                record = {
                    "train_loss": float(m["loss"]),
                    "train_accuracy": float(m["accuracy"]),
                    **_train_lm_scores(m, config),
                    **rates,
                }
                if int(m["nonfinite_steps"]):  # updates withheld so far (config.nonfinite)
                    record["nonfinite_steps"] = int(m["nonfinite_steps"])
                log.write(done, record)
                progress.update(done, record, eta_s=(total - done) / steps_per_s)
                throughput.restart(done)
            if validate and (done % config.eval_every == 0 or last):
                eval_start = time.perf_counter()
                ev = last_validation = evaluate(
                    steps.eval, steps.decode, state.params, task, mesh, split=session.eval_split
                )
                log.write(done, {f"eval_{k}": v for k, v in ev.items()})
                progress.print(f"step {done}: {session.eval_split} {_fmt(ev)}")
                throughput.exclude(time.perf_counter() - eval_start)  # not training time
            if stop_on_nonfinite and (
                done % config.log_every == 0 or done % config.checkpoint_every == 0 or last
            ):  # at steps whose metrics are read anyway, and before any save
                _stop_if_nonfinite(metrics, ckpt, also_close=(progress, log))
            ckpt.save(done, state, session.meta, force=last, data_iterator=task_iterator(task))
            preempted = jax.process_count() > 1 and ckpt.reached_preemption(done)
            if stop.received is not None or preempted:
                signum = stop.received or signal.SIGTERM
                _save_and_stop(
                    signum, done, state, session.meta, task, ckpt, also_close=(progress, log)
                )
    finally:
        profile.close()  # a run ended or stopped inside the traced steps
    return state, last_validation


def _final_report(session: _Session, state, start: int, last_validation: dict | None) -> dict:
    """The held-out metrics of the final state (the test split with beam search, else the
    last validation scores), written to the log and said on the terminal with where
    everything is. A language model: loss, perplexity and bits per byte (test, unless
    periodic evaluation already reads it)."""
    run, task, steps, log = session.run, session.task, session.steps, session.log
    config, mesh, split = run.config, run.mesh, session.eval_split
    if "test" in session.splits and split != "test":
        final = evaluate(steps.eval, steps.final_decode, state.params, task, mesh, split="test")
        log.write(max(start, config.num_train_steps), {f"test_{k}": v for k, v in final.items()})
        summary = f"final test metrics: {_fmt(final)}"
    elif split in session.splits:  # no other test split: the last validation scores stand
        if last_validation is None:  # a finished run, started again: nothing was trained
            last_validation = evaluate(steps.eval, steps.decode, state.params, task, mesh, split)
        final = last_validation
        why = "evaluated periodically" if split == "test" else "no test split"
        summary = f"final {split} metrics ({why} in {config.data.dataset}): {_fmt(final)}"
    else:
        final = {}
        summary = f"no validation or test split in {config.data.dataset}: nothing evaluated"
    log.close()
    if jax.process_index() == 0:
        workdir = os.path.abspath(run.workdir)
        print(
            f"{summary}\ncheckpoints: {run.ckpt.directory}\n"
            f"metrics: {metrics_path(workdir)} "
            f"(tensorboard --logdir {workdir}{_tensorboard_hint()})"
            + (f"\nvocabulary: {vocab_path(workdir)}" if task.tokenizer else ""),
            flush=True,
        )
    return final


class NoIntactCheckpointError(RuntimeError):
    """Every checkpoint in the workdir is damaged (they were moved aside)."""


class NonFiniteError(FloatingPointError):
    """The loss or a gradient became NaN/Inf and ``config.nonfinite == 'stop'``."""


def _stop_if_nonfinite(metrics, ckpt, *, also_close=()):
    """Stops the run (after finishing earlier saves) if a step's loss or gradient was not
    finite. The train step withheld that update and every later one, and no checkpoint was
    saved after it, so the newest checkpoint is the last good state."""
    bad, first = jax.device_get((metrics["nonfinite_steps"], metrics["first_nonfinite_step"]))
    if not int(bad):
        return
    ckpt.wait()
    newest = ckpt.latest_step()
    for closable in also_close:
        closable.close()
    ckpt.close()
    raise NonFiniteError(
        f"step {int(first) + 1}: the loss or a gradient is NaN/Inf; training stopped "
        f"(config.nonfinite='stop'), the newest checkpoint is step {newest}, saved before "
        "it. Lower the learning rate, set config.clip_norm, or set config.nonfinite='skip' "
        "to skip such updates and count them"
    )


def _tensorboard_hint() -> str:
    """How to get the viewer, when it is not installed (runs write with tensorboardX)."""
    if importlib.util.find_spec("tensorboard") is not None:
        return ""
    return "; TensorBoard itself: pip install 'attention_jax[tensorboard]'"


def _fmt(scores: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in scores.items())


def task_iterator(task):
    """The data iterator whose state goes into checkpoints (None: batches are a function of
    the step)."""
    return task.iterator if task.has_state else None


def _train_lm_scores(metrics: dict, config: ml_collections.ConfigDict) -> dict:
    """A language model's training perplexity and bits per byte on the logged step's batch
    (only without label smoothing: then the training loss is the NLL)."""
    if "bytes" not in metrics or config.label_smoothing:
        return {}
    tokens = float(metrics["tokens"])
    scores = pipeline.language_model_scores(
        float(metrics["loss"]) * tokens, tokens, float(metrics["bytes"])
    )
    return {
        "train_perplexity": scores["perplexity"],
        "train_bits_per_byte": scores["bits_per_byte"],
    }


def _count(cfg: TransformerConfig, batch: dict) -> tuple[int, float]:
    """Target tokens and model FLOPs of a step on this process's `batch` (non-padding tokens;
    see flops.py). A batch without ``inputs`` is a language model's."""
    targets = batch["targets"]
    target_tokens = int(np.count_nonzero(targets != cfg.pad_id))
    if "inputs" not in batch:
        return target_tokens, flops.lm_train_flops(
            cfg, tokens=target_tokens, seq_len=targets.shape[1]
        )
    inputs = batch["inputs"]
    step_flops = flops.transformer_train_flops(
        cfg,
        source_tokens=int(np.count_nonzero(inputs != cfg.pad_id)),
        target_tokens=target_tokens,
        source_len=inputs.shape[1],
        target_len=targets.shape[1],
    )
    return target_tokens, step_flops
