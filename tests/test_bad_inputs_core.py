"""Every boundary error of the pure core: the error type and a fragment of its message.

Each case is run eagerly and under ``jax.jit`` (arrays as traced arguments, configuration
closed over): the checks look only at shapes, dtypes and Python values, so the same error
type must come out at trace time.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import attention_f64, rel_err

import attention_jax as aj

B, T, S, N, H = 2, 5, 7, 3, 4
F32 = np.float32


def _arr(*shape, dtype=F32):
    return np.ones(shape, dtype)


Q, K, V = _arr(B, T, N, H), _arr(B, S, N, H), _arr(B, S, N, H)
KEY = jax.random.key(0)
D = 16
PARAMS = aj.init_multi_head_attention(jax.random.key(1), D, 4)  # N = 4, H = 4
X = _arr(B, T, D)

dpa = aj.dot_product_attention
sdpa = aj.scaled_dot_product_attention
mha = aj.multi_head_attention


EINSUMS = dict(qk_attn_weights_einsum=jnp.einsum, attn_weights_value_einsum=jnp.einsum)
DG = jax.lax.dot_general


def _esc(s):
    return re.escape(s)


# (id, fn, args, exception, message fragment (regex)). fn(*args) must raise; args are the
# arrays (traced under jit), everything else is closed over in fn.
CASES = [
    # ---- dot_product_attention: shapes. ----
    (
        "dpa-rank-mismatch-key",
        lambda q, k, v: dpa(q, k, v),
        (Q, _arr(S, N, H), V),
        ValueError,
        r"dot_product_attention: expected query \[\.\.\., T, N, H\].*same rank >= 3",
    ),
    (
        "dpa-rank-mismatch-value",
        lambda q, k, v: dpa(q, k, v),
        (Q, K, _arr(1, B, S, N, H)),
        ValueError,
        "same rank >= 3",
    ),
    (
        "dpa-query-rank-2",
        lambda q, k, v: dpa(q, k, v),
        (_arr(T, H), _arr(S, H), _arr(S, H)),
        ValueError,
        _esc("of the same rank >= 3, got query (5, 4), key (7, 4), value (7, 4)"),
    ),
    (
        "dpa-head-dim-mismatch",
        lambda q, k, v: dpa(q, k, v),
        (Q, _arr(B, S, N, H + 1), V),
        ValueError,
        "dot_product_attention: query and key need the same head dim H",
    ),
    (
        "dpa-batch-dims-mismatch",
        lambda q, k, v: dpa(q, k, v),
        (Q, _arr(B + 1, S, N, H), _arr(B + 1, S, N, H)),
        ValueError,
        r"dot_product_attention: query, key and value need the same batch dims",
    ),
    (
        "dpa-batch-dims-mismatch-value",
        lambda q, k, v: dpa(q, k, v),
        (Q, K, _arr(B + 1, S, N, H)),
        ValueError,
        "same batch dims",
    ),
    (
        "dpa-head-count-mismatch",
        lambda q, k, v: dpa(q, k, v),
        (Q, _arr(B, S, N + 1, H), _arr(B, S, N + 1, H)),
        ValueError,
        r"key/value heads K must divide the query heads N .* got N=3 from query "
        r"\(2, 5, 3, 4\) and K=4 from key \(2, 7, 4, 4\)",
    ),
    (
        "dpa-head-count-mismatch-value",
        lambda q, k, v: dpa(q, k, v),
        (Q, K, _arr(B, S, N + 1, H)),
        ValueError,
        r"key and value need the same number of key/value heads K \(layout \[\.\.\., S, K, "
        r"H\]\), got key \(2, 7, 3, 4\), value \(2, 7, 4, 4\)",
    ),
    (
        "dpa-kv-length-mismatch",
        lambda q, k, v: dpa(q, k, v),
        (Q, K, _arr(B, S + 1, N, H)),
        ValueError,
        _esc("key and value need the same length S, got key (2, 7, 3, 4), value (2, 8, 3, 4)"),
    ),
    (
        "dpa-empty-dim",
        lambda q, k, v: dpa(q, k, v),
        (_arr(B, 0, N, H), K, V),
        ValueError,
        "query has an empty dimension",
    ),
    # ---- dot_product_attention: mask and bias. ----
    (
        "dpa-mask-not-broadcastable",
        lambda q, k, v, m: dpa(q, k, v, mask=m),
        (Q, K, V, np.ones((T, S + 1), bool)),
        ValueError,
        _esc("mask of shape (5, 8) is not broadcastable to [..., N, T, S] = (2, 3, 5, 7)"),
    ),
    (
        "dpa-mask-wrong-layout",  # [B, T, N, S] instead of [B, N, T, S]
        lambda q, k, v, m: dpa(q, k, v, mask=m),
        (Q, K, V, np.ones((B, T, N, S), bool)),
        ValueError,
        _esc("not broadcastable to [..., N, T, S] = (2, 3, 5, 7)"),
    ),
    (
        "dpa-mask-too-many-dims",
        lambda q, k, v, m: dpa(q, k, v, mask=m),
        (Q, K, V, np.ones((1, B, N, T, S), bool)),
        ValueError,
        "mask of shape .* is not broadcastable",
    ),
    (
        "dpa-bias-int",
        lambda q, k, v, b: dpa(q, k, v, bias=b),
        (Q, K, V, np.zeros((T, S), np.int32)),
        TypeError,
        "dot_product_attention: bias must be a floating-point array, got dtype int32",
    ),
    (
        "dpa-bias-bool",
        lambda q, k, v, b: dpa(q, k, v, bias=b),
        (Q, K, V, np.ones((T, S), bool)),
        TypeError,
        "bias must be a floating-point array",
    ),
    (
        "dpa-bias-not-broadcastable",
        lambda q, k, v, b: dpa(q, k, v, bias=b),
        (Q, K, V, np.zeros((N + 1, T, S), F32)),
        ValueError,
        _esc("bias of shape (4, 5, 7) is not broadcastable to [..., N, T, S] = (2, 3, 5, 7)"),
    ),
    # ---- dot_product_attention: dtypes. ----
    (
        "dpa-int-query",
        lambda q, k, v: dpa(q, k, v),
        (Q.astype(np.int32), K, V),
        TypeError,
        "dot_product_attention: query must be a floating-point array, got dtype int32",
    ),
    (
        "dpa-int-key",
        lambda q, k, v: dpa(q, k, v),
        (Q, K.astype(np.int32), V),
        TypeError,
        "key must be a floating-point array",
    ),
    (
        "dpa-bool-value",
        lambda q, k, v: dpa(q, k, v),
        (Q, K, V.astype(bool)),
        TypeError,
        "value must be a floating-point array, got dtype bool",
    ),
    (
        "dpa-int-dtype-arg",
        lambda q, k, v: dpa(q, k, v, dtype=jnp.int32),
        (Q, K, V),
        TypeError,
        "dtype must be a floating-point dtype",
    ),
    # ---- dot_product_attention: the arguments of jax.nn and flax. ----
    (
        "dpa-grouped-query-heads-not-dividing",  # N = 3 query heads, K = 2 key/value heads
        lambda q, k, v: dpa(q, k, v),
        (Q, _arr(B, S, 2, H), _arr(B, S, 2, H)),
        ValueError,
        r"K must divide the query heads N \(grouped-query attention: query head n uses "
        r"key/value head n // \(N // K\)\), got N=3 from query \(2, 5, 3, 4\) and K=2",
    ),
    (
        "dpa-window-negative",
        lambda q, k, v: dpa(q, k, v, local_window_size=(2, -1)),
        (Q, K, V),
        ValueError,
        "local_window_size must be an int >= 0 or a \\(left, right\\) pair",
    ),
    (
        "dpa-window-triple",
        lambda q, k, v: dpa(q, k, v, local_window_size=(1, 2, 3)),
        (Q, K, V),
        ValueError,
        "local_window_size must be",
    ),
    (
        "dpa-query-lengths-float",
        lambda q, k, v: dpa(q, k, v, query_seq_lengths=np.ones(B, F32)),
        (Q, K, V),
        TypeError,
        "query_seq_lengths must be an integer array, got dtype float32",
    ),
    (
        "dpa-query-lengths-shape",
        lambda q, k, v: dpa(q, k, v, query_seq_lengths=np.ones((B, 1), np.int32)),
        (Q, K, V),
        ValueError,
        _esc("query_seq_lengths must have the batch shape (2,) of query"),
    ),
    (
        "dpa-scale-vector",
        lambda q, k, v: dpa(q, k, v, scale=np.ones(2, F32)),
        (Q, K, V),
        TypeError,
        "scale must be a float scalar",
    ),
    (
        "dpa-one-einsum-override",
        lambda q, k, v: dpa(q, k, v, qk_attn_weights_einsum=jnp.einsum),
        (Q, K, V),
        ValueError,
        "qk_attn_weights_einsum and attn_weights_value_einsum must be specified together",
    ),
    (
        "dpa-einsum-override-and-precision",
        lambda q, k, v: dpa(q, k, v, precision="highest", **EINSUMS),
        (Q, K, V),
        ValueError,
        "are mutually exclusive",
    ),
    (
        "dpa-blockwise-einsum-override",
        lambda q, k, v: dpa(q, k, v, implementation="blockwise", **EINSUMS),
        (Q, K, V),
        ValueError,
        "implementation='blockwise' cannot take qk_attn_weights_einsum/attn_weights_value_einsum;"
        " use implementation='xla'",
    ),
    (
        "dpa-blockwise-einsum-dot-general",
        lambda q, k, v: dpa(q, k, v, implementation="blockwise_autodiff", einsum_dot_general=DG),
        (Q, K, V),
        ValueError,
        "cannot take einsum_dot_general; use implementation='xla'",
    ),
    (
        "dpa-dropout-default-needs-rng",
        lambda q, k, v: dpa(q, k, v, dropout_rate=0.1),  # flax's deterministic=False default
        (Q, K, V),
        ValueError,
        "dropout_rate=0.1 with deterministic=False needs a dropout_rng",
    ),
    # ---- dot_product_attention: configuration. ----
    (
        "dpa-bad-implementation",
        lambda q, k, v: dpa(q, k, v, implementation="flash"),
        (Q, K, V),
        ValueError,
        _esc(
            "implementation must be one of ('xla', 'blockwise', 'blockwise_autodiff', 'cudnn', "
            "'pallas', 'auto') or None, got 'flash'"
        ),
    ),
    (
        "dpa-cudnn-on-cpu",
        lambda q, k, v: dpa(q, k, v, implementation="cudnn"),
        (Q, K, V),
        ValueError,
        "implementation='cudnn' cannot run here: cudnn needs an NVIDIA GPU",
    ),
    (
        "dpa-pallas-on-cpu",
        lambda q, k, v: dpa(q, k, v, implementation="pallas"),
        (Q, K, V),
        ValueError,
        "implementation='pallas' cannot run here: pallas kernels need a GPU or TPU",
    ),
    (
        "dpa-float-lengths",
        lambda q, k, v: dpa(q, k, v, key_value_seq_lengths=jnp.ones((B,))),
        (Q, K, V),
        TypeError,
        "key_value_seq_lengths must be an integer array, got dtype float32",
    ),
    (
        "dpa-lengths-shape",
        lambda q, k, v: dpa(q, k, v, key_value_seq_lengths=jnp.ones((B, N), jnp.int32)),
        (Q, K, V),
        ValueError,
        _esc(f"key_value_seq_lengths must have the batch shape ({B},) of query"),
    ),
    (
        "dpa-dropout-rate-one",
        lambda q, k, v, r: dpa(q, k, v, dropout_rate=1.0, deterministic=False, dropout_rng=r),
        (Q, K, V, KEY),
        ValueError,
        _esc("dropout_rate must be in [0, 1), got 1.0"),
    ),
    (
        "dpa-dropout-rate-above-one",
        lambda q, k, v, r: dpa(q, k, v, dropout_rate=1.5, deterministic=False, dropout_rng=r),
        (Q, K, V, KEY),
        ValueError,
        _esc("dropout_rate must be in [0, 1)"),
    ),
    (
        "dpa-dropout-rate-negative",
        lambda q, k, v, r: dpa(q, k, v, dropout_rate=-0.1, deterministic=False, dropout_rng=r),
        (Q, K, V, KEY),
        ValueError,
        _esc("dropout_rate must be in [0, 1)"),
    ),
    (
        "dpa-dropout-without-rng",
        lambda q, k, v: dpa(q, k, v, dropout_rate=0.1, deterministic=False),
        (Q, K, V),
        ValueError,
        "dropout_rate=0.1 with deterministic=False needs a dropout_rng",
    ),
    # ---- scaled_dot_product_attention (one head). ----
    (
        "sdpa-3d-input",
        lambda q, k, v: sdpa(q, k, v),
        (_arr(T, N, H), _arr(S, N, H), _arr(S, N, H)),
        ValueError,
        r"scaled_dot_product_attention is for one head.*use dot_product_attention",
    ),
    (
        "sdpa-3d-key-only",
        lambda q, k, v: sdpa(q, k, v),
        (_arr(T, H), _arr(1, S, H), _arr(S, H)),
        ValueError,
        "is for one head",
    ),
    (
        "sdpa-1d-query",
        lambda q, k, v: sdpa(q, k, v),
        (_arr(H), _arr(S, H), _arr(S, H)),
        ValueError,
        "is for one head",
    ),
    (
        "sdpa-head-dim-mismatch",
        lambda q, k, v: sdpa(q, k, v),
        (_arr(T, H), _arr(S, H + 2), _arr(S, H)),
        ValueError,
        "scaled_dot_product_attention: query and key need the same head dim H",
    ),
    (
        "sdpa-kv-length-mismatch",
        lambda q, k, v: sdpa(q, k, v),
        (_arr(T, H), _arr(S, H), _arr(S + 1, H)),
        ValueError,
        "scaled_dot_product_attention: key and value need the same length S",
    ),
    (
        "sdpa-mask-not-broadcastable",
        lambda q, k, v, m: sdpa(q, k, v, mask=m),
        (_arr(T, H), _arr(S, H), _arr(S, H), np.ones((S, T), bool)),
        ValueError,
        _esc("mask of shape (7, 5) is not broadcastable to [T, S] = (5, 7)"),
    ),
    (
        "sdpa-bias-int",
        lambda q, k, v, b: sdpa(q, k, v, bias=b),
        (_arr(T, H), _arr(S, H), _arr(S, H), np.zeros((T, S), np.int32)),
        TypeError,
        "scaled_dot_product_attention: bias must be a floating-point array",
    ),
    (
        "sdpa-bias-not-broadcastable",
        lambda q, k, v, b: sdpa(q, k, v, bias=b),
        (_arr(T, H), _arr(S, H), _arr(S, H), np.zeros((2, T, S), F32)),
        ValueError,
        _esc("bias of shape (2, 5, 7) is not broadcastable to [T, S] = (5, 7)"),
    ),
    (
        "sdpa-int-query",
        lambda q, k, v: sdpa(q, k, v),
        (np.ones((T, H), np.int32), _arr(S, H), _arr(S, H)),
        TypeError,
        "scaled_dot_product_attention: query must be a floating-point array",
    ),
    # ---- init_multi_head_attention. ----
    (
        "init-num-heads-not-dividing",
        lambda r: aj.init_multi_head_attention(r, 16, 3),
        (KEY,),
        ValueError,
        _esc("num_heads=3 must divide the attention width qkv_features=16 (d_model)"),
    ),
    (
        "init-num-heads-not-dividing-qkv-features",
        lambda r: aj.init_multi_head_attention(r, 16, 4, qkv_features=18),
        (KEY,),
        ValueError,
        "num_heads=4 must divide the attention width qkv_features=18",
    ),
    (
        "init-zero-heads",
        lambda r: aj.init_multi_head_attention(r, 16, 0),
        (KEY,),
        ValueError,
        "init_multi_head_attention: num_heads must be a positive Python int, got 0",
    ),
    (
        "init-bool-heads",
        lambda r: aj.init_multi_head_attention(r, 16, True),
        (KEY,),
        ValueError,
        "num_heads must be a positive Python int, got True",
    ),
    (
        "init-float-in-features",
        lambda r: aj.init_multi_head_attention(r, 16.0, 4),
        (KEY,),
        ValueError,
        "in_features must be a positive Python int, got 16.0",
    ),
    (
        "init-negative-out-features",
        lambda r: aj.init_multi_head_attention(r, 16, 4, out_features=-1),
        (KEY,),
        ValueError,
        "out_features must be a positive Python int",
    ),
    (
        "init-zero-kv-features",
        lambda r: aj.init_multi_head_attention(r, 16, 4, kv_features=0),
        (KEY,),
        ValueError,
        "kv_features must be a positive Python int",
    ),
    # ---- multi_head_attention. ----
    (
        "mha-num-heads-mismatch",
        lambda p, x: mha(p, x, num_heads=2),
        (PARAMS, X),
        ValueError,
        _esc("query kernel must be [D, N=2, H], got (16, 4, 4); num_heads=2 does not match"),
    ),
    (
        "mha-inputs-q-features-mismatch",
        lambda p, x: mha(p, x, num_heads=4),
        (PARAMS, _arr(B, T, D + 1)),
        ValueError,
        _esc("multi_head_attention: inputs_q must be [..., T, D=16], got (2, 5, 17)"),
    ),
    (
        "mha-inputs-q-rank-1",
        lambda p, x: mha(p, x, num_heads=4),
        (PARAMS, _arr(D)),
        ValueError,
        _esc("inputs_q must be [..., T, D=16], got (16,)"),
    ),
    (
        "mha-inputs-kv-features-mismatch",
        lambda p, x, y: mha(p, x, y, num_heads=4),
        (PARAMS, X, _arr(B, S, D - 1)),
        ValueError,
        _esc("inputs_kv must be [..., S, D=16] with the rank of inputs_q (2, 5, 16)"),
    ),
    (
        "mha-inputs-kv-rank-mismatch",
        lambda p, x, y: mha(p, x, y, num_heads=4),
        (PARAMS, X, _arr(S, D)),
        ValueError,
        "inputs_kv must be",
    ),
    (
        "mha-params-missing-out",
        lambda p, x: mha(p, x, num_heads=4),
        ({k: v for k, v in PARAMS.items() if k != "out"}, X),
        ValueError,
        "multi_head_attention: params must hold 'out'",
    ),
    (
        "mha-params-missing-kernel",
        lambda p, x: mha(p, x, num_heads=4),
        ({**PARAMS, "key": {"bias": PARAMS["key"]["bias"]}}, X),
        ValueError,
        "params must hold 'key'",
    ),
    (
        "mha-mask-not-broadcastable",
        lambda p, x, m: mha(p, x, num_heads=4, mask=m),
        (PARAMS, X, np.ones((B, 3, T, T), bool)),
        ValueError,
        _esc("mask of shape (2, 3, 5, 5) is not broadcastable to [..., N, T, S] = (2, 4, 5, 5)"),
    ),
    (
        "mha-dropout-without-rng",
        lambda p, x: mha(p, x, num_heads=4, dropout_rate=0.2, deterministic=False),
        (PARAMS, X),
        ValueError,
        "needs a dropout_rng",
    ),
    (
        "mha-bad-implementation",
        lambda p, x: mha(p, x, num_heads=4, implementation="flash"),
        (PARAMS, X),
        ValueError,
        "implementation must be one of",
    ),
]


@pytest.mark.parametrize(("fn", "args", "exc", "match"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_raises_eagerly(fn, args, exc, match):
    with pytest.raises(exc, match=match):
        fn(*args)


@pytest.mark.parametrize(("fn", "args", "exc", "match"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_raises_at_trace_time_under_jit(fn, args, exc, match):
    with pytest.raises(exc, match=match):
        jax.jit(fn)(*args)


def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_traced_dropout_rate_is_rejected():
    f = jax.jit(
        lambda q, k, v, rate: dpa(q, k, v, dropout_rate=rate, deterministic=False, dropout_rng=KEY)
    )
    with pytest.raises(TypeError, match="dropout_rate must be a Python float, got a traced value"):
        f(Q, K, V, 0.1)


# ---- Just inside the boundaries: accepted, and right. ---------------------------------


def test_valid_boundary_inputs_are_accepted(rng):
    q = rng.standard_normal((B, T, N, H)).astype(F32)
    k = rng.standard_normal((B, S, N, H)).astype(F32)
    v = rng.standard_normal((B, S, N, 6)).astype(F32)  # V != H is fine
    ref = attention_f64(q, k, v)[0]
    # Rate 0 with deterministic=False needs no rng; a rate with deterministic=True is ignored.
    assert rel_err(dpa(q, k, v, dropout_rate=0.0, deterministic=False), ref) <= 1e-5
    assert rel_err(dpa(q, k, v, dropout_rate=0.9, deterministic=True), ref) <= 1e-5
    # A mask of lower rank that broadcasts (keys only), and a per-head [N, 1, 1] bias.
    keys = np.arange(S) < 4
    bias = np.zeros((N, 1, 1), F32)
    out = dpa(q, k, v, mask=keys, bias=bias)
    assert rel_err(out, attention_f64(q, k, v, mask=keys)[0]) <= 1e-5
    # None / 'auto' (the backend default) and each implementation this device can run
    # (the fused kernels' refusals on CPU are in tests/test_kernels.py).
    for impl in (None, "auto", "xla", "blockwise", "blockwise_autodiff"):
        assert rel_err(dpa(q, k, v, implementation=impl), ref) <= 1e-5
