"""The language-model workflow end to end, through the command-line entry points: prepare a
tiny text corpus (``prepare_data --dataset=local_text``), train a few steps of a tiny model,
evaluate it (loss, perplexity, bits per byte), generate from prompts.

The commands run in-process (their absl ``main``, flags parsed as the command parses them,
failures reported by ``errors.guarded`` as the command reports them): a subprocess would
spend most of its time importing JAX and TFDS. README's LM commands run as subprocesses in
tests/test_readme.py. The prepared corpus and the trained workdir are built once per session
(`lm_workflow`, also used by tests/test_lm_evaluate.py)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import pathlib
import sys
import warnings

import pytest
from absl import flags
from shared_fixtures import build_once

from attention_jax.cli import errors
from attention_jax.data import toy_translation

FLAGS = flags.FLAGS
NAME = "tiny_text"  # the prepared corpus
VOCAB = 64  # pieces: the toy English has ~30 characters
STEPS = 3
# lm.py made tiny: 1 layer, d_model 32, rows of 32 tokens, 8 rows a step (one per fake
# device), periodic evaluation at the last step (metrics.jsonl's eval_* are the final
# report's numbers: the corpus has no test split).
TRAIN_OVERRIDES = (
    f"--config.num_train_steps={STEPS}", "--config.model.num_layers=1",
    "--config.model.d_model=32", "--config.model.num_heads=4", "--config.model.d_ff=64",
    "--config.model.max_len=32", "--config.data.max_length=32",
    "--config.data.tokens_per_batch=256", "--config.data.eval_batch_size=8",
    f"--config.eval_every={STEPS}", f"--config.checkpoint_every={STEPS}",
    "--config.log_every=1", "--config.warmup_steps=10",
)  # fmt: skip
PROMPTS = ("the small dog", "a red")


@contextlib.contextmanager
def _command(name: str):
    """attention_jax.cli.<name> imported afresh, its absl flags removed again afterwards (the
    commands define flags of the same names; tests/test_bad_inputs.py does the same)."""
    before = set(FLAGS)
    module = importlib.import_module(f"attention_jax.cli.{name}")
    ours = set(FLAGS) - before  # not those of libraries it loads later (grain's): they stay
    try:
        yield module
    finally:
        FLAGS.unparse_flags()
        for flag in set(FLAGS) - before:  # also the --config.* flags config_flags adds
            if flag in ours or flag.startswith("config."):
                delattr(FLAGS, flag)
        for loaded in [m for m in sys.modules if m.startswith("attention_jax.cli.")]:
            if loaded != "attention_jax.cli.errors":
                del sys.modules[loaded]


def run_command(name: str, *args: str) -> int:
    """``<name>.py ARGS`` as the command runs it, in this process: its flags parsed (train's
    config overrides too), its main wrapped by `errors.guarded` (a failure is one
    ``NAME.py: error: ...`` line on stderr). Returns the exit status."""
    argv = [f"{name}.py", *args]
    saved = sys.argv
    sys.argv = argv  # config_flags reads the overrides from sys.argv
    try:
        with _command(name) as module:
            parse = getattr(module, "parse_flags", FLAGS)
            errors.guarded(module.main, argv[0])(parse(argv))
    except SystemExit as e:
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)  # sys.exit(message): Python prints it, status 1
        return 1
    finally:
        sys.argv = saved
    return 0


def captured(name: str, *args: str) -> tuple[int, str, str]:
    """`run_command` with its stdout and stderr (Python's; the builder's commands print)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_command(name, *args)
    return code, out.getvalue(), err.getvalue()


def _corpus(split: str, count: int) -> list[str]:
    sizes = {"train": (count, 0, 0), "validation": (0, count, 0)}[split]
    return [english for english, _ in toy_translation.load_split(split, sizes=sizes)]


def build_workflow(root: pathlib.Path) -> None:
    """train.txt (400 sentences), dev.txt (24), the corpus prepared under root/data, the
    workdir root/lm trained; each command's (status, stdout, stderr) in root/runs.json."""
    root.mkdir()
    (root / "train.txt").write_text("".join(s + "\n" for s in _corpus("train", 400)))
    (root / "dev.txt").write_text("".join(s + "\n" for s in _corpus("validation", 24)))
    runs = {}
    runs["prepare"] = captured(
        "prepare_data", "--dataset=local_text", f"--name={NAME}", f"--train={root / 'train.txt'}",
        f"--validation={root / 'dev.txt'}", f"--vocab_size={VOCAB}", f"--data_dir={root / 'data'}",
    )  # fmt: skip
    if runs["prepare"][0] == 0:
        with warnings.catch_warnings():  # config_flags loads the config with importlib's
            warnings.filterwarnings(  # deprecated load_module()
                "ignore", "the load_module\\(\\) method is deprecated", DeprecationWarning
            )
            runs["train"] = captured(
                "train", "--config=lm", f"--workdir={root / 'lm'}",
                f"--config.data.dataset={NAME}", f"--config.data.data_dir={root / 'data'}",
                *TRAIN_OVERRIDES,
            )  # fmt: skip
    (root / "runs.json").write_text(json.dumps(runs))


@pytest.fixture(scope="session")
def lm_workflow(tmp_path_factory) -> pathlib.Path:
    """The folder `build_workflow` made: train.txt, dev.txt, data/, lm/ (the workdir),
    runs.json."""
    return build_once(tmp_path_factory, "lm_workflow", build_workflow)


def runs(root: pathlib.Path) -> dict:
    return json.loads((root / "runs.json").read_text())


def eval_records(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl's periodic-evaluation records."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "eval_loss" in r]


def scores(stdout: str) -> tuple[dict, dict]:
    """evaluate's output on a language model: the header's ``key: value`` fields and the
    ``NAME VALUE  (what it is)`` metric lines, as numbers."""
    header, *lines = stdout.splitlines()
    fields = dict(field.split(": ", 1) for field in header.split("  "))
    metrics = {line.split()[0]: float(line.split()[1]) for line in lines}
    return fields, metrics


def test_prepare_train_evaluate_generate(lm_workflow, capfd):
    done = runs(lm_workflow)
    code, out, err = done["prepare"]
    assert code == 0, err
    assert NAME in out and "train 400, validation 24" in out, out
    assert f"{VOCAB} pieces" in out, out
    code, out, err = done["train"]
    assert code == 0, err
    # No test split: the final report is the last validation.
    assert f"final validation metrics (no test split in {NAME})" in out, out
    workdir = lm_workflow / "lm"
    [last] = [r for r in eval_records(workdir) if r["step"] == STEPS]

    assert run_command("evaluate", f"--workdir={workdir}") == 0
    out, err = capfd.readouterr()
    assert err == "", err
    fields, got = scores(out)
    assert fields["examples"] == "24" and fields["split"] == "validation"
    assert fields["checkpoints"] == f"[{STEPS}]"
    assert list(got) == ["loss", "perplexity", "bits_per_byte"]
    assert all(math.isfinite(v) for v in got.values()), got
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=2e-6)  # 6 decimals
    assert got["bits_per_byte"] > 0
    tokens, num_bytes = int(fields["tokens"]), int(fields["bytes"])
    # The bytes are the text's: each sentence's UTF-8 bytes and its newline.
    assert num_bytes == len((lm_workflow / "dev.txt").read_bytes())
    assert got["bits_per_byte"] == pytest.approx(
        got["loss"] * tokens / math.log(2) / num_bytes, rel=2e-6
    )
    # The training run's final report (8 fake devices there, one here: float32 sums in
    # another order).
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert got[key] == pytest.approx(last[f"eval_{key}"], rel=1e-5), key

    args = [f"--prompt={p}" for p in PROMPTS]
    assert run_command("generate", f"--workdir={workdir}", *args, "--max_new_tokens=5",
                       "--temperature=0") == 0  # fmt: skip
    out, err = capfd.readouterr()
    assert err == "", err
    lines = out.splitlines()
    assert len(lines) == len(PROMPTS), out
    for line, prompt in zip(lines, PROMPTS, strict=True):
        assert line.startswith(prompt), (line, prompt)
