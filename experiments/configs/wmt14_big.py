"""The paper's big model on WMT 2014 English -> German (Table 3, "big"; 28.4 BLEU).

The config itself is attention_jax/configs/wmt14_big.py (package data, so an installed copy has
it too; `--config=wmt14_big` names it). This file keeps
`--config=experiments/configs/wmt14_big.py` working.
"""

from attention_jax.configs.wmt14_big import get_config

__all__ = ["get_config"]
