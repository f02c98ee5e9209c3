"""Model hyperparameters: a frozen dataclass with the paper's presets.

`base()` and `big()` are the two models of Table 3 of the paper; `tiny()` is for tests and
CPU experiments. Every preset takes `vocab_size` and keyword overrides, e.g.
``TransformerConfig.base(vocab_size=37000, dropout_rate=0.0)``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Literal

import jax.numpy as jnp

from attention_jax.core.attention import IMPLEMENTATIONS

Positional = Literal["sinusoidal", "learned", "rotary", "none"]
ACTIVATIONS = ("relu", "gelu", "silu")
POSITIONALS = ("sinusoidal", "learned", "rotary", "none")
NORMS = ("layernorm", "rmsnorm")
FEED_FORWARDS = ("mlp", "swiglu")
# config.remat: what each layer keeps for the backward pass (layers.REMAT_POLICIES).
REMATS = ("none", "full", "dots", "dots_all")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of `Transformer` and `TransformerLM`. Defaults are the paper's base model."""

    vocab_size: int  # V: shared source/target vocabulary (or the source's, when unshared)
    target_vocab_size: int | None = None  # target V when embeddings are unshared (None: same)
    share_embeddings: bool = True  # one table for source, target and pre-softmax (sec. 3.4)
    d_model: int = 512  # D
    num_heads: int = 8  # N (h in the paper)
    num_layers: int = 6  # L encoder layers (N in the paper)
    num_decoder_layers: int | None = None  # decoder layers (None: num_layers)
    d_ff: int = 2048  # F: inner width of the position-wise feed-forward
    dropout_rate: float = 0.1  # P_drop: residual dropout and dropout on embeddings + positions
    attention_dropout_rate: float = 0.0  # dropout on attention weights (not in the paper)
    max_len: int = 512  # longest sequence accepted (and size of a learned position table)
    positional: Positional = "sinusoidal"  # or learned, rotary (applied to q, k), none
    pre_ln: bool = False  # False: the paper's post-LN, LayerNorm(x + Dropout(Sublayer(x)))
    activation: str = "relu"  # feed-forward nonlinearity: relu (paper), gelu, silu ('mlp' only)
    # The knobs of today's decoder-only LMs; each default is the paper's model (and today's
    # parameters, so checkpoints and parameter counts stay as they were).
    num_kv_heads: int | None = None  # K key/value heads: grouped-query (1: multi-query); None: N
    norm: str = "layernorm"  # or "rmsnorm": x / RMS(x) · g (Zhang & Sennrich 2019), no bias
    feed_forward: str = "mlp"  # or "swiglu": (Swish(x·W) ⊙ x·V)·W2, no biases (Shazeer 2020)
    attention_bias: bool = True  # biases on W_Q, W_K, W_V, W_O (the paper's equations have none)
    tie_output_embedding: bool | None = None  # logits = y·Eᵀ (sec. 3.4); None: share_embeddings
    layer_norm_epsilon: float = 1e-6
    pad_id: int = 0  # padding token id; padded keys are never attended to
    dtype: Any = jnp.float32  # computation dtype (e.g. jnp.bfloat16)
    param_dtype: Any = jnp.float32  # parameter dtype
    attention_implementation: str | None = None  # see attention_jax.dot_product_attention
    # Rematerialisation of each layer in the backward pass (memory for compute; the
    # parameters and the numbers are the same): "none" keeps every activation; "full" keeps
    # only each layer's input; "dots" also its weight matmuls' outputs; "dots_all" every
    # matmul's, the attention scores included.
    remat: str = "none"
    # Run the L layers of each stack under flax.linen.scan: one compiled layer body (compile
    # time flat in L), parameters stacked [L, ...] under "layers" (logical axis "layers")
    # instead of layer_0 ... layer_{L-1}; same numbers. Convert a parameter tree with
    # nn.model.stack_layer_params / unstack_layer_params.
    scan_layers: bool = False

    def __post_init__(self):
        for names, ok, expected in _FIELD_RULES:
            for name in names:
                value = getattr(self, name)
                if not ok(value):
                    raise ValueError(f"TransformerConfig.{name} must be {expected}, got {value!r}")
        for ok, message in _RULES:
            if not ok(self):
                raise ValueError(message(self))

    @property
    def head_dim(self) -> int:
        """H = d_model / num_heads (d_k = d_v in the paper)."""
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """K: key/value heads (``num_kv_heads``, or N when it is None)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def tied_output(self) -> bool:
        """Whether the pre-softmax projection is the (target) embedding matrix transposed."""
        if self.tie_output_embedding is None:
            return self.share_embeddings
        return self.tie_output_embedding

    @property
    def decoder_layers(self) -> int:
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def output_vocab_size(self) -> int:
        return self.target_vocab_size or self.vocab_size

    def replace(self, **overrides) -> TransformerConfig:
        return dataclasses.replace(self, **overrides)

    @classmethod
    def tiny(cls, vocab_size: int = 64, **overrides) -> TransformerConfig:
        """2 layers, D=32, 4 heads, F=64: for tests and CPU runs in seconds."""
        preset = dict(d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=128)
        return cls(vocab_size=vocab_size, **{**preset, **overrides})

    @classmethod
    def base(cls, vocab_size: int = 37000, **overrides) -> TransformerConfig:
        """The paper's base model: N=6, d_model=512, d_ff=2048, h=8, P_drop=0.1 (~63M params)."""
        preset = dict(d_model=512, num_heads=8, num_layers=6, d_ff=2048, dropout_rate=0.1)
        return cls(vocab_size=vocab_size, **{**preset, **overrides})

    @classmethod
    def big(cls, vocab_size: int = 37000, **overrides) -> TransformerConfig:
        """The paper's big model: N=6, d_model=1024, d_ff=4096, h=16, P_drop=0.3 (~214M)."""
        preset = dict(d_model=1024, num_heads=16, num_layers=6, d_ff=4096, dropout_rate=0.3)
        return cls(vocab_size=vocab_size, **{**preset, **overrides})


def is_int(value) -> bool:
    """An int, and not a bool (which Python counts as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (int, float, NumPy scalar), and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_float_dtype(value) -> bool:
    try:
        return jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:  # e.g. "bogus": "data type 'bogus' not understood"
        return False


def _positive_int(value) -> bool:
    return is_int(value) and value >= 1


# Each field's own rule, checked in this order: (fields, ok(value), what it must be).
_FIELD_RULES = (
    (("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"), _positive_int,
     "a positive int"),
    (("target_vocab_size", "num_decoder_layers", "num_kv_heads"),
     lambda v: v is None or _positive_int(v), "None or a positive int"),
    (("share_embeddings", "pre_ln", "attention_bias", "scan_layers"), lambda v: isinstance(v, bool),
     "True or False"),  # "False" is truthy
    (("tie_output_embedding",), lambda v: v is None or isinstance(v, bool),
     "None, True or False"),
    (("dropout_rate", "attention_dropout_rate"), lambda v: is_real(v) and 0.0 <= v < 1.0,
     "in [0, 1)"),
    (("layer_norm_epsilon",), lambda v: is_real(v) and v > 0, "> 0"),
    (("positional",), lambda v: v in POSITIONALS, f"one of {POSITIONALS}"),
    (("activation",), lambda v: v in ACTIVATIONS, f"one of {ACTIVATIONS}"),
    (("norm",), lambda v: v in NORMS, f"one of {NORMS}"),
    (("feed_forward",), lambda v: v in FEED_FORWARDS, f"one of {FEED_FORWARDS}"),
    (("remat",), lambda v: v in REMATS, f"one of {REMATS}"),
    (("attention_implementation",), lambda v: v in (None, *IMPLEMENTATIONS),
     f"None or one of {IMPLEMENTATIONS}"),
    (("dtype", "param_dtype"), _is_float_dtype,
     "a float dtype (e.g. jnp.float32, 'bfloat16')"),
)  # fmt: skip

# Rules between fields, checked once every field passed its own: (ok(cfg), message(cfg)).
_RULES = (
    (lambda c: c.d_model % c.num_heads == 0,
     lambda c: f"TransformerConfig: num_heads={c.num_heads} must divide d_model={c.d_model} "
               "(head dim = d_model / num_heads)"),
    (lambda c: c.num_heads % c.kv_heads == 0,
     lambda c: f"TransformerConfig: num_kv_heads={c.num_kv_heads} must divide "
               f"num_heads={c.num_heads} (each key/value head serves num_heads / num_kv_heads "
               "query heads)"),
    (lambda c: c.positional not in ("sinusoidal", "rotary") or c.d_model % 2 == 0,
     lambda c: f"TransformerConfig: d_model must be even, got {c.d_model}"),
    (lambda c: c.positional != "rotary" or c.head_dim % 2 == 0,
     lambda c: f"TransformerConfig: rotary positions need an even head dim, got {c.head_dim}"),
    (lambda c: not c.share_embeddings or c.target_vocab_size in (None, c.vocab_size),
     lambda c: "TransformerConfig: share_embeddings=True needs one vocabulary, got "
               f"vocab_size={c.vocab_size}, target_vocab_size={c.target_vocab_size}"),
    (lambda c: is_int(c.pad_id) and 0 <= c.pad_id < c.vocab_size,
     lambda c: f"TransformerConfig.pad_id={c.pad_id!r} is outside [0, {c.vocab_size}) "
               "(it must be an int token id)"),
)  # fmt: skip
