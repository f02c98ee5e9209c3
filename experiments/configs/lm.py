"""Decoder-only language model on the built-in English corpus, on CPU in a few minutes.

The config itself is attention_jax/configs/lm.py (package data, so an installed copy has
it too; `--config=lm` names it). This file keeps
`--config=experiments/configs/lm.py` working.
"""

from attention_jax.configs.lm import get_config

__all__ = ["get_config"]
