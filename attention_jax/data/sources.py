"""Text sources: TFDS datasets in ``array_record`` format, read by random access.

No TensorFlow is needed to prepare or to read them. A dataset is prepared once into
``data_dir/NAME/VERSION/*.array_record-*`` and read back with ``tfds.data_source``, which
grain can shuffle, shard and batch by index.

Parallel text (translation): every source yields ``{'source': str, 'target': str}``,
whatever the underlying TFDS feature names are.
- a local line-aligned corpus (two text files, or one two-column TSV per split), turned into
  a TFDS dataset by `prepare_local_corpus`;
- WMT14 English-German, TFDS's ``wmt14_translate/de-en`` builder, prepared by `prepare_wmt14`
  and read in either direction by `load_wmt14`.

Monolingual text (language modelling): every source yields ``{'text': str}``.
- a local text corpus (UTF-8 files; one example per non-blank line, or per blank-line-
  separated paragraph), turned into a TFDS dataset by `prepare_text_corpus`;
- the One Billion Word benchmark, TFDS's ``lm1b`` builder (splits train and test, one
  sentence per example), prepared by `prepare_lm1b`.
Both are read by `load_text_source`.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob
import importlib
import os
import re
import tempfile
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

# TFDS registers its older builders (the translate/ folder) only when their module is
# imported; without this, tfds.builder('wmt14_translate/de-en') says "Dataset
# wmt14_translate not found".
import tensorflow_datasets.translate.wmt14
import tensorflow_datasets.translate.wmt17
from etils import epath
from tensorflow_datasets.core.download import extractor as _tfds_extractor

SOURCE, TARGET = "source", "target"
TEXT = "text"  # the one feature of a text corpus (as in TFDS's lm1b)
LOCAL_CORPUS_VERSION = "1.0.0"
LOCAL_TEXT_VERSION = "1.0.0"
LM1B = "lm1b"
WMT14 = "wmt14_translate/de-en"
WMT17 = "wmt17_translate/de-en"  # newer training data (adds news commentary v12, rapid)
WMT_DATASETS = (WMT14, WMT17)
WMT14_LANGUAGES = ("de", "en")
# What prepares a dataset, by kind (`prepare_command`). `python -m attention_jax prepare` is
# experiments/prepare_data.py, and works wherever attention_jax is installed.
PREPARE_COMMAND = "python -m attention_jax prepare --dataset={name} --data_dir={data_dir}"
PREPARE_LOCAL_COMMAND = (
    "python -m attention_jax prepare --dataset=local --name={name} "
    "--train=SOURCE_FILE,TARGET_FILE --validation=DEV.tsv --data_dir={data_dir}"
)

PREPARE_TEXT_COMMAND = (
    "python -m attention_jax prepare --dataset=local_text --name={name} "
    "--train=FILE[,FILE...] --validation=FILE --data_dir={data_dir}"
)

PathLike = str | os.PathLike
# One split of a local corpus: a TSV path, or a (source path, target path) pair.
SplitFiles = PathLike | tuple[PathLike, PathLike]

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SPLIT = re.compile(r"[A-Za-z0-9_]+")


class DatasetNotPreparedError(FileNotFoundError):
    """The named dataset has no prepared copy under the data directory."""


# ---------------------------------------------------------------------------- reading


class _RandomAccess:
    """Random access to ``examples`` (a `tfds.data_source`), each converted by `_convert`:
    the indexing `ParallelTextSource` and `TextSource` share."""

    examples: Sequence[Mapping[str, Any]]

    def _convert(self, example: Mapping[str, Any]) -> dict[str, str]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, str]:
        # ArrayRecord answers any key outside [0, n) with ValueError; a sequence raises
        # IndexError (which also ends `for example in source`) and counts back from -1.
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return self._convert(self.examples[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
        """Batched read: one ArrayRecord call for many indices."""
        n = len(self)
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise IndexError(f"indices {bad} out of range for {n} examples")
        examples = self.examples.__getitems__([i % n for i in indices])
        return [self._convert(e) for e in examples]


@dataclasses.dataclass(frozen=True)
class ParallelTextSource(_RandomAccess):
    """Random access to sentence pairs: ``source[i] == {'source': str, 'target': str}``.

    Wraps a `tfds.data_source` (whose text features come back as UTF-8 bytes) and renames
    its two text features ``source_key`` and ``target_key``. It has ``__len__`` and
    ``__getitem__``, so it is a grain ``RandomAccessDataSource``, and it pickles, so grain
    worker processes can open it.
    """

    examples: Sequence[Mapping[str, Any]]
    source_key: str = SOURCE
    target_key: str = TARGET

    def _convert(self, example: Mapping[str, Any]) -> dict[str, str]:
        return to_pair(example, self.source_key, self.target_key)

    def __repr__(self) -> str:
        return (
            f"ParallelTextSource({self.examples!r}, source_key={self.source_key!r}, "
            f"target_key={self.target_key!r}, len={len(self)})"
        )


def to_pair(example: Mapping[str, Any], source_key: str, target_key: str) -> dict[str, str]:
    """One TFDS example -> ``{'source': str, 'target': str}``.

    For WMT14 ``{'de': b'Hallo', 'en': b'Hello'}`` with keys ('en', 'de') gives
    ``{'source': 'Hello', 'target': 'Hallo'}``.
    """
    return {SOURCE: _text(example[source_key]), TARGET: _text(example[target_key])}


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_source(
    name: str,
    split: str,
    *,
    data_dir: PathLike,
    source_key: str = SOURCE,
    target_key: str = TARGET,
) -> ParallelTextSource:
    """The prepared dataset ``name`` (e.g. ``'my_corpus'`` or ``'wmt14_translate/de-en'``),
    one split, as a random-access `ParallelTextSource`. Never downloads or prepares: a
    dataset that is not prepared under ``data_dir`` raises `DatasetNotPreparedError` with
    the command that prepares it."""
    examples = _prepared_split(name, split, data_dir, (source_key, target_key), text=False)
    return ParallelTextSource(examples, source_key, target_key)


def _prepared_split(name: str, split: str, data_dir: PathLike, keys, *, text: bool):
    """``builder.as_data_source(split)`` of a prepared array_record dataset with `keys`."""
    builder = _prepared_builder(name, data_dir, text=text)
    splits = sorted(builder.info.splits)
    if split not in builder.info.splits:
        raise ValueError(
            f"dataset {name!r} in {builder.data_dir} has no split {split!r}; it has {splits}"
        )
    file_format = builder.info.file_format
    if file_format is not tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"dataset {name!r} in {builder.data_dir} is stored as {file_format}, which has no "
            f"random access; prepare it again as array_record: "
            + prepare_command(name, data_dir, text=text)
        )
    features = sorted(builder.info.features.keys())
    for key in keys:
        if key not in features:
            if text and set(features) >= {SOURCE, TARGET}:
                hint = (
                    "; it is a parallel corpus: a language model reads a text corpus, "
                    "prepared with " + prepare_command(name, data_dir, text=True)
                )
            elif not text and TEXT in features:
                hint = "; it is a text corpus (for a language model), not a parallel corpus"
            else:
                hint = ""
            raise ValueError(f"dataset {name!r} has no feature {key!r}; it has {features}{hint}")
    return builder.as_data_source(split=split)


def _prepared_builder(name: str, data_dir: PathLike, *, text: bool = False):
    data_dir = os.fspath(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        builder = None  # neither a TFDS builder nor a dataset on disk
    if builder is None or not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"dataset {name!r} is not prepared in {data_dir} (looked for "
            f"{os.path.join(data_dir, *name.split('/'))}/<version>/dataset_info.json); "
            f"prepare it with: " + prepare_command(name, data_dir, text=text)
        )
    return builder


def prepare_command(name: str, data_dir: PathLike, *, text: bool = False) -> str:
    """The command that prepares dataset `name`: ``--dataset=NAME`` for the ones the prepare
    command downloads or generates (WMT14/17, lm1b, the built-in corpus), else the local
    corpus's: ``--dataset=local --name=NAME`` with its files, or with ``text``
    ``--dataset=local_text --name=NAME`` (a text corpus, for a language model)."""
    if name in (*WMT_DATASETS, LM1B, "toy_translation"):
        return PREPARE_COMMAND.format(name=name, data_dir=data_dir)
    if text:
        return PREPARE_TEXT_COMMAND.format(name=name, data_dir=data_dir) + (
            " (your text: UTF-8, one example per line, or --paragraphs)"
        )
    return PREPARE_LOCAL_COMMAND.format(name=name, data_dir=data_dir) + (
        " (your corpus: line-aligned SOURCE_FILE,TARGET_FILE or a two-column TSV per split)"
    )


def dataset_features(name: str, data_dir: PathLike) -> tuple[str, ...] | None:
    """The feature names of the prepared dataset `name` (e.g. ``('source', 'target')`` or
    ``('text',)``), or None if it is not prepared under `data_dir`."""
    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    except tfds.core.DatasetNotFoundError:
        return None
    if not builder.is_prepared():
        return None
    return tuple(sorted(builder.info.features.keys()))


def split_names(name: str, data_dir: PathLike, *, text: bool = False) -> tuple[str, ...]:
    """The splits of the prepared dataset `name` (raises `DatasetNotPreparedError`, whose
    command is a text corpus's with ``text``)."""
    return tuple(_prepared_builder(name, data_dir, text=text).info.splits)


# ---------------------------------------------------------------------- local corpora


def prepare_local_corpus(
    splits: Mapping[str, SplitFiles],
    *,
    data_dir: PathLike,
    name: str,
    overwrite: bool = False,
) -> Path:
    """Writes a line-aligned local parallel corpus as the TFDS dataset ``name`` in
    array_record format under ``data_dir``; returns the dataset's directory.

    ``splits`` maps a split name to its files: ``{'train': ('train.en', 'train.de'),
    'validation': 'dev.tsv'}``; a TSV has exactly two tab-separated columns, source then
    target. Files are UTF-8; lines end at ``\\n`` (a trailing ``\\r`` is dropped), and line
    ``i`` of the source is the translation of line ``i`` of the target. Examples keep file
    order. Every file is checked before anything is written, so a bad file leaves
    ``data_dir`` as it was.
    """
    _check_new_name(name, "{'train': 'train.tsv'}", splits)
    corpora = {split: _LocalCorpus.from_files(split, files) for split, files in splits.items()}
    return _write_local(_LocalCorpusBuilder, corpora, data_dir, name, overwrite)


def _check_new_name(name: Any, example: str, splits: Mapping[str, Any]) -> None:
    """Refuses a dataset name that is not lower_snake_case or is a TFDS dataset's, and
    bad split names."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"dataset name must be lower_snake_case (letters, digits, _), got {name!r}"
        )
    try:
        taken = tfds.builder_cls(name)
    except tfds.core.DatasetNotFoundError:
        pass
    else:
        raise ValueError(
            f"dataset name {name!r} is taken by the TFDS dataset {taken.__module__}; choose another"
        )
    if not splits:
        raise ValueError(f"splits is empty; give at least one, e.g. {example}")
    for split in splits:
        if not isinstance(split, str) or not _SPLIT.fullmatch(split):
            raise ValueError(f"split names are letters, digits and _, got {split!r}")


def _write_local(
    builder_cls: type[_LocalBuilder],
    corpora: Mapping[str, _LocalCorpus | _TextCorpus],
    data_dir: PathLike,
    name: str,
    overwrite: bool,
) -> Path:
    """Checks every split's files (``corpus.check()``, the sizes), then writes them as the
    array_record dataset `name` with `builder_cls` (refusing an existing one unless
    `overwrite`)."""
    sizes = {split: corpus.check() for split, corpus in corpora.items()}
    builder = builder_cls(
        name=name,
        corpora=corpora,
        sizes=sizes,
        data_dir=os.fspath(data_dir),
        file_format=tfds.core.FileFormat.ARRAY_RECORD,
    )
    if builder.is_prepared() and not overwrite:
        raise FileExistsError(
            f"dataset {name!r} is already prepared in {builder.data_dir}; pass "
            f"overwrite=True to replace it"
        )
    # Overwriting deletes the old copy only now, after every file has passed the checks.
    mode = tfds.download.GenerateMode
    mode = mode.FORCE_REDOWNLOAD if overwrite else mode.REUSE_DATASET_IF_EXISTS
    with tempfile.TemporaryDirectory() as unused:  # else TFDS leaves data_dir/downloads/
        builder.download_and_prepare(
            download_dir=unused, download_config=tfds.download.DownloadConfig(download_mode=mode)
        )
    return Path(builder.data_dir)


@dataclasses.dataclass(frozen=True)
class _LocalCorpus:
    """One split's files: ``paths`` is (tsv,) or (source, target)."""

    split: str
    paths: tuple[Path, ...]

    @classmethod
    def from_files(cls, split: str, files: SplitFiles) -> _LocalCorpus:
        if isinstance(files, str | os.PathLike):
            paths = (Path(files),)
        elif isinstance(files, tuple | list) and len(files) == 2:
            paths = (Path(files[0]), Path(files[1]))
        else:
            raise ValueError(
                f"split {split!r}: give a TSV path or a (source file, target file) pair, "
                f"got {files!r}"
            )
        roles = ("TSV",) if len(paths) == 1 else ("source", "target")
        for role, path in zip(roles, paths, strict=True):
            _check_file(split, role, path)
        return cls(split, paths)

    def check(self) -> int:
        """Reads every line once (UTF-8, TSV columns, equal line counts); returns the
        number of sentence pairs."""
        if len(self.paths) == 1:
            count = sum(1 for _ in _tsv_pairs(self.paths[0]))
            self._nonempty(self.paths[0], count)
            return count
        counts = []
        for path in self.paths:
            counts.append(sum(1 for _ in _lines(path)))
            self._nonempty(path, counts[-1])
        (source, target), (n_source, n_target) = self.paths, counts
        if n_source != n_target:
            raise ValueError(
                f"split {self.split!r}: source file {source} has {n_source} lines but target "
                f"file {target} has {n_target}; a parallel corpus has one sentence per line "
                f"in both"
            )
        return n_source

    def _nonempty(self, path: Path, count: int) -> None:
        if not count:
            raise ValueError(f"split {self.split!r}: {path} is empty")

    def pairs(self) -> Iterator[tuple[str, str]]:
        if len(self.paths) == 1:
            yield from _tsv_pairs(self.paths[0])
        else:
            sources, targets = (_lines(path) for path in self.paths)
            for (_, source), (_, target) in zip(sources, targets, strict=True):
                yield source, target


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) for each line. Only ``\\n`` ends a line: str.splitlines
    would also split at U+2028, form feeds, etc., which occur inside sentences and would
    misalign the two sides."""
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.removesuffix(b"\n").removesuffix(b"\r")
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(
                    f"{path}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start} "
                    f"of the line: {line[max(e.start - 16, 0) : e.start + 16]!r})"
                ) from None


def _tsv_pairs(path: Path) -> Iterator[tuple[str, str]]:
    for number, line in _lines(path):
        columns = line.split("\t")
        if len(columns) != 2:
            raise ValueError(
                f"{path}, line {number}: expected 2 tab-separated columns (source, target), "
                f"found {len(columns)}"
            )
        yield columns[0], columns[1]


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder for one local dataset, a split per corpus (`_LocalCorpus` or
    `_TextCorpus`, ``sizes`` its examples). Not registered: it is only used to write; the
    prepared dataset is read back from its files (``dataset_info.json``, ``features.json``)
    without this class. A subclass gives VERSION, ``_info`` and ``_generate_examples``."""

    def __init__(self, *, name: str, corpora: Mapping[str, Any], sizes, **kwargs):
        self.name = name  # TFDS names the dataset directory after this
        self._corpora = corpora
        self._sizes = sizes
        super().__init__(**kwargs)

    def _files(self, unit: str) -> str:
        """``'train: a.txt, b.txt (10 <unit>); validation: ...'``, for the description."""
        return "; ".join(
            f"{split}: {', '.join(map(str, c.paths))} ({self._sizes[split]} {unit})"
            for split, c in self._corpora.items()
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(c) for split, c in self._corpora.items()}


class _LocalCorpusBuilder(_LocalBuilder, skip_registration=True):
    """A local parallel corpus: features ``source`` and ``target``."""

    VERSION = tfds.core.Version(LOCAL_CORPUS_VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        files = self._files("pairs")
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Local parallel corpus from {files}.",
            features=tfds.features.FeaturesDict(
                {SOURCE: tfds.features.Text(), TARGET: tfds.features.Text()}
            ),
            supervised_keys=(SOURCE, TARGET),
            disable_shuffling=True,  # keep file order; grain shuffles at read time
        )

    def _generate_examples(self, corpus: _LocalCorpus):
        for index, (source, target) in enumerate(corpus.pairs()):
            yield index, {SOURCE: source, TARGET: target}


# ------------------------------------------------------------------ text corpora


@dataclasses.dataclass(frozen=True)
class TextSource(_RandomAccess):
    """Random access to text examples: ``source[i] == {'text': str}``.

    Wraps a `tfds.data_source` (text comes back as UTF-8 bytes) and renames its text
    feature ``key``. A grain ``RandomAccessDataSource``; it pickles."""

    examples: Sequence[Mapping[str, Any]]
    key: str = TEXT

    def _convert(self, example: Mapping[str, Any]) -> dict[str, str]:
        return {TEXT: _text(example[self.key])}

    def __repr__(self) -> str:
        return f"TextSource({self.examples!r}, key={self.key!r}, len={len(self)})"


def load_text_source(name: str, split: str, *, data_dir: PathLike, key: str = TEXT) -> TextSource:
    """The prepared text corpus ``name`` (a local text corpus, or ``'lm1b'``), one split,
    as a random-access `TextSource`. Never downloads or prepares (`DatasetNotPreparedError`
    names the command that does); a parallel corpus is refused."""
    return TextSource(_prepared_split(name, split, data_dir, (key,), text=True), key)


def prepare_text_corpus(
    splits: Mapping[str, PathLike | Sequence[PathLike]],
    *,
    data_dir: PathLike,
    name: str,
    paragraphs: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes local text files as the TFDS text corpus ``name`` (one feature, ``'text'``,
    as TFDS's lm1b) in array_record format under ``data_dir``; returns its directory.

    ``splits`` maps a split name to one file or a sequence of files, read in order:
    ``{'train': ['a.txt', 'b.txt'], 'validation': 'dev.txt'}``. Files are UTF-8 (a leading
    BOM is dropped); lines end at ``\\n`` only (a CRLF's CR is dropped; U+2028, form feeds,
    a lone CR etc. stay inside the line, as in `prepare_local_corpus`). A line is blank when
    it is empty or holds only ASCII spaces and tabs.
    - default: each non-blank line is one example, as it is in the file (lm1b's way);
    - ``paragraphs``: each run of non-blank lines between blank lines is one example, its
      lines joined with ``\\n``.
    Examples keep file order. Every file is read and checked first (UTF-8, no NUL byte, at
    least one example per file), so a bad file leaves ``data_dir`` as it was.
    """
    _check_new_name(name, "{'train': 'train.txt'}", splits)
    if not isinstance(paragraphs, bool):
        raise ValueError(f"paragraphs must be a bool, got {paragraphs!r}")
    corpora = {
        split: _TextCorpus.from_files(split, files, paragraphs) for split, files in splits.items()
    }
    return _write_local(_TextCorpusBuilder, corpora, data_dir, name, overwrite)


@dataclasses.dataclass(frozen=True)
class _TextCorpus:
    """One split's text files, and how they are cut into examples."""

    split: str
    paths: tuple[Path, ...]
    paragraphs: bool

    @classmethod
    def from_files(cls, split: str, files: Any, paragraphs: bool) -> _TextCorpus:
        if isinstance(files, str | os.PathLike):
            files = (files,)
        if not isinstance(files, tuple | list) or not files:
            raise ValueError(f"{_where(split)}give a text file or a list of them, got {files!r}")
        paths = tuple(Path(f) for f in files)
        for path in paths:
            _check_file(split, "text", path)
        return cls(split, paths, paragraphs)

    def check(self) -> int:
        """Reads every file once; returns the number of examples. Refuses a file with none."""
        total = 0
        for path in self.paths:
            count = sum(1 for _ in text_examples(path, paragraphs=self.paragraphs))
            if not count:
                size = path.stat().st_size
                what = "is empty" if size == 0 else f"holds no text ({size} bytes, all blank lines)"
                raise ValueError(f"{_where(self.split)}{path} {what}")
            total += count
        return total

    def examples(self) -> Iterator[str]:
        for path in self.paths:
            yield from text_examples(path, paragraphs=self.paragraphs)


def _where(split: str) -> str:
    return f"split {split!r}: " if split else ""


def _check_file(split: str, role: str, path: Path) -> None:
    """Refuses a `path` that is not a file: ``split 'train': source file x does not exist``."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{_where(split)}{role} file {path} {what}")


def read_text_file(path: PathLike, *, paragraphs: bool = False) -> list[dict[str, str]]:
    """The examples of one text file as a random-access source, ``[{'text': str}, ...]``
    (e.g. to evaluate a language model on it), cut as `text_examples` cuts them. A missing
    file, an empty or all-blank one, bytes that are not UTF-8 or a NUL byte raise an error
    naming the file (and line)."""
    corpus = _TextCorpus.from_files("", path, paragraphs)
    texts = list(corpus.examples())
    if not texts:
        corpus.check()  # raises, saying empty or all blank
    return [{TEXT: text} for text in texts]


def text_examples(path: PathLike, *, paragraphs: bool = False) -> Iterator[str]:
    """The examples of one text file, as `prepare_text_corpus` cuts them: its non-blank
    lines, or with ``paragraphs`` its blank-line-separated paragraphs (lines joined with
    ``\\n``). Raises ValueError naming the file and line for bytes that are not UTF-8 or
    a NUL byte."""
    path, lines = Path(path), []
    for number, line in _lines(path):
        nul = line.find("\0")
        if nul >= 0:
            raise ValueError(
                f"{path}, line {number}: a NUL byte at character {nul + 1} of the line; "
                "UTF-8 text was expected (is this a binary file?)"
            )
        if not line.strip(" \t"):  # blank
            if lines:
                yield "\n".join(lines)
                lines = []
        elif paragraphs:
            lines.append(line)
        else:
            yield line
    if lines:
        yield "\n".join(lines)


class _TextCorpusBuilder(_LocalBuilder, skip_registration=True):
    """A local text corpus: one feature, ``text``."""

    VERSION = tfds.core.Version(LOCAL_TEXT_VERSION)

    def _info(self) -> tfds.core.DatasetInfo:
        files = self._files("examples")
        unit = "paragraph" if any(c.paragraphs for c in self._corpora.values()) else "line"
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Local text corpus, one example per {unit}, from {files}.",
            features=tfds.features.FeaturesDict({TEXT: tfds.features.Text()}),
            disable_shuffling=True,  # keep file order; grain shuffles at read time
        )

    def _generate_examples(self, corpus: _TextCorpus):
        for index, text in enumerate(corpus.examples()):
            yield index, {TEXT: text}


# ---------------------------------------------------------------------------- WMT14


def wmt14_keys(direction: str) -> tuple[str, str]:
    """``'en-de'`` -> ``('en', 'de')``: the WMT14 features read as source and target."""
    parts = tuple(direction.split("-")) if isinstance(direction, str) else ()
    if len(parts) != 2 or set(parts) != set(WMT14_LANGUAGES):
        raise ValueError(f"WMT14 direction must be 'en-de' or 'de-en', got {direction!r}")
    return parts


def load_wmt14(
    split: str, *, data_dir: PathLike, direction: str = "en-de", name: str = WMT14
) -> ParallelTextSource:
    """WMT14 English-German (TFDS ``wmt14_translate/de-en``: train = Europarl v7 +
    CommonCrawl + News Commentary v9, validation = newstest2013, test = newstest2014),
    translating ``direction``."""
    source_key, target_key = wmt14_keys(direction)
    _check_wmt(name)
    return load_source(name, split, data_dir=data_dir, source_key=source_key, target_key=target_key)


def _check_wmt(name: str) -> None:
    if name not in WMT_DATASETS:
        raise ValueError(f"WMT dataset must be one of {WMT_DATASETS}, got {name!r}")


def prepare_wmt14(
    data_dir: PathLike, *, download_dir: PathLike | None = None, name: str = WMT14
) -> Path:
    """Downloads WMT14 de-en from statmt.org (about 1.7 GB of archives) and writes it in
    array_record format under ``data_dir``; returns the dataset's directory. Downloads go
    to ``download_dir`` (default ``data_dir/downloads``) and are reused if present."""
    _check_wmt(name)  # `name=WMT17` prepares wmt17_translate/de-en the same way
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    download_dir = download_dir or os.path.join(os.fspath(data_dir), "downloads")
    with _tf_free_extraction():
        builder.download_and_prepare(
            download_dir=os.fspath(download_dir), file_format=tfds.core.FileFormat.ARRAY_RECORD
        )
    return Path(builder.data_dir)


# ------------------------------------------------------------------------------ lm1b


def prepare_lm1b(data_dir: PathLike, *, download_dir: PathLike | None = None) -> Path:
    """Downloads the One Billion Word benchmark from statmt.org (one 1.8 GB archive) and
    writes TFDS's ``lm1b`` (train: about 30M sentences; test: the held-out 306K; feature
    ``'text'``, each line stripped) in array_record format under ``data_dir``; returns the
    dataset's directory. Downloads go to ``download_dir`` (default ``data_dir/downloads``)
    and are reused if present."""
    builder = tfds.builder(LM1B, data_dir=os.fspath(data_dir))
    download_dir = download_dir or os.path.join(os.fspath(data_dir), "downloads")
    with _tf_free_extraction(), _tf_free_glob(importlib.import_module(type(builder).__module__)):
        builder.download_and_prepare(
            download_dir=os.fspath(download_dir), file_format=tfds.core.FileFormat.ARRAY_RECORD
        )
    return Path(builder.data_dir)


def _glob(pattern: str) -> list[str]:
    """``tf.io.gfile.glob`` for local paths and URLs epath opens (gs:// with gcsfs), sorted
    (TFDS's lm1b reads the files it finds in this order)."""
    if "://" not in pattern:
        return sorted(glob.glob(pattern))
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    root = epath.Path("/".join(parts[:first]))
    return sorted(os.fspath(p) for p in root.glob("/".join(parts[first:])))


@contextlib.contextmanager
def _tf_free_glob(module: types.ModuleType):
    """Gives `module` (a TFDS builder's, which lists its extracted files with
    ``tf.io.gfile.glob``) a ``tf`` that globs without TensorFlow, while the block runs."""
    shim = types.SimpleNamespace(io=types.SimpleNamespace(gfile=types.SimpleNamespace(glob=_glob)))
    saved = module.tf
    module.tf = shim
    try:
        yield
    finally:
        module.tf = saved


@contextlib.contextmanager
def _tf_free_extraction():
    """TFDS (4.9) extracts downloaded archives with Python's tarfile/zipfile but reads and
    writes the files through ``tf.io.gfile`` and ``tf.compat.as_text``: without TensorFlow,
    extraction fails with "No module named 'tensorflow'". While the block runs, this gives
    TFDS's extractor those two functions on `etils.epath` (local files, and gs:// with
    gcsfs), whether or not TensorFlow is installed."""

    def as_text(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def gfile(path, mode):
        return epath.Path(path).open(mode)

    shim = types.SimpleNamespace(
        compat=types.SimpleNamespace(as_text=as_text),
        io=types.SimpleNamespace(gfile=types.SimpleNamespace(GFile=gfile)),
    )
    saved = _tfds_extractor.tf
    _tfds_extractor.tf = shim
    try:
        yield
    finally:
        _tfds_extractor.tf = saved
