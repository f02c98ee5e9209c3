"""Multi-head attention speed: attention_jax against jax.nn and flax, side by side, one process.

For each sequence length T, times forward and forward+backward (gradients of q, k, v) of

  ours      attention_jax.dot_product_attention (implementation=None: the device's default)
  ours_xla  attention_jax.dot_product_attention(implementation='xla') (plain vmapped path)
  jax_nn    jax.nn.dot_product_attention(implementation='xla')
  flax      flax.linen.dot_product_attention

each jitted, median of --repeats runs after two warm-up calls (timed round-robin), and
prints a Markdown table with the ratio ours / best of (jax_nn, flax). Below 1 means ours is faster.

  python benchmarks/attention.py                       # the issue's setting: f32, B=8 N=8 H=64
  python benchmarks/attention.py --lengths 128,512 --repeats 9
"""

from __future__ import annotations

import argparse
import os
import platform

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from timing import median_seconds

import attention_jax as aj

IMPLS = {
    "ours": lambda q, k, v: aj.dot_product_attention(q, k, v),
    "ours_xla": lambda q, k, v: aj.dot_product_attention(q, k, v, implementation="xla"),
    "jax_nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    "flax": lambda q, k, v: nn.dot_product_attention(q, k, v),
}
PEERS = ("jax_nn", "flax")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,512,1024,2048", help="comma-separated T")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    B, N, H = args.batch, args.heads, args.head_dim

    print(
        f"# attention: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}, flax {flax.__version__}; "
        f"{args.dtype}, B={B} N={N} H={H}, median of {args.repeats}"
    )
    print()
    header = ["T", "pass"] + [f"{n} ms" for n in IMPLS] + ["ours / best peer", "ours GFLOP/s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for T in [int(t) for t in args.lengths.split(",")]:
        keys = jax.random.split(jax.random.key(T), 4)
        q, k, v, cot = (jax.random.normal(kk, (B, T, N, H), dtype) for kk in keys)
        for pass_name in ("fwd", "fwd+bwd"):
            fns = {}
            for name, f in IMPLS.items():
                if pass_name == "fwd":
                    fns[name] = jax.jit(f)
                else:
                    loss = lambda q, k, v, f=f, c=cot: jnp.sum(f(q, k, v) * c)  # noqa: E731
                    fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            row = median_seconds(fns, (q, k, v), args.repeats)
            best = min(row[p] for p in PEERS)
            flops = 4 * B * N * T * T * H * (1.0 if pass_name == "fwd" else 3.5)
            cells = [str(T), pass_name] + [f"{row[n] * 1e3:.1f}" for n in IMPLS]
            cells += [f"**{row['ours'] / best:.2f}**", f"{flops / row['ours'] / 1e9:.0f}"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
