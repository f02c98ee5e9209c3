"""Translate text with a trained workdir: ``attention_jax.cli.translate`` (same flags).

python experiments/translate.py --workdir=/tmp/aj_default --input=sentences.txt
echo "the small dog sees a red car ." | python experiments/translate.py --workdir=/tmp/aj_default
"""

import signal

# Ctrl-C while JAX is imported ends the process quietly; from run() on it is one line.
# (An ignored SIGINT, as in a script's background job, stays ignored.)
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from attention_jax.cli.translate import run

if __name__ == "__main__":
    run()
