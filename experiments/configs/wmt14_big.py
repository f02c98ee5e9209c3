"""The paper's big model on WMT 2014 English -> German (Table 3, "big"; 28.4 BLEU).

python experiments/train.py --config=experiments/configs/wmt14_big.py --workdir=$HOME/wmt_big

Differences from wmt14_base.py, as in the paper: d_model 1024, d_ff 4096, 16 heads, dropout
0.3, 300k steps (3.5 days on 8 P100s), the last 20 checkpoints averaged.
"""

import importlib.util
import pathlib


def _base_config():
    path = pathlib.Path(__file__).with_name("wmt14_base.py")  # works from any directory
    spec = importlib.util.spec_from_file_location("wmt14_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = _base_config()
    config.model.update(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
    config.num_train_steps = 300_000
    config.keep_checkpoints = 20  # the paper averages the last 20 checkpoints of big models
    return config
