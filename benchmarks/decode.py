"""Decoding speed: greedy with the KV cache against greedy that recomputes the decoder over
the whole prefix at every step, and beam search (beam 4) with the cache; and the
decoder-only LM's prefill against feeding the prompt one token a step; one process.

  no_cache  each step runs the decoder on all `length` positions (causal mask) and reads
            position t: O(length) work per token
  greedy    attention_jax.decode.decoding.translate(beam_size=1): one position per step, the
            self-attention keys/values cached, the encoder's projected once
  beam4     the beam search of attention_jax.decode.decoding.translate (beam 4, alpha 0.6), with
            EOS masked so that random weights decode the full length

LM (a TransformerLM of the same preset and vocabulary; prompts of --lm_prompt random
tokens, each of --lengths new tokens, greedy; decoding.generate with the cache sized for the
whole generation):

  ttft      time to the first new token: generate(..., max_new_tokens=1), which stops
            there. prefill: one forward pass over the prompt (logits at its last position
            only); one-a-step: the prompt fed to the cache one token per step
  tok/s     new tokens/s after the first: (new tokens before any EOS - B) / (time of the
            whole generation with prefill - its ttft)

Random weights (the base config by default), random sources; with 32k candidates the
argmax is practically never EOS, so rows decode the full length (the script counts the
tokens before any EOS and says if a run stopped early). Prints output tokens/s and ratios;
the timed calls of one table row alternate, so load from other processes falls on each.

  python benchmarks/decode.py                         # base, V=32000, batch 8, 128 tokens
  python benchmarks/decode.py --preset tiny --lengths 32,128,256
  python benchmarks/decode.py --runs lm --vocab 8000  # the LM table alone
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

from attention_jax import Transformer, TransformerConfig, TransformerLM
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
    return interleaved_medians({"fn": fn}, repeats)["fn"]


def interleaved_medians(fns, repeats):
    """{name: fn} -> {name: median seconds of one call}, compiled first; the calls take
    turns, so a burst of load from other processes falls on all of them."""
    for fn in fns.values():
        jax.block_until_ready(fn())  # compile
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def lm_table(args, cfg, lengths):
    """The LM rows: time to the first new token with and without prefill, and new tokens/s
    after it (see the module docstring)."""
    model = TransformerLM(cfg)
    rng = np.random.default_rng(1)
    P = args.lm_prompt
    prompt = jnp.asarray(rng.integers(2, args.vocab, (args.batch, P)), jnp.int32)  # no pad/EOS
    params = jax.jit(model.init)(jax.random.key(1), prompt)["params"]
    key = jax.random.key(0)
    print(f"\nLM (TransformerLM, {args.preset}, V={args.vocab}), batch {args.batch}, prompt "
          f"{P} tokens, greedy\n")  # fmt: skip
    print("| new tokens | ttft prefill ms | ttft one-a-step ms | one-a-step / prefill | "
          "tok/s after the first |")  # fmt: skip
    print("|---|---|---|---|---|")
    for length in lengths:
        T = P + length

        def run(new, prefill, T=T):
            return decoding.generate(
                model, params, prompt, key, max_length=T, max_new_tokens=new, temperature=0.0,
                prefill=prefill,
            )  # fmt: skip

        out = np.asarray(run(length, True))[:, P:]
        produced = int(np.sum(np.cumsum(out == EOS_ID, axis=1) == 0))  # before any EOS
        if produced < out.size * 0.9:
            print(f"  note: the LM stopped early ({produced} of {out.size} tokens)")
        s = interleaved_medians(
            {
                "prefill": lambda: run(1, True),
                "steps": lambda: run(1, False),
                "whole": lambda length=length: run(length, True),
            },
            args.repeats,
        )
        after = s["whole"] - s["prefill"]  # the tokens after each row's first
        rate = f"{(produced - args.batch) / after:,.0f}" if length > 1 and after > 0 else "-"
        print(
            f"| {length} | {s['prefill'] * 1e3:,.0f} | {s['steps'] * 1e3:,.0f} | "
            f"{s['steps'] / s['prefill']:.1f}x | {rate} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="base", choices=("tiny", "base", "big"))
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source_length", type=int, default=32)
    parser.add_argument("--lengths", default="128", help="comma-separated output lengths")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lm_prompt", type=int, default=128, help="LM prompt length")
    parser.add_argument("--runs", default="no_cache,greedy,beam4,lm", help="which to time")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    wanted = args.runs.split(",")

    longest = max(lengths) + max(args.source_length, args.lm_prompt if "lm" in wanted else 0)
    cfg = getattr(TransformerConfig, args.preset)(
        vocab_size=args.vocab, max_len=longest, dropout_rate=0.0
    )
    print(
        f"{args.preset} (V={args.vocab}), batch {args.batch}, source {args.source_length} "
        f"tokens, f32; {jax.devices()[0].device_kind} ({platform.machine()}, "
        f"{os.cpu_count()} CPUs); jax {jax.__version__}; median of {args.repeats}\n"
    )
    if {"no_cache", "greedy", "beam4"} & set(wanted):
        translation_table(args, cfg, lengths, wanted)
    if "lm" in wanted:
        lm_table(args, cfg, lengths)


def translation_table(args, cfg, lengths, wanted):
    """The encoder-decoder rows: greedy without and with the cache, beam 4."""
    model = Transformer(cfg)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(2, args.vocab, (args.batch, args.source_length)), jnp.int32)
    params = model.init(jax.random.key(0), inputs, inputs)["params"]
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
            if name not in wanted:
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
