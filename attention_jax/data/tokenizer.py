"""SentencePiece subword tokenizer with one vocabulary shared by source and target.

The paper (section 5.1) encodes WMT14 English-German with byte-pair encoding and "a shared
source-target vocabulary of about 37000 tokens"; `Tokenizer.train` learns such a vocabulary
with SentencePiece, in memory, from any iterable of sentences (both languages mixed).

Ids: ``PAD_ID = 0`` (padding, and the decoder's start token), ``EOS_ID = 1`` (appended by
the data pipeline, not by `Tokenizer.encode`), ``UNK_ID = 2``; there is no BOS.

Text round-trips: the vocabulary is trained without normalization (SentencePiece's
``identity`` rule) and keeps every space, so ``decode(encode(x)) == x`` for any ``x`` whose
characters all occur in the training sentences (``character_coverage=1.0`` keeps every
one of them). A character never seen in training encodes as ``UNK_ID`` and decodes as
`` ⁇ ``.

A trained model is a serialized SentencePiece ``ModelProto``: `Tokenizer.save` writes it,
`Tokenizer.load` reads it, and `Tokenizer.fingerprint` (a hash of those bytes) lets a
checkpoint record which vocabulary it was trained with. `default_vocab_path` is where
``experiments/prepare_data.py`` stores a dataset's vocabulary.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from attention_jax.data._checks import check_int

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BOS_ID = -1  # none: the decoder starts from PAD_ID
_SPECIAL = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "bos": BOS_ID}

MODEL_TYPES = ("bpe", "unigram")
MAX_SENTENCE_BYTES = 4192  # SentencePiece's max_sentence_length: longer ones are skipped
# SentencePiece splits unigram training over this many threads and sums their partial
# counts, so unigram pieces depend on the count (BPE pieces do not). Fixed, not the
# machine's core count, so that the same sentences give the same model everywhere.
_TRAIN_THREADS = 16
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)(?:.*?<= ?(\d+))?")
_TOO_SMALL = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")
_DATASET = re.compile(r"[a-z][a-z0-9_]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")

PathLike = str | os.PathLike


class Tokenizer:
    """A SentencePiece model with ids ``PAD_ID=0, EOS_ID=1, UNK_ID=2`` and no BOS.

    Built from a serialized ``ModelProto`` (bytes), by `train`, or by `load`. Pickles as
    those bytes, so grain worker processes can each rebuild it. Two tokenizers are equal
    when their model bytes are.
    """

    def __init__(self, model_proto: bytes):
        if not isinstance(model_proto, bytes | bytearray) or not model_proto:
            raise ValueError(
                f"expected the bytes of a serialized SentencePiece model, got "
                f"{_describe(model_proto)}"
            )
        model_proto = bytes(model_proto)
        try:
            processor = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            reason = _first_line(e)
            if "ParseFromArray" in reason:  # SentencePiece's C++ location says only this
                reason = "the bytes do not parse as a ModelProto: truncated, or another format"
            raise ValueError(
                f"not a serialized SentencePiece model ({len(model_proto)} bytes; {reason})"
            ) from None
        # A file cut between two pieces still parses, as a smaller vocabulary: only the
        # missing specs (serialized after the pieces) tell that it is truncated.
        parsed = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
        if not (parsed.HasField("trainer_spec") and parsed.HasField("normalizer_spec")):
            raise ValueError(
                f"incomplete SentencePiece model ({len(model_proto)} bytes, "
                f"{len(parsed.pieces)} pieces, no trainer or normalizer spec): the file is "
                "truncated"
            )
        found = {name: getattr(processor, f"{name}_id")() for name in _SPECIAL}
        if processor.vocab_size() <= len(_SPECIAL) or found != _SPECIAL:
            raise ValueError(
                f"SentencePiece model has special ids {found} and {processor.vocab_size()} "
                f"pieces; attention_jax needs {_SPECIAL}: train it with Tokenizer.train"
            )
        self._proto = model_proto
        self._processor = processor
        # For encode_with_bytes: the UTF-8 bytes each piece stands for ("▁" is a space),
        # usable when the text is not normalized (identity rule, every space kept).
        normalizer = parsed.normalizer_spec
        if normalizer.name == "identity" and not normalizer.remove_extra_whitespaces:
            table = [
                0 if processor.is_control(i) else len(piece.replace("▁", " ").encode("utf-8"))
                for i, piece in enumerate(
                    processor.id_to_piece(list(range(processor.vocab_size())))
                )
            ]
            self._piece_bytes = np.asarray(table, np.int32)
            self._dummy_prefix = int(normalizer.add_dummy_prefix)
        else:
            self._piece_bytes = None

    # ------------------------------------------------------------------ training, files

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int,
        *,
        model_type: str = "bpe",
        max_sentences: int = 2_000_000,
        character_coverage: float = 1.0,
        seed: int = 0,
    ) -> Tokenizer:
        """Learns a vocabulary of ``vocab_size`` pieces (the 3 special ones included).

        Empty sentences are skipped. If more than ``max_sentences`` remain, a uniform
        random sample of that many is used, drawn with ``random.Random(seed).random()``
        (whose sequence Python keeps fixed across versions); SentencePiece's own sampling
        (``input_sentence_size``) stays off. The same sentences, arguments and
        SentencePiece version therefore give the same model bytes on any machine.
        SentencePiece skips sentences longer than `MAX_SENTENCE_BYTES`.
        """
        if isinstance(sentences, str | bytes):
            raise TypeError("sentences must be an iterable of str, not one string")
        vocab_size = check_int("vocab_size", vocab_size, 1)
        max_sentences = check_int("max_sentences", max_sentences, 1)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
        sample, seen = _reservoir(sentences, max_sentences, seed)
        if not sample:
            raise ValueError(
                "no sentences to train the vocabulary on (the input was empty or held only "
                "empty strings)"
            )
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                normalization_rule_name="identity",  # lossless: decode(encode(x)) == x
                remove_extra_whitespaces=False,
                num_threads=_TRAIN_THREADS,
                minloglevel=2,  # errors only (they come back as the RuntimeError below)
            )
        except RuntimeError as e:
            raise _training_error(e, vocab_size, len(sample), seen) from None
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Reads a model written by `save` (or any SentencePiece ``.model`` file with
        this module's special ids)."""
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not" if path.is_dir() else "does not exist; expected"
            raise FileNotFoundError(f"{path} {what} a SentencePiece model file")
        try:
            return cls(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def save(self, path: PathLike) -> Path:
        """Writes the model bytes to ``path`` (parent folders created) atomically: a
        reader sees the old file or the new one, never half of one. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self._proto)
            os.chmod(tmp, 0o644)  # mkstemp makes 0o600 files; vocabularies are shared
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return path

    # ------------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """V: ids are in ``[0, vocab_size)``."""
        return self._processor.vocab_size()

    @property
    def model_proto(self) -> bytes:
        return self._proto

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of the SHA-256 of the model bytes. Store it with a
        checkpoint; a tokenizer with another fingerprint maps ids to other pieces."""
        return hashlib.sha256(self._proto).hexdigest()[:16]

    # ----------------------------------------------------------------- encode / decode

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> int32 ids ``[T]``, without EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {_describe(text)}")
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``text`` -> (ids, bytes): the ids of `encode` (int32 ``[T]``, without EOS) and,
        for each, the number of UTF-8 bytes of ``text`` its piece stands for (int32
        ``[T]``; SentencePiece's byte offsets into the input). A piece that is only the
        dummy space SentencePiece puts before the text stands for 0 bytes; an unknown
        character (``UNK_ID``) for its own bytes. The counts sum to
        ``len(text.encode('utf-8'))`` for vocabularies trained by `train` (which keep every
        character); a model that drops text (e.g. removes extra spaces) gives a smaller sum,
        and the data pipeline counts the rest at EOS."""
        if not isinstance(text, str):
            raise TypeError(f"encode_with_bytes takes a str, got {_describe(text)}")
        if self._piece_bytes is not None:  # fast path: each piece's bytes from a table
            ids = self.encode(text)
            if ids.size and not (ids == UNK_ID).any():
                counts = self._piece_bytes[ids]
                counts[0] -= self._dummy_prefix  # the first piece holds the dummy space
                if counts.sum() == len(text.encode("utf-8")):
                    return ids, counts
        # Exact for any model: SentencePiece's byte offsets (about 7x slower).
        pieces = self._processor.encode(text, out_type="proto").pieces
        ids = np.fromiter((p.id for p in pieces), np.int32, len(pieces))
        ends = np.fromiter((p.end for p in pieces), np.int64, len(pieces))
        spans = np.diff(ends, prepend=0)
        return ids, np.maximum(spans, 0).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text -> int32 ids, without EOS (lengths differ; nothing is padded)."""
        texts = list(texts)
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise TypeError(
                f"encode_batch takes str items; item {bad[0]} is {_describe(texts[bad[0]])}"
            )
        return [np.asarray(ids, dtype=np.int32) for ids in self._processor.encode(texts)]

    def decode(self, ids: Any) -> str:
        """ids ``[T]`` (list, tuple, NumPy or JAX array) -> text. Stops at the first
        ``EOS_ID``; ``PAD_ID`` is dropped wherever it is."""
        return self._processor.decode(self._clean(ids))

    def decode_batch(self, ids: Any) -> list[str]:
        """``[B, T]`` array, or a sequence of 1-D id sequences -> B texts."""
        if isinstance(ids, np.ndarray | Sequence):
            rows = list(ids)
        else:  # e.g. a jax.Array
            rows = list(np.asarray(ids))
        return [self._processor.decode(self._clean(row)) for row in rows]

    def pieces(self, text: str) -> list[str]:
        """The subword strings of ``text`` (``▁`` marks a preceding space), for display."""
        return [self._processor.id_to_piece(int(i)) for i in self.encode(text)]

    def _clean(self, ids: Any) -> list[int]:
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(f"decode takes one id sequence [T]; got shape {array.shape}")
        if array.size == 0:
            return []
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {array.dtype}")
        (eos,) = np.nonzero(array == EOS_ID)
        if eos.size:
            array = array[: eos[0]]
        array = array[array != PAD_ID]
        bad = array[(array < 0) | (array >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"ids must be in [0, {self.vocab_size}) for this vocabulary; got "
                f"{sorted(set(bad.tolist()))[:10]}"
            )
        return array.tolist()

    # --------------------------------------------------------------------- python API

    def __getstate__(self) -> dict[str, bytes]:
        return {"model_proto": self._proto}

    def __setstate__(self, state: Mapping[str, bytes]) -> None:
        self.__init__(state["model_proto"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and other._proto == self._proto

    def __hash__(self) -> int:
        return hash(self._proto)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, fingerprint={self.fingerprint!r})"


# ------------------------------------------------------------------- training helpers


def sample_pairs(num_pairs: int, max_sentences: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of the sentence pairs to train a shared vocabulary on: all
    ``num_pairs`` when their 2 sentences each fit in ``max_sentences``, else a uniform
    random ``max_sentences // 2`` of them (Knuth's selection sampling, drawn with
    ``random.Random(seed).random()``, so the same on every machine and Python version)."""
    num_pairs = check_int("num_pairs", num_pairs)
    max_sentences = check_int("max_sentences", max_sentences, 1)
    if max_sentences < 2:
        raise ValueError(f"max_sentences must be >= 2 (one pair), got {max_sentences}")
    return sample_indices(num_pairs, max_sentences // 2, seed=seed)


def sample_indices(num_items: int, wanted: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``min(wanted, num_items)`` of ``num_items`` items: all of them, or
    a uniform random subset (Knuth's selection sampling, drawn with
    ``random.Random(seed).random()``, so the same on every machine and Python version)."""
    num_items = check_int("num_items", num_items)
    wanted = min(num_items, check_int("wanted", wanted, 1))
    if wanted == num_items:
        return np.arange(num_items, dtype=np.int64)
    u, chosen = random.Random(seed).random, []
    for index in range(num_items):  # keep index with probability (still wanted)/(left)
        if (num_items - index) * u() < wanted - len(chosen):
            chosen.append(index)
            if len(chosen) == wanted:
                break
    return np.asarray(chosen, dtype=np.int64)


def text_sentences(
    texts: Sequence[Mapping[str, str]], indices: Iterable[int], *, chunk_size: int = 1024
) -> Iterator[str]:
    """The text of ``texts[i]['text']`` for each ``i`` in ``indices``: what a text corpus's
    vocabulary is trained on (read ``chunk_size`` at a time, as `pair_sentences`). A text
    longer than SentencePiece's limit (`MAX_SENTENCE_BYTES`, beyond which it skips a
    sentence), e.g. a long paragraph, is given line by line, each line but the last with its
    ``\\n``, so that its characters (the newline too) still reach the vocabulary."""
    indices = [int(i) for i in indices]
    get_many = getattr(texts, "__getitems__", None)
    for start in range(0, len(indices), chunk_size):
        chunk = indices[start : start + chunk_size]
        for example in get_many(chunk) if get_many else [texts[i] for i in chunk]:
            text = example["text"]
            if len(text.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield text
            else:
                lines = text.split("\n")
                yield from (line + "\n" for line in lines[:-1])
                yield lines[-1]


def pair_sentences(
    pairs: Sequence[Mapping[str, str]], indices: Iterable[int], *, chunk_size: int = 1024
) -> Iterator[str]:
    """The source, then the target sentence of ``pairs[i]`` for each ``i`` in
    ``indices``: the text a shared vocabulary is trained on. ``pairs`` is a random-access
    source such as `sources.load_source`; it is read ``chunk_size`` indices at a time
    (one ``__getitems__`` call, when it has one)."""
    indices = [int(i) for i in indices]
    get_many = getattr(pairs, "__getitems__", None)
    for start in range(0, len(indices), chunk_size):
        chunk = indices[start : start + chunk_size]
        examples = get_many(chunk) if get_many else [pairs[i] for i in chunk]
        for example in examples:
            yield example["source"]
            yield example["target"]


def default_vocab_path(data_dir: PathLike, dataset: str, vocab_size: int) -> Path:
    """``<data_dir>/<dataset>/spm_bpe_<vocab_size>.model``: a dataset's shared BPE
    vocabulary, beside the version folders TFDS keeps there (TFDS ignores other files).
    E.g. ``~/tensorflow_datasets/wmt14_translate/de-en/spm_bpe_37000.model`` next to
    ``.../de-en/1.0.0/``. A translation direction shares one vocabulary with its reverse."""
    if not isinstance(dataset, str) or not _DATASET.fullmatch(dataset):
        raise ValueError(
            f"dataset must be a TFDS name like 'my_corpus' or 'wmt14_translate/de-en', "
            f"got {dataset!r}"
        )
    vocab_size = check_int("vocab_size", vocab_size, 1)
    return Path(data_dir, *dataset.split("/"), f"spm_bpe_{vocab_size}.model")


def _reservoir(sentences: Iterable[str], size: int, seed: int) -> tuple[list[str], int]:
    """A uniform sample of at most ``size`` non-empty sentences, in input order, and how
    many non-empty sentences there were (Algorithm R)."""
    u, sample, seen = random.Random(seed).random, [], 0
    for sentence in sentences:
        if not isinstance(sentence, str):
            raise TypeError(f"sentences must be str, got {_describe(sentence)}")
        if not sentence:
            continue
        if seen < size:
            sample.append((seen, sentence))
        else:
            slot = int(u() * (seen + 1))
            if slot < size:
                sample[slot] = (seen, sentence)
        seen += 1
    sample.sort()
    return [sentence for _, sentence in sample], seen


def _training_error(error: RuntimeError, vocab_size: int, used: int, seen: int) -> Exception:
    message = str(error)
    corpus = f"{used:,} sentences" + (f" (sampled from {seen:,})" if seen > used else "")
    if match := _TOO_HIGH.search(message):
        limit = f"at most {match.group(2)}" if match.group(2) else "a smaller one"
        return ValueError(
            f"vocab_size={vocab_size} is more than these {corpus} support: BPE runs out "
            f"of pairs to merge; choose {limit}"
        )
    if match := _TOO_SMALL.search(message):
        return ValueError(
            f"vocab_size={vocab_size} is too small for these {corpus}: their distinct "
            f"characters plus the 3 special pieces need at least {match.group(2)}"
        )
    return RuntimeError(f"SentencePiece training failed on {corpus}: {_first_line(error)}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
