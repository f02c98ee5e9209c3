"""Score a trained workdir: ``attention_jax.cli.evaluate`` (same flags).

python experiments/evaluate.py --workdir=/tmp/aj_default                    # its test split
python experiments/evaluate.py --workdir=... --split=validation --average_last=5
python experiments/evaluate.py --workdir=... --source=newstest.en --reference=newstest.de
python experiments/evaluate.py --workdir=/tmp/lm                  # a language model: loss,
python experiments/evaluate.py --workdir=/tmp/lm --text=held_out.txt  # perplexity, bits/byte
"""

import signal

# Ctrl-C while JAX is imported ends the process quietly; from run() on it is one line.
# (An ignored SIGINT, as in a script's background job, stays ignored.)
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from attention_jax.cli.evaluate import run

if __name__ == "__main__":
    run()
