"""Default experiment: the built-in English -> toy-language translation corpus on CPU.

The config itself is attention_jax/configs/default.py (package data, so an installed copy has
it too; `--config=default` names it). This file keeps
`--config=experiments/configs/default.py` working.
"""

from attention_jax.configs.default import get_config

__all__ = ["get_config"]
