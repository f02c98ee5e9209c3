"""Parallel-text sources: TFDS datasets in ``array_record`` format, read by random access.

No TensorFlow is needed to prepare or to read them. A dataset is prepared once into
``data_dir/NAME/VERSION/*.array_record-*`` and read back with ``tfds.data_source``, which
grain can shuffle, shard and batch by index. Every source yields
``{'source': str, 'target': str}``, whatever the underlying TFDS feature names are.

Two kinds of dataset:
- a local line-aligned corpus (two text files, or one two-column TSV per split), turned into
  a TFDS dataset by `prepare_local_corpus`;
- WMT14 English-German, TFDS's ``wmt14_translate/de-en`` builder, prepared by `prepare_wmt14`
  and read in either direction by `load_wmt14`.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
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
LOCAL_CORPUS_VERSION = "1.0.0"
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

PathLike = str | os.PathLike
# One split of a local corpus: a TSV path, or a (source path, target path) pair.
SplitFiles = PathLike | tuple[PathLike, PathLike]

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SPLIT = re.compile(r"[A-Za-z0-9_]+")


class DatasetNotPreparedError(FileNotFoundError):
    """The named dataset has no prepared copy under the data directory."""


# ---------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class ParallelTextSource:
    """Random access to sentence pairs: ``source[i] == {'source': str, 'target': str}``.

    Wraps a `tfds.data_source` (whose text features come back as UTF-8 bytes) and renames
    its two text features ``source_key`` and ``target_key``. It has ``__len__`` and
    ``__getitem__``, so it is a grain ``RandomAccessDataSource``, and it pickles, so grain
    worker processes can open it.
    """

    examples: Sequence[Mapping[str, Any]]
    source_key: str = SOURCE
    target_key: str = TARGET

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, str]:
        # ArrayRecord answers any key outside [0, n) with ValueError; a sequence raises
        # IndexError (which also ends `for example in source`) and counts back from -1.
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        return to_pair(self.examples[index % len(self)], self.source_key, self.target_key)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
        """Batched read: one ArrayRecord call for many indices."""
        n = len(self)
        bad = [i for i in indices if not -n <= i < n]
        if bad:
            raise IndexError(f"indices {bad} out of range for {n} examples")
        examples = self.examples.__getitems__([i % n for i in indices])
        return [to_pair(e, self.source_key, self.target_key) for e in examples]

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
    builder = _prepared_builder(name, data_dir)
    splits = sorted(builder.info.splits)
    if split not in builder.info.splits:
        raise ValueError(
            f"dataset {name!r} in {builder.data_dir} has no split {split!r}; it has {splits}"
        )
    file_format = builder.info.file_format
    if file_format is not tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(
            f"dataset {name!r} in {builder.data_dir} is stored as {file_format}, which has no "
            f"random access; prepare it again as array_record: " + prepare_command(name, data_dir)
        )
    features = sorted(builder.info.features.keys())
    for key in (source_key, target_key):
        if key not in features:
            raise ValueError(f"dataset {name!r} has no feature {key!r}; it has {features}")
    return ParallelTextSource(builder.as_data_source(split=split), source_key, target_key)


def _prepared_builder(name: str, data_dir: PathLike) -> tfds.core.DatasetBuilder:
    data_dir = os.fspath(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError:
        builder = None  # neither a TFDS builder nor a dataset on disk
    if builder is None or not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"dataset {name!r} is not prepared in {data_dir} (looked for "
            f"{os.path.join(data_dir, *name.split('/'))}/<version>/dataset_info.json); "
            f"prepare it with: " + prepare_command(name, data_dir)
        )
    return builder


def prepare_command(name: str, data_dir: PathLike) -> str:
    """The command that prepares dataset `name`: ``--dataset=NAME`` for the ones the prepare
    command downloads or generates (WMT14/17, the built-in corpus), ``--dataset=local
    --name=NAME`` with the corpus's files for any other name (a local corpus)."""
    if name in (*WMT_DATASETS, "toy_translation"):
        return PREPARE_COMMAND.format(name=name, data_dir=data_dir)
    return PREPARE_LOCAL_COMMAND.format(name=name, data_dir=data_dir) + (
        " (your corpus: line-aligned SOURCE_FILE,TARGET_FILE or a two-column TSV per split)"
    )


def split_names(name: str, data_dir: PathLike) -> tuple[str, ...]:
    """The splits of the prepared dataset `name` (raises `DatasetNotPreparedError`)."""
    return tuple(_prepared_builder(name, data_dir).info.splits)


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
        raise ValueError("splits is empty; give at least one, e.g. {'train': 'train.tsv'}")
    corpora = {}
    for split, files in splits.items():
        if not isinstance(split, str) or not _SPLIT.fullmatch(split):
            raise ValueError(f"split names are letters, digits and _, got {split!r}")
        corpora[split] = _LocalCorpus.from_files(split, files)
    sizes = {split: corpus.check() for split, corpus in corpora.items()}

    builder = _LocalCorpusBuilder(
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
            if not path.is_file():
                what = "is a directory, not a file" if path.is_dir() else "does not exist"
                raise FileNotFoundError(f"split {split!r}: {role} file {path} {what}")
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


class _LocalCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS builder for one local corpus. Not registered: it is only used to write; the
    prepared dataset is read back from its files (``dataset_info.json``, ``features.json``)
    without this class."""

    VERSION = tfds.core.Version(LOCAL_CORPUS_VERSION)

    def __init__(self, *, name: str, corpora: Mapping[str, _LocalCorpus], sizes, **kwargs):
        self.name = name  # TFDS names the dataset directory after this
        self._corpora = corpora
        self._sizes = sizes
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        files = "; ".join(
            f"{split}: {', '.join(map(str, c.paths))} ({self._sizes[split]} pairs)"
            for split, c in self._corpora.items()
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Local parallel corpus from {files}.",
            features=tfds.features.FeaturesDict(
                {SOURCE: tfds.features.Text(), TARGET: tfds.features.Text()}
            ),
            supervised_keys=(SOURCE, TARGET),
            disable_shuffling=True,  # keep file order; grain shuffles at read time
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(c) for split, c in self._corpora.items()}

    def _generate_examples(self, corpus: _LocalCorpus):
        for index, (source, target) in enumerate(corpus.pairs()):
            yield index, {SOURCE: source, TARGET: target}


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
