"""End-to-end training of the decoder-only language model (configs/lm.py, the built-in
'toy_lm' corpus): metrics, exact resume, the workdir's kind, the command line."""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from attention_jax import configs
from attention_jax.configs import lm as lm_config
from attention_jax.configs import lm1b as lm1b_config
from attention_jax.data import tasks
from attention_jax.data.tokenizer import Tokenizer
from attention_jax.nn.model import TransformerLM
from attention_jax.train import flops
from attention_jax.train import loop as train_loop
from attention_jax.workdir import load_config
from attention_jax.workdir.checkpoint import Checkpointer
from attention_jax.workdir.experiment import check_experiment, model_config, model_kind

ROOT = pathlib.Path(__file__).resolve().parent.parent
SIZES = (1500, 40, 30)  # train, validation, test sentences: small, so a run takes seconds


def _tiny_config(steps, **overrides):
    config = lm_config.get_config()
    config.model.update(d_model=32, num_heads=4, num_layers=1, d_ff=64, max_len=32)
    config.model.update(vocab_size=200)
    config.data.update(corpus_sizes=SIZES, max_length=32, tokens_per_batch=256)
    config.data.update(eval_batch_size=8)
    config.update(num_train_steps=steps, warmup_steps=10, log_every=1, eval_every=1000)
    config.update(checkpoint_every=3)
    config.update(overrides)
    return config


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(workdir):
    return [(r["step"], r["train_loss"]) for r in _records(workdir) if "train_loss" in r]


def _reference_sums(workdir, split):
    """NLL (nats, float64), tokens and UTF-8 bytes of a split, computed independently of
    the evaluation pipeline: each sentence alone (unpacked; one over max_length tokens in
    pieces), its ids + EOS, its bytes + 1 (the newline), the final checkpoint's params,
    log-softmax in float64 NumPy."""
    config = load_config(workdir)
    texts = [t for t, _ in _toy_pairs(config, split)]
    tokenizer = Tokenizer.load(os.path.join(workdir, "vocab.model"))
    cfg = model_config(config)
    ckpt = Checkpointer(workdir)
    params = ckpt.restore_on_one_device(ckpt.latest_step())["params"]
    ckpt.close()
    ids = [[*tokenizer.encode(t), 1] for t in texts]  # EOS = 1
    # a longer example is cut into pieces of max_length, each read from the start token
    size = config.data.max_length
    rows = [row[i : i + size] for row in ids for i in range(0, len(row), size)]
    width = max(map(len, rows))
    targets = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        targets[i, : len(row)] = row
    inputs = np.concatenate([np.zeros((len(rows), 1), np.int32), targets[:, :-1]], axis=1)
    logits = np.asarray(TransformerLM(cfg).apply({"params": params}, inputs), np.float64)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    nll = -float(np.sum(picked * (targets != 0)))
    tokens = sum(map(len, rows))
    num_bytes = sum(len(t.encode("utf-8")) + 1 for t in texts)
    return nll, tokens, num_bytes


def _toy_pairs(config, split):
    from attention_jax.data import toy_translation

    sizes = tuple(config.data.corpus_sizes)
    return toy_translation.load_split(split, seed=config.data.corpus_seed, sizes=sizes)


def test_lm_run_reports_perplexity_and_bits_per_byte(tmp_path):
    workdir = str(tmp_path)
    final = train_loop.train_and_evaluate(_tiny_config(4, eval_every=2), workdir)
    assert set(final) == {"loss", "perplexity", "bits_per_byte", "accuracy"}
    records = _records(workdir)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert "eval_bleu" not in evals[0]
    test = [r for r in records if "test_loss" in r]
    assert [r["step"] for r in test] == [4] and test[0]["test_loss"] == final["loss"]
    saved = load_config(workdir)
    assert model_kind(saved) == "lm" and saved.data.task == "lm"
    for prefix, split in (("eval", "validation"), ("test", "test")):
        r = [r for r in records if f"{prefix}_loss" in r][-1]
        loss, ppl, bpb = (r[f"{prefix}_{k}"] for k in ("loss", "perplexity", "bits_per_byte"))
        nll, tokens, num_bytes = _reference_sums(workdir, split)
        assert ppl == pytest.approx(math.exp(loss), rel=1e-12)
        assert loss == pytest.approx(nll / tokens, rel=2e-5)  # float32 model, packed rows
        # bits per byte from the run's own loss and the split's own token and byte counts
        assert bpb == pytest.approx(loss * tokens / math.log(2) / num_bytes, rel=1e-9)
    train = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for r in train:  # no label smoothing: the training loss is the NLL
        assert r["train_perplexity"] == pytest.approx(math.exp(r["train_loss"]), rel=1e-6)
        assert 0 < r["train_bits_per_byte"] < r["train_loss"] / math.log(2)  # > 1 byte/token


def test_lm_resume_equals_uninterrupted_run(tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_loop.train_and_evaluate(_tiny_config(8), straight)
    train_loop.train_and_evaluate(_tiny_config(5), resumed)  # "stopped" at 5 (saved: 3, 5)
    train_loop.train_and_evaluate(_tiny_config(8), resumed)  # restarted, same workdir
    assert _losses(resumed) == _losses(straight)  # per-step losses, bit for bit
    ckpts = [Checkpointer(w) for w in (straight, resumed)]
    a, b = (c.restore_on_one_device(8)["params"] for c in ckpts)
    for c in ckpts:
        c.close()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_lm_and_translation_checkpoints_are_told_apart(tmp_path):
    """A workdir of one kind is refused by a run of the other, with nothing changed."""
    train_loop.train_and_evaluate(_tiny_config(1), str(tmp_path))
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    config = _tiny_config(2)
    with config.data.unlocked():
        config.data.task = "translation"
    config.data.dataset = "toy_translation"
    with pytest.raises(ValueError, match=r"checkpoint of a language model \(TransformerLM\)"):
        train_loop.train_and_evaluate(config, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_lm_flops_are_counted_with_the_lm_formula():
    cfg = model_config(_tiny_config(1))
    batch = {"targets": np.array([[5, 6, 1, 0], [7, 1, 0, 0]], np.int32)}
    got = train_loop._count(cfg, batch)
    assert got == (5, flops.lm_train_flops(cfg, tokens=5, seq_len=4))
    d, f, v = 32, 64, 200  # by hand: 1 layer of 4·D² + 2·D·F, attention over 4, the output
    assert got[1] == 5 * (6 * (4 * d * d + 2 * d * f) + 12 * d * 4 + 6 * d * v)


def test_the_lm_configs():
    for name in ("lm", "lm1b"):
        assert name in configs.names()
    config = lm_config.get_config()
    check_experiment(config)
    assert tasks.task_kind(config) == "lm" and model_kind(config) == "lm"
    big = lm1b_config.get_config()
    check_experiment(big, devices=False)
    cfg = model_config(big)
    # flax examples/lm1b: 6 layers, 512 wide, 8 heads, MLP 2048, 30000 pieces, 128 tokens
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.d_ff) == (6, 512, 8, 2048)
    assert (cfg.vocab_size, big.data.max_length, big.batch_size) == (30000, 128, 256)
    assert (big.data.dataset, big.data.eval_split, big.label_smoothing) == ("lm1b", "test", 0.0)
    bad = lm_config.get_config()
    bad.data.eval_split = "dev"
    with pytest.raises(ValueError, match=r"config.data.eval_split must be one of"):
        check_experiment(bad)


def _run(*args, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, *args], input=stdin, capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip


def test_cli_trains_the_lm_and_translate_refuses_its_workdir(tmp_path):
    work = tmp_path / "w"
    overrides = [
        "--config.num_train_steps=2", "--config.log_every=1", "--config.model.d_model=32",
        "--config.model.d_ff=64", "--config.model.num_layers=1", "--config.model.max_len=32",
        "--config.model.vocab_size=200", f"--config.data.corpus_sizes={SIZES}",
        "--config.data.max_length=32", "--config.data.tokens_per_batch=256",
    ]  # fmt: skip
    r = _run("-m", "attention_jax", "train", "--config=lm", f"--workdir={work}", *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re_search(r"final test metrics: loss \S+  perplexity \S+  bits_per_byte", r.stdout)
    listing = sorted(p.name for p in work.rglob("*"))
    r = _run(str(ROOT / "experiments" / "translate.py"), f"--workdir={work}", stdin="a cat\n")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is a language-model workdir" in lines[0], r.stderr
    assert "generate" in lines[0]
    assert sorted(p.name for p in work.rglob("*")) == listing  # nothing written


def re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None
