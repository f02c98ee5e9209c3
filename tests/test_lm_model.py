"""The decoder-only LM's knobs and prefill, against independent references.

- RMSNorm, SwiGLU, grouped-query attention, bias-free projections and the untied output
  layer: float64 NumPy written from the papers' equations (torch / transformers are not in
  the test environment) and hand-counted parameters.
- Prefill: a prompt block through the KV cache, then one token at a time, gives the full
  forward's logits at every position (1e-5, float32), for prompts of different lengths in
  one batch; generation at temperature 0 is the argmax of the full model recomputed at
  every step, also with a limit of new tokens per row.
- ``logit_positions``: the logits at chosen positions equal the full logits gathered there
  (1e-6).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import Transformer, TransformerConfig, TransformerLM
from attention_jax.data.tokenizer import EOS_ID
from attention_jax.decode import decoding
from attention_jax.nn.layers import FeedForward, MultiHeadAttention, normalization
from attention_jax.nn.model import shift_right

V = 30
KNOBS = {
    "paper": {},
    "rotary-preln": {"positional": "rotary", "pre_ln": True},
    "learned": {"positional": "learned"},
    "llama-like": {
        "norm": "rmsnorm",
        "feed_forward": "swiglu",
        "attention_bias": False,
        "tie_output_embedding": False,
        "pre_ln": True,
        "positional": "rotary",
    },
    "gqa": {"num_kv_heads": 2},
    "mqa": {"num_kv_heads": 1, "positional": "rotary"},
}


def _cfg(**overrides):
    return TransformerConfig.tiny(vocab_size=V, max_len=16, dropout_rate=0.0, **overrides)


def _params(module, *args, seed=0):
    return nn.unbox(module.init(jax.random.key(seed), *args)["params"])


def _count(params):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ---- Config: defaults and bad values. ---------------------------------------------------


def test_defaults_are_the_paper():
    cfg = TransformerConfig.base()
    assert (cfg.num_kv_heads, cfg.kv_heads, cfg.norm, cfg.feed_forward) == (
        None, 8, "layernorm", "mlp",
    )  # fmt: skip
    assert cfg.attention_bias is True and cfg.tie_output_embedding is None and cfg.tied_output
    assert not TransformerConfig.base(share_embeddings=False).tied_output  # as before


BAD = [
    ("num_kv_heads", 0, "None or a positive int"),
    ("num_kv_heads", "2", "None or a positive int"),
    ("norm", "batchnorm", "one of ('layernorm', 'rmsnorm')"),
    ("feed_forward", "geglu", "one of ('mlp', 'swiglu')"),
    ("attention_bias", "False", "True or False"),
    ("attention_bias", 0, "True or False"),
    ("tie_output_embedding", "yes", "None, True or False"),
]


@pytest.mark.parametrize(("field", "value", "expected"), BAD)
def test_bad_values_name_field_expected_and_got(field, value, expected):
    message = f"TransformerConfig.{field} must be {expected}, got {value!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        _cfg(**{field: value})


def test_kv_heads_must_divide_heads():
    with pytest.raises(ValueError, match=r"num_kv_heads=3 must divide num_heads=4"):
        _cfg(num_kv_heads=3)


# ---- Parameter counts, by hand. ---------------------------------------------------------


def _lm_count(cfg):
    """Hand count of a TransformerLM's parameters."""
    D, F, L, H, K = cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.head_dim, cfg.kv_heads
    b = 1 if cfg.attention_bias else 0
    attention = (D * D + b * D) * 2 + (D * K * H + b * K * H) * 2  # W_Q, W_O; W_K, W_V
    ffn = 3 * D * F if cfg.feed_forward == "swiglu" else 2 * D * F + F + D
    norm = D if cfg.norm == "rmsnorm" else 2 * D
    output = 0 if cfg.tied_output else D * V + V
    final = norm if cfg.pre_ln else 0
    table = cfg.max_len * D if cfg.positional == "learned" else 0
    return V * D + table + L * (attention + ffn + 2 * norm) + final + output


@pytest.mark.parametrize("name", KNOBS)
def test_lm_parameter_count_by_hand(name):
    cfg = _cfg(**KNOBS[name])
    params = _params(TransformerLM(cfg), jnp.zeros((1, 4), jnp.int32))
    assert _count(params) == _lm_count(cfg)


def test_default_lm_count_is_unchanged():
    # The paper's layer, counted before these options existed: 4(D²+D) + 2DF+F+D + 2·2D.
    cfg = _cfg()
    D, F = cfg.d_model, cfg.d_ff
    params = _params(TransformerLM(cfg), jnp.zeros((1, 4), jnp.int32))
    assert _count(params) == V * D + 2 * (4 * (D * D + D) + 2 * D * F + F + D + 4 * D)


def test_bias_free_projections_have_no_bias():
    params = _params(TransformerLM(_cfg(attention_bias=False)), jnp.zeros((1, 4), jnp.int32))
    attn = params["decoder"]["layer_0"]["self_attention"]
    assert sorted(attn) == ["key", "out", "query", "value"]
    assert all(list(attn[name]) == ["kernel"] for name in attn)
    # The feed-forward keeps its biases ('mlp'): the option is about attention only.
    assert "bias" in params["decoder"]["layer_0"]["feed_forward"]["wi"]


# ---- Attention: grouped-query and bias-free, against float64 NumPy. ---------------------


def _mha_reference(p, x, num_heads):
    """Float64 multi-head attention from the paper's equations, with the key/value heads
    repeated to the query heads (GQA: head n reads kv head n // (N / K))."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def proj(name):
        y = np.einsum("BTD,DNH->BTNH", x, p[name]["kernel"])
        return y + p[name]["bias"] if "bias" in p[name] else y

    q, k, v = proj("query"), proj("key"), proj("value")
    K = k.shape[2]
    k, v = np.repeat(k, num_heads // K, axis=2), np.repeat(v, num_heads // K, axis=2)
    s = np.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    heads = np.einsum("BNTS,BSNH->BTNH", w, v)
    out = np.einsum("BTNH,NHD->BTD", heads, p["out"]["kernel"])
    return out + p["out"]["bias"] if "bias" in p["out"] else out


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention_bias": False},
        {"num_kv_heads": 2},
        {"num_kv_heads": 1, "attention_bias": False},
    ],
    ids=["mha", "no-bias", "gqa", "mqa-no-bias"],
)
def test_attention_equals_float64_reference(overrides):
    cfg = _cfg(**overrides)
    attn = MultiHeadAttention(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))
    params = nn.unbox(attn.init(jax.random.key(0), x, x, None, deterministic=True)["params"])
    # Biases start at zero: make them count.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(
        tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )
    K, H = cfg.kv_heads, cfg.head_dim
    assert params["key"]["kernel"].shape == params["value"]["kernel"].shape == (32, K, H)
    got = attn.apply({"params": params}, x, x, None, deterministic=True)
    np.testing.assert_allclose(got, _mha_reference(params, x, cfg.num_heads), atol=1e-5)


# ---- RMSNorm and SwiGLU, against float64 NumPy. -----------------------------------------


def test_rmsnorm_equals_the_papers_formula():
    """Zhang & Sennrich (2019), eq. 4: ā_i = a_i / RMS(a) · g_i, RMS(a) = sqrt(mean(a²) + ε)
    (ε inside the root, as LLaMA's and T5's implementations have it); no centring, no
    bias."""
    cfg = _cfg(norm="rmsnorm", layer_norm_epsilon=1e-5)
    norm = normalization(cfg, "norm")
    x = 3.0 * jax.random.normal(jax.random.key(2), (2, 5, cfg.d_model)) + 1.0
    params = _params(norm, x)
    assert list(params) == ["scale"]  # no bias
    g = jax.random.normal(jax.random.key(3), (cfg.d_model,))
    got = norm.apply({"params": {"scale": g}}, x)
    a = np.asarray(x, np.float64)
    want = a / np.sqrt(np.mean(a**2, axis=-1, keepdims=True) + 1e-5) * np.asarray(g, np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_swiglu_equals_the_papers_formula():
    """Shazeer (2020), eq. 6: FFN_SwiGLU(x) = (Swish_1(xW) ⊗ xV) W2, no biases;
    Swish_1(z) = z·σ(z)."""
    cfg = _cfg(feed_forward="swiglu", d_ff=48)
    ffn = FeedForward(cfg)
    x = jax.random.normal(jax.random.key(4), (2, 5, cfg.d_model))
    params = _params(ffn, x)
    assert {k: v["kernel"].shape for k, v in params.items()} == {
        "wi_0": (32, 48), "wi_1": (32, 48), "wo": (48, 32),
    }  # fmt: skip
    assert all(list(v) == ["kernel"] for v in params.values())
    got = ffn.apply({"params": params}, x)
    a = np.asarray(x, np.float64)
    W, Vm, W2 = (np.asarray(params[n]["kernel"], np.float64) for n in ("wi_0", "wi_1", "wo"))
    z = a @ W
    want = (z / (1.0 + np.exp(-z)) * (a @ Vm)) @ W2
    np.testing.assert_allclose(got, want, atol=1e-5)


# ---- The untied output layer. -----------------------------------------------------------


def _last_hidden(model, params, tokens):
    """The decoder's output before the pre-softmax projection (y [B, T, D])."""
    _, state = model.apply({"params": params}, tokens, capture_intermediates=True)
    cfg = model.config
    inter = state["intermediates"]["decoder"]
    if cfg.pre_ln:
        return inter["final_norm"]["__call__"][0]
    return inter[f"layer_{cfg.num_layers - 1}"]["__call__"][0]


@pytest.mark.parametrize("pre_ln", [False, True])
def test_untied_output_is_a_separate_matrix(pre_ln):
    cfg = _cfg(tie_output_embedding=False, pre_ln=pre_ln)
    model = TransformerLM(cfg)
    tokens = jnp.array([[0, 5, 6, 7], [0, 9, 3, 2]])
    params = _params(model, tokens)
    W, b = params["decoder"]["logits"]["kernel"], params["decoder"]["logits"]["bias"]
    assert W.shape == (cfg.d_model, V) and b.shape == (V,)
    params["decoder"]["logits"]["bias"] = b + 0.5 * jax.random.normal(jax.random.key(5), (V,))
    y = np.asarray(_last_hidden(model, params, tokens), np.float64)
    want = y @ np.asarray(W, np.float64) + np.asarray(params["decoder"]["logits"]["bias"])
    got = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # ... and the embedding is not it: tied logits are y · Eᵀ, which differ.
    E = np.asarray(params["embedding"]["embedding"], np.float64)
    assert np.max(np.abs(np.asarray(got) - y @ E.T)) > 0.1


def test_tied_lm_logits_are_the_embedding_transposed():
    model = TransformerLM(_cfg())
    tokens = jnp.array([[0, 5, 6, 7]])
    params = _params(model, tokens)
    assert "logits" not in params["decoder"]
    y = np.asarray(_last_hidden(model, params, tokens), np.float64)
    E = np.asarray(params["embedding"]["embedding"], np.float64)
    np.testing.assert_allclose(model.apply({"params": params}, tokens), y @ E.T, atol=1e-5)


def test_transformer_tie_overrides_share_embeddings():
    src, tgt = jnp.array([[5, 6, 7]]), jnp.array([[8, 9, 1]])
    shared_untied = _params(Transformer(_cfg(tie_output_embedding=False)), src, tgt)
    assert "logits" in shared_untied["decoder"] and "target_embedding" not in shared_untied
    unshared_tied = _params(
        Transformer(_cfg(share_embeddings=False, target_vocab_size=40, tie_output_embedding=True)),
        src,
        tgt,
    )
    assert "logits" not in unshared_tied["decoder"]
    assert unshared_tied["target_embedding"]["embedding"].shape == (40, 32)


# ---- Logits at chosen positions == the full logits gathered there. ----------------------

B, T = 4, 12


def _tokens(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(2, V, size=(B, T)).astype(np.int32)  # no pad, no EOS inside
    return np.asarray(shift_right(y))  # [B, T]: pad start slot, then the tokens


AT = np.array([[0, 11], [5, 5], [11, 3], [7, 1]], np.int32)  # [B, K]: any order, repeats


@pytest.mark.parametrize("name", ["paper", "llama-like"])  # tied post-LN; untied, final norm
def test_logit_positions_gather_the_full_logits(name):
    model = TransformerLM(_cfg(**KNOBS[name]))
    x = _tokens(2)
    params = _params(model, x)

    @jax.jit  # all in one (eager and jitted float32 differ by rounding, ~1e-6, on their own)
    def run(params):
        apply = functools.partial(model.apply, {"params": params}, x)
        # Two per row, and one per row (what a prefill asks for: [B, 1, V]).
        return apply(), apply(logit_positions=AT), apply(logit_positions=AT[:, 1:])

    full, two, one = map(np.asarray, run(params))  # [B, T, V], [B, 2, V], [B, 1, V]
    rows = np.arange(B)[:, None]
    np.testing.assert_allclose(two, full[rows, AT], atol=1e-6, rtol=0)
    np.testing.assert_allclose(one, full[rows, AT[:, 1:]], atol=1e-6, rtol=0)
    # The parameters do not depend on it (checkpoints load either way).
    init = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, logit_positions=AT), x)
    shapes = jax.tree.map(lambda a: a.shape, nn.unbox(init["params"]))
    assert shapes == jax.tree.map(lambda a: a.shape, params)


def test_transformer_decode_logit_positions():
    model = Transformer(_cfg(share_embeddings=False))
    src = _tokens(3)[:, :7]
    y = _tokens(4)
    params = _params(model, src, y)

    @jax.jit
    def decode(params):
        encoded = model.apply({"params": params}, src, method="encode")
        apply = functools.partial(model.apply, {"params": params}, encoded, src, y, method="decode")
        return apply(), apply(logit_positions=AT)

    full, got = map(np.asarray, decode(params))  # [B, T, V], [B, K, V]
    np.testing.assert_allclose(got, full[np.arange(B)[:, None], AT], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("at", "message"),
    [
        (
            np.zeros((B,), np.int32),
            r"logit_positions must be integer \[B=4, K\] .* got shape \(4,\)",
        ),
        (np.zeros((B, 0), np.int32), r"with K >= 1 .* got shape \(4, 0\)"),
        (np.zeros((B, 1), np.float32), r"got shape \(4, 1\) and dtype float32"),
        (np.full((B, 1), T), r"logit_positions must be in \[0, T=12\).*max 12"),
        (np.full((B, 1), -1), r"logit_positions must be in \[0, T=12\).*got min -1"),
    ],
)
def test_bad_logit_positions_are_refused(at, message):
    model = TransformerLM(_cfg())
    x = _tokens(0)
    params = _params(model, x)
    with pytest.raises(ValueError, match=message):
        model.apply({"params": params}, x, logit_positions=at)


# ---- Prefill + decode == the full forward. ----------------------------------------------

PROMPT_LENGTHS = [3, 7, 1, 5]  # positions each row prefills (its start slot included)


@pytest.mark.parametrize("name", KNOBS)
def test_prefill_then_decode_equals_full_forward(name):
    cfg = _cfg(**KNOBS[name])
    model = TransformerLM(cfg)
    x = _tokens(0)
    params = _params(model, x)
    full = np.asarray(model.apply({"params": params}, x))  # [B, T, V]
    _, created = model.apply({"params": params}, jnp.zeros((B, T), jnp.int32), decode=True,
                             mutable=["cache"])  # fmt: skip
    layer = created["cache"]["decoder"]["layer_0"]["self_attention"]
    assert layer["cached_key"].shape == (B, T, cfg.kv_heads, cfg.head_dim)  # K heads

    @jax.jit
    def run(cache, tokens, positions):
        logits, new = model.apply({"params": params, "cache": cache}, tokens,
                                  positions=positions, decode=True, mutable=["cache"])  # fmt: skip
        return logits, new["cache"]

    # The prefill block: each row's prompt, then other tokens (right padding that is not
    # the pad id, so a leak would show).
    P = max(PROMPT_LENGTHS)
    block = np.array(_tokens(1)[:, :P])
    for b, n in enumerate(PROMPT_LENGTHS):
        block[b, :n] = x[b, :n]
    positions = np.broadcast_to(np.arange(P, dtype=np.int32), (B, P))
    logits, cache = run(created["cache"], block, positions)
    for b, n in enumerate(PROMPT_LENGTHS):
        np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-5, err_msg=f"row {b}")
    # The same prefill, projecting only each row's last prompt position (what sampling does).
    last = np.array(PROMPT_LENGTHS)[:, None] - 1  # [B, 1]
    only, _ = model.apply({"params": params, "cache": created["cache"]}, block,
                          positions=positions, decode=True, logit_positions=last,
                          mutable=["cache"])  # fmt: skip
    np.testing.assert_allclose(only[:, 0], full[np.arange(B), last[:, 0]], atol=1e-5)
    # Then one token per call, each row from its own position.
    at = np.array(PROMPT_LENGTHS)
    while np.any(at < T):
        pos = np.minimum(at, T - 1)
        logits, cache = run(cache, x[np.arange(B), pos][:, None], pos[:, None].astype(np.int32))
        for b in np.flatnonzero(at < T):
            np.testing.assert_allclose(logits[b, 0], full[b, at[b]], atol=1e-5,
                                       err_msg=f"row {b}, position {at[b]}")  # fmt: skip
        at += 1


def test_decode_positions_outside_the_cache_are_refused():
    model = TransformerLM(_cfg())
    x = jnp.zeros((1, 4), jnp.int32)
    params = _params(model, x)
    _, created = model.apply({"params": params}, x, decode=True, mutable=["cache"])
    with pytest.raises(ValueError, match=r"decode positions must be in \[0, 4\).*max 5"):
        model.apply({"params": params, "cache": created["cache"]}, x[:, :2],
                    positions=jnp.array([[4, 5]]), decode=True, mutable=["cache"])  # fmt: skip


# ---- Generation == greedy argmax of the full model, recomputed every step. --------------

PROMPT = np.array(
    [[5, 6, 7, 8, 0], [9, 10, 0, 0, 0], [3, 4, 5, 6, 7], [0, 0, 0, 0, 0]], np.int32
)  # lengths 4, 2, 5, 0 (an empty prompt starts from the start slot alone)


def _greedy_by_full_recompute(model, params, prompt, max_length, max_new=None):
    pad = model.config.pad_id
    lengths = [int(np.argmin(np.append(row != pad, False))) for row in prompt]
    limits = [max_length] * len(prompt) if max_new is None else np.add(lengths, max_new)
    seqs = np.full((len(prompt), max_length), pad, np.int32)
    seqs[:, : prompt.shape[1]] = prompt
    done = np.zeros(len(prompt), bool)
    for t in range(min(lengths), max_length):
        logits = np.asarray(model.apply({"params": params}, shift_right(seqs, pad)))
        for b in range(len(prompt)):
            if t < lengths[b] or t >= limits[b] or done[b]:
                continue
            row = logits[b, t].copy()
            row[pad] = -np.inf  # padding is never generated
            seqs[b, t] = int(np.argmax(row))
            done[b] = seqs[b, t] == EOS_ID
    return seqs


@pytest.mark.parametrize("prefill", [True, False])
@pytest.mark.parametrize("name", ["paper", "llama-like", "gqa"])
def test_greedy_generation_equals_full_recompute(name, prefill):
    cfg = _cfg(**KNOBS[name])
    model = TransformerLM(cfg)
    params = _params(model, jnp.asarray(PROMPT), seed=3)
    got = decoding.generate(model, params, jnp.asarray(PROMPT), jax.random.key(0),
                            max_length=T, temperature=0.0, prefill=prefill)  # fmt: skip
    np.testing.assert_array_equal(got, _greedy_by_full_recompute(model, params, PROMPT, T))


@pytest.mark.parametrize("prefill", [True, False])
def test_greedy_generation_with_per_row_limits_equals_full_recompute(prefill):
    """Each row stops after its own number of new tokens, counted from its prompt."""
    model = TransformerLM(_cfg())
    params = _params(model, jnp.asarray(PROMPT), seed=3)
    max_new = np.array([3, 1, 2, 6], np.int32)  # prompt lengths 4, 2, 5, 0
    got = np.asarray(decoding.generate(model, params, jnp.asarray(PROMPT), jax.random.key(0),
                                       max_length=T, max_new_tokens=max_new, temperature=0.0,
                                       prefill=prefill))  # fmt: skip
    np.testing.assert_array_equal(
        got, _greedy_by_full_recompute(model, params, PROMPT, T, max_new=max_new)
    )
    assert np.all(got[:, 7:] == 0)  # every row ended by column 7 (at 4 + 3 and 5 + 2)
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0"):
        decoding.generate(model, params, jnp.asarray(PROMPT), jax.random.key(0), max_length=T,
                          max_new_tokens=0)  # fmt: skip


@pytest.mark.parametrize("name", ["paper", "gqa"])
def test_sampling_with_prefill_equals_sampling_token_by_token(name):
    """Same key, same ids: prefill changes when the prompt is read, not what is drawn."""
    model = TransformerLM(_cfg(**KNOBS[name]))
    params = _params(model, jnp.asarray(PROMPT), seed=4)
    kw = dict(max_length=T, temperature=1.0, top_k=10, top_p=0.9)
    prompt = jnp.asarray(PROMPT)
    runs = [
        decoding.generate(model, params, prompt, jax.random.key(key), prefill=prefill, **kw)
        for key in (7, 8)
        for prefill in (True, False)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])
    np.testing.assert_array_equal(runs[2], runs[3])
    assert not np.array_equal(runs[0], runs[2])  # and the key matters
    for out in runs:
        for b, n in enumerate([4, 2, 5, 0]):
            np.testing.assert_array_equal(out[b, :n], PROMPT[b, :n])
