"""Translating and scoring a trained workdir: the library (inference.Translator) and the
CLIs (experiments/translate.py, evaluate.py), including their bad inputs."""

import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_translation_run import _config

from attention_jax import metrics, train_loop
from attention_jax.data.tasks import load_eval_pairs
from attention_jax.data.tokenizer import Tokenizer
from attention_jax.inference import Translator, load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A short run of the built-in corpus: small enough for the suite, long enough to learn."""
    path = tmp_path_factory.mktemp("trained")
    config = _config(300, checkpoint_every=100, keep_checkpoints=3, log_every=100)
    config.model.update(d_model=64, d_ff=128)
    config.data.update(tokens_per_batch=1280)
    config.update(warmup_steps=200)  # ~1 min here: test BLEU ~28 (beam 4), untrained 0
    train_loop.train_and_evaluate(config, str(path))
    return path


def _cli(script, *args, stdin=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True, text=True, input=stdin, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def test_trained_scores_far_above_untrained(workdir):
    sources, references = load_eval_pairs(load_config(str(workdir)), "test")
    sources, references = sources[:32], references[:32]
    trained = Translator.from_workdir(str(workdir))
    untrained = Translator(
        trained.model,
        jax.tree.map(lambda x: x * 0.0 + np.random.default_rng(0).normal() * 0.02, trained.params),
        trained.tokenizer,
        [0],
    )
    good = metrics.bleu(trained.translate(sources, batch_size=32), references)[0]
    bad = metrics.bleu(untrained.translate(sources, batch_size=32), references)[0]
    assert good > bad + 15, (good, bad)


def test_greedy_and_checkpoint_averaging(workdir):
    sources, _ = load_eval_pairs(load_config(str(workdir)), "test")
    translator = Translator.from_workdir(str(workdir))
    greedy = translator.translate(sources[:8], beam_size=1, batch_size=8)
    assert len(greedy) == 8 and all(isinstance(s, str) for s in greedy)
    averaged = Translator.from_workdir(str(workdir), average_last=3)
    assert averaged.steps == [100, 200, 300]
    assert len(averaged.translate(sources[:4], batch_size=4)) == 4


def test_translate_cli_file_and_stdin(workdir, tmp_path):
    sources, _ = load_eval_pairs(load_config(str(workdir)), "test")
    (tmp_path / "in.txt").write_text("\n".join(sources[:5]) + "\n")
    r = _cli("translate.py", f"--workdir={workdir}", f"--input={tmp_path / 'in.txt'}",
             f"--output={tmp_path / 'out.txt'}", "--batch_size=8")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert len(lines) == 5
    r = _cli("translate.py", f"--workdir={workdir}", "--batch_size=8", stdin=sources[0] + "\n")
    assert r.returncode == 0 and r.stdout.splitlines() == lines[:1]


def test_evaluate_cli_prints_bleu_with_signature(workdir, tmp_path):
    sources, references = load_eval_pairs(load_config(str(workdir)), "test")
    (tmp_path / "src").write_text("\n".join(sources[:6]) + "\n")
    (tmp_path / "ref").write_text("\n".join(references[:6]) + "\n")
    r = _cli("evaluate.py", f"--workdir={workdir}", f"--source={tmp_path / 'src'}",
             f"--reference={tmp_path / 'ref'}", "--batch_size=8")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BLEU" in r.stdout and "nrefs:1|case:mixed|eff:no|tok:13a" in r.stdout
    assert "chrF" in r.stdout


def test_bad_inputs(workdir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    r = _cli("translate.py", f"--workdir={workdir}", f"--input={empty}")
    assert r.returncode != 0 and "holds no sentences" in r.stderr
    r = _cli("translate.py", f"--workdir={tmp_path / 'nowhere'}", "--input=-", stdin="a .\n")
    assert r.returncode != 0 and "config.json does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["the dog"] * 100) + " .\n")
    r = _cli("translate.py", f"--workdir={workdir}", f"--input={long}")
    assert r.returncode != 0 and "more than the model's max_len" in r.stderr

    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    for name in ("config.json", "vocab.model"):
        shutil.copy(workdir / name, no_ckpt / name)
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        Translator.from_workdir(str(no_ckpt))

    other = tmp_path / "other_vocab"
    shutil.copytree(workdir, other)
    Tokenizer.train((f"w{i} v{i % 5} ." for i in range(2000)), 300).save(other / "vocab.model")
    with pytest.raises(ValueError, match="is not the vocabulary the checkpoints were trained"):
        Translator.from_workdir(str(other))
