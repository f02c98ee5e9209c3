"""Train a Transformer (`attention-jax train`; see attention_jax/cli/train.py for the flags).

python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/aj
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention_jax.cli.train import main, parse_flags, run

__all__ = ["main", "parse_flags"]

if __name__ == "__main__":
    run()
