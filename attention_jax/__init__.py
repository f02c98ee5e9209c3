"""attention_jax: the Transformer of "Attention Is All You Need" in JAX.

The pure core (no Flax: attention, masks, positional encodings) and the Flax model
(TransformerConfig, Transformer, TransformerLM) are re-exported here. The package's layers,
each importing only those before it (tests/test_architecture.py):

    core/     pure JAX: the four steps, dispatch, blockwise, kernels, masks, positions
    nn/       the Flax model: config, layers, model, logical-axis sharding
    data/     corpora, SentencePiece, grain pipelines, tasks (never the model)
    workdir/  what a run keeps on disk: file names, lock, experiment config, checkpoints
    decode/   search, KV-cached decoding, BLEU/chrF, a workdir as a translator
    train/    the jitted step, the loop, losses, metrics reporting, FLOPs
    cli/      the `attention-jax` commands (configs/: the shipped experiment configs)
"""

from attention_jax.core.attention import (
    attention_weights,
    dot_product_attention,
    init_multi_head_attention,
    multi_head_attention,
    scaled_dot_product_attention,
)
from attention_jax.core.dispatch import IMPLEMENTATIONS
from attention_jax.core.masks import causal_mask, combine_masks, padding_mask, segment_mask
from attention_jax.core.positional import apply_rotary_embedding, sinusoidal_positional_encoding
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.model import Transformer, TransformerLM, shift_right

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "Transformer",
    "TransformerConfig",
    "TransformerLM",
    "apply_rotary_embedding",
    "attention_weights",
    "causal_mask",
    "combine_masks",
    "dot_product_attention",
    "init_multi_head_attention",
    "multi_head_attention",
    "padding_mask",
    "scaled_dot_product_attention",
    "segment_mask",
    "shift_right",
    "sinusoidal_positional_encoding",
]
