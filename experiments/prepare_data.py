"""Prepare a dataset and its vocabulary (`attention-jax prepare`; see
attention_jax/cli/prepare_data.py for the flags).

python experiments/prepare_data.py --dataset=local --name=my_corpus --train=a.en,a.de
python experiments/prepare_data.py --dataset=local_text --name=my_text --train=a.txt \
    --validation=dev.txt
"""

from attention_jax.cli.prepare_data import main, run

__all__ = ["main"]

if __name__ == "__main__":
    run()
