"""Generating text with a language-model workdir: the library (decode.generator.Generator)
and the CLI (experiments/generate.py, attention-jax generate), including their bad inputs.

The workdir is built here without the train loop: a tiny TransformerLM initialised at random,
a small SentencePiece vocabulary, config.json and one checkpoint in the layout
train/loop.py writes (state with "params", meta with the model signature and vocabulary)."""

import functools
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attention_jax.data import toy_translation
from attention_jax.data.tokenizer import EOS_ID, Tokenizer
from attention_jax.decode.generator import Generator
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.model import Transformer, TransformerLM
from attention_jax.workdir import save_config
from attention_jax.workdir.checkpoint import Checkpointer
from attention_jax.workdir.experiment import model_config_dict, model_signature

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 200
MAX_LEN = 24
PROMPTS = ["the small dog", "a red car sees the", "", "dog"]


def _build(path: pathlib.Path, *, lm: bool = True) -> pathlib.Path:
    """A workdir as train/loop.py leaves it (config.json, vocab.model, checkpoints/1)."""
    path.mkdir()
    english = [pair[0] for pair in toy_translation.load_split("train", sizes=(1500, 0, 0))]
    tokenizer = Tokenizer.train(english, VOCAB)
    tokenizer.save(path / "vocab.model")
    cfg = TransformerConfig.tiny(vocab_size=VOCAB, max_len=MAX_LEN, dropout_rate=0.0)
    config = ml_collections.ConfigDict(
        {
            "model": model_config_dict(**{k: getattr(cfg, k) for k in ("vocab_size", "d_model",
                                          "num_heads", "num_layers", "d_ff", "max_len",
                                          "dropout_rate")}),
            "data": {"dataset": "toy_lm", "task": "lm"} if lm else {"dataset": "toy_translation"},
            "seed": 0,
        }
    )  # fmt: skip
    save_config(config, str(path))
    tokens = jnp.zeros((1, 8), jnp.int32)
    model = TransformerLM(cfg) if lm else Transformer(cfg)
    args = (tokens,) if lm else (tokens, tokens)
    params = nn.unbox(model.init(jax.random.key(1), *args)["params"])
    # Larger random weights: a peaked distribution, so that greedy is not a near-tie.
    params = jax.tree.map(lambda x: x * 3.0, params)
    meta = {
        "model": model_signature(cfg),
        "dataset": config.data.dataset,
        "vocab_fingerprint": tokenizer.fingerprint,
        "vocab_size": VOCAB,
    }
    ckpt = Checkpointer(str(path), data_state=False)
    ckpt.save(1, {"params": params, "step": jnp.int32(1)}, meta, force=True)
    ckpt.close()
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("gen") / "lm")


@pytest.fixture(scope="module")
def generator(workdir):
    return Generator.from_workdir(str(workdir))


def _cli(*args, stdin=None, script="generate.py"):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), *args],
        capture_output=True, input=stdin, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip


def _snapshot(workdir) -> dict:
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


@functools.cache
def _forward(model):
    """The whole model's logits, jitted: one compilation per sequence length (op-by-op
    dispatch recompiled every primitive at every new length: minutes on 2 cores)."""
    return jax.jit(lambda params, ids: model.apply({"params": params}, ids))


def _greedy_by_full_recompute(generator, prompt: str, new: int) -> list[int]:
    """Independent of the KV cache and the search: the whole model on [bos, prompt, so far]
    at every step, argmax of the last position (the pad id excluded)."""
    model, params = generator.model, generator.params
    seq = [model.config.pad_id, *generator.tokenizer.encode(prompt).tolist()]
    out = []
    for _ in range(new):
        logits = np.asarray(_forward(model)(params, jnp.asarray([seq])))[0, -1].copy()
        logits[model.config.pad_id] = -np.inf
        token = int(np.argmax(logits))
        out.append(token)
        if token == EOS_ID:
            break
        seq.append(token)
    return out


def test_greedy_equals_full_recompute_and_batching_does_not_matter(generator):
    tok = generator.tokenizer
    batched = generator.generate(PROMPTS, max_new_tokens=8, temperature=0.0, batch_size=8)
    for prompt, line in zip(PROMPTS, batched, strict=True):
        ids = _greedy_by_full_recompute(generator, prompt, 8)
        assert len(ids) >= 4  # the test sees real continuations, not an immediate EOS
        expected = tok.decode(np.concatenate([tok.encode(prompt), ids]).astype(np.int32))
        assert " ".join(line.split()) == " ".join(expected.split())
        assert line.startswith(prompt)
        alone = generator.generate([prompt], max_new_tokens=8, temperature=0.0, batch_size=1)
        assert alone == [line]


def test_sampling_is_seeded_per_prompt_and_sample(generator):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, num_samples=3)
    a = generator.generate(PROMPTS, seed=5, batch_size=16, **kw)
    assert len(a) == len(PROMPTS) * 3
    assert a == generator.generate(PROMPTS, seed=5, batch_size=2, **kw)  # any batching
    assert a != generator.generate(PROMPTS, seed=6, batch_size=16, **kw)
    assert len(set(a[:3])) > 1  # the samples of one prompt differ
    # The prompt's number picks its keys: prompt 2 alone, numbered 2, gives the same lines.
    # (batch_size=16 here and below: the shape compiled above; batching is checked above.)
    assert a[3:6] == generator.generate([PROMPTS[1]], seed=5, first_line=2, batch_size=16, **kw)
    # top_k=1 leaves one token to draw: greedy, whatever the temperature and seed.
    greedy = generator.generate(PROMPTS, max_new_tokens=10, temperature=0.0, batch_size=16)
    assert (
        generator.generate(PROMPTS, max_new_tokens=10, temperature=2.0, top_k=1, batch_size=16)
        == greedy
    )


def test_library_refuses_bad_arguments(generator):
    for kw, match in [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive int, got 0"),
        (dict(max_new_tokens=MAX_LEN + 1), f"at most the model's max_len={MAX_LEN}"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(num_samples=0), "num_samples must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=match):
            generator.generate(["dog"], **{"max_new_tokens": 4, **kw})
    with pytest.raises(ValueError, match=f"prompt 1 has .* tokens, more than .*max_len={MAX_LEN}"):
        generator.generate(["the dog " * 20], max_new_tokens=4)
    # The limit itself: a prompt of exactly max_len - max_new_tokens tokens is generated.
    prompt = "the dog sees a car"
    room = MAX_LEN - len(generator.tokenizer.encode(prompt))
    assert generator.generate([prompt], max_new_tokens=room, temperature=0.0)[0].startswith(prompt)
    with pytest.raises(ValueError, match="prompt 1 has"):
        generator.generate([prompt], max_new_tokens=room + 1)


def test_cli_prompt_stdin_input_and_output(workdir, generator, tmp_path):
    greedy = generator.generate(PROMPTS, max_new_tokens=6, temperature=0.0)
    common = [f"--workdir={workdir}", "--max_new_tokens=6", "--temperature=0"]
    r = _cli(*common, *(f"--prompt={p}" for p in PROMPTS))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == greedy
    # stdin: a BOM, CRLF endings, a lone CR inside a line (a space), a last line without \n
    text = "\ufeff" + "the small dog\r\na red car\rsees the\n\ndog"
    r = _cli(*common, "--batch_size=3", stdin=text.encode())
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == greedy
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_bytes(text.encode())
    r = _cli(*common, f"--input={src}", f"--output={out}", "--num_samples=2")
    assert r.returncode == 0, r.stderr
    assert out.read_text().splitlines() == [g for g in greedy for _ in range(2)]
    r = subprocess.run(
        [sys.executable, "-m", "attention_jax", "generate", *common, "--prompt=dog"],
        capture_output=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [greedy[3]]


def test_cli_bad_inputs_one_line_nothing_touched(workdir, tmp_path):
    before = _snapshot(workdir)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    for name in ("config.json", "vocab.model"):
        shutil.copy(workdir / name, no_ckpt / name)
    translation = _build(tmp_path / "translation", lm=False)
    translation_before = _snapshot(translation)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    cases = [
        ([f"--workdir={empty_dir}", "--prompt=dog"], b"", "config.json does not exist"),
        ([f"--workdir={no_ckpt}", "--prompt=dog"], b"", "holds no checkpoint"),
        ([f"--workdir={translation}", "--prompt=dog"], b"", "not a language model"),
        ([f"--workdir={workdir}", "--max_new_tokens=4", "--prompt=" + "dog " * 30], b"",
         "prompt 1 has"),
        ([f"--workdir={workdir}", "--max_new_tokens=0", "--prompt=dog"], b"",
         "--max_new_tokens must be a positive int, got 0"),
        ([f"--workdir={workdir}", f"--input={latin1}"], b"", "line 1: not valid UTF-8"),
        ([f"--workdir={workdir}"], b"dog\n\xff\n", "(stdin), line 2: not valid UTF-8"),
        ([f"--workdir={workdir}"], b"", "holds no prompts"),
        ([f"--workdir={workdir}", "--prompt=dog", f"--input={latin1}"], b"",
         "--prompt or --input"),
    ]  # fmt: skip
    for args, stdin, message in cases:
        r = _cli(*args, stdin=stdin)
        err = r.stderr.decode()
        assert r.returncode == 1, (args, err)
        assert err.count("\n") == 1 and message in err and "error:" in err, (args, err)
    assert _snapshot(workdir) == before
    assert _snapshot(translation) == translation_before
    assert os.listdir(empty_dir) == [] and sorted(os.listdir(no_ckpt)) == [
        "config.json",
        "vocab.model",
    ]


def test_cli_ctrl_c_is_one_line_and_130(workdir):
    cmd = [sys.executable, str(ROOT / "experiments" / "generate.py"), f"--workdir={workdir}",
           "--max_new_tokens=4", "--batch_size=1", *(["--prompt=dog"] * 2000)]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}) as p:  # fmt: skip
        p.stdout.readline()  # generating
        p.send_signal(signal.SIGINT)
        p.stdout.read()
        err = p.stderr.read().decode()
        assert p.wait(timeout=300) == 130, err
    assert err == "generate.py: interrupted\n"


def test_cli_broken_pipe_exits_quietly(workdir):
    """`generate ... | head -1`: the reader goes away; exit 141, nothing on stderr."""
    cmd = [sys.executable, str(ROOT / "experiments" / "generate.py"), f"--workdir={workdir}",
           "--max_new_tokens=4", "--batch_size=1", *(["--prompt=dog"] * 200)]  # fmt: skip
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}) as p:  # fmt: skip
        p.stdout.readline()
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(timeout=300) == 141, err
    assert err == ""
