"""Decoder-only language model on the built-in English corpus, on CPU in a few minutes.

attention-jax train --config=lm --workdir=/tmp/aj_lm
A prepared text corpus instead: --config.data.dataset=NAME (attention-jax prepare
--dataset=local_text --name=NAME --train=FILE --validation=FILE).

The corpus is the English side of the built-in translation grammar (attention_jax.data
.toy_translation), generated in memory; a SentencePiece vocabulary is trained on its
training split into the workdir on the first run. Evaluation reports the per-token loss,
perplexity and bits per byte (the figure that compares across vocabularies).
"""

import ml_collections

from attention_jax.nn.sharding import DEFAULT_RULES
from attention_jax.workdir.experiment import model_config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, dropout and data order all follow from it
    # Every attention_jax.TransformerConfig field (model_config_dict: the others at their
    # defaults, e.g. --config.model.norm=rmsnorm); dtypes as strings. A TransformerLM uses
    # num_layers decoder layers (causal self-attention only) and vocab_size.
    config.model = model_config_dict(
        vocab_size=1000,  # the BPE vocabulary trained on the corpus (or a prepared one's)
        d_model=128,
        num_heads=4,
        num_layers=2,
        d_ff=512,
        dropout_rate=0.1,
        max_len=64,  # longest row the model accepts (>= data.max_length)
        dtype="float32",
        # The fastest attention for the device and shape: a train step needs only grad, so
        # reverse-only fused kernels are welcome (None would also serve jax.jvp).
        attention_implementation="auto",
    )
    config.data = ml_collections.ConfigDict(
        dict(
            dataset="toy_lm",  # built in; or a prepared local_text corpus, or lm1b
            task="lm",  # a text corpus for the decoder-only TransformerLM
            corpus_seed=0,  # which sentences the grammar generates
            corpus_sizes=(20_000, 1_000, 1_000),  # train, validation, test sentences
            max_length=64,  # tokens per packed row (longer examples are cut, not dropped)
            tokens_per_batch=2048,  # token slots per step (rows = this / max_length)
            eval_split="validation",  # the split periodic evaluation reads
            eval_examples=0,  # 0 = the whole validation / test split
            eval_batch_size=64,  # rows per evaluation batch
            eval_packed=True,  # evaluation rows packed as training's (same scores either way)
            data_dir=ml_collections.FieldReference(None, field_type=str),  # TFDS data_dir
            vocab_path="",  # a SentencePiece model to use instead of training one
            vocab_sentences=1_000_000,  # texts sampled to train the vocabulary
            # Reading/tokenizing threads, batches prepared ahead and worker processes. 0 on
            # a small CPU: threads would compete with XLA.
            reader_threads=0,
            prefetch=0,
            workers=0,
        )
    )
    config.batch_size = 0  # 0: rows from data.tokens_per_batch / data.max_length
    config.num_train_steps = 1000
    config.warmup_steps = 400  # the paper's schedule: d^-0.5 · min(t^-0.5, t · warmup^-1.5)
    config.lr_factor = 1.0
    config.clip_norm = 0.0  # 0 = no gradient clipping
    config.label_smoothing = 0.0  # none, as flax's lm1b: the training loss is the NLL
    config.loss_chunk = 0  # > 0: the loss over chunks of this many tokens (same loss, less memory)
    config.nonfinite = "stop"  # NaN/Inf loss or gradient: "stop" the run, or "skip" the update
    config.accum_steps = 1  # microbatches per step (gradient accumulation)
    config.log_every = 100
    config.eval_every = 500  # loss, perplexity and bits per byte on data.eval_split
    config.checkpoint_every = 500
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
