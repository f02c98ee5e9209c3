"""Training on a translation corpus end to end: vocabulary in the workdir, packed grain
batches, BLEU, exact resume of the data stream, and the workdir's consistency checks."""

import importlib.util
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from shared_fixtures import build_once
from test_train_loop import _final_params, _losses

from attention_jax.data.sources import DatasetNotPreparedError
from attention_jax.data.tokenizer import Tokenizer
from attention_jax.train import loop as train_loop

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(steps, **overrides):
    spec = importlib.util.spec_from_file_location(
        "default_config", ROOT / "experiments" / "configs" / "default.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.update(vocab_size=300, d_model=32, num_heads=4, d_ff=64)
    config.data.update(
        corpus_sizes=(2000, 64, 64), tokens_per_batch=640, eval_examples=32, eval_batch_size=16
    )
    config.update(num_train_steps=steps, log_every=1, eval_every=1000, checkpoint_every=3)
    config.update(overrides)
    return config


def _three_steps(tmp_path_factory, tmp_path) -> pathlib.Path:
    """A copy (tmp_path/'w', the test's to change) of a 3-step run of _config(3), trained
    once per session whichever xdist worker asks first (shared_fixtures.build_once)."""

    def train(path):
        train_loop.train_and_evaluate(_config(3), str(path))

    copy = tmp_path / "w"
    shutil.copytree(build_once(tmp_path_factory, "translation_run_3_steps", train), copy)
    return copy


def test_translation_run_writes_vocab_and_scores_bleu(tmp_path):
    final = train_loop.train_and_evaluate(_config(4), str(tmp_path))
    assert {"loss", "accuracy", "exact_match", "bleu", "chrf"} <= set(final)
    assert 0 <= final["bleu"] <= 100 and np.isfinite(final["loss"])
    tokenizer = Tokenizer.load(tmp_path / "vocab.model")
    assert tokenizer.vocab_size == 300
    meta = json.loads(next((tmp_path / "checkpoints" / "4" / "meta").glob("*")).read_text())
    assert meta["vocab_fingerprint"] == tokenizer.fingerprint
    assert list((tmp_path / "checkpoints" / "4" / "data").iterdir())  # grain's state
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    padding = [r["target_padding"] for r in records if "target_padding" in r]
    assert len(padding) == 4 and all(0 <= p < 0.3 for p in padding)  # packed rows are full


def test_resume_continues_the_exact_data_stream(tmp_path_factory, tmp_path):
    """6 steps straight == 3 steps, stop, restart to 6: the grain iterator's state in the
    checkpoint makes the restarted run read exactly the batches the straight run read."""
    straight = str(tmp_path / "straight")
    train_loop.train_and_evaluate(_config(6), straight)
    resumed = str(_three_steps(tmp_path_factory, tmp_path))  # stopped after step 3
    train_loop.train_and_evaluate(_config(6), resumed)
    assert _losses(resumed) == _losses(straight)
    a, b = _final_params(straight, 6), _final_params(resumed, 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_a_different_vocabulary_in_the_workdir_is_refused(tmp_path_factory, tmp_path):
    work = _three_steps(tmp_path_factory, tmp_path)  # a finished 3-step run's workdir
    other = Tokenizer.train(
        (f"word{i} other{i % 7}" for i in range(3000)), 300
    )  # a vocabulary of other text
    other.save(work / "vocab.model")
    before = sorted(p.name for p in (work / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="trained with vocabulary"):
        train_loop.train_and_evaluate(_config(6), str(work))
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before
    assert Tokenizer.load(work / "vocab.model") == other  # not overwritten


def test_a_missing_vocabulary_is_reported_not_retrained(tmp_path_factory, tmp_path):
    work = _three_steps(tmp_path_factory, tmp_path)  # a finished 3-step run's workdir
    (work / "vocab.model").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.model is missing"):
        train_loop.train_and_evaluate(_config(6), str(work))
    assert not (work / "vocab.model").exists()


def test_an_unprepared_dataset_names_the_command(tmp_path):
    config = _config(2)
    config.data.update(dataset="my_corpus", data_dir=str(tmp_path / "data"))
    with pytest.raises(
        DatasetNotPreparedError, match=r"attention_jax prepare --dataset=local --name=my_corpus "
    ):
        train_loop.train_and_evaluate(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()  # refused before the workdir is made
