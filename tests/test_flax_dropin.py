"""attention_jax as a drop-in ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention``.

Reference: the same Flax module with its default ``attention_fn`` (flax's own
``dot_product_attention``), initialised from the same rng, hence with the same params.
Tolerance: relative error (max |a - e| / max |e|) <= 1e-5 in float32.

Flax masks with ``finfo.min`` rather than excluding keys, so a query whose keys are all masked
gets the mean of the values there and zero output here; such rows are left out of the
comparisons (the library's convention is tested in test_attention.py).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import rel_err

import attention_jax as aj

IMPLS = ["xla", "blockwise"]
F32_TOL = 1e-5
B, T, S, D, DKV, NUM_HEADS, QKV = 2, 6, 9, 16, 12, 4, 32


def _modules(impl, **kwargs):
    ours = nn.MultiHeadDotProductAttention(
        num_heads=NUM_HEADS,
        qkv_features=QKV,
        attention_fn=functools.partial(aj.dot_product_attention, implementation=impl),
        **kwargs,
    )
    theirs = nn.MultiHeadDotProductAttention(num_heads=NUM_HEADS, qkv_features=QKV, **kwargs)
    return ours, theirs


def _inputs(rng):
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((B, S, DKV)), jnp.float32)
    return x, y


def _init_same(ours, theirs, *args, **kwargs):
    p_ours = ours.init(jax.random.key(0), *args, **kwargs)
    p_theirs = theirs.init(jax.random.key(0), *args, **kwargs)
    # The attention_fn has no parameters: the same rng gives the same params.
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_theirs)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    return p_theirs


@pytest.mark.parametrize("impl", IMPLS)
def test_self_attention_equals_flax_default(impl, rng):
    ours, theirs = _modules(impl)
    x, _ = _inputs(rng)
    params = _init_same(ours, theirs, x)
    out = ours.apply(params, x)
    ref = theirs.apply(params, x)
    assert out.shape == ref.shape == (B, T, D) and out.dtype == ref.dtype
    assert rel_err(out, ref) <= F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_equals_flax_default(impl, rng):
    ours, theirs = _modules(impl)
    x, y = _inputs(rng)  # S != T and Dkv != D
    params = _init_same(ours, theirs, x, y)
    out = ours.apply(params, x, y)
    ref = theirs.apply(params, x, y)
    assert out.shape == ref.shape == (B, T, D)
    assert rel_err(out, ref) <= F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_causal_mask_equals_flax_default(impl, rng):
    ours, theirs = _modules(impl)
    x, _ = _inputs(rng)
    params = _init_same(ours, theirs, x)
    mask = jnp.broadcast_to(aj.causal_mask(T), (B, 1, T, T))
    out = ours.apply(params, x, mask=mask)
    ref = theirs.apply(params, x, mask=mask)
    assert rel_err(out, ref) <= F32_TOL
    # The mask matters: without it the outputs differ.
    assert rel_err(theirs.apply(params, x), ref) > 1e-3
    # flax's own make_causal_mask is the same mask.
    ref_flax_mask = theirs.apply(params, x, mask=nn.make_causal_mask(jnp.ones((B, T))))
    assert rel_err(out, ref_flax_mask) <= F32_TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_padding_mask_equals_flax_default_on_real_tokens(impl, rng):
    ours, theirs = _modules(impl)
    x, _ = _inputs(rng)
    tokens = np.array([[3, 1, 4, 1, 5, 0], [9, 2, 0, 6, 0, 0]], np.int32)  # [B, T]
    params = _init_same(ours, theirs, x)
    mask = aj.padding_mask(tokens)  # [B, 1, T, T]
    out = ours.apply(params, x, mask=mask)
    ref = theirs.apply(params, x, mask=mask)
    real = tokens != 0
    assert rel_err(np.asarray(out)[real], np.asarray(ref)[real]) <= F32_TOL
    # Same with flax's own mask builder.
    flax_mask = nn.make_attention_mask(tokens != 0, tokens != 0)
    np.testing.assert_array_equal(flax_mask, mask)


@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_key_padding_mask_equals_flax_default(impl, rng):
    ours, theirs = _modules(impl)
    x, y = _inputs(rng)
    params = _init_same(ours, theirs, x, y)
    keys = np.arange(S) < np.array([[S], [4]])  # [B, S]; example 1 has 5 padded keys
    mask = jnp.asarray(keys[:, None, None, :])  # [B, 1, 1, S]
    out = ours.apply(params, x, y, mask=mask)
    ref = theirs.apply(params, x, y, mask=mask)
    assert rel_err(out, ref) <= F32_TOL


# Only 'xla' forms the weights; None (auto) must pick it when they are sown.
@pytest.mark.parametrize("impl", ["xla", None])
def test_sown_attention_weights_equal_flax_default(impl, rng):
    ours, theirs = _modules(impl)
    x, y = _inputs(rng)
    params = _init_same(ours, theirs, x, y)
    mask = jnp.asarray((np.arange(S) < 7)[None, None, None, :])  # [1, 1, 1, S]
    out, state = ours.apply(params, x, y, mask=mask, sow_weights=True, mutable=["intermediates"])
    ref, ref_state = theirs.apply(
        params, x, y, mask=mask, sow_weights=True, mutable=["intermediates"]
    )
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    (w,) = state["intermediates"]["attention_weights"]
    (w_ref,) = ref_state["intermediates"]["attention_weights"]
    assert w.shape == w_ref.shape == (B, NUM_HEADS, T, S)
    assert rel_err(w, w_ref) <= F32_TOL
    assert rel_err(out, ref) <= F32_TOL
    np.testing.assert_array_equal(np.asarray(w)[..., 7:], 0.0)
    # Without sow_weights nothing is sown.
    _, empty = ours.apply(params, x, y, mask=mask, mutable=["intermediates"])
    assert not jax.tree.leaves(empty)


# ---- The pure multi-head block on Flax's params. --------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_head_attention_with_flax_params_equals_flax_module(impl, rng):
    module = nn.MultiHeadDotProductAttention(num_heads=NUM_HEADS, qkv_features=QKV)
    x, y = _inputs(rng)
    # Self-attention.
    params = module.init(jax.random.key(1), x)
    out = aj.multi_head_attention(params["params"], x, num_heads=NUM_HEADS, implementation=impl)
    assert rel_err(out, module.apply(params, x)) <= F32_TOL
    # Self-attention with a causal mask.
    mask = jnp.broadcast_to(aj.causal_mask(T), (B, 1, T, T))
    out = aj.multi_head_attention(
        params["params"], x, num_heads=NUM_HEADS, mask=mask, implementation=impl
    )
    assert rel_err(out, module.apply(params, x, mask=mask)) <= F32_TOL
    # Cross-attention (kv_features != in_features).
    params = module.init(jax.random.key(2), x, y)
    out = aj.multi_head_attention(params["params"], x, y, num_heads=NUM_HEADS, implementation=impl)
    assert rel_err(out, module.apply(params, x, y)) <= F32_TOL


def test_multi_head_attention_with_flax_params_without_bias(rng):
    module = nn.MultiHeadDotProductAttention(
        num_heads=NUM_HEADS, qkv_features=QKV, out_features=10, use_bias=False
    )
    x, y = _inputs(rng)
    params = module.init(jax.random.key(3), x, y)
    out = aj.multi_head_attention(params["params"], x, y, num_heads=NUM_HEADS)
    assert out.shape == (B, T, 10)
    assert rel_err(out, module.apply(params, x, y)) <= F32_TOL


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize(
    ("flax_kwargs", "init_kwargs", "cross"),
    [
        ({}, {}, False),
        ({}, {"kv_features": DKV}, True),
        ({"out_features": 10}, {"out_features": 10}, False),
        ({"use_bias": False}, {"use_bias": False, "kv_features": DKV}, True),
    ],
    ids=["self", "cross", "out_features", "no_bias"],
)
def test_init_has_flax_param_structure_and_shapes(flax_kwargs, init_kwargs, cross, rng):
    module = nn.MultiHeadDotProductAttention(num_heads=NUM_HEADS, qkv_features=QKV, **flax_kwargs)
    x, y = _inputs(rng)
    flax_params = module.init(jax.random.key(0), *((x, y) if cross else (x,)))["params"]
    ours = aj.init_multi_head_attention(
        jax.random.key(0), D, NUM_HEADS, qkv_features=QKV, **init_kwargs
    )
    assert jax.tree.structure(ours) == jax.tree.structure(flax_params)
    assert _shapes(ours) == _shapes(flax_params)
    assert jax.tree.map(lambda a: a.dtype, ours) == jax.tree.map(lambda a: a.dtype, flax_params)
    # And the module runs on them.
    out = module.apply({"params": ours}, *((x, y) if cross else (x,)))
    ref = aj.multi_head_attention(ours, x, y if cross else None, num_heads=NUM_HEADS)
    assert rel_err(out, ref) <= F32_TOL


# Only 'xla' forms the weights; None (auto) must pick it when they are sown.
@pytest.mark.parametrize("impl", ["xla", None])
def test_sown_weights_are_taken_before_dropout_as_in_flax(impl, rng):
    ours, theirs = _modules(impl, dropout_rate=0.5)
    x, _ = _inputs(rng)
    params = _init_same(ours, theirs, x, deterministic=True)
    kwargs = dict(
        deterministic=False,
        sow_weights=True,
        mutable=["intermediates"],
        rngs={"dropout": jax.random.key(5)},
    )
    out, state = ours.apply(params, x, **kwargs)
    _, ref_state = theirs.apply(params, x, **kwargs)
    (w,) = state["intermediates"]["attention_weights"]
    (w_ref,) = ref_state["intermediates"]["attention_weights"]
    assert rel_err(w, w_ref) <= F32_TOL  # the dropout streams differ; the weights do not
    np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, rtol=1e-5)
    # Dropout did act on the output: it differs from the deterministic one.
    assert rel_err(out, ours.apply(params, x, deterministic=True)) > 1e-3
