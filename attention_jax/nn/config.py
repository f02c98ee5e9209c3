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
    activation: str = "relu"  # feed-forward nonlinearity: relu (paper), gelu, silu
    layer_norm_epsilon: float = 1e-6
    pad_id: int = 0  # padding token id; padded keys are never attended to
    dtype: Any = jnp.float32  # computation dtype (e.g. jnp.bfloat16)
    param_dtype: Any = jnp.float32  # parameter dtype
    attention_implementation: str | None = None  # see attention_jax.dot_product_attention

    def __post_init__(self):
        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")

        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"):
            positive_int(name)
        for name in ("target_vocab_size", "num_decoder_layers"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig: num_heads={self.num_heads} must divide "
                f"d_model={self.d_model} (head dim = d_model / num_heads)"
            )
        if self.positional in ("sinusoidal", "rotary") and self.d_model % 2:
            raise ValueError(f"TransformerConfig: d_model must be even, got {self.d_model}")
        if self.positional == "rotary" and self.head_dim % 2:
            raise ValueError(
                f"TransformerConfig: rotary positions need an even head dim, got {self.head_dim}"
            )
        for name in ("share_embeddings", "pre_ln"):  # a string "False" would be truthy
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"TransformerConfig.{name} must be True or False, got {getattr(self, name)!r}"
                )
        for name in ("dropout_rate", "attention_dropout_rate"):
            rate = getattr(self, name)
            if not _is_real(rate) or not 0.0 <= rate < 1.0:
                raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {rate!r}")
        eps = self.layer_norm_epsilon
        if not _is_real(eps) or not eps > 0:
            raise ValueError(f"TransformerConfig.layer_norm_epsilon must be > 0, got {eps!r}")
        if self.positional not in POSITIONALS:
            raise ValueError(
                f"TransformerConfig.positional must be one of {POSITIONALS}, "
                f"got {self.positional!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"TransformerConfig.activation must be one of {ACTIVATIONS}, "
                f"got {self.activation!r}"
            )
        if self.share_embeddings and self.target_vocab_size not in (None, self.vocab_size):
            raise ValueError(
                "TransformerConfig: share_embeddings=True needs one vocabulary, got "
                f"vocab_size={self.vocab_size}, target_vocab_size={self.target_vocab_size}"
            )
        if (
            isinstance(self.pad_id, bool)
            or not isinstance(self.pad_id, int)
            or not 0 <= self.pad_id < self.vocab_size
        ):
            raise ValueError(
                f"TransformerConfig.pad_id={self.pad_id!r} is outside [0, {self.vocab_size}) "
                "(it must be an int token id)"
            )
        if self.attention_implementation not in (None, *IMPLEMENTATIONS):
            raise ValueError(
                f"TransformerConfig.attention_implementation must be None or one of "
                f"{IMPLEMENTATIONS}, got {self.attention_implementation!r}"
            )
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                floating = jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:  # e.g. "bogus": "data type 'bogus' not understood"
                floating = False
            if not floating:
                raise ValueError(
                    f"TransformerConfig.{name} must be a float dtype (e.g. jnp.float32, "
                    f"'bfloat16'), got {value!r}"
                )

    @property
    def head_dim(self) -> int:
        """H = d_model / num_heads (d_k = d_v in the paper)."""
        return self.d_model // self.num_heads

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


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# The experiment files' spelling of the dtype fields (config.json holds strings).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# TransformerConfig fields whose default is None, and the type an override of them has.
_OPTIONAL_TYPES = {"target_vocab_size": int, "num_decoder_layers": int,
                   "attention_implementation": str}  # fmt: skip


def model_config_dict(**fields):
    """``config.model`` of an experiment file: EVERY `TransformerConfig` field, `fields` over
    the dataclass defaults, so that each one can be set from the command line
    (``--config.model.pre_ln=True``): ml_collections lets an override change a field, never
    add one. Defaults of None become typed placeholders (``--config.model.num_decoder_layers
    =3`` is parsed as an int); dtypes are names (`DTYPE_NAMES`)."""
    import ml_collections
    from ml_collections import config_dict

    known = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"model fields {unknown} are not TransformerConfig fields")
    out = {}
    for name, field in known.items():
        value = fields.get(name, field.default)
        if value is dataclasses.MISSING:
            raise ValueError(f"model_config_dict needs {name}= (it has no default)")
        if name in ("dtype", "param_dtype") and not isinstance(value, str):
            value = jnp.dtype(value).name
        if value is None and name in _OPTIONAL_TYPES:
            value = config_dict.placeholder(_OPTIONAL_TYPES[name])
        out[name] = value
    return ml_collections.ConfigDict(out)


def check_experiment_config(config) -> None:
    """Checks the run fields of an experiment config (an ``ml_collections`` file under
    experiments/configs) that a training run would otherwise meet only mid-run or after
    writing to its workdir: a zero interval (``step % 0``), a sequence longer than
    ``model.max_len``. Raises a ValueError naming the field. ``config.model`` is checked by
    `TransformerConfig` itself."""

    def check(name, value, ok, expected):
        if not ok:
            raise ValueError(f"config.{name} must be {expected}, got {value!r}")

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    for name in (
        "num_train_steps", "warmup_steps", "accum_steps", "log_every", "eval_every",
        "checkpoint_every", "keep_checkpoints",
    ):  # fmt: skip
        value = config.get(name)
        check(name, value, is_int(value) and value >= 1, "a positive int")
    value = config.get("batch_size", 0)
    check("batch_size", value, is_int(value) and value >= 0, "an int >= 0 (0: from data)")
    value = config.get("label_smoothing", 0.0)
    check("label_smoothing", value, _is_real(value) and 0 <= value < 1, "in [0, 1)")
    # Optimizer and schedule: a negative or NaN factor would train (upwards, or to NaN).
    value = config.get("lr_factor", 1.0)
    check("lr_factor", value, _is_real(value) and 0 < value < float("inf"), "a number > 0")
    value = config.get("clip_norm", 0.0)
    check("clip_norm", value, _is_real(value) and 0 <= value < float("inf"),
          "a number >= 0 (0: no clipping)")  # fmt: skip
    value = config.get("peak_flops_per_device", 0.0)
    check("peak_flops_per_device", value, _is_real(value) and 0 <= value < float("inf"),
          "a number >= 0 (0: look the device up)")  # fmt: skip
    value = config.get("seed", 0)
    check("seed", value, is_int(value) and value >= 0, "an int >= 0")
    value = config.get("nonfinite", "stop")
    check("nonfinite", value, value in ("stop", "skip"), "'stop' or 'skip'")
    if "beam_size" in config:
        check("beam_size", config.beam_size, is_int(config.beam_size) and config.beam_size >= 1,
              "a positive int")  # fmt: skip
    if "alpha" in config:
        value = config.alpha
        check("alpha", value, _is_real(value) and 0 <= value < float("inf"), "a number >= 0")
    for name in ("tokens_per_batch", "eval_batch_size", "max_length"):
        if name in config.data:
            value = config.data[name]
            check(f"data.{name}", value, is_int(value) and value >= 1, "a positive int")
    if "eval_examples" in config.data:
        value = config.data.eval_examples
        check("data.eval_examples", value, is_int(value) and value >= 0, "an int >= 0 (0: all)")
    data, max_len = config.data, config.model.max_len
    if data.dataset == "reversal":  # targets are the reversed source + EOS
        check("batch_size", config.batch_size, config.batch_size >= 1, ">= 1 for reversal")
        check(
            "data.max_len",
            data.max_len,
            data.max_len + 1 <= max_len,
            f"<= config.model.max_len - 1 = {max_len - 1} (targets add EOS)",
        )
    elif "max_length" in data:
        check(
            "data.max_length",
            data.max_length,
            data.max_length <= max_len,
            f"<= config.model.max_len = {max_len}",
        )
