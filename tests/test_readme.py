"""README.md is executable: every fenced block in it runs in the suite, so a recipe that
crashes fails CI.

How a block becomes a run:

* ```bash blocks are split into commands (a line plus its backslash continuations, comments
  dropped, whitespace collapsed). Each command must be a key of COMMANDS, which says how the
  suite runs it: the command's own text through ``bash -c`` in a sandbox that looks like the
  repository (symlinks to its files; outputs such as ``workdir/default`` land in the
  sandbox), with ``.venv/bin/python`` replaced by the Python running the tests, ``/tmp/`` and
  ``$HOME`` pointing into the sandbox, and tiny ``--config.*`` overrides appended (or
  inserted by ``replace``) where the command would otherwise train for minutes. A ``make``
  command runs the real Makefile with ``-o .venv/.installed PY=<this Python>`` (never
  installing anything); TRAIN_ARGS / BENCH_ARGS carry the tiny overrides.
* ```python blocks must each contain exactly one marker of PYTHON_BLOCKS, whose function
  runs the block and checks what it says it computes.
* Blocks of any other language (or none) must match a marker of TEXT, with why they are not
  code.

A new or edited block that is in none of these tables fails
``test_every_block_is_registered`` (a new command also gets a failing case of its own) until
someone says how to run it; a registration whose command left the README fails too. A
command that cannot run here (a 1.7 GB download) is not skipped silently: its Run says why
and what runs instead (``--only_check_args``: its flags parse). A command that fails today
because of a known defect is ``xfail(strict=True)`` with the defect named: when the fix lands
the case XPASSes, which fails, so the mark gets removed.

The commands share one sandbox per test session (make train's workdir/default is what
translate and evaluate read; the local-corpus recipe prepares, trains, then evaluates) and
one JAX compilation cache, so runs with the same tiny shapes compile once. Each command runs
once per session even under xdist: its result is kept in the sandbox, and a file lock makes
a worker that needs a command another worker is running wait for it. (The cases are also
one xdist_group, for `--dist loadgroup`; with pytest 9 and xdist 3.8 that grouping has no
effect, so the lock is what keeps the sharing.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import random
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PYTHON = sys.executable
TIMEOUT_S = 600  # per command; the slowest here takes ~20 s on 2 cores

pytestmark = pytest.mark.xdist_group("readme")

# --------------------------------------------------------------------------------------
# Reading the README.
# --------------------------------------------------------------------------------------

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
SHELLS = {"bash", "sh", "shell", "console"}


def _blocks(text: str | None = None) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block of the README."""
    text = README.read_text() if text is None else text
    return [
        (m.group(1).strip().lower(), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def _strip_comment(line: str) -> str:
    """The line without its `# comment` (a # that starts a word outside quotes)."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def _commands(body: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments dropped,
    whitespace collapsed (the form COMMANDS is keyed by)."""
    commands, current = [], ""
    for line in body.splitlines():
        line = _strip_comment(line).rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        command = " ".join((current + line).split())
        current = ""
        if command:
            commands.append(command)
    return commands


def _readme_commands() -> list[str]:
    return [c for lang, body, _ in _blocks() if lang in SHELLS for c in _commands(body)]


def _readme_code(lang: str) -> list[tuple[str, int]]:
    return [(body, line) for blang, body, line in _blocks() if blang == lang]


# --------------------------------------------------------------------------------------
# The sandbox the commands run in.
# --------------------------------------------------------------------------------------

# What a command may read from the repository (symlinked into the sandbox's repo/).
LINKED = (
    "attention_jax",
    "experiments",
    "benchmarks",
    "tests",
    "docs",
    "notebooks",
    "Makefile",
    "pyproject.toml",
    "setup.cfg",
    "README.md",
)


@dataclasses.dataclass
class Result:
    command: str  # what ran (after the Run's rewriting)
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float = 0.0  # user + system of the command's processes

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        return (
            f"$ {self.command}\n(exit status {self.returncode}, {self.seconds:.1f} s)\n"
            f"--- stdout (end) ---\n{self.stdout[-3000:]}\n--- stderr (end) ---\n"
            f"{self.stderr[-3000:]}"
        )


class Sandbox:
    """repo/ (symlinks to the repository; the commands' working directory), home/ ($HOME,
    so ~/tensorflow_datasets and $HOME/wmt_base are here), tmp/ (what /tmp/ becomes) and
    one JAX compilation cache, shared by the session's xdist workers."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.repo, self.home, self.tmp = path / "repo", path / "home", path / "tmp"
        self.results = path / "results"  # <Run.id>.json: what each command did
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path / "setup.lock"):  # xdist workers share one sandbox
            if not self.results.exists():
                for d in (self.repo, self.home, self.tmp, path / "tmpdir"):
                    d.mkdir()
                for name in LINKED:
                    if (ROOT / name).exists():
                        (self.repo / name).symlink_to(ROOT / name)
                self.results.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TFDS_", "PYTEST_"))}
        # One CPU device, as on a user's machine (not conftest's 8 fake ones). XLA's backend
        # optimizations off: compiling is most of a tiny run's time, and this halves it
        # (speed is never asserted; the programs compute the same thing).
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if "host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join([*flags, "--xla_backend_optimization_level=0"])
        env.update(
            HOME=str(self.home),
            TMPDIR=str(path / "tmpdir"),  # what the tools leave in a temporary dir stays here
            JAX_PLATFORMS="cpu",
            JAX_COMPILATION_CACHE_DIR=str(path / "jax_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # small programs too
            MPLBACKEND="Agg",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        )
        self.env = env

    def rewrite(self, command: str, run: Run) -> str:
        for old, new in run.replace:
            assert old in command, f"Run.replace: {old!r} is not in {command!r}"
            if "{port}" in new:  # a port free now (for the multi-host loop's coordinator)
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    new = new.replace("{port}", str(s.getsockname()[1]))
            command = command.replace(old, new)
        # /tmp/ first: the Python's own path may lie under /tmp (a clone there, as in CI).
        command = command.replace("/tmp/", f"{self.tmp}/")
        command = command.replace(".venv/bin/python", shlex.quote(PYTHON))
        # The console script, wherever the README calls it: the same as python -m attention_jax.
        command = re.sub(
            r"(?:^|(?<=[\s;&|(]))(?:\.venv/bin/)?attention-jax(?=\s)",
            f"{shlex.quote(PYTHON)} -m attention_jax",
            command,
        )
        if command.startswith("make "):  # never install; the Python running the tests
            command += f" -o .venv/.installed PY={shlex.quote(PYTHON)}"
        return f"{command} {run.args}".strip()

    def run(self, key: str) -> Result:
        """Runs a README command (a COMMANDS or VARIANTS key), its `needs` first, once per
        test session: its Result is kept as JSON, and a file lock makes another xdist
        worker that needs the same command wait for it instead of running it again."""
        command, run = _lookup(key)
        done = self.results / f"{run.id}.json"
        with _locked(self.results / f"{run.id}.lock"):
            if done.exists():
                return Result(**json.loads(done.read_text()))
            for need in run.needs:
                self.run(need)
            if run.files:
                run.files(self)
            text = self.rewrite(command, run)
            result = self._execute(text, run)
            if result.returncode != 0 and run.retry:
                # Kept visible: the retried Result carries the first attempt's stderr.
                first = result
                result = self._execute(self.rewrite(command, run), run)
                result.stderr = (
                    f"(first attempt, exit status {first.returncode}; {run.retry})\n"
                    f"{first.stderr[-3000:]}\n(second attempt)\n{result.stderr}"
                )
            done.write_text(json.dumps(dataclasses.asdict(result)))
        return result

    def _execute(self, text: str, run: Run) -> Result:
        start, cpu = time.perf_counter(), _children_cpu()
        # Its own process group: a command that hangs is killed with all its processes.
        with subprocess.Popen(
            ["bash", "-c", text],
            cwd=self.repo,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as p:
            try:
                out, err = p.communicate(run.stdin, timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
                err += f"\n(killed after {TIMEOUT_S} s)"
        return Result(
            text, p.returncode, out, err, time.perf_counter() - start, _children_cpu() - cpu
        )


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one sandbox for all workers of the run
        base = base.parent
    return Sandbox(base / "readme")


# --------------------------------------------------------------------------------------
# Input files the recipes name (written into the sandbox before the command runs).
# --------------------------------------------------------------------------------------


def _corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """A generated parallel corpus with enough distinct words for the README's
    --vocab_size=8000: source words are random letters, the target is each word reversed
    in reverse order (learnable, not the toy grammar)."""
    r = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(r.choices(letters, k=r.randint(3, 8))) for _ in range(3000)]
    r = random.Random(seed)
    pairs = []
    for _ in range(n):
        sentence = r.choices(words, k=r.randint(3, 8))
        pairs.append((" ".join(sentence) + " .", " ".join(w[::-1] for w in sentence[::-1]) + " ."))
    return pairs


def _write_local_corpus(box: Sandbox) -> None:
    train, dev = _corpus(1000, seed=1), _corpus(32, seed=2)
    (box.repo / "train.en").write_text("".join(s + "\n" for s, _ in train))
    (box.repo / "train.de").write_text("".join(t + "\n" for _, t in train))
    (box.repo / "dev.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in dev))


def _write_newstest(box: Sandbox) -> None:
    test = _corpus(8, seed=3)
    (box.repo / "newstest2014.en").write_text("".join(s + "\n" for s, _ in test))
    (box.repo / "newstest2014.de").write_text("".join(t + "\n" for _, t in test))


TOY_SENTENCES = [
    "the small dog sees a red car .",
    "a woman found the old book .",
    "the children read a letter in the garden .",
]


def _write_in_txt(box: Sandbox) -> None:
    (box.repo / "in.txt").write_text("".join(s + "\n" for s in TOY_SENTENCES))


# --------------------------------------------------------------------------------------
# Checks beyond exit status 0 (which every Run asserts unless it says otherwise).
# --------------------------------------------------------------------------------------


def _check_trained(
    workdir: Callable[[Sandbox], pathlib.Path], report: str = "final test metrics"
) -> Callable:
    def check(r: Result, box: Sandbox) -> None:
        path = workdir(box)
        assert re.search(report, r.stdout) and "bleu" in r.stdout.lower()
        for name in ("checkpoints", "metrics.jsonl", "vocab.model"):
            assert (path / name).exists(), f"{path / name} missing"
            assert name in r.stdout, f"the run does not say where {name} is"

    return check


def _check_resumed(r: Result, box: Sandbox) -> None:
    assert "resumed from step 3" in r.stdout, r.stdout[-2000:]  # TINY_TOY's last step


def _check_reversal(r: Result, box: Sandbox) -> None:
    assert "final test metrics" in r.stdout
    assert (box.tmp / "reverse" / "checkpoints").is_dir()


def _check_multihost(r: Result, box: Sandbox) -> None:
    assert r.stdout.count("final test metrics") == 1  # only process 0 logs
    assert (box.tmp / "two" / "checkpoints").is_dir()


def _check_prepared_local(r: Result, box: Sandbox) -> None:
    assert "my_corpus" in r.stdout and "train 1,000, validation 32" in r.stdout
    vocab = box.home / "tensorflow_datasets" / "my_corpus" / "spm_bpe_8000.model"
    assert vocab.exists() and "8000 pieces" in r.stdout


def _check_lm_trained(workdir: Callable[[Sandbox], pathlib.Path]) -> Callable:
    def check(r: Result, box: Sandbox) -> None:
        # README: "per-token loss, perplexity and bits per byte"
        assert re.search(r"final \w+ metrics.*perplexity .*bits_per_byte", r.stdout), r.stdout[
            -2000:
        ]
        path = workdir(box)
        for name in ("checkpoints", "metrics.jsonl", "vocab.model", "config.json"):
            assert (path / name).exists(), f"{path / name} missing"

    return check


def _check_generated(r: Result, box: Sandbox) -> None:
    # "prints prompt + continuation, one line per sample"
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("the small dog"), r.stdout


def _check_lm_evaluated(r: Result, box: Sandbox) -> None:
    # "prints the loss, perplexity and bits per byte of the validation split ... one
    # `NAME VALUE` line each"
    lines = r.stdout.splitlines()
    assert "split: validation" in lines[0], r.stdout
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["loss", "perplexity", "bits_per_byte"], r.stdout
    assert all(float(line.split()[1]) > 0 for line in lines[1:]), r.stdout


def _write_text_corpus(box: Sandbox) -> None:
    train, dev = _corpus(1000, seed=4), _corpus(32, seed=5)
    (box.repo / "train.txt").write_text("".join(s + "\n" for s, _ in train))
    (box.repo / "dev.txt").write_text("".join(s + "\n" for s, _ in dev))


def _check_prepared_text(r: Result, box: Sandbox) -> None:
    assert "my_text" in r.stdout, r.stdout
    assert (box.home / "tensorflow_datasets" / "my_text").is_dir()


def _check_unprepared(r: Result, box: Sandbox) -> None:
    # README: "a dataset that is not prepared stops training with the command that prepares it"
    assert r.returncode != 0 and "Traceback" not in r.output
    assert re.search(r"prepare(_data\.py)? --dataset=wmt14_translate/de-en", r.stderr), r.stderr


def _check_translated_file(r: Result, box: Sandbox) -> None:
    lines = (box.repo / "out.txt").read_text().splitlines()
    assert len(lines) == len(TOY_SENTENCES), lines  # (a 3-step model may output nothing)


def _check_translated_stdin(r: Result, box: Sandbox) -> None:
    file_run = (box.repo / "out.txt").read_text().splitlines()
    assert r.stdout.splitlines() == file_run  # the same translations, line-aligned


def _check_scores(r: Result, box: Sandbox) -> None:
    # "printed with sacreBLEU's signature, and chrF"
    assert "BLEU" in r.stdout and "nrefs:1|case:mixed|eff:no|tok:13a" in r.stdout, r.stdout
    assert "chrF" in r.stdout


def _check_make_test(r: Result, box: Sandbox) -> None:
    # README: make test runs ruff (format check + lint) and the whole pytest suite with -n auto.
    lines = r.stdout.splitlines()
    assert any(line.endswith("ruff format --check .") for line in lines), lines
    assert any(line.endswith("ruff check .") for line in lines), lines
    assert any(re.search(r"-m pytest .*-n auto", line) for line in lines), lines


def _check_collected(r: Result, box: Sandbox) -> None:
    match = re.search(r"(\d+)/(\d+) tests collected", r.stdout) or re.search(
        r"(\d+) tests? collected", r.stdout
    )
    assert match and int(match.group(1)) > 0, r.stdout[-1000:]


def _check_table(r: Result, box: Sandbox) -> None:
    # Benchmarks print Markdown tables; a cell that failed prints "error [n]" and exits 0.
    assert "|---" in r.stdout, r.stdout[-2000:]
    assert not re.search(r"\berror \[\d+\]|\w+Error\b", r.stdout), r.stdout[-3000:]


def _check_help(r: Result, box: Sandbox) -> None:
    assert "usage:" in r.stdout and "Traceback" not in r.output


def _check_list_configs(r: Result, box: Sandbox) -> None:
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert {"default", "reversal", "wmt14_base", "wmt14_big"} <= set(names), r.stdout


def _check_dry_run(r: Result, box: Sandbox) -> None:
    # "prints the resolved config, trains nothing": the override is in it, no workdir made.
    assert re.search(r'"pre_ln": true', r.stdout), r.stdout[-3000:]
    assert re.search(r'"d_model": 512', r.stdout), r.stdout[-3000:]  # wmt14_base's model
    assert not (box.tmp / "base").exists()


def _check_flags_parse(r: Result, box: Sandbox) -> None:
    assert "Traceback" not in r.output and not r.stdout.strip(), r.output  # parsed, ran nothing


# --------------------------------------------------------------------------------------
# The tables.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """How the suite runs one README command."""

    id: str  # the pytest id
    args: str = ""  # appended to the command (tiny overrides)
    replace: tuple[tuple[str, str], ...] = ()  # (README text, what runs instead), first
    needs: tuple[str, ...] = ()  # commands whose outputs this one reads: they run first
    files: Callable[[Sandbox], None] | None = None  # writes the inputs the command names
    stdin: str | None = None
    ok: bool = True  # exit status 0 expected (False: the check says what failure looks like)
    check: Callable[[Result, Sandbox], None] | None = None
    xfail: str = ""  # a known defect: strict xfail until it is fixed
    why: str = ""  # where the run differs from the README beyond tiny overrides: why
    retry: str = ""  # a failure not of the README's making (e.g. a port race): why once more


# The default experiment (built-in corpus), made tiny: 3 steps of a 1-layer d_model=32 model
# on 2,000 pairs, a 300-piece vocabulary, 16 test sentences. Every run of default.py uses
# these shapes, so they share compiled programs through the session's compilation cache.
TINY_TOY = (
    "--config.num_train_steps=3 --config.model.num_layers=1 --config.model.d_model=32 "
    "--config.model.num_heads=4 --config.model.d_ff=64 --config.model.vocab_size=300 "
    "'--config.data.corpus_sizes=(2000,64,64)' --config.data.tokens_per_batch=640 "
    "--config.data.eval_examples=16 --config.data.eval_batch_size=16 "
    "--config.eval_every=1000 --config.checkpoint_every=3 --config.log_every=1 "
    "--config.beam_size=1"
)
# wmt14_base.py on the generated local corpus: the same tiny model (with the prepared
# 8000-piece vocabulary), 5 steps, a checkpoint each (evaluate averages the last 5).
TINY_BASE = (
    "--config.num_train_steps=5 --config.model.num_layers=1 --config.model.d_model=32 "
    "--config.model.num_heads=4 --config.model.d_ff=64 --config.model.max_len=64 "
    "--config.model.dtype=float32 --config.data.max_length=40 "
    "--config.data.tokens_per_batch=640 --config.data.workers=0 --config.data.prefetch=0 "
    "--config.data.eval_examples=16 --config.data.eval_batch_size=16 "
    "--config.eval_every=1000 --config.checkpoint_every=1 --config.log_every=1 "
    "--config.beam_size=1"
)
TINY_REVERSAL = (
    "--config.num_train_steps=3 --config.model.num_layers=1 --config.model.d_model=32 "
    "--config.model.num_heads=4 --config.model.d_ff=64 --config.batch_size=8 "
    "--config.eval_batches=1 --config.eval_every=1000 --config.checkpoint_every=3 "
    "--config.log_every=1"
)
PREPARE_LOCAL = (
    ".venv/bin/python experiments/prepare_data.py --dataset=local --name=my_corpus "
    "--train=train.en,train.de --validation=dev.tsv --vocab_size=8000"
)
TRAIN_BASE = (
    ".venv/bin/python experiments/train.py --config=experiments/configs/wmt14_base.py "
    "--workdir=$HOME/wmt_base"
)
# lm.py made tiny: 3 steps of a 1-layer d_model=32 LM on 2,000 sentences, 300 pieces.
TINY_LM = (
    "--config.num_train_steps=3 --config.model.num_layers=1 --config.model.d_model=32 "
    "--config.model.num_heads=4 --config.model.d_ff=64 --config.model.vocab_size=300 "
    "'--config.data.corpus_sizes=(2000,32,32)' --config.data.tokens_per_batch=512 "
    "--config.data.eval_batch_size=16 --config.eval_every=1000 --config.checkpoint_every=3 "
    "--config.log_every=1"
)
TRAIN_LM = (
    ".venv/bin/python experiments/train.py --config=experiments/configs/lm.py --workdir=/tmp/lm"
)
PREPARE_TEXT = (
    ".venv/bin/python experiments/prepare_data.py --dataset=local_text --name=my_text "
    "--train=train.txt --validation=dev.txt --vocab_size=2000"
)
MAKE_TRAIN = "make train"
TRANSLATE = (
    ".venv/bin/python experiments/translate.py --workdir=workdir/default --input=in.txt "
    "--output=out.txt"
)

COMMANDS: dict[str, Run] = {
    # Set-up: two commands.
    MAKE_TRAIN: Run(
        "make-train",
        args=f'TRAIN_ARGS="{TINY_TOY}"',
        check=_check_trained(lambda box: box.repo / "workdir" / "default"),
        why="TRAIN_ARGS: 3 tiny steps instead of ~3.5 minutes (the README's BLEU ~97 is not "
        "asserted: a 3-step model translates nothing)",
    ),
    "make test": Run(
        "make-test",
        args="-n",
        check=_check_make_test,
        why="make -n: prints what `make test` runs (ruff, pytest -n auto) without running "
        "the suite inside itself",
    ),
    # Experiments.
    ".venv/bin/python experiments/train.py --config=experiments/configs/default.py "
    "--workdir=/tmp/toy --config.num_train_steps=300 --config.model.num_layers=1 "
    "--config.mesh.data=-1 --config.accum_steps=2": Run(
        "train-toy", args=TINY_TOY, check=_check_trained(lambda box: box.tmp / "toy")
    ),
    ".venv/bin/python experiments/train.py --config=experiments/configs/reversal.py "
    "--workdir=/tmp/reverse": Run("train-reversal", args=TINY_REVERSAL, check=_check_reversal),
    # The installed command (run as python -m attention_jax, which is what it calls).
    "attention-jax train --list_configs": Run("list-configs", check=_check_list_configs),
    "attention-jax train --config=wmt14_base --workdir=/tmp/base --dry_run "
    "--config.model.pre_ln=True": Run("dry-run", check=_check_dry_run),
    # Data.
    ".venv/bin/python experiments/prepare_data.py --dataset=wmt14_translate/de-en": Run(
        "prepare-wmt14",
        args="--only_check_args",
        check=_check_flags_parse,
        why="downloads ~1.7 GB from statmt.org: not in CI. --only_check_args (absl) parses "
        "the command's flags (a renamed flag or dataset fails) and exits before downloading",
    ),
    PREPARE_LOCAL: Run(
        "prepare-local",
        files=_write_local_corpus,
        check=_check_prepared_local,
        why="runs as written on generated files train.en, train.de, dev.tsv (1,000 / 32 pairs)",
    ),
    TRAIN_BASE: Run(
        "train-wmt14-unprepared",
        args=TINY_BASE,
        ok=False,
        check=_check_unprepared,
        replace=(("$HOME/wmt_base", "$HOME/wmt_base_unprepared"),),
        why="WMT14 is not prepared here (see prepare-wmt14): checks the README's promise that "
        "training then stops naming the command that prepares it (another workdir: "
        "$HOME/wmt_base is the local corpus's run below)",
    ),
    "for i in 0 1; do .venv/bin/python experiments/train.py "
    "--config=experiments/configs/default.py --workdir=/tmp/two "
    "--coordinator_address=127.0.0.1:12355 --num_processes=2 --process_id=$i & done; wait": Run(
        "multihost",
        replace=(
            ("--process_id=$i", f"--process_id=$i {TINY_TOY}"),
            ("12355", "{port}"),
            # `wait` alone exits 0 whatever the processes did: wait for each, fail on any.
            ("; wait", "; for j in 1 2; do wait -n || exit 1; done"),
        ),
        check=_check_multihost,
        retry="two processes on loopback, coordinator port chosen free then released: another "
        "process of the suite may take it first (failed 1 run in 5 under -n 2)",
        why="a free port instead of 12355; the loop's bare `wait` replaced by one that fails "
        "when a process fails",
    ),
    # Language model.
    TRAIN_LM: Run("train-lm", args=TINY_LM, check=_check_lm_trained(lambda box: box.tmp / "lm")),
    '.venv/bin/python experiments/generate.py --workdir=/tmp/lm --prompt="the small dog" '
    "--max_new_tokens=12 --temperature=0": Run(
        "generate", needs=(TRAIN_LM,), check=_check_generated
    ),
    ".venv/bin/python experiments/evaluate.py --workdir=/tmp/lm": Run(
        "evaluate-lm", needs=(TRAIN_LM,), check=_check_lm_evaluated
    ),
    PREPARE_TEXT: Run(
        "prepare-text",
        files=_write_text_corpus,
        check=_check_prepared_text,
        why="runs as written on generated files train.txt, dev.txt (1,000 / 32 sentences)",
    ),
    ".venv/bin/python experiments/train.py --config=experiments/configs/lm.py "
    "--workdir=/tmp/my_lm --config.data.dataset=my_text": Run(
        "train-lm-text",
        needs=(PREPARE_TEXT,),
        args=TINY_LM.replace("--config.model.vocab_size=300 ", ""),
        check=_check_lm_trained(lambda box: box.tmp / "my_lm"),
        why="the prepared corpus's own 2000-piece vocabulary (vocab_size is taken from it)",
    ),
    # Translating and scoring (the workdir of `make train`).
    TRANSLATE: Run(
        "translate-file", needs=(MAKE_TRAIN,), files=_write_in_txt, check=_check_translated_file
    ),
    ".venv/bin/python experiments/evaluate.py --workdir=workdir/default": Run(
        "evaluate-default", needs=(MAKE_TRAIN,), check=_check_scores
    ),
    ".venv/bin/python experiments/evaluate.py --workdir=$HOME/wmt_base --average_last=5 "
    "--source=newstest2014.en --reference=newstest2014.de": Run(
        "evaluate-average",
        needs=("train-local",),
        files=_write_newstest,
        check=_check_scores,
        why="$HOME/wmt_base is the tiny run on the generated local corpus (5 checkpoints); "
        "newstest2014.en/.de are 8 generated pairs",
    ),
    # Tests and benchmarks.
    ".venv/bin/python -m pytest tests/test_attention.py -k bfloat16": Run(
        "pytest-subset",
        args="--collect-only -q -p no:cacheprovider",
        check=_check_collected,
        why="--collect-only: the selection exists and is not empty; the tests themselves "
        "run in this suite anyway",
    ),
    "make bench": Run(
        "make-bench",
        args="BENCH_ARGS='--lengths 16 --batch 1 --heads 1 --head_dim 8 --repeats 1'",
        check=_check_table,
    ),
    ".venv/bin/python benchmarks/train_step.py": Run(
        "bench-train-step",
        check=_check_table,
        args="--preset tiny --vocab 64 --batch 2 --length 8 --steps 1 --warmup 1 --peak_n 64",
    ),
    ".venv/bin/python benchmarks/input_pipeline.py": Run(
        "bench-input-pipeline",
        args="--help",
        check=_check_help,
        why="its train step is the base model (no option to shrink it): ~30 s even with 2 "
        "batches, so only its command line is checked here",
    ),
    ".venv/bin/python benchmarks/decode.py": Run(
        "bench-decode",
        check=_check_table,
        args="--preset tiny --vocab 64 --batch 1 --source_length 4 --lengths 4 --repeats 1",
    ),
    ".venv/bin/python benchmarks/long_context.py": Run(
        "bench-long-context",
        check=_check_table,
        args="--quick --lengths 64 --short_lengths 64 --causal_lengths 128 --heads 1 "
        "--head_dim 8 --repeats 1",
    ),
    ".venv/bin/python benchmarks/train_memory.py": Run(
        "bench-train-memory",
        check=_check_table,
        args="--smoke --in_process --rows chunk+dots+scan --steps 1",
    ),
    ".venv/bin/python benchmarks/attention.py --lengths 128,512 --repeats 9": Run(
        "bench-attention",
        args="--batch 1 --heads 1 --head_dim 8 --repeats 1",
        check=_check_table,
        why="--repeats 1 and B=N=1, H=8 (appended, so they win) at the README's lengths",
    ),
}

# Runs the README describes in words beside a command (not a command of their own).
VARIANTS: dict[str, tuple[str, Run]] = {
    "make-train-rerun": (  # "(workdir/default; rerun = resume)"
        MAKE_TRAIN,
        Run(
            "make-train-rerun",
            args=COMMANDS[MAKE_TRAIN].args,
            needs=(MAKE_TRAIN,),
            check=_check_resumed,
        ),
    ),
    "translate-stdin": (  # "stdin/stdout: -"
        TRANSLATE,
        Run(
            "translate-stdin",
            needs=(TRANSLATE,),
            replace=(("--input=in.txt --output=out.txt", "--input=- --output=-"),),
            stdin="".join(s + "\n" for s in TOY_SENTENCES),
            check=_check_translated_stdin,
        ),
    ),
    "train-local": (  # "# or --config.data.dataset=my_corpus"
        TRAIN_BASE,
        Run(
            "train-local",
            needs=(PREPARE_LOCAL,),
            check=_check_trained(
                lambda box: box.home / "wmt_base",
                # no test split: the run reports on validation instead (or on test, if any)
                report=r"final (test|validation) metrics",
            ),
            # No vocab_size: the model takes the prepared vocabulary's 8000.
            args=f"--config.data.dataset=my_corpus {TINY_BASE}",
        ),
    ),
}


def _lookup(key: str) -> tuple[str, Run]:
    if key in VARIANTS:
        return VARIANTS[key]
    if key in COMMANDS:
        return key, COMMANDS[key]
    raise KeyError(key)


# --------------------------------------------------------------------------------------
# The python blocks.
# --------------------------------------------------------------------------------------


def _exec(block: str, scope: dict) -> dict:
    exec(compile(block, str(README), "exec"), scope)
    return scope


def _python_block(marker: str) -> str:
    (block,) = [b for b, _ in _readme_code("python") if marker in b]
    return block


def _run_pure_functions(block: str) -> None:
    scope = _exec(block, {})
    assert scope["y"].shape == (2, 6, 64)  # [B, T, D]
    assert scope["out"].shape == (6, 16) and scope["w"].shape == (6, 6)  # one head
    np.testing.assert_allclose(np.asarray(scope["w"]).sum(-1), 1.0, rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in __import__("jax").tree.leaves(scope["g"]))


def _run_long_sequence(block: str) -> None:
    # As written but at T = 4,096 instead of 100,000 (minutes on 2 cores; the benchmark
    # benchmarks/long_context.py runs the full length).
    scope = _exec(block.replace("100_000", "4_096"), {})
    assert scope["out"].shape == (1, 4096, 8, 64)
    np.testing.assert_allclose(np.asarray(scope["out"]), 1.0, rtol=1e-6)  # v = 1 everywhere


def _run_model(block: str) -> None:
    scope = _exec(block, {})
    assert scope["logits"].shape == (1, 5, 100) and scope["enc"].shape == (1, 4, 32)
    assert "intermediates" in scope["state"]


def _run_decoding(block: str) -> None:
    scope = _exec(_python_block("aj.Transformer(cfg)"), {})  # "continuing the example above"
    _exec(block, scope)
    assert scope["ids"].shape == scope["greedy"].shape == (1, 8)
    assert scope["sampled"].shape == (1, 8)
    np.testing.assert_array_equal(scope["sampled"][:, :2], scope["tgt"][:, :2])  # the prompt


# marker (a string only that block contains) -> (pytest id, runner).
PYTHON_BLOCKS: dict[str, tuple[str, Callable[[str], None]]] = {
    "aj.scaled_dot_product_attention(q[0": ("python-pure-functions", _run_pure_functions),
    "100_000": ("python-long-sequence", _run_long_sequence),
    "model = aj.Transformer(cfg)": ("python-model", _run_model),
    "decoding.translate(": ("python-decoding", _run_decoding),
}

# marker -> why the block is not code.
TEXT: dict[str, str] = {
    "core/      pure JAX, no Flax": "the Layout section: a directory listing",
}


# --------------------------------------------------------------------------------------
# The tests.
# --------------------------------------------------------------------------------------


def _unregistered() -> list[str]:
    """What in the README no table covers, and what the tables cover that is gone."""
    problems = []
    commands = _readme_commands()
    problems += [f"command not in COMMANDS: {c!r}" for c in commands if c not in COMMANDS]
    gone = [c for c in COMMANDS if c not in commands]
    gone += [
        f"{c} (the base of VARIANTS[{k!r}])" for k, (c, _) in VARIANTS.items() if c not in commands
    ]
    problems += [f"COMMANDS entry no longer in README.md: {c!r}" for c in gone]
    for lang, body, line in _blocks():
        if lang in SHELLS:
            continue
        table = PYTHON_BLOCKS if lang == "python" else TEXT
        hits = [m for m in table if m in body]
        if len(hits) != 1:
            name = "PYTHON_BLOCKS" if lang == "python" else "TEXT"
            problems.append(
                f"README.md:{line}: a ```{lang} block matching {len(hits)} markers of {name} "
                f"(needs exactly one): {body[:120]!r}"
            )
    for table, code in ((PYTHON_BLOCKS, True), (TEXT, False)):
        bodies = [b for bl, b, _ in _blocks() if bl not in SHELLS and (bl == "python") == code]
        unused = [m for m in table if not any(m in b for b in bodies)]
        problems += [f"marker {m!r} matches no README block" for m in unused]
    return problems


def test_every_block_is_registered():
    problems = _unregistered()
    assert not problems, (
        "README.md and the tables of tests/test_readme.py disagree; say how each new block "
        "runs (COMMANDS / VARIANTS / PYTHON_BLOCKS / TEXT), or update an edited one's entry:\n  "
        + "\n  ".join(problems)
    )


def test_the_harness_reads_blocks_as_documented():
    text = (
        "x\n```bash\na \\\n  --b=1   # note\n# only a comment\nc '# not a comment'\n```\n"
        "```\nlisting\n```\n"
    )
    blocks = _blocks(text)
    assert [(lang, line) for lang, _, line in blocks] == [("bash", 2), ("", 8)]
    assert _commands(blocks[0][1]) == ["a --b=1", "c '# not a comment'"]


def test_the_harness_rewrites_commands_as_documented(tmp_path):
    box, python = Sandbox(tmp_path), shlex.quote(PYTHON)
    rewrite = box.rewrite
    assert rewrite(".venv/bin/python x.py --workdir=/tmp/a", Run("t", args="--b=1")) == (
        f"{python} x.py --workdir={box.tmp}/a --b=1"
    )
    assert rewrite("attention-jax train && .venv/bin/attention-jax evaluate", Run("t")) == (
        f"{python} -m attention_jax train && {python} -m attention_jax evaluate"
    )
    assert rewrite("make train", Run("t", args="W=1")) == (
        f"make train -o .venv/.installed PY={python} W=1"
    )
    port = rewrite("a --port=12355 x", Run("t", replace=(("12355", "{port}"),)))
    assert re.fullmatch(r"a --port=\d+ x", port) and port != "a --port=12355 x"


def _known_defect(run: Run):
    # raises=AssertionError: only the README's promise failing counts, not the harness.
    return pytest.mark.xfail(strict=True, reason=run.xfail, raises=AssertionError)


def _command_params():
    params = []
    for command in dict.fromkeys(_readme_commands()):  # `make test` is named twice
        run = COMMANDS.get(command)
        if run is None:
            params.append(pytest.param(command, id=f"unregistered:{command[:40]}"))
            continue
        marks = [_known_defect(run)] if run.xfail else []
        params.append(pytest.param(command, id=run.id, marks=marks))
    for key, (_, run) in VARIANTS.items():
        marks = [_known_defect(run)] if run.xfail else []
        params.append(pytest.param(key, id=run.id, marks=marks))
    return params


@pytest.mark.slow
@pytest.mark.parametrize("key", _command_params())
def test_readme_command(key, sandbox):
    if key not in COMMANDS and key not in VARIANTS:
        pytest.fail(f"README command {key!r} is not registered in COMMANDS: say how it runs")
    _, run = _lookup(key)
    result = sandbox.run(key)
    print(f"{run.id}: {result.seconds:.1f} s, {result.cpu_seconds:.1f} s CPU: {result.command}")
    if run.why:
        print(f"  (differs from the README: {run.why})")
    if run.ok:
        assert result.returncode == 0, result.describe()
    assert "Traceback (most recent call last)" not in result.output, result.describe()
    if run.check:
        try:
            run.check(result, sandbox)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{result.describe()}") from None


@pytest.mark.parametrize("marker", [pytest.param(m, id=i) for m, (i, _) in PYTHON_BLOCKS.items()])
def test_readme_python_block(marker):
    blocks = [b for b, _ in _readme_code("python") if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} python blocks of README.md contain {marker!r}"
    PYTHON_BLOCKS[marker][1](blocks[0])


# --------------------------------------------------------------------------------------
# Figures the README states that are measured elsewhere.
# --------------------------------------------------------------------------------------
# The README states figures measured elsewhere: docs/rnn_vs_transformer.json (written by
# experiments/rnn_vs_transformer.py: the measurement) and BUILD_NOTES.md (the benchmark
# tables). Each is read back here, so a new measurement that changes a figure fails until
# the README says it too. Whitespace is collapsed: a figure may wrap across lines.


def _collapsed(path: pathlib.Path) -> str:
    return " ".join(path.read_text().split())


def _stated(pattern: str, text: str, where: str) -> re.Match:
    match = re.search(pattern, text)
    assert match, f"{where} no longer states /{pattern}/: update this test with the text"
    return match


def _same(figure: str, value: float) -> bool:
    """`figure` (as written, e.g. '0.85') is `value` rounded to the figure's decimals."""
    decimals = len(figure.partition(".")[2])
    return f"{value:.{decimals}f}" == figure


def test_readme_figures_match_rnn_vs_transformer_json():
    data = json.loads((ROOT / "docs" / "rnn_vs_transformer.json").read_text())
    text = _collapsed(README)
    m = _stated(r"the same size \((\d+)k and (\d+)k parameters\)", text, "README")
    assert (int(m[1]), int(m[2])) == (
        round(data["params"]["lstm"] / 1000),
        round(data["params"]["transformer"] / 1000),
    ), data["params"]
    rows = sorted(data["accuracy"], key=lambda r: r["T"])
    m = _stated(r"final state fails from T = (\d+) on \(no sequence copied\)", text, "README")
    failed = [r["T"] for r in rows if r["lstm_sequence_accuracy"] == 0.0]
    assert failed == [r["T"] for r in rows if r["T"] >= int(m[1])], rows  # from there on
    m = _stated(
        r"the Transformer copies every sequence up to T = (\d+) and (\d+)% of them at T = (\d+)",
        text,
        "README",
    )
    exact = [r["T"] for r in rows if r["transformer_sequence_accuracy"] == 1.0]
    assert exact == [r["T"] for r in rows if r["T"] <= int(m[1])], rows
    (at,) = [r for r in rows if r["T"] == int(m[3])]
    assert round(100 * at["transformer_sequence_accuracy"]) == int(m[2]), at
    _stated(r"per training step on this CPU the LSTM is \*faster\*", text, "README")
    assert all(r["lstm_over_transformer"] < 1 for r in data["timing"]), data["timing"]
    # BUILD_NOTES.md quotes the same parameter counts.
    notes = _collapsed(ROOT / "BUILD_NOTES.md")
    lstm, transformer = data["params"]["lstm"], data["params"]["transformer"]
    assert f"{lstm:,} vs {transformer:,} parameters" in notes


def test_readme_figures_match_build_notes():
    text, notes = _collapsed(README), _collapsed(ROOT / "BUILD_NOTES.md")
    # benchmarks/long_context.py's memory table: | T | pass | blockwise | s | peak | + run |
    rows = {
        (t, p): (int(peak.replace(",", "")), int(run.replace(",", "")))
        for t, p, peak, run in re.findall(
            r"\| ([\d,]+) \| (fwd|fwd\+bwd) \| blockwise \| [\d.]+ \| \**([\d,]+) MiB\** \| "
            r"([\d,]+) MiB \|",
            notes,
        )
    }
    fwd, bwd = rows[("100,000", "fwd")], rows[("16,384", "fwd+bwd")]
    m = _stated(
        r"forward at T = 100,000 peaks at ([\d.]+) GB for the whole process \(([\d.]+) GB of "
        r"it the attention call\), forward\+backward at T = 16,384 at ([\d.]+) GB \(([\d.]+) GB "
        r"the call\)",
        text,
        "README",
    )
    for figure, mib in zip(m.groups(), (*fwd, *bwd), strict=True):
        assert _same(figure, mib / 1000), (figure, mib)  # BUILD_NOTES' GB: MiB / 1000
    m = _stated(r"T = 100,000 in ([\d.]+) GB", text, "README")
    assert _same(m[1], fwd[0] / 1000), (m[1], fwd)
    # The default run's final report (make train): test sacreBLEU with beam 4.
    bleu = float(_stated(r"test sacreBLEU ([\d.]+) with beam 4", notes, "BUILD_NOTES.md")[1])
    m = _stated(r"prints held-out sacreBLEU \(~(\d+)\)", text, "README")
    assert int(m[1]) == round(bleu), (m[1], bleu)
    # The base model's parameter count.
    count = int(
        _stated(r"\| `base\(\)` \| ([\d,]+) \|", notes, "BUILD_NOTES.md")[1].replace(",", "")
    )
    m = _stated(r"the paper's base model \(([\d.]+)M params\)", text, "README")
    assert _same(m[1], count / 1e6), (m[1], count)
    # Where `implementation=None` switches to blockwise on CPU.
    (threshold,) = set(re.findall(r"T·S > ([\d,]+)", notes))
    assert set(re.findall(r"T·S > ([\d,]+)", text)) == {threshold}
