"""config.remat: each layer under nn.remat with a named jax.checkpoint policy.

Rematerialisation changes what the forward pass keeps for the backward pass, never the
numbers: each policy is checked against 'none' (the plain model, the reference) for the
loss and every gradient, with dropout on (the recomputed forward pass must draw the same
masks), on the encoder-decoder and on the LM (rotary positions and a packed batch, so that
arrays pass through the rematerialised layer as well as the bools)."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax.nn import sharding
from attention_jax.nn.config import REMATS, TransformerConfig
from attention_jax.nn.layers import REMAT_POLICIES
from attention_jax.nn.model import Transformer, TransformerLM
from attention_jax.train import step as training
from attention_jax.train.losses import smoothed_cross_entropy_sums
from attention_jax.workdir.experiment import model_config_dict, model_signature

V = 32
# Compile time, not the numbers, is what these two settings change: XLA's CPU backend
# unoptimised (the policies and 'none' compiled alike), and dropout keys of the RBG
# generator (threefry's bits take longer to compile; any key serves, the same for all).
FAST = {"xla_backend_optimization_level": 0}
DROPOUT_KEY = jax.random.key(1, impl="unsafe_rbg")
TINY = dict(vocab_size=V, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=16,
            dropout_rate=0.1, attention_dropout_rate=0.1)  # fmt: skip


def _batch(kind):
    """Encoder-decoder: padded source and target rows. LM: one packed row (two examples)
    and one padded row."""
    rng = np.random.default_rng(0)
    if kind == "encoder_decoder":
        inputs = rng.integers(1, V, (2, 7))
        inputs[1, 5:] = 0
        targets = rng.integers(1, V, (2, 6))
        targets[0, 4:] = 0
        return {
            "inputs": jnp.asarray(inputs, jnp.int32),
            "targets": jnp.asarray(targets, jnp.int32),
        }
    targets = rng.integers(1, V, (2, 8))
    targets[1, 6:] = 0
    positions = np.array([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))])
    segmentation = np.array([[1, 1, 1, 2, 2, 2, 2, 2], [1] * 6 + [0, 0]])
    return {
        "targets": jnp.asarray(targets, jnp.int32),
        "targets_positions": jnp.asarray(positions, jnp.int32),
        "targets_segmentation": jnp.asarray(segmentation, jnp.int32),
    }


def _model(kind, remat):
    if kind == "encoder_decoder":
        return Transformer(TransformerConfig(**TINY, remat=remat))
    return TransformerLM(TransformerConfig(**TINY, positional="rotary", remat=remat))


def _abstract_params(model, batch):
    """The parameter tree's names, shapes and dtypes (traced, not compiled)."""
    if isinstance(model, Transformer):
        init = lambda: model.init(jax.random.key(0), batch["inputs"], batch["targets"])  # noqa: E731
    else:
        init = lambda: model.init(jax.random.key(0), batch["targets"])  # noqa: E731
    return jax.eval_shape(init)["params"]


def _loss_and_grads(model, batch):
    """params -> (mean label-smoothed loss, its gradients), dropout on, one fixed key."""

    def loss(params):
        logits = training._logits(model, params, batch, train=True, rng=DROPOUT_KEY)
        total, tokens, _ = smoothed_cross_entropy_sums(logits, batch["targets"])
        return total / tokens

    return jax.value_and_grad(loss)


@pytest.mark.parametrize("kind", ["encoder_decoder", "lm"])
def test_each_policy_gives_the_plain_models_parameters_loss_and_gradients(kind):
    batch = _batch(kind)
    abstract = {remat: _abstract_params(_model(kind, remat), batch) for remat in REMATS}
    for remat in REMATS:  # the same parameter tree: names, shapes, dtypes
        assert abstract[remat] == abstract["none"], remat
    rng = np.random.default_rng(2)  # any parameters will do (no initialiser to compile)
    params = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), abstract["none"]
    )
    # One program for all policies: one compilation instead of four.
    results = jax.jit(
        lambda p: {remat: _loss_and_grads(_model(kind, remat), batch)(p) for remat in REMATS},
        compiler_options=FAST,
    )(params)
    loss0, grads0 = results["none"]
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
    assert scale > 0
    for remat in REMATS[1:]:
        loss, grads = results[remat]
        np.testing.assert_allclose(loss, loss0, rtol=1e-5, err_msg=remat)
        for (path, g), g0 in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0), strict=True
        ):  # relative to the largest gradient: a leaf that is ~0 has no relative scale
            np.testing.assert_allclose(
                g, g0, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{remat} {jax.tree_util.keystr(path)}"
            )


def _saved_bytes(remat):
    """Bytes the forward pass keeps for the backward pass (the residuals of jax.vjp)."""
    model, batch = _model("encoder_decoder", remat), _batch("encoder_decoder")

    def residuals(params):
        logits_of = functools.partial(
            training._logits, model, batch=batch, train=True, rng=DROPOUT_KEY
        )
        return jax.vjp(logits_of, params)[1]

    abstract = jax.eval_shape(residuals, _abstract_params(model, batch))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))


def test_the_policies_keep_less_for_the_backward_pass():
    """The policy reaches jax.checkpoint: 'full' keeps least, 'dots' keeps more (the weight
    matmuls' outputs), 'dots_all' more again (the attention scores too), 'none' most."""
    saved = {remat: _saved_bytes(remat) for remat in REMATS}
    assert saved["full"] < saved["dots"] < saved["dots_all"] < saved["none"], saved


def _primitive_names(jaxpr) -> set[str]:
    """Every primitive of `jaxpr` and of the jaxprs in its equations' parameters."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    names |= _primitive_names(sub)
    return names


@pytest.mark.parametrize("remat", ["none", "full"])
def test_the_train_step_is_rematerialised(remat):
    """The jitted train step's program holds the checkpoint primitive under 'full' (and not
    under 'none'): the option reaches the real step, not only the model."""
    model = _model("encoder_decoder", remat)
    batch = _batch("encoder_decoder")
    optimizer = training.make_optimizer(16, warmup_steps=10)
    mesh = sharding.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
    state = jax.eval_shape(  # traced, not compiled
        lambda: training.create_train_state(model, optimizer, batch, jax.random.key(0), mesh)[0]
    )
    step = functools.partial(training.train_step, model=model, optimizer=optimizer)
    names = _primitive_names(jax.make_jaxpr(step)(state, batch).jaxpr)
    remats = {n for n in names if n.startswith(("remat", "checkpoint"))}  # jax: 'remat2'
    assert bool(remats) == (remat != "none"), sorted(names)


def test_kv_cached_decoding_works_with_remat():
    """Blocks of positions through the KV cache (a prefill, then the rest), with remat
    'full' in the config (the cached steps skip it): the same logits as the full forward
    pass of the same model."""
    cfg = TransformerConfig(**{**TINY, "dropout_rate": 0.0, "attention_dropout_rate": 0.0},
                            positional="rotary", remat="full")  # fmt: skip
    model = TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, V, (2, 8)), jnp.int32)

    @functools.partial(jax.jit, compiler_options=FAST)
    def start(tokens):  # parameters, the full forward pass, an empty cache: one compilation
        params = model.init(jax.random.key(0), tokens)["params"]
        cache = model.init(jax.random.key(0), tokens, decode=True)["cache"]
        return params, model.apply({"params": params}, tokens), cache

    params, full, cache = start(tokens)

    @functools.partial(jax.jit, compiler_options=FAST)
    def step(cache, block, positions):
        return model.apply({"params": params, "cache": cache}, block, positions=positions,
                           decode=True, mutable=["cache"])  # fmt: skip

    positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
    pieces = []
    for t in range(0, 8, 4):  # two blocks of 4 (a prefill, then its continuation)
        logits, cache = step(cache, tokens[:, t : t + 4], positions[:, t : t + 4])
        cache = cache["cache"]
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_an_unknown_policy_is_refused_in_one_line():
    with pytest.raises(ValueError) as e:
        TransformerConfig.tiny(remat="checkpoint_dots")
    assert str(e.value) == (
        f"TransformerConfig.remat must be one of {REMATS}, got 'checkpoint_dots'"
    )
    assert set(REMAT_POLICIES) == set(REMATS) - {"none"}


def test_remat_is_not_part_of_the_checkpoint_signature():
    """It changes no parameter: a run may resume with another policy."""
    cfg = TransformerConfig.tiny()
    assert model_signature(cfg.replace(remat="full")) == model_signature(cfg)
    assert model_config_dict(vocab_size=8).remat == "none"  # settable from the flags
