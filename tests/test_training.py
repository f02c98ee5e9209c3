"""Training core: loss, schedule, train step, gradient accumulation, sharding on 8 fake CPUs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax.nn import sharding
from attention_jax.train import losses
from attention_jax.train import step as training

V = 64


def _batch(rng, B=8, S=7, T=6):
    inputs = rng.integers(3, V, size=(B, S)).astype(np.int32)
    targets = rng.integers(3, V, size=(B, T)).astype(np.int32)
    inputs[1, 4:] = 0  # some padding
    targets[2, 3:] = 0
    return {"inputs": inputs, "targets": targets}


# ---- Loss. ----------------------------------------------------------------------------


def _smoothed_ce_f64(logits, targets, eps, pad_id=0):
    logits = np.asarray(logits, np.float64)
    V = logits.shape[-1]
    log_p = logits - logits.max(-1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(-1, keepdims=True))
    q = np.full(logits.shape, eps / (V - 1))
    np.put_along_axis(q, targets[..., None], 1 - eps, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(q > 0, q * np.log(q), 0.0).sum(-1)
    per_token = -(q * log_p).sum(-1) - ent  # KL(q || p)
    w = targets != pad_id
    return (per_token * w).sum() / w.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_smoothed_cross_entropy_matches_numpy(eps, rng):
    logits = rng.standard_normal((3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(1, 11, size=(3, 5))
    targets[0, 3:] = 0
    got = losses.smoothed_cross_entropy(logits, targets, label_smoothing=eps)
    np.testing.assert_allclose(got, _smoothed_ce_f64(logits, targets, eps), rtol=1e-5)
    acc = losses.token_accuracy(logits, targets)
    w = targets != 0
    np.testing.assert_allclose(acc, ((logits.argmax(-1) == targets) & w).sum() / w.sum())


def test_smoothed_cross_entropy_is_zero_at_the_smoothed_target():
    eps, V = 0.1, 5
    q = np.full((1, V), eps / (V - 1))
    q[0, 2] = 1 - eps
    loss = losses.smoothed_cross_entropy(jnp.log(q)[None], jnp.array([[2]]), label_smoothing=eps)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="disagree"):
        losses.smoothed_cross_entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


# ---- Schedule. ------------------------------------------------------------------------


def test_schedule_matches_the_papers_formula_at_literal_steps():
    lr = training.paper_learning_rate(d_model=512, warmup_steps=4000)
    for step, expected in [
        (1, 512**-0.5 * 4000**-1.5),  # warmup: step · warmup^-1.5
        (4000, 512**-0.5 * 4000**-0.5),  # the peak, both branches equal
        (100000, 512**-0.5 * 100000**-0.5),  # decay: step^-0.5
    ]:
        np.testing.assert_allclose(lr(step - 1), expected, rtol=1e-6)  # optax counts from 0
    np.testing.assert_allclose(lr(4000 - 1), 0.000698771, rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_steps"):
        training.paper_learning_rate(512, 0)


# ---- Train step. ----------------------------------------------------------------------


def _setup(cfg, mesh, optimizer=None, seed=0):
    model = aj.Transformer(cfg)
    optimizer = optimizer or training.make_optimizer(cfg.d_model, warmup_steps=20, lr_factor=0.2)
    batch = _batch(np.random.default_rng(seed))
    state, shardings = training.create_train_state(
        model, optimizer, batch, jax.random.key(seed), mesh
    )
    return model, optimizer, state, shardings, batch


def _single_mesh():
    return sharding.make_mesh(data=1, devices=jax.devices()[:1])


def test_tiny_model_overfits_one_batch_and_loss_decreases():
    cfg = aj.TransformerConfig.tiny(vocab_size=V, dropout_rate=0.0)
    mesh = _single_mesh()
    model, opt, state, shard, batch = _setup(cfg, mesh)
    step = training.jit_train_step(model, opt, shard, mesh, label_smoothing=0.0)
    batch = sharding.shard_batch(batch, mesh)
    first = None
    for _ in range(60):
        state, metrics = step(state, batch)
        first = float(metrics["loss"]) if first is None else first
    assert float(metrics["loss"]) < 0.05 * first
    assert float(metrics["accuracy"]) == 1.0
    assert int(state.step) == 60


def test_gradient_accumulation_equals_one_big_step():
    cfg = aj.TransformerConfig.tiny(vocab_size=V, dropout_rate=0.0)
    mesh = _single_mesh()
    # Plain SGD with lr 1, so the parameter change *is* the gradient (Adam's first step,
    # ~lr·sign(g), would amplify float noise in near-zero gradients).
    model, opt, state, shard, batch = _setup(cfg, mesh, optimizer=optax.sgd(1.0))
    batch = sharding.shard_batch(batch, mesh)
    results = {}
    for k in (1, 4):
        fresh = jax.tree.map(jnp.copy, state)
        step = training.jit_train_step(model, opt, shard, mesh, accum_steps=k)
        new, metrics = step(fresh, batch)
        results[k] = (new, metrics)
    (s1, m1), (s4, m4) = results[1], results[4]
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    assert (
        float(m4["tokens"])
        == float(m1["tokens"])
        == float((np.asarray(batch["targets"]) != 0).sum())
    )
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_is_reproducible_and_follows_the_key():
    cfg = aj.TransformerConfig.tiny(vocab_size=V, dropout_rate=0.3)
    mesh = _single_mesh()
    model, opt, state, shard, batch = _setup(cfg, mesh)
    step = training.jit_train_step(model, opt, shard, mesh)
    b = sharding.shard_batch(batch, mesh)
    other_key = state.replace(rng=jax.random.key(42))
    runs = [step(jax.tree.map(jnp.copy, state), b)[1]["loss"] for _ in range(2)]
    assert float(runs[0]) == float(runs[1])
    assert float(step(other_key, b)[1]["loss"]) != float(runs[0])


def test_eval_step_sums_add_up_to_the_mean_loss():
    cfg = aj.TransformerConfig.tiny(vocab_size=V)
    mesh = _single_mesh()
    model, _, state, _, batch = _setup(cfg, mesh)
    ev = jax.jit(functools.partial(training.eval_step, model=model))
    halves = [jax.tree.map(lambda x, i=i: x[4 * i : 4 * (i + 1)], batch) for i in range(2)]
    parts = [ev(state.params, h) for h in halves]
    whole = ev(state.params, batch)
    np.testing.assert_allclose(sum(p["loss_sum"] for p in parts), whole["loss_sum"], rtol=1e-5)
    assert sum(float(p["tokens"]) for p in parts) == float(whole["tokens"])


def test_lm_train_step_runs_and_learns():
    cfg = aj.TransformerConfig.tiny(vocab_size=V, dropout_rate=0.0)
    model = aj.TransformerLM(cfg)
    opt = training.make_optimizer(cfg.d_model, warmup_steps=20, lr_factor=0.2)
    mesh = _single_mesh()
    batch = {"targets": _batch(np.random.default_rng(0))["targets"]}
    state, shard = training.create_train_state(model, opt, batch, jax.random.key(0), mesh)
    step = training.jit_train_step(model, opt, shard, mesh, label_smoothing=0.0)
    b = sharding.shard_batch(batch, mesh)
    state, m = step(state, b)
    first = float(m["loss"])
    for _ in range(60):
        state, m = step(state, b)
    assert float(m["loss"]) < 0.2 * first


# ---- Sharding on 8 fake CPU devices. --------------------------------------------------


def test_conftest_fakes_eight_devices():
    assert jax.device_count() == 8


def _losses_after(mesh, steps=5):
    cfg = aj.TransformerConfig.tiny(vocab_size=V, dropout_rate=0.1)
    model, opt, state, shard, batch = _setup(cfg, mesh)
    step = training.jit_train_step(model, opt, shard, mesh)
    b = sharding.shard_batch(batch, mesh)
    out = []
    for _ in range(steps):
        state, metrics = step(state, b)
        out.append(float(metrics["loss"]))
    return out, state


@pytest.fixture(scope="module")
def single_device_losses():
    return _losses_after(_single_mesh())[0]


@pytest.mark.parametrize("data, model_axis", [(8, 1), (4, 2), (2, 4)])
def test_sharded_losses_equal_single_device(data, model_axis, single_device_losses):
    single = single_device_losses
    mesh = sharding.make_mesh(data=data, model=model_axis)
    sharded, state = _losses_after(mesh)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    # Parameters really are sharded as the rules say.
    q_kernel = state.params["encoder"]["layer_0"]["self_attention"]["query"]["kernel"]  # [D,N,H]
    assert q_kernel.sharding.spec == P("fsdp", "model", None)
    assert q_kernel.addressable_shards[0].data.shape == (32, 4 // model_axis, 8)
    wi = state.params["encoder"]["layer_0"]["feed_forward"]["wi"]["kernel"]  # [D, F]
    assert wi.addressable_shards[0].data.shape == (32, 64 // model_axis)
    emb = state.params["embedding"]["embedding"]  # [V, D]
    assert emb.addressable_shards[0].data.shape == (V // model_axis, 32)
    mu = state.opt_state[0].mu["embedding"]["embedding"]  # Adam's moment, sharded alike
    assert mu.sharding.spec == emb.sharding.spec


def test_make_mesh_errors_and_rest_axis():
    assert dict(sharding.make_mesh(data=-1, model=2).shape) == {"data": 4, "fsdp": 1, "model": 2}
    with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
        sharding.make_mesh(data=8, model=2)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        sharding.make_mesh(data=-1, model=-1)
    with pytest.raises(ValueError, match="do not divide"):
        sharding.make_mesh(data=-1, model=3)


def test_bad_rules_and_batches():
    with pytest.raises(ValueError, match="unknown mesh axis 'x'"):
        sharding.check_rules([("embed", "x")])
    with pytest.raises(ValueError, match="twice"):
        sharding.check_rules([("embed", None), ("embed", "model")])
    mesh = sharding.make_mesh(data=8)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 8"):
        sharding.shard_batch({"inputs": np.zeros((6, 4), np.int32)}, mesh)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_updates_are_withheld_and_counted(policy):
    """An Inf in one source-embedding row makes exactly the batches that contain that token
    non-finite: their update is withheld and counted, on the device; 'stop' withholds every
    later update too (the host stops the run), 'skip' goes on with the finite ones."""
    cfg = aj.TransformerConfig.tiny(vocab_size=V, dropout_rate=0.0, share_embeddings=False)
    mesh = _single_mesh()
    model, opt, state, shard, batch = _setup(cfg, mesh)
    poison = 5
    table = state.params["embedding"]["embedding"]  # [V, D], source tokens only
    params = jax.tree.map(lambda x: x, state.params)
    params["embedding"]["embedding"] = table.at[poison].set(jnp.inf)
    state = state.replace(params=params)
    clean = dict(batch, inputs=np.where(batch["inputs"] == poison, 6, batch["inputs"]))
    poisoned = dict(clean, inputs=clean["inputs"].copy())
    poisoned["inputs"][0, 0] = poison
    step = training.jit_train_step(model, opt, shard, mesh, nonfinite=policy)
    host = lambda s: jax.tree.leaves(jax.device_get(s.params))  # noqa: E731  (state is donated)

    s1, m1 = step(state, sharding.shard_batch(clean, mesh))
    assert np.isfinite(float(m1["loss"])) and int(m1["nonfinite_steps"]) == 0
    assert int(m1["first_nonfinite_step"]) == -1
    before = host(s1)
    s2, m2 = step(s1, sharding.shard_batch(poisoned, mesh))
    assert not np.isfinite(float(m2["loss"]))
    assert int(m2["nonfinite_steps"]) == 1 and int(m2["first_nonfinite_step"]) == 1
    after_bad = host(s2)
    for a, b in zip(after_bad, before, strict=True):
        np.testing.assert_array_equal(a, b)  # the bad update was not applied
    s3, m3 = step(s2, sharding.shard_batch(clean, mesh))
    assert int(m3["nonfinite_steps"]) == 1 and int(m3["first_nonfinite_step"]) == 1
    assert int(s3.step) == 3
    changed = [not np.array_equal(a, b) for a, b in zip(host(s3), before, strict=True)]
    if policy == "stop":  # frozen at the last good parameters until the host stops the run
        assert not any(changed)
    else:  # training goes on without the bad update
        assert any(changed) and np.isfinite(float(m3["loss"]))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        training.train_step(s3, clean, model=model, optimizer=opt, nonfinite="ignore")
