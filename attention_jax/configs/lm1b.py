"""Decoder-only language model on lm1b (One Billion Words) at flax examples/lm1b's scale.

attention-jax prepare --dataset=lm1b   # once: download (1.8 GB) + a 30000-piece vocabulary
attention-jax train --config=lm1b --workdir=$HOME/lm1b

As flax's examples/lm1b: 6 pre-LN layers of d_model 512, 8 heads, d_ff 2048, dropout 0.1, an
untied output layer, rows of 128 tokens, 256 rows per step, 500k steps, no label smoothing,
warmup 1000 (the paper's inverse-square-root schedule here peaks at 1.4e-3; flax's at 1.6e-3),
evaluation on the test split (lm1b has no validation split). Not copied: flax's AdamW weight
decay (this optimizer is the paper's Adam).
"""

from attention_jax.configs import lm


def get_config():
    config = lm.get_config()
    config.model.update(
        vocab_size=30000,  # prepare_data.py's lm1b vocabulary (spm_bpe_30000.model)
        d_model=512,  # flax lm1b emb_dim / qkv_dim
        num_heads=8,
        num_layers=6,  # decoder layers
        d_ff=2048,  # flax lm1b mlp_dim
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
        max_len=128,  # longest row the model accepts (flax: max_target_length)
        pre_ln=True,  # flax's blocks normalize before each sublayer, plus a final norm
        tie_output_embedding=False,  # flax lm1b: logits_via_embedding=False
        dtype="bfloat16",  # compute dtype on GPU/TPU; parameters stay float32
    )
    config.data.update(
        dataset="lm1b",  # TFDS lm1b, prepared as array_record (train and test splits)
        max_length=128,  # tokens per packed row
        eval_split="test",  # lm1b has no validation split; flax evaluates on test
        eval_batch_size=256,  # rows per evaluation batch
        vocab_sentences=1_000_000,  # texts sampled to train the vocabulary (if not prepared)
        prefetch=2,  # batches prepared ahead
        workers=8,  # worker processes per host to feed an accelerator
    )
    config.batch_size = 256  # rows per step (flax: 32 per device × 8 devices)
    config.num_train_steps = 500_000  # as flax lm1b
    config.warmup_steps = 1000  # as flax lm1b
    config.log_every = 100
    config.eval_every = 2000  # the whole test split (0.3M sentences) each time
    config.checkpoint_every = 10_000  # as flax lm1b
    config.keep_checkpoints = 3
    return config
