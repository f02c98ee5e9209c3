"""The paper's base model on WMT 2014 English -> German (Vaswani et al., 2017, sections 5-6).

attention-jax prepare --dataset=wmt14_translate/de-en   # once: download + vocab
attention-jax train --config=wmt14_base --workdir=$HOME/wmt_base

The paper: 8 P100 GPUs, 100k steps of ~25,000 source + 25,000 target tokens, Adam
(0.9, 0.98, 1e-9), lr = d^-0.5 · min(t^-0.5, t · 4000^-1.5), dropout 0.1, label smoothing 0.1,
checkpoints every 10 minutes, the last 5 averaged, beam 4 with length penalty 0.6: 27.3 BLEU.
"""

import ml_collections

from attention_jax.nn.sharding import DEFAULT_RULES
from attention_jax.workdir.experiment import model_config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, dropout and data order all follow from it
    # Every attention_jax.TransformerConfig field (model_config_dict: the others at their
    # defaults, e.g. --config.model.pre_ln=True); dtypes as strings.
    config.model = model_config_dict(
        # Shared source/target BPE vocabulary (section 5.1). A prepared vocabulary of the
        # dataset sets it (the one prepare_data.py stored; this size picks among several).
        vocab_size=37000,
        d_model=512,
        num_heads=8,
        num_layers=6,
        d_ff=2048,
        dropout_rate=0.1,  # P_drop (section 5.4)
        max_len=256,  # longest sequence the model accepts (>= data.max_length)
        dtype="bfloat16",  # compute dtype on GPU/TPU; parameters stay float32
        # The fastest attention for the device and shape: a train step needs only grad, so
        # reverse-only fused kernels are welcome (None would also serve jax.jvp).
        attention_implementation="auto",
    )
    config.data = ml_collections.ConfigDict(
        dict(
            dataset="wmt14_translate/de-en",  # TFDS name (prepared as array_record)
            direction="en-de",  # source-target: English -> German as in the paper
            data_dir=ml_collections.FieldReference(None, field_type=str),  # None: TFDS default
            tokens_per_batch=25000,  # per side: ~25k source + ~25k target tokens (sec. 5.1)
            max_length=256,  # tokens per side of a packed row; longer pairs are skipped
            eval_examples=0,  # 0 = the whole split (newstest2013 / newstest2014)
            eval_batch_size=256,  # rows per evaluation batch
            vocab_path="",  # "" = the one prepare_data.py stored, else train one
            vocab_sentences=2_000_000,  # sentences sampled to train the vocabulary
            reader_threads=0,  # tokenizing threads: slower than none (the GIL; measured)
            prefetch=2,  # batches prepared ahead
            # Worker processes per host: at the paper's batch one process cannot feed the
            # base step on a GPU, 8 can (measured: BUILD_NOTES.md, benchmarks/input_pipeline.py).
            workers=8,
        )
    )
    config.batch_size = 0  # 0: rows from data.tokens_per_batch / data.max_length
    config.num_train_steps = 100_000  # 12 hours on 8 P100s in the paper
    config.warmup_steps = 4000
    config.lr_factor = 1.0  # the paper's formula unscaled
    config.clip_norm = 0.0  # 0 = no gradient clipping (the paper does not clip)
    config.label_smoothing = 0.1  # epsilon_ls (section 5.4)
    config.loss_chunk = 0  # > 0: the loss over chunks of this many tokens (same loss, less memory)
    config.nonfinite = "stop"  # NaN/Inf loss or gradient: "stop" the run, or "skip" the update
    config.accum_steps = 1  # raise it to reach 25k tokens/step on fewer devices
    config.log_every = 100
    config.eval_every = 2000
    config.eval_batches = 0  # (reversal task only)
    config.beam_size = 4  # section 6.1: beam 4, length penalty 0.6, max length input + 50
    config.alpha = 0.6
    config.checkpoint_every = 2000
    config.keep_checkpoints = 5  # the paper averages the last 5 checkpoints of the base model
    config.peak_flops_per_device = 0.0  # 0: look the device up (attention_jax.train.flops)
    config.profile_steps = ()  # (start, stop): a jax.profiler trace in <workdir>/profile
    config.compilation_cache_dir = ""  # a folder: JAX's persistent compilation cache there
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # -1 = the rest
    config.sharding_rules = DEFAULT_RULES  # logical axis -> mesh axis
    return config
