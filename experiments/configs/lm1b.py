"""Decoder-only language model on lm1b (One Billion Words) at flax examples/lm1b's scale.

The config itself is attention_jax/configs/lm1b.py (package data, so an installed copy has
it too; `--config=lm1b` names it). This file keeps
`--config=experiments/configs/lm1b.py` working.
"""

from attention_jax.configs.lm1b import get_config

__all__ = ["get_config"]
