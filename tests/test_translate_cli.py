"""Translating and scoring a trained workdir: the library (inference.Translator) and the
CLIs (experiments/translate.py, evaluate.py), including their bad inputs."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from shared_fixtures import build_once
from test_translation_run import _config

from attention_jax.data.tasks import load_eval_pairs
from attention_jax.data.tokenizer import Tokenizer
from attention_jax.decode import decoding, metrics
from attention_jax.decode.translator import Translator
from attention_jax.train import loop as train_loop
from attention_jax.workdir import load_config
from attention_jax.workdir.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Both modules read the trained workdir of `trained_workdir`, built once per session
# (shared_fixtures.build_once; the xdist_group mark only documents the sharing).
pytestmark = pytest.mark.xdist_group("translate_workdir")


def trained_workdir(tmp_path_factory) -> pathlib.Path:
    """A short run of the built-in corpus: small enough for the suite, long enough to learn.
    Trained once per test session, whichever xdist worker asks first
    (tests/shared_fixtures.py), and shared with test_cli_fuzz.py; tests that damage or edit
    it work on a copy."""

    def train(path):
        config = _config(300, checkpoint_every=100, keep_checkpoints=3, log_every=100)
        config.model.update(d_model=64, d_ff=128)
        config.data.update(tokens_per_batch=1280)
        config.update(warmup_steps=200)  # ~1 min here: test BLEU ~28 (beam 4), untrained 0
        train_loop.train_and_evaluate(config, str(path))

    return build_once(tmp_path_factory, "translate_cli_trained", train)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


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


# ---- Damaged checkpoints, a config.json that does not match, long and blank lines. ----


def _snapshot(workdir) -> dict:
    """Every path under `workdir`, files with their bytes' sha256 and mtime."""
    tree = {}
    for root, dirs, files in os.walk(workdir):
        for name in dirs + files:
            path = os.path.join(root, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    tree[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
            else:
                tree[path] = "dir"
    return tree


def _truncate_arrays(step_dir: pathlib.Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


def test_a_damaged_newest_checkpoint_falls_back_and_changes_nothing(workdir, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    _truncate_arrays(copy / "checkpoints" / "300")
    os.remove(copy / "checkpoints" / "200" / "meta" / "metadata")  # and the next one's meta
    before = _snapshot(copy)
    said = []
    translator = Translator.from_workdir(str(copy), log=said.append)
    assert translator.steps == [100]
    assert len(said) == 2 and all("\n" not in line for line in said)
    assert "step 300" in said[0] and "arrays do not read back" in said[0]
    assert "trying step 200" in said[0] and "step 200" in said[1] and "metadata" in said[1]
    with pytest.raises(ValueError, match=r"asked for the last 2 checkpoints.*\[200, 300\] do not"):
        Translator.from_workdir(str(copy), average_last=2, log=said.append)
    assert _snapshot(copy) == before  # nothing moved aside, nothing written
    for step in ("100", "200", "300"):
        _truncate_arrays(copy / "checkpoints" / step)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .* reads back whole"):
        Translator.from_workdir(str(copy), log=said.append)


def test_averaging_skips_a_damaged_checkpoint(workdir, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    _truncate_arrays(copy / "checkpoints" / "200")
    said = []
    assert Translator.from_workdir(str(copy), average_last=2, log=said.append).steps == [100, 300]
    assert len(said) == 1 and "step 200" in said[0]


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda m: m.pop("d_model"), "d_model: config.json has none (default 512), checkpoint 64"),
        (lambda m: m.update(num_layers=1), "num_layers: config.json 1, checkpoint"),
        (lambda m: m.update(d_ff=64), "d_ff: config.json 64, checkpoint 128"),
    ],
    ids=["field-missing", "field-differs", "shape-field-differs"],
)
def test_a_config_json_that_does_not_match_the_checkpoint_is_refused(
    workdir, tmp_path, edit, named
):
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config["model"])
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(named)):
        Translator.from_workdir(str(copy))


def test_blank_lines_skip_the_model_and_long_lines_follow_the_policy(workdir, monkeypatch):
    translator = Translator.from_workdir(str(workdir))
    limit = translator.model.config.max_len
    long = " ".join(["the dog"] * limit) + " ."
    rows = []
    real = decoding.translate

    def counting(model, params, inputs, **kwargs):
        rows.append(np.asarray(inputs))
        return real(model, params, inputs, **kwargs)

    monkeypatch.setattr(decoding, "translate", counting)
    heard = []
    sentences = ["", "the dog sees a cat .", " \t ", long, "a red car ."]
    out = translator.translate(
        sentences, batch_size=4, too_long="truncate", first_line=11,
        on_too_long=lambda *a: heard.append(a),
    )  # fmt: skip
    assert len(out) == 5 and out[0] == out[2] == "" and out[1] and out[3] and out[4]
    assert heard == [(14, len(translator.tokenizer.encode(long)) + 1)]
    (batch,) = rows  # one batch: the 3 sentences with words
    assert (batch[:3, 0] != 0).all() and (batch[3:] == 0).all()
    assert batch.shape[1] == limit and batch[1, limit - 1] == 1  # truncated, ends with EOS
    skipped = translator.translate(sentences, batch_size=4, too_long="skip")
    assert skipped[3] == "" and skipped[1] == out[1]
    with pytest.raises(ValueError, match=r"line 4 has \d+ tokens .* more than the model's max_len"):
        translator.translate(sentences, batch_size=4)  # the library's default: an error


def test_a_checkpoint_without_a_signature_is_still_checked_array_by_array(workdir, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    for meta in (copy / "checkpoints").glob("*/meta/metadata"):
        fields = json.loads(meta.read_text())
        del fields["model"]  # as written before checkpoints had one
        meta.write_text(json.dumps(fields))
    config = json.loads((copy / "config.json").read_text())
    config["model"]["d_ff"] = 96
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"config.json does not describe the model of the checkpoint of step 300: .*"
        r"checkpoint float32\[64, 128\], model float32\[64, 96\]",
    ):
        Translator.from_workdir(str(copy))


def test_a_checkpoint_deleted_while_read_is_said_so(workdir, tmp_path, monkeypatch):
    """Evaluating while training runs: the run deletes its oldest checkpoints as it saves."""
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    real = Checkpointer.restore_on_one_device

    def deleted_meanwhile(self, step):
        if step == 300:
            shutil.rmtree(os.path.join(self.directory, "300"))
        return real(self, step)

    monkeypatch.setattr(Checkpointer, "restore_on_one_device", deleted_meanwhile)
    said = []
    assert Translator.from_workdir(str(copy), log=said.append).steps == [200]
    assert len(said) == 1 and "step 300" in said[0] and "was deleted while being read" in said[0]
