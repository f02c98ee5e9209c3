"""Train-step throughput and MFU against the matmul peak measured in the same process.

Times attention_jax's jitted, sharded train step (Adam, label smoothing, the paper's
schedule) for a preset on random tokens, and measures the device's practical matmul peak
(best of an n×n @ n×n matmul) in the same run, so MFU is against what this machine can do:

  model FLOPs per step   attention_jax.train.flops.transformer_train_flops (PaLM appendix B)
  MFU                    model FLOPs per second / (devices × peak)

The peak is the measured matmul rate unless the device is in attention_jax.train.flops.PEAK_FLOPS
(TPUs, NVIDIA GPUs), in which case both are printed and MFU uses the spec sheet's.

  python benchmarks/train_step.py                      # the issue's setting: base, 32k vocab,
                                                       # batch 8 × 64 tokens, f32, CPU
  python benchmarks/train_step.py --preset big --dtype bfloat16 --batch 64 --length 256
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import Transformer, TransformerConfig
from attention_jax.data.tokenizer import EOS_ID, PAD_ID
from attention_jax.nn import sharding
from attention_jax.train import flops
from attention_jax.train import step as training

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def random_batch(rng, batch: int, length: int, vocab: int) -> dict:
    """Full-length random sentences (no padding, no EOS inside), targets ending in EOS."""
    first = max(PAD_ID, EOS_ID) + 1  # ordinary pieces only
    inputs = rng.integers(first, vocab, size=(batch, length), dtype=np.int32)
    targets = rng.integers(first, vocab, size=(batch, length), dtype=np.int32)
    targets[:, -1] = EOS_ID
    return {"inputs": inputs, "targets": targets}


def time_steps(step_fn, state, batches, warmup: int):
    """Per-step seconds after `warmup` steps (the first compiles)."""
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, float(metrics["loss"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=("tiny", "base", "big"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8, help="sentences per step (global)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sentence (S = T)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--dropout", type=float, default=None, help="override P_drop")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak_n", type=int, default=2048, help="matmul size for the peak")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    overrides = {} if args.dropout is None else {"dropout_rate": args.dropout}
    cfg = getattr(TransformerConfig, args.preset)(
        vocab_size=args.vocab, dtype=dtype, max_len=max(args.length, 64), **overrides
    )
    model = Transformer(cfg)
    optimizer = training.make_optimizer(cfg.d_model, warmup_steps=4000)
    mesh = sharding.make_mesh(data=-1)
    rng = np.random.default_rng(0)
    batches = [
        sharding.shard_batch(random_batch(rng, args.batch, args.length, args.vocab), mesh)
        for _ in range(args.warmup + args.steps)
    ]
    state, shardings = training.create_train_state(
        model, optimizer, batches[0], jax.random.key(0), mesh
    )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    step_fn = training.jit_train_step(model, optimizer, shardings, mesh, label_smoothing=0.1)

    measured = flops.measure_matmul_peak(args.peak_n, dtype)  # before and after the steps,
    times, loss = time_steps(step_fn, state, batches, args.warmup)
    measured = max(measured, flops.measure_matmul_peak(args.peak_n, dtype))  # best of both
    table = flops.peak_flops_per_device()
    peak = table or measured

    seconds = statistics.median(times)
    tokens = args.batch * args.length  # target tokens per step (source tokens as many)
    step_flops = flops.transformer_train_flops(
        cfg, source_tokens=tokens, target_tokens=tokens,
        source_len=args.length, target_len=args.length,
    )  # fmt: skip
    device = jax.devices()[0]
    print(
        f"{args.preset} ({n_params / 1e6:.1f}M params, V={args.vocab}), batch {args.batch} × "
        f"{args.length} tokens, {args.dtype}; {len(jax.devices())} × {device.device_kind} "
        f"({platform.machine()}, {os.cpu_count()} CPUs); jax {jax.__version__}; "
        f"P_drop {cfg.dropout_rate}, PRNG {jax.config.jax_default_prng_impl}; "
        f"median of {len(times)} steps, final loss {loss:.3f}\n"
    )
    rows = [
        ("step time", f"{seconds * 1e3:.0f} ms (min {min(times) * 1e3:.0f}, "
                      f"max {max(times) * 1e3:.0f})"),
        ("target tokens/s", f"{tokens / seconds:,.0f}"),
        ("source+target tokens/s", f"{2 * tokens / seconds:,.0f}"),
        ("model FLOPs per step", f"{step_flops / 1e9:.1f} GFLOP"),
        ("achieved", f"{step_flops / seconds / 1e9:.1f} GFLOP/s"),
        (f"matmul peak ({args.peak_n}³, measured)", f"{measured / 1e9:.1f} GFLOP/s per device"),
    ]  # fmt: skip
    if table:
        rows.append(("spec-sheet peak", f"{table / 1e12:.0f} TFLOP/s per device"))
    rows.append(("MFU", f"{100 * step_flops / seconds / (peak * len(jax.devices())):.1f}%"))
    print("| quantity | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
