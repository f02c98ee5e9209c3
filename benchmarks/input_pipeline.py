"""Input pipeline rate against the train step's consumption rate, measured in one run.

Feeds the built-in toy corpus (toy_translation's train split) through
attention_jax.data.pipeline.train_dataset with a SentencePiece BPE tokenizer trained here
(1,000 pieces, in memory), and times, in the same process:

  pipeline               packed batches pulled as fast as possible (examples/s, tokens/s)
  train step             the base preset's jitted, sharded train step on batches of the
                         pipeline's shape (inputs/targets only: no packing keys yet)
  train step + pipeline  the same step, each batch pulled from the pipeline first

Tokens are counted per side (target side; the source side has as many slots): "slots" are
all B × L positions, "real" the non-padding ones. The ratio pipeline ÷ train step should be
>> 1: the pipeline must not be what a step waits for. On a CPU it is; on an accelerator one
process is not enough (use --workers; see train_dataset's docstring).

  python benchmarks/input_pipeline.py                  # batch 8 × 64 tokens, base, CPU
  python benchmarks/input_pipeline.py --batch 96 --length 256 --batches 40 --workers 8
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time

import jax
import numpy as np
import sentencepiece

from attention_jax import Transformer, TransformerConfig
from attention_jax.data import pipeline, toy_translation
from attention_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from attention_jax.nn import sharding
from attention_jax.train import step as training

VOCAB = 1000


class SentencePieceTokenizer:
    """The one method the pipeline uses, on an in-memory SentencePiece model."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.processor.get_piece_size()

    def __reduce__(self):  # worker processes get a copy (--workers)
        return SentencePieceTokenizer, (self.model_proto,)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.encode(text), np.int32)


def train_tokenizer(sentences: list[str]) -> SentencePieceTokenizer:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=VOCAB,
        model_type="bpe", pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        character_coverage=1.0,
        minloglevel=2,
    )  # fmt: skip
    return SentencePieceTokenizer(model.getvalue())


def time_pipeline(source, tokenizer, args) -> dict:
    """Batches/s, examples/s and tokens/s of a fresh pipeline, after `warmup` batches."""
    ds = pipeline.train_dataset(
        source, tokenizer, seed=0, batch_size=args.batch, max_length=args.length,
        num_threads=args.threads, prefetch=args.prefetch, worker_count=args.workers,
    )  # fmt: skip
    it = iter(ds)
    for _ in range(args.warmup_batches):
        next(it)
    start_counts = pipeline.example_counts(it.get_state())
    real, padding = 0, []
    start = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
        real += int((batch["targets_segmentation"] > 0).sum())
        padding.append(pipeline.padding_fraction(batch))
    seconds = time.perf_counter() - start
    counts = pipeline.example_counts(it.get_state())
    it.close()  # stops its threads
    kept = (counts["read"] - counts["dropped"]) - (start_counts["read"] - start_counts["dropped"])
    return {
        "seconds": seconds,
        "examples": kept,
        "dropped": counts["dropped"],
        "slots": args.batches * args.batch * args.length,
        "real": real,
        "padding": {s: float(np.mean([p[s] for p in padding])) for s in pipeline.SIDES},
    }


def time_train_step(batches, next_batch, args) -> tuple[list[float], list[float]]:
    """Seconds per step of the base train step: on fixed batches, then pulling each batch
    from `next_batch()` (both after 2 compile/warm-up steps)."""
    cfg = TransformerConfig.base(vocab_size=VOCAB)
    model = Transformer(cfg)
    optimizer = training.make_optimizer(cfg.d_model)
    mesh = sharding.make_mesh(data=-1)
    placed = [sharding.shard_batch(b, mesh) for b in batches]
    state, shardings = training.create_train_state(
        model, optimizer, placed[0], jax.random.key(0), mesh
    )
    step = training.jit_train_step(model, optimizer, shardings, mesh)

    def run(get_batch, n):
        times = []
        nonlocal state
        for i in range(n + 2):
            start = time.perf_counter()
            state, metrics = step(state, sharding.shard_batch(get_batch(i), mesh))
            jax.block_until_ready(metrics)
            if i >= 2:
                times.append(time.perf_counter() - start)
        return times

    fixed = run(lambda i: batches[i % len(batches)], args.steps)
    fed = run(lambda i: next_batch(), args.steps)
    return fixed, fed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--length", type=int, default=64, help="max_length, tokens per side")
    parser.add_argument("--batches", type=int, default=400, help="timed pipeline batches")
    parser.add_argument("--warmup_batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="tokenizer threads")
    parser.add_argument("--workers", type=int, default=0, help="worker processes")
    parser.add_argument("--prefetch", type=int, default=2, help="batches packed ahead")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps")
    args = parser.parse_args()

    start = time.perf_counter()
    pairs = toy_translation.load_split("train")
    source = [{"source": s, "target": t} for s, t in pairs]
    tokenizer = train_tokenizer([s for pair in pairs for s in pair])
    setup = time.perf_counter() - start

    p = time_pipeline(source, tokenizer, args)
    # The train step sees pipeline batches; inputs/targets only (the model takes no packing
    # keys yet; the cost of a step does not depend on the token values).
    ds = pipeline.train_dataset(
        source, tokenizer, seed=1, batch_size=args.batch, max_length=args.length,
        num_threads=args.threads, prefetch=args.prefetch, worker_count=args.workers,
    )  # fmt: skip
    it = iter(ds)

    def next_batch():
        batch = next(it)
        return {"inputs": batch["inputs"], "targets": batch["targets"]}

    batches = [next_batch() for _ in range(4)]
    fixed, fed = time_train_step(batches, next_batch, args)
    it.close()

    slots_per_step = args.batch * args.length
    pipe_slots = p["slots"] / p["seconds"]
    pipe_real = p["real"] / p["seconds"]
    step_s, fed_s = statistics.median(fixed), statistics.median(fed)
    device = jax.devices()[0]
    print(
        f"toy_translation train ({len(source):,} pairs), SentencePiece BPE {VOCAB} "
        f"(set-up {setup:.1f} s); batch {args.batch} × {args.length} tokens per side, "
        f"{args.threads} tokenizer threads, {args.workers} workers, prefetch "
        f"{args.prefetch}; base preset "
        f"(V={VOCAB}, float32); {len(jax.devices())} × {device.device_kind} "
        f"({platform.machine()}, {os.cpu_count()} CPUs); jax {jax.__version__}\n"
    )
    print(
        f"pipeline: {args.batches} batches in {p['seconds']:.2f} s; "
        f"{p['examples'] / p['seconds']:,.0f} examples/s; padding inputs "
        f"{p['padding']['inputs']:.1%}, targets {p['padding']['targets']:.1%}; "
        f"dropped (> {args.length} tokens) {p['dropped']}\n"
    )
    rows = [
        ("pipeline", p["seconds"] / args.batches, pipe_slots, pipe_real),
        ("train step (fixed batches)", step_s, slots_per_step / step_s, None),
        ("train step fed by the pipeline", fed_s, slots_per_step / fed_s, None),
    ]
    print("| what | per batch | target slots/s | real target tokens/s | pipeline ÷ this |")
    print("|---|---|---|---|---|")
    for name, seconds, slots, real in rows:
        real_text = "" if real is None else f"{real:,.0f}"
        print(
            f"| {name} | {seconds * 1e3:.1f} ms | {slots:,.0f} | {real_text} | "
            f"{pipe_slots / slots:.3g}× |"
        )


if __name__ == "__main__":
    main()
