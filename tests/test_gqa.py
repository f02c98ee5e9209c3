"""Grouped-query and multi-query attention (key/value heads K < query heads N).

References, independent of the library: a float64 NumPy attention written out below that
repeats the key/value heads (query head n uses key/value head n // (N // K), jax.nn's
grouping) with its gradients by hand (w.r.t. q, k, v and bias; k and v summed over each
group); ``jax.nn.dot_product_attention`` given the same GQA inputs; central differences of
the float64 reference for forward mode; torch's ``scaled_dot_product_attention(...,
enable_gqa=True)`` where torch is installed (skipped otherwise). Tolerance: relative error
(max |a - e| / max |e|) <= 1e-5 in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from reference import rel_err

import attention_jax as aj
from attention_jax.core import blockwise, dispatch, kernels

F32_TOL = 1e-5
CPU_IMPLS = ["xla", "blockwise", "blockwise_autodiff", None, "auto"]
B, T, S, N, H, HV = 2, 12, 20, 4, 8, 6


# ---- float64 reference: out, weights and the vjp of a cotangent g. ---------------------


def gqa_f64(q, k, v, g=None, *, mask=None, bias=None, is_causal=False, lengths=None,
            scale=None):  # fmt: skip
    """q [B, T, N, H], k [B, S, K, H], v [B, S, K, V], g [B, T, N, V] (or None), mask / bias
    broadcastable to [B, N, T, S] -> out [B, T, N, V], weights [B, N, T, S] and, with g,
    (dq, dk, dv, dbias [B, N, T, S]). Rows that see no key give 0 (and no gradient)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    (Bq, Tq, Nq, Hq), (Sk, Kk) = q.shape, k.shape[1:3]
    G = Nq // Kk
    kr, vr = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # [B, S, N, H|V]
    scale = 1.0 / np.sqrt(Hq) if scale is None else scale
    ok = np.ones((Bq, Nq, Tq, Sk), bool)
    if mask is not None:
        ok &= np.broadcast_to(np.asarray(mask, bool), ok.shape)
    if is_causal:
        ok &= np.tril(np.ones((Tq, Sk), bool))
    if lengths is not None:
        ok &= (np.arange(Sk) < np.asarray(lengths)[:, None])[:, None, None, :]
    logits = np.einsum("btnh,bsnh->bnts", q, kr) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    logits = np.where(ok, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    e = np.where(ok, np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
    denom = e.sum(-1, keepdims=True)
    p = np.divide(e, denom, out=np.zeros_like(e), where=denom > 0)  # [B, N, T, S]
    out = np.einsum("bnts,bsnv->btnv", p, vr)
    if g is None:
        return out, p
    g = np.asarray(g, np.float64)
    dvr = np.einsum("bnts,btnv->bsnv", p, g)
    dp = np.einsum("btnv,bsnv->bnts", g, vr)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))  # softmax backward: dLogits
    dq = np.einsum("bnts,bsnh->btnh", ds, kr) * scale
    dkr = np.einsum("bnts,btnh->bsnh", ds, q) * scale
    # The repeat's gradient: sum the G query heads of each group.
    dk = dkr.reshape(Bq, Sk, Kk, G, Hq).sum(3)
    dv = dvr.reshape(Bq, Sk, Kk, G, vr.shape[-1]).sum(3)
    return out, p, (dq, dk, dv, ds)


def _inputs(rng, K, *, T=T, S=S, N=N, H=H, HV=HV, B=B):
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, K, H)).astype(np.float32)
    v = rng.standard_normal((B, S, K, HV)).astype(np.float32)
    g = rng.standard_normal((B, T, N, HV)).astype(np.float32)
    return q, k, v, g


def _masking(kind, rng, T=T, S=S):
    """Keyword arguments for one masking case (mask and bias with N heads)."""
    if kind == "none":
        return {}
    if kind == "causal":
        return {"is_causal": True}
    if kind == "lengths":
        return {"key_value_seq_lengths": np.array([S, 7], np.int32)}
    if kind == "mask_bias":  # a per-head mask with some fully masked rows, a per-head bias
        mask = rng.random((B, N, T, S)) < 0.7
        mask[:, 1, 0, :] = False
        bias = rng.standard_normal((B, N, T, S)).astype(np.float32)
        return {"mask": mask, "bias": bias}
    if kind == "shared_mask":  # broadcast over batch and heads
        return {"mask": np.tril(np.ones((T, S), bool), k=3)}
    raise ValueError(kind)


def _ref_kw(kw):
    return {
        "mask": kw.get("mask"),
        "bias": kw.get("bias"),
        "is_causal": kw.get("is_causal", False),
        "lengths": kw.get("key_value_seq_lengths"),
    }


def _out_and_grads(impl, q, k, v, g, kw):
    """Output and the vjp of g w.r.t. q, k, v (and bias, when given), under jit."""
    bias = kw.get("bias")
    rest = {n: x for n, x in kw.items() if n != "bias"}

    @jax.jit
    def run(q, k, v, bias, g):
        def f(q, k, v, bias):
            return aj.dot_product_attention(q, k, v, bias, implementation=impl, **rest)

        out, vjp = jax.vjp(f, q, k, v, bias)
        return out, vjp(g)

    return run(q, k, v, bias, g)


# ---- values and gradients against the float64 reference -------------------------------


# K = N is plain multi-head attention (tests/test_attention.py); None and 'auto' pick 'xla'
# at this size (both sides of the threshold: below; against jax.nn: test_equals_jax_nn).
@pytest.mark.parametrize("kind", ["none", "causal", "lengths", "mask_bias", "shared_mask"])
@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("impl", ["xla", "blockwise", "blockwise_autodiff"])
def test_values_and_gradients(rng, impl, K, kind):
    q, k, v, g = _inputs(rng, K)
    kw = _masking(kind, rng)
    out, grads = _out_and_grads(impl, q, k, v, g, kw)
    want_out, _, want = gqa_f64(q, k, v, g, **_ref_kw(kw))
    assert out.shape == (B, T, N, HV) and out.dtype == np.float32
    errors = {"out": rel_err(out, want_out)}
    errors.update({nm: rel_err(a, b) for nm, a, b in zip("qkv", grads[:3], want[:3], strict=True)})
    assert grads[1].shape == k.shape and grads[2].shape == v.shape
    if "bias" in kw:
        errors["bias"] = rel_err(grads[3], want[3])
    assert max(errors.values()) < F32_TOL, errors


@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_equals_jax_nn(rng, impl, K):
    """jax.nn.dot_product_attention takes the same GQA inputs (no fully masked rows: jax.nn
    averages the values there, a documented difference)."""
    q, k, v, _ = _inputs(rng, K, HV=H)  # jax.nn needs Hv == H
    bias = rng.standard_normal((B, N, T, S)).astype(np.float32)
    lengths = np.array([S, 9], np.int32)
    kw = dict(bias=bias, is_causal=True, key_value_seq_lengths=lengths)
    got = aj.dot_product_attention(q, k, v, implementation=impl, **kw)
    want = jax.nn.dot_product_attention(q, k, v, **kw)
    assert rel_err(got, want) < F32_TOL


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_weights_and_residual_have_query_heads(rng, impl):
    q, k, v, _ = _inputs(rng, 2)
    kw = _masking("mask_bias", rng)
    out, weights, lse = aj.dot_product_attention(q, k, v, implementation=impl,
                                                 return_weights=True, return_residual=True,
                                                 **kw)  # fmt: skip
    want_out, want_w = gqa_f64(q, k, v, **_ref_kw(kw))
    assert weights.shape == (B, N, T, S) and lse.shape == (B, T, N)
    assert rel_err(out, want_out) < F32_TOL
    assert rel_err(weights, want_w) < F32_TOL


# ---- the dispatch threshold: a size on each side ----------------------------------------


@pytest.mark.parametrize(
    ("T_", "S_", "picked"), [(256, 256, "xla"), (384, 384, "blockwise_autodiff")]
)
def test_both_sides_of_the_cpu_threshold(rng, T_, S_, picked):
    """T·S = 65536 runs 'xla', T·S = 147456 > 131072 the tiles (None's choice on CPU)."""
    Bs, Ns, Ks, Hs = 1, 2, 1, 4
    q, k, v, g = _inputs(rng, Ks, T=T_, S=S_, N=Ns, H=Hs, HV=Hs, B=Bs)
    chosen = dispatch.resolve_implementation(
        "test", None, q_shape=q.shape, k_shape=k.shape, v_shape=v.shape, dtype=q.dtype,
        has_mask=False, has_bias=False, is_causal=True, has_lengths=False, dropout=0.0,
        want_weights=False,
    )  # fmt: skip
    assert chosen == picked
    for impl in (None, "auto"):
        out, grads = _out_and_grads(impl, q, k, v, g, {"is_causal": True})
        want_out, _, want = gqa_f64(q, k, v, g, is_causal=True)
        assert rel_err(out, want_out) < F32_TOL
        for got, exp in zip(grads[:3], want[:3], strict=True):
            assert rel_err(got, exp) < F32_TOL


# ---- transforms ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_vmap_of_grad(rng, impl):
    """vmap over an extra leading axis of a jitted grad: each slice equals the reference."""
    Ks, V = 2, 3
    q, k, v, g = (np.stack([x] * V) for x in _inputs(rng, Ks))
    q = q + rng.standard_normal(q.shape).astype(np.float32)  # different slices

    def loss(q, k, v, g):
        out = aj.dot_product_attention(q, k, v, implementation=impl, is_causal=True)
        return jnp.sum(out * g)

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(q, k, v, g)
    for i in range(V):
        _, _, want = gqa_f64(q[i], k[i], v[i], g[i], is_causal=True)
        for got, exp in zip(grads, want[:3], strict=True):
            assert rel_err(got[i], exp) < F32_TOL


@pytest.mark.parametrize("impl", ["xla", "blockwise_autodiff", None])
@pytest.mark.parametrize("K", [1, 2])
def test_jvp_against_central_differences(rng, impl, K):
    """Forward mode, where the implementation has it: the tangent equals the float64
    reference's central difference along the same direction (step 1e-4: error ~1e-8)."""
    q, k, v, _ = _inputs(rng, K)
    tq, tk, tv, _ = _inputs(rng, K)
    kw = dict(is_causal=True, key_value_seq_lengths=np.array([S, 6], np.int32))

    def f(q, k, v):
        return aj.dot_product_attention(q, k, v, implementation=impl, **kw)

    _, tangent = jax.jit(lambda *a: jax.jvp(f, a[:3], a[3:]))(q, k, v, tq, tk, tv)
    eps = 1e-4
    up = gqa_f64(q + eps * np.float64(tq), k + eps * np.float64(tk), v + eps * np.float64(tv),
                 is_causal=True, lengths=kw["key_value_seq_lengths"])[0]  # fmt: skip
    down = gqa_f64(q - eps * np.float64(tq), k - eps * np.float64(tk), v - eps * np.float64(tv),
                   is_causal=True, lengths=kw["key_value_seq_lengths"])[0]  # fmt: skip
    assert rel_err(tangent, (up - down) / (2 * eps)) < F32_TOL


def test_blockwise_jvp_names_the_alternative(rng):
    q, k, v, _ = _inputs(rng, 2)
    f = lambda q: aj.dot_product_attention(q, k, v, implementation="blockwise")  # noqa: E731
    with pytest.raises(TypeError, match="blockwise_autodiff"):
        jax.jvp(f, (q,), (q,))


# ---- the tiles: several blocks, skipping, lengths, per-head bias -----------------------


@pytest.mark.parametrize("autodiff", [False, True])
@pytest.mark.parametrize("K", [1, 3])
def test_blockwise_tiles(rng, autodiff, K):
    """blockwise_attention (heads-first layout) in tiles of 8 x 16 over T = 37, S = 45, with
    causal skipping, per-head key lengths and a per-head bias; k and v keep K heads."""
    Bs, Ts, Ss, Ns, Hs = 2, 37, 45, 6, 8
    q = rng.standard_normal((Bs, Ns, Ts, Hs)).astype(np.float32)
    k = rng.standard_normal((Bs, K, Ss, Hs)).astype(np.float32)
    v = rng.standard_normal((Bs, K, Ss, 5)).astype(np.float32)
    g = rng.standard_normal((Bs, Ns, Ts, 5)).astype(np.float32)
    bias = rng.standard_normal((1, Ns, Ts, Ss)).astype(np.float32)
    lengths = np.array([[45], [20]], np.int32)  # [B, N=1]: one length per batch row

    def f(q, k, v, bias):
        return blockwise.blockwise_attention(
            q, k, v, None, bias, scale=Hs**-0.5, is_causal=True, kv_lengths=lengths,
            autodiff=autodiff, query_block=8, key_block=16,
        )  # fmt: skip

    out, vjp = jax.jit(lambda *a: jax.vjp(f, *a))(q, k, v, bias)
    grads = vjp(g)
    swap = lambda x: np.swapaxes(x, 1, 2)  # noqa: E731  [B, X, Y, H] <-> [B, Y, X, H]
    want_out, _, want = gqa_f64(swap(q), swap(k), swap(v), swap(g), bias=bias, is_causal=True,
                                lengths=lengths[:, 0])  # fmt: skip
    assert rel_err(out, swap(want_out)) < F32_TOL
    for got, exp in zip(grads[:3], want[:3], strict=True):
        assert rel_err(got, swap(exp)) < F32_TOL
    assert rel_err(grads[3], want[3].sum(0, keepdims=True)) < F32_TOL


@pytest.mark.parametrize("impl", ["xla", "blockwise", "blockwise_autodiff"])
def test_dropout_pattern_equals_repeated_heads(rng, impl):
    """With dropout, K < N heads give exactly what the same call with k and v repeated to N
    heads gives: the pattern belongs to the query head, not to its key/value head."""
    q, k, v, _ = _inputs(rng, 2)
    # blockwise: a pattern per query head; xla: one shared pattern (its per-head patterns
    # are drawn for the array of heads, whose shape the grouping changes).
    kw = dict(dropout_rng=jax.random.key(3), dropout_rate=0.3, deterministic=False,
              broadcast_dropout=impl == "xla")  # fmt: skip
    got = aj.dot_product_attention(q, k, v, implementation=impl, **kw)
    rep = [np.repeat(x, N // 2, axis=2) for x in (k, v)]
    want = aj.dot_product_attention(q, *rep, implementation=impl, **kw)
    assert rel_err(got, want) < F32_TOL


# ---- the Pallas Triton kernel, interpreted on CPU (repeats k and v) --------------------


def test_pallas_interpreted_gqa(rng):
    Bs, Ts, Ns, Ks, Hs = 1, 32, 4, 2, 16
    q, k, v, g = _inputs(rng, Ks, T=Ts, S=Ts, N=Ns, H=Hs, HV=Hs, B=Bs)

    def f(q, k, v):
        return kernels.pallas_attention(q, k, v, is_causal=True, scale=Hs**-0.5,
                                        interpret=True, backend="gpu", block_q=16,
                                        block_k=16)  # fmt: skip

    out, vjp = jax.vjp(f, q, k, v)
    want_out, _, want = gqa_f64(q, k, v, g, is_causal=True)
    assert rel_err(out, want_out) < F32_TOL
    for got, exp in zip(vjp(g), want[:3], strict=True):
        assert got.shape == exp.shape and rel_err(got, exp) < F32_TOL


def test_kernel_capabilities_take_gqa_shapes():
    h100 = dispatch.DeviceKind("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
    shapes = dict(q_shape=(2, 128, 8, 64), k_shape=(2, 128, 2, 64), v_shape=(2, 128, 2, 64))
    assert dispatch.unsupported_reason("cudnn", dtype=jnp.bfloat16, backend="gpu",
                                       device_kind=h100, **shapes) is None  # fmt: skip
    assert dispatch.unsupported_reason("pallas", dtype=jnp.float16, backend="gpu",
                                       device_kind=h100, **shapes) is None  # fmt: skip
    with pytest.raises(ValueError, match=r"got N=8 from q .* and K=3 from k"):
        dispatch.unsupported_reason("cudnn", dtype=jnp.bfloat16, backend="gpu",
                                    device_kind=h100, q_shape=(2, 128, 8, 64),
                                    k_shape=(2, 128, 3, 64), v_shape=(2, 128, 3, 64))  # fmt: skip


# ---- multi_head_attention with num_kv_heads ---------------------------------------------


def test_multi_head_attention_num_kv_heads(rng):
    D, Ns, Ks = 16, 4, 2
    params = aj.init_multi_head_attention(jax.random.key(0), D, Ns, num_kv_heads=Ks)
    assert params["query"]["kernel"].shape == (D, Ns, D // Ns)
    assert params["key"]["kernel"].shape == (D, Ks, D // Ns)
    assert params["value"]["bias"].shape == (Ks, D // Ns)
    params = jax.tree.map(lambda p: p + 0.1 * rng.standard_normal(p.shape), params)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    out = aj.multi_head_attention(params, x, num_heads=Ns, num_kv_heads=Ks, is_causal=True)
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x64 = np.float64(x)
    proj = {nm: np.einsum("btd,dnh->btnh", x64, p64[nm]["kernel"]) + p64[nm]["bias"]
            for nm in ("query", "key", "value")}  # fmt: skip
    heads, _ = gqa_f64(proj["query"], proj["key"], proj["value"], is_causal=True)
    want = np.einsum("btnh,nhd->btd", heads, p64["out"]["kernel"]) + p64["out"]["bias"]
    assert rel_err(out, want) < F32_TOL
    with pytest.raises(ValueError, match=r"key and value kernels must be \[Dkv, K=4, H\]"):
        aj.multi_head_attention(params, x, num_heads=Ns)  # num_kv_heads not given
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=4"):
        aj.init_multi_head_attention(jax.random.key(0), D, Ns, num_kv_heads=3)


# ---- bad shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True])
def test_bad_head_counts(rng, jit):
    q, k, v, _ = _inputs(rng, 2)
    dpa = jax.jit(aj.dot_product_attention) if jit else aj.dot_product_attention
    k3 = np.zeros((B, S, 3, H), np.float32)
    with pytest.raises(ValueError, match=r"got N=4 from query \(2, 12, 4, 8\) and K=3 from key "
                                         r"\(2, 20, 3, 8\)"):  # fmt: skip
        dpa(q, k3, np.zeros((B, S, 3, HV), np.float32))
    with pytest.raises(ValueError, match=r"key and value need the same number of key/value "
                                         r"heads K .* got key \(2, 20, 2, 8\), value "
                                         r"\(2, 20, 1, 6\)"):  # fmt: skip
        dpa(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2, 12, 20\) is not broadcastable"):
        dpa(q, k, v, mask=np.ones((B, 2, T, S), bool))  # a mask has the N query heads


# ---- torch, a second independent reference ---------------------------------------------


@pytest.mark.parametrize("K", [1, 2])
def test_equals_torch_enable_gqa(rng, K):
    torch = pytest.importorskip("torch")
    q, k, v, _ = _inputs(rng, K)
    mask = rng.random((B, N, T, S)) < 0.8
    mask[..., 0] = True  # no fully masked rows (torch gives NaN there)
    got = aj.dot_product_attention(q, k, v, mask=mask)
    t = lambda x: torch.from_numpy(np.swapaxes(np.float64(x), 1, 2))  # noqa: E731 [B, N, T, H]
    want = torch.nn.functional.scaled_dot_product_attention(
        t(q), t(k), t(v), attn_mask=torch.from_numpy(mask), enable_gqa=True
    )
    assert rel_err(got, np.swapaxes(want.numpy(), 1, 2)) < F32_TOL


# ---- meshes: batch over 'data', query and key/value heads over 'model' -----------------

MESH_CASES = [("xla", 40), ("blockwise", 40), ("blockwise_autodiff", 40), ("blockwise", 300)]


def _mesh_check(rng, impl, Ts, run):
    """run(attn, q, k, v) -> (out, grads of sum(out * g)); compared with the reference.
    N = 4 query heads and K = 2 key/value heads, both split over a 'model' axis of 2: each
    device holds one key/value head and the two query heads of its group."""
    q, k, v, g = _inputs(rng, 2, T=Ts, S=Ts, B=4)
    attn = lambda q, k, v: aj.dot_product_attention(q, k, v, implementation=impl,  # noqa: E731
                                                    is_causal=True)  # fmt: skip
    out, grads = run(attn, q, k, v, g)
    want_out, _, want = gqa_f64(q, k, v, g, is_causal=True)
    assert rel_err(out, want_out) < F32_TOL
    for got, exp in zip(grads, want[:3], strict=True):
        assert rel_err(got, exp) < F32_TOL


@pytest.mark.parametrize(("impl", "Ts"), MESH_CASES)
def test_shard_map_heads_sharded(rng, impl, Ts):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    spec = P("data", None, "model")  # [B, T, N|K, H]

    def run(attn, q, k, v, g):
        sharded = jax.shard_map(attn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)
        loss = lambda q, k, v: jnp.sum(sharded(q, k, v) * g)  # noqa: E731
        return jax.jit(lambda *a: (sharded(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k, v)

    _mesh_check(rng, impl, Ts, run)


@pytest.mark.parametrize(("impl", "Ts"), MESH_CASES)
def test_explicit_axes_mesh(rng, impl, Ts):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    sharding = NamedSharding(mesh, P("data", None, "model"))

    def run(attn, q, k, v, g):
        loss = lambda q, k, v: jnp.sum(attn(q, k, v) * g)  # noqa: E731
        with jax.set_mesh(mesh):
            q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
            fn = jax.jit(lambda *a: (attn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))
            return fn(q, k, v)

    _mesh_check(rng, impl, Ts, run)


def test_flax_einsum_overrides_and_dot_general(rng):
    """The 'xla'-only arguments: flax's einsum overrides (which get k and v repeated to N
    heads, their subscripts need them) and einsum_dot_general (grouped, not repeated)."""
    q, k, v, _ = _inputs(rng, 2)
    want, _ = gqa_f64(q, k, v, is_causal=True)
    with_einsums = aj.dot_product_attention(
        q, k, v, is_causal=True, qk_attn_weights_einsum=jnp.einsum,
        attn_weights_value_einsum=jnp.einsum,
    )  # fmt: skip
    with_dot_general = aj.dot_product_attention(q, k, v, is_causal=True,
                                                einsum_dot_general=jax.lax.dot_general)  # fmt: skip
    assert rel_err(with_einsums, want) < F32_TOL
    assert rel_err(with_dot_general, want) < F32_TOL
