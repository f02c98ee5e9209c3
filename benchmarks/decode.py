"""Decoding speed: greedy with the KV cache against greedy that recomputes the decoder over
the whole prefix at every step, and beam search (beam 4) with the cache; one process.

  no_cache  each step runs the decoder on all `length` positions (causal mask) and reads
            position t: O(length) work per token
  greedy    attention_jax.decode.decoding.translate(beam_size=1): one position per step, the
            self-attention keys/values cached, the encoder's projected once
  beam4     the beam search of attention_jax.decode.decoding.translate (beam 4, alpha 0.6), with
            EOS masked so that random weights decode the full length

Random weights (the base config by default), random sources; with 32k candidates the
argmax is practically never EOS, so rows decode the full length (the script counts the
tokens before any EOS and says if a run stopped early). Prints output tokens/s and ratios.

  python benchmarks/decode.py                         # base, V=32000, batch 8, 128 tokens
  python benchmarks/decode.py --preset tiny --lengths 32,128,256
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import Transformer, TransformerConfig
from attention_jax.data.tokenizer import EOS_ID
from attention_jax.decode import decoding, search
from attention_jax.nn.model import shift_right


@functools.partial(jax.jit, static_argnames=("model", "length"))
def greedy_no_cache(model, params, inputs, *, length):
    """Greedy decoding by full recomputation: the decoder over [B, length] at every step."""
    variables = {"params": params}
    encoded = model.apply(variables, inputs, method="encode")  # [B, S, D]

    def step(t, out):
        logits = model.apply(variables, encoded, inputs, shift_right(out), method="decode")
        token = jnp.argmax(logits[:, t], axis=-1).astype(out.dtype)  # [B]
        return out.at[:, t].set(token)

    start = jnp.zeros((inputs.shape[0], length), jnp.int32)
    return jax.lax.fori_loop(0, length, step, start)


@functools.partial(jax.jit, static_argnames=("model", "length", "beam_size"))
def beam_without_eos(model, params, inputs, *, length, beam_size=4):
    """decoding.translate's beam search with EOS made impossible: with random weights a
    one-token [EOS] would otherwise beat every longer hypothesis at once."""
    cache = decoding.init_cache(model, params, inputs, length)
    step = decoding.step_fn(model, params)

    def no_eos(tokens, cache, t):
        logits, cache = step(tokens, cache, t)
        return logits.at[:, EOS_ID].set(-jnp.inf), cache

    seqs, _ = search.beam_search(
        no_eos, cache, batch_size=inputs.shape[0], beam_size=beam_size, max_length=length
    )
    return seqs[:, 0]


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=("tiny", "base", "big"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source_length", type=int, default=32)
    parser.add_argument("--lengths", default="128", help="comma-separated output lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default="no_cache,greedy,beam4", help="which to time")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    cfg = getattr(TransformerConfig, args.preset)(
        vocab_size=args.vocab, max_len=max(lengths) + args.source_length, dropout_rate=0.0
    )
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(2, args.vocab, (args.batch, args.source_length)), jnp.int32)
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
    print(
        f"{args.preset} (V={args.vocab}), batch {args.batch}, source {args.source_length} "
        f"tokens, f32; {jax.devices()[0].device_kind} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs); jax {jax.__version__}; median of {args.repeats}\n"
    )
    print("| output length | no_cache tok/s | greedy (cache) tok/s | beam4 tok/s | "
          "greedy / no_cache |")  # fmt: skip
    print("|---|---|---|---|---|")
    for length in lengths:
        runs = {
            "no_cache": lambda length=length: greedy_no_cache(model, params, inputs, length=length),
            "greedy": lambda length=length: decoding.translate(
                model, params, inputs, max_length=length, beam_size=1, extra_length=length
            ),
            "beam4": lambda length=length: beam_without_eos(model, params, inputs, length=length),
        }
        rate = dict.fromkeys(runs, float("nan"))
        for name, fn in runs.items():
            if name not in args.runs.split(","):
                continue
            out = np.asarray(fn())
            produced = int(np.sum(np.cumsum(out == EOS_ID, axis=1) == 0))  # before any EOS
            seconds = median_seconds(fn, args.repeats)
            rate[name] = produced / seconds
            if produced < out.size * 0.9:
                print(f"  note: {name} stopped early ({produced} of {out.size} tokens)")
        print(
            f"| {length} | {rate['no_cache']:,.0f} | {rate['greedy']:,.0f} | "
            f"{rate['beam4']:,.0f} | {rate['greedy'] / rate['no_cache']:.1f}x |"
        )


if __name__ == "__main__":
    main()
