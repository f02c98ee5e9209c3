"""``attention-jax evaluate`` (also ``experiments/evaluate.py``): sacreBLEU and chrF of a
trained workdir, on a split of its dataset or on your own files.

    attention-jax evaluate --workdir=/tmp/aj_default                 # its test split
    attention-jax evaluate --workdir=... --split=validation --average_last=5
    attention-jax evaluate --workdir=... --source=newstest.en --reference=newstest.de

The dataset is read from --data_dir, else the data dir the training run recorded in its
config.json (config.data.data_dir), else $TFDS_DATA_DIR / ~/tensorflow_datasets. --source
and --reference are read as translate reads its input (lines end at "\\n" only; see
attention_jax/cli/translate.py) and must have the same number of lines.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from attention_jax.cli import errors

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's --workdir.")
flags.DEFINE_string("split", "test", "A split of the run's dataset (ignored with --source).")
flags.DEFINE_string(
    "data_dir",
    None,
    "Where the dataset is prepared (default: the data dir recorded in the workdir's "
    "config.json, else $TFDS_DATA_DIR or ~/tensorflow_datasets). Ignored with --source.",
)
flags.DEFINE_string("source", None, "A source file, one sentence per line (with --reference).")
flags.DEFINE_string("reference", None, "The reference translations, line-aligned with --source.")
flags.DEFINE_string(
    "hypotheses", None, "Also write the translations here, one per source line ('-': stdout)."
)
flags.DEFINE_integer("beam_size", 4, "Beam width; 1 = greedy.", lower_bound=1)
flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent.", lower_bound=0.0)
flags.DEFINE_integer("average_last", 0, "Average the last k checkpoints.", lower_bound=0)
flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.", lower_bound=1)
flags.DEFINE_enum(
    "too_long",
    "truncate",
    ["truncate", "skip", "error"],
    "A source sentence longer than the model's max_len tokens: truncate it (one warning on "
    "stderr names the lines), skip it (an empty translation), or stop with an error.",
)
flags.mark_flags_as_required(["workdir"])

PROG = "evaluate"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.source is None) != (FLAGS.reference is None):
        raise app.UsageError("give both --source and --reference, or neither")
    logging.set_verbosity(logging.WARNING)
    # The library (JAX) is imported only now: --help and flag errors answer without it, and
    # Ctrl-C while it loads is already handled (errors.run_reader).
    from attention_jax.workdir.checkpoint import quiet_abandoned_reads

    quiet_abandoned_reads()  # a damaged checkpoint is said in one line, not in screens
    from attention_jax.decode import metrics
    from attention_jax.decode.translator import (
        Output,
        TooLong,
        Translator,
        eval_pairs,
        read_lines,
    )
    from attention_jax.workdir import load_config

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
            sources, references = eval_pairs(config, FLAGS.split, data_dir=FLAGS.data_dir)
        except FileNotFoundError as e:  # the dataset is not prepared there: says how to
            raise errors.CommandError(str(e)) from e
    if not sources:
        raise errors.CommandError("no sentences to score")
    translator = Translator.from_workdir(FLAGS.workdir, average_last=FLAGS.average_last, log=_log)
    too_long = TooLong(FLAGS.too_long)
    hypotheses = translator.translate(
        sources, beam_size=FLAGS.beam_size, alpha=FLAGS.alpha, batch_size=FLAGS.batch_size,
        too_long=FLAGS.too_long, on_too_long=too_long,
    )  # fmt: skip
    too_long.warn(PROG, translator.model.config.max_len)
    if hypotheses_out is not None:
        with hypotheses_out.open() as write:
            write(hypotheses)
    bleu, bleu_signature = metrics.bleu(hypotheses, references)
    chrf, chrf_signature = metrics.chrf(hypotheses, references)
    print(f"sentences: {len(sources)}  checkpoints: {translator.steps}  beam: {FLAGS.beam_size}")
    print(f"BLEU {bleu:.2f}  ({bleu_signature})")
    print(f"chrF {chrf:.2f}  ({chrf_signature})", flush=True)


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run(argv: list[str] | None = None) -> None:
    global PROG
    argv = list(sys.argv if argv is None else argv)
    PROG = os.path.basename(argv[0]) if argv[0].endswith(".py") else argv[0]
    errors.run_reader(main, PROG, argv, __name__)


if __name__ == "__main__":
    run()
