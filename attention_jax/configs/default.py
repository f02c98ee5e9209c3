"""Default experiment: the built-in English -> toy-language translation corpus on CPU.

attention-jax train --config=default --workdir=/tmp/aj_default
Override any field: --config.num_train_steps=200 --config.model.num_layers=1

The corpus (attention_jax.data.toy_translation) is generated in memory: real English
sentences and a target language with verb-final clauses, adjectives after nouns and
agreement, so attention has to learn non-monotonic alignments. A SentencePiece vocabulary
is trained on its training split into the workdir on the first run.
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
        vocab_size=1000,  # the shared BPE vocabulary trained on the corpus (or a prepared one's)
        d_model=128,
        num_heads=4,
        num_layers=2,
        d_ff=512,
        dropout_rate=0.1,
        max_len=64,
        dtype="float32",
        # The fastest attention for the device and shape: a train step needs only grad, so
        # reverse-only fused kernels are welcome (None would also serve jax.jvp).
        attention_implementation="auto",
        # Recompute each layer's activations in the backward pass instead of keeping them:
        # "none" (keep all), "full", "dots" (keep the weight matmuls' outputs), "dots_all"
        # (every matmul's); less memory for more compute, the same numbers.
        remat="none",
        # Run the layers under nn.scan: one compiled layer body (compile time flat in the
        # depth), parameters stacked under "layers"; the same numbers, another checkpoint.
        scan_layers=False,
    )
    config.data = ml_collections.ConfigDict(
        dict(
            dataset="toy_translation",  # built in; or a TFDS name / prepared local corpus
            corpus_seed=0,  # which sentences the grammar generates
            corpus_sizes=(20_000, 1_000, 1_000),  # train, validation, test pairs
            max_length=40,  # tokens per side of a packed row (longer pairs are skipped)
            tokens_per_batch=2560,  # per side per step (the paper: ~25,000)
            eval_examples=0,  # 0 = the whole validation / test split
            eval_batch_size=200,  # rows per evaluation batch
            data_dir=ml_collections.FieldReference(None, field_type=str),  # TFDS data_dir
            vocab_path="",  # a SentencePiece model to use instead of training one
            # Reading/tokenizing threads and batches prepared ahead. 0/0 on a small CPU: the
            # pipeline costs ~7% of one core here and threads would compete with XLA.
            reader_threads=0,
            prefetch=0,
        )
    )
    config.batch_size = 0  # 0: rows from data.tokens_per_batch / data.max_length
    config.num_train_steps = 600
    config.warmup_steps = 400  # the paper's schedule: d^-0.5 · min(t^-0.5, t · warmup^-1.5)
    config.lr_factor = 1.0
    config.clip_norm = 0.0  # 0 = no gradient clipping
    config.label_smoothing = 0.1
    config.loss_chunk = 0  # > 0: the loss over chunks of this many tokens (logits recomputed in
    # the backward pass, so [B, T, V] float32 logits are never alive at once); the same loss
    config.nonfinite = "stop"  # NaN/Inf loss or gradient: "stop" the run, or "skip" the update
    config.accum_steps = 1  # microbatches per step (gradient accumulation)
    config.log_every = 100
    config.eval_every = 600  # validation loss, accuracy, sacreBLEU and chrF (greedy)
    config.eval_batches = 0  # (reversal task only)
    config.beam_size = 4  # the final test report decodes with beam search (paper: 4, 0.6)
    config.alpha = 0.6  # GNMT length penalty ((5 + |Y|) / 6)^alpha
    config.checkpoint_every = 200
    config.keep_checkpoints = 3
    # Peak FLOP/s of one device for the MFU column; 0 = look the device up in
    # attention_jax.train.flops.PEAK_FLOPS (TPUs, NVIDIA GPUs); CPUs are not listed, so no MFU there
    # unless given (benchmarks/train_step.py measures a CPU's matmul peak).
    config.peak_flops_per_device = 0.0
    # A jax.profiler trace of the train steps [start, stop) (0-based, e.g. (10, 13)) in
    # <workdir>/profile, with step annotations, for TensorBoard's profile plugin or xprof;
    # () = none. Process 0 only.
    config.profile_steps = ()
    # A folder for JAX's persistent compilation cache (e.g. ~/.cache/attention_jax/xla):
    # every compiled step is kept there, so a resumed or repeated run loads it instead of
    # compiling again; "" = no cache.
    config.compilation_cache_dir = ""
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, model=1))  # -1 = the rest
    config.sharding_rules = DEFAULT_RULES  # logical axis -> mesh axis
    return config
