"""Train-step memory, step time and compile time of the big model with the scale options
(issue 17): the chunked loss, rematerialisation and layers under ``nn.scan``.

Every row runs in a fresh child process (this script with a hidden --_child flag, one JSON
line back), so its memory is its own: VmHWM of /proc/self/status, reset (clear_refs) before
compiling and again before the first step, as in benchmarks/long_context.py.

Step rows (one train step of `TransformerConfig.big`, V = --vocab (32,000), f32, batch
--batch x --length tokens per side (4 x 512), Adam with the paper's schedule, label smoothing
0.1, dropout 0.3 as in the paper, random full-length sentences; the real `create_train_state`
and `jit_train_step`, state donated):

  plain        loss over the whole [B, T, V] logits, every activation kept
  chunk        config.loss_chunk = --loss_chunk (512 tokens per chunk)
  chunk+full   and config.model.remat = 'full' (each layer keeps only its input)
  chunk+dots   and remat = 'dots' (keeps the weight matmuls' outputs)
  chunk+full+scan, chunk+dots+scan   the same with config.model.scan_layers (n/a where the
               config has no such field). On XLA's CPU backend the remat of unscanned layers
               is undone by the compiler (the lowered HLO's optimization barriers are gone
               from the compiled one and the temp bytes do not move); inside the scanned
               layer loop it holds.

  state MiB      bytes of the train state's arrays (params + Adam moments; the JSON's
                 state_kib is the RSS it added, with the initialiser's temporaries)
  + step MiB     the peak RSS during the steps over the RSS just before the first one
                 (state, batch and the compiled executable already resident): the memory
                 the step itself takes (activations, gradients, the loss). The goal's
                 ratio is of this column.
  XLA temp MiB   the compiled step's memory_analysis().temp_size_in_bytes (XLA's plan, not
                 a measurement; independent of the machine's load)
  peak RSS MiB   the process's peak during the steps (imports, state and all)
  step s         median of --steps steps after one warm-up step (the first run of the
                 ahead-of-time compiled executable); the only column the load changes
  compile s      lower + compile of the train step

Compile rows: lower + compile of the plain train step of the big config with L encoder and
L decoder layers, L in --layers (6, 12), with and without config.model.scan_layers, traced on
abstract shapes (no state is allocated). Where `TransformerConfig` has no `scan_layers`
field yet, the scan rows read "n/a (scan_layers not available)" (not a failure).

Goals (printed under the tables): chunk+full "+ step" <= 0.5x plain; chunk+dots step time
<= 1.15x plain (each also for the +scan rows); scan compile time flat in L (L=12 / L=6 <=
--flat_ratio, 1.25).

A row whose child fails (an exception, killed, past --child_timeout_s) is shown as such and
the script exits 1 after the tables. --json_out PATH writes every row (rewritten after each).
--smoke: the tiny config (V=64, D=32, L=1 and 2, batch 2 x 16, chunk 8, one step), seconds
per row. --in_process runs the rows in this process (no fresh RSS; for tests).

  # 2-core CPU, ~10 GB free: the BUILD_NOTES table (~1 h; one big step is 60-110 s there,
  # a row 4-7 min with --steps 2; the compile rows ~1-2 min each)
  python benchmarks/train_memory.py --steps 2 --json_out train_memory.json
  python benchmarks/train_memory.py --rows plain,chunk+dots --steps 2
  python benchmarks/train_memory.py --rows compile
  python benchmarks/train_memory.py --smoke        # 5-40 s per row (imports + tiny compiles)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # when imported by a test

from process_memory import reset_rss_peak, rss_kib

RESULT_MARKER = "@@train_memory_result "
STEP_ROWS = {  # name -> (chunked loss?, remat policy, scan_layers?)
    "plain": (False, "none", False),
    "chunk": (True, "none", False),
    "chunk+full": (True, "full", False),
    "chunk+dots": (True, "dots", False),
    "chunk+full+scan": (True, "full", True),
    "chunk+dots+scan": (True, "dots", True),
}
FAILED = ("error", "oom", "killed", "timeout")  # statuses that make the script exit 1
GOAL_PEAK, GOAL_TIME = 0.5, 1.15


# --------------------------------------------------------------------------------------
# Memory of this process.
# --------------------------------------------------------------------------------------


def available_mib():
    """MemAvailable of /proc/meminfo in MiB (None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["MemAvailable"].split()[0]) // 1024
    except (OSError, KeyError, ValueError):
        return None


def load():
    try:
        return os.getloadavg()
    except OSError:
        return None


# --------------------------------------------------------------------------------------
# One row (in the child).
# --------------------------------------------------------------------------------------


def model_config(spec):
    """The TransformerConfig of a row spec; raises LookupError where the spec asks for
    scan_layers and the config has no such field."""
    import dataclasses

    from attention_jax import TransformerConfig

    options = dict(vocab_size=spec["vocab"], max_len=max(spec["length"], 64))
    options["remat"] = spec.get("remat", "none")
    if spec.get("layers"):
        options["num_layers"] = spec["layers"]
    if spec.get("scan"):
        if "scan_layers" not in {f.name for f in dataclasses.fields(TransformerConfig)}:
            raise LookupError("scan_layers not available")
        options["scan_layers"] = True
    if spec["smoke"]:
        return TransformerConfig.tiny(**options)
    return TransformerConfig.big(**options)


def random_batch(batch, length, vocab, seed=0):
    """Full-length random sentences (no padding), targets ending in EOS (numpy int32)."""
    import numpy as np

    from attention_jax.data.tokenizer import EOS_ID, PAD_ID

    rng = np.random.default_rng(seed)
    first = max(PAD_ID, EOS_ID) + 1  # ordinary pieces only
    inputs = rng.integers(first, vocab, size=(batch, length), dtype=np.int32)
    targets = rng.integers(first, vocab, size=(batch, length), dtype=np.int32)
    targets[:, -1] = EOS_ID
    return {"inputs": inputs, "targets": targets}


def temp_bytes(compiled):
    try:
        return compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not every backend says
        return None


def measure_step(spec):
    """A step row: state, compile, one warm-up step and spec['steps'] timed ones."""
    import jax

    from attention_jax import Transformer
    from attention_jax.nn import sharding
    from attention_jax.train import step as training

    cfg = model_config(spec)
    model = Transformer(cfg)
    optimizer = training.make_optimizer(cfg.d_model, warmup_steps=4000)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])  # one device, as on a CPU
    batch = random_batch(spec["batch"], spec["length"], spec["vocab"])
    batch = sharding.shard_batch(batch, mesh)
    jax.block_until_ready(batch)
    before_state = rss_kib()[0]
    state, shardings = training.create_train_state(model, optimizer, batch, jax.random.key(0), mesh)
    jax.block_until_ready(state)
    after_state = rss_kib()[0]
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    step_fn = training.jit_train_step(
        model, optimizer, shardings, mesh, label_smoothing=0.1, loss_chunk=spec["loss_chunk"]
    )
    reset_rss_peak()
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    compile_peak = rss_kib()[1]
    before_step = rss_kib()[0]
    reset_rss_peak()
    times = []
    for _ in range(1 + spec["steps"]):  # the first: warm-up
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_peak = rss_kib()[1]
    return {
        "params": n_params,
        "state_bytes": state_bytes,
        "state_kib": after_state - before_state,
        "before_step_kib": before_step,
        "step_peak_kib": step_peak,
        "over_step_kib": step_peak - before_step,
        "compile_peak_kib": compile_peak,
        "xla_temp_bytes": temp_bytes(compiled),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "warmup_s": times[0],
        "step_times_s": times[1:],
        "step_s": statistics.median(times[1:]),
        "loss": float(metrics["loss"]),
    }


def measure_compile(spec):
    """A compile row: lower + compile of the plain train step on abstract shapes."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from attention_jax import Transformer
    from attention_jax.nn import sharding
    from attention_jax.train import step as training

    cfg = model_config(spec)
    model = Transformer(cfg)
    optimizer = training.make_optimizer(cfg.d_model, warmup_steps=4000)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])  # one device, as on a CPU
    tokens = jax.ShapeDtypeStruct((spec["batch"], spec["length"]), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens}

    def init(batch, key):  # as train.step's state, never allocated
        params = nn.unbox(model.init(key, batch["inputs"], batch["targets"])["params"])
        return training.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(key),
        )

    state = jax.eval_shape(init, batch, jax.random.key(0))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, state)  # one device: all replicated
    step_fn = training.jit_train_step(model, optimizer, shardings, mesh, label_smoothing=0.1)
    start = time.perf_counter()
    lowered = step_fn.lower(state, batch)
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return {
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "xla_temp_bytes": temp_bytes(compiled),
    }


def measure(spec):
    """One row's result dict, with a status: ok, n/a (the option does not exist yet) or
    error (the exception's first line)."""
    load_before = load()
    try:
        res = measure_step(spec) if spec["kind"] == "step" else measure_compile(spec)
        res["status"] = "ok"
    except LookupError as exc:
        res = {"status": "n/a", "note": str(exc)}
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        status = "oom" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text else "error"
        res = {"status": status, "note": f"{type(exc).__name__}: {first[:300]}"}
    res["load_before"], res["load_after"] = load_before, load()
    return res


def child_main(spec):
    import jax

    # Compile time is measured: never load the executable from a persistent cache that the
    # environment (JAX_COMPILATION_CACHE_DIR) may name, except under --smoke (the tests'
    # shared cache then makes the tiny rows quick).
    if not spec["smoke"]:
        jax.config.update("jax_enable_compilation_cache", False)
    res = measure(spec)
    res["device_kind"] = jax.devices()[0].device_kind
    res["backend"] = jax.default_backend()
    res["jax"] = jax.__version__
    print(RESULT_MARKER + json.dumps(res), flush=True)


# --------------------------------------------------------------------------------------
# Rows (in the parent).
# --------------------------------------------------------------------------------------


def run_child(spec, timeout_s):
    """The row's result from a fresh process; killed, timed-out and crashed children get
    that status and the tail of their stderr as the note."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "timeout", "note": f"past --child_timeout_s={timeout_s:g}"}
    for line in out.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = " | ".join(err.strip().splitlines()[-3:])[-400:]
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return {"status": "killed", "note": f"{name} (the OOM killer?) {tail}".strip()}
    return {"status": "error", "note": f"exit {proc.returncode}: {tail}"}


def row_specs(flags):
    """[(name, spec)] of the rows asked for, in table order."""
    shape = dict(vocab=flags.vocab, batch=flags.batch, length=flags.length, smoke=flags.smoke)
    specs = []
    for name, (chunked, remat, scan) in STEP_ROWS.items():
        chunk = flags.loss_chunk if chunked else 0
        specs.append((name, dict(shape, kind="step", loss_chunk=chunk, remat=remat, scan=scan,
                                 steps=flags.steps)))  # fmt: skip
    for layers in flags.layers:
        for scan in (False, True):
            name = f"compile_L{layers}" + ("_scan" if scan else "")
            specs.append((name, dict(shape, kind="compile", layers=layers, scan=scan)))
    wanted = flags.rows.split(",") if flags.rows else None
    if wanted is None:
        return specs
    known = {name for name, _ in specs}
    groups = {"step": [n for n in known if n in STEP_ROWS],
              "compile": [n for n in known if n.startswith("compile_")]}  # fmt: skip
    chosen = set()
    for w in wanted:
        if w not in known and w not in groups:
            raise SystemExit(
                f"--rows: unknown row {w!r}; expected some of {sorted(known)} or step, compile"
            )
        chosen.update(groups.get(w, [w]))
    return [(name, spec) for name, spec in specs if name in chosen]


class Table:
    """A Markdown table printed row by row, fixed-width columns."""

    def __init__(self, columns):
        self.widths = [max(len(c), w) for c, w in columns]
        print(
            "| "
            + " | ".join(c.ljust(w) for (c, _), w in zip(columns, self.widths, strict=True))
            + " |"
        )
        print("|" + "|".join("-" * (w + 2) for w in self.widths) + "|", flush=True)

    def row(self, cells):
        cells = [str(c).ljust(w) for c, w in zip(cells, self.widths, strict=True)]
        print("| " + " | ".join(cells) + " |", flush=True)


def mib(kib):
    return f"{kib / 1024:,.0f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def fx(r, bold=False):
    if r is None:
        return ""
    return f"**{r:.2f}x**" if bold else f"{r:.2f}x"


def ok(res):
    return res is not None and res.get("status") == "ok"


def failed_cell(res):
    text = res.get("note", "")
    return f"{res['status']} ({text})" if res["status"] == "n/a" else f"{res['status']}: {text}"


def step_table(rows, flags):
    print(
        f"## one train step: {'tiny (--smoke)' if flags.smoke else 'big'}, V={flags.vocab}, "
        f"f32, batch {flags.batch} x {flags.length} tokens per side, Adam, one child process "
        f"per row; step s: median of {flags.steps} after a warm-up step; ratios to plain\n"
    )
    table = Table([("row", 15), ("loss_chunk", 0), ("remat", 0), ("scan", 5), ("params M", 0),
                   ("state MiB", 0), ("+ step MiB", 10), ("+ step x plain", 0),
                   ("XLA temp MiB", 0), ("temp x plain", 0), ("peak RSS MiB", 0),
                   ("step s", 7), ("time x plain", 0), ("compile s", 0),
                   ("load 1m", 0)])  # fmt: skip
    plain = rows.get("plain", (None, None))[1]
    for name, (spec, res) in rows.items():
        if spec["kind"] != "step":
            continue
        head = [name, spec["loss_chunk"], spec["remat"], spec.get("scan", False)]
        if not ok(res):
            table.row([*head, failed_cell(res)] + [""] * 10)
            continue
        base = plain if ok(plain) else {}
        tmp = res["xla_temp_bytes"]
        table.row([*head,
            f"{res['params'] / 1e6:.4g}",
            mib(res["state_bytes"] / 1024) if "state_bytes" in res else "?",
            mib(res["over_step_kib"]),
            fx(ratio(res["over_step_kib"], base.get("over_step_kib")), bold=True),
            "?" if tmp is None else mib(tmp / 1024),
            fx(ratio(tmp, base.get("xla_temp_bytes"))),
            mib(res["step_peak_kib"]),
            f"{res['step_s']:.2f}",
            fx(ratio(res["step_s"], base.get("step_s")), bold=True),
            f"{res['compile_s']:.1f}",
            f"{res['load_after'][0]:.2f}" if res.get("load_after") else "?",
        ])  # fmt: skip
    print()


def compile_table(rows, flags):
    print(
        f"## compile time of the plain train step (lower + compile, abstract shapes): "
        f"{'tiny' if flags.smoke else 'big'}, V={flags.vocab}, batch {flags.batch} x "
        f"{flags.length}; L encoder + L decoder layers; with and without scan_layers\n"
    )
    table = Table([("row", 16), ("L", 3), ("scan", 5), ("params M", 0), ("lower s", 0),
                   ("lower+compile s", 0), ("x first L", 0), ("XLA temp MiB", 0),
                   ("load 1m", 0)])  # fmt: skip
    first = {}
    for name, (spec, res) in rows.items():
        if spec["kind"] != "compile":
            continue
        head = [name, spec["layers"], spec["scan"]]
        if not ok(res):
            table.row([*head, failed_cell(res)] + [""] * 5)
            continue
        base = first.setdefault(spec["scan"], res)
        tmp = res["xla_temp_bytes"]
        table.row([*head,
            f"{res['params'] / 1e6:.4g}",
            f"{res['lower_s']:.1f}",
            f"{res['compile_s']:.1f}",
            fx(ratio(res["compile_s"], base["compile_s"]), bold=True),
            "?" if tmp is None else mib(tmp / 1024),
            f"{res['load_after'][0]:.2f}" if res.get("load_after") else "?",
        ])  # fmt: skip
    print()


def goals(rows, flags):
    """Lines comparing the measured ratios with the issue's goals; {goal: met?}."""
    get = lambda name: rows.get(name, (None, None))[1]  # noqa: E731
    plain = get("plain")
    lines, met = [], {}
    for suffix in ("", "+scan"):
        full, dots = get("chunk+full" + suffix), get("chunk+dots" + suffix)
        if ok(plain) and ok(full):
            r = full["over_step_kib"] / plain["over_step_kib"]
            t = ratio(full["xla_temp_bytes"], plain["xla_temp_bytes"])
            met["peak" + suffix] = r <= GOAL_PEAK
            lines.append(
                f"chunk+full{suffix} '+ step' / plain = {r:.2f}x (goal <= {GOAL_PEAK}x: "
                f"{'met' if r <= GOAL_PEAK else 'NOT met'}); XLA temp {fx(t)}"
            )
        elif full is not None or not suffix:
            lines.append(f"chunk+full{suffix} peak vs plain: not measured")
        if ok(plain) and ok(dots):
            r = dots["step_s"] / plain["step_s"]
            met["time" + suffix] = r <= GOAL_TIME
            lines.append(
                f"chunk+dots{suffix} step time / plain = {r:.2f}x (goal <= {GOAL_TIME}x: "
                f"{'met' if r <= GOAL_TIME else 'NOT met'}; times depend on the load)"
            )
        elif dots is not None or not suffix:
            lines.append(f"chunk+dots{suffix} step time vs plain: not measured")
    if len(flags.layers) >= 2:
        lo, hi = flags.layers[0], flags.layers[-1]
        parts = []
        for scan, name in ((True, "scan"), (False, "unscanned")):
            suffix = "_scan" if scan else ""
            a, b = get(f"compile_L{lo}{suffix}"), get(f"compile_L{hi}{suffix}")
            if ok(a) and ok(b):
                r = b["compile_s"] / a["compile_s"]
                parts.append(f"{name} L={hi} / L={lo} = {r:.2f}x")
                if scan:
                    met["flat"] = r <= flags.flat_ratio
            elif scan and b is not None and b.get("status") == "n/a":
                parts.append(f"scan: n/a ({b.get('note')})")
        verdict = "" if "flat" not in met else ": met" if met["flat"] else ": NOT met"
        lines.append(
            f"scan compile time flat in L (goal L={hi} / L={lo} <= {flags.flat_ratio}x"
            f"{verdict}): " + ("; ".join(parts) or "not measured")
        )
    print("Goals:")
    for line in lines:
        print(f"- {line}")
    return met


# --------------------------------------------------------------------------------------
# Entry point.
# --------------------------------------------------------------------------------------


def parse_flags(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rows",
        help="comma-separated: plain, chunk, chunk+full, chunk+dots, chunk+full+scan, "
        "chunk+dots+scan, compile_L<L>[_scan], or the groups step, compile (default: all)",
    )
    p.add_argument("--steps", type=int, help="timed steps per step row (default 3; --smoke 1)")
    p.add_argument("--loss_chunk", type=int, help="tokens per chunk (default 512; --smoke 8)")
    p.add_argument("--layers", help="L of the compile rows (default 6,12; --smoke 1,2)")
    p.add_argument("--vocab", type=int, help="V (default 32000; --smoke 64)")
    p.add_argument("--batch", type=int, help="sentences per step (default 4; --smoke 2)")
    p.add_argument("--length", type=int, help="tokens per sentence (default 512; --smoke 16)")
    p.add_argument("--flat_ratio", type=float, default=1.25, help="goal for scan L_hi / L_lo")
    p.add_argument("--child_timeout_s", type=float, default=3600.0)
    p.add_argument("--smoke", action="store_true", help="the tiny config: seconds per row")
    p.add_argument("--in_process", action="store_true", help="rows in this process (no fresh RSS)")
    p.add_argument("--json_out", help="write every row as JSON to this path")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    flags = p.parse_args(argv)
    defaults = dict(steps=(3, 1), loss_chunk=(512, 8), layers=("6,12", "1,2"),
                    vocab=(32000, 64), batch=(4, 2), length=(512, 16))  # fmt: skip
    for name, (full, smoke) in defaults.items():
        if getattr(flags, name) is None:
            setattr(flags, name, smoke if flags.smoke else full)
    flags.layers = [int(x) for x in str(flags.layers).split(",")]
    for name in ("steps", "loss_chunk", "vocab", "batch", "length"):
        if getattr(flags, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(flags, name)}")
    if any(x < 1 for x in flags.layers):
        p.error(f"--layers must be positive ints, got {flags.layers}")
    return flags


def main(argv=None):
    """Runs the rows; returns the exit status (1 if a row failed)."""
    flags = parse_flags(argv)
    if flags._child:
        child_main(json.loads(flags._child))
        return 0
    specs = row_specs(flags)

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    start_load, free = load(), available_mib()
    print(
        f"# train_memory: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{free if free is not None else '?'} MiB available; jax {version('jax')}, "
        f"jaxlib {version('jaxlib')}; load average {fmt_load(start_load)}; "
        f"rows: {', '.join(n for n, _ in specs)}{' (--smoke)' if flags.smoke else ''}"
        f"{' (--in_process)' if flags.in_process else ''}\n",
        flush=True,
    )
    record = {"flags": {k: v for k, v in vars(flags).items() if k != "_child"}, "rows": [],
              "load_start": start_load, "available_mib": free}  # fmt: skip
    rows = {}
    for name, spec in specs:
        print(f"  running {name} ... (load {fmt_load(load())}, {available_mib()} MiB free)",
              flush=True)  # fmt: skip
        started = time.perf_counter()
        res = measure(spec) if flags.in_process else run_child(spec, flags.child_timeout_s)
        res["wall_s"] = time.perf_counter() - started
        print(f"  ... {name}: {res['status']} in {res['wall_s']:.0f} s", flush=True)
        rows[name] = (spec, res)
        record["rows"].append({"row": name, "spec": spec, **res})
        if flags.json_out:
            with open(flags.json_out, "w") as f:
                json.dump(record, f, indent=1)
    print()
    if any(spec["kind"] == "step" for spec, _ in rows.values()):
        step_table(rows, flags)
    if any(spec["kind"] == "compile" for spec, _ in rows.values()):
        compile_table(rows, flags)
    met = goals(rows, flags)
    end_load = load()
    device = next((r["device_kind"] for _, r in rows.values() if "device_kind" in r), None)
    print(
        f"\nload average at the start {fmt_load(start_load)}, at the end {fmt_load(end_load)}"
        f"{f'; device {device}' if device else ''}"
    )
    record.update(load_end=end_load, goals_met=met)
    if flags.json_out:
        with open(flags.json_out, "w") as f:
            json.dump(record, f, indent=1)
    bad = [name for name, (_, res) in rows.items() if res["status"] in FAILED]
    if bad:
        print(f"FAILED rows: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def fmt_load(avg):
    return "?" if avg is None else " ".join(f"{x:.2f}" for x in avg)


if __name__ == "__main__":
    sys.exit(main())
