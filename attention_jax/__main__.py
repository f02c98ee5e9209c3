"""``python -m attention_jax COMMAND ...``: the same as the ``attention-jax`` console script."""

from attention_jax.cli import main

main()
