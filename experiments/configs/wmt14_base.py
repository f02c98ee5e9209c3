"""The paper's base model on WMT 2014 English -> German (Vaswani et al., 2017, sections 5-6).

The config itself is attention_jax/configs/wmt14_base.py (package data, so an installed copy has
it too; `--config=wmt14_base` names it). This file keeps
`--config=experiments/configs/wmt14_base.py` working.
"""

from attention_jax.configs.wmt14_base import get_config

__all__ = ["get_config"]
