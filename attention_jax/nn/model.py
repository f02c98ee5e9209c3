"""The Transformer (encoder-decoder) and TransformerLM (decoder-only), Flax Linen.

Padding (``config.pad_id``) is read from the token ids: no query attends a padded key. The
first decoder position is the start slot (``shift_right`` puts ``pad_id`` there, as in the
paper's implementations) and is never treated as padding.

Packed batches (several examples per row, as the data pipeline makes them) pass
``*_positions`` (restarting at 0 in each example) and ``*_segmentation`` (1, 2, ... per
example, 0 = padding): attention never crosses examples, and each example's start slot is
its own position 0.

``config.scan_layers`` runs each stack's L layers under ``nn.scan`` (one traced and compiled
layer body): the parameters are stacked ``[L, ...]`` under ``layers`` (logical axis
"layers") instead of ``layer_0`` ... ``layer_{L-1}``; the sown ``intermediates`` (attention
weights) likewise ``[L, ...]``; the KV ``cache`` ``[B, L, ...]`` (the batch leads, as
decoding needs). `stack_layer_params` and `unstack_layer_params` convert a tree (params,
gradients, sown intermediates) between the two layouts; the numbers are the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.core.masks import padding_mask
from attention_jax.core.positional import sinusoidal_positional_encoding
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.layers import DecoderLayer, Embedder, EncoderLayer, normalization

# Logical axes of the activations the model constrains (the rules: nn/sharding.py; without a
# mesh and rules in context nn.with_logical_constraint returns its input as is).
EMBED_AXES = ("activation_batch", "activation_length", "activation_embed")  # [B, T, D]
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")  # [B, T, V]
# Under config.scan_layers the layers of a stack are one module of this name whose
# parameters lead with the layer axis (logical name "layers"); else layer_0 ... layer_{L-1}.
SCANNED = "layers"
_LAYER = re.compile(r"layer_(\d+)")


def shift_right(tokens, bos_id: int = 0):
    """Teacher forcing: ``[t0, t1, ..., t_{T-1}] -> [bos, t0, ..., t_{T-2}]`` (last axis).

    The default start token 0 is the pad id (`TransformerConfig.pad_id`'s default, and
    ``attention_jax.data.tokenizer.PAD_ID``, which nn may not import; tests/test_tokenizer.py
    checks that they agree); the models pass ``config.pad_id``."""
    tokens = jnp.asarray(tokens)
    pad = [(0, 0)] * (tokens.ndim - 1) + [(1, 0)]
    return jnp.pad(tokens, pad, constant_values=bos_id)[..., :-1]


def shift_right_packed(tokens, positions=None, bos_id: int = 0):
    """`shift_right` within each packed example: every position 0 reads `bos_id`, so no
    example sees the last token of the one before it."""
    shifted = shift_right(tokens, bos_id)
    return shifted if positions is None else jnp.where(positions == 0, bos_id, shifted)


def _check_packing(name, tokens, positions, segmentation):
    for what, value in (("positions", positions), ("segmentation", segmentation)):
        if value is not None and jnp.shape(value) != tokens.shape:
            raise ValueError(
                f"{name} {what} must have the tokens' shape {tokens.shape}, got {jnp.shape(value)}"
            )
        if value is not None and not jnp.issubdtype(jnp.asarray(value).dtype, jnp.integer):
            raise TypeError(f"{name} {what} must be integers, got {jnp.asarray(value).dtype}")
    if segmentation is not None and positions is None:
        raise ValueError(f"packed {name}: segmentation needs positions (restarting at 0)")


def check_tokens(name: str, tokens, cfg: TransformerConfig, vocab_size: int | None = None):
    """Boundary check of a token array: integer ``[B, T]`` with ``T <= max_len``; ids in
    ``[0, vocab)`` when the values are concrete (under ``jit`` they are not checked: an id out
    of range then reads an embedding row of NaNs, so the logits are NaN)."""
    vocab_size = cfg.vocab_size if vocab_size is None else vocab_size
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer token ids [B, T], got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [B, T] token ids, got shape {tokens.shape}")
    if 0 in tokens.shape:  # else attention refuses the empty [B, T, N, H] deep inside
        raise ValueError(f"{name} must be [B, T] with B, T >= 1, got shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_len:
        raise ValueError(
            f"{name} has length {tokens.shape[1]} > config.max_len={cfg.max_len}; raise "
            "max_len in the config or cut the sequences"
        )
    if not isinstance(tokens, jax.core.Tracer):
        ids = np.asarray(tokens)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"{name} holds ids outside [0, {vocab_size}): min {ids.min()}, max {ids.max()}"
            )
    return tokens


def check_logit_positions(logit_positions, tokens):
    """Boundary check of ``logit_positions``: integer ``[B, K]`` (K >= 1) for tokens
    ``[B, T]``, values in ``[0, T)`` when concrete (under ``jit`` they are not checked; one
    out of range reads the nearest end). None passes through (logits at every position)."""
    if logit_positions is None:
        return None
    logit_positions = jnp.asarray(logit_positions)
    B, T = tokens.shape
    if (
        logit_positions.ndim != 2
        or logit_positions.shape[0] != B
        or logit_positions.shape[1] < 1
        or not jnp.issubdtype(logit_positions.dtype, jnp.integer)
    ):
        raise ValueError(
            f"logit_positions must be integer [B={B}, K] with K >= 1 for tokens {tokens.shape}, "
            f"got shape {logit_positions.shape} and dtype {logit_positions.dtype}"
        )
    if not isinstance(logit_positions, jax.core.Tracer):
        at = np.asarray(logit_positions)
        if at.min() < 0 or at.max() >= T:
            raise ValueError(
                f"logit_positions must be in [0, T={T}) (the tokens' length), got min "
                f"{at.min()}, max {at.max()}"
            )
    return logit_positions


def _valid(tokens, cfg, positions, segmentation=None):
    """Which positions hold a real token [B, T] (the start slot at position 0 always does;
    in a packed row, each example's position 0 is a start slot, padding is segment 0)."""
    start = (jnp.arange(tokens.shape[-1]) == 0)[None] if positions is None else positions == 0
    if segmentation is not None:
        start = start & (segmentation != 0)
    return (tokens != cfg.pad_id) | start


class _Positions(nn.Module):
    """Adds position information to the scaled embeddings (sinusoids or a learned table)."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions):
        cfg = self.config
        T = x.shape[1]
        pos = jnp.arange(T)[None] if positions is None else positions  # [B|1, T]
        if cfg.positional == "sinusoidal":
            return x + sinusoidal_positional_encoding(pos, cfg.d_model, dtype=x.dtype)
        if cfg.positional == "learned":
            table = nn.Embed(
                cfg.max_len,
                cfg.d_model,
                embedding_init=nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=0.02), ("position", "embed")
                ),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                name="position_embedding",
            )
            return x + table(pos)
        return x  # 'rotary' acts inside attention; 'none' adds nothing


def _rotary(cfg, tokens, positions):
    if cfg.positional != "rotary":
        return None
    return jnp.arange(tokens.shape[-1])[None] if positions is None else positions


class _ScannedEncoderLayer(EncoderLayer):
    """An `EncoderLayer` in the form nn.scan runs: ``(x, mask, positions, segment_ids) ->
    (x, None)``, x the carry [B, S, D] (constrained to `EMBED_AXES`), the rest broadcast to
    every layer; `deterministic` is an attribute (static)."""

    deterministic: bool = True

    def __call__(self, x, mask, positions, segment_ids):
        x = super().__call__(
            x, mask, deterministic=self.deterministic, positions=positions,
            segment_ids=segment_ids,
        )  # fmt: skip
        return nn.with_logical_constraint(x, EMBED_AXES), None


class _ScannedDecoderLayer(DecoderLayer):
    """A `DecoderLayer` in the form nn.scan runs: ``(y, encoded, self_mask, cross_mask,
    positions, cache_positions, segment_ids, encoder_segment_ids) -> (y, None)``, y the
    carry [B, T, D] (constrained to `EMBED_AXES`), the rest broadcast to every layer;
    `deterministic` and `decode` are attributes (static)."""

    deterministic: bool = True
    decode: bool = False

    def __call__(
        self, y, encoded, self_mask, cross_mask, positions, cache_positions, segment_ids,
        encoder_segment_ids,
    ):  # fmt: skip
        y = super().__call__(
            y, encoded, self_mask, cross_mask, deterministic=self.deterministic,
            positions=positions, decode=self.decode, cache_positions=cache_positions,
            segment_ids=segment_ids, encoder_segment_ids=encoder_segment_ids,
        )  # fmt: skip
        return nn.with_logical_constraint(y, EMBED_AXES), None


def _scan(layer_cls, length: int, broadcast: int):
    """`layer_cls` run `length` times under nn.scan: one traced and compiled body. Its
    parameters (and sown ``intermediates``) are stacked on a leading axis of logical name
    "layers"; each layer draws its own params and dropout rngs; the KV ``cache`` is stacked
    on axis 1 ([B, L, ...]), so every cache leaf still leads with the batch (beam search
    reorders rows with one gather). The `broadcast` arguments after the carry are the same
    for every layer."""
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0, "intermediates": 0, "cache": 1},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * broadcast,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Encoder(nn.Module):
    """Embedding × √D + positions -> dropout -> L encoder layers (-> LayerNorm if pre-LN)."""

    config: TransformerConfig
    embedder: Embedder

    @nn.compact
    def __call__(self, tokens, *, train: bool = False, positions=None, segmentation=None):
        cfg = self.config
        # Packed rows: the segment ids go to attention as such (no [B, 1, S, S] same-segment
        # mask; 'blockwise' skips the tiles across examples); the mask holds only the padding.
        mask = padding_mask(tokens, pad_id=cfg.pad_id)  # [B, 1, S, S]
        x = _Positions(cfg, name="positions")(self.embedder(tokens), positions)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=not train)
        x = nn.with_logical_constraint(x, EMBED_AXES)
        rotary = _rotary(cfg, tokens, positions)
        if cfg.scan_layers:  # one layer body for the L layers (see _ScannedEncoderLayer)
            stack = _scan(_ScannedEncoderLayer, cfg.num_layers, 3)
            x, _ = stack(cfg, deterministic=not train, name=SCANNED)(x, mask, rotary, segmentation)
        else:
            for i in range(cfg.num_layers):
                x = EncoderLayer(cfg, name=f"layer_{i}")(
                    x, mask, deterministic=not train, positions=rotary, segment_ids=segmentation
                )
                x = nn.with_logical_constraint(x, EMBED_AXES)
        if cfg.pre_ln:
            x = normalization(cfg, "final_norm")(x)
        return nn.with_logical_constraint(x, EMBED_AXES)  # [B, S, D]


class Decoder(nn.Module):
    """Decoder stack with causal self-attention and (if ``cross``) cross-attention; returns
    logits over the target vocabulary: ``y · Eᵀ`` with the embedding's matrix E when
    ``config.tied_output`` (section 3.4), else a separate ``logits`` layer ``y · W + b``
    (W [D, V]). ``logit_positions`` [B, K] (see `check_logit_positions`) computes them only
    at those positions of each row: ``[B, K, V]``, for a prefill that samples from each
    row's last prompt position and would otherwise project all T positions onto V.
    ``return_hidden`` returns the states before that projection (after the final norm),
    for a loss that projects them chunk by chunk (`output_projection`)."""

    config: TransformerConfig
    embedder: Embedder
    cross: bool = True

    @nn.compact
    def __call__(
        self,
        decoder_inputs,
        encoded=None,
        source_tokens=None,
        *,
        train=False,
        positions=None,
        segmentation=None,
        source_segmentation=None,
        decode: bool = False,
        logit_positions=None,
        return_hidden: bool = False,
    ):
        cfg = self.config
        valid = _valid(decoder_inputs, cfg, positions, segmentation)  # [B, T]
        # Causality is not in the mask: the self-attention layers pass is_causal=True, which
        # lets 'blockwise' skip the tiles above the diagonal and the fused kernels use their
        # causal mode.
        # Packed rows: the segment ids go to attention as such (see Encoder); the masks hold
        # only the padding. A KV-cached decode takes none (one example per row).
        self_mask = (valid[:, :, None] & valid[:, None, :])[:, None]  # [B, 1, T, T]
        cross_mask = None
        if self.cross:
            src_valid = source_tokens != cfg.pad_id  # [B, S]
            cross_mask = (valid[:, :, None] & src_valid[:, None, :])[:, None]  # [B, 1, T, S]
        segment_ids = None if decode else segmentation
        encoder_segment_ids = None if decode else source_segmentation
        y = _Positions(cfg, name="positions")(self.embedder(decoder_inputs), positions)
        y = nn.Dropout(cfg.dropout_rate)(y, deterministic=not train)
        y = nn.with_logical_constraint(y, EMBED_AXES)
        rotary = _rotary(cfg, decoder_inputs, positions)
        cache_positions = positions if decode else None
        if cfg.scan_layers:  # one layer body for the L layers (see _ScannedDecoderLayer)
            stack = _scan(_ScannedDecoderLayer, cfg.decoder_layers, 7)
            y, _ = stack(cfg, cross=self.cross, deterministic=not train, decode=decode,
                         name=SCANNED)(
                y, encoded, self_mask, cross_mask, rotary, cache_positions, segment_ids,
                encoder_segment_ids,
            )  # fmt: skip
        else:
            for i in range(cfg.decoder_layers):
                y = DecoderLayer(cfg, cross=self.cross, name=f"layer_{i}")(
                    y,
                    encoded,
                    self_mask,
                    cross_mask,
                    deterministic=not train,
                    positions=rotary,
                    decode=decode,
                    cache_positions=cache_positions,
                    segment_ids=segment_ids,
                    encoder_segment_ids=encoder_segment_ids,
                )
                y = nn.with_logical_constraint(y, EMBED_AXES)
        if logit_positions is not None:  # y [B, T, D] -> [B, K, D]
            y = jnp.take_along_axis(y, logit_positions[:, :, None], axis=1, mode="clip")
        if cfg.pre_ln:
            y = normalization(cfg, "final_norm")(y)
        y = nn.with_logical_constraint(y, EMBED_AXES)
        if return_hidden:
            return y  # [B, T, D] (or [B, K, D]): `output_projection` turns it into logits
        if cfg.tied_output:
            logits = self.embedder.attend(y)  # [B, T, V] (or [B, K, V])
        else:
            logits = _logits_layer(cfg, name="logits")(y)  # [B, T, V] (or [B, K, V])
        return nn.with_logical_constraint(logits, LOGITS_AXES)


def _logits_layer(cfg: TransformerConfig, name: str | None = None) -> nn.Dense:
    """The untied pre-softmax layer ``y · W + b`` (W [D, V]), defined once for the model
    and `output_projection`."""
    return nn.Dense(
        cfg.output_vocab_size,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.xavier_uniform(), ("embed", "vocab")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
        name=name,
    )


def output_projection(config: TransformerConfig, params):
    """The model's own output layer as a pure function of its parameters:
    ``project(hidden [..., D]) -> logits [..., V]``, where ``hidden`` is what the model
    returns with ``return_hidden=True`` (the decoder's last states, after the final norm).
    ``project(model.apply(v, ..., return_hidden=True)) == model.apply(v, ...)``, exactly:
    it runs the same Flax code (`Embedder.attend` when ``config.tied_output``, with the
    target embedding of a `Transformer` that has one; else the decoder's ``logits`` Dense)
    on the same parameters. `params` is the model's ``params`` collection (a `Transformer`'s
    or a `TransformerLM`'s); a loss can call `project` on one chunk of tokens at a time so
    the [B, T, V] logits never exist at once."""
    if "decoder" not in params or "embedding" not in params:
        raise ValueError(
            "output_projection needs a Transformer's or TransformerLM's params (keys "
            f"'embedding' and 'decoder'), got keys {sorted(params)}"
        )
    if config.tied_output:
        name = "target_embedding" if "target_embedding" in params else "embedding"
        table = {"params": dict(params[name])}
        embedder = Embedder(config, config.output_vocab_size)

        def attend(hidden):  # attend reads [B, T, D]: hidden [..., D] -> [1, N, D] and back
            flat = hidden.reshape(1, -1, hidden.shape[-1])  # [1, N, D]
            logits = embedder.apply(table, flat, method=Embedder.attend)  # [1, N, V]
            return logits.reshape(*hidden.shape[:-1], logits.shape[-1])  # [..., V]

        return attend
    if "logits" not in params["decoder"]:
        raise ValueError(
            "config.tied_output is False but params['decoder'] has no 'logits' layer: "
            "params and config disagree"
        )
    dense = {"params": dict(params["decoder"]["logits"])}
    layer = _logits_layer(config)
    return lambda hidden: layer.apply(dense, hidden)


def stack_layer_params(tree):
    """A parameter tree of the per-layer layout (``scan_layers=False``: ``layer_0`` ...
    ``layer_{L-1}`` under each stack) -> the stacked layout of ``scan_layers=True`` (one
    ``layers`` subtree whose leaves are the L layers' leaves stacked on a new leading axis).
    Works on any nesting of mappings (a ``params`` collection, ``{'params': ...}``,
    gradients, sown ``intermediates``); boxed leaves (``nn.Partitioned``) get the logical axis
    name "layers" in front of theirs. Inverse: `unstack_layer_params`."""
    return _convert(tree, _stack_node)


def unstack_layer_params(tree):
    """The stacked layout of ``scan_layers=True`` -> the per-layer layout (``layer_0`` ...);
    the inverse of `stack_layer_params` (boxed leaves lose their leading "layers" name).
    E.g. the attention weights a scanned model sows, per layer as the plain model's:
    ``unstack_layer_params(sown['intermediates'])``."""
    return _convert(tree, _unstack_node)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def _convert(tree, convert_node):
    if not isinstance(tree, Mapping):
        return tree
    return convert_node({k: _convert(v, convert_node) for k, v in tree.items()})


def _stack_node(node: dict) -> dict:
    found = {int(m.group(1)): k for k in node if (m := _LAYER.fullmatch(k))}
    if not found:
        return node
    if sorted(found) != list(range(len(found))) or SCANNED in node:
        raise ValueError(
            f"stack_layer_params: expected layers layer_0 ... layer_{len(found) - 1} and no "
            f"'{SCANNED}' beside them, got keys {sorted(node)}"
        )
    layers = [node[found[i]] for i in range(len(found))]
    shapes = [jax.tree.structure(t, is_leaf=_is_box) for t in layers]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("stack_layer_params: the layers' parameter trees differ in structure")

    def stack(*leaves):
        if _is_box(leaves[0]):
            value = jnp.stack([leaf.value for leaf in leaves])
            return leaves[0].replace(value=value, names=("layers", *leaves[0].names))
        return jnp.stack(leaves)

    out = {k: v for k, v in node.items() if k not in found.values()}
    out[SCANNED] = jax.tree.map(stack, *layers, is_leaf=_is_box)
    return out


def _unstack_node(node: dict) -> dict:
    if SCANNED not in node or not isinstance(node[SCANNED], Mapping):
        return node
    stacked = node[SCANNED]
    leaves = jax.tree.leaves(stacked, is_leaf=_is_box)
    sizes = {(leaf.value if _is_box(leaf) else leaf).shape[:1] for leaf in leaves}
    if len(sizes) != 1 or () in sizes:
        raise ValueError(
            "unstack_layer_params: every leaf under 'layers' must lead with the same layer "
            f"axis, got leading sizes {sorted(sizes)}"
        )
    (L,) = sizes.pop()

    def take(i):
        def one(leaf):
            if _is_box(leaf):
                if leaf.names[:1] != ("layers",):
                    raise ValueError(
                        f"unstack_layer_params: a boxed leaf under 'layers' must have the "
                        f"logical names ('layers', ...), got {leaf.names}"
                    )
                return leaf.replace(value=leaf.value[i], names=leaf.names[1:])
            return leaf[i]

        return jax.tree.map(one, stacked, is_leaf=_is_box)

    out = {k: v for k, v in node.items() if k != SCANNED}
    out.update({f"layer_{i}": take(i) for i in range(L)})
    return out


class Transformer(nn.Module):
    """The encoder-decoder of the paper.

    ``model.apply(vars, inputs [B, S], targets [B, T])`` -> logits ``[B, T, V]`` for
    teacher forcing (the decoder reads ``shift_right(targets)``). ``encode`` and ``decode``
    can be called separately (``method=``), as decoding needs.
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        src = Embedder(cfg, cfg.vocab_size, name="embedding")
        tgt = src
        if not cfg.share_embeddings:
            tgt = Embedder(cfg, cfg.output_vocab_size, name="target_embedding")
        self.encoder = Encoder(cfg, src)
        self.decoder = Decoder(cfg, tgt)

    def encode(self, inputs, *, train: bool = False, positions=None, segmentation=None):
        """inputs [B, S] token ids -> encoded [B, S, D]."""
        inputs = check_tokens("inputs", inputs, self.config)
        _check_packing("inputs", inputs, positions, segmentation)
        return self.encoder(inputs, train=train, positions=positions, segmentation=segmentation)

    def decode(
        self,
        encoded,
        inputs,
        decoder_inputs,
        *,
        train: bool = False,
        positions=None,
        segmentation=None,
        source_segmentation=None,
        decode: bool = False,
        logit_positions=None,
        return_hidden: bool = False,
    ):
        """encoded [B, S, D], inputs [B, S] (for the source padding), decoder_inputs [B, T]
        (already shifted) -> logits [B, T, V]; with ``logit_positions`` int [B, K] (indices
        into T) only the logits there, [B, K, V] (the hidden states are gathered before the
        output projection). ``return_hidden=True``: the decoder's last hidden states
        [B, T, D] (or [B, K, D]) after the final norm instead of logits; `output_projection`
        maps them to the same logits (do not ``init`` with it: the output layer would not
        be created).

        ``decode=True`` uses the KV cache (see layers.MultiHeadAttention): the first call,
        with ``decoder_inputs`` of the longest decode and the real `encoded`, creates it
        (``mutable=['cache']``); later calls pass a block of positions ``[B, P]`` (one
        token, P = 1, or several at once) with their ``positions [B, P]`` and
        ``encoded=None`` (the encoder's keys are cached)."""
        cfg = self.config
        inputs = check_tokens("inputs", inputs, cfg)
        decoder_inputs = check_tokens("decoder_inputs", decoder_inputs, cfg, cfg.output_vocab_size)
        if encoded is None and not decode:
            raise ValueError("encoded is None: only a cached decode step may omit it")
        if encoded is not None and (
            encoded.shape[:2] != inputs.shape or encoded.shape[-1] != cfg.d_model
        ):
            raise ValueError(
                f"encoded must be [B, S, D={cfg.d_model}] for inputs {inputs.shape}, "
                f"got {encoded.shape}"
            )
        if decoder_inputs.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"inputs {inputs.shape} and decoder_inputs {decoder_inputs.shape} need the "
                "same batch size"
            )
        _check_packing("decoder_inputs", decoder_inputs, positions, segmentation)
        if (segmentation is None) != (source_segmentation is None):
            raise ValueError("give both segmentation and source_segmentation, or neither")
        logit_positions = check_logit_positions(logit_positions, decoder_inputs)
        return self.decoder(
            decoder_inputs,
            encoded,
            inputs,
            train=train,
            positions=positions,
            segmentation=segmentation,
            source_segmentation=source_segmentation,
            decode=decode,
            logit_positions=logit_positions,
            return_hidden=return_hidden,
        )

    def __call__(
        self,
        inputs,
        targets,
        *,
        train: bool = False,
        inputs_positions=None,
        targets_positions=None,
        inputs_segmentation=None,
        targets_segmentation=None,
        return_hidden: bool = False,
    ):
        """inputs [B, S], targets [B, T] -> logits [B, T, V] predicting targets. For packed
        rows, pass the four position / segmentation arrays ([B, S] and [B, T]).
        ``return_hidden=True``: the hidden states [B, T, D] instead (see `decode`)."""
        cfg = self.config
        targets = check_tokens("targets", targets, cfg, cfg.output_vocab_size)
        inputs = check_tokens("inputs", inputs, cfg)
        if inputs.shape[0] != targets.shape[0]:  # refused before the encoder runs
            raise ValueError(
                f"inputs {inputs.shape} and targets {targets.shape} need the same batch size"
            )
        encoded = self.encode(
            inputs, train=train, positions=inputs_positions, segmentation=inputs_segmentation
        )
        return self.decode(
            encoded,
            inputs,
            shift_right_packed(targets, targets_positions, cfg.pad_id),
            train=train,
            positions=targets_positions,
            segmentation=targets_segmentation,
            source_segmentation=inputs_segmentation,
            return_hidden=return_hidden,
        )


class TransformerLM(nn.Module):
    """Decoder-only language model: causal self-attention + feed-forward layers.

    ``model.apply(vars, tokens [B, T])`` -> logits ``[B, T, V]``; position t predicts the
    token at t + 1 of the same sequence (feed ``shift_right(tokens)`` to predict ``tokens``).
    """

    config: TransformerConfig

    def setup(self):
        self.embedder = Embedder(self.config, self.config.vocab_size, name="embedding")
        self.decoder = Decoder(self.config, self.embedder, cross=False)

    def __call__(
        self,
        tokens,
        *,
        train: bool = False,
        positions=None,
        segmentation=None,
        decode=False,
        logit_positions=None,
        return_hidden: bool = False,
    ):
        """tokens [B, T] -> logits [B, T, V]; ``logit_positions`` int [B, K] (indices into
        T): only the logits there, [B, K, V] (a prefill needs each row's last prompt
        position alone); ``return_hidden=True``: the hidden states [B, T, D] (or [B, K, D])
        instead of logits, as in `Transformer.decode`; ``decode=True``: the KV cache, as in
        `Transformer.decode`: create it with tokens of the longest decode
        (``mutable=['cache']``), then pass blocks of positions ``[B, P]`` with their
        ``positions [B, P]``: a prompt at once (prefill), then one token per call. Each row
        may be at its own position (prompts of different lengths): query p attends to the
        cache slots ``<= p`` of its row, so a right-padded prefill is exact for every row
        up to its own length, and the row continues from there. The cache does not read
        the pad id: a pad inside a row's decoded prefix is attended to (the full model
        would mask it); generation never produces one."""
        tokens = check_tokens("tokens", tokens, self.config)
        _check_packing("tokens", tokens, positions, segmentation)
        logit_positions = check_logit_positions(logit_positions, tokens)
        return self.decoder(
            tokens, train=train, positions=positions, segmentation=segmentation, decode=decode,
            logit_positions=logit_positions, return_hidden=return_hidden,
        )  # fmt: skip
