"""Check a workdir's checkpoints against their digests: ``attention_jax.cli.verify`` (same flags).

python experiments/verify.py --workdir=/tmp/aj_default
"""

import signal

# Ctrl-C while JAX is imported ends the process quietly; from run() on it is one line.
# (An ignored SIGINT, as in a script's background job, stays ignored.)
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from attention_jax.cli.verify import run

if __name__ == "__main__":
    run()
