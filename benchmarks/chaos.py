"""Chaos test of training: SIGKILL a training run at random (seeded) moments, restart it
with the same workdir until it completes, and compare with a run that was never killed.

python benchmarks/chaos.py                    # the long mode: 12 kills (tests run 3)
python benchmarks/chaos.py --kills=30 --seed=1 --task=translation

Each launch is ``experiments/train.py`` on the reversal task (``--task=translation``: the
built-in translation corpus through grain, whose iterator state is checkpointed) with a
tiny model (D=32, dropout 0.1), a checkpoint every few steps (asynchronous, Orbax's
default) and a metrics row per step, on one CPU device, with JAX's persistent compilation
cache so that a restart costs seconds. Each launch is killed (SIGKILL) in one of three ways,
chosen by the seeded generator:

  startup  at a random moment 0.2-3 s after launch: imports, restoring, compiling
  step     right after a random training step (logged on stdout; up to 3 checkpoint
           intervals past the newest checkpoint), plus 0-30 ms
  save     as soon as the launch's 1st, 2nd or 3rd ``<step>.orbax-checkpoint-tmp``
           directory appears, plus 0-10 ms: while an asynchronous checkpoint is written

After the kills, a last launch runs to the end. Checked, and reported per kill:
  - the restart resumed from the newest *finished* checkpoint on disk at its launch (never a
    temporary one, never an older one), and no launch reported a damaged checkpoint;
  - steps lost: the last step the killed launch logged minus the step the restart resumed;
  - mid-write: whether the kill left an unfinished checkpoint directory (the save was cut);
and for the whole run: the final train state (params, Adam moments, step, RNG) equals the
uninterrupted run's bit for bit, metrics.jsonl equals it row for row (every field except the
wall-clock ones), and the workdir holds no temporary files or directories and the same
checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix for a checkpoint being written
TIME_KEYS = ("tokens_per_s", "mfu")
MODES = ("startup", "step", "save")  # metrics.jsonl fields that depend on the wall clock

# The tiny models the launches train, and their config files. "reversal" (the default; the
# tests use the same shapes, so the compilation cache serves them all): batches are a
# function of the step. "translation": the built-in corpus through the grain pipeline,
# whose iterator state is in every checkpoint.
_COMMON = (
    "--config.model.d_model=32",
    "--config.model.num_heads=4",
    "--config.model.d_ff=64",
    "--config.model.dropout_rate=0.1",  # exercises the RNG in the state
    "--config.log_every=1",
    "--config.eval_every=100000",  # validation only at the last step
    "--config.keep_checkpoints=3",
)
TASKS = {
    "reversal": ("reversal.py", (*_COMMON, "--config.batch_size=8", "--config.eval_batches=1")),
    "translation": (
        "default.py",
        (
            *_COMMON,
            "--config.model.vocab_size=300",
            "--config.data.corpus_sizes=(2000, 64, 64)",
            "--config.data.tokens_per_batch=640",
            "--config.data.eval_examples=32",
            "--config.data.eval_batch_size=16",
            "--config.beam_size=1",
        ),
    ),
}


def child_env(cache_dir: str | None = None) -> dict:
    """Environment for a training subprocess: one CPU device (the test process's fake
    devices removed), JAX's compilation cache in `cache_dir`."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def train_command(
    workdir: str, steps: int, checkpoint_every: int, *extra: str, task: str = "reversal"
) -> list[str]:
    config, overrides = TASKS[task]
    return [
        sys.executable,
        os.path.join(ROOT, "experiments", "train.py"),
        f"--config={os.path.join(ROOT, 'experiments', 'configs', config)}",
        f"--workdir={workdir}",
        f"--config.num_train_steps={steps}",
        f"--config.checkpoint_every={checkpoint_every}",
        *overrides,
        *extra,
    ]


def launch(command: list[str], env: dict, log_path: str) -> subprocess.Popen:
    """Starts a training run with stdout and stderr in `log_path`, in its own session, so
    that a Ctrl-C meant for the caller does not reach it. (No preexec_fn: forking a process
    whose JAX has started warns, and pytest makes warnings errors.)"""
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )


# Runs the command after it with Python's usual Ctrl-C handling: a process started in the
# background by a shell script inherits SIGINT ignored, and a training run respects that.
WITH_CTRL_C = [
    sys.executable,
    "-c",
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
]


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_to_completion(
    workdir: str, steps: int, every: int, env: dict, log_path: str, *extra, task="reversal"
):
    """One launch, waited for; returns ``(returncode, log text)``."""
    proc = launch(train_command(workdir, steps, every, *extra, task=task), env, log_path)
    code = finish(proc, timeout=900)
    with open(log_path) as f:
        return code, f.read()


def finished_steps(workdir: str) -> list[int]:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def unfinished(workdir: str) -> set[str]:
    """Names of the checkpoint directories being written (or left unfinished)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return set()
    return {n for n in os.listdir(directory) if TMP_MARK in n}


class NewSaves:
    """Unfinished checkpoint directories written by this launch. Orbax names one
    ``<step>.orbax-checkpoint-tmp`` whoever writes it, and a restart first removes those a
    killed run left: a leftover counts only once it has disappeared and come back."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.leftovers = unfinished(workdir)
        self.seen = set()  # every new one so far: one per save this launch started

    def __call__(self) -> set[str]:
        now = unfinished(self.workdir)
        self.leftovers &= now  # gone once: a later directory of that name is new
        self.seen |= now - self.leftovers
        return now - self.leftovers


def logged_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+)/\d+ ", text, flags=re.M)]


def resumed_step(text: str) -> int | None:
    match = re.search(r"^resumed from step (\d+) ", text, flags=re.M)
    return int(match.group(1)) if match else None


@dataclasses.dataclass
class Kill:
    mode: str  # startup | step | save
    seconds_after_launch: float
    last_logged: int  # the last step the killed launch logged (0: none)
    mid_write: bool  # an unfinished checkpoint directory was left behind
    newest_finished: int  # the newest finished checkpoint on disk after the kill (0: none)
    resumed: int | None = None  # the step the next launch resumed from (0: fresh start)
    survived: bool | None = None

    @property
    def lost(self) -> int | None:
        if self.resumed is None:
            return None
        return max(self.last_logged - self.resumed, 0)


def _wait_for(proc, condition, timeout: float, poll: float, observe=None) -> bool:
    """Polls `condition()` (and `observe()` first) until it holds (True) or the process
    ends / time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if observe is not None:
            observe()
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    return False


def chaos(
    workdir: str,
    *,
    kills: int,
    seed: int,
    steps: int,
    every: int,
    env: dict,
    logs: str,
    modes: tuple[str, ...] = (),
    task: str = "reversal",
    timeout: float = 600.0,
) -> dict:
    """Kills and restarts a run in `workdir` `kills` times, then lets it finish. Kill i is
    ``modes[i % len(modes)]``, or a seeded random choice without `modes`. Returns
    ``{"kills": [Kill, ...], "launches": n, "final_returncode": rc, "damage_reports": [...],
    "seconds": s}``."""
    rng = random.Random(seed)
    os.makedirs(logs, exist_ok=True)
    start_time = time.monotonic()
    record: list[Kill] = []
    damage = []
    launches = []  # (log path, newest finished checkpoint at launch)
    final_code = None
    while True:
        log_path = os.path.join(logs, f"launch_{len(launches) + 1:02d}.log")
        newest_before = (finished_steps(workdir) or [0])[-1]
        launches.append((log_path, newest_before))
        new_saves = NewSaves(workdir)
        proc = launch(train_command(workdir, steps, every, task=task), env, log_path)
        launched = time.monotonic()

        def text(path=log_path):
            with open(path) as f:
                return f.read()

        if len(record) < kills:
            mode = modes[len(record) % len(modes)] if modes else rng.choice(MODES)
            if mode == "startup":
                delay = rng.uniform(0.2, 3.0)
                fired = _wait_for(
                    proc,
                    lambda d=delay, t0=launched: time.monotonic() - t0 >= d,
                    timeout,
                    0.002,
                    observe=new_saves,
                )
            elif mode == "step":
                target = min(newest_before + rng.randint(1, 3 * every), steps - 1)
                fired = _wait_for(
                    proc,
                    lambda t=target: max(logged_steps(text()) or [0]) >= t,
                    timeout,
                    0.002,
                    observe=new_saves,
                )
                time.sleep(rng.uniform(0.0, 0.03))
            else:  # while the n-th save of this launch is being written
                n = rng.randint(1, 3)
                fired = _wait_for(
                    proc, lambda s=new_saves, n=n: s() and len(s.seen) >= n, timeout, 0.001
                )
                time.sleep(rng.uniform(0.0, 0.01))
            if fired and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                finish(proc, timeout=60)
                out = text()
                record.append(
                    Kill(
                        mode=mode,
                        seconds_after_launch=time.monotonic() - launched,
                        last_logged=max(logged_steps(out) or [0]),
                        mid_write=bool(new_saves()),
                        newest_finished=(finished_steps(workdir) or [0])[-1],
                    )
                )
                damage += [line for line in out.splitlines() if "is damaged" in line]
                continue
        final_code = finish(proc, timeout)  # no kill left, or the run ended first
        out = text()
        damage += [line for line in out.splitlines() if "is damaged" in line]
        break
    # Where each launch started: the step it resumed from, 0 for a fresh start, None when
    # it was killed before it said (then the next launch that did tells).
    started = []
    for i, (path, newest) in enumerate(launches):
        with open(path) as f:
            out = f.read()
        resumed = resumed_step(out)
        if resumed is None and (logged_steps(out) or i == len(launches) - 1):
            resumed = 0  # trained (or finished) without resuming: a fresh start
        started.append((resumed, newest))
    for i, kill in enumerate(record):  # kill i ended launch i; launch i + 1 restarted
        later = [(r, n) for r, n in started[i + 1 :] if r is not None]
        if later:
            kill.resumed, newest = later[0]
            kill.survived = kill.resumed == newest and not damage
        else:
            kill.survived = False
    return {
        "kills": record,
        "launches": len(launches),
        "final_returncode": final_code,
        "damage_reports": damage,
        "seconds": time.monotonic() - start_time,
    }


def metrics_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def compare(reference: str, workdir: str, step: int) -> dict:
    """Whether `workdir` ended as `reference` did: the train state at `step` bit for bit,
    metrics.jsonl row for row, the same checkpoints, no temporary files anywhere."""
    # Imported here: the harness itself only starts and kills training processes; JAX is
    # loaded (seconds) only when their results are compared.
    import jax
    import numpy as np

    from attention_jax.workdir.checkpoint import Checkpointer

    states = []
    for w in (reference, workdir):
        ckpt = Checkpointer(w)
        states.append(jax.tree.map(np.asarray, ckpt.restore_on_one_device(step)))
        ckpt.close()
    a, b = (jax.tree_util.tree_flatten_with_path(s)[0] for s in states)
    differing = [
        jax.tree_util.keystr(p)
        for (p, x), (_, y) in zip(a, b, strict=True)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes()
    ]
    debris = sorted(unfinished(workdir))
    for root, dirs, files in os.walk(workdir):
        debris += [os.path.join(root, n) for n in dirs + files if ".tmp" in n and TMP_MARK not in n]
    return {
        "identical_state": not differing and len(a) == len(b),
        "differing_arrays": differing,
        "identical_metrics": metrics_rows(reference) == metrics_rows(workdir),
        "same_checkpoints": finished_steps(reference) == finished_steps(workdir),
        "debris": debris,
    }


def report(result: dict, comparison: dict) -> str:
    kills = result["kills"]
    lines = [
        "| # | mode | killed after (s) | last step logged | mid-write | resumed from | "
        "steps lost | resumed from newest finished |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, k in enumerate(kills, 1):
        lines.append(
            f"| {i} | {k.mode} | {k.seconds_after_launch:.2f} | {k.last_logged} | "
            f"{'yes' if k.mid_write else 'no'} | {k.resumed} | {k.lost} | "
            f"{'yes' if k.survived else 'NO'} |"
        )
    lost = [k.lost for k in kills if k.lost is not None]
    survived = sum(bool(k.survived) for k in kills)
    lines += [
        "",
        f"kills survived / tried: {survived} / {len(kills)} "
        f"({sum(k.mid_write for k in kills)} while a checkpoint was being written)",
        f"steps lost per kill: mean {sum(lost) / max(len(lost), 1):.1f}, max {max(lost or [0])}",
        f"identical final state: {'yes' if comparison['identical_state'] else 'NO'}; "
        f"identical metrics.jsonl: {'yes' if comparison['identical_metrics'] else 'NO'}; "
        f"same checkpoints: {'yes' if comparison['same_checkpoints'] else 'NO'}; "
        f"debris: {comparison['debris'] or 'none'}",
        f"damaged-checkpoint reports: {len(result['damage_reports'])}; launches: "
        f"{result['launches']}; final exit code {result['final_returncode']}; "
        f"chaos run {result['seconds']:.0f} s",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint_every", type=int, default=4)
    parser.add_argument("--task", choices=sorted(TASKS), default="reversal")
    parser.add_argument("--dir", default="", help="where the workdirs go (default: a temp dir)")
    args = parser.parse_args(argv)
    base = args.dir or tempfile.mkdtemp(prefix="aj_chaos_")
    os.makedirs(base, exist_ok=True)
    env = child_env(os.path.join(base, "jax_cache"))
    reference, workdir = os.path.join(base, "reference"), os.path.join(base, "chaos")
    for w in (reference, workdir):
        shutil.rmtree(w, ignore_errors=True)
    t = time.monotonic()
    code, out = run_to_completion(
        reference,
        args.steps,
        args.checkpoint_every,
        env,
        os.path.join(base, "reference.log"),
        task=args.task,
    )
    if code != 0:
        print(out)
        return 1
    print(f"uninterrupted run: {time.monotonic() - t:.0f} s", flush=True)
    result = chaos(
        workdir,
        kills=args.kills,
        seed=args.seed,
        steps=args.steps,
        every=args.checkpoint_every,
        env=env,
        logs=os.path.join(base, "logs"),
        task=args.task,
    )
    comparison = compare(reference, workdir, args.steps)
    print(report(result, comparison))
    print(f"workdirs and logs: {base}")
    if len(result["kills"]) < args.kills:
        print(f"the run finished after {len(result['kills'])} kills: use more --steps")
    good = (
        len(result["kills"]) == args.kills
        and result["final_returncode"] == 0
        and all(k.survived for k in result["kills"])
        and comparison["identical_state"]
        and comparison["identical_metrics"]
        and comparison["same_checkpoints"]
        and not comparison["debris"]
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
