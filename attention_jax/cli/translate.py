"""``attention-jax translate`` (also ``experiments/translate.py``): translate text with a
trained workdir.

    attention-jax translate --workdir=/tmp/aj_default --input=sentences.txt --output=out.txt
    echo "the small dog sees a red car ." | attention-jax translate --workdir=/tmp/aj_default

Beam 4 and length penalty 0.6 by default (the paper); --average_last=5 averages checkpoints.

Lines: one output line per input line, always. Input lines end at "\\n" only (a CRLF's CR is
dropped; a lone CR, VT, FF, NEL, U+2028/U+2029 are spaces inside the line, and the same
characters in a translation become spaces). A leading UTF-8 BOM is dropped. An empty or
whitespace-only line gives an empty line (the model does not see it). A NUL byte or bytes
that are not UTF-8 stop the run with an error naming the line; a --input file is checked
whole before anything is translated, so its --output is not written.

Streaming: lines are translated in batches as they arrive and each batch is written (and
flushed) at once, so the command can sit in a pipe. A regular --output file is replaced
atomically when all is done (through a symlink: its target); FIFOs and /dev/fd/N are
written as the batches come.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from attention_jax.cli import errors

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir", None, "The training run's --workdir (config, vocabulary, checkpoints)."
)
flags.DEFINE_string("input", "-", "A UTF-8 text file, one sentence per line; '-' reads stdin.")
flags.DEFINE_string("output", "-", "Where the translations go, one per line; '-' is stdout.")
flags.DEFINE_integer("beam_size", 4, "Beam width; 1 = greedy.", lower_bound=1)
flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent.", lower_bound=0.0)
flags.DEFINE_integer(
    "average_last", 0, "Average the last k checkpoints (0/1: the latest).", lower_bound=0
)
flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.", lower_bound=1)
flags.DEFINE_enum(
    "too_long",
    "truncate",
    ["truncate", "skip", "error"],
    "A line longer than the model's max_len tokens: truncate it to max_len (one warning on "
    "stderr names the lines), skip it (an empty output line), or stop with an error.",
)
flags.mark_flags_as_required(["workdir"])

PROG = errors.Program("translate")  # named from argv[0] by run()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    # The library (JAX) is imported only now: --help and flag errors answer without it, and
    # Ctrl-C while it loads is already handled (errors.run_reader).
    from attention_jax.workdir.checkpoint import quiet_abandoned_reads

    quiet_abandoned_reads()  # a damaged checkpoint is said in one line, not in screens
    from attention_jax.decode.translator import (
        LineReader,
        Output,
        TooLong,
        Translator,
        check_text_file,
    )

    output = Output(FLAGS.output, "--output")  # before the model is loaded
    if check_text_file(FLAGS.input, "--input") == 0:  # a file: every line decodes
        raise errors.CommandError(f"--input {FLAGS.input} holds no sentences")
    translator = Translator.from_workdir(
        FLAGS.workdir, average_last=FLAGS.average_last, log=PROG.log
    )
    too_long = TooLong(FLAGS.too_long)
    if FLAGS.input == "-":
        stream, where = sys.stdin.buffer, "--input (stdin)"
    else:
        stream, where = open(FLAGS.input, "rb"), f"--input {FLAGS.input}"
    try:
        reader = LineReader(stream, where)
        with output.open() as write:
            for batch in reader.batches(FLAGS.batch_size):
                write(
                    translator.translate(
                        batch, beam_size=FLAGS.beam_size, alpha=FLAGS.alpha,
                        batch_size=FLAGS.batch_size, too_long=FLAGS.too_long,
                        first_line=reader.count - len(batch) + 1, on_too_long=too_long,
                    )
                )  # fmt: skip
            if reader.count == 0:
                raise errors.CommandError(f"{where} holds no sentences")
    except BrokenPipeError:  # the reader of stdout went away (| head): stop quietly
        errors.silence_stdout()
        sys.exit(141)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    too_long.warn(PROG.name, translator.model.config.max_len)


def run(argv: list[str] | None = None) -> None:
    PROG.run(main, __name__, argv)


if __name__ == "__main__":
    run()
