"""What a training run learns from: a task gives the batches of each step, the evaluation
splits and (for translation) the vocabulary.

- `ReversalTask`: the synthetic sequence-reversal task; batch t is a pure function of
  (seed, t), so it has no iterator state.
- `TranslationTask`: a parallel corpus (the built-in one, WMT14 or a prepared local corpus),
  SentencePiece vocabulary in the workdir, grain's packed pipeline; its iterator state is
  saved in every checkpoint.
- `LMTask`: a text corpus for a decoder-only language model (the built-in ``toy_lm``,
  TFDS's ``lm1b`` or a prepared local text corpus), the same vocabulary handling and
  packed, resumable pipeline; batches carry the bytes that bits per byte needs.

`task_kind` says which a config's dataset is; `make_task` builds it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

import jax
import ml_collections
import numpy as np

from attention_jax import multihost
from attention_jax.data import pipeline, toy_translation
from attention_jax.data.synthetic import reversal_batch
from attention_jax.data.tokenizer import (
    Tokenizer,
    default_vocab_path,
    sample_indices,
    text_sentences,
)
from attention_jax.workdir import VOCAB_FILE

BUILTIN = "toy_translation"
LM_BUILTIN = "toy_lm"  # the English side of the built-in translation corpus
LM1B = "lm1b"
SPLITS = ("train", "validation", "test")
KINDS = ("reversal", "translation", "lm")


def data_dir(config) -> str:
    """The data directory a run reads, absolute: config.data.data_dir, else TFDS's default
    (``$TFDS_DATA_DIR``, else ~/tensorflow_datasets). Training records it in the workdir's
    config.json (``data.data_dir``), so that evaluation finds the same data whatever its
    environment says."""
    given = config.data.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
    return os.path.abspath(os.path.expanduser(given or "~/tensorflow_datasets"))


def check_dataset(config) -> None:
    """Raises, before anything is written, if the config's dataset is not prepared
    (`sources.DatasetNotPreparedError`, naming the command that prepares it) or has no
    train split."""
    splits = available_splits(config)
    if "train" not in splits:
        raise ValueError(
            f"dataset {config.data.dataset!r} has no train split (it has {list(splits)})"
        )


def available_splits(config) -> tuple[str, ...]:
    """The splits the config's dataset has (a local corpus may lack validation or test;
    lm1b has train and test)."""
    name = config.data.dataset
    if name in ("reversal", BUILTIN, LM_BUILTIN):
        return SPLITS
    from attention_jax.data import sources  # imports TFDS: only for datasets on disk

    return sources.split_names(name, data_dir(config), text=task_kind(config) == "lm")


def task_kind(config) -> str:
    """``'reversal'``, ``'translation'`` or ``'lm'``: what the config's dataset is for.

    Known names say it (``reversal``; ``toy_translation`` and ``wmt*``: translation;
    ``toy_lm`` and ``lm1b``: lm); a prepared local corpus by its features (``text``: lm,
    ``source``/``target``: translation). ``config.data.task``, when set, must agree, and
    decides for a corpus not prepared yet (so that the error names the right prepare
    command); unset and unknown, it is translation."""
    data = config.data
    name = data.dataset
    given = data.get("task") or None
    if given is not None and given not in KINDS:
        raise ValueError(f"config.data.task must be one of {KINDS} or unset, got {given!r}")
    if name == "reversal":
        known = "reversal"
    elif name == BUILTIN or name.startswith("wmt"):
        known = "translation"
    elif name in (LM_BUILTIN, LM1B):
        known = "lm"
    else:
        from attention_jax.data import sources  # imports TFDS: only for datasets on disk

        features = sources.dataset_features(name, data_dir(config))
        if features is None:
            known = None
        elif sources.TEXT in features:
            known = "lm"
        else:
            known = "translation"
    if given is not None and known is not None and given != known:
        what = {"lm": "a text corpus (for a language model)", "translation": "a parallel corpus"}
        raise ValueError(
            f"config.data.task is {given!r} but dataset {name!r} is "
            f"{what.get(known, known)}: choose a {given} dataset or another config"
        )
    return known or given or "translation"


@dataclasses.dataclass
class EvalData:
    """An evaluation split: global batches, and the raw strings for BLEU (None: no text)."""

    batches: list
    sources: list[str] | None = None
    references: list[str] | None = None


class ReversalTask:
    """The built-in sequence-reversal task (no files, no vocabulary)."""

    tokenizer = None
    has_state = False

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.vocab_size = config.model.vocab_size

    def _batch(self, index: int, split: str = "train", *, whole: bool = False) -> dict:
        """This process's rows of batch `index` (``whole``: the global batch)."""
        c = self.config
        return reversal_batch(
            index,
            batch_size=c.batch_size,
            vocab_size=c.model.vocab_size,
            min_len=c.data.min_len,
            max_len=c.data.max_len,
            seed=c.seed,
            split=split,
            process_index=0 if whole else jax.process_index(),
            process_count=1 if whole else jax.process_count(),
        )

    def example_batch(self) -> dict:
        return self._batch(0)

    def next_batch(self, step: int) -> dict:
        return self._batch(step)

    def eval_data(self, split: str) -> EvalData:
        # Global batches, like TranslationTask's: evaluate() feeds each process its rows.
        n = self.config.eval_batches
        return EvalData([self._batch(i, split, whole=True) for i in range(n)])

    def meta(self) -> dict:
        return {"dataset": "reversal"}

    def splits(self) -> tuple[str, ...]:
        return SPLITS


def _load_source(config, split: str):
    """A random-access source of ``{'source', 'target'}`` strings for one split."""
    data = config.data
    name = data.dataset
    if name == BUILTIN:
        pairs = toy_translation.load_split(
            split, seed=data.get("corpus_seed", 0), sizes=tuple(data.corpus_sizes)
        )
        return [{"source": s, "target": t} for s, t in pairs]
    from attention_jax.data import sources  # imports TFDS: only for datasets on disk

    if name.startswith("wmt"):
        keys = sources.wmt14_keys(data.get("direction", "en-de"))
        return sources.load_source(
            name, split, data_dir=data_dir(config), source_key=keys[0], target_key=keys[1]
        )
    return sources.load_source(name, split, data_dir=data_dir(config))


def _rows_per_process(config, data_parallel: int) -> int:
    """This process's rows per batch: ``config.batch_size`` global rows, or (0) as many as
    ``config.data.tokens_per_batch`` tokens per side allow."""
    if config.batch_size:  # a fixed number of rows (global)
        if config.batch_size % (data_parallel * jax.process_count()):
            raise ValueError(
                f"batch_size {config.batch_size} is not divisible by the data-parallel "
                f"size {data_parallel} × {jax.process_count()} processes"
            )
        return config.batch_size // jax.process_count()
    return pipeline.tokens_per_batch_to_batch_size(  # the paper's way: a token budget
        config.data.tokens_per_batch,
        config.data.max_length,
        process_count=jax.process_count(),
        data_parallel=data_parallel,
    )


def _pipeline_options(config, rows: int) -> dict:
    """The keywords `pipeline.train_dataset` and `pipeline.lm_train_dataset` share: the
    seed, ``rows`` per process, ``config.data``'s max_length and loader settings
    (reader_threads, prefetch, workers; 0 when unset), this process's index and count."""
    data = config.data
    return dict(
        seed=config.seed,
        batch_size=rows,
        max_length=data.max_length,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_threads=data.get("reader_threads", 0),
        prefetch=data.get("prefetch", 0),
        worker_count=data.get("workers", 0),
    )


def _eval_batch_size(config, data_parallel: int) -> int:
    """``config.data.eval_batch_size`` global rows, rounded up to a multiple of the
    data-parallel devices × the processes."""
    unit = data_parallel * jax.process_count()
    return -(-config.data.eval_batch_size // unit) * unit


class _CorpusTask:
    """What `TranslationTask` and `LMTask` share: the train split through the workdir's
    vocabulary (`load_or_train_vocabulary`) into grain's packed, resumable pipeline, whose
    iterator state goes into every checkpoint. A subclass says how a split is read
    (`_source`) and which pipeline packs it (`_train_dataset`)."""

    has_state = True

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, *, data_parallel: int):
        self.config = config
        self.max_length = config.data.max_length
        self.train_source = self._source("train")
        self.tokenizer = load_or_train_vocabulary(config, workdir, self.train_source)
        self.vocab_size = self.tokenizer.vocab_size
        self.rows = _rows_per_process(config, data_parallel)  # per process
        self.data_parallel = data_parallel
        dataset = self._train_dataset(
            self.train_source, self.tokenizer, **_pipeline_options(config, self.rows)
        )
        self.iterator = iter(dataset)
        self._eval = {}

    def _source(self, split: str):
        raise NotImplementedError

    def _train_dataset(self, source, tokenizer, **options):
        raise NotImplementedError

    def next_batch(self, step: int) -> dict:
        del step  # the iterator's state says where the stream is
        return next(self.iterator)

    def splits(self) -> tuple[str, ...]:
        return available_splits(self.config)

    def meta(self) -> dict:
        return {
            "dataset": self.config.data.dataset,
            "vocab_fingerprint": self.tokenizer.fingerprint,
            "vocab_size": self.vocab_size,
        }


class TranslationTask(_CorpusTask):
    """A parallel corpus through the SentencePiece vocabulary and grain's packed pipeline."""

    def _source(self, split: str):
        return _load_source(self.config, split)

    def _train_dataset(self, source, tokenizer, **options):
        return pipeline.train_dataset(source, tokenizer, **options)

    def example_batch(self) -> dict:
        shape = (self.rows, self.max_length)
        return {"inputs": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32)}

    def eval_data(self, split: str) -> EvalData:
        """The split's first ``config.data.eval_examples`` pairs (all when 0), as global
        batches of ``config.data.eval_batch_size`` rows. Every process builds the whole
        split and feeds its rows of each batch, so every process can score all of it."""
        if split not in self._eval:
            ev = pipeline.eval_batches(
                self._source(split),
                self.tokenizer,
                batch_size=_eval_batch_size(self.config, self.data_parallel),
                max_length=self.max_length,
                limit=self.config.data.eval_examples or None,
            )
            self._eval[split] = EvalData(ev.batches, ev.sources, ev.references)
        return self._eval[split]


def _load_text_source(config, split: str):
    """A random-access source of ``{'text'}`` strings for one split of an LM dataset."""
    data = config.data
    if data.dataset == LM_BUILTIN:
        sizes = tuple(data.get("corpus_sizes", toy_translation.DEFAULT_SIZES))
        pairs = toy_translation.load_split(split, seed=data.get("corpus_seed", 0), sizes=sizes)
        return [{"text": english} for english, _ in pairs]
    from attention_jax.data import sources  # imports TFDS: only for datasets on disk

    return sources.load_text_source(data.dataset, split, data_dir=data_dir(config))


class LMTask(_CorpusTask):
    """A text corpus for a decoder-only language model: the workdir's SentencePiece
    vocabulary, grain's packed pipeline (`pipeline.lm_train_dataset`), iterator state in
    every checkpoint.

    Batches (numpy int32 [rows, max_length]): ``targets`` (each example's tokens + EOS,
    0 = padding), ``targets_positions``, ``targets_segmentation`` (packing) and
    ``targets_bytes`` (UTF-8 bytes per token; EOS counts 1 byte, the example's newline), so
    bits per byte = sum of NLL over tokens with segmentation > 0 / ln 2 / sum of
    targets_bytes (`pipeline.language_model_scores`). The model predicts every token,
    the first from the start token. Config keys read (``config.data``): dataset, max_length,
    tokens_per_batch (when ``config.batch_size`` is 0), eval_batch_size, eval_examples,
    eval_packed (default True), corpus_seed / corpus_sizes (toy_lm), vocab_path,
    vocab_sentences, data_dir, reader_threads, prefetch, workers; and ``config.seed``.
    """

    def _source(self, split: str):
        return _load_text_source(self.config, split)

    def _train_dataset(self, source, tokenizer, **options):
        return pipeline.lm_train_dataset(source, tokenizer, **options)

    def example_batch(self) -> dict:
        shape = (self.rows, self.max_length)
        return {key: np.zeros(shape, np.int32) for key in pipeline.LM_BATCH_KEYS}

    def eval_data(self, split: str) -> EvalData:
        """The split's first ``config.data.eval_examples`` examples (all when 0), every
        token once (`pipeline.lm_eval_batches`), as global batches of
        ``config.data.eval_batch_size`` rows (rounded up to a multiple of the devices);
        each process feeds its rows of each batch. ``sources``/``references`` are None."""
        if split not in self._eval:
            self._eval[split] = self.eval_texts(self._source(split))
        return self._eval[split]

    def eval_texts(self, source) -> EvalData:
        """Evaluation batches of any texts, as `eval_data` (`lm_eval_data`)."""
        return lm_eval_data(self.config, self.tokenizer, source, data_parallel=self.data_parallel)


def lm_eval_data(config, tokenizer, source, *, data_parallel: int) -> EvalData:
    """Evaluation batches of texts for a language model of `config`: `source` is random
    access to ``{'text': str}`` (a split, or e.g. ``[{'text': t} for t in
    sources.text_examples(path)]`` for a file), `tokenizer` the workdir's. Its first
    ``config.data.eval_examples`` examples (all when 0), every token once, packed unless
    ``config.data.eval_packed`` is False, as global batches of ``config.data.eval_batch_size``
    rows rounded up to a multiple of ``data_parallel`` × the processes."""
    data = config.data
    ev = pipeline.lm_eval_batches(
        source,
        tokenizer,
        batch_size=_eval_batch_size(config, data_parallel),
        max_length=data.max_length,
        packed=data.get("eval_packed", True),
        limit=data.get("eval_examples", 0) or None,
    )
    return EvalData(ev.batches)


def load_eval_texts(config, split: str) -> list[str]:
    """The texts (examples) of a split of the config's LM dataset."""
    if task_kind(config) != "lm":
        raise ValueError(f"dataset {config.data.dataset!r} is not a text corpus")
    splits = available_splits(config)
    if split not in splits:
        raise ValueError(
            f"dataset {config.data.dataset!r} has no {split!r} split (it has {list(splits)})"
        )
    source = _load_text_source(config, split)
    return [source[i]["text"] for i in range(len(source))]


def load_eval_pairs(config, split: str) -> tuple[list[str], list[str]]:
    """The source sentences and references of a split of the config's dataset."""
    if config.data.dataset == "reversal":
        raise ValueError("the reversal task has no text to translate")
    if task_kind(config) == "lm":
        raise ValueError(
            f"dataset {config.data.dataset!r} is a text corpus (for a language model): it has "
            "no translations"
        )
    splits = available_splits(config)
    if split not in splits:
        raise ValueError(
            f"dataset {config.data.dataset!r} has no {split!r} split (it has {list(splits)}); "
            "choose another --split, or give --source and --reference files"
        )
    source = _load_source(config, split)
    pairs = [source[i] for i in range(len(source))]
    return [p["source"] for p in pairs], [p["target"] for p in pairs]


def prepared_vocabularies(config) -> dict[int, str]:
    """{size: path} of the vocabularies prepare_data.py stored for the config's dataset
    (``<data_dir>/<dataset>/spm_bpe_<size>.model``)."""
    folder = os.path.join(data_dir(config), *config.data.dataset.split("/"))
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "spm_bpe_*.model")):
        match = re.fullmatch(r"spm_bpe_([0-9]+)\.model", os.path.basename(path))
        if match and int(match.group(1)) > 0:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def resolve_vocab_size(config, workdir: str | None) -> tuple[int, str | None]:
    """(V, the vocabulary file it comes from, or None) for a run of `config` in `workdir`.

    The model's vocabulary size is the vocabulary's, not a number in the config file: the
    workdir's own copy (a resumed run), else ``config.data.vocab_path``, else the one
    prepare_data.py stored for the dataset (for the built-in corpus: only one of the config's
    size). ``config.model.vocab_size`` chooses among several prepared sizes, and is the size
    of the vocabulary trained when there is none. `workdir` None: a new workdir."""
    size = config.model.vocab_size
    if config.data.dataset == "reversal":
        return size, None
    in_workdir = os.path.join(workdir, VOCAB_FILE) if workdir else ""
    for path in (in_workdir, config.data.get("vocab_path") or ""):
        if path and os.path.exists(path):
            return Tokenizer.load(path).vocab_size, path
    prepared = prepared_vocabularies(config)
    if size in prepared:
        return size, prepared[size]
    if config.data.dataset in (BUILTIN, LM_BUILTIN):
        # Generated in memory; a prepared vocabulary of it is only a cache of the one each
        # workdir would train, used when its size is the config's.
        return size, None
    if len(prepared) == 1:
        ((found, path),) = prepared.items()
        return found, path
    if prepared:
        raise ValueError(
            f"dataset {config.data.dataset!r} has prepared vocabularies of "
            f"{sorted(prepared)} pieces and none of config.model.vocab_size={size}; choose one "
            f"with --config.model.vocab_size={next(iter(prepared))}"
        )
    return size, None  # none yet: one of config.model.vocab_size pieces is trained


def load_or_train_vocabulary(config, workdir: str, train_source):
    """The workdir's vocabulary (``<workdir>/vocab.model``), created on the first run: copied
    from ``config.data.vocab_path`` or from the one prepare_data.py stored for the dataset,
    else trained on the training split. Resuming and evaluation reuse the workdir's copy."""
    path = os.path.join(workdir, VOCAB_FILE)
    size = config.model.vocab_size
    refused = None  # raised after the sync below, so that no other process waits forever
    if jax.process_index() == 0 and not os.path.exists(path):  # process 0 makes it
        try:
            _make_vocabulary(config, path, train_source)
        except (ValueError, OSError, RuntimeError) as e:
            refused = e
    multihost.sync("vocabulary")  # the others wait for it
    if refused is not None:
        raise refused
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} was not created: see process 0's error")
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size != size:
        raise ValueError(
            f"the vocabulary {path} has {tokenizer.vocab_size} pieces but config.model."
            f"vocab_size is {size}; use a new --workdir or set vocab_size={tokenizer.vocab_size}"
        )
    return tokenizer


def _make_vocabulary(config, path: str, train_source) -> None:
    """Writes the workdir's vocabulary: ``config.data.vocab_path``, else the one
    prepare_data.py stored, else one trained on the training split."""
    size = config.model.vocab_size
    given = config.data.get("vocab_path") or ""
    prepared = default_vocab_path(data_dir(config), config.data.dataset, size)
    if given or os.path.exists(prepared):
        source = given or prepared
        tokenizer = Tokenizer.load(source)
        if tokenizer.vocab_size != size:  # refused before it becomes the workdir's copy
            raise ValueError(
                f"the vocabulary {source} has {tokenizer.vocab_size} pieces but "
                f"config.model.vocab_size is {size}; set vocab_size={tokenizer.vocab_size}"
                + (" or another config.data.vocab_path" if given else "")
            )
    else:
        limit = config.data.get("vocab_sentences", 2_000_000)
        if task_kind(config) == "lm":
            indices = sample_indices(len(train_source), limit)
            sentences = text_sentences(train_source, indices)
            what = "texts"
        else:
            indices = range(min(len(train_source), max(limit // 2, 1)))
            examples = (train_source[i] for i in indices)
            sentences = (text for ex in examples for text in (ex["source"], ex["target"]))
            what = "pairs"
        print(
            f"training a {size}-piece SentencePiece vocabulary on {len(indices)} {what}",
            flush=True,
        )
        tokenizer = Tokenizer.train(sentences, size)
    tokenizer.save(path)


def make_task(config: ml_collections.ConfigDict, workdir: str, *, data_parallel: int):
    """The task named by ``config.data.dataset`` (`task_kind`)."""
    kind = task_kind(config)
    if kind == "reversal":
        return ReversalTask(config)
    if kind == "lm":
        return LMTask(config, workdir, data_parallel=data_parallel)
    return TranslationTask(config, workdir, data_parallel=data_parallel)
