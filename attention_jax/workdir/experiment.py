"""An experiment config (an ``ml_collections`` file, attention_jax/configs/) and its model.

`check_experiment` validates a config once, before a run creates or writes anything: the run
fields, the model, the policies, the sharding rules and the mesh. `model_config` and
`model_config_dict` map ``config.model`` to a `TransformerConfig` and back; `model_signature`
is what a checkpoint records of its model, so that a different model is refused;
`model_kind` says which model a config (a workdir's config.json) trains: the encoder-decoder
`Transformer` or the decoder-only `TransformerLM`.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from attention_jax.nn import sharding
from attention_jax.nn.config import TransformerConfig, is_int, is_real

# config.nonfinite: what a NaN/Inf loss or gradient does. "stop" (the default): the run
# stops, its newest checkpoint the last good state; "skip": that update is skipped, counted.
NONFINITE_POLICIES = ("stop", "skip")
# What a config trains: the encoder-decoder Transformer (translation, reversal) or the
# decoder-only TransformerLM (a text corpus). Checkpoints record it (``model_kind``).
MODEL_KINDS = ("encoder_decoder", "lm")
# The splits a run may evaluate on periodically (config.data.eval_split; lm1b has no
# validation split and, as flax's examples/lm1b, evaluates on test).
EVAL_SPLITS = ("validation", "test")

# The experiment files' spelling of the dtype fields (config.json holds strings).
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# TransformerConfig fields whose default is None, and the type an override of them has.
_OPTIONAL_TYPES = {"target_vocab_size": int, "num_decoder_layers": int,
                   "attention_implementation": str, "num_kv_heads": int,
                   "tie_output_embedding": bool}  # fmt: skip
# What must match between a checkpoint and the model restoring it.
SIGNATURE_FIELDS = (
    "vocab_size", "target_vocab_size", "share_embeddings", "d_model", "num_heads",
    "num_layers", "num_decoder_layers", "d_ff", "max_len", "positional", "pre_ln",
    "num_kv_heads", "norm", "feed_forward", "attention_bias", "tie_output_embedding",
    "scan_layers",  # the parameters' layout: stacked [L, ...] under "layers", or layer_i
)  # fmt: skip


# ---- config.model <-> TransformerConfig. ----------------------------------------------


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    """TransformerConfig from ``config.model`` (dtype names as strings)."""
    fields = dict(config.model)
    for name in ("dtype", "param_dtype"):
        if name in fields:
            if fields[name] not in _DTYPES:
                raise ValueError(
                    f"config.model.{name} must be one of {tuple(_DTYPES)}, got {fields[name]!r}"
                )
            fields[name] = _DTYPES[fields[name]]
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"config.model has unknown fields {unknown}; known: {sorted(known)}")
    return TransformerConfig(**fields)


def model_config_dict(**fields) -> ml_collections.ConfigDict:
    """``config.model`` of an experiment file: EVERY `TransformerConfig` field, `fields` over
    the dataclass defaults, so that each one can be set from the command line
    (``--config.model.pre_ln=True``): ml_collections lets an override change a field, never
    add one. Defaults of None become typed placeholders (``--config.model.num_decoder_layers
    =3`` is parsed as an int); dtypes are names (float32, bfloat16, float16)."""
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


def model_signature(cfg: TransformerConfig) -> dict:
    """The fields of `cfg` a checkpoint records (`SIGNATURE_FIELDS`), as its JSON metadata
    holds them (so that one read back compares equal)."""
    return json.loads(json.dumps({k: getattr(cfg, k) for k in SIGNATURE_FIELDS}))


def signature_differences(ours: dict, theirs: dict) -> list[str]:
    """The fields in which two model signatures differ. A field that a checkpoint written
    before it existed does not record compares as the field's default (the model it wrote)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
    defaults = json.loads(json.dumps({
        k: defaults[k] for k in SIGNATURE_FIELDS if defaults[k] is not dataclasses.MISSING
    }))  # fmt: skip
    return [
        k
        for k in sorted(ours.keys() | theirs.keys())
        if ours.get(k, defaults.get(k)) != theirs.get(k, defaults.get(k))
    ]


def signature_hint(differ: list[str]) -> str:
    """What to do about the `signature_differences` `differ`, when a conversion exists
    (scan_layers: the same parameters, stacked or per layer), else ''."""
    if "scan_layers" not in differ:
        return ""
    return (
        "scan_layers differs: the parameters are stacked under 'layers' with it and per "
        "layer (layer_0, ...) without; convert them with "
        "attention_jax.nn.model.stack_layer_params / unstack_layer_params, or set "
        "config.model.scan_layers as the checkpoint has it"
    )


def model_kind(config: ml_collections.ConfigDict) -> str:
    """``'lm'`` when `config` trains the decoder-only `TransformerLM` (``config.data.task``
    is ``'lm'``: the LM configs set it, and training records it in config.json for any LM
    dataset), else ``'encoder_decoder'`` (every config and workdir from before LMs)."""
    return "lm" if config.data.get("task", None) == "lm" else "encoder_decoder"


def eval_split(config: ml_collections.ConfigDict) -> str:
    """The split periodic evaluation reads: ``config.data.eval_split``, else validation."""
    return config.data.get("eval_split", EVAL_SPLITS[0])


def nonfinite_policy(config: ml_collections.ConfigDict) -> str:
    """``config.nonfinite``, "stop" if the config has none (`NONFINITE_POLICIES`)."""
    return config.get("nonfinite", NONFINITE_POLICIES[0])


# ---- The one check. ------------------------------------------------------------------

_OPTIONAL = object()  # a field checked only when the config has it

# The run's own fields: (field, its default when absent, ok(value), what it must be). A
# zero interval would fail as ``step % 0`` mid-run, a negative or NaN factor would train
# (upwards, or to NaN).
_RUN_RULES = (
    *((name, None, lambda v: is_int(v) and v >= 1, "a positive int") for name in (
        "num_train_steps", "warmup_steps", "accum_steps", "log_every", "eval_every",
        "checkpoint_every", "keep_checkpoints",
    )),
    ("batch_size", 0, lambda v: is_int(v) and v >= 0, "an int >= 0 (0: from data)"),
    ("label_smoothing", 0.0, lambda v: is_real(v) and 0 <= v < 1, "in [0, 1)"),
    ("loss_chunk", 0, lambda v: is_int(v) and v >= 0,
     "an int >= 0 (0: off; else tokens per chunk of the loss)"),
    ("lr_factor", 1.0, lambda v: is_real(v) and 0 < v < float("inf"), "a number > 0"),
    ("clip_norm", 0.0, lambda v: is_real(v) and 0 <= v < float("inf"),
     "a number >= 0 (0: no clipping)"),
    ("peak_flops_per_device", 0.0, lambda v: is_real(v) and 0 <= v < float("inf"),
     "a number >= 0 (0: look the device up)"),
    ("seed", 0, lambda v: is_int(v) and v >= 0, "an int >= 0"),
    ("nonfinite", NONFINITE_POLICIES[0], lambda v: v in NONFINITE_POLICIES,
     f"one of {NONFINITE_POLICIES}"),
    ("beam_size", _OPTIONAL, lambda v: is_int(v) and v >= 1, "a positive int"),
    ("alpha", _OPTIONAL, lambda v: is_real(v) and 0 <= v < float("inf"), "a number >= 0"),
    *((f"data.{name}", _OPTIONAL, lambda v: is_int(v) and v >= 1, "a positive int")
      for name in ("tokens_per_batch", "eval_batch_size", "max_length")),
    ("data.eval_examples", _OPTIONAL, lambda v: is_int(v) and v >= 0, "an int >= 0 (0: all)"),
    ("data.eval_split", _OPTIONAL, lambda v: v in EVAL_SPLITS, f"one of {EVAL_SPLITS}"),
    ("profile_steps", _OPTIONAL, lambda v: _step_window(v),
     "() or None (no profile), or (start, stop) with 0 <= start < stop"),
    ("compilation_cache_dir", _OPTIONAL, lambda v: v is None or isinstance(v, str),
     "a folder (a string; '' = no cache)"),
)  # fmt: skip


def _step_window(value) -> bool:
    """``config.profile_steps``: None or () (off), or two ints 0 <= start < stop."""
    if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
        return True
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(is_int(v) for v in value)
        and 0 <= value[0] < value[1]
    )


def check_experiment(config: ml_collections.ConfigDict, *, devices: bool = True) -> None:
    """Checks an experiment config before a run creates or writes anything; raises a
    ValueError naming the field (``config.lr_factor must be a number > 0, got -1.0``).

    In turn: the model (`model_config`: its TransformerConfig's own checks), the run fields
    (intervals, optimizer, policies, lengths against ``model.max_len``), the sharding rules
    and, unless ``devices=False``, the mesh against ``jax.devices()``. (`devices=False`: a
    multi-host run knows its devices only after joining the others, and a dry run may
    describe another machine.)"""
    model_config(config)
    for name, default, ok, expected in _RUN_RULES:
        *parents, key = name.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if default is _OPTIONAL and key not in node:
            continue
        value = node.get(key, None if default is _OPTIONAL else default)
        _require(name, value, ok(value), expected)
    data, max_len = config.data, config.model.max_len
    if data.dataset == "reversal":  # targets are the reversed source + EOS
        _require("batch_size", config.batch_size, config.batch_size >= 1, ">= 1 for reversal")
        _require("data.max_len", data.max_len, data.max_len + 1 <= max_len,
                 f"<= config.model.max_len - 1 = {max_len - 1} (targets add EOS)")  # fmt: skip
    elif "max_length" in data:
        _require("data.max_length", data.max_length, data.max_length <= max_len,
                 f"<= config.model.max_len = {max_len}")  # fmt: skip
    try:
        sharding.check_rules(config.sharding_rules)
    except ValueError as e:
        raise ValueError(f"config.sharding_rules: {e}") from e
    if devices:
        try:
            sharding.make_mesh(**config.mesh)
        except ValueError as e:
            raise ValueError(f"config.mesh: {e}") from e


def _require(name: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"config.{name} must be {expected}, got {value!r}")
