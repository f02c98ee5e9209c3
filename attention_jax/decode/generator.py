"""A trained language-model workdir as a text generator: its config, vocabulary and newest
intact checkpoint, on one device.

``Generator.from_workdir(workdir).generate(prompts, max_new_tokens=50)`` is what the
generate command (attention_jax/cli/generate.py) runs. The workdir is read as the
`Translator` reads it (`translator.load_model_config`, `translator.load_params`): nothing
in it is written, and a damaged checkpoint is skipped for the previous one.

Sampling is per prompt and sample: sample s of prompt number n is drawn with the key
``fold_in(fold_in(key(seed), n), s)``, alone (vmapped over the batch), so a prompt's output
does not depend on the other prompts, the batch size or how lines arrive on stdin.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.data.tokenizer import Tokenizer
from attention_jax.decode import decoding
from attention_jax.decode.translator import load_model_config, load_params, one_line
from attention_jax.nn.model import TransformerLM
from attention_jax.workdir.experiment import model_kind


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "top_k"))
def _sample_rows(
    model, params, prompts, keys, *, max_length, max_new_tokens, temperature, top_k, top_p
):
    """prompts [B, P] (right-padded), keys [B] -> ids [B, max_length]: each row generated
    alone with its own key (so a row's ids do not depend on the others), and ended after
    `max_new_tokens` new tokens (the loop stops when every row has: a batch of short
    prompts does not run on to `max_length`)."""

    def one(prompt, key):  # prompt [P]
        return decoding.generate(
            model, params, prompt[None], key, max_length=max_length,
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        )[0]  # fmt: skip

    return jax.vmap(one)(prompts, keys)


@dataclasses.dataclass
class Generator:
    """A decoder-only model, its params and its vocabulary; continues prompts."""

    model: TransformerLM
    params: dict
    tokenizer: Tokenizer
    steps: list[int]  # the checkpoint whose params these are

    @classmethod
    def from_workdir(cls, workdir: str, *, log: Callable[[str], None] = _stderr) -> Generator:
        """The newest intact checkpoint of an LM `workdir` (``model_kind(config) == 'lm'``:
        config.json's data.task). A translation (encoder-decoder) workdir is refused before
        any checkpoint is read. Nothing in the workdir is written."""
        config, cfg, tokenizer = load_model_config(workdir)
        if model_kind(config) != "lm":
            raise ValueError(
                f"{workdir} holds an encoder-decoder (translation) model, not a language "
                f"model (its config.json has data.task={config.data.get('task')!r}, dataset "
                f"{config.data.get('dataset')!r}): use translate.py for it, or give the "
                "--workdir of a language-model run"
            )
        model = TransformerLM(cfg)
        params, steps = load_params(workdir, config, tokenizer, model, log=log)
        return cls(model, params, tokenizer, steps)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        num_samples: int = 1,
        batch_size: int = 32,
        first_line: int = 1,
    ) -> list[str]:
        """``len(prompts) * num_samples`` lines, the samples of each prompt together: the
        prompt as given, then its continuation of at most `max_new_tokens` tokens (ended at
        EOS), detokenized, line breaks made spaces. ``temperature=0``: greedy.

        A prompt may be empty (the model starts from nothing). One over the model's max_len
        minus `max_new_tokens` tokens raises ValueError naming it (prompts are numbered from
        `first_line`, which also picks their sampling keys: module docstring)."""
        max_len = self.model.config.max_len
        for name, value, ok, expected in [
            ("max_new_tokens", max_new_tokens, _int(max_new_tokens) and max_new_tokens > 0,
             "a positive int"),
            ("max_new_tokens", max_new_tokens, max_new_tokens <= max_len,
             f"at most the model's max_len={max_len}"),
            ("temperature", temperature, temperature >= 0, ">= 0 (0: greedy)"),
            ("top_k", top_k, _int(top_k) and top_k >= 0, "an int >= 0 (0: off)"),
            ("top_p", top_p, 0 < top_p <= 1, "in (0, 1] (1: off)"),
            ("num_samples", num_samples, _int(num_samples) and num_samples > 0,
             "a positive int"),
            ("batch_size", batch_size, _int(batch_size) and batch_size > 0, "a positive int"),
        ]:  # fmt: skip
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {value!r}")
        limit = max_len - max_new_tokens
        encoded = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer.encode(prompt).astype(np.int32)
            if len(ids) > limit:
                raise ValueError(
                    f"prompt {first_line + i} has {len(ids)} tokens, more than the model's "
                    f"max_len={max_len} minus max_new_tokens={max_new_tokens} = {limit}: "
                    f"{prompt[:80]!r}; shorten it or lower max_new_tokens"
                )
            encoded.append(ids)
        rows = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
        base = jax.random.key(seed)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            longest = max(len(encoded[i]) for i, _ in chunk)
            # Few shapes, one compilation each (an empty prompt shares the width-8 one).
            P = min(max(-(-longest // 8) * 8, 8), limit)
            tokens = np.full((batch_size, P), self.model.config.pad_id, np.int32)
            numbers = np.zeros((batch_size, 2), np.int32)  # fixed batch: one compilation
            for row, (i, s) in enumerate(chunk):
                tokens[row, : len(encoded[i])] = encoded[i]
                numbers[row] = (first_line + i, s)
            keys = jax.vmap(lambda n: jax.random.fold_in(jax.random.fold_in(base, n[0]), n[1]))(
                jnp.asarray(numbers)
            )
            ids = _sample_rows(
                self.model, self.params, jnp.asarray(tokens), keys, max_length=P + max_new_tokens,
                max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                top_k=int(top_k), top_p=float(top_p),
            )  # fmt: skip
            ids = np.asarray(ids)
            for row, (i, _) in enumerate(chunk):
                n = len(encoded[i])
                out.append(self._text(prompts[i], encoded[i], ids[row, n : n + max_new_tokens]))
        return out

    def _text(self, prompt: str, prompt_ids: np.ndarray, new: np.ndarray) -> str:
        """The prompt as given + the continuation's text, as the tokenizer detokenizes the
        whole (so the space between them is the model's)."""
        whole = self.tokenizer.decode(np.concatenate([prompt_ids, new]))
        head = self.tokenizer.decode(prompt_ids)
        if whole.startswith(head):
            more = whole[len(head) :]
        else:  # (normalisation merged across the boundary)
            more = " " + self.tokenizer.decode(new)
        if prompt[-1:].isspace() and more[:1] == " ":
            more = more[1:]
        return one_line(prompt + more)


def _int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)
