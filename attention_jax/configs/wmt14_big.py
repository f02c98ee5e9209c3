"""The paper's big model on WMT 2014 English -> German (Table 3, "big"; 28.4 BLEU).

attention-jax train --config=wmt14_big --workdir=$HOME/wmt_big

Differences from wmt14_base.py, as in the paper: d_model 1024, d_ff 4096, 16 heads, dropout
0.3, 300k steps (3.5 days on 8 P100s), the last 20 checkpoints averaged.
"""

from attention_jax.configs import wmt14_base


def get_config():
    config = wmt14_base.get_config()
    config.model.update(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
    config.num_train_steps = 300_000
    config.keep_checkpoints = 20  # the paper averages the last 20 checkpoints of big models
    return config
