"""``attention-jax evaluate`` (also ``experiments/evaluate.py``): score a trained workdir,
on a split of its dataset or on your own files. A translation workdir: sacreBLEU and chrF of
its translations. A language-model workdir (config.json's ``data.task='lm'``): per-token
loss, perplexity and bits per byte.

    attention-jax evaluate --workdir=/tmp/aj_default                 # its test split
    attention-jax evaluate --workdir=... --split=validation --average_last=5
    attention-jax evaluate --workdir=... --source=newstest.en --reference=newstest.de
    attention-jax evaluate --workdir=/tmp/aj_lm                      # its validation split
    attention-jax evaluate --workdir=/tmp/aj_lm --text=held_out.txt

The dataset is read from --data_dir, else the data dir the training run recorded in its
config.json (config.data.data_dir), else $TFDS_DATA_DIR / ~/tensorflow_datasets. --source
and --reference are read as translate reads its input (lines end at "\\n" only; see
attention_jax/cli/translate.py) and must have the same number of lines.

A language model is scored as training scores it (`train.loop.lm_sums`: every token once,
no label smoothing, summed in float64), on the whole split (default: the run's
``data.eval_split``, validation unless set; training's periodic evaluation reads only its
first ``data.eval_examples``) or on --text=FILE, UTF-8 text read as ``prepare_data.py
--dataset=local_text`` reads it (each non-blank line one example; a BOM and CRLF's CR
dropped; ``--paragraphs`` joins blank-line-separated paragraphs). Output, one metric a line
after a header line, e.g.::

    examples: 32  tokens: 611  bytes: 1994  checkpoints: [3]  split: validation
    loss 2.812345  (nats per token)
    perplexity 16.650987  (exp(loss))
    bits_per_byte 1.237834  (NLL in bits / UTF-8 bytes, each example's newline counted)

Flags of one kind given with a workdir of the other (e.g. --beam_size or --source with a
language model, --text with a translation model) stop the command with one line.
"""

from __future__ import annotations

from absl import app, flags, logging

from attention_jax.cli import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's --workdir.")
flags.DEFINE_string(
    "split",
    None,
    "A split of the run's dataset (ignored with --source or --text). Default: test for a "
    "translation model; for a language model the run's data.eval_split (validation unless set).",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "Where the dataset is prepared (default: the data dir recorded in the workdir's "
    "config.json, else $TFDS_DATA_DIR or ~/tensorflow_datasets). Ignored with --source / --text.",
)
flags.DEFINE_integer("average_last", 0, "Average the last k checkpoints.", lower_bound=0)
flags.DEFINE_integer(
    "batch_size",
    None,
    "Translation: sentences per decoding batch (default 64). Language model: rows of "
    "data.max_length tokens per scoring batch (default: the run's data.eval_batch_size).",
    lower_bound=1,
)
# Translation only.
flags.DEFINE_string("source", None, "A source file, one sentence per line (with --reference).")
flags.DEFINE_string("reference", None, "The reference translations, line-aligned with --source.")
flags.DEFINE_string(
    "hypotheses", None, "Also write the translations here, one per source line ('-': stdout)."
)
flags.DEFINE_integer("beam_size", 4, "Beam width; 1 = greedy.", lower_bound=1)
flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent.", lower_bound=0.0)
flags.DEFINE_enum(
    "too_long",
    "truncate",
    ["truncate", "skip", "error"],
    "A source sentence longer than the model's max_len tokens: truncate it (one warning on "
    "stderr names the lines), skip it (an empty translation), or stop with an error.",
)
# Language model only.
flags.DEFINE_string(
    "text",
    None,
    "Language model: score this UTF-8 text file instead of a split (each non-blank line one "
    "example, as prepare_data.py --dataset=local_text reads it).",
)
flags.DEFINE_bool(
    "paragraphs",
    False,
    "Language model, with --text: one example per blank-line-separated paragraph (as "
    "prepare_data.py --paragraphs).",
)
flags.mark_flags_as_required(["workdir"])

PROG = errors.Program("evaluate")  # named from argv[0] by run()
TRANSLATION_FLAGS = ("source", "reference", "hypotheses", "beam_size", "alpha", "too_long")
LM_FLAGS = ("text", "paragraphs")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    # The library (JAX) is imported only now: --help and flag errors answer without it, and
    # Ctrl-C while it loads is already handled (errors.run_reader).
    from attention_jax.workdir.checkpoint import quiet_abandoned_reads

    quiet_abandoned_reads()  # a damaged checkpoint is said in one line, not in screens
    from attention_jax.workdir import load_config
    from attention_jax.workdir.experiment import model_kind

    try:
        kind = model_kind(load_config(FLAGS.workdir))
    except (OSError, ValueError):  # said by what reads the workdir next, as before LMs
        kind = None
    lm_flags, translation_flags = _given(LM_FLAGS), _given(TRANSLATION_FLAGS)
    if kind == "lm" and translation_flags:
        raise errors.CommandError(
            f"{_only_go(translation_flags)} with a translation workdir; {FLAGS.workdir} holds "
            "a language model: score it on a --split, or on --text=FILE"
        )
    if kind != "lm" and kind is not None and lm_flags:
        raise errors.CommandError(
            f"{_only_go(lm_flags)} with a language-model workdir; {FLAGS.workdir} holds a "
            "translation model: score it on a --split, or on --source and --reference files"
        )
    if kind == "lm" or (kind is None and lm_flags):  # unreadable: _evaluate_lm says why
        _evaluate_lm()
    else:
        _evaluate_translation()


def _given(names) -> list[str]:
    return [name for name in names if FLAGS[name].present]


def _only_go(names) -> str:
    """The start of a sentence: '--a only goes', '--a, --b only go'."""
    return ", ".join(f"--{n}" for n in names) + (" only goes" if len(names) == 1 else " only go")


def _evaluate_translation() -> None:
    """sacreBLEU and chrF of the workdir's translations of a split or of --source."""
    from attention_jax.decode import metrics
    from attention_jax.decode.translator import (
        Output,
        TooLong,
        Translator,
        eval_pairs,
        read_lines,
    )
    from attention_jax.workdir import load_config

    if (FLAGS.source is None) != (FLAGS.reference is None):
        raise app.UsageError("give both --source and --reference, or neither")
    hypotheses_out = Output(FLAGS.hypotheses, "--hypotheses") if FLAGS.hypotheses else None
    if FLAGS.source:
        if FLAGS.source == "-" and FLAGS.reference == "-":
            raise app.UsageError("--source and --reference cannot both be stdin")
        sources = read_lines(FLAGS.source, "--source")
        references = read_lines(FLAGS.reference, "--reference")
        if len(sources) != len(references):
            raise errors.CommandError(
                f"--source {FLAGS.source} has {len(sources)} lines but --reference "
                f"{FLAGS.reference} has {len(references)}; they must be line-aligned"
            )
    else:
        config = load_config(FLAGS.workdir)
        try:
            sources, references = eval_pairs(config, FLAGS.split or "test", data_dir=FLAGS.data_dir)
        except FileNotFoundError as e:  # the dataset is not prepared there: says how to
            raise errors.CommandError(str(e)) from e
    if not sources:
        raise errors.CommandError("no sentences to score")
    translator = Translator.from_workdir(
        FLAGS.workdir, average_last=FLAGS.average_last, log=PROG.log
    )
    too_long = TooLong(FLAGS.too_long)
    hypotheses = translator.translate(
        sources, beam_size=FLAGS.beam_size, alpha=FLAGS.alpha,
        batch_size=FLAGS.batch_size or 64, too_long=FLAGS.too_long, on_too_long=too_long,
    )  # fmt: skip
    too_long.warn(PROG.name, translator.model.config.max_len)
    if hypotheses_out is not None:
        with hypotheses_out.open() as write:
            write(hypotheses)
    bleu, bleu_signature = metrics.bleu(hypotheses, references)
    chrf, chrf_signature = metrics.chrf(hypotheses, references)
    print(f"sentences: {len(sources)}  checkpoints: {translator.steps}  beam: {FLAGS.beam_size}")
    print(f"BLEU {bleu:.2f}  ({bleu_signature})")
    print(f"chrF {chrf:.2f}  ({chrf_signature})", flush=True)


def _evaluate_lm() -> None:
    """Loss, perplexity and bits per byte of a language model on a split or on --text."""
    import ml_collections

    from attention_jax.data import sources, tasks
    from attention_jax.decode.translator import load_model_config, load_params
    from attention_jax.nn.model import TransformerLM
    from attention_jax.train import loop
    from attention_jax.workdir.experiment import eval_split

    if FLAGS.paragraphs and FLAGS.text is None:
        raise errors.CommandError("--paragraphs only goes with --text=FILE")
    config, cfg, tokenizer = load_model_config(FLAGS.workdir)
    config = ml_collections.ConfigDict(config.to_dict())  # a copy: what this run reads
    config.data.eval_examples = 0  # all of it (a split, or the file)
    if FLAGS.batch_size:
        config.data.eval_batch_size = FLAGS.batch_size
    # The text before the checkpoint: a bad file is refused before the params are read.
    if FLAGS.text is not None:
        try:
            texts = sources.read_text_file(FLAGS.text, paragraphs=FLAGS.paragraphs)
        except (OSError, ValueError) as e:  # missing, empty, not UTF-8: names file and line
            raise errors.CommandError(f"--text: {e}") from None
        where = f"text: {FLAGS.text}"
    else:
        split = FLAGS.split or eval_split(config)
        if FLAGS.data_dir:
            config.data.data_dir = FLAGS.data_dir
        try:
            splits = tasks.available_splits(config)
        except FileNotFoundError as e:  # the dataset is not prepared there: says how to
            hint = "" if FLAGS.data_dir else " (or give --data_dir=DIR where it was prepared)"
            raise errors.CommandError(f"{e}{hint}") from e
        if split not in splits:
            raise errors.CommandError(
                f"dataset {config.data.dataset!r} has no {split!r} split (it has "
                f"{list(splits)}); choose another --split, or give --text=FILE"
            )
        texts = [{"text": text} for text in tasks.load_eval_texts(config, split)]
        where = f"split: {split}"
    if not texts:
        raise errors.CommandError(f"no text to score ({where})")
    model = TransformerLM(cfg)
    params, steps = load_params(
        FLAGS.workdir, config, tokenizer, model, average_last=FLAGS.average_last, log=PROG.log
    )
    scores = loop.score_lm_texts(config, model, params, tokenizer, texts)
    print(
        f"examples: {len(texts)}  tokens: {round(scores['tokens'])}  "
        f"bytes: {round(scores['bytes'])}  checkpoints: {steps}  {where}"
    )
    print(f"loss {scores['loss']:.6f}  (nats per token)")
    print(f"perplexity {scores['perplexity']:.6f}  (exp(loss))")
    print(
        f"bits_per_byte {scores['bits_per_byte']:.6f}  (NLL in bits / UTF-8 bytes, each "
        "example's newline counted)",
        flush=True,
    )


def run(argv: list[str] | None = None) -> None:
    PROG.run(main, __name__, argv)


if __name__ == "__main__":
    run()
