"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, which puts
this directory on ``sys.path``)."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fns, args, repeats, warmup=2):
    """Median wall time of each fn in `fns` (a dict) on `args`, timed round-robin: every
    repeat runs each competitor once in turn, so slow drifts of a shared machine's load hit
    all of them alike. `warmup` untimed rounds first (the first call of a jitted fn compiles).
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
