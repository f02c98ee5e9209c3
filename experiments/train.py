"""Train a Transformer (`attention-jax train`; see attention_jax/cli/train.py for the flags).

python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/aj
"""

from attention_jax.cli.train import run

if __name__ == "__main__":
    run()
