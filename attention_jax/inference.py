"""A trained workdir as a translator: its config, vocabulary and (averaged) checkpoints.

``Translator.from_workdir(workdir, average_last=5).translate(sentences)`` is what
experiments/translate.py and experiments/evaluate.py run. Nothing here writes to the
workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


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
        ckpt = Checkpointer(workdir)
        try:
            latest = ckpt.latest_step()
            if latest is None:
                raise FileNotFoundError(
                    f"{ckpt.directory} holds no checkpoint: train first (experiments/train.py "
                    f"--workdir={workdir})"
                )
            meta = ckpt.read_meta(latest)
            if meta.get("vocab_fingerprint") != tokenizer.fingerprint:
                raise ValueError(
                    f"{vocab} (fingerprint {tokenizer.fingerprint}) is not the vocabulary the "
                    f"checkpoints were trained with ({meta.get('vocab_fingerprint')})"
                )
            if tokenizer.vocab_size != cfg.vocab_size:
                raise ValueError(
                    f"{vocab} has {tokenizer.vocab_size} pieces, the model {cfg.vocab_size}"
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
