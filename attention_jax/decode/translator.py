"""A trained workdir as a translator: its config, vocabulary and (averaged) checkpoints.

``Translator.from_workdir(workdir, average_last=5).translate(sentences)`` is what the
translate and evaluate commands (attention_jax/cli/) run. Nothing here writes to the
workdir: a damaged checkpoint is skipped for the previous one, never moved aside.

Also here, for those commands: how text is read and written, one output line per input
line whatever the text holds (`LineReader`, `split_lines`, `Output`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from attention_jax.data.tasks import load_eval_pairs
from attention_jax.data.tokenizer import EOS_ID, Tokenizer
from attention_jax.decode import decoding
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.model import Transformer, TransformerLM
from attention_jax.workdir import checkpoints_dir, config_path, load_config, vocab_path
from attention_jax.workdir.checkpoint import (
    Checkpointer,
    IncompatibleCheckpointError,
    average_checkpoints,
    check_same_tree,
)
from attention_jax.workdir.experiment import (
    model_config,
    model_kind,
    model_signature,
    signature_differences,
    signature_hint,
)

# ---- Text lines. -----------------------------------------------------------------------
#
# One output line per input line, always. Lines end at "\n" and nowhere else; everything
# else `str.splitlines()` would also split on (VT, FF, \x1c-\x1e, NEL, U+2028, U+2029, a
# lone CR) is a space inside the line, and the same characters in a translation become
# spaces, so the output stays aligned with the input.

LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # all that str.splitlines() splits on
_TO_SPACE = str.maketrans(dict.fromkeys(LINE_BREAKS, " "))
BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark, which editors on Windows put first


def one_line(text: str) -> str:
    """`text` with every line-break character replaced by a space."""
    return text.translate(_TO_SPACE)


def decode_line(raw: bytes, number: int, where: str) -> str:
    """Input line `number` (its bytes, without the "\n") as text on one line: the CR of a
    CRLF ending removed, other line-break characters made spaces. A NUL byte or bytes that
    are not UTF-8 raise ValueError naming `where`, the line and the byte."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    nul = raw.find(b"\0")
    if nul >= 0:
        raise ValueError(
            f"{where}, line {number}: a NUL byte at byte {nul + 1} of the line; "
            "UTF-8 text was expected (is this a binary file?)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}, line {number}: not valid UTF-8 at byte {e.start + 1} of the line "
            f"({e.reason}); convert the file first, e.g. iconv -f latin1 -t utf-8"
        ) from None
    return one_line(text)


def split_lines(data: bytes, where: str) -> list[str]:
    """The lines of `data` as `LineReader` reads them: split at "\n" only, a leading BOM
    dropped, a final "\n" ending the last line (not starting an empty one)."""
    if data.startswith(BOM):
        data = data[len(BOM) :]
    parts = data.split(b"\n")
    if parts[-1] == b"":
        parts.pop()
    return [decode_line(raw, i + 1, where) for i, raw in enumerate(parts)]


class LineReader:
    """The lines of a binary stream (file, pipe, terminal, ``sys.stdin.buffer``) as they
    arrive, decoded by `decode_line`; a leading BOM is dropped.

    `batches` gives at most `size` lines at a time, and fewer when no more input is ready
    yet: a translator in a pipe answers the lines it has instead of waiting for more.
    """

    def __init__(self, stream, where: str, *, chunk: int = 1 << 16):
        self.where = where
        self.count = 0  # lines given so far
        self._stream, self._chunk = stream, chunk
        try:
            self._fd = stream.fileno()  # os.read: only what is there, past Python's buffer
        except (AttributeError, OSError, ValueError):
            self._fd = None
        self._buf = bytearray()
        self._scanned = 0  # no "\n" in _buf[:_scanned]
        self._eof = False
        self._at_start = True

    def _fill(self) -> None:
        if self._fd is not None:
            data = os.read(self._fd, self._chunk)
        else:
            data = self._stream.read(self._chunk)
        self._eof = not data
        self._buf += data
        if self._at_start and (self._eof or len(self._buf) >= len(BOM)
                               or not BOM.startswith(bytes(self._buf))):  # fmt: skip
            if self._buf.startswith(BOM):
                del self._buf[: len(BOM)]
            self._at_start = False

    def _ready(self) -> bool:
        """Whether reading now would not wait (always, for files and unknown streams)."""
        if self._fd is None:
            return True
        try:
            return bool(select.select([self._fd], [], [], 0)[0])
        except (OSError, ValueError):  # not selectable (e.g. Windows): read and wait
            return True

    def _pop(self) -> bytes | None:
        """The next complete line's bytes, or None if more input is needed first."""
        if self._at_start and not self._eof:
            return None  # a BOM may still be on its way
        i = self._buf.find(b"\n", self._scanned)
        if i < 0:
            self._scanned = len(self._buf)
            if self._eof and self._buf:
                line = bytes(self._buf)
                self._buf.clear()
                self._scanned = 0
                return line
            return None
        line = bytes(self._buf[:i])
        del self._buf[: i + 1]
        self._scanned = 0
        return line

    def batches(self, size: int) -> Iterator[list[str]]:
        while True:
            batch = []
            while len(batch) < size:
                raw = self._pop()
                if raw is None:
                    if self._eof or (batch and not self._ready()):
                        break
                    self._fill()
                    continue
                self.count += 1
                batch.append(decode_line(raw, self.count, self.where))
            if not batch:
                return
            yield batch

    def __iter__(self) -> Iterator[str]:
        for batch in self.batches(1 << 10):
            yield from batch


def check_input_path(path: str, flag: str) -> None:
    """Refuses an input that does not exist or is a directory; FIFOs, /dev/stdin and the
    like are fine."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a directory, not a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} does not exist")


def read_lines(path: str, flag: str) -> list[str]:
    """The lines of a UTF-8 text file (``'-'``: stdin) for a CLI flag such as ``--input``,
    as `LineReader` reads them; errors name the flag, the file and the line."""
    check_input_path(path, flag)
    if path == "-":
        return list(LineReader(sys.stdin.buffer, f"{flag} (stdin)"))
    with open(path, "rb") as f:
        return list(LineReader(f, f"{flag} {path}"))


def check_text_file(path: str, flag: str) -> int:
    """The number of lines of a regular file, after checking that every one decodes (so a
    bad byte on line 1,999 is refused before anything is translated); -1 for ``'-'`` and
    other streams, which cannot be read twice."""
    check_input_path(path, flag)
    if path == "-" or not os.path.isfile(path):
        return -1
    with open(path, "rb") as f:
        return sum(1 for _ in LineReader(f, f"{flag} {path}"))


_FD_PATH = re.compile(r"^/(?:dev|proc/self)/fd/(\d+)$")
_STD_PATHS = {"/dev/stdout": 1, "/dev/stderr": 2}


class Output:
    """Where a CLI writes its lines, checked before any work is done (`flag` names it in
    errors).

    ``'-'``: stdout. A regular file, new or existing, also through a symlink (whose target
    is written, the link kept): written atomically, to a temporary file next to the target
    renamed over it once complete, so a failed or interrupted run leaves the old content
    (the target's permissions are kept). ``/dev/fd/N``, ``/dev/stdout``: the open file
    descriptor itself (its offset and append mode respected). Anything else that is not a
    regular file (a FIFO, a terminal, /dev/null), or a writable file in a folder where no
    temporary file can be made: written directly. Every `write` is flushed, so a reader at
    the other end of a pipe sees each batch as it is done.
    """

    def __init__(self, path: str, flag: str):
        self.path, self.flag = path, flag
        self.fd: int | None = None  # write to this descriptor (a dup of it)
        self.target: str | None = None  # replace this regular file atomically
        if path == "-":
            self.fd = 1
            return
        if os.path.isdir(path):
            raise IsADirectoryError(f"{flag} {path} is a directory; give a file name")
        match = _FD_PATH.match(path)
        if match or path in _STD_PATHS:
            self.fd = int(match.group(1)) if match else _STD_PATHS[path]
            try:
                os.fstat(self.fd)
            except OSError:
                raise FileNotFoundError(
                    f"{flag} {path}: file descriptor {self.fd} is not open"
                ) from None
            return
        if os.path.exists(path) and not os.path.isfile(path):  # FIFO, device: write into it
            if not os.access(path, os.W_OK):
                raise PermissionError(f"{flag} {path}: no permission to write it")
            return
        target = os.path.realpath(path)  # a (possibly dangling) symlink's final target
        folder = os.path.dirname(target)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{flag} {path}: the folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            if os.path.isfile(target) and os.access(target, os.W_OK):
                self.path = target  # a writable file in a read-only folder: in place
                return
            raise PermissionError(
                f"{flag} {path}: no permission to create files in {folder} (the file is "
                "written next to its target and renamed, so that it is never half-written)"
            )
        self.target = target

    @contextlib.contextmanager
    def open(self) -> Iterator[Callable[[Sequence[str]], None]]:
        """``write(lines)``: appends `lines`, each with "\n", and flushes. The file is only
        complete (replaced, for a regular file) when the ``with`` block ends normally."""
        if self.fd is not None:
            f = os.fdopen(os.dup(self.fd), "wb")
            if self.fd == 1:
                sys.stdout.flush()  # whatever Python's stdout holds goes first
        elif self.target is None:
            f = open(self.path, "wb")
        else:
            folder, name = os.path.split(self.target)
            handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            f = os.fdopen(handle, "wb")
        try:

            def write(lines: Sequence[str]) -> None:
                f.write("".join(one_line(x) + "\n" for x in lines).encode("utf-8"))
                f.flush()

            yield write
            if self.target is not None:
                os.fsync(f.fileno())
                os.chmod(tmp, _mode_for(self.target))
                f.close()
                os.replace(tmp, self.target)
        except BaseException:
            if self.target is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
            raise
        finally:
            try:
                f.close()
            except BrokenPipeError:
                pass


def _mode_for(path: str) -> int:
    """The permission bits a file written at `path` gets: the replaced file's, else those a
    plain open() would give (0o666 less the umask)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def eval_pairs(
    config: ml_collections.ConfigDict, split: str, *, data_dir: str | None = None
) -> tuple[list[str], list[str]]:
    """The sources (one line each) and references of `split` of a workdir's dataset, read
    from `data_dir`, else the data dir the training run recorded in config.json
    (``config.data.data_dir``), else ``$TFDS_DATA_DIR`` / ~/tensorflow_datasets."""
    if data_dir:
        config = ml_collections.ConfigDict(config.to_dict())
        config.data.data_dir = data_dir
    try:
        sources, references = load_eval_pairs(config, split)
    except FileNotFoundError as e:  # sources.DatasetNotPreparedError among them
        hint = "" if data_dir else " (or give --data_dir=DIR where it was prepared)"
        raise FileNotFoundError(f"{e}{hint}") from e
    return [one_line(s) for s in sources], references


# ---- Sentences over the model's max_len. ---------------------------------------------

TOO_LONG = ("truncate", "skip", "error")  # what to do with a sentence over the model's max_len


class TooLong:
    """``on_too_long`` for `Translator.translate` in a CLI: collects the lines truncated or
    skipped; `warn` says so in one line on stderr."""

    def __init__(self, policy: str):
        self.policy, self.lines, self.longest = policy, [], 0

    def __call__(self, line: int, tokens: int) -> None:
        self.lines.append(line)
        self.longest = max(self.longest, tokens)

    def warn(self, prog: str, max_len: int) -> None:
        if not self.lines:
            return
        shown = ", ".join(map(str, self.lines[:20])) + (" ..." if len(self.lines) > 20 else "")
        done = "truncated to their first" if self.policy == "truncate" else "skipped (empty"
        done += f" {max_len} tokens" if self.policy == "truncate" else " output lines)"
        print(
            f"{prog}: warning: {len(self.lines)} line(s) longer than the model's "
            f"max_len={max_len} tokens (up to {self.longest}) were {done}: line(s) {shown}",
            file=sys.stderr,
            flush=True,
        )


# ---- Checkpoints and models. -----------------------------------------------------------


def _check_checkpoint(workdir: str, config, cfg: TransformerConfig, tokenizer: Tokenizer):
    """``check_meta(step, meta)`` for `Checkpointer.intact`: refuses a checkpoint whose model
    signature or vocabulary differs from what config.json and vocab.model describe."""
    ours = model_signature(cfg)
    vocab, config_json = vocab_path(workdir), config_path(workdir)

    def check(step: int, meta: dict) -> None:
        theirs = meta.get("model")
        if isinstance(theirs, dict):  # checkpoints written before signatures have none
            differ = signature_differences(ours, theirs)
            if differ:
                shown = "; ".join(
                    f"{k}: config.json {_stated(config.model, k, ours.get(k))}, "
                    f"checkpoint {theirs.get(k)!r}"
                    for k in differ
                )
                raise IncompatibleCheckpointError(
                    f"{config_json} does not describe the model of the checkpoint of step "
                    f"{step} ({shown}); restore the config.json that training wrote"
                    + (f"; {hint}" if (hint := signature_hint(differ)) else "")
                )
        if meta.get("vocab_fingerprint") != tokenizer.fingerprint:
            raise IncompatibleCheckpointError(
                f"{vocab} (fingerprint {tokenizer.fingerprint}) is not the vocabulary the "
                f"checkpoints were trained with ({meta.get('vocab_fingerprint')})"
            )

    return check


def _stated(section, key: str, value) -> str:
    return f"{value!r}" if key in section else f"has none (default {value!r})"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Translator:
    """A model, its params and its vocabulary; translates batches of sentences."""

    model: Transformer
    params: dict
    tokenizer: Tokenizer
    steps: list[int]  # the checkpoints whose params these are (averaged if several)

    @classmethod
    def from_workdir(
        cls, workdir: str, *, average_last: int = 0, log: Callable[[str], None] = _stderr
    ) -> Translator:
        """The latest checkpoint of `workdir`, or the mean of the last `average_last`.

        Nothing in the workdir is written. A damaged checkpoint is skipped for the next
        older one, said in one line through `log`. config.json and vocab.model are checked
        against the checkpoints' stored model signature and vocabulary fingerprint."""
        config, cfg, tokenizer = load_model_config(workdir)
        if model_kind(config) == "lm":  # a decoder-only model: nothing to translate from
            raise ValueError(
                f"{workdir} is a language-model workdir, not a translation one; use "
                "generate.py (or evaluate.py) with it"
            )
        model = Transformer(cfg)
        params, steps = load_params(
            workdir, config, tokenizer, model, average_last=average_last, log=log
        )
        return cls(model, params, tokenizer, steps)

    def translate(
        self,
        sentences: Sequence[str],
        *,
        beam_size: int = 4,
        alpha: float = 0.6,
        extra_length: int = 50,
        batch_size: int = 64,
        too_long: str = "error",
        first_line: int = 1,
        on_too_long: Callable[[int, int], None] | None = None,
    ) -> list[str]:
        """Translations of `sentences` with beam search (``beam_size=1``: greedy), each at
        most ``len(source) + extra_length`` tokens (the paper's input + 50), one line each
        (line-break characters become spaces).

        A blank sentence (empty or whitespace) translates to "" without the model. A
        sentence over the model's max_len tokens (with EOS): ``too_long='error'`` raises
        naming it; ``'truncate'`` keeps its first max_len - 1 tokens and EOS; ``'skip'``
        translates it to "". ``on_too_long(line, tokens)`` hears of each one truncated or
        skipped; lines are numbered from `first_line`."""
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long must be one of {TOO_LONG}, got {too_long!r}")
        cfg = self.model.config
        encoded = [
            self._encode(first_line + i, s, too_long, on_too_long) for i, s in enumerate(sentences)
        ]
        todo = [i for i, ids in enumerate(encoded) if ids is not None]
        out = [""] * len(sentences)
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            S = min(-(-max(len(encoded[i]) for i in rows) // 8) * 8, cfg.max_len)  # few shapes
            inputs = np.zeros((batch_size, S), np.int32)  # fixed batch: one compilation
            for row, i in enumerate(rows):
                inputs[row, : len(encoded[i])] = encoded[i]
            max_length = min(S + extra_length, cfg.max_len)
            ids = decoding.translate(
                self.model, self.params, jnp.asarray(inputs), max_length=max_length,
                beam_size=beam_size, alpha=alpha, extra_length=extra_length,
            )  # fmt: skip
            for i, row in zip(rows, np.asarray(ids), strict=False):
                out[i] = one_line(self.tokenizer.decode(row))
        return out

    def _encode(self, number: int, sentence: str, too_long: str, on_too_long) -> np.ndarray | None:
        """Token ids + EOS of a sentence; None: translate it to "" (blank, or skipped)."""
        if not sentence.strip():
            return None
        ids = np.append(self.tokenizer.encode(sentence), EOS_ID).astype(np.int32)
        limit = self.model.config.max_len
        if len(ids) <= limit:
            return ids
        if too_long == "error":
            raise ValueError(
                f"line {number} has {len(ids)} tokens (with EOS), more than the model's "
                f"max_len={limit}: {sentence[:80]!r}; --too_long=truncate or skip translates "
                "it anyway"
            )
        if on_too_long is not None:
            on_too_long(number, len(ids))
        if too_long == "skip":
            return None
        return np.append(ids[: limit - 1], EOS_ID).astype(np.int32)


def load_model_config(
    workdir: str,
) -> tuple[ml_collections.ConfigDict, TransformerConfig, Tokenizer]:
    """A workdir's config.json, the model it describes and its vocabulary (checked against
    the model's vocab_size). Nothing is written."""
    config = load_config(workdir)
    try:
        cfg: TransformerConfig = model_config(config)
    except (TypeError, ValueError) as e:  # unknown fields, a list where a number belongs
        raise ValueError(f"{config_path(workdir)}: {e}") from None
    vocab = vocab_path(workdir)
    if not os.path.exists(vocab):
        raise FileNotFoundError(f"{vocab} does not exist: this workdir has no vocabulary")
    tokenizer = Tokenizer.load(vocab)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise ValueError(
            f"{vocab} has {tokenizer.vocab_size} pieces but the model in "
            f"{config_path(workdir)} has vocab_size={cfg.vocab_size}"
        )
    return config, cfg, tokenizer


def load_params(
    workdir: str,
    config: ml_collections.ConfigDict,
    tokenizer: Tokenizer,
    model: nn.Module,
    *,
    average_last: int = 0,
    log: Callable[[str], None] = _stderr,
) -> tuple[dict, list[int]]:
    """The params of the newest intact checkpoint of `workdir` (or the mean of the last
    `average_last`) and their steps, checked against `model` (a `Transformer` or a
    `TransformerLM` of the config.json model), its signature and `tokenizer`. A damaged
    checkpoint is skipped for the next older one, said through `log`; nothing is written."""
    cfg = model.config
    directory = checkpoints_dir(os.path.abspath(workdir))
    ckpt = None
    if os.path.isdir(directory):  # Checkpointer would create it: nothing is written here
        ckpt = Checkpointer(workdir, create=False, log=log)
    if ckpt is None or not ckpt.steps():
        raise FileNotFoundError(
            f"{directory} holds no checkpoint: train first (experiments/train.py "
            f"--workdir={workdir})"
        )
    check = _check_checkpoint(workdir, config, cfg, tokenizer)
    try:
        if average_last > 1:
            ckpt.close()  # average_checkpoints opens its own
            ckpt = None
            params, steps = average_checkpoints(workdir, average_last, check_meta=check, log=log)
        else:
            found = next(ckpt.intact(check_meta=check), None)
            if found is None:
                raise FileNotFoundError(
                    f"no checkpoint in {directory} reads back whole (steps "
                    f"{ckpt.steps()}, see above)"
                )
            params, steps = found[2], [found[0]]
    finally:
        if ckpt is not None:
            ckpt.close()
    params = jax.tree.map(jnp.asarray, params)
    _check_params(workdir, steps, model, params)
    return params, steps


def _check_params(workdir: str, steps: list[int], model: nn.Module, params) -> None:
    """Refuses params whose tree differs from the model config.json describes (a field the
    signature does not cover, or a checkpoint without one), naming the arrays."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    example = (tokens,) if isinstance(model, TransformerLM) else (tokens, tokens)
    abstract = jax.eval_shape(  # unboxed: without the logical axis names
        lambda: nn.meta.unbox(model.init(jax.random.key(0), *example)["params"])
    )
    try:
        check_same_tree(steps[-1], params, abstract)
    except IncompatibleCheckpointError as e:
        detail = str(e).split("\n")[1:-1]
        raise IncompatibleCheckpointError(
            f"{config_path(workdir)} does not describe the model of the "
            f"checkpoint of step {steps[-1]}: " + "; ".join(d.strip() for d in detail)
        ) from None
