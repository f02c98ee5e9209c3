"""`train_and_evaluate(config, workdir)`: the whole training run behind experiments/train.py.

Restarting with the same workdir resumes from the latest complete checkpoint. The built-in
task's batches are a pure function of the step, so the resumed run sees exactly the data an
uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from attention_jax import decoding, flops, metrics, sharding, training
from attention_jax.checkpoint import Checkpointer
from attention_jax.config import TransformerConfig
from attention_jax.data import tasks
from attention_jax.inference import save_config
from attention_jax.model import Transformer
from attention_jax.reporting import MetricsWriter, Progress

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    """TransformerConfig from ``config.model`` (dtype names as strings)."""
    fields = dict(config.model)
    for name in ("dtype", "param_dtype"):
        if name in fields:
            if fields[name] not in _DTYPES:
                raise ValueError(
                    f"config.model.{name} must be one of {tuple(_DTYPES)}, got {fields[name]!r}"
                )
            fields[name] = _DTYPES[fields[name]]
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model has unknown fields {unknown}; known: {sorted(known)}")
    return TransformerConfig(**fields)


def _model_signature(cfg: TransformerConfig) -> dict:
    """What must match between a checkpoint and the model restoring it."""
    keys = (
        "vocab_size", "target_vocab_size", "share_embeddings", "d_model", "num_heads",
        "num_layers", "num_decoder_layers", "d_ff", "max_len", "positional", "pre_ln",
    )  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def _check_workdir(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")  # one per process
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OSError(f"workdir {workdir!r} is not writable: {e}") from e


def _local_rows(batch: dict) -> dict:
    """This process's rows of a global batch (each process feeds its share to shard_batch)."""
    i, n = jax.process_index(), jax.process_count()
    return {k: v[i * len(v) // n : (i + 1) * len(v) // n] for k, v in batch.items()}


def evaluate(eval_fn, decode_fn, params, task, mesh, split: str = "validation") -> dict:
    """Teacher-forced loss / accuracy / exact match over the split's evaluation batches and,
    for tasks with text, sacreBLEU and chrF of greedy translations."""
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` in `workdir` (resuming if it holds checkpoints); returns the final
    held-out metrics."""
    _check_workdir(workdir)
    cfg = model_config(config)
    model = Transformer(cfg)
    optimizer = training.make_optimizer(
        cfg.d_model,
        warmup_steps=config.warmup_steps,
        lr_factor=config.lr_factor,
        clip_norm=config.clip_norm or None,
    )
    mesh = sharding.make_mesh(**config.mesh)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    with_data_state = config.data.dataset != "reversal"
    ckpt = Checkpointer(
        workdir, keep=config.keep_checkpoints, every=config.checkpoint_every,
        data_state=with_data_state,
    )  # fmt: skip
    start = ckpt.latest_step() or 0
    saved = ckpt.read_meta(start) if start else {}
    if saved.get("vocab_fingerprint") and not os.path.exists(
        os.path.join(workdir, tasks.VOCAB_FILE)
    ):
        raise FileNotFoundError(
            f"workdir {workdir!r} holds checkpoints trained with the vocabulary "
            f"{saved['vocab_fingerprint']}, but its {tasks.VOCAB_FILE} is missing; put it "
            "back or use a new --workdir"
        )
    task = tasks.make_task(config, workdir, data_parallel=mesh.shape["data"] * mesh.shape["fsdp"])
    state, shardings = training.create_train_state(
        model, optimizer, task.example_batch(), jax.random.key(config.seed), mesh, rules
    )
    meta = {"model": _model_signature(cfg), **task.meta()}
    if start:
        if saved.get("model") != json.loads(json.dumps(meta["model"])):
            raise ValueError(
                f"workdir {workdir!r} holds a checkpoint of a different model:\n"
                f"  checkpoint: {saved.get('model')}\n  config:     {meta['model']}\n"
                "use a new --workdir, or the config that wrote it"
            )
        if saved.get("vocab_fingerprint") != meta.get("vocab_fingerprint"):
            raise ValueError(
                f"workdir {workdir!r}: the checkpoint was trained with vocabulary "
                f"{saved.get('vocab_fingerprint')} but {tasks.VOCAB_FILE} there is "
                f"{meta.get('vocab_fingerprint')}; use the vocabulary it was trained with"
            )
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )
        state, _ = ckpt.restore(start, abstract, data_iterator=task_iterator(task))
        if jax.process_index() == 0:
            print(f"resumed from step {start} ({ckpt.directory})", flush=True)
    if jax.process_index() == 0:  # for translate.py / evaluate.py; the checks above passed
        save_config(config, workdir)
    log = MetricsWriter(workdir, start)
    progress = Progress(config.num_train_steps, start)
    step_fn = training.jit_train_step(
        model, optimizer, shardings, mesh,
        label_smoothing=config.label_smoothing, accum_steps=config.accum_steps,
    )  # fmt: skip
    eval_fn = training.jit_eval_step(model, shardings.params, mesh)
    # Periodic validation decodes greedily (fast); the final test report uses beam search
    # (config.beam_size, config.alpha; the paper: 4 and 0.6), as translate.py does.
    max_decode = min(config.data.get("max_length", 0) + 50, cfg.max_len)
    decode_fn = functools.partial(decoding.translate, model, max_length=max_decode, beam_size=1)
    final_decode_fn = functools.partial(
        decoding.translate, model, max_length=max_decode,
        beam_size=config.get("beam_size", 4), alpha=config.get("alpha", 0.6),
    )  # fmt: skip
    peak = (config.peak_flops_per_device or flops.peak_flops_per_device()) or None
    total = config.num_train_steps
    # Throughput over each logging interval (the first one includes compilation); the host
    # reads metrics only at these steps.
    mark_step, mark_time, step = start, time.perf_counter(), start
    interval_tokens = interval_flops = interval_slots = 0.0  # counted on the host
    for step in range(start, total):
        batch = task.next_batch(step)
        state, metrics = step_fn(state, sharding.shard_batch(batch, mesh))
        tokens, step_flops = _count(cfg, batch)
        interval_tokens += tokens * jax.process_count()
        interval_flops += step_flops * jax.process_count()
        interval_slots += batch["targets"].size * jax.process_count()
        done = step + 1
        last = done == total
        if done % config.log_every == 0 or last:
            m = jax.device_get(metrics)
            seconds = max(time.perf_counter() - mark_time, 1e-9)
            steps_per_s = (done - mark_step) / seconds
            record = {
                "train_loss": float(m["loss"]),
                "train_accuracy": float(m["accuracy"]),
                "tokens_per_s": interval_tokens / seconds,  # target tokens
                # target slots holding no token (padding, or the end of packed rows)
                "target_padding": 1.0 - interval_tokens / max(interval_slots, 1.0),
            }
            if peak:
                record["mfu"] = interval_flops / seconds / (peak * mesh.size)
            log.write(done, record)
            progress.update(done, record, eta_s=(total - done) / steps_per_s)
            mark_step, mark_time = done, time.perf_counter()
            interval_tokens = interval_flops = interval_slots = 0.0
        if done % config.eval_every == 0 or last:
            eval_start = time.perf_counter()
            ev = evaluate(eval_fn, decode_fn, state.params, task, mesh)
            log.write(done, {f"eval_{k}": v for k, v in ev.items()})
            progress.print(f"step {done}: validation {_fmt(ev)}")
            mark_time += time.perf_counter() - eval_start  # evaluation is not training time
        ckpt.save(done, state, meta, force=last, data_iterator=task_iterator(task))
    progress.close()
    ckpt.close()
    final = evaluate(eval_fn, final_decode_fn, state.params, task, mesh, split="test")
    log.write(max(start, total), {f"test_{k}": v for k, v in final.items()})
    log.close()
    if jax.process_index() == 0:
        workdir = os.path.abspath(workdir)
        print(
            f"final test metrics: {_fmt(final)}\ncheckpoints: {ckpt.directory}\n"
            f"metrics: {os.path.join(workdir, 'metrics.jsonl')} "
            f"(tensorboard --logdir {workdir})"
            + (
                f"\nvocabulary: {os.path.join(workdir, tasks.VOCAB_FILE)}" if task.tokenizer else ""
            ),
            flush=True,
        )
    return final


def _fmt(scores: dict) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in scores.items())


def task_iterator(task):
    """The data iterator whose state goes into checkpoints (None: batches are a function of
    the step)."""
    return task.iterator if task.has_state else None


def _count(cfg: TransformerConfig, batch: dict) -> tuple[int, float]:
    """Target tokens and model FLOPs of a step on this process's `batch` (non-padding tokens;
    see flops.py)."""
    inputs, targets = batch["inputs"], batch["targets"]
    target_tokens = int(np.count_nonzero(targets != cfg.pad_id))
    step_flops = flops.transformer_train_flops(
        cfg,
        source_tokens=int(np.count_nonzero(inputs != cfg.pad_id)),
        target_tokens=target_tokens,
        source_len=inputs.shape[1],
        target_len=targets.shape[1],
    )
    return target_tokens, step_flops
