"""A trained workdir as a translator: its config, vocabulary and (averaged) checkpoints.

``Translator.from_workdir(workdir, average_last=5).translate(sentences)`` is what
experiments/translate.py and experiments/evaluate.py run. Nothing here writes to the
workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attention_jax import decoding
from attention_jax.checkpoint import Checkpointer, average_checkpoints
from attention_jax.config import TransformerConfig
from attention_jax.data.tasks import VOCAB_FILE
from attention_jax.data.tokenizer import EOS_ID, Tokenizer
from attention_jax.model import Transformer

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"  # the folder checkpoint.Checkpointer keeps in a workdir


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the experiment config as JSON next to the checkpoints (atomically)."""
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True))
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: is {workdir!r} the --workdir of a training run?"
        )
    with open(path, encoding="utf-8") as f:
        try:
            fields = json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise ValueError(f"{path} is not a valid config JSON file ({e})") from None
    missing = [k for k in ("model", "data") if not isinstance(fields, dict) or k not in fields]
    if missing:
        raise ValueError(
            f"{path} is not the config.json of a training run: it has no {missing} section "
            f"(found {sorted(fields) if isinstance(fields, dict) else type(fields).__name__})"
        )
    return ml_collections.ConfigDict(fields)


def read_lines(path: str, flag: str) -> list[str]:
    """The lines of a UTF-8 text file (``'-'``: stdin) for a CLI flag such as ``--input``;
    errors name the flag, the file and the line."""
    if path == "-":
        data, where = sys.stdin.buffer.read(), f"{flag} (stdin)"
    else:
        if not os.path.isfile(path):
            what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
            raise FileNotFoundError(f"{flag} {path} {what}")
        with open(path, "rb") as f:
            data, where = f.read(), f"{flag} {path}"
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{where}, line {line}: not valid UTF-8 ({e.reason})") from None


@dataclasses.dataclass
class Translator:
    """A model, its params and its vocabulary; translates batches of sentences."""

    model: Transformer
    params: dict
    tokenizer: Tokenizer
    steps: list[int]  # the checkpoints whose params these are (averaged if several)

    @classmethod
    def from_workdir(cls, workdir: str, *, average_last: int = 0) -> Translator:
        """The latest checkpoint of `workdir`, or the mean of the last `average_last`."""
        from attention_jax.train_loop import model_config  # the config -> model mapping

        config = load_config(workdir)
        cfg: TransformerConfig = model_config(config)
        vocab = os.path.join(workdir, VOCAB_FILE)
        if not os.path.exists(vocab):
            raise FileNotFoundError(f"{vocab} does not exist: this workdir has no vocabulary")
        tokenizer = Tokenizer.load(vocab)
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"{vocab} has {tokenizer.vocab_size} pieces but the model in "
                f"{os.path.join(workdir, CONFIG_FILE)} has vocab_size={cfg.vocab_size}"
            )
        directory = os.path.join(os.path.abspath(workdir), CHECKPOINTS)
        no_checkpoint = FileNotFoundError(
            f"{directory} holds no checkpoint: train first (experiments/train.py "
            f"--workdir={workdir})"
        )
        if not os.path.isdir(directory):  # Checkpointer would create it: nothing is written here
            raise no_checkpoint
        ckpt = Checkpointer(workdir)
        try:
            latest = ckpt.latest_step()
            if latest is None:
                raise no_checkpoint
            meta = ckpt.read_meta(latest)
            if meta.get("vocab_fingerprint") != tokenizer.fingerprint:
                raise ValueError(
                    f"{vocab} (fingerprint {tokenizer.fingerprint}) is not the vocabulary the "
                    f"checkpoints were trained with ({meta.get('vocab_fingerprint')})"
                )
            if average_last > 1:
                params, steps = average_checkpoints(workdir, average_last)
            else:
                params, steps = ckpt.restore_on_one_device(latest)["params"], [latest]
        finally:
            ckpt.close()
        params = jax.tree.map(jnp.asarray, params)
        return cls(Transformer(cfg), params, tokenizer, steps)

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam_size: int = 4,
        alpha: float = 0.6,
        extra_length: int = 50,
        batch_size: int = 64,
    ) -> list[str]:
        """Translations of `sentences` with beam search (``beam_size=1``: greedy), each at
        most ``len(source) + extra_length`` tokens (the paper's input + 50)."""
        cfg = self.model.config
        encoded = [self._encode(i, s) for i, s in enumerate(sentences)]
        out = []
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start : start + batch_size]
            S = min(-(-max(len(x) for x in chunk) // 8) * 8, cfg.max_len)  # few compilations
            inputs = np.zeros((batch_size, S), np.int32)  # fixed batch: one compilation
            for row, ids in enumerate(chunk):
                inputs[row, : len(ids)] = ids
            max_length = min(S + extra_length, cfg.max_len)
            ids = decoding.translate(
                self.model, self.params, jnp.asarray(inputs), max_length=max_length,
                beam_size=beam_size, alpha=alpha, extra_length=extra_length,
            )  # fmt: skip
            out += [self.tokenizer.decode(row) for row in np.asarray(ids)[: len(chunk)]]
        return out

    def _encode(self, index: int, sentence: str) -> np.ndarray:
        ids = np.append(self.tokenizer.encode(sentence), EOS_ID).astype(np.int32)
        limit = self.model.config.max_len
        if len(ids) > limit:
            raise ValueError(
                f"sentence {index + 1} has {len(ids)} tokens (with EOS), more than the model's "
                f"max_len={limit}: {sentence[:80]!r}"
            )
        return ids
