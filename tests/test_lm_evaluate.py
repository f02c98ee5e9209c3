"""``evaluate`` on a language-model workdir (attention_jax/cli/evaluate.py): the numbers
against the training run's report and an independent float64 NumPy computation, --text
files read as prepare_data reads them, and bad input.

The workdir is the one tests/test_lm_end_to_end.py trains (built once per session)."""

from __future__ import annotations

import hashlib
import math
import os
import re

import jax
import numpy as np
import pytest
from shared_fixtures import build_once
from test_lm_end_to_end import build_workflow, eval_records, run_command, scores

from attention_jax.data.tokenizer import EOS_ID, Tokenizer
from attention_jax.nn.model import TransformerLM
from attention_jax.workdir import load_config, save_config
from attention_jax.workdir.checkpoint import Checkpointer
from attention_jax.workdir.experiment import model_config


@pytest.fixture(scope="session")
def lm_workflow(tmp_path_factory):
    """tests/test_lm_end_to_end.py's prepared corpus and trained workdir (one build)."""
    return build_once(tmp_path_factory, "lm_workflow", build_workflow)


def _evaluate(capfd, *args) -> tuple[dict, dict]:
    """evaluate's header fields and metrics; it must succeed and say nothing on stderr."""
    code = run_command("evaluate", *args)
    out, err = capfd.readouterr()
    assert code == 0 and err == "", err
    return scores(out)


def test_split_and_same_text_as_a_file_equal_the_training_report(lm_workflow, capfd):
    """The validation split, then the same sentences as a --text file with a BOM, CRLF line
    ends and blank lines (dropped as prepare_data's local_text reading drops them): the
    same tokens and bytes, the same numbers, and those of the training run's final report
    (its last validation: the corpus has no test split)."""
    workdir = lm_workflow / "lm"
    split_fields, split_scores = _evaluate(capfd, f"--workdir={workdir}")
    lines = (lm_workflow / "dev.txt").read_text().splitlines()
    text = lm_workflow / "dev_crlf.txt"
    text.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(lines).encode("utf-8") + b"\r\n")
    text_fields, text_scores = _evaluate(capfd, f"--workdir={workdir}", f"--text={text}")
    assert text_fields.pop("text") == str(text) and split_fields.pop("split") == "validation"
    assert text_fields == split_fields and text_fields["examples"] == str(len(lines))
    assert text_scores == split_scores  # the same batches: the same printed digits
    last = eval_records(workdir)[-1]
    for key, value in split_scores.items():
        # 8 fake devices in training, one here: float32 sums in another order
        assert value == pytest.approx(last[f"eval_{key}"], rel=1e-5), key


def _reference(workdir, texts: list[str]) -> dict:
    """Loss, perplexity and bits per byte of `texts` computed without the evaluation
    pipeline: each text alone, its ids + EOS cut into pieces of data.max_length tokens, each
    piece in a row of its own read from the start token (pad id 0), the newest checkpoint's
    params restored directly, the model's logits taken to float64 and log-softmaxed in
    NumPy; bytes counted from the text (+ 1 per example, its newline)."""
    config = load_config(workdir)
    tokenizer = Tokenizer.load(os.path.join(workdir, "vocab.model"))
    model = TransformerLM(model_config(config))
    ckpt = Checkpointer(str(workdir), create=False)
    params = ckpt.restore_on_one_device(ckpt.latest_step())["params"]
    ckpt.close()
    size = config.data.max_length
    pieces = []
    for text in texts:
        ids = [*tokenizer.encode(text).tolist(), EOS_ID]
        pieces += [ids[start : start + size] for start in range(0, len(ids), size)]
    targets = np.zeros((len(pieces), size), np.int32)  # one row per piece, zeros after it
    for row, piece in enumerate(pieces):
        targets[row, : len(piece)] = piece
    inputs = np.concatenate([np.zeros((len(pieces), 1), np.int32), targets[:, :-1]], axis=1)
    # [P, T, V]; causal: the zeros after a piece do not change its positions' logits
    logits = np.asarray(jax.jit(model.apply)({"params": params}, inputs), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # [P, T]
    real = np.arange(size)[None] < np.asarray([len(p) for p in pieces])[:, None]
    nll, tokens = -float(picked[real].sum()), int(real.sum())
    num_bytes = sum(len(text.encode("utf-8")) + 1 for text in texts)
    return {
        "tokens": tokens,
        "bytes": num_bytes,
        "loss": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "bits_per_byte": nll / math.log(2) / num_bytes,
    }


def test_text_file_equals_float64_numpy_reference(lm_workflow, capfd):
    """Three examples: one longer than data.max_length = 32 tokens (scored in two pieces),
    one with a character the 64-piece vocabulary does not have (its bytes still count)."""
    texts = [
        "the small dog sees a red car .",
        "a king opened the green song and this rabbit that helped the big city wrote a "
        "strange dog .",
        "caf\u00e9 dog",
    ]
    path = lm_workflow / "three.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    fields, got = _evaluate(capfd, f"--workdir={lm_workflow / 'lm'}", f"--text={path}")
    want = _reference(lm_workflow / "lm", texts)
    assert want["tokens"] > 32 + 2  # the long one is cut
    assert fields["examples"] == "3"
    assert (int(fields["tokens"]), int(fields["bytes"])) == (want["tokens"], want["bytes"])
    for key in ("loss", "perplexity", "bits_per_byte"):
        # float32 model (the reference's logits are the same float32 numbers); 6 decimals
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=2e-6), key


def _snapshot(path) -> dict:
    """Every file under `path` with its content hash and modification time."""
    tree = {}
    for root, dirs, files in os.walk(path):
        for name in sorted(dirs + files):
            full = os.path.join(root, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    tree[full] = (hashlib.sha256(f.read()).hexdigest(), os.stat(full).st_mtime_ns)
            else:
                tree[full] = "dir"
    return tree


BAD = [  # (id, the flags after --workdir, a file to write (name, bytes) or None, the message)
    ("translation-flag", ["--beam_size=2"], None,
     r"--beam_size only goes with a translation workdir; \S+ holds a language model"),
    ("translation-flags", ["--source={d}/a.txt", "--reference={d}/a.txt", "--hypotheses={d}/h"],
     ("a.txt", b"a dog\n"),
     r"--source, --reference, --hypotheses only go with a translation workdir"),
    ("empty-text", ["--text={d}/empty.txt"], ("empty.txt", b""), r"--text: \S*empty.txt is empty"),
    ("blank-text", ["--text={d}/blank.txt"], ("blank.txt", b"\n \r\n\n"),
     r"--text: \S*blank.txt holds no text"),
    ("not-utf8", ["--text={d}/latin1.txt"],
     ("latin1.txt", "a dog\nGr\u00fc\u00dfe\n".encode("latin-1")),
     r"--text: \S*latin1.txt, line 2: not valid UTF-8"),
    ("nul-byte", ["--text={d}/nul.txt"], ("nul.txt", b"a\0dog\n"),
     r"--text: \S*nul.txt, line 1: a NUL byte"),
    ("missing-text", ["--text={d}/nope.txt"], None,
     r"--text: text file \S*nope.txt does not exist"),
    ("no-such-split", ["--split=test"], None,
     r"dataset 'tiny_text' has no 'test' split \(it has \['train', 'validation'\]\); choose "
     r"another --split, or give --text=FILE"),
    ("paragraphs-alone", ["--paragraphs"], None, r"--paragraphs only goes with --text=FILE"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "write", "message"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])  # fmt: skip
def test_bad_input_is_one_line_and_touches_nothing(lm_workflow, tmp_path, capfd, args, write,
                                                   message):  # fmt: skip
    if write is not None:
        (tmp_path / write[0]).write_bytes(write[1])
    workdir = lm_workflow / "lm"
    before = _snapshot(workdir)
    code = run_command("evaluate", f"--workdir={workdir}", *(a.format(d=tmp_path) for a in args))
    out, err = capfd.readouterr()
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error: "), err
    assert re.search(message, err), err
    assert _snapshot(workdir) == before
    assert not (tmp_path / "h").exists()  # --hypotheses: not written


def test_text_with_a_translation_workdir_is_refused(lm_workflow, tmp_path, capfd):
    """Only config.json is read: a translation run's (no data.task) refuses --text."""
    config = load_config(lm_workflow / "lm")
    del config.data["task"]
    config.data.dataset = "toy_translation"
    save_config(config, str(tmp_path))
    before = _snapshot(tmp_path)
    code = run_command("evaluate", f"--workdir={tmp_path}", f"--text={lm_workflow / 'dev.txt'}")
    out, err = capfd.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(
        f"evaluate.py: error: --text only goes with a language-model workdir; {tmp_path} holds "
        "a translation model"
    ), err
    assert _snapshot(tmp_path) == before
