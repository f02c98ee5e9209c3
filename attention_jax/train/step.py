"""Training core: the paper's optimizer and schedule, a train state, pure train/eval steps,
and their sharded, jitted versions.

A batch is a dict of integer arrays ``{'inputs': [B, S], 'targets': [B, T]}`` for the
`Transformer`, or ``{'targets': [B, T]}`` for the `TransformerLM` (which reads
``shift_right(targets)``). Padding (``pad_id``) does not count in the loss. An LM batch may
carry ``targets_bytes`` (UTF-8 bytes per token, for bits per byte): `lm_eval_step` sums them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from attention_jax.nn.model import TransformerLM, output_projection, shift_right_packed
from attention_jax.nn.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    complete_rules,
    logical_shardings,
    under_rules,
)
from attention_jax.train.losses import (
    chunked_smoothed_cross_entropy_terms,
    masked_sums,
    smoothed_cross_entropy_sums,
)
from attention_jax.workdir.experiment import NONFINITE_POLICIES


def paper_learning_rate(d_model: int, warmup_steps: int = 4000, factor: float = 1.0):
    """lrate = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) (section 5.3),
    with step counted from 1 (optax counts updates from 0)."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0
        return factor * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

    return schedule


def make_optimizer(
    d_model: int,
    *,
    warmup_steps: int = 4000,
    lr_factor: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-9,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """Adam(β1=0.9, β2=0.98, ε=1e-9) with the paper's warmup schedule; optional clipping."""
    adam = optax.adam(paper_learning_rate(d_model, warmup_steps, lr_factor), b1=b1, b2=b2, eps=eps)
    if clip_norm is None:
        return adam
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken so far (one batch each)
    params: Any
    opt_state: Any
    rng: jax.Array  # base dropout key (raw uint32 key data); step t uses fold_in(rng, t)
    # Steps whose loss or gradient was NaN/Inf (their updates were not applied), and the
    # first such step (-1: none). See train_step's `nonfinite`.
    nonfinite_steps: jax.Array = dataclasses.field(default_factory=lambda: jnp.int32(0))
    first_nonfinite_step: jax.Array = dataclasses.field(default_factory=lambda: jnp.int32(-1))


PACKING_KEYS = ("inputs_positions", "targets_positions", "inputs_segmentation",
                "targets_segmentation")  # fmt: skip


def _logits(model, params, batch, *, train: bool, rng=None, return_hidden: bool = False):
    """Logits of a batch: ``inputs``/``targets`` [B, S]/[B, T], plus the PACKING_KEYS when
    several examples share a row. ``return_hidden``: the decoder's last hidden states
    [B, T, D] instead (`output_projection` maps them to the logits)."""
    rngs = None if rng is None else {"dropout": rng}
    variables = {"params": params}
    packing = {k: batch[k] for k in PACKING_KEYS if k in batch}
    hidden = {"return_hidden": True} if return_hidden else {}
    if isinstance(model, TransformerLM):
        positions = packing.get("targets_positions")
        tokens = shift_right_packed(batch["targets"], positions, model.config.pad_id)
        return model.apply(variables, tokens, train=train, rngs=rngs, positions=positions,
                           segmentation=packing.get("targets_segmentation"), **hidden)  # fmt: skip
    return model.apply(
        variables, batch["inputs"], batch["targets"], train=train, rngs=rngs, **packing, **hidden
    )


def check_loss_chunk(loss_chunk) -> int:
    """``loss_chunk``: 0 (the loss over the whole [B, T, V] logits) or the tokens per chunk
    of the chunked loss (`losses.chunked_smoothed_cross_entropy_terms`)."""
    if isinstance(loss_chunk, bool) or not isinstance(loss_chunk, int) or loss_chunk < 0:
        raise ValueError(
            f"loss_chunk must be an int >= 0 (0: off; else tokens per chunk), got {loss_chunk!r}"
        )
    return loss_chunk


def _token_terms(model, params, batch, *, train, rng, label_smoothing, loss_chunk):
    """``(loss [B, T], correct [B, T])`` per target token (padding included), the logits
    projected `loss_chunk` tokens at a time (never all at once)."""
    hidden = _logits(model, params, batch, train=train, rng=rng, return_hidden=True)
    return chunked_smoothed_cross_entropy_terms(
        hidden, output_projection(model.config, params), batch["targets"], chunk=loss_chunk,
        label_smoothing=label_smoothing, pad_id=model.config.pad_id,
    )  # fmt: skip


def _sums(model, params, batch, *, train, rng, label_smoothing, loss_chunk=0):
    """(loss, tokens, correct) sums; ``loss_chunk > 0``: the chunked loss, same sums."""
    if loss_chunk:
        per_token, correct = _token_terms(
            model, params, batch, train=train, rng=rng, label_smoothing=label_smoothing,
            loss_chunk=loss_chunk,
        )  # fmt: skip
        return masked_sums(per_token, correct, batch["targets"], pad_id=model.config.pad_id)
    logits = _logits(model, params, batch, train=train, rng=rng)
    return smoothed_cross_entropy_sums(
        logits, batch["targets"], label_smoothing=label_smoothing, pad_id=model.config.pad_id
    )


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    label_smoothing: float = 0.1,
    accum_steps: int = 1,
    nonfinite: str = "stop",
    loss_chunk: int = 0,
) -> tuple[TrainState, dict]:
    """One optimizer update from `batch`, as a pure function.

    With ``accum_steps = k`` the batch is split into k microbatches whose gradient *sums*
    are accumulated (``lax.scan``), then divided by the total token count: the same update
    as one step on the whole batch, with 1/k of the activation memory.

    A NaN/Inf loss or gradient norm is detected here, on the device: that step's update is
    not applied, ``state.nonfinite_steps`` counts it and ``state.first_nonfinite_step``
    keeps the first one. With ``nonfinite='stop'`` (the default) every later update is
    withheld too, so the parameters stay those from before the first bad step until the
    host, reading the metrics it fetches anyway, stops the run; with ``'skip'`` training
    goes on without the bad updates.

    ``loss_chunk > 0`` computes the loss `loss_chunk` tokens at a time with the logits
    recomputed in the backward pass, so the [B, T, V] float32 logits are never alive at
    once (`losses.chunked_smoothed_cross_entropy_sums`); same loss and gradients.

    Returns the new state and metrics ``{loss, accuracy, tokens, grad_norm,
    nonfinite_steps, first_nonfinite_step}`` (loss = mean over non-padding target tokens),
    and ``bytes`` (the sum of ``targets_bytes`` over them) when the batch has that key.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    loss_chunk = check_loss_chunk(loss_chunk)
    rng = jax.random.fold_in(state.rng, state.step)
    grads, (loss, tokens, correct) = _gradient_sums(
        model, state.params, batch, rng, label_smoothing=label_smoothing,
        accum_steps=accum_steps, loss_chunk=loss_chunk,
    )  # fmt: skip
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)  # d(mean loss)/d(params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    new_state = _guard_nonfinite(
        state, params, opt_state, finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
        nonfinite=nonfinite,
    )  # fmt: skip
    metrics = {
        "loss": loss / denom,
        "accuracy": correct / denom,
        "tokens": tokens,
        "grad_norm": grad_norm,
        "nonfinite_steps": new_state.nonfinite_steps,
        "first_nonfinite_step": new_state.first_nonfinite_step,
    }
    if "targets_bytes" in batch:
        metrics["bytes"] = _byte_sum(batch, model.config.pad_id)
    return new_state, metrics


def _byte_sum(batch: dict, pad_id: int):
    """The UTF-8 bytes of a batch's tokens (``targets_bytes``; padding carries none)."""
    real = batch["targets"] != pad_id
    return jnp.sum(jnp.where(real, batch["targets_bytes"], 0).astype(jnp.float32))


def _gradient_sums(model, params, batch, rng, *, label_smoothing, accum_steps, loss_chunk=0):
    """``(grads, (loss, tokens, correct))``: gradient and loss *sums* over the batch's
    non-padding target tokens. With ``accum_steps = k`` the batch is split into k
    microbatches (microbatch i uses the dropout key ``fold_in(rng, i)``) whose sums are
    accumulated in a ``lax.scan``."""

    def loss_sums(params, mb, key):
        loss, tokens, correct = _sums(
            model, params, mb, train=True, rng=key, label_smoothing=label_smoothing,
            loss_chunk=loss_chunk,
        )  # fmt: skip
        return loss, (tokens, correct)

    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
    if accum_steps == 1:
        (loss, aux), grads = grad_fn(params, batch, rng)
        return grads, (loss, *aux)

    def split(x):  # [B, ...] -> [k, B/k, ...]
        if x.shape[0] % accum_steps:
            raise ValueError(
                f"batch of {x.shape[0]} rows does not split into accum_steps={accum_steps}"
            )
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    def body(carry, xs):
        i, mb = xs
        (l_, (t_, c_)), g_ = grad_fn(params, mb, jax.random.fold_in(rng, i))
        acc_g, acc_l, acc_t, acc_c = carry
        return (jax.tree.map(jnp.add, acc_g, g_), acc_l + l_, acc_t + t_, acc_c + c_), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    xs = (jnp.arange(accum_steps), jax.tree.map(split, batch))
    (grads, loss, tokens, correct), _ = jax.lax.scan(body, init, xs)
    return grads, (loss, tokens, correct)


def _guard_nonfinite(state: TrainState, params, opt_state, *, finite, nonfinite: str):
    """The state after a step whose new `params` and `opt_state` are applied only if the
    step was `finite` (and, under 'stop', no earlier step was not); a step that was not is
    counted, and the first one kept."""
    apply = finite if nonfinite == "skip" else finite & (state.nonfinite_steps == 0)
    keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
    bad = jnp.logical_not(finite)
    return state.replace(
        step=state.step + 1,
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        nonfinite_steps=state.nonfinite_steps + bad.astype(jnp.int32),
        first_nonfinite_step=jnp.where(
            bad & (state.first_nonfinite_step < 0), state.step, state.first_nonfinite_step
        ),
    )


def eval_step(
    params, batch: dict, *, model: nn.Module, label_smoothing: float = 0.1, loss_chunk: int = 0
) -> dict:
    """Sums over a batch, deterministic (add them across batches): ``loss_sum``, ``tokens``,
    ``correct`` tokens, ``sequences`` and ``exact`` — sequences whose every target token is
    the argmax given the true prefix (for greedy decoding that is the same as exact match).
    ``loss_chunk > 0``: the logits `loss_chunk` tokens at a time (see `train_step`)."""
    targets = batch["targets"]
    pad = model.config.pad_id
    if check_loss_chunk(loss_chunk):
        per_token, hit = _token_terms(
            model, params, batch, train=False, rng=None, label_smoothing=label_smoothing,
            loss_chunk=loss_chunk,
        )  # fmt: skip
        loss, tokens, correct = masked_sums(per_token, hit, targets, pad_id=pad)
    else:
        logits = _logits(model, params, batch, train=False)
        loss, tokens, correct = smoothed_cross_entropy_sums(
            logits, targets, label_smoothing=label_smoothing, pad_id=pad
        )
        hit = jnp.argmax(logits, -1) == targets
    right = hit | (targets == pad)  # [B, T]
    real = jnp.any(targets != pad, axis=-1)  # [B]: all-pad rows fill the last eval batch
    return {
        "loss_sum": loss,
        "tokens": tokens,
        "correct": correct,
        "sequences": jnp.sum(real.astype(jnp.float32)),
        "exact": jnp.sum((jnp.all(right, axis=-1) & real).astype(jnp.float32)),
    }


def lm_eval_step(params, batch: dict, *, model: nn.Module, loss_chunk: int = 0) -> dict:
    """Sums over a language-model batch, deterministic (add them across batches): ``nll``
    (the negative log-likelihood in nats, no label smoothing), ``tokens`` and ``bytes``
    (``targets_bytes``) over the tokens with ``targets_segmentation > 0`` (all non-padding
    tokens; without that key, ``targets != pad_id``), and ``correct`` argmax predictions.
    `pipeline.language_model_scores` turns them into loss, perplexity and bits per byte.
    ``loss_chunk > 0``: the logits `loss_chunk` tokens at a time (see `train_step`)."""
    targets = batch["targets"]
    if "targets_segmentation" in batch:
        real = batch["targets_segmentation"] > 0
    else:
        real = targets != model.config.pad_id
    weights = real.astype(jnp.float32)
    if check_loss_chunk(loss_chunk):  # with no smoothing the per-token loss is -log p(target)
        nll, right = _token_terms(
            model, params, batch, train=False, rng=None, label_smoothing=0.0,
            loss_chunk=loss_chunk,
        )  # fmt: skip
        on_target = -nll
    else:
        logits = _logits(model, params, batch, train=False)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        on_target = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
        right = jnp.argmax(logits, axis=-1) == targets
    right = right.astype(jnp.float32)
    return {
        "nll": -jnp.sum(on_target * weights),
        "tokens": jnp.sum(weights),
        "bytes": jnp.sum(jnp.where(real, batch["targets_bytes"], 0).astype(jnp.float32)),
        "correct": jnp.sum(right * weights),
    }


# --------------------------------------------------------------------------------------
# Sharded state and steps.
# --------------------------------------------------------------------------------------


def _init_state(model, optimizer, example_batch, rng):
    init_key, dropout_key = jax.random.split(rng)
    if jnp.issubdtype(dropout_key.dtype, jax.dtypes.prng_key):
        dropout_key = jax.random.key_data(dropout_key)  # raw uint32: checkpoints store it as is
    if isinstance(model, TransformerLM):
        variables = model.init(init_key, example_batch["targets"])
    else:
        variables = model.init(init_key, example_batch["inputs"], example_batch["targets"])
    params = variables["params"]  # boxed (nn.Partitioned): carries logical axis names
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),  # Adam's moments inherit the boxes, hence the names
        rng=dropout_key,
    )


def create_train_state(model, optimizer, example_batch: dict, rng, mesh, rules=DEFAULT_RULES):
    """Creates the train state already sharded on `mesh` (never materialised unsharded).

    ``eval_shape`` gives the boxed abstract state; its logical names and the rules give the
    shardings; ``jit(init, out_shardings=...)`` creates each shard where it lives (traced
    `under_rules`, so the parameters and the activations of the initialising forward pass
    are constrained as in the train step).

    Returns ``(state, state_shardings)`` with unboxed params.
    """
    rules = complete_rules(rules)

    def boxed(batch, key):
        with under_rules(mesh, rules):
            return _init_state(model, optimizer, batch, key)

    abstract = jax.eval_shape(boxed, example_batch, rng)
    shardings = logical_shardings(abstract, mesh, rules)  # unnamed leaves: replicated

    def init(batch, key):
        return nn.unbox(boxed(batch, key))

    state = jax.jit(init, out_shardings=shardings)(example_batch, rng)
    return state, shardings


def _replicated(mesh):
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _under(fn, mesh, rules):
    """`fn` traced `under_rules(mesh, rules)`: the model's activation constraints act."""

    def traced(*args):
        with under_rules(mesh, rules):
            return fn(*args)

    traced.__name__ = traced.__qualname__ = fn.func.__name__  # jit(train_step) in profiles
    return traced


def jit_train_step(model, optimizer, state_shardings, mesh, *, rules=DEFAULT_RULES, **step_kwargs):
    """The train step jitted once with in/out shardings and the state donated, traced under
    `mesh` and the logical-axis `rules` (activations sharded as they say)."""
    rules = complete_rules(rules)
    step = functools.partial(train_step, model=model, optimizer=optimizer, **step_kwargs)
    data = batch_sharding(mesh)
    return jax.jit(
        _under(step, mesh, rules),
        in_shardings=(state_shardings, data),
        out_shardings=(state_shardings, _replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(model, param_shardings, mesh, *, rules=DEFAULT_RULES, **step_kwargs):
    """`eval_step` jitted (`lm_eval_step` for a `TransformerLM`), traced under `mesh` and
    the logical-axis `rules`."""
    rules = complete_rules(rules)
    fn = lm_eval_step if isinstance(model, TransformerLM) else eval_step
    step = functools.partial(fn, model=model, **step_kwargs)
    return jax.jit(
        _under(step, mesh, rules),
        in_shardings=(param_shardings, batch_sharding(mesh)),
        out_shardings=_replicated(mesh),
    )
