"""config.scan_layers: each stack's L layers under flax.linen.scan (one compiled layer body).

The reference is the plain model (``layer_0`` ... ``layer_{L-1}``) on the same parameters,
converted with `stack_layer_params`: the same logits and gradients (1e-5, f32) on the
encoder-decoder (post-LN, sinusoidal, untied output) and the LM (pre-LN, RMSNorm, SwiGLU,
rotary, grouped-query, a packed row), under each remat policy; the jaxpr holds one scan of
length L whose matmuls do not grow with L; KV-cached greedy search, beam search and sampling
give the same tokens; the sown attention weights are the per-layer ones, stacked."""

import functools

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attention_jax.decode import decoding, translator
from attention_jax.nn import sharding
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.model import (
    Transformer,
    TransformerLM,
    stack_layer_params,
    unstack_layer_params,
)
from attention_jax.train import loop
from attention_jax.train import step as training
from attention_jax.train.losses import smoothed_cross_entropy_sums
from attention_jax.workdir.checkpoint import IncompatibleCheckpointError
from attention_jax.workdir.experiment import (
    model_config_dict,
    model_signature,
    signature_differences,
    signature_hint,
)

V = 32
FAST = {"xla_backend_optimization_level": 0}  # compile time is all these settings change
DROPOUT_KEY = jax.random.key(1, impl="unsafe_rbg")
TINY = dict(vocab_size=V, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_len=16,
            dropout_rate=0.0)  # fmt: skip
KINDS = {
    # post-LN, sinusoidal positions, a separate output layer, 2 encoder + 3 decoder layers
    "encoder_decoder": dict(tie_output_embedding=False, num_decoder_layers=3),
    # the decoder-only knobs: pre-LN, RMSNorm, SwiGLU, rotary, grouped-query, tied output
    "lm": dict(pre_ln=True, norm="rmsnorm", feed_forward="swiglu", positional="rotary",
               num_heads=4, num_kv_heads=2, num_layers=3),
}  # fmt: skip


def _cfg(kind, **overrides):
    return TransformerConfig(**{**TINY, **KINDS[kind], **overrides})


def _model(kind, **overrides):
    cls = Transformer if kind == "encoder_decoder" else TransformerLM
    return cls(_cfg(kind, **overrides))


def _batch(kind):
    """Each: one packed row (two examples), one padded row."""
    rng = np.random.default_rng(0)
    if kind == "encoder_decoder":
        inputs = rng.integers(1, V, (2, 7))
        inputs[1, 5:] = 0
        targets = rng.integers(1, V, (2, 6))
        targets[1, 4:] = 0
        return {
            "inputs": jnp.asarray(inputs, jnp.int32),
            "targets": jnp.asarray(targets, jnp.int32),
            "inputs_positions": jnp.asarray([[0, 1, 2, 0, 1, 2, 3], list(range(7))], jnp.int32),
            "inputs_segmentation": jnp.asarray([[1, 1, 1, 2, 2, 2, 2], [1] * 5 + [0, 0]]),
            "targets_positions": jnp.asarray([[0, 1, 0, 1, 2, 3], list(range(6))], jnp.int32),
            "targets_segmentation": jnp.asarray([[1, 1, 2, 2, 2, 2], [1] * 4 + [0, 0]]),
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


def _abstract(model, batch):
    """The boxed parameter tree's names, shapes and dtypes (traced, not compiled)."""
    lm = isinstance(model, TransformerLM)
    args = (batch["targets"],) if lm else (batch["inputs"], batch["targets"])
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]


def _random_params(abstract, seed=2):
    rng = np.random.default_rng(seed)  # any parameters will do (no initialiser to compile)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype), nn.unbox(abstract)
    )


def _loss(model, batch, params, train=False):
    logits = training._logits(model, params, batch, train=train, rng=DROPOUT_KEY)
    total, tokens, _ = smoothed_cross_entropy_sums(logits, batch["targets"])
    return total / tokens, logits


# ---- Parameters and conversion. ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["encoder_decoder", "lm"])
def test_the_stacked_layout_is_the_plain_one_converted(kind):
    """init under scan makes exactly the tree stack_layer_params makes of the plain one:
    names, shapes, dtypes and logical axes ("layers" in front); unstack inverts it."""
    batch = _batch(kind)
    plain, scanned = (
        _abstract(_model(kind), batch),
        _abstract(_model(kind, scan_layers=True), batch),
    )
    assert "layer_0" in plain["decoder"] and "layers" in scanned["decoder"]
    L = _cfg(kind).decoder_layers
    query = scanned["decoder"]["layers"]["self_attention"]["query"]["kernel"]
    assert query.names == ("layers", "embed", "heads", "kv")
    assert query.value.shape[0] == L
    assert jax.eval_shape(stack_layer_params, plain) == scanned
    assert jax.eval_shape(unstack_layer_params, scanned) == plain
    values = _random_params(plain)  # plain (unboxed) arrays, both ways, exactly
    back = unstack_layer_params(stack_layer_params(values))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, values))


def test_conversion_refuses_a_tree_it_cannot_convert():
    with pytest.raises(ValueError, match=r"expected layers layer_0 \.\.\. layer_1"):
        stack_layer_params(
            {"decoder": {"layer_0": {"w": jnp.ones(2)}, "layer_2": {"w": jnp.ones(2)}}}
        )
    with pytest.raises(ValueError, match="same layer axis"):
        unstack_layer_params({"decoder": {"layers": {"a": jnp.ones((2, 3)), "b": jnp.ones((3,))}}})


# ---- The same numbers. -----------------------------------------------------------------


@pytest.mark.parametrize("kind, remats", [("encoder_decoder", ("full",)), ("lm", ("none", "dots"))])
def test_scan_gives_the_plain_models_logits_and_gradients_under_remat(kind, remats):
    """The plain model against scan without remat and with a policy inside the scanned
    body (each policy against no remat: tests/test_remat.py); one compilation per kind."""
    batch = _batch(kind)
    params = _random_params(_abstract(_model(kind), batch))
    stacked = stack_layer_params(params)

    def run(p, sp):
        out = {"plain": jax.value_and_grad(_loss, 2, has_aux=True)(_model(kind), batch, p)}
        for remat in remats:
            model = _model(kind, scan_layers=True, remat=remat)
            out[remat] = jax.value_and_grad(_loss, 2, has_aux=True)(model, batch, sp)
        return out

    results = jax.jit(run, compiler_options=FAST)(params, stacked)  # one compilation
    (loss0, logits0), grads0 = results["plain"]
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads0))
    assert scale > 0
    for remat in remats:
        (loss, logits), grads = results[remat]
        np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-5, err_msg=remat)
        np.testing.assert_allclose(loss, loss0, rtol=1e-5, err_msg=remat)
        grads = unstack_layer_params(grads)
        for (path, g), g0 in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads0), strict=True
        ):  # relative to the largest gradient: a leaf that is ~0 has no relative scale
            np.testing.assert_allclose(
                g, g0, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{remat} {jax.tree_util.keystr(path)}"
            )


def test_logit_positions_return_hidden_and_sown_weights_match_the_plain_lm():
    """The LM's other outputs: logits at chosen positions, the hidden states, and the
    intermediates (attention weights per layer: stacked [L, B, N, T, T] under scan)."""
    batch = _batch("lm")
    plain, scanned = _model("lm"), _model("lm", scan_layers=True)
    params = _random_params(_abstract(plain, batch))
    at = jnp.asarray([[5, 2], [0, 7]], jnp.int32)
    kwargs = dict(positions=batch["targets_positions"], segmentation=batch["targets_segmentation"])

    def run(p, sp):
        out = {}
        for name, model, q in (("plain", plain, p), ("scan", scanned, sp)):
            logits, sown = model.apply({"params": q}, batch["targets"], **kwargs,
                                       mutable=["intermediates"])  # fmt: skip
            out[name] = dict(
                logits=logits,
                sown=sown["intermediates"],
                at=model.apply({"params": q}, batch["targets"], logit_positions=at, **kwargs),
                hidden=model.apply({"params": q}, batch["targets"], return_hidden=True, **kwargs),
            )
        return out

    out = jax.jit(run, compiler_options=FAST)(params, stack_layer_params(params))
    for key in ("logits", "at", "hidden"):
        np.testing.assert_allclose(out["scan"][key], out["plain"][key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        out["plain"]["at"],
        jnp.take_along_axis(out["plain"]["logits"], at[:, :, None], 1),
        atol=1e-6,
    )
    weights = out["scan"]["sown"]["decoder"]["layers"]["self_attention"]["attention_weights"]
    assert weights[0].shape == (3, 2, 4, 8, 8)  # [L, B, N, T, T]
    per_layer = unstack_layer_params(out["scan"]["sown"])  # the plain model's layout
    assert jax.tree.structure(per_layer) == jax.tree.structure(out["plain"]["sown"])
    for a, b in zip(jax.tree.leaves(per_layer), jax.tree.leaves(out["plain"]["sown"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _kept(next_fun, args, kwargs, context):
    """Interceptor: sows which units each Dropout keeps (its output is 0 where it drops)."""
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
        context.module.sow("intermediates", "kept", out != 0)
    return out


def test_dropout_draws_other_masks_in_each_layer():
    """Under scan each layer gets its own dropout rng: the masks of layers 0 and 1 (the
    same module, the same shapes) differ, and each drops about the rate."""
    model = _model("encoder_decoder", scan_layers=True, dropout_rate=0.5)
    batch = _batch("encoder_decoder")
    params = stack_layer_params(_random_params(_abstract(_model("encoder_decoder"), batch)))

    @functools.partial(jax.jit, compiler_options=FAST)
    def run(p):
        with nn.intercept_methods(_kept):
            return model.apply(
                {"params": p}, batch["inputs"], batch["targets"], train=True,
                rngs={"dropout": DROPOUT_KEY}, mutable=["intermediates"],
            )  # fmt: skip

    logits, sown = run(params)
    assert np.isfinite(np.asarray(logits)).all()
    kept = sown["intermediates"]["encoder"]["layers"]["ffn_block"]["Dropout_0"]["kept"][0]
    assert kept.shape == (2, 2, 7, 16)  # [L, B, S, D]
    assert 0.3 < float(kept.mean()) < 0.7
    assert not np.array_equal(kept[0], kept[1])


# ---- One compiled layer body. ----------------------------------------------------------


def _equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


def _loss_grad_jaxpr(L, scan):
    model = _model("lm", num_layers=L, scan_layers=scan)
    batch = _batch("lm")
    params = jax.eval_shape(lambda: _random_params(_abstract(model, batch)))
    grad = jax.grad(lambda p: _loss(model, batch, p, train=True)[0])
    return jax.make_jaxpr(grad)(params).jaxpr


def test_the_loss_gradient_has_one_scan_whose_matmuls_do_not_grow_with_depth():
    dots, scans = {}, {}
    for scan in (False, True):
        for L in (2, 4):
            eqns = list(_equations(_loss_grad_jaxpr(L, scan)))
            dots[scan, L] = sum(e.primitive.name == "dot_general" for e in eqns)
            scans[scan, L] = [e.params["length"] for e in eqns if e.primitive.name == "scan"]
    assert scans[True, 2] == [2, 2] and scans[True, 4] == [4, 4]  # forward, backward
    assert scans[False, 2] == scans[False, 4] == []
    assert dots[True, 4] == dots[True, 2], dots
    assert dots[False, 4] > dots[False, 2], dots


def _residual_bytes(remat):
    """Bytes the forward pass keeps for the backward pass (the residuals of jax.vjp)."""
    model, batch = _model("lm", scan_layers=True, remat=remat), _batch("lm")
    params = jax.eval_shape(lambda: _random_params(_abstract(model, batch)))
    fn = functools.partial(_loss, model, batch, train=False)
    residuals = jax.eval_shape(lambda p: jax.vjp(fn, p)[1], params)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))


def test_the_remat_policies_act_inside_the_scan():
    saved = {remat: _residual_bytes(remat) for remat in ("none", "full", "dots")}
    assert saved["full"] < saved["dots"] < saved["none"], saved


# ---- Decoding through the stacked KV cache. --------------------------------------------


def test_the_cache_leads_with_the_batch_and_stacks_the_layers_on_axis_1():
    model = _model("lm", scan_layers=True)
    cache = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((5, 12), jnp.int32), decode=True)
    )["cache"]
    attention = cache["decoder"]["layers"]["self_attention"]
    assert attention["cached_key"].shape == (5, 3, 12, 2, 4)  # [B, L, S, K, H]
    assert attention["cache_index"].shape == (5, 3)


def test_greedy_beam_search_and_sampling_give_the_plain_models_tokens():
    ed, lm = _batch("encoder_decoder"), _batch("lm")
    small = dict(num_layers=2, num_decoder_layers=2)  # compile time: 2 layers per stack
    plain_ed, scan_ed = (_model("encoder_decoder", **small, scan_layers=s) for s in (False, True))
    plain_lm, scan_lm = (_model("lm", num_layers=2, scan_layers=s) for s in (False, True))
    ed_params = _random_params(_abstract(plain_ed, ed), seed=3)
    lm_params = _random_params(_abstract(plain_lm, lm), seed=4)
    prompt = jnp.asarray([[5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)

    def run(ep, lp):
        out = {}
        for name, edm, lmm, e, p in (
            ("plain", plain_ed, plain_lm, ep, lp),
            ("scan", scan_ed, scan_lm, stack_layer_params(ep), stack_layer_params(lp)),
        ):
            out[name] = (
                decoding.translate(edm, e, ed["inputs"], max_length=8, beam_size=1),
                decoding.translate(edm, e, ed["inputs"], max_length=8, beam_size=2),
                decoding.generate(lmm, p, prompt, DROPOUT_KEY, max_length=10, top_k=5),
            )
        return out

    out = jax.jit(run, compiler_options=FAST)(ed_params, lm_params)
    for plain, scanned, what in zip(
        out["plain"], out["scan"], ("greedy", "beam", "sample"), strict=True
    ):
        np.testing.assert_array_equal(scanned, plain, err_msg=what)
    assert len(np.unique(np.asarray(out["plain"][2])[:, 4:])) > 1  # it generated something


# ---- Activation constraints. -----------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True])
def test_the_activation_constraints_are_no_ops_without_a_mesh_and_rules(scan):
    """Without a mesh and rules no sharding constraint is traced: the program is the
    unconstrained one, so the outputs are the same bits. Under a mesh and the default rules
    the constraints are there: the residual stream [B, T, D] and the logits [B, T, V]."""
    model, batch = _model("encoder_decoder", scan_layers=scan), _batch("encoder_decoder")
    params = jax.eval_shape(lambda: _random_params(_abstract(model, batch)))
    if scan:
        params = jax.eval_shape(stack_layer_params, params)
    apply = lambda p: model.apply({"params": p}, batch["inputs"], batch["targets"])  # noqa: E731

    def constrained_shapes(jaxpr):
        return {
            e.invars[0].aval.shape for e in _equations(jaxpr)
            if e.primitive.name == "sharding_constraint"
        }  # fmt: skip

    assert constrained_shapes(jax.make_jaxpr(apply)(params).jaxpr) == set()
    mesh = sharding.make_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
    with sharding.under_rules(mesh):
        shapes = constrained_shapes(jax.make_jaxpr(apply)(params).jaxpr)
    assert {(2, 7, 16), (2, 6, 16), (2, 6, V)} <= shapes, shapes


# ---- Bad input and checkpoints. --------------------------------------------------------


def test_a_non_bool_scan_layers_is_refused_in_one_line():
    with pytest.raises(ValueError) as e:
        TransformerConfig.tiny(scan_layers="yes")
    assert str(e.value) == "TransformerConfig.scan_layers must be True or False, got 'yes'"
    assert model_config_dict(vocab_size=8).scan_layers is False  # settable from the flags


def test_a_checkpoint_of_the_other_layout_is_refused_naming_the_conversion():
    plain = TransformerConfig.tiny()
    scanned = plain.replace(scan_layers=True)
    ours, theirs = model_signature(scanned), model_signature(plain)
    assert signature_differences(ours, theirs) == ["scan_layers"]
    old = {k: v for k, v in theirs.items() if k != "scan_layers"}  # written before the field
    assert signature_differences(model_signature(plain), old) == []
    assert signature_differences(ours, old) == ["scan_layers"]
    hint = signature_hint(["scan_layers"])
    assert "stack_layer_params" in hint and "unstack_layer_params" in hint
    assert signature_hint(["d_model"]) == ""
    saved = {"model": theirs, "model_kind": "encoder_decoder"}
    # Resuming training (train/loop.py) and loading for decoding (decode/translator.py):
    with pytest.raises(IncompatibleCheckpointError, match="scan_layers: checkpoint False, ") as e:
        loop._check_model("w", 3, saved, scanned, "encoder_decoder")
    assert hint in str(e.value)
    model = model_config_dict(vocab_size=64, scan_layers=True)
    check = translator._check_checkpoint("w", ml_collections.ConfigDict({"model": model}),
                                         scanned, tokenizer=None)  # fmt: skip
    with pytest.raises(IncompatibleCheckpointError, match=r"scan_layers: config\.json True, ") as e:
        check(3, saved)
    assert hint in str(e.value)
