"""Long-context attention: time and peak memory for long sequences, every implementation that
can run, side by side.

Times ``attention_jax.dot_product_attention`` self-attention (q, k, v ``[B, T, N, H]``, S = T)
for each ``implementation=`` ('xla': dense, materialises the B·N·T·S scores; 'blockwise':
pure-JAX tiles with an online softmax; 'cudnn', 'pallas': fused kernels, GPU/TPU only;
'auto': the dispatcher's pick). ``fwd`` is the attention output; ``fwd+bwd`` the gradients
of q, k, v of ``sum(out * c)`` for a fixed random cotangent c. Every function is jitted and
compiled ahead (``.lower().compile()``), so compile time is never in a timed call. An
implementation that cannot run a call (an explicit 'cudnn'/'pallas' on CPU raises a
ValueError saying why) gets that reason as a footnote in its cell instead of a number.

Sections (``--section``; default: memory, short and causal on CPU, gpu on an accelerator):

  memory  f32, B=1 N=8 H=64, T in --lengths (to 100,000), 'xla' and 'blockwise', fwd and
          fwd+bwd (--causal adds causal rows). Each measurement runs in a fresh child
          process (this script with a hidden --_child flag; one JSON line back), so its
          peak resident memory is its own: VmHWM of /proc/self/status, reset (clear_refs)
          before compiling and before running, so "+ run" and "+ compile" are the most the
          child held in that phase over what it held with imports and inputs alone. (Not
          getrusage's ru_maxrss: a subprocess inherits its parent's peak there.) A baseline
          child that only imports and builds the inputs is shown per T. Dense 'xla' is not
          run where its estimated bytes (B·N·T·S·4 × 2 for fwd, × 4 for fwd+bwd) exceed
          --dense_limit_gb: its cell shows the estimate. A child killed (the OOM killer) or
          past --child_timeout_s is reported in its row. Median of --repeats runs (3) after
          a warm-up; one run and no warm-up above T = --long_threshold.
  short   f32, B=1 N=8 H=64, T in 512, 1024, 2048: blockwise / xla time, in process,
          timed round-robin (target for fwd+bwd: <= 1.5).
  causal  blockwise at T in 8192, 16384, fwd and fwd+bwd: causal / non-causal time, in
          process, round-robin (target <= 0.6: the tiles above the diagonal are skipped).
  gpu     bf16, B=4 N=16, H in 64, 128, T in 1024 ... 32768, causal and not, every
          implementation: ms and TFLOP/s (fwd FLOPs 4·B·T²·N·H, halved if causal; fwd+bwd
          3.5× that), what 'auto' resolved to, the best explicit one and auto's speed as a
          fraction of the best's (goal >= 0.95). 'xla' is skipped where B·N·T²·(2 + 4) bytes
          exceed 60% of the device's bytes_limit. First (so that the device's
          peak_bytes_in_use, which cannot be reset, is its own) a "fits in memory" row:
          blockwise fwd+bwd at T = 131072, B=1 N=16 H=128, bf16, causal.
  packed  f32, B=1 N=8 H=64, one packed row of T = --packed_length (4096) holding
          --packed_segments (8) examples of equal length, fwd+bwd, each in its own child as
          in memory: 'blockwise' given the segment ids, 'blockwise' given today's dense
          same-segment mask [B, 1, T, T] (built from the ids inside the jitted step, as the
          model built it), and 'xla' given the ids (its dense path forms the mask inside).
  all     memory, short, causal and packed, and gpu on an accelerator or with --quick.

--quick shrinks every section to tiny shapes (seconds on CPU), to test the code paths; on CPU
the gpu section then shows the cudnn/pallas refusals. --json_out PATH writes every row
(rewritten after each one, so a cut-off run keeps what it measured).

Commands (BUILD_NOTES.md):

  # 2-core CPU, 24 GB: ~45 min, ~70 with --causal; blockwise fwd+bwd at T = 100,000 alone
  # is ~20 min at ~55 GFLOP/s, so on a busy machine give its child more than 1800 s:
  python benchmarks/long_context.py --section memory --causal --child_timeout_s 3600
  # the BUILD_NOTES table (fwd to 100,000, fwd+bwd to 16,384; ~15 min):
  python benchmarks/long_context.py --section memory --bwd_max_length 16384
  python benchmarks/long_context.py --section short               # ~1 min
  python benchmarks/long_context.py --section causal              # ~6 min
  python benchmarks/long_context.py --section gpu --json_out gpu.json   # the H200
  python benchmarks/long_context.py --section packed              # ~1 min
  python benchmarks/long_context.py --quick --section all        # smoke test, ~1 min
  # a subset of the gpu table within one 10-minute command, e.g.:
  python benchmarks/long_context.py --section gpu --gpu_head_dims 128 --fits_length 0

RSS is host memory. On an accelerator the memory section's children also report the
device's peak_bytes_in_use in the JSON (they run with XLA_PYTHON_CLIENT_PREALLOCATE=false,
as the parent may hold the preallocated pool).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from process_memory import reset_rss_peak, rss_kib
from timing import median_seconds

import attention_jax as aj
from attention_jax.core import dispatch

PASSES = ("fwd", "fwd+bwd")
RESULT_MARKER = "@@long_context_result "

# Full-size and --quick defaults of the flags left unset (None).
DEFAULTS = {
    "lengths": ("1024,4096,16384,65536,100000", "256,1024"),
    "short_lengths": ("512,1024,2048", "256,512"),
    "causal_lengths": ("8192,16384", "1024,2048"),
    "gpu_lengths": ("1024,4096,8192,16384,32768", "256,512"),
    "gpu_head_dims": ("64,128", "64"),
    "gpu_batch": (4, 1),
    "gpu_heads": (16, 2),
    "fits_length": (131072, 2048),
    "packed_length": (4096, 512),
}
REPEATS = {  # section -> (full, --quick)
    "memory": (3, 1),
    "short": (7, 2),
    "causal": (3, 2),
    "gpu": (10, 2),
}


# --------------------------------------------------------------------------------------
# Measuring one function.
# --------------------------------------------------------------------------------------


def make_inputs(B, T, N, H, dtype, seed=0):
    """q, k, v [B, T, N, H] and the cotangent c [B, T, N, H] of the fwd+bwd loss."""
    keys = jax.random.split(jax.random.key(seed), 4)
    return tuple(jax.random.normal(kk, (B, T, N, H), dtype) for kk in keys)


def make_step(impl, causal, pass_name, packing=None):
    """jitted f(q, k, v, c[, ids]): the attention output (fwd) or the grads of q, k, v
    (fwd+bwd). ``packing`` 'ids' or 'mask': one more argument, the segment ids [B, T], given
    as such or as the dense same-segment mask [B, 1, T, T] built from them."""

    def attend(q, k, v, *ids):
        kw = {}
        if packing == "ids":
            kw = dict(query_segment_ids=ids[0])
        elif packing == "mask":
            kw = dict(mask=aj.segment_mask(ids[0]))  # [B, 1, T, T]
        return aj.dot_product_attention(q, k, v, implementation=impl, is_causal=causal, **kw)

    if pass_name == "fwd":
        return jax.jit(lambda q, k, v, c, *ids: attend(q, k, v, *ids))

    def loss(q, k, v, c, *ids):  # c is an argument, not a constant baked into the HLO
        return jnp.sum(attend(q, k, v, *ids).astype(jnp.float32) * c.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def packed_ids(B, T, segments):
    """int32 [B, T]: ``segments`` examples of T // segments tokens (ids 1, 2, ...), then
    padding (id 0) up to T."""
    per = T // segments
    row = jnp.repeat(jnp.arange(1, segments + 1, dtype=jnp.int32), per)
    row = jnp.pad(row, (0, T - row.shape[0]))
    return jnp.broadcast_to(row[None], (B, T))


def compile_step(impl, causal, pass_name, args, packing=None):
    """(compiled executable, compile seconds); raises what tracing or compiling raised."""
    start = time.perf_counter()
    compiled = make_step(impl, causal, pass_name, packing).lower(*args).compile()
    return compiled, time.perf_counter() - start


def classify(exc):
    """(status, note) of a failed cell: refused (the implementation cannot run here, or its
    module is missing), oom, or error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, ValueError) and "cannot run here" in text:
        return "refused", text.split("cannot run here:", 1)[-1].strip()
    if isinstance(exc, ImportError):
        return "refused", f"{type(exc).__name__}: {first}"
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom", f"{type(exc).__name__}: {first[:300]}"
    return "error", f"{type(exc).__name__}: {first[:300]}"


def device_memory_stats():
    try:
        return jax.devices()[0].memory_stats() or {}
    except Exception:  # not every backend has them
        return {}


def temp_bytes(compiled):
    """XLA's planned scratch memory of an executable (None where the backend does not say)."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes
    except Exception:
        return None


def attention_flops(B, T, S, N, H, causal, pass_name):
    fwd = 4 * B * T * S * N * H * (0.5 if causal else 1.0)
    return fwd * (3.5 if pass_name == "fwd+bwd" else 1.0)


def dense_estimate_bytes(B, N, T, S, pass_name):
    """Rough bytes of dense f32 attention: scores + weights, about twice that with the
    backward pass's saved weights and their gradients."""
    return B * N * T * S * 4 * (2 if pass_name == "fwd" else 4)


def resolve_auto(q, causal):
    """The implementation 'auto' picks for q = k = v ('?' with the reason if that fails)."""
    try:
        return dispatch.resolve_implementation(
            "dot_product_attention",
            "auto",
            q_shape=q.shape,
            k_shape=q.shape,
            v_shape=q.shape,
            dtype=q.dtype,
            has_mask=False,
            has_bias=False,
            is_causal=causal,
            has_lengths=False,
            dropout=0.0,
            want_weights=False,
        )
    except Exception as exc:
        return f"? ({classify(exc)[0]})"


# --------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------


class Table:
    """A Markdown table printed row by row (long runs show progress), fixed-width columns."""

    def __init__(self, columns):
        self.columns = [(name, max(len(name), width)) for name, width in columns]
        self.notes = []
        print("| " + " | ".join(name.ljust(w) for name, w in self.columns) + " |")
        print("|" + "|".join("-" * (w + 2) for _, w in self.columns) + "|", flush=True)

    def row(self, cells):
        cells = [str(c).ljust(w) for c, (_, w) in zip(cells, self.columns, strict=True)]
        print("| " + " | ".join(cells) + " |", flush=True)

    def note(self, text):
        """A footnote mark "[k]" for `text` (the same text gets the same k)."""
        if text not in self.notes:
            self.notes.append(text)
        return f"[{self.notes.index(text) + 1}]"

    def failed(self, status, note):
        """The cell of a measurement that did not run: its status and a footnote."""
        label = {"refused": "n/a", "oom": "OOM", "timeout": "timeout", "killed": "killed"}
        return f"{label.get(status, status)} {self.note(note)}"

    def close(self):
        for i, text in enumerate(self.notes, 1):
            print(f"  [{i}] {text}")
        print(flush=True)


class Recorder:
    """Every row, as JSON, rewritten to --json_out after each one."""

    def __init__(self, path, env, flags):
        self.path, self.data = path, {"env": env, "flags": flags, "rows": []}

    def add(self, section, **row):
        self.data["rows"].append({"section": section, **row})
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f, indent=1)


def environment():
    import jaxlib

    env = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    try:
        from jax.extend import backend

        env["platform_version"] = backend.get_backend().platform_version
    except Exception:
        pass
    return env


def ms(seconds):
    return f"{seconds * 1e3:.1f}"


def mib(kib):
    return f"{kib / 1024:,.0f}"


# --------------------------------------------------------------------------------------
# memory: one child process per measurement.
# --------------------------------------------------------------------------------------


def child_main(spec):
    """Runs one measurement and prints one JSON line (after RESULT_MARKER).

    Peaks are per phase (VmHWM reset before compiling and before running): rss_kib is what
    the process holds after imports and inputs; compile_peak_kib and run_peak_kib the most it
    held while compiling and while running (each including what it already held).
    """
    B, T, N, H = spec["B"], spec["T"], spec["N"], spec["H"]
    args = make_inputs(B, T, N, H, jnp.dtype(spec["dtype"]), seed=T)
    if spec.get("packing"):
        args = (*args, packed_ids(B, T, spec["segments"]))
    jax.block_until_ready(args)
    out = {}
    out["rss_kib"], out["import_peak_kib"] = rss_kib()
    out["peak_resets"] = reset_rss_peak()
    if spec["impl"] != "baseline":
        try:
            compiled, out["compile_s"] = compile_step(
                spec["impl"], spec["causal"], spec["pass"], args, spec.get("packing")
            )
            out["compile_peak_kib"] = rss_kib()[1]
            out["xla_temp_bytes"] = temp_bytes(compiled)
            reset_rss_peak()
            for _ in range(spec["warmup"]):
                jax.block_until_ready(compiled(*args))
            runs = []
            for _ in range(spec["repeats"]):
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                runs.append(time.perf_counter() - start)
            out["run_peak_kib"] = rss_kib()[1]
            out.update(status="ok", run_s=statistics.median(runs), runs_s=runs)
        except Exception as exc:  # a cell, not a crash
            out["status"], out["note"] = classify(exc)
    out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = device_memory_stats().get("peak_bytes_in_use")
    if peak is not None:
        out["device_peak_bytes"] = peak
    print(RESULT_MARKER + json.dumps(out), flush=True)


def run_child(spec, timeout_s):
    """The child's result dict; a timeout or a killed child is a status, not an exception."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"no result within --child_timeout_s={timeout_s}"}
    wall = time.perf_counter() - start
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return {"child_wall_s": wall, **json.loads(line[len(RESULT_MARKER) :])}
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        why = " (the OOM killer?)" if sig == "SIGKILL" else ""
        return {"status": "killed", "note": f"child killed by {sig}{why}"}
    tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:300]
    return {"status": "error", "note": f"child exit {proc.returncode}: {tail}"}


def section_memory(flags, rec):
    B, N, H, dtype = flags.batch, flags.heads, flags.head_dim, "float32"
    impls = flags.implementations.split(",") if flags.implementations else ["xla", "blockwise"]
    repeats = flags.repeats or REPEATS["memory"][flags.quick]
    print(
        f"## memory: {dtype}, B={B} N={N} H={H}, self-attention; one child process per row; "
        f"median of {repeats} runs after a warm-up (one run, no warm-up, above "
        f"T={flags.long_threshold}). RSS MiB: the peak "
        f"resident memory while running (baseline row: resident after imports + inputs); "
        f"+ run / + compile: the peak while running / compiling minus what the same child "
        f"held before compiling (imports + inputs, as the baseline row); "
        f"XLA temp: the executable's planned scratch; dense xla not run above "
        f"{flags.dense_limit_gb:g} GB est.\n"
    )
    table = Table(
        [
            ("T", 6),
            ("causal", 5),
            ("pass", 7),
            ("impl", 9),
            ("compile s", 0),
            ("run s", 8),
            ("RSS MiB", 11),
            ("+ run MiB", 0),
            ("+ compile MiB", 0),
            ("XLA temp MiB", 0),
            ("vs xla: time, + run", 0),
        ]
    )
    for T in [int(t) for t in flags.lengths.split(",")]:
        shape = dict(B=B, T=T, N=N, H=H, dtype=dtype)
        base = run_child({**shape, "impl": "baseline"}, flags.child_timeout_s)
        base_kib = base.get("rss_kib")
        rec.add("memory", T=T, impl="baseline", **base)
        cell = mib(base_kib) if base_kib else table.failed(base["status"], base["note"])
        table.row([T, "", "", "baseline", "", "", cell, "", "", "", ""])
        for causal in (False, True) if flags.causal else (False,):
            for pass_name in PASSES:
                if pass_name == "fwd+bwd" and T > flags.bwd_max_length:
                    continue
                xla = None
                for impl in impls:
                    est = dense_estimate_bytes(B, N, T, T, pass_name)
                    if impl == "xla" and est > flags.dense_limit_gb * 1e9:
                        res = {"status": "skipped", "note": f"~{est / 1e9:,.0f} GB est."}
                    else:
                        rep = repeats if T <= flags.long_threshold else 1
                        spec = {**shape, "impl": impl, "causal": causal, "pass": pass_name}
                        spec.update(repeats=rep, warmup=int(T <= flags.long_threshold))
                        res = run_child(spec, flags.child_timeout_s)
                    if res.get("status") == "ok":  # over the child's own baseline
                        res["over_run_kib"] = res["run_peak_kib"] - res["rss_kib"]
                        res["over_compile_kib"] = res["compile_peak_kib"] - res["rss_kib"]
                    cells = [T, causal, pass_name, impl, *memory_cells(res, xla, table)]
                    table.row(cells)
                    xla = res if impl == "xla" else xla
                    rec.add(
                        "memory",
                        T=T,
                        causal=causal,
                        impl=impl,
                        baseline_kib=base_kib,
                        dense_estimate_bytes=est,
                        **{"pass": pass_name},
                        **res,
                    )
    table.close()


def section_packed(flags, rec):
    B, N, H, T = flags.batch, flags.heads, flags.head_dim, flags.packed_length
    n = flags.packed_segments
    repeats = flags.repeats or REPEATS["memory"][flags.quick]
    print(
        f"## packed: float32, B={B} N={N} H={H}, T={T} holding {n} examples of {T // n} "
        f"tokens; fwd+bwd; one child process per row (as memory); median of {repeats} runs "
        "after a warm-up. ids: the segment ids in the call; mask: the dense same-segment "
        "mask [B, 1, T, T] built from them in the step (today's model).\n"
    )
    table = Table([("causal", 6), ("impl", 9), ("packing", 7), ("compile s", 0), ("run s", 8),
                   ("RSS MiB", 11), ("+ run MiB", 0), ("+ compile MiB", 0),
                   ("XLA temp MiB", 0), ("vs first: time, + run", 0)])  # fmt: skip
    shape = dict(B=B, T=T, N=N, H=H, dtype="float32", segments=n)
    for causal in (False, True) if flags.causal else (False,):
        first = None
        for impl, packing in (("blockwise", "ids"), ("blockwise", "mask"), ("xla", "ids")):
            spec = {**shape, "impl": impl, "causal": causal, "pass": "fwd+bwd",
                    "packing": packing, "repeats": repeats, "warmup": 1}  # fmt: skip
            res = run_child(spec, flags.child_timeout_s)
            if res.get("status") == "ok":
                res["over_run_kib"] = res["run_peak_kib"] - res["rss_kib"]
                res["over_compile_kib"] = res["compile_peak_kib"] - res["rss_kib"]
            table.row([causal, impl, packing, *memory_cells(res, first, table)])
            first = res if first is None else first
            rec.add("packed", causal=causal, impl=impl, packing=packing, **shape,
                    **{"pass": "fwd+bwd"}, **res)  # fmt: skip
    table.close()


def memory_cells(res, xla, table):
    """compile s, run s, RSS, + run, + compile, XLA temp, vs xla."""
    if res.get("status") == "skipped":
        return ["", "", res["note"], "", "", "", ""]
    if res.get("status") != "ok":
        return ["", "", table.failed(res["status"], res["note"]), "", "", "", ""]
    tmp, over = res.get("xla_temp_bytes"), res["over_run_kib"]
    vs = ""
    if xla is not None and xla is not res and xla.get("status") == "ok":
        vs = f"{res['run_s'] / xla['run_s']:.2f}x"
        if xla["over_run_kib"] > 0:
            vs += f", {over / xla['over_run_kib']:.3f}x"
    return [
        f"{res['compile_s']:.2f}",
        f"{res['run_s']:.3f}",
        mib(res["run_peak_kib"]),
        mib(over),
        mib(res["over_compile_kib"]),
        "?" if tmp is None else mib(tmp / 1024),
        vs,
    ]


# --------------------------------------------------------------------------------------
# short, causal: in process.
# --------------------------------------------------------------------------------------


def compile_all(variants, args, table):
    """{name: compiled} for the (impl, causal, pass) variants that compile; failures are
    returned as {name: cell text}."""
    compiled, failed = {}, {}
    for name, (impl, causal, pass_name) in variants.items():
        try:
            compiled[name] = compile_step(impl, causal, pass_name, args)[0]
        except Exception as exc:
            failed[name] = table.failed(*classify(exc))
    return compiled, failed


def section_short(flags, rec):
    B, N, H = flags.batch, flags.heads, flags.head_dim
    repeats = flags.repeats or REPEATS["short"][flags.quick]
    print(
        f"## short: blockwise vs dense xla, f32, B={B} N={N} H={H}, non-causal; in process, "
        f"round-robin, median of {repeats} (target for fwd+bwd: blockwise / xla <= 1.5)\n"
    )
    table = Table(
        [("T", 6), ("pass", 7), ("xla ms", 9), ("blockwise ms", 0), ("blockwise / xla", 0)]
    )
    for T in [int(t) for t in flags.short_lengths.split(",")]:
        args = make_inputs(B, T, N, H, jnp.float32, seed=T)
        for pass_name in PASSES:
            variants = {i: (i, False, pass_name) for i in ("xla", "blockwise")}
            compiled, failed = compile_all(variants, args, table)
            t = median_seconds(compiled, args, repeats, warmup=1)
            ratio = t["blockwise"] / t["xla"] if len(t) == 2 else None
            cells = [ms(t[i]) if i in t else failed[i] for i in variants]
            table.row([T, pass_name, *cells, "" if ratio is None else f"**{ratio:.2f}**"])
            rec.add("short", T=T, **{"pass": pass_name}, seconds=t, ratio=ratio, failed=failed)
        del args
        jax.clear_caches()
    table.close()


def section_causal(flags, rec):
    B, N, H = flags.batch, flags.heads, flags.head_dim
    repeats = flags.repeats or REPEATS["causal"][flags.quick]
    print(
        f"## causal: blockwise causal vs non-causal, f32, B={B} N={N} H={H}; in process, "
        f"round-robin, median of {repeats} (target: causal / non-causal <= 0.6)\n"
    )
    table = Table(
        [("T", 6), ("pass", 7), ("non-causal ms", 0), ("causal ms", 0), ("causal / non-causal", 0)]
    )
    for T in [int(t) for t in flags.causal_lengths.split(",")]:
        args = make_inputs(B, T, N, H, jnp.float32, seed=T)
        for pass_name in PASSES:
            variants = {c: ("blockwise", c == "causal", pass_name) for c in ("full", "causal")}
            compiled, failed = compile_all(variants, args, table)
            t = median_seconds(compiled, args, repeats, warmup=1)
            ratio = t["causal"] / t["full"] if len(t) == 2 else None
            cells = [ms(t[c]) if c in t else failed[c] for c in variants]
            table.row([T, pass_name, *cells, "" if ratio is None else f"**{ratio:.2f}**"])
            rec.add("causal", T=T, **{"pass": pass_name}, seconds=t, ratio=ratio, failed=failed)
        del args
        jax.clear_caches()
    table.close()


# --------------------------------------------------------------------------------------
# gpu: every implementation, bf16.
# --------------------------------------------------------------------------------------

GPU_IMPLS = ("xla", "blockwise", "cudnn", "pallas", "auto")


def fits_row(flags, rec):
    """Blockwise fwd+bwd at one very long causal sequence: time and the device's peak
    bytes. Runs before anything else on the device, as peak_bytes_in_use cannot be reset."""
    B, N, H, T = 1, 16, 128, flags.fits_length
    if flags.quick:
        N = 2
    print(f"## fits in memory: blockwise fwd+bwd, bf16, causal, B={B} N={N} H={H} T={T}\n")
    table = Table(
        [
            ("T", 7),
            ("compile s", 0),
            ("fwd+bwd ms", 0),
            ("TFLOP/s", 0),
            ("device peak GiB", 0),
            ("XLA temp GiB", 0),
            ("peak RSS MiB", 0),
        ]
    )
    peak_before = device_memory_stats().get("peak_bytes_in_use")
    res = {"T": T, "B": B, "N": N, "H": H}
    try:
        args = make_inputs(B, T, N, H, jnp.bfloat16, seed=T)
        compiled, res["compile_s"] = compile_step("blockwise", True, "fwd+bwd", args)
        res["seconds"] = median_seconds({"b": compiled}, args, 1, warmup=1)["b"]
        res["xla_temp_bytes"] = temp_bytes(compiled)
        res["device_peak_bytes"] = device_memory_stats().get("peak_bytes_in_use")
        res["status"] = "ok"
        del args, compiled
    except Exception as exc:
        res["status"], res["note"] = classify(exc)
    res["rss_peak_kib"] = rss_kib()[1]
    if res["status"] == "ok":
        tflops = attention_flops(B, T, T, N, H, True, "fwd+bwd") / res["seconds"] / 1e12
        peak, tmp = res["device_peak_bytes"], res["xla_temp_bytes"]
        peak_cell = "n/a (no memory_stats)" if peak is None else f"{peak / 2**30:.2f}"
        if peak is not None and peak_before:
            peak_cell += f" (was {peak_before / 2**30:.2f} before)"
        cells = [
            f"{res['compile_s']:.1f}",
            ms(res["seconds"]),
            f"{tflops:.3g}",
            peak_cell,
            "?" if tmp is None else f"{tmp / 2**30:.2f}",
        ]
    else:
        cells = [table.failed(res["status"], res["note"]), "", "", "", ""]
    table.row([T, *cells, mib(res["rss_peak_kib"])])
    rec.add("gpu_fits", **res)
    table.close()
    jax.clear_caches()


def section_gpu(flags, rec):
    print("## gpu\n")
    if jax.default_backend() == "cpu" and not flags.quick:
        print("(the gpu section at full size takes hours on a CPU: --quick tests its code)\n")
    print(jax.print_environment_info(return_string=True))
    stats = device_memory_stats()
    limit = stats.get("bytes_limit")
    if flags.fits_length:
        fits_row(flags, rec)
    B, N = flags.gpu_batch, flags.gpu_heads
    impls = flags.implementations.split(",") if flags.implementations else list(GPU_IMPLS)
    repeats = flags.repeats or REPEATS["gpu"][flags.quick]
    print(
        f"## gpu table: bf16, B={B} N={N}, self-attention; round-robin, median of {repeats}; "
        f"cells: ms (TFLOP/s); fwd FLOPs 4·B·T²·N·H (halved if causal), fwd+bwd 3.5×; "
        f"auto/best = best time / auto's time; xla skipped above 60% of bytes_limit "
        f"({'unknown' if limit is None else f'{limit / 2**30:.0f} GiB'})\n"
    )
    explicit = [i for i in impls if i != "auto"]
    table = Table(
        [("H", 3), ("causal", 5), ("T", 6), ("pass", 7)]
        + [(i, 13) for i in impls]
        + [("auto ->", 9), ("best", 9), ("auto/best", 0)]
    )
    for H in [int(h) for h in flags.gpu_head_dims.split(",")]:
        for causal in (False, True):
            for T in [int(t) for t in flags.gpu_lengths.split(",")]:
                args = make_inputs(B, T, N, H, jnp.bfloat16, seed=T)
                auto_is = resolve_auto(args[0], causal) if "auto" in impls else ""
                for pass_name in PASSES:
                    cells, compiled = {}, {}
                    dense = B * N * T * T * (2 + 4)
                    for impl in impls:
                        if impl == "xla" and limit and dense > 0.6 * limit:
                            cells[impl] = f"~{dense / 1e9:,.0f} GB est."
                            continue
                        try:
                            compiled[impl] = compile_step(impl, causal, pass_name, args)[0]
                        except Exception as exc:
                            cells[impl] = table.failed(*classify(exc))
                    try:
                        t = median_seconds(compiled, args, repeats, warmup=1)
                    except Exception:  # e.g. OOM at run time
                        t = {}
                        for impl in compiled:  # again one by one, to blame the right one
                            try:
                                t.update(
                                    median_seconds({impl: compiled[impl]}, args, repeats, warmup=1)
                                )
                            except Exception as exc:
                                cells[impl] = table.failed(*classify(exc))
                    flops = attention_flops(B, T, T, N, H, causal, pass_name)
                    for impl, s in t.items():
                        cells[impl] = f"{ms(s)} ({flops / s / 1e12:.3g})"
                    best = min((i for i in explicit if i in t), key=t.get, default=None)
                    ratio = t[best] / t["auto"] if best and "auto" in t else None
                    table.row(
                        [H, causal, T, pass_name]
                        + [cells[i] for i in impls]
                        + [auto_is, best or "", "" if ratio is None else f"{ratio:.2f}"]
                    )
                    rec.add(
                        "gpu",
                        B=B,
                        N=N,
                        H=H,
                        T=T,
                        causal=causal,
                        **{"pass": pass_name},
                        seconds=t,
                        cells=cells,
                        auto_resolved=auto_is,
                        best=best,
                        auto_over_best=ratio,
                        flops=flops,
                    )
                    del compiled
                del args
                jax.clear_caches()
    table.close()


# --------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------


def parse_flags(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--section",
        choices=("memory", "short", "causal", "gpu", "packed", "all"),
        help="default: memory, short and causal on CPU; gpu on an accelerator",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, to test the code paths")
    p.add_argument("--lengths", help=f"memory: T (default {DEFAULTS['lengths'][0]})")
    p.add_argument("--causal", action="store_true", help="memory: add causal rows")
    p.add_argument(
        "--implementations",
        help="memory: default xla,blockwise; gpu: default " + ",".join(GPU_IMPLS),
    )
    p.add_argument("--batch", type=int, default=1, help="memory, short, causal: B")
    p.add_argument("--heads", type=int, default=8, help="memory, short, causal: N")
    p.add_argument("--head_dim", type=int, default=64, help="memory, short, causal: H")
    p.add_argument(
        "--repeats",
        type=int,
        help="timed runs per cell, median (default: memory 3, short 7, causal 3, "
        "gpu 10; --quick 1-2)",
    )
    p.add_argument(
        "--bwd_max_length",
        type=int,
        default=1 << 62,
        help="memory: fwd+bwd rows only up to this T (the targets are fwd at 100,000 and "
        "fwd+bwd at 16,384; fwd+bwd at 100,000 takes ~20 min on 2 cores)",
    )
    p.add_argument(
        "--long_threshold", type=int, default=16384, help="memory: a single timed run above this T"
    )
    p.add_argument(
        "--dense_limit_gb",
        type=float,
        default=8.0,
        help="memory: do not run xla where its estimate exceeds this",
    )
    p.add_argument(
        "--child_timeout_s",
        type=float,
        default=1800.0,
        help="memory: seconds one child process may take",
    )
    p.add_argument("--short_lengths", help="short: T (default 512,1024,2048)")
    p.add_argument("--causal_lengths", help="causal: T (default 8192,16384)")
    p.add_argument("--gpu_lengths", help="gpu: T (default 1024,...,32768)")
    p.add_argument("--gpu_head_dims", help="gpu: H (default 64,128)")
    p.add_argument("--gpu_batch", type=int, help="gpu: B (default 4)")
    p.add_argument("--gpu_heads", type=int, help="gpu: N (default 16)")
    p.add_argument(
        "--fits_length",
        type=int,
        help="gpu: T of the fits-in-memory row (default 131072; 0: skip it)",
    )
    p.add_argument("--packed_length", type=int, help="packed: T (default 4096)")
    p.add_argument("--packed_segments", type=int, default=8, help="packed: examples per row")
    p.add_argument("--json_out", help="write every row as JSON to this path")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    flags = p.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(flags, name) is None:
            setattr(flags, name, quick if flags.quick else full)
    return flags


def main(argv=None):
    flags = parse_flags(argv)
    if flags._child:
        child_main(json.loads(flags._child))
        return
    env = environment()
    accelerator = env["backend"] != "cpu"
    if flags.section == "all":  # gpu first: its fits row wants a fresh device
        gpu = ["gpu"] if accelerator or flags.quick else []
        sections = [*gpu, "memory", "short", "causal", "packed"]
    elif flags.section is None:
        sections = ["gpu"] if accelerator else ["memory", "short", "causal"]
    else:
        sections = [flags.section]
    print(
        f"# long_context: {env['device_kind']} ({env['backend']}), {env['cpu_count']} CPUs, "
        f"{env['machine']}; jax {env['jax']}, jaxlib {env['jaxlib']}"
        f"{', ' + env['platform_version'] if accelerator else ''}; sections: "
        f"{', '.join(sections)}{' (--quick)' if flags.quick else ''}\n"
    )
    rec = Recorder(flags.json_out, env, {k: v for k, v in vars(flags).items() if k != "_child"})
    run = {
        "memory": section_memory,
        "short": section_short,
        "causal": section_causal,
        "gpu": section_gpu,
        "packed": section_packed,
    }
    for name in sections:
        run[name](flags, rec)


if __name__ == "__main__":
    main()
