"""Packing as structure: segment ids in the attention call instead of a dense same-segment mask.

References: the dense-mask path of the same implementation (what the model did before:
``core.masks.segment_mask`` combined with the padding mask) and an independent float64 NumPy
attention (``tests/reference.py``). Tolerances: float32 values and gradients 1e-5 relative
(max|a - e| / max|e|). Tiles of 8 x 16 (``blockwise._BLOCKS`` patched) make every case span
several query and key blocks with ragged edges, so the skipping by segment is exercised.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import attention_f64, rel_err

import attention_jax as aj
from attention_jax.core import blockwise as bw
from attention_jax.core import dispatch, kernels, masks
from attention_jax.core.attention import multi_head_attention
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.layers import DecoderLayer, EncoderLayer, FeedForward, MultiHeadAttention

TOL = 1e-5
N, H = 2, 8
# Compile time is what dominates here: XLA's CPU backend unoptimised (both paths alike).
FAST = {"xla_backend_optimization_level": 0}


def _compiled(f, *args):
    return jax.jit(f).lower(*args).compile(FAST)(*args)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setitem(bw._BLOCKS, "cpu", (8, 16))


def _packed_ids(lengths, total):
    """One packed row: segments 1, 2, ... of the given lengths, then padding 0."""
    ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])
    return np.pad(ids, (0, total - ids.size)).astype(np.int32)


def _case(kind, rng):
    """(q ids [B, T], k ids [B, S], padding mask [B, 1, T, S] or None)."""
    if kind == "packed":  # self-attention, T = S = 37; row 1 is all padding
        q_ids = np.stack([_packed_ids([9, 14, 5], 37), np.zeros(37, np.int32)])
        k_ids = q_ids
    elif kind == "cross":  # T = 21 queries, S = 53 keys, packed, segments meet by id
        q_ids = np.stack([_packed_ids([6, 10, 3], 21), _packed_ids([21], 21)])
        k_ids = np.stack([_packed_ids([20, 7, 17], 53), _packed_ids([30], 53)])
    else:  # random ids, not contiguous, T > S; some queries have no key of their id
        q_ids = rng.integers(0, 4, (2, 50)).astype(np.int32)
        k_ids = rng.integers(1, 4, (2, 19)).astype(np.int32)
        return q_ids, k_ids, None
    mask = masks.padding_mask(q_ids, k_ids)  # [B, 1, T, S]: padding, as the model gives it
    return q_ids, k_ids, np.asarray(mask)


def _qkv(rng, T, S):
    return tuple(
        jnp.asarray(rng.standard_normal((2, n, N, H)), jnp.float32) for n in (T, S, S)
    )  # fmt: skip


def _out_and_grads(f, q, k, v):
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape[:-1] + v.shape[-1:]))
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(cot.astype(out.dtype))


# Each implementation meets two of the three id kinds, causal and not: 6 compiled cases.
CASES = [
    ("xla", "packed", True),
    ("xla", "random", False),
    ("blockwise", "packed", False),
    ("blockwise", "cross", True),
    ("blockwise", "random", True),
    ("blockwise_autodiff", "cross", False),
    ("blockwise_autodiff", "packed", True),
]


@pytest.mark.parametrize("impl,kind,causal", CASES)
def test_segment_ids_equal_the_dense_mask_and_float64(impl, kind, causal, small_tiles, rng):
    q_ids, k_ids, pad = _case(kind, rng)
    q, k, v = _qkv(rng, q_ids.shape[1], k_ids.shape[1])
    dense = np.asarray(masks.segment_mask(q_ids, k_ids))  # [B, 1, T, S]
    dense = dense if pad is None else dense & pad
    kw = dict(implementation=impl, is_causal=causal)

    def structural(q, k, v):
        return aj.dot_product_attention(q, k, v, mask=pad, query_segment_ids=q_ids,
                                        key_segment_ids=k_ids, **kw)  # fmt: skip

    def today(q, k, v):
        return aj.dot_product_attention(q, k, v, mask=dense, **kw)

    (out, grads), (ref_out, ref_grads) = _compiled(
        lambda *a: (_out_and_grads(structural, *a), _out_and_grads(today, *a)), q, k, v
    )
    assert rel_err(out, ref_out) <= TOL
    for g, g_ref in zip(grads, ref_grads, strict=True):
        assert rel_err(g, g_ref) <= TOL
    full = dense
    if causal:
        T, S = dense.shape[-2:]
        full = full & np.tril(np.ones((T, S), bool))
    assert rel_err(out, attention_f64(q, k, v, mask=full)[0]) <= TOL
    if kind == "packed":  # the padding row sees nothing: zero output, zero gradients
        assert np.all(np.asarray(out)[1] == 0) and np.all(np.asarray(grads[0])[1] == 0)


def test_transforms_vmap_jvp_and_the_reverse_only_refusal(small_tiles, rng):
    """vmap over an extra batch dim (the ids mapped with q, k, v); jvp of
    'blockwise_autodiff' equals jvp of 'xla'; 'blockwise' under jvp names the alternative."""
    q_ids, k_ids, pad = _case("cross", rng)
    q, k, v = _qkv(rng, 21, 53)

    def f(impl, q, k, v, qi=q_ids, ki=k_ids):
        return aj.dot_product_attention(q, k, v, mask=pad, query_segment_ids=qi,
                                        key_segment_ids=ki, implementation=impl)  # fmt: skip

    stacked = [jnp.stack([x, x[::-1]]) for x in (q, k, v)]
    ids = [jnp.stack([x, x[::-1]]) for x in (q_ids, k_ids)]
    tangents = tuple(jnp.ones_like(x) for x in (q, k, v))

    def both(stacked, ids, q, k, v):
        mapped = jax.vmap(lambda q, k, v, qi, ki: f("blockwise", q, k, v, qi, ki))(*stacked, *ids)
        expected = [f("xla", *(x[b] for x in stacked), *(x[b] for x in ids)) for b in range(2)]
        _, t_auto = jax.jvp(lambda *a: f("blockwise_autodiff", *a), (q, k, v), tangents)
        _, t_xla = jax.jvp(lambda *a: f("xla", *a), (q, k, v), tangents)
        return mapped, expected, t_auto, t_xla

    mapped, expected, t_auto, t_xla = _compiled(both, stacked, ids, q, k, v)
    for b in range(2):
        assert rel_err(mapped[b], expected[b]) <= TOL
    assert rel_err(t_auto, t_xla) <= TOL
    with pytest.raises(TypeError, match="blockwise_autodiff"):
        jax.jvp(lambda *a: f("blockwise", *a), (q, k, v), tangents)


def _visited(plan, spans, nq, nk):
    """Tiles [nq, nk] the forward (key blocks per query block) and the backward (query
    blocks per key block) visit."""
    fwd, bwd = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
    for i in range(nq):
        start, whole, end = map(int, bw._key_blocks(plan, i, None, nk, spans))
        assert start <= whole <= end
        fwd[i, start:end] = True
    for j in range(nk):
        start, whole, stop = map(int, bw._query_blocks(plan, j, None, nq, spans))
        assert start <= whole <= stop
        bwd[start:stop, j] = True
    return fwd, bwd


@pytest.mark.parametrize("causal", [False, True])
def test_blockwise_skips_the_tiles_no_query_can_see(causal):
    """4 segments of 128 in T = S = 512, 64 x 64 tiles: 16 of 64 tiles visited (12 causal),
    forward and backward; the autodiff variant's per-tile test agrees. Then, for ragged
    and random ids, every tile holding a visible pair is visited (skipping loses nothing)."""
    plan = bw.Plan(query_block=64, key_block=64, scale=1.0, causal=causal)
    ids = jnp.asarray(_packed_ids([128] * 4, 512))
    spans = bw._segment_spans((ids, ids), 8, 64, 8, 64)
    fwd, bwd = _visited(plan, spans, 8, 8)
    assert fwd.sum() == bwd.sum() == (12 if causal else 16)
    assert np.array_equal(fwd, bwd)
    q_spans, k_spans = spans
    meets = np.asarray(bw._meets(tuple(x[:, None] for x in q_spans),
                                 tuple(x[None, :] for x in k_spans)))  # fmt: skip
    assert meets.sum() == 16 and np.all(meets[fwd])
    rng = np.random.default_rng(3)
    for trial in range(6):
        T, S, qb, kb = 37, 45, 8, 16
        if trial < 3:  # packed, ragged segments, padding at the end
            q_ids = _packed_ids(rng.integers(1, 12, 4), T + 20)[:T]
            k_ids = _packed_ids(rng.integers(1, 14, 4), S + 20)[:S]
        else:
            q_ids, k_ids = rng.integers(0, 6, T), rng.integers(0, 6, S)
        nq, nk = -(-T // qb), -(-S // kb)
        plan = bw.Plan(query_block=qb, key_block=kb, scale=1.0, causal=causal)
        seg = (jnp.asarray(q_ids), jnp.asarray(k_ids))
        padded = tuple(jnp.pad(x, (0, n - x.size), mode="edge") for x, n in
                       zip(seg, (nq * qb, nk * kb), strict=True))  # fmt: skip
        spans = bw._segment_spans(padded, nq, qb, nk, kb)
        fwd, bwd = _visited(plan, spans, nq, nk)
        rows, cols = np.arange(nq * qb)[:, None], np.arange(nk * kb)[None, :]
        qp, kp = np.asarray(padded[0])[:, None], np.asarray(padded[1])[None, :]
        visible = (rows < T) & (cols < S) & (qp == kp) & ((rows >= cols) if causal else True)
        needed = visible.reshape(nq, qb, nk, kb).any(axis=(1, 3))
        assert np.all(fwd[needed]) and np.all(bwd[needed]), trial
        if trial < 3:  # packed rows: nothing visited that is not needed (real rows)
            real = (np.arange(nq) * qb + qb <= T)[:, None]
            assert not np.any(fwd & ~needed & real), trial


def test_kernels_tpu_takes_ids_interpreted_and_the_gpu_kernels_refuse(rng):
    """The Pallas TPU kernel (interpreted on CPU) with segment ids == 'xla' with them;
    the Pallas GPU kernels refuse them in one line; 'auto' on a GPU then picks another."""
    T = 136  # = S, padded to 256 inside: padded keys must not match any query id
    q_ids = np.stack([_packed_ids([50, 60, 26], T), _packed_ids([100], T)])
    q, k, v = (jnp.asarray(rng.standard_normal((2, T, 1, 8)), jnp.float32) for _ in range(3))
    out = kernels.pallas_attention(q, k, v, scale=8**-0.5, interpret=True, backend="tpu",
                                   is_causal=True, query_segment_ids=q_ids,
                                   key_segment_ids=q_ids)  # fmt: skip
    ref = aj.dot_product_attention(q, k, v, is_causal=True, query_segment_ids=q_ids,
                                   implementation="xla")  # fmt: skip
    assert rel_err(out, ref) <= TOL  # row 1's padding (id 0) sees only padding: as 'xla'
    with pytest.raises(NotImplementedError, match=r"^pallas_attention: .*segment ids[^\n]*$"):
        kernels.pallas_attention(q, k, v, scale=1.0, interpret=True, backend="gpu",
                                 query_segment_ids=q_ids, key_segment_ids=q_ids)  # fmt: skip
    call = dict(q_shape=(2, 37, 2, 8), k_shape=(2, 37, 2, 8), v_shape=(2, 37, 2, 8),
                dtype=jnp.bfloat16, backend="gpu")  # fmt: skip
    assert "segment ids" in dispatch.unsupported_reason("cudnn", has_segment_ids=True, **call)
    assert dispatch.unsupported_reason("cudnn", **call) is None  # odd T alone is fine


def test_auto_on_a_gpu_passes_by_the_kernels_that_cannot_take_ids(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(dispatch, "device_kind", lambda backend=None: None)
    call = dict(q_shape=(2, 37, 2, 8), k_shape=(2, 37, 2, 8), v_shape=(2, 37, 2, 8),
                dtype=jnp.dtype(jnp.bfloat16), has_mask=False, has_bias=False, is_causal=True,
                has_lengths=False, dropout=0.0, want_weights=False)  # fmt: skip
    assert dispatch.resolve_implementation("f", "auto", **call) == "cudnn"
    picked = dispatch.resolve_implementation("f", "auto", has_segment_ids=True, **call)
    assert picked not in ("cudnn", "pallas")
    with pytest.raises(ValueError, match=r"^f: implementation='pallas' cannot run here: .*segment"):
        dispatch.resolve_implementation("f", "pallas", has_segment_ids=True, **call)


def test_bad_segment_ids_get_one_line_each(rng):
    q, k, v = _qkv(rng, 6, 9)
    ids_t, ids_s = np.ones((2, 6), np.int32), np.ones((2, 9), np.int32)
    cases = [
        (dict(query_segment_ids=np.ones((2, 5), np.int32), key_segment_ids=ids_s),
         r"query_segment_ids must have shape \[\.\.\., T\] = \(2, 6\), got \(2, 5\)"),
        (dict(query_segment_ids=ids_t, key_segment_ids=np.ones((9,), np.int32)),
         r"key_segment_ids must have shape \[\.\.\., S\] = \(2, 9\), got \(9,\)"),
        (dict(query_segment_ids=ids_t.astype(np.float32), key_segment_ids=ids_s),
         r"query_segment_ids must be an integer array \[\.\.\., T\], got dtype float32"),
        (dict(key_segment_ids=ids_s), "key_segment_ids needs query_segment_ids"),
        (dict(query_segment_ids=ids_t), r"key_segment_ids \[\.\.\., S\] is needed when S != T"),
    ]  # fmt: skip
    for kw, message in cases:
        with pytest.raises((ValueError, TypeError)) as err:
            jax.jit(lambda q, k, v, kw=kw: aj.dot_product_attention(q, k, v, **kw))(q, k, v)
        assert "\n" not in str(err.value)
        assert err.match(r"^dot_product_attention: " + message)


# ---- Layers. ------------------------------------------------------------------------------

CFG = dict(vocab_size=32, d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=32)


def _layer_inputs(rng, T=24, S=20):
    seg = np.stack([_packed_ids([7, 9, 5], T), _packed_ids([T], T)])  # [B, T]
    src = np.stack([_packed_ids([6, 8, 4], S), _packed_ids([S - 3], S)])  # [B, S]
    x = jnp.asarray(rng.standard_normal((2, T, 16)), jnp.float32)
    enc = jnp.asarray(rng.standard_normal((2, S, 16)), jnp.float32)
    return x, enc, seg, src


@pytest.mark.parametrize("remat,impl", [("none", "blockwise"), ("dots", None)])
def test_layers_with_segment_ids_equal_the_dense_mask(remat, impl, small_tiles, rng):
    """EncoderLayer and DecoderLayer given segment ids and the padding mask == given today's
    combined dense mask, forward and gradients (parameters and inputs)."""
    cfg = TransformerConfig(**CFG, remat=remat, attention_implementation=impl)
    x, enc, seg, src = _layer_inputs(rng)
    pad_self = np.asarray(masks.padding_mask(seg))  # [B, 1, T, T]
    pad_cross = np.asarray(masks.padding_mask(seg, src))
    dense_self = pad_self & np.asarray(masks.segment_mask(seg))
    dense_cross = pad_cross & np.asarray(masks.segment_mask(seg, src))
    enc_layer, dec_layer = EncoderLayer(cfg), DecoderLayer(cfg)
    p_enc = enc_layer.init(jax.random.key(0), x, pad_self, deterministic=True)
    p_dec = dec_layer.init(jax.random.key(1), x, enc, pad_self, pad_cross, deterministic=True)

    def enc_loss(p, x, ids):
        m = pad_self if ids else dense_self
        y = enc_layer.apply(p, x, m, deterministic=True, segment_ids=seg if ids else None)
        return jnp.sum(jnp.sin(y)), y

    def dec_loss(p, x, enc, ids):
        kw = dict(segment_ids=seg, encoder_segment_ids=src) if ids else {}
        ms = (pad_self, pad_cross) if ids else (dense_self, dense_cross)
        y = dec_layer.apply(p, x, enc, *ms, deterministic=True, **kw)
        return jnp.sum(jnp.sin(y)), y

    enc_grad = jax.grad(enc_loss, argnums=(0, 1), has_aux=True)
    dec_grad = jax.grad(dec_loss, argnums=(0, 1, 2), has_aux=True)
    for fn, args in ((enc_grad, (p_enc, x)), (dec_grad, (p_dec, x, enc))):
        (g_ids, y_ids), (g_dense, y_dense) = _compiled(
            lambda *a, fn=fn: (fn(*a, True), fn(*a, False)), *args
        )
        assert rel_err(y_ids, y_dense) <= TOL
        # One scale for all gradients: some (the key bias's) are 0 up to rounding.
        leaves = list(zip(jax.tree.leaves(g_ids), jax.tree.leaves(g_dense), strict=True))
        scale = max(float(jnp.max(jnp.abs(b))) for _, b in leaves)
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in leaves) <= TOL * scale


def test_activation_constraints_are_no_ops_without_a_mesh(rng):
    """The heads and feed-forward constraints change nothing without a mesh: the layer's
    attention is bitwise core.multi_head_attention with its parameters, and the outputs are
    bitwise the same inside a logical-rules context (no mesh) as outside."""
    cfg = TransformerConfig(**CFG)
    x, _, seg, _ = _layer_inputs(rng)
    mask = np.asarray(masks.padding_mask(seg))
    mha = MultiHeadAttention(cfg)
    params = mha.init(jax.random.key(0), x, x, mask, deterministic=True)
    out = mha.apply(params, x, x, mask, deterministic=True)
    pure = {n: dict(p) for n, p in nn.unbox(params)["params"].items()}
    expected = multi_head_attention(pure, x, num_heads=2, mask=mask, dtype=jnp.float32)
    assert np.array_equal(out, expected)
    ffn = FeedForward(cfg)
    p_ffn = ffn.init(jax.random.key(1), x)
    rules = (("activation_batch", "data"), ("activation_heads", "model"),
             ("activation_mlp", "model"), ("activation_length", None))  # fmt: skip
    plain = (out, ffn.apply(p_ffn, x))
    with nn.logical_axis_rules(rules):
        ruled = (mha.apply(params, x, x, mask, deterministic=True), ffn.apply(p_ffn, x))
    assert all(np.array_equal(a, b) for a, b in zip(plain, ruled, strict=True))


def test_a_cached_decode_step_refuses_segment_ids(rng):
    cfg = TransformerConfig(**CFG)
    x = jnp.asarray(rng.standard_normal((1, 8, 16)), jnp.float32)
    mha = MultiHeadAttention(cfg, causal=True)
    variables = mha.init(jax.random.key(0), x, x, None, deterministic=True, decode=True)
    step = x[:, :1]
    with pytest.raises(ValueError, match=r"^MultiHeadAttention: a KV-cached decode step takes"):
        mha.apply(variables, step, step, None, deterministic=True, decode=True,
                  segment_ids=np.ones((1, 1), np.int32), mutable=["cache"])  # fmt: skip
