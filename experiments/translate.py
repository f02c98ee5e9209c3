"""Translate text with a trained workdir: thin absl entry point around attention_jax.inference.

python experiments/translate.py --workdir=/tmp/aj_default --input=sentences.txt
echo "the small dog sees a red car ." | python experiments/translate.py --workdir=/tmp/aj_default
Beam 4 and length penalty 0.6 by default (the paper); --average_last=5 averages checkpoints.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention_jax.inference import Translator, read_lines

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "workdir", None, "The training run's --workdir (config, vocabulary, checkpoints)."
)
flags.DEFINE_string("input", "-", "A text file, one sentence per line; '-' reads stdin.")
flags.DEFINE_string("output", "-", "Where the translations go, one per line; '-' is stdout.")
flags.DEFINE_integer("beam_size", 4, "Beam width; 1 = greedy.", lower_bound=1)
flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent.", lower_bound=0.0)
flags.DEFINE_integer(
    "average_last", 0, "Average the last k checkpoints (0/1: the latest).", lower_bound=0
)
flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.", lower_bound=1)
flags.mark_flags_as_required(["workdir"])


def _check_output(path: str) -> None:
    if path == "-":
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"--output {path} is a directory; give a file name")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--output {path}: the folder {folder} does not exist")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        _check_output(FLAGS.output)  # before the model is loaded and the input decoded
        sentences = read_lines(FLAGS.input, "--input")
        if not sentences:
            raise ValueError(f"--input {FLAGS.input} holds no sentences")
        translator = Translator.from_workdir(FLAGS.workdir, average_last=FLAGS.average_last)
        out = translator.translate(
            sentences, beam_size=FLAGS.beam_size, alpha=FLAGS.alpha, batch_size=FLAGS.batch_size
        )
    except (ValueError, OSError) as e:  # user errors: one line, no traceback
        sys.exit(f"translate.py: error: {e}")
    text = "".join(line + "\n" for line in out)
    if FLAGS.output == "-":
        sys.stdout.write(text)
    else:
        tmp = f"{FLAGS.output}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, FLAGS.output)
        except OSError as e:  # e.g. a full disk: no half-written file is left behind
            if os.path.exists(tmp):
                os.remove(tmp)
            sys.exit(f"translate.py: error: writing --output {FLAGS.output}: {e}")


if __name__ == "__main__":
    app.run(main)
