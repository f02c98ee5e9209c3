"""Activations sharded, not only parameters (issue 17): the logical-axis rules of the
activation names act inside the jitted steps (per-device shapes of the intermediates, read
from the compiled step), a rules table without them is completed, the numbers are those of
one device with every scale option on, and `make_mesh` lays devices out with
``jax.make_mesh``."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax.nn import sharding
from attention_jax.train import step as training

B, T, D, F, N, V = 4, 6, 16, 32, 4, 32  # tiny module; every dimension distinct but V=F

SEEN = {}  # name -> per-device shape of an intermediate, recorded when the step compiles


def _record(name, x):
    shape = x.shape
    jax.debug.inspect_array_sharding(
        x, callback=lambda s: SEEN.__setitem__(name, s.shard_shape(shape))
    )


class TinyFF(nn.Module):
    """Embedding, one query projection, one feed-forward block and the logits, each output
    under the agreed activation names; the parameters carry no logical names (replicated),
    so only the activation rules can split the activations' feature axes."""

    config: aj.TransformerConfig  # the steps read pad_id

    @nn.compact
    def __call__(self, inputs, targets, *, train=False):
        del inputs, train
        residual = ("activation_batch", "activation_length", "activation_embed")
        x = nn.with_logical_constraint(nn.Embed(V, D)(targets), residual)
        q = nn.DenseGeneral((N, D // N))(x)
        q = nn.with_logical_constraint(
            q, ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        )
        _record("heads", q)
        h = nn.Dense(F)(x + q.reshape(x.shape))
        h = nn.with_logical_constraint(
            h, ("activation_batch", "activation_length", "activation_mlp")
        )
        _record("mlp", h)
        x = nn.with_logical_constraint(x + nn.Dense(D)(jax.nn.relu(h)), residual)
        _record("embed", x)
        logits = nn.Dense(V)(x)
        logits = nn.with_logical_constraint(
            logits, ("activation_batch", "activation_length", "activation_vocab")
        )
        _record("vocab", logits)
        return logits


@pytest.fixture
def no_compilation_cache():
    """The shapes are recorded while XLA partitions the step: a step loaded from the
    persistent compilation cache would not be partitioned again."""
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def _tiny_setup(mesh):
    model = TinyFF(aj.TransformerConfig.tiny(vocab_size=V))
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.integers(1, V, (B, T)).astype(np.int32),
        "targets": rng.integers(1, V, (B, T)).astype(np.int32),
    }
    opt = optax.sgd(0.5)
    state, shardings = training.create_train_state(model, opt, batch, jax.random.key(0), mesh)
    return model, opt, state, shardings, sharding.shard_batch(batch, mesh)


def _step_records(step, state, batch):
    SEEN.clear()
    new_state, metrics = step(jax.tree.map(jnp.copy, state), batch)
    return dict(SEEN), new_state, metrics


def test_activations_are_sharded_only_under_the_rules(no_compilation_cache):
    mesh = sharding.make_mesh(data=2, model=4)
    model, opt, state, shardings, batch = _tiny_setup(mesh)
    # The rules table without activation names (as every config before them): completed.
    sharded = training.jit_train_step(
        model, opt, shardings, mesh, rules=sharding.PARAMETER_RULES, label_smoothing=0.0
    )
    on, s_on, m_on = _step_records(sharded, state, batch)
    assert on == {
        "heads": (B // 2, T, N // 4, D // N),
        "mlp": (B // 2, T, F // 4),
        "embed": (B // 2, T, D),  # activation_embed: whole
        "vocab": (B // 2, T, V // 4),
    }
    # The same step traced without the rules (what jit_train_step was before): the
    # compiler keeps every feature axis whole on every device; only the rows are split.
    plain = jax.jit(
        functools.partial(training.train_step, model=model, optimizer=opt, label_smoothing=0.0),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
    )
    off, s_off, m_off = _step_records(plain, state, batch)
    assert off == {
        "heads": (B // 2, T, N, D // N),
        "mlp": (B // 2, T, F),
        "embed": (B // 2, T, D),
        "vocab": (B // 2, T, V),
    }
    # A table that names an activation axis keeps its choice (here: replicated).
    rules = (*sharding.PARAMETER_RULES, ("activation_mlp", None))
    named = training.jit_train_step(model, opt, shardings, mesh, rules=rules, label_smoothing=0.0)
    assert _step_records(named, state, batch)[0]["mlp"] == (B // 2, T, F)
    # Equal numbers either way.
    np.testing.assert_allclose(m_on["loss"], m_off["loss"], rtol=1e-6)
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, s_on.params, state.params))) > 0
    for a, b in zip(jax.tree.leaves(s_on.params), jax.tree.leaves(s_off.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_outside_the_steps_the_constraints_are_no_ops():
    """Decoding and a bare ``model.apply`` trace with no mesh or rules: nothing changes."""
    model, _, state, _, _ = _tiny_setup(sharding.make_mesh(data=1, devices=jax.devices()[:1]))
    y = np.ones((B, T), np.int32)
    text = jax.jit(lambda p: model.apply({"params": p}, y, y)).lower(state.params).as_text()
    assert "sharding_constraint" not in text
    with sharding.under_rules(sharding.make_mesh(data=2, model=4)):
        text = jax.jit(lambda p: model.apply({"params": p}, y, y)).lower(state.params).as_text()
    assert text.count("sdy.sharding_constraint") == 5  # the model's five


# ---- The real models: sharded == one device, every scale option on. -----------------


def _packed_batch(rng, rows=8, length=8):
    """Two examples per row (the second shorter, then padding), as the pipeline packs."""
    batch = {}
    for side in ("inputs", "targets"):
        tokens = rng.integers(3, 64, (rows, length)).astype(np.int32)
        first = rng.integers(2, length - 2, rows)
        col = np.arange(length)[None, :]
        segments = np.where(col < first[:, None], 1, 2).astype(np.int32)
        segments[:, -1] = 0  # one padding slot per row
        positions = np.where(segments == 1, col, col - first[:, None]).astype(np.int32)
        batch[side] = np.where(segments > 0, tokens, 0).astype(np.int32)
        batch[f"{side}_positions"] = np.where(segments > 0, positions, 0).astype(np.int32)
        batch[f"{side}_segmentation"] = segments
    return batch


EVERY_OPTION = dict(
    num_kv_heads=2,  # grouped-query: 4 query heads share 2 key/value heads
    remat="dots",
    scan_layers=True,
    dropout_rate=0.0,  # (sharded dropout == one device: test_training.py)
)


@pytest.mark.parametrize("kind", ["encdec", "lm"])
def test_sharded_step_equals_one_device_with_every_option(kind):
    cfg = aj.TransformerConfig.tiny(vocab_size=64, max_len=16, **EVERY_OPTION)
    model = aj.Transformer(cfg) if kind == "encdec" else aj.TransformerLM(cfg)
    batch = _packed_batch(np.random.default_rng(1))
    if kind == "lm":
        batch = {k: v for k, v in batch.items() if k.startswith("targets")}
    opt = optax.sgd(0.5)  # the parameter change is the gradient (Adam would amplify noise)

    many_mesh = sharding.make_mesh(data=4, model=2)
    state, shardings = training.create_train_state(model, opt, batch, jax.random.key(3), many_mesh)
    first = jax.device_get(state.params)
    one_mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    whole = jax.tree.map(lambda _: NamedSharding(one_mesh, P()), shardings)  # one init only

    def two_steps(mesh, shardings):
        step = training.jit_train_step(model, opt, shardings, mesh, loss_chunk=12)
        sharded_batch = sharding.shard_batch(batch, mesh)
        start = jax.device_put(jax.tree.map(jnp.copy, state), shardings)
        text = step.lower(start, sharded_batch).as_text()
        losses = []
        for _ in range(2):
            start, metrics = step(start, sharded_batch)
            losses.append(float(metrics["loss"]))
        return losses, jax.device_get(start.params), text

    one, p_one, _ = two_steps(one_mesh, whole)
    many, p_many, text = two_steps(many_mesh, shardings)
    np.testing.assert_allclose(many, one, rtol=1e-5)
    assert one[1] < one[0]
    # Parameters within 1e-5 relative, or 1e-5 of the largest change (the bias of the keys
    # gets none in exact arithmetic: its ~1e-10 is rounding noise on either side).
    deltas = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p_one, first)
    change = max(jax.tree.leaves(deltas))
    assert change > 0
    for a, b in zip(jax.tree.leaves(p_many), jax.tree.leaves(p_one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * change)
    # The model's activation constraints are in the sharded step, splitting over `model`.
    constraints = [ln for ln in text.splitlines() if "sdy.sharding_constraint" in ln]
    assert any('{"model"}' in ln for ln in constraints), "no activation split over model"


# ---- Rules and mesh. ------------------------------------------------------------------


def test_rules_tables_are_completed_and_checked():
    assert sharding.DEFAULT_RULES == sharding.PARAMETER_RULES + sharding.ACTIVATION_RULES
    assert sharding.complete_rules(sharding.DEFAULT_RULES) == sharding.DEFAULT_RULES
    assert sharding.complete_rules(sharding.PARAMETER_RULES) == sharding.DEFAULT_RULES
    own = (("embed", None), ("activation_heads", None))
    assert sharding.complete_rules(own) == own + tuple(
        r for r in sharding.ACTIVATION_RULES if r[0] != "activation_heads"
    )
    # As read back from config.json: lists.
    as_json = [["activation_batch", ["data", "fsdp"]], ["vocab", "model"]]
    assert sharding.check_rules(as_json) == (
        ("activation_batch", ("data", "fsdp")),
        ("vocab", "model"),
    )
    with pytest.raises(ValueError, match="unknown mesh axis 'x'"):
        sharding.complete_rules([("activation_mlp", "x")])
    with pytest.raises(ValueError, match="twice"):
        sharding.complete_rules([("activation_mlp", None), ("activation_mlp", "model")])
    with pytest.raises(ValueError, match="unknown mesh axis 'x'"):
        training.jit_train_step(None, None, None, None, rules=[("embed", "x")])


def test_make_mesh_lays_devices_out_with_jax_make_mesh():
    mesh = sharding.make_mesh(data=-1, model=2)
    want = jax.make_mesh((4, 1, 2), sharding.MESH_AXES, devices=jax.devices())
    assert mesh.axis_names == sharding.MESH_AXES
    assert mesh.devices.tolist() == want.devices.tolist()
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3  # not make_mesh's Explicit
    # `devices=` still chooses (and, on CPU, orders) the devices.
    mine = jax.devices()[::-1][:4]
    mesh = sharding.make_mesh(data=2, model=2, devices=mine)
    assert [d.id for d in mesh.devices.flat] == [d.id for d in mine]
    assert dict(sharding.make_mesh(devices=jax.devices()[:1]).shape) == {
        "data": 1, "fsdp": 1, "model": 1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="needs 4 devices, but 2 are available"):
        sharding.make_mesh(data=2, model=2, devices=jax.devices()[:2])
