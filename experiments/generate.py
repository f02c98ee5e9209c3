"""Continue prompts with a trained language-model workdir: ``attention_jax.cli.generate``
(same flags).

python experiments/generate.py --workdir=/tmp/aj_lm --prompt="the small dog" --max_new_tokens=30
echo "a red car" | python experiments/generate.py --workdir=/tmp/aj_lm --temperature=0
"""

import signal

# Ctrl-C while JAX is imported ends the process quietly; from run() on it is one line.
# (An ignored SIGINT, as in a script's background job, stays ignored.)
if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

from attention_jax.cli.generate import run

if __name__ == "__main__":
    run()
