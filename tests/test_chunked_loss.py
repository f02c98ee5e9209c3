"""Loss without the full logits (issue 17): `output_projection` is the model's own output
layer, the chunked loss equals the full one (sums and gradients, float64 NumPy reference for
the value), the train and eval steps give the same numbers with ``loss_chunk`` on or off,
and the gradient's jaxpr never holds [B·T, V] logits when the loss is chunked."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attention_jax as aj
from attention_jax.nn import sharding
from attention_jax.nn.model import output_projection
from attention_jax.train import losses
from attention_jax.train import step as training

V = 40  # unlike every other dimension of the tiny model (D 32, F 64, B·T 48), see the jaxpr test


def _batch(seed=0, B=8, S=7, T=6):
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, V, size=(B, S)).astype(np.int32)
    targets = rng.integers(3, V, size=(B, T)).astype(np.int32)
    inputs[1, 4:] = 0  # some padding
    targets[2, 3:] = 0
    targets[5, 1:] = 0
    return {"inputs": inputs, "targets": targets}


def _close(got, want, rtol):
    """Equal within `rtol` relative to the largest magnitude of `want` (per array)."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        w = np.asarray(w)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.max(np.abs(w))))


# ---- output_projection == the model's output layer. -----------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # tied, one shared table, post-LN (the paper)
        dict(pre_ln=True, share_embeddings=False, tie_output_embedding=True),  # target table
        dict(tie_output_embedding=False),  # the `logits` Dense, post-LN
        dict(tie_output_embedding=False, pre_ln=True),
    ],
    ids=["tied", "tied-target-preln", "untied", "untied-preln"],
)
def test_output_projection_equals_model_logits(overrides):
    cfg = aj.TransformerConfig.tiny(vocab_size=V, num_layers=1, **overrides)
    batch = _batch()
    x, y = batch["inputs"], batch["targets"]
    for model, args in ((aj.Transformer(cfg), (x, y)), (aj.TransformerLM(cfg), (y,))):
        params = model.init(jax.random.key(1), *args)["params"]
        logits = model.apply({"params": params}, *args)
        hidden = model.apply({"params": params}, *args, return_hidden=True)
        assert hidden.shape == (*y.shape, cfg.d_model)
        project = output_projection(cfg, params)
        _close(project(hidden), logits, 1e-6)
        _close(project(hidden.reshape(-1, cfg.d_model)), logits.reshape(-1, V), 1e-6)  # [N, D]


def test_output_projection_refuses_params_of_another_model():
    cfg = aj.TransformerConfig.tiny(vocab_size=V, tie_output_embedding=False)
    params = aj.TransformerLM(cfg.replace(tie_output_embedding=True)).init(
        jax.random.key(0), _batch()["targets"]
    )["params"]
    with pytest.raises(ValueError, match="no 'logits' layer"):
        output_projection(cfg, params)
    with pytest.raises(ValueError, match="got keys \\['layer'\\]"):
        output_projection(cfg, {"layer": {}})


# ---- The chunked loss == the full loss. -----------------------------------------------


def _problem(B=3, T=5, D=8, V_=17):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((D, V_)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(V_), jnp.float32)
    targets = rng.integers(1, V_, size=(B, T)).astype(np.int32)
    targets[0, 2:] = 0  # padding
    targets[2, 4] = 0
    return hidden, (w, b), jnp.asarray(targets)


def _reference_sums(hidden, w, b, targets, eps):
    """float64 NumPy: (Σ KL(q || p) over non-pad tokens, tokens, argmax hits)."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64) + np.asarray(b)
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    V_ = logits.shape[-1]
    q = np.full(logits.shape, eps / (V_ - 1))
    np.put_along_axis(q, np.asarray(targets)[..., None], 1 - eps, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_token = (np.where(q > 0, q * np.log(q), 0.0) - q * log_p).sum(-1)
    real = np.asarray(targets) != 0
    hits = (logits.argmax(-1) == np.asarray(targets)) & real
    return (per_token * real).sum(), real.sum(), hits.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [4, 5, 64])  # B·T = 15: not dividing, dividing, larger
def test_chunked_sums_and_gradients_equal_the_full_loss(chunk, eps):
    hidden, wb, targets = _problem()

    def full(hidden, wb):
        logits = hidden @ wb[0] + wb[1][None, None]  # [B, T, V]
        return losses.smoothed_cross_entropy_sums(logits, targets, label_smoothing=eps)

    def chunked(hidden, wb):
        return losses.chunked_smoothed_cross_entropy_sums(
            hidden, lambda h: h @ wb[0] + wb[1][None], targets, chunk=chunk, label_smoothing=eps
        )

    want, got = full(hidden, wb), chunked(hidden, wb)
    _close(got, want, 1e-6)
    _close(got, _reference_sums(hidden, *wb, targets, eps), 1e-5)
    grad = lambda f: jax.grad(lambda h, p: f(h, p)[0], argnums=(0, 1))(hidden, wb)  # noqa: E731
    got = grad(chunked)
    _close(got, grad(full), 1e-6)
    assert float(jnp.abs(got[0][0, 2:]).max()) == 0.0  # padding gets no gradient


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, None])
def test_bad_chunk_is_refused_naming_it(chunk):
    hidden, wb, targets = _problem()
    with pytest.raises(ValueError, match=f"positive int .*got {chunk!r}"):
        losses.chunked_smoothed_cross_entropy_sums(
            hidden, lambda h: h @ wb[0], targets, chunk=chunk
        )


def test_bad_loss_chunk_is_refused_by_the_steps():
    cfg = aj.TransformerConfig.tiny(vocab_size=V, num_layers=1)
    model, batch = aj.Transformer(cfg), _batch()
    params = model.init(jax.random.key(0), batch["inputs"], batch["targets"])["params"]
    with pytest.raises(ValueError, match=r"loss_chunk must be an int >= 0 .*got -1"):
        training.eval_step(params, batch, model=model, loss_chunk=-1)
    with pytest.raises(ValueError, match=r"loss_chunk must be an int >= 0 .*got 1.5"):
        training.train_step(None, batch, model=model, optimizer=None, loss_chunk=1.5)


# ---- Through the train and eval steps. ------------------------------------------------


def _keep_gradients():
    """An "optimizer" whose state is the last gradient and whose update is 0, so that a
    train step's new ``opt_state`` is its gradient (d mean loss / d params)."""
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    return optax.GradientTransformation(zeros, lambda g, s, p=None: (zeros(g), g))


def _setup(model_cls, **overrides):
    cfg = aj.TransformerConfig.tiny(vocab_size=V, num_layers=1, **overrides)
    model = model_cls(cfg)
    batch = _batch()
    if model_cls is aj.TransformerLM:
        batch = {"targets": batch["targets"], "targets_bytes": batch["targets"] % 3}
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    opt = _keep_gradients()
    state, _ = training.create_train_state(model, opt, batch, jax.random.key(0), mesh)
    return model, opt, state, batch


@pytest.mark.parametrize(
    "model_cls, overrides, accum",
    [
        # dropout: the same keys on both paths
        (aj.Transformer, dict(dropout_rate=0.1, tie_output_embedding=False, pre_ln=True), 1),
        (aj.TransformerLM, dict(), 2),  # tied; gradient accumulation over 2 microbatches
    ],
    ids=["encdec-untied-dropout", "lm-tied-accum2"],
)
def test_train_and_eval_steps_with_loss_chunk_equal_without(model_cls, overrides, accum):
    model, opt, state, batch = _setup(model_cls, **overrides)

    def train(loss_chunk):
        step = lambda s: training.train_step(  # noqa: E731
            s, batch, model=model, optimizer=opt, accum_steps=accum, loss_chunk=loss_chunk
        )
        new_state, metrics = jax.jit(step)(state)
        return new_state.opt_state, metrics  # the gradient, the metrics

    (g_off, m_off), (g_on, m_on) = train(0), train(7)  # 7 does not divide B·T = 48
    assert float(optax.tree.norm(g_off)) > 0
    _close(g_on, g_off, 1e-5)
    assert set(m_on) == set(m_off)
    _close(m_on, m_off, 1e-5)

    ev = training.lm_eval_step if model_cls is aj.TransformerLM else training.eval_step
    e_off = jax.jit(lambda p: ev(p, batch, model=model))(state.params)
    e_on = jax.jit(lambda p: ev(p, batch, model=model, loss_chunk=16))(state.params)
    assert set(e_on) == set(e_off)
    _close(e_on, e_off, 1e-5)


# ---- The chunked gradient never holds the [B·T, V] logits. ----------------------------


def _big_v_arrays(jaxpr, limit):
    """Shapes of the arrays in `jaxpr` (and every jaxpr inside it: scan bodies,
    checkpoints, ...) whose last axis is V and that hold >= `limit` elements."""
    found = []
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            if shape and shape[-1] == V and np.prod(shape) >= limit:
                found.append(shape)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _big_v_arrays(sub.jaxpr, limit)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _big_v_arrays(sub, limit)
    return found


def test_chunked_gradient_never_materialises_the_logits(monkeypatch):
    model, _, state, batch = _setup(aj.TransformerLM, tie_output_embedding=False)
    N = batch["targets"].size  # B·T = 48; the logits hold N·V elements

    def grad_jaxpr(loss_chunk):
        def loss(params):
            kwargs = dict(train=False, rng=None, label_smoothing=0.1, loss_chunk=loss_chunk)
            return training._sums(model, params, batch, **kwargs)[0]

        return jax.make_jaxpr(jax.grad(loss))(state.params).jaxpr

    assert _big_v_arrays(grad_jaxpr(0), N * V)  # the detector sees today's [B, T, V]
    assert not _big_v_arrays(grad_jaxpr(8), N * V)
    assert (8, V) in _big_v_arrays(grad_jaxpr(8), 1)  # one chunk's logits
    # Without the checkpoint the map's backward stacks every chunk's softmax: [6, 8, V].
    monkeypatch.setattr(jax, "checkpoint", lambda f: f)
    assert (6, 8, V) in _big_v_arrays(grad_jaxpr(8), N * V)
