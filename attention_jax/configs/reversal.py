"""The built-in sequence-reversal task (no data files, no vocabulary): it trains to 100%
held-out exact match on a laptop CPU (how long it takes: BUILD_NOTES.md).

attention-jax train --config=reversal --workdir=/tmp/aj_reverse
Override any field: --config.num_train_steps=200 --config.model.num_layers=1
"""

import ml_collections

from attention_jax.nn.sharding import DEFAULT_RULES
from attention_jax.workdir.experiment import model_config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, dropout and data all follow from it
    # Every attention_jax.TransformerConfig field (model_config_dict: the others at their
    # defaults, e.g. --config.model.pre_ln=True); dtypes as strings.
    config.model = model_config_dict(
        vocab_size=24,  # 0 pad, 1 EOS, 22 symbols
        d_model=64,
        num_heads=4,
        num_layers=2,
        d_ff=256,
        dropout_rate=0.0,  # no overfitting to fear: every batch is new
        max_len=32,
        dtype="float32",
    )
    config.data = ml_collections.ConfigDict(
        dict(dataset="reversal", min_len=4, max_len=12)  # source lengths, uniform
    )
    config.batch_size = 64  # sequences per step (global, across processes)
    config.num_train_steps = 4000
    config.warmup_steps = 400  # the paper's schedule: d^-0.5 · min(t^-0.5, t · warmup^-1.5)
    config.lr_factor = 0.5
    config.clip_norm = 0.0  # 0 = no gradient clipping
    config.label_smoothing = 0.1
    config.loss_chunk = 0  # > 0: the loss over chunks of this many tokens (same loss, less memory)
    config.nonfinite = "stop"  # NaN/Inf loss or gradient: "stop" the run, or "skip" the update
    config.accum_steps = 1  # microbatches per step (gradient accumulation)
    config.log_every = 100
    config.eval_every = 1000
    config.eval_batches = 8  # held-out batches of batch_size sequences
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    # Peak FLOP/s of one device for the MFU column; 0 = look the device up in
    # attention_jax.train.flops.PEAK_FLOPS (TPUs, NVIDIA GPUs); CPUs are not listed, so no MFU there
    # unless given (benchmarks/train_step.py measures a CPU's matmul peak).
    config.peak_flops_per_device = 0.0
    config.profile_steps = ()  # (start, stop): a jax.profiler trace in <workdir>/profile
    config.compilation_cache_dir = ""  # a folder: JAX's persistent compilation cache there
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # -1 = the rest
    config.sharding_rules = DEFAULT_RULES  # logical axis -> mesh axis
    return config
