"""experiments/prepare_data.py end to end, in subprocesses: a local corpus and the built-in
toy corpus are prepared, read back and given a vocabulary; bad flags and files give one
clean line and a non-zero exit, without a traceback."""

import os
import pathlib
import subprocess
import sys

import pytest

from attention_jax.data import sources, toy_translation
from attention_jax.data.tokenizer import Tokenizer, default_vocab_path

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "prepare_data.py"), *args],
        cwd=cwd,  # not the repository root: the script must find attention_jax itself
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )


def _assert_clean_failure(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def corpus_files(tmp_path):
    pairs = toy_translation.load_split("train", sizes=(300, 0, 0))
    (tmp_path / "a.en").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (tmp_path / "a.de").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return pairs


def test_local_corpus(tmp_path, corpus_files):
    args = ["--dataset=local", "--name=mycorp", "--train=a.en,a.de", "--data_dir=data"]
    result = _cli(*args, "--vocab_size=100", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train = sources.load_source("mycorp", "train", data_dir=tmp_path / "data")
    assert len(train) == 300
    assert train[7] == {"source": corpus_files[7][0], "target": corpus_files[7][1]}
    vocab = default_vocab_path(tmp_path / "data", "mycorp", 100)
    tokenizer = Tokenizer.load(vocab)
    assert tokenizer.vocab_size == 100
    assert tokenizer.decode(tokenizer.encode(train[7]["target"])) == train[7]["target"]
    assert str(vocab) in result.stdout and tokenizer.fingerprint in result.stdout
    assert "Traceback" not in result.stderr

    # Prepared already: refused without --overwrite, replaced with it.
    _assert_clean_failure(_cli(*args, "--vocab_size=100", cwd=tmp_path), "--overwrite")
    result = _cli(*args, "--vocab_size=120", "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Tokenizer.load(default_vocab_path(tmp_path / "data", "mycorp", 120)).vocab_size == 120


def test_missing_file_is_one_clean_line(tmp_path, corpus_files):
    result = _cli(
        "--dataset=local", "--name=mycorp", "--train=a.en,missing.de", "--data_dir=data",
        cwd=tmp_path,
    )  # fmt: skip
    _assert_clean_failure(result, "missing.de", "does not exist")
    assert not (tmp_path / "data" / "mycorp").exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dataset=local", "--train=a.en,a.de"], "--name"),
        (["--dataset=local", "--name=mycorp", "--train=a.en,a.de,a.fr"], "SOURCE_FILE"),
        (["--dataset=toy_translation", "--train=a.en,a.de"], "--train"),
        (["--dataset=local_text", "--name=mytext", "--train=a.en"], "--validation=FILE"),
        (["--dataset=lm1b", "--paragraphs"], "--paragraphs only goes with"),
        (["--dataset=local", "--name=Bad-Name", "--train=a.en,a.de"], "lower_snake_case"),
        (["--dataset=local", "--name=mycorp", "--train=a.en,a.de", "--vocab_size=9999"],
         "at most"),
    ],
)  # fmt: skip
def test_bad_flags(tmp_path, corpus_files, args, needle):
    _assert_clean_failure(_cli(*args, "--data_dir=data", cwd=tmp_path), needle)


@pytest.mark.slow
def test_toy_translation(tmp_path):
    result = _cli("--dataset=toy_translation", f"--data_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sizes = toy_translation.DEFAULT_SIZES
    for split, size in zip(toy_translation.SPLITS, sizes, strict=True):
        assert len(sources.load_source("toy_translation", split, data_dir=tmp_path)) == size
    vocab = default_vocab_path(tmp_path, "toy_translation", 1000)
    tokenizer = Tokenizer.load(vocab)
    assert tokenizer.vocab_size == 1000 and str(vocab) in result.stdout

    # Run again: the dataset and the vocabulary are reused, not rebuilt.
    mtime = vocab.stat().st_mtime_ns
    result = _cli("--dataset=toy_translation", f"--data_dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reusing" in result.stdout and "kept" in result.stdout
    assert vocab.stat().st_mtime_ns == mtime
