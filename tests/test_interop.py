"""attention_jax under the code other JAX users will drive it with.

* Flax's own attention modules (Linen ``MultiHeadDotProductAttention``, NNX
  ``MultiHeadAttention``) with ``attention_fn=aj.dot_product_attention``, Flax's mask helpers
  (float32 0/1 masks) and ``decode=True`` caches. Reference: the same module with Flax's
  default ``attention_fn`` and the same params. Rows whose keys are all masked are left out
  (Flax averages the values there, we give 0: a documented difference).
* JAX transforms and meshes: ``jax.shard_map`` (batch and heads sharded over the 8 fake CPU
  devices), ``jit`` on an explicit-axes ``jax.make_mesh`` mesh, ``jax.jvp`` / ``jax.jacfwd``
  / ``jax.hessian``, ``vmap`` of ``grad``. Reference: ``jax.nn.dot_product_attention``
  (independent code; 'xla') on unsharded inputs, and a float64 NumPy forward.

Every implementation that runs on CPU is driven at T = 362 and 363, self-attention: T·S just
below and above the CPU dispatch threshold (T·S·4 bytes > 512 KiB: ``None`` switches from
'xla' to 'blockwise_autodiff'), so ``None`` is exercised on both of its paths.

Tolerances (relative error max|a - e| / max|e|, float32): 1e-5 for outputs, 5e-5 for
derivatives (sums over 363 keys; jax.nn and we round differently).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import attention_f64, rel_err

import attention_jax as aj
from attention_jax.core import dispatch

OUT_TOL, GRAD_TOL = 1e-5, 5e-5
# (implementation, T): None on both sides of the threshold, each explicit one above it.
CASES = [(None, 362), (None, 363), ("xla", 363), ("blockwise", 363), ("blockwise_autodiff", 363)]
CASE_IDS = [f"{impl}-{T}" for impl, T in CASES]
# Forward mode: not 'blockwise' (reverse-only, refused: see the last test); 'xla' is run
# through None at T = 362 (the premise test pins that), which halves the compile time.
FORWARD_MODE = [(None, 362), (None, 363), ("blockwise_autodiff", 363)]


def test_cases_straddle_the_dispatch_threshold():
    """The premise of CASES: None picks 'xla' at T = 362 and a blockwise path at 363."""
    pick = functools.partial(dispatch.choose_implementation, backend="cpu", num_heads=8,
                             want_weights=False, kernel_reasons={}, forward_mode=True)  # fmt: skip
    assert pick(T=362, S=362) == "xla" and pick(T=363, S=363) == "blockwise_autodiff"


def _qkv(T, B=4, N=2, H=4, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))


def _ours(impl):
    return functools.partial(aj.dot_product_attention, implementation=impl)


# --------------------------------------------------------------------------------------
# Flax modules, Flax masks, decode caches.
# --------------------------------------------------------------------------------------

B, L, D, HEADS, QKV = 2, 7, 12, 2, 8
FLAX_IMPLS = ["xla", "blockwise", None]


def _tokens():
    tokens = np.array([[5, 3, 8, 2, 9, 0, 0], [4, 4, 1, 7, 6, 2, 3]])  # row 0: 2 pads
    x = np.random.default_rng(1).standard_normal((B, L, D)).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(x)


def _flax_mask(tokens):
    """causal ∧ padding, as a Flax model builds it: float32 0/1 [B, 1, L, L]."""
    causal = nn.make_causal_mask(tokens)
    padding = nn.make_attention_mask(tokens > 0, tokens > 0)
    mask = nn.combine_masks(causal, padding)
    assert mask.dtype == jnp.float32  # the inputs that used to raise "mask must be bool"
    return mask


def _real_rows(tokens):
    return np.asarray(tokens > 0)  # [B, L]: pad queries see no key (Flax averages there)


@pytest.mark.parametrize("impl", FLAX_IMPLS)
def test_linen_mha_with_flax_masks_equals_flax_default(impl):
    tokens, x = _tokens()
    mask = _flax_mask(tokens)
    kw = dict(num_heads=HEADS, qkv_features=QKV)
    ours = nn.MultiHeadDotProductAttention(**kw, attention_fn=_ours(impl))
    theirs = nn.MultiHeadDotProductAttention(**kw)
    params = theirs.init(jax.random.key(0), x, mask=mask)
    out = ours.apply(params, x, mask=mask)
    ref = theirs.apply(params, x, mask=mask)
    rows = _real_rows(tokens)
    assert rel_err(np.asarray(out)[rows], np.asarray(ref)[rows]) <= OUT_TOL
    assert np.all(np.asarray(out)[~rows] == 0.0)  # the documented difference


@pytest.mark.parametrize("impl", FLAX_IMPLS)
def test_linen_mha_decode_cache_equals_flax_default(impl):
    """decode=True: one token at a time against the cache; Flax combines our float padding
    mask with its own bool cache mask. Each step equals Flax's step."""
    tokens, x = _tokens()
    key_pad = nn.make_attention_mask(jnp.ones((B, 1)), tokens > 0)  # float32 [B, 1, 1, L]
    kw = dict(num_heads=HEADS, qkv_features=QKV, decode=True)
    ours = nn.MultiHeadDotProductAttention(**kw, attention_fn=_ours(impl))
    theirs = nn.MultiHeadDotProductAttention(**kw)
    variables = theirs.init(jax.random.key(0), x)  # creates the [B, L, N, H] cache
    params, cache_ours, cache_theirs = variables["params"], variables["cache"], variables["cache"]
    step = jax.jit(lambda m, cache, xt: m.apply({"params": params, "cache": cache}, xt,
                                                mask=key_pad, mutable=["cache"]),
                   static_argnums=0)  # fmt: skip
    for t in range(L):
        xt = x[:, t : t + 1]
        out, upd_ours = step(ours, cache_ours, xt)
        ref, upd_theirs = step(theirs, cache_theirs, xt)
        cache_ours, cache_theirs = upd_ours["cache"], upd_theirs["cache"]
        assert rel_err(out, ref) <= OUT_TOL, t


@pytest.mark.parametrize("impl", FLAX_IMPLS)
def test_nnx_mha_with_flax_masks_and_decode_equals_flax_default(impl):
    tokens, x = _tokens()
    mask = _flax_mask(tokens)
    kw = dict(num_heads=HEADS, in_features=D, qkv_features=QKV, decode=False)
    ours = nnx.MultiHeadAttention(**kw, attention_fn=_ours(impl), rngs=nnx.Rngs(0))
    theirs = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))  # the same params
    rows = _real_rows(tokens)
    out, ref = ours(x, mask=mask), theirs(x, mask=mask)
    assert rel_err(np.asarray(out)[rows], np.asarray(ref)[rows]) <= OUT_TOL
    # NNX also hands attention_fn is_causal.
    out, ref = ours(x, is_causal=True), theirs(x, is_causal=True)
    assert rel_err(out, ref) <= OUT_TOL
    # decode=True: a cache of L positions, one token per call.
    for m in (ours, theirs):
        m.init_cache((B, L, D))
    for t in range(L):
        xt = x[:, t : t + 1]
        out, ref = ours(xt, decode=True), theirs(xt, decode=True)
        assert rel_err(out, ref) <= OUT_TOL, t


# --------------------------------------------------------------------------------------
# Meshes and transforms.
# --------------------------------------------------------------------------------------


def _loss(attn):
    return lambda q, k, v: jnp.sum(jnp.sin(attn(q, k, v)))  # a non-trivial cotangent


def _value_and_grads(attn):
    return jax.value_and_grad(_loss(attn), argnums=(0, 1, 2))


@functools.cache
def _reference(T):
    """jax.nn's value and gradients at T, and the float64 NumPy forward."""
    q, k, v = _qkv(T)
    val, grads = jax.jit(_value_and_grads(jax.nn.dot_product_attention))(q, k, v)
    return val, grads, attention_f64(q, k, v)[0]


def _check(out, val, grads, T):
    ref_val, ref_grads, ref_out = _reference(T)
    if out is not None:
        assert rel_err(out, ref_out) <= OUT_TOL
    assert rel_err(val, ref_val) <= OUT_TOL
    for name, g, g_ref in zip("qkv", grads, ref_grads, strict=True):
        assert rel_err(g, g_ref) <= GRAD_TOL, name


@pytest.mark.parametrize("impl,T", CASES, ids=CASE_IDS)
def test_shard_map_batch_and_heads_sharded(impl, T):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    spec = P("data", None, "model")  # [B, T, N, H]: batch over data, heads over model
    attn = jax.shard_map(_ours(impl), mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def both(q, k, v):  # the loss needs a global sum, taken outside the shard_map
        return attn(q, k, v), _value_and_grads(attn)(q, k, v)

    out, (val, grads) = jax.jit(both)(*_qkv(T))
    _check(out, val, grads, T)


@pytest.mark.parametrize("impl,T", CASES, ids=CASE_IDS)
def test_jit_on_explicit_axes_mesh(impl, T):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    sharding = NamedSharding(mesh, P("data", None, "model"))
    attn = _ours(impl)
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, sharding) for x in _qkv(T))
        out, (val, grads) = jax.jit(lambda *a: (attn(*a), _value_and_grads(attn)(*a)))(q, k, v)
        assert out.sharding.spec == P("data", None, "model", None)  # stays sharded
    _check(out, val, grads, T)


def _forward_mode(attn, T):
    """jvp of the output; jacfwd and hessian of a loss along one direction (a scalar s
    scaling the queries, so the Jacobians stay small)."""
    q, k, v = _qkv(T, B=1)
    tq = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    _, tangent = jax.jvp(lambda q: attn(q, k, v), (q,), (tq,))
    f = lambda s: _loss(attn)(q * s, k, v)  # noqa: E731
    return tangent, jax.jacfwd(f)(1.0), jax.hessian(f)(1.0)


def _per_example_grads(attn, T):
    """vmap over B of the gradient of one example's loss."""
    one = lambda q, k, v: _loss(attn)(q[None], k[None], v[None])  # noqa: E731
    return jax.vmap(jax.grad(one, argnums=(0, 1, 2)))(*_qkv(T, B=2))


@functools.cache
def _reference_transform(fn, T):
    return jax.jit(lambda: fn(jax.nn.dot_product_attention, T))()


@pytest.mark.parametrize("impl,T", FORWARD_MODE, ids=[f"{i}-{t}" for i, t in FORWARD_MODE])
def test_forward_mode_jvp_jacfwd_hessian(impl, T):
    ours = jax.jit(lambda: _forward_mode(_ours(impl), T))()
    ref = _reference_transform(_forward_mode, T)
    for name, a, b in zip(("jvp", "jacfwd", "hessian"), ours, ref, strict=True):
        assert rel_err(a, b) <= GRAD_TOL, name


@pytest.mark.parametrize("impl,T", CASES, ids=CASE_IDS)
def test_vmap_of_grad_gives_per_example_gradients(impl, T):
    ours = jax.jit(lambda: _per_example_grads(_ours(impl), T))()
    ref = _reference_transform(_per_example_grads, T)
    for name, g, g_ref in zip("qkv", ours, ref, strict=True):
        assert rel_err(g, g_ref) <= GRAD_TOL, name


def test_explicit_blockwise_refuses_forward_mode_naming_the_alternative():
    q, k, v = _qkv(40, B=1)
    f = lambda q: aj.dot_product_attention(q, k, v, implementation="blockwise")  # noqa: E731
    with pytest.raises(TypeError, match="implementation='blockwise_autodiff'"):
        jax.jvp(f, (q,), (q,))
    with pytest.raises(TypeError, match="implementation='blockwise_autodiff'"):
        jax.jacfwd(lambda s: jnp.sum(f(q * s)))(1.0)
