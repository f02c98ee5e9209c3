"""Blockwise (memory-efficient) attention against float64 dense references.

Small tiles (8 x 16) make every case span several query and key blocks with ragged edges,
so the online softmax, the tile skipping and the recomputing backward pass are all
exercised at sizes that run in seconds.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import attention_jax as aj
from attention_jax.core import blockwise as bw
from attention_jax.core import dispatch
from tests.reference import rel_err

F32_TOL = 1e-5
BLOCKS = dict(query_block=8, key_block=16)


def dense_f64(q, k, v, mask=None, bias=None, *, causal=False, lengths=None):
    """Dense attention in float64 jnp, heads-first ([..., T, H]); differentiable by jax."""
    q, k, v = (jnp.asarray(x, jnp.float64) for x in (q, k, v))
    logits = jnp.einsum("...th,...sh->...ts", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float64)
    T, S = logits.shape[-2:]
    lead = lambda x: jnp.reshape(x, (1,) * (logits.ndim - x.ndim) + x.shape)  # noqa: E731
    valid = jnp.ones(logits.shape, bool)
    if mask is not None:
        valid &= lead(jnp.asarray(mask))
    if causal:
        valid &= lead(jnp.tril(jnp.ones((T, S), bool)))
    if lengths is not None:
        valid &= lead(jnp.arange(S)) < jnp.asarray(lengths)[..., None, None]
    logits = jnp.where(valid, logits, -jnp.inf)
    m = jnp.max(logits, -1, keepdims=True)
    e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    d = jnp.sum(e, -1, keepdims=True)
    return jnp.einsum("...ts,...sv->...tv", e / jnp.where(d > 0, d, 1.0), v)


def _inputs(rng, B, N, T, S, H, V):
    q = rng.standard_normal((B, N, T, H)).astype(np.float32)
    k = rng.standard_normal((B, N, S, H)).astype(np.float32)
    v = rng.standard_normal((B, N, S, V)).astype(np.float32)
    return q, k, v


# (T, S): equal, T < S, T > S, all ragged against the 8 x 16 tiles; each shape meets every
# mask kind, causal or not, with and without key lengths, in 9 compiled cases (not 60).
CASES = [
    ((37, 37), "none", False, False),
    ((37, 37), "mask+bias", True, True),
    ((37, 37), "bias_full", False, True),
    ((21, 53), "bias_full", True, False),
    ((21, 53), "mask", False, True),
    ((21, 53), "none", True, True),
    ((50, 19), "bias_rows", True, True),
    ((50, 19), "mask", True, False),
    ((50, 19), "mask+bias", False, False),
]


@pytest.mark.parametrize("shape,extra,causal,with_lengths", CASES)
def test_values_and_gradients_equal_dense_float64(shape, extra, causal, with_lengths, rng):
    T, S = shape
    B, N, H, V = 2, 2, 8, 5
    q, k, v = _inputs(rng, B, N, T, S, H, V)
    mask = bias = lengths = None
    if "mask" in extra:
        mask = rng.random((B, 1, T, S)) > 0.3  # shared by the heads
        mask[0, 0, 3] = False  # one query with every key masked
    if extra in ("bias_rows", "mask+bias"):
        bias = rng.standard_normal((1, N, 1, S)).astype(np.float32)  # per head and key
    elif extra == "bias_full":
        bias = rng.standard_normal((B, N, T, S)).astype(np.float32)
    if with_lengths:
        lengths = np.array([[S // 2], [S]]) * np.ones((1, N), int)  # [B, N]
    cot = rng.standard_normal((B, N, T, V)).astype(np.float32)
    scale = 1 / np.sqrt(H)

    def ours(q, k, v, b=None):
        return bw.blockwise_attention(
            q, k, v, mask, b, scale=scale, is_causal=causal, kv_lengths=lengths, **BLOCKS
        )

    args = (q, k, v) if bias is None else (q, k, v, bias)
    argnums = tuple(range(len(args)))
    out = jax.jit(ours)(*args)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(cot * ours(*a)), argnums=argnums))(*args)
    with jax.enable_x64(True):

        def ref(q, k, v, b=None):
            return dense_f64(q, k, v, mask, b, causal=causal, lengths=lengths)

        args64 = tuple(jnp.asarray(a, jnp.float64) for a in args)
        ref_out = ref(*args64)
        ref_grads = jax.grad(lambda *a: jnp.sum(cot * ref(*a)), argnums=argnums)(*args64)
    assert out.shape == ref_out.shape and out.dtype == jnp.float32
    assert rel_err(out, ref_out) <= F32_TOL
    assert len(grads) == len(ref_grads) == len(args)
    for name, g, g_ref in zip("qkvb", grads, ref_grads, strict=False):
        assert g.shape == g_ref.shape, name
        assert rel_err(g, g_ref) <= F32_TOL, name


def test_gradients_with_dropout_match_finite_differences():
    # Dropout tiles are regenerated from (key, i, j) in the backward pass: the custom VJP must
    # be the derivative of the forward pass with the same pattern.
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        q, k, v = (x.astype(np.float64) for x in _inputs(rng, 1, 2, 19, 23, 4, 3))
        key = jax.random.key(1)

        def f(q, k, v):
            return bw.blockwise_attention(
                q, k, v, scale=0.5, dropout_rate=0.3, dropout_rng=key, broadcast_dropout=False,
                is_causal=True, **BLOCKS,
            )  # fmt: skip

        out = f(q, k, v)
        assert jnp.all(jnp.isfinite(out))
        check_grads(jax.jit(f), (q, k, v), order=1, modes=("rev",), eps=1e-6, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (5, 3)),
                                           (True, (6, 0))])  # fmt: skip
def test_visited_tiles_are_exactly_those_with_a_visible_key(causal, window):
    """The loop bounds (forward: key blocks per query block; backward: query blocks per key
    block) visit exactly the tiles holding at least one (query, key) pair that is not masked
    by causality, the local window or the key length, so skipping loses nothing and wastes
    little."""
    for T, S, qb, kb, length in itertools.product((16, 37), (16, 45), (4, 8), (8, 16), (0, 9, 45)):
        plan = bw.Plan(query_block=qb, key_block=kb, scale=1.0, causal=causal, window=window)
        nq, nk = -(-T // qb), -(-S // kb)
        limit = min(length, S)
        rows, cols = np.arange(nq * qb)[:, None], np.arange(nk * kb)[None, :]
        visible = (rows < T) & (cols < limit) & ((rows >= cols) if causal else True)
        if window is not None:
            visible &= (rows <= cols + window[0]) & (rows >= cols - window[1])
        needed = visible.reshape(nq, qb, nk, kb).any(axis=(1, 3))  # [nq, nk]
        fwd, fwd_whole = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
        for i in range(nq):
            start, whole, end = map(int, bw._key_blocks(plan, i, limit, nk))
            fwd[i, start:end] = True
            fwd_whole[i, start:whole] = True
        bwd, bwd_whole = np.zeros((nq, nk), bool), np.zeros((nq, nk), bool)
        for j in range(nk):
            start, whole, stop = map(int, bw._query_blocks(plan, j, limit, nq))
            assert 0 <= start <= whole <= stop <= nq, (T, S, qb, kb, length, j)
            bwd[start:stop, j] = True
            bwd_whole[whole:stop, j] = True
        # Tiles run without the causal / window / length mask must have every pair visible.
        whole = np.where(rows < T, visible, True).reshape(nq, qb, nk, kb).all(axis=(1, 3))
        assert np.all(whole[fwd_whole]) and np.all(whole[bwd_whole]), (T, S, qb, kb, length)
        assert np.all(fwd[fwd_whole]) and np.all(bwd[bwd_whole])
        # Every needed tile is visited; a visited tile that is not needed may only be one
        # whose rows are all padding (T not a multiple of the query block), or with a right
        # window, partly padding (the bounds see the padded rows' band).
        assert np.all(fwd[needed]) and np.all(bwd[needed])
        last_row = np.arange(1, nq + 1) * qb if window and window[1] else np.arange(nq) * qb + 1
        real_rows = (last_row <= T)[:, None]
        assert not np.any(fwd & ~needed & real_rows), (T, S, qb, kb, length)
        assert not np.any(bwd & ~needed & real_rows), (T, S, qb, kb, length)
    if causal and window is None:  # T = S = 512 in 64 x 64 tiles: 36 of 64 tiles, about half
        plan = bw.Plan(query_block=64, key_block=64, scale=1.0, causal=True)
        bounds = [tuple(map(int, bw._key_blocks(plan, i, None, 8))) for i in range(8)]
        assert sum(end - start for start, _, end in bounds) == 36
        # Only the 8 diagonal tiles pay for the causal mask.
        assert sum(whole - start for start, whole, _ in bounds) == 28


def test_keys_past_the_length_are_never_read(rng):
    # NaN in whole key tiles past the length: visiting any of them would poison the output
    # (0 * NaN = NaN) or the gradients.
    q, k, v = _inputs(rng, 1, 2, 24, 64, 8, 8)
    k[..., 32:, :] = np.nan
    v[..., 32:, :] = np.nan
    lengths = np.array([[20, 32]])

    def f(q, k, v):
        return bw.blockwise_attention(q, k, v, scale=8**-0.5, kv_lengths=lengths, **BLOCKS)

    out = f(q, k, v)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g[..., :32, :])) for g in grads)
    with jax.enable_x64(True):
        ref = dense_f64(q, k[..., :32, :], v[..., :32, :], lengths=lengths)
    assert rel_err(out, ref) <= F32_TOL


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
@pytest.mark.parametrize("causal", [False, True])
def test_is_causal_and_lengths_equal_jax_nn(impl, causal, rng):
    """The structural masks through the public [..., T, N, H] interface, against
    jax.nn.dot_product_attention's own is_causal / key_value_seq_lengths."""
    B, T, S, N, H = 2, 300, 300, 2, 8  # 300: two CPU query tiles (256 + 44)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k = rng.standard_normal((B, S, N, H)).astype(np.float32)
    v = rng.standard_normal((B, S, N, H)).astype(np.float32)
    lengths = np.array([S, 123], np.int32)
    ours = aj.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                    implementation=impl)  # fmt: skip
    theirs = jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                          key_value_seq_lengths=lengths)  # fmt: skip
    assert rel_err(ours, theirs) <= F32_TOL


def test_auto_picks_blockwise_on_cpu_for_long_sequences_and_xla_for_short():
    pick = lambda T, weights=False: dispatch.choose_implementation(  # noqa: E731
        backend="cpu", T=T, S=T, num_heads=8, want_weights=weights, kernel_reasons={}
    )
    assert pick(128) == "xla" and pick(2048) == "blockwise"
    assert pick(2048, weights=True) == "xla"  # the dense path forms the weights anyway
    # None (forward_mode=True) must serve jvp: the autodiff variant, never the custom VJP.
    cpu = dict(backend="cpu", T=2048, S=2048, num_heads=8, want_weights=False)
    assert dispatch.choose_implementation(**cpu, kernel_reasons={}, forward_mode=True) == (
        "blockwise_autodiff"
    )
    gpu = dict(backend="gpu", T=4096, S=4096, num_heads=64, want_weights=False)
    assert (
        dispatch.choose_implementation(**gpu, kernel_reasons={"cudnn": None, "pallas": None})
        == (dispatch.GPU_KERNEL_PREFERENCE[0])
    )
    refused = {"cudnn": "needs bf16", "pallas": "needs bf16"}
    assert (
        dispatch.choose_implementation(**gpu, kernel_reasons=refused) == "blockwise"
    )  # 4 GiB dense
    small = dict(gpu, T=512, S=512)
    assert dispatch.choose_implementation(**small, kernel_reasons=refused) == "xla"


def test_long_sequence_forward_is_finite_and_matches_dense_rows(rng):
    # T = 4096 in the default CPU tiles: spot-check 64 query rows against the dense formula.
    T, N, H = 4096, 2, 16
    q = rng.standard_normal((1, T, N, H)).astype(np.float32)
    k = rng.standard_normal((1, T, N, H)).astype(np.float32)
    v = rng.standard_normal((1, T, N, H)).astype(np.float32)
    out = aj.dot_product_attention(q, k, v, is_causal=True, implementation="blockwise")
    rows = rng.choice(T, 64, replace=False)
    with jax.enable_x64(True):
        heads = lambda x: np.moveaxis(x, 1, 2)  # noqa: E731  [B, T, N, H] -> [B, N, T, H]
        causal = np.arange(T)[rows][:, None] >= np.arange(T)[None, :]  # [64, T]
        ref = dense_f64(heads(q)[:, :, rows], heads(k), heads(v), mask=causal)
    assert rel_err(heads(np.asarray(out))[:, :, rows], ref) <= F32_TOL
