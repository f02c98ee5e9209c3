"""The built-in sequence-reversal task (no data files, no vocabulary): 100% held-out exact

The config itself is attention_jax/configs/reversal.py (package data, so an installed copy has
it too; `--config=reversal` names it). This file keeps
`--config=experiments/configs/reversal.py` working.
"""

from attention_jax.configs.reversal import get_config

__all__ = ["get_config"]
