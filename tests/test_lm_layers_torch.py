"""The decoder-only LM's knobs against torch, a reference written by other people.

Each layer runs in float64 (``jax.enable_x64`` around it, the module's ``dtype`` and
``param_dtype`` float64) on the parameters flax initialised, and the same parameters are
copied into torch (float64, CPU):

- RMSNorm: ``torch.nn.RMSNorm(D, eps=config.layer_norm_epsilon)`` (torch's ε is inside the
  root, ``x / sqrt(mean(x²) + ε) · g``, as flax's; torch's default ε is the dtype's machine
  epsilon, so the config's is passed), at an input scale where ε matters;
- SwiGLU: ``(F.silu(x @ W1) * (x @ W3)) @ W2`` with W1 = ``wi_0``, W3 = ``wi_1``,
  W2 = ``wo``;
- attention without bias and grouped-/multi-query attention inside `MultiHeadAttention`:
  the projections in torch and ``F.scaled_dot_product_attention(..., enable_gqa=True)``
  (query head n reads key/value head n // (N / K) there too), causal and with a padding
  mask;
- the output layer: untied logits ``torch.nn.Linear`` with our W [D, V] and b, tied logits
  ``F.linear(y, E) = y @ Eᵀ``, on the final hidden state y of a `TransformerLM`.

Tolerance: 1e-12 absolute (float64 on both sides; the values are O(1)).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_jax import TransformerConfig, TransformerLM
from attention_jax.nn.layers import FeedForward, MultiHeadAttention, normalization

torch = pytest.importorskip("torch")
F = torch.nn.functional

TOL = 1e-12  # float64 on both sides
V = 40
B, T, D = 2, 6, 32


def _cfg(**overrides):
    """A tiny float64 model (4 heads, H = 8)."""
    return TransformerConfig.tiny(
        vocab_size=V, max_len=16, dropout_rate=0.0, dtype=jnp.float64, param_dtype=jnp.float64,
        **overrides,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _t(a) -> "torch.Tensor":
    return torch.from_numpy(np.array(a, np.float64))


def _init(module, *args, **kwargs):
    params = nn.unbox(module.init(jax.random.key(0), *args, **kwargs)["params"])
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(params))
    return params


def _perturbed(params, seed):
    """Every parameter plus noise: biases start at 0 and scales at 1, which would hide a
    bias or a scale applied in the wrong place."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [
        a + 0.1 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, noisy)


def _x(seed, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), (B, T, D), jnp.float64)


# ---- RMSNorm ---------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon", [1e-6, 1e-2], ids=["config-default", "large-eps"])
def test_rmsnorm_equals_torch_rmsnorm(epsilon):
    cfg = _cfg(norm="rmsnorm", layer_norm_epsilon=epsilon)
    assert TransformerConfig.tiny().layer_norm_epsilon == 1e-6  # the default tested first
    # Mean square about 1e-4 (scale 1e-2): ε = 1e-2 dominates it, ε = 1e-6 is 1% of it, so
    # either ε would show if it were outside the root or left out.
    x = _x(1, scale=1e-2)
    norm = normalization(cfg, "norm")
    params = _perturbed(_init(norm, x), seed=2)
    assert list(params) == ["scale"]
    got = np.asarray(norm.apply({"params": params}, x))

    ref = torch.nn.RMSNorm(D, eps=epsilon, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(_t(params["scale"]))
        want = ref(_t(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # The test tells the placements of ε apart: ε outside the root, or torch's default ε
    # (machine epsilon), differ by far more than TOL.
    a, g = np.asarray(x), np.asarray(params["scale"])
    outside = a / (np.sqrt(np.mean(a**2, -1, keepdims=True)) + epsilon) * g
    default = torch.nn.RMSNorm(D, dtype=torch.float64)
    with torch.no_grad():
        default.weight.copy_(_t(g))
        default_eps = default(_t(x)).numpy()
    assert np.max(np.abs(got - outside)) > 1e-4
    assert np.max(np.abs(got - default_eps)) > 1e-6


# ---- SwiGLU ----------------------------------------------------------------------------


def test_swiglu_equals_torch_composition():
    cfg = _cfg(feed_forward="swiglu", d_ff=48)
    ffn = FeedForward(cfg)
    x = _x(3)
    params = _init(ffn, x)
    assert {k: v["kernel"].shape for k, v in params.items()} == {
        "wi_0": (D, 48), "wi_1": (D, 48), "wo": (48, D),
    }  # fmt: skip
    assert all(list(v) == ["kernel"] for v in params.values())  # no biases
    got = np.asarray(ffn.apply({"params": params}, x))

    W1, W3, W2 = (_t(params[name]["kernel"]) for name in ("wi_0", "wi_1", "wo"))
    xt = _t(x)
    want = ((F.silu(xt @ W1) * (xt @ W3)) @ W2).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


# ---- Attention: no bias, grouped- and multi-query ---------------------------------------


def _torch_attention(params, x, mask, *, causal, num_heads):
    """Multi-head attention in torch from our parameters: projections [D, N|K, H], then
    ``F.scaled_dot_product_attention(enable_gqa=True)`` on [B, N|K, T, H], then W_O
    [N, H, D]."""
    xt = _t(x)

    def project(name):  # [B, T, D] -> [B, N|K, T, H]
        p = params[name]
        y = torch.einsum("btd,dnh->btnh", xt, _t(p["kernel"]))
        if "bias" in p:
            y = y + _t(p["bias"])
        return y.transpose(1, 2)

    q, k, v = project("query"), project("key"), project("value")
    assert q.shape[1] == num_heads
    heads = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None if mask is None else torch.from_numpy(np.asarray(mask)),
        is_causal=causal,
        enable_gqa=True,
    ).transpose(1, 2)  # [B, T, N, H]
    out = torch.einsum("btnh,nhd->btd", heads, _t(params["out"]["kernel"]))
    if "bias" in params["out"]:
        out = out + _t(params["out"]["bias"])
    return out.numpy()


ATTENTION_CASES = {
    "mha": {},
    "no-bias": {"attention_bias": False},
    "gqa": {"num_kv_heads": 2},
    "mqa-no-bias": {"num_kv_heads": 1, "attention_bias": False},
}


@pytest.mark.parametrize("causal", [False, True], ids=["padding-mask", "causal"])
@pytest.mark.parametrize("name", ATTENTION_CASES)
def test_attention_equals_torch_sdpa(name, causal):
    cfg = _cfg(**ATTENTION_CASES[name])
    N, K, H = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    attn = MultiHeadAttention(cfg, causal=causal)
    x = _x(4)
    params = _perturbed(_init(attn, x, x, None, deterministic=True), seed=5)
    assert params["key"]["kernel"].shape == params["value"]["kernel"].shape == (D, K, H)
    has_bias = {n: "bias" in p for n, p in params.items()}
    assert all(v == cfg.attention_bias for v in has_bias.values()), has_bias
    mask = None
    if not causal:  # row 1's last two keys are padding: [B, 1, 1, S], True = attend
        mask = np.ones((B, 1, 1, T), bool)
        mask[1, ..., -2:] = False
    got = np.asarray(attn.apply({"params": params}, x, x, mask, deterministic=True))
    want = _torch_attention(params, x, mask, causal=causal, num_heads=N)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


# ---- The output layer: untied W, tied Eᵀ -----------------------------------------------


def _logits_and_hidden(cfg, tokens):
    """(logits, the decoder's final hidden state y [B, T, D], params) of a TransformerLM
    whose parameters are all perturbed (the untied bias starts at 0)."""
    model = TransformerLM(cfg)
    params = _perturbed(_init(model, tokens), seed=6)
    logits, state = model.apply({"params": params}, tokens, capture_intermediates=True)
    inter = state["intermediates"]["decoder"]
    if cfg.pre_ln:
        y = inter["final_norm"]["__call__"][0]
    else:
        y = inter[f"layer_{cfg.num_layers - 1}"]["__call__"][0]
    return np.asarray(logits), _t(y), params


def test_output_layer_untied_and_tied_equal_torch():
    # Pre-LN (y is the final norm's output), as configs/lm1b.py; the projection does not
    # depend on it, and test_lm_model.py covers post-LN against NumPy.
    pre_ln = True
    tokens = jnp.array([[0, 5, 6, 7, 8], [0, 9, 3, 2, 1]])

    got, y, params = _logits_and_hidden(_cfg(tie_output_embedding=False, pre_ln=pre_ln), tokens)
    W = params["decoder"]["logits"]["kernel"]  # [D, V]
    assert W.shape == (D, V)
    linear = torch.nn.Linear(D, V, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(_t(W).T)  # torch's weight is [V, D]
        linear.bias.copy_(_t(params["decoder"]["logits"]["bias"]))
        want = linear(y).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    E = _t(params["embedding"]["embedding"])  # [V, D]
    assert np.max(np.abs(got - F.linear(y, E).numpy())) > 0.1  # untied is not y @ Eᵀ

    got, y, params = _logits_and_hidden(_cfg(tie_output_embedding=True, pre_ln=pre_ln), tokens)
    assert "logits" not in params["decoder"]
    E = _t(params["embedding"]["embedding"])
    np.testing.assert_allclose(got, F.linear(y, E).numpy(), rtol=0, atol=TOL)
