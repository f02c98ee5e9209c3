"""``attention-jax prepare``: prepare a dataset (TFDS, array_record) and train its BPE
vocabulary. ``experiments/prepare_data.py`` runs this module.

Translation (parallel text; one vocabulary shared by both sides):

attention-jax prepare --dataset=toy_translation             # built in, seconds
attention-jax prepare --dataset=wmt14_translate/de-en       # ~1.7 GB download
attention-jax prepare --dataset=local --name=my_corpus \\
    --train=train.en,train.de --validation=dev.tsv --vocab_size=8000

Language modelling (text; the built-in toy_lm needs no preparing):

attention-jax prepare --dataset=lm1b                        # ~1.8 GB download
attention-jax prepare --dataset=local_text --name=my_text \\
    --train=a.txt,b.txt --validation=dev.txt [--paragraphs] --vocab_size=8000

A text file is UTF-8 (a leading BOM is dropped; lines end at "\\n" only, a CRLF's CR is
dropped, U+2028 and the like stay inside a line); each non-blank line is one example, or
with --paragraphs each run of non-blank lines between blank lines (lines joined by "\\n").
Every file is checked before anything is written: an empty or all-blank file, bytes that
are not UTF-8 or a NUL byte stop it with one line naming the file (and line).

The dataset goes to DATA_DIR/<dataset>/<version>/ and its vocabulary, trained on the
train split (both sides of a parallel corpus), to DATA_DIR/<dataset>/spm_bpe_<size>.model
(attention_jax.data.tokenizer.default_vocab_path). A dataset that is already prepared is
reused (a local corpus needs --overwrite), and so is an existing vocabulary of that size.
Training takes the model's vocabulary size from that file. Any failure is one line on stderr
and exit status 1 (--verbosity=1 or ATTENTION_JAX_TRACEBACK=1 shows the traceback).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from tqdm import tqdm

from attention_jax.cli import errors
from attention_jax.data import sources, toy_translation
from attention_jax.data.tokenizer import (
    Tokenizer,
    default_vocab_path,
    pair_sentences,
    sample_indices,
    sample_pairs,
    text_sentences,
)

TOY, LOCAL, LOCAL_TEXT, LM1B = "toy_translation", "local", "local_text", sources.LM1B
DEFAULT_VOCAB_SIZES = {
    TOY: 1000,
    sources.WMT14: 37000,
    sources.WMT17: 37000,
    LOCAL: 8000,
    LM1B: 30000,  # flax examples/lm1b's
    LOCAL_TEXT: 8000,
}
TEXT_DATASETS = (LM1B, LOCAL_TEXT)
STATS_PAIRS = 1000  # pairs tokenized for the tokens-per-sentence line of the summary

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "dataset",
    None,
    [TOY, sources.WMT14, sources.WMT17, LOCAL, LM1B, LOCAL_TEXT],
    "toy_translation: the built-in corpus; wmt14_translate/de-en (wmt17_translate/de-en): "
    "WMT14 (WMT17) from statmt.org; "
    "local: your parallel files (--name, --train, --validation, --test); "
    "lm1b: the One Billion Word benchmark from statmt.org (text, for a language model); "
    "local_text: your text files (--name, --train, --validation, --test; --paragraphs).",
)
flags.DEFINE_string(
    "name", None, "--dataset=local / local_text: the dataset's name, lower_snake_case."
)
for _split in toy_translation.SPLITS:
    flags.DEFINE_string(
        _split,
        None,
        f"--dataset=local: the {_split} split, as SOURCE_FILE,TARGET_FILE (line-aligned) "
        f"or one two-column FILE.tsv. --dataset=local_text: FILE[,FILE...], read in order"
        + (" (required)." if _split != "test" else "."),
    )
flags.DEFINE_bool(
    "paragraphs",
    False,
    "--dataset=local_text: one example per blank-line-separated paragraph (its lines "
    "joined by newlines), not per line.",
)
flags.DEFINE_string(
    "data_dir", None, "TFDS data directory; default $TFDS_DATA_DIR or ~/tensorflow_datasets."
)
flags.DEFINE_integer(
    "vocab_size",
    None,
    "Pieces in the shared BPE vocabulary; 0 skips it. Default: "
    + ", ".join(f"{size} for {name}" for name, size in DEFAULT_VOCAB_SIZES.items())
    + ".",
    lower_bound=0,
)
flags.DEFINE_integer(
    "vocab_sentences",
    2_000_000,
    "Train the vocabulary on at most this many sentences (a fixed-seed sample of the train "
    "split's pairs, both sides; of a text corpus, its examples).",
    lower_bound=2,
)
flags.DEFINE_enum(
    "direction", "en-de", ["en-de", "de-en"], "WMT14: source-target (the vocabulary is shared)."
)
flags.DEFINE_bool("overwrite", False, "Prepare the dataset and train the vocabulary again.")
flags.mark_flag_as_required("dataset")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # TFDS logs every file at INFO; -v=0 shows it
    dataset = FLAGS.dataset
    local_flags = ["name", *toy_translation.SPLITS]
    if dataset in (LOCAL, LOCAL_TEXT):
        if not FLAGS.name or not FLAGS.train:
            raise errors.CommandError(
                f"--dataset={dataset} needs --name and --train (and "
                + ("--validation, optionally --test)" if dataset == LOCAL_TEXT else
                   "optionally --validation, --test)")
            )  # fmt: skip
        if dataset == LOCAL_TEXT and not FLAGS.validation:
            raise errors.CommandError(
                "--dataset=local_text needs --validation=FILE: the held-out text that "
                "perplexity and bits per byte are measured on"
            )
        if not re.fullmatch(r"[a-z][a-z0-9_]*", FLAGS.name):  # the rule of sources.py
            raise errors.CommandError(
                f"--name must be lower_snake_case (letters, digits, _), got {FLAGS.name!r}"
            )
        split_files = _split_files if dataset == LOCAL else _text_files
        splits = {
            s: split_files(s, FLAGS[s].value)
            for s in toy_translation.SPLITS
            if FLAGS[s].value is not None
        }
    else:
        given = [f"--{f}" for f in local_flags if FLAGS[f].value is not None]
        if given:
            raise errors.CommandError(
                f"{', '.join(given)} only go with --dataset=local or --dataset=local_text"
            )
    if FLAGS.paragraphs and dataset != LOCAL_TEXT:
        raise errors.CommandError("--paragraphs only goes with --dataset=local_text")
    data_dir = os.path.abspath(
        os.path.expanduser(FLAGS.data_dir or tfds.core.constants.get_default_data_dir())
    )
    vocab_size = DEFAULT_VOCAB_SIZES[dataset] if FLAGS.vocab_size is None else FLAGS.vocab_size
    try:
        if dataset in (LOCAL, LOCAL_TEXT):
            name, fresh = FLAGS.name, _prepare_local(splits, data_dir, FLAGS.name, dataset)
        elif dataset == LM1B:
            name, fresh = LM1B, _prepare_lm1b(data_dir)
        elif dataset == TOY:
            name, fresh = TOY, _prepare_toy(data_dir)
        else:
            name, fresh = dataset, _prepare_wmt(dataset, data_dir)
        print(f"dataset:    {_describe_dataset(name, data_dir)}", flush=True)
    except (ValueError, OSError) as e:  # bad files, names: the message says it all
        raise errors.CommandError(_message(e)) from e
    if vocab_size == 0:
        print("vocabulary: skipped (--vocab_size=0)")
        return
    try:
        _vocabulary(dataset, name, data_dir, vocab_size, fresh)
    except (ValueError, OSError) as e:
        hint = ""
        if "vocab_size=" in str(e):  # Tokenizer.train: too large or too small for the corpus
            again = "--overwrite and " if dataset in (LOCAL, LOCAL_TEXT) else ""
            hint = f" (the dataset is prepared; run this again with {again}another --vocab_size)"
        raise errors.CommandError(_message(e) + hint) from e


def _message(error: Exception) -> str:
    """Our own errors' messages as they are; an operating system's (errno set) described."""
    if isinstance(error, OSError) and error.errno is not None:
        return errors.describe(error)
    return str(error)


def _vocabulary(dataset, name, data_dir, vocab_size, fresh):
    """Trains and saves the shared vocabulary, unless one of this size is there already
    for a dataset prepared before this run."""
    path = default_vocab_path(data_dir, name, vocab_size)
    if path.exists() and not (fresh or FLAGS.overwrite):
        tokenizer = Tokenizer.load(path)
        print(
            f"vocabulary: {path} exists, kept ({tokenizer.vocab_size} pieces, "
            f"fingerprint {tokenizer.fingerprint}; --overwrite trains it again)"
        )
        return
    if dataset in sources.WMT_DATASETS:
        train = sources.load_wmt14(
            "train", data_dir=data_dir, direction=FLAGS.direction, name=dataset
        )
    elif dataset in TEXT_DATASETS:
        train = sources.load_text_source(name, "train", data_dir=data_dir)
    else:
        train = sources.load_source(name, "train", data_dir=data_dir)
    if dataset in TEXT_DATASETS:
        tokenizer = _train_text_vocabulary(train, vocab_size, FLAGS.vocab_sentences)
    else:
        tokenizer = _train_vocabulary(train, vocab_size, FLAGS.vocab_sentences)
    tokenizer.save(path)
    print(
        f"vocabulary: {path} ({tokenizer.vocab_size} pieces, fingerprint {tokenizer.fingerprint})"
    )


def _split_files(split, value):
    """'a.en,a.de' -> ('a.en', 'a.de'); 'a.tsv' -> 'a.tsv'."""
    parts = value.split(",")
    if len(parts) > 2 or not all(parts):
        raise errors.CommandError(
            f"--{split}={value!r}: give SOURCE_FILE,TARGET_FILE or one FILE.tsv"
        )
    return tuple(parts) if len(parts) == 2 else parts[0]


def _text_files(split, value):
    """'a.txt,b.txt' -> ('a.txt', 'b.txt')."""
    parts = tuple(value.split(","))
    if not all(parts):
        raise errors.CommandError(
            f"--{split}={value!r}: give FILE or FILE,FILE,... (no empty names)"
        )
    return parts


def _is_prepared(name, data_dir):
    return sources.dataset_features(name, data_dir) is not None


def _prepare_local(splits, data_dir, name, dataset):
    """Returns True: a local corpus is always prepared here (or refused)."""
    if _is_prepared(name, data_dir) and not FLAGS.overwrite:
        raise FileExistsError(
            f"dataset {name!r} is already prepared in {os.path.join(data_dir, name)}; pass "
            f"--overwrite to replace it and its vocabulary"
        )
    print(f"preparing {name} from {splits} ...", flush=True)
    if dataset == LOCAL_TEXT:
        prepare = functools.partial(sources.prepare_text_corpus, paragraphs=FLAGS.paragraphs)
    else:
        prepare = sources.prepare_local_corpus
    prepare(splits, data_dir=data_dir, name=name, overwrite=FLAGS.overwrite)
    return True


def _prepare_lm1b(data_dir):
    """Downloads and prepares lm1b unless it is prepared; True if it did."""
    return _prepare_download(LM1B, data_dir, "1.8 GB", sources.prepare_lm1b)


def _prepare_download(name, data_dir, size, prepare):
    """Runs ``prepare(data_dir)`` (which downloads `size` and prepares dataset `name`)
    unless `name` is prepared (--overwrite: removes it first, keeping the downloads); True
    if it did."""
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        if not FLAGS.overwrite:
            print(f"{name} is already prepared in {builder.data_dir}; reusing it")
            return False
        print(f"--overwrite: removing {builder.data_dir} (downloads are kept)", flush=True)
        shutil.rmtree(builder.data_dir)
    print(
        f"preparing {name}: downloads {size} from statmt.org into "
        f"{os.path.join(data_dir, 'downloads')}, then writes array_record files ...",
        flush=True,
    )
    prepare(data_dir)
    return True


def _prepare_toy(data_dir):
    """Writes the built-in corpus (toy_translation.DEFAULT_SIZES, seed 0); True if it did."""
    if _is_prepared(TOY, data_dir) and not FLAGS.overwrite:
        print(f"{TOY} is already prepared in {data_dir}; reusing it")
        return False
    print(
        f"generating {TOY} (train, validation, test: {toy_translation.DEFAULT_SIZES}) ...",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        files = toy_translation.write_split_files(tmp)
        sources.prepare_local_corpus(files, data_dir=data_dir, name=TOY, overwrite=FLAGS.overwrite)
    return True


def _prepare_wmt(name, data_dir):
    """Downloads and prepares WMT14 / WMT17 unless it is prepared; True if it did."""
    return _prepare_download(
        name, data_dir, "several GB", lambda d: sources.prepare_wmt14(d, name=name)
    )


def _describe_dataset(name, data_dir):
    builder = tfds.builder(name, data_dir=data_dir)
    sizes = ", ".join(f"{s} {info.num_examples:,}" for s, info in builder.info.splits.items())
    unit = "examples" if sources.TEXT in builder.info.features else "pairs"
    return f"{name} in {builder.data_dir} ({unit}: {sizes})"


def _train_vocabulary(train, vocab_size, max_sentences):
    indices = sample_pairs(len(train), max_sentences)
    sentences = pair_sentences(train, indices)
    tokenizer, seconds = _read_and_train(
        sentences,
        total=2 * len(indices),
        unit="sentences",
        sample=f"{len(indices):,} of {len(train):,} train pairs",
        vocab_size=vocab_size,
        max_sentences=max_sentences,
    )
    pairs = [train[int(i)] for i in indices[:STATS_PAIRS]]
    mean = {
        side: np.mean([len(tokenizer.encode(pair[side])) for pair in pairs])
        for side in (sources.SOURCE, sources.TARGET)
    }
    print(
        f"trained in {seconds:.1f} s; tokens per sentence on {len(pairs):,} train pairs: "
        f"source {mean['source']:.1f}, target {mean['target']:.1f}"
    )
    return tokenizer


def _train_text_vocabulary(train, vocab_size, max_sentences):
    indices = sample_indices(len(train), max_sentences)
    sentences = text_sentences(train, indices)
    tokenizer, seconds = _read_and_train(
        sentences,
        total=len(indices),
        unit="texts",
        sample=f"{len(indices):,} of {len(train):,} train examples",
        vocab_size=vocab_size,
        max_sentences=max_sentences,
    )
    texts = [train[int(i)]["text"] for i in indices[:STATS_PAIRS]]
    tokens = sum(len(tokenizer.encode(t)) for t in texts)
    size = sum(len(t.encode("utf-8")) for t in texts)
    print(
        f"trained in {seconds:.1f} s; on {len(texts):,} train examples: "
        f"{tokens / len(texts):.1f} tokens per example, {size / max(tokens, 1):.2f} bytes "
        f"per token"
    )
    return tokenizer


def _read_and_train(sentences, *, total, unit, sample, vocab_size, max_sentences):
    """Reads the `total` `sentences` (progress counted in `unit`; `sample` says which train
    examples they come from) and trains the vocabulary on them; returns (tokenizer, seconds
    of training)."""
    start = time.perf_counter()
    sentences = list(
        tqdm(
            sentences,
            total=total,
            desc=f"reading train {unit}",
            unit=f" {unit}",
            unit_scale=True,
            mininterval=1.0,
        )
    )
    read = time.perf_counter() - start
    print(
        f"training a {vocab_size}-piece BPE vocabulary on {len(sentences):,} {unit} "
        f"({sample}, read in {read:.1f} s) ...",
        flush=True,
    )
    start = time.perf_counter()
    tokenizer = Tokenizer.train(sentences, vocab_size, max_sentences=max_sentences)
    return tokenizer, time.perf_counter() - start


def run(argv: list[str] | None = None) -> None:
    """The command: flags from `argv` (default sys.argv), errors as one line."""
    argv = list(sys.argv if argv is None else argv)
    for flag in FLAGS.get_key_flags_for_module(__name__):  # --helpshort lists the main
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # module's: these are ours
    prog = argv[0] if " " in argv[0] else os.path.basename(argv[0])
    errors.run(main, prog, argv=argv)


if __name__ == "__main__":
    run()
