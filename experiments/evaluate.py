"""Score a trained workdir: sacreBLEU and chrF on a dataset split or on your own files.

python experiments/evaluate.py --workdir=/tmp/aj_default                    # its test split
python experiments/evaluate.py --workdir=... --split=validation --average_last=5
python experiments/evaluate.py --workdir=... --source=newstest.en --reference=newstest.de
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention_jax import metrics
from attention_jax.data.tasks import load_eval_pairs
from attention_jax.inference import Translator, load_config, read_lines

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's --workdir.")
flags.DEFINE_string("split", "test", "A split of the run's dataset (ignored with --source).")
flags.DEFINE_string("source", None, "A source file, one sentence per line (with --reference).")
flags.DEFINE_string("reference", None, "The reference translations, line-aligned with --source.")
flags.DEFINE_integer("beam_size", 4, "Beam width; 1 = greedy.", lower_bound=1)
flags.DEFINE_float("alpha", 0.6, "GNMT length penalty exponent.", lower_bound=0.0)
flags.DEFINE_integer("average_last", 0, "Average the last k checkpoints.", lower_bound=0)
flags.DEFINE_integer("batch_size", 64, "Sentences per decoding batch.", lower_bound=1)
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.source is None) != (FLAGS.reference is None):
        raise app.UsageError("give both --source and --reference, or neither")
    logging.set_verbosity(logging.WARNING)
    try:
        if FLAGS.source:
            sources = read_lines(FLAGS.source, "--source")
            references = read_lines(FLAGS.reference, "--reference")
            if len(sources) != len(references):
                raise ValueError(
                    f"--source has {len(sources)} lines but --reference has {len(references)}"
                )
        else:
            sources, references = load_eval_pairs(load_config(FLAGS.workdir), FLAGS.split)
        if not sources:
            raise ValueError("no sentences to score")
        translator = Translator.from_workdir(FLAGS.workdir, average_last=FLAGS.average_last)
        hypotheses = translator.translate(
            sources, beam_size=FLAGS.beam_size, alpha=FLAGS.alpha, batch_size=FLAGS.batch_size
        )
    except (ValueError, OSError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    bleu, bleu_signature = metrics.bleu(hypotheses, references)
    chrf, chrf_signature = metrics.chrf(hypotheses, references)
    print(f"sentences: {len(sources)}  checkpoints: {translator.steps}  beam: {FLAGS.beam_size}")
    print(f"BLEU {bleu:.2f}  ({bleu_signature})")
    print(f"chrF {chrf:.2f}  ({chrf_signature})")


if __name__ == "__main__":
    app.run(main)
