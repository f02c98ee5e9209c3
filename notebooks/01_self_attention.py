# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Self-attention, step by step
#
# Self-attention lets every token of a sentence look at every other token in one matrix
# product instead of one step at a time. This notebook computes it by hand in NumPy on
# *"I love eating fresh apple in the morning."*, following the four steps of scaled
# dot-product attention in section 3.2.1 of *Attention Is All You Need* (scores, scaling,
# softmax, weighted sum), shows each step as a matrix with token labels, checks why the
# scaling by 1/√d_k matters, and then gets the same numbers from `attention_jax`: one head,
# many heads (section 3.2.2), and the full projected block.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attention-jax/attention_jax/blob/main/notebooks/01_self_attention.ipynb)

# %%
import subprocess
import sys

if "google.colab" in sys.modules:  # on Colab: install the library from GitHub
    package = "attention_jax[notebooks] @ git+https://github.com/attention-jax/attention_jax"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)

import jax
import matplotlib.pyplot as plt
import numpy as np

import attention_jax as aj
from attention_jax import visualize as viz

np.set_printoptions(precision=3, suppress=True)

# %% [markdown]
# ## The sentence and its embeddings
#
# A model first maps each token to a vector of width d_model. Ours is a fixed table of
# random numbers (seed 0, d_model = 16) rather than a trained one, so the attention
# patterns below show the *mechanics*, not linguistics. Training learns the embeddings
# and projections, and with them patterns such as "fresh" attending to "apple".

# %%
tokens = ["I", "love", "eating", "fresh", "apple", "in", "the", "morning", "."]
T, D = len(tokens), 16  # sequence length, d_model
vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
rng = np.random.default_rng(0)
embedding_table = rng.normal(size=(len(vocab), D)).astype(np.float32)  # [V, D]
X = embedding_table[[vocab[t] for t in tokens]]  # [T, D]

viz.matrix_heatmap(X, tokens, xlabel="dimension", ylabel="token", title="embeddings X  [T, D]")
plt.show()

# %% [markdown]
# ## Queries, keys and values
#
# Each token's vector is projected three ways by learned matrices (random here):
# a **query** (what this token is looking for), a **key** (what it offers to be found by)
# and a **value** (what it passes on when attended to). The paper's d_k is the width of
# queries and keys; we use d_k = d_v = 8.

# %%
d_k = 8
W_Q, W_K, W_V = (
    (rng.normal(size=(D, d_k)) / np.sqrt(D)).astype(np.float32) for _ in range(3)
)  # [D, H] each; 1/√D keeps the projections' entries of unit scale
Q, K, V = X @ W_Q, X @ W_K, X @ W_V  # [T, H] each

fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
names = ("Q = X·W_Q  [T, d_k]", "K = X·W_K  [T, d_k]", "V = X·W_V  [T, d_v]")
for ax, M, name in zip(axes, (Q, K, V), names, strict=True):
    viz.matrix_heatmap(M, tokens, ax=ax, title=name, xlabel="dimension")
plt.show()

# %% [markdown]
# ## Step 1: scores Q·Kᵀ
#
# Row t, column s is the dot product of query t with key s: how well token s matches
# what token t is looking for. All T × T pairs come from one matrix product.

# %%
scores = Q @ K.T  # [T, S] (S = T in self-attention)
viz.attention_heatmap(scores, tokens, tokens, title="scores Q·Kᵀ", cmap="RdBu_r")
plt.show()

# %% [markdown]
# ## Step 2: scale by 1/√d_k
#
# If the components of q and k are independent with mean 0 and variance 1, then q·k has
# variance d_k (footnote 4 of the paper), so scores grow like √d_k. Dividing by √d_k
# brings their spread back to about 1, whatever the width.

# %%
scaled = scores / np.sqrt(d_k)  # [T, S]
print(f"std of the scores: {scores.std():.2f} raw, {scaled.std():.2f} scaled (d_k = {d_k})")

# %% [markdown]
# Why it matters: *"for large values of d_k, the dot products grow large in magnitude,
# pushing the softmax function into regions where it has extremely small gradients"*
# (section 3.2.1). Below, random unit-variance queries and keys of growing width d_k, 32
# keys per query. Without scaling the softmax saturates towards one-hot (largest weight
# → 1, entropy → 0) and its Jacobian ∂softmax/∂scores = diag(p) − p·pᵀ goes to zero:
# almost no gradient reaches the scores. With scaling, nothing depends on d_k.


# %%
def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def softmax_stats(logits):
    """Mean largest weight, mean entropy (nats) and mean Frobenius norm of the Jacobian."""
    p = softmax(logits)  # [M, S]
    entropy = -(p * np.log(np.maximum(p, 1e-30))).sum(-1)  # [M]
    jac = np.einsum("ms,st->mst", p, np.eye(p.shape[-1])) - p[:, :, None] * p[:, None, :]
    return p.max(-1).mean(), entropy.mean(), np.linalg.norm(jac, axis=(1, 2)).mean()


demo_rng = np.random.default_rng(1)
widths = [4, 16, 64, 256, 1024]
table = {"unscaled": [], "scaled": []}
print(" d_k | max weight: unscaled  scaled | entropy: unscaled  scaled | ‖J‖: unscaled  scaled")
for width in widths:
    q = demo_rng.normal(size=(256, width))  # [M, d_k]
    k = demo_rng.normal(size=(32, width))  # [S, d_k]
    raw = q @ k.T  # [M, S], std ≈ √d_k
    un, sc = softmax_stats(raw), softmax_stats(raw / np.sqrt(width))
    table["unscaled"].append(un)
    table["scaled"].append(sc)
    print(
        f"{width:4d} |{un[0]:20.3f} {sc[0]:7.3f} |{un[1]:17.3f} {sc[1]:7.3f} |"
        f"{un[2]:14.4f} {sc[2]:7.4f}"
    )

titles = ("mean largest weight", "mean entropy (nats)", "mean ‖∂softmax/∂scores‖")
fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), layout="constrained")
for i, (ax, label) in enumerate(zip(axes, titles, strict=True)):
    for name, style in (("unscaled", "o-"), ("scaled", "s--")):
        ax.plot(widths, [row[i] for row in table[name]], style, label=name)
    ax.set(xscale="log", xlabel="d_k", title=label)
axes[2].set_yscale("log")
axes[0].legend()
plt.show()

# %% [markdown]
# ## Step 3: softmax over the keys
#
# Each row becomes a probability distribution over the keys: the attention weights.
# Row t says how much of each token's value token t will take.

# %%
weights = softmax(scaled)  # [T, S]
np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)  # each row sums to 1
viz.attention_heatmap(weights, tokens, tokens, annotate=True, title="weights = softmax(Q·Kᵀ/√d_k)")
plt.show()

# %% [markdown]
# ## Step 4: weighted sum of the values
#
# Token t's output is Σ_s weights[t, s] · V[s]: a blend of every token's value, weighted by
# relevance. All four steps together are equation (1) of the paper,
# Attention(Q, K, V) = softmax(Q·Kᵀ/√d_k)·V.

# %%
out = weights @ V  # [T, d_v]

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
viz.attention_heatmap(weights, tokens, tokens, ax=axes[0], title="weights  [T, S]")
viz.matrix_heatmap(V, tokens, ax=axes[1], title="V  [S, d_v]", xlabel="dimension")
viz.matrix_heatmap(
    out, tokens, ax=axes[2], title="output = weights·V  [T, d_v]", xlabel="dimension"
)
plt.show()

# %% [markdown]
# ## The same with `attention_jax`
#
# `aj.scaled_dot_product_attention(q [T, H], k [S, H], v [S, Hv])` is exactly these four
# steps for one head (jit-compatible, differentiable) and returns the output and the
# weights. It agrees with the NumPy computation above:

# %%
out_aj, weights_aj = aj.scaled_dot_product_attention(Q, K, V)  # [T, H], [T, S]
np.testing.assert_allclose(out_aj, out, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(weights_aj, weights, rtol=1e-5, atol=1e-6)
print("aj.scaled_dot_product_attention == the hand computation:", out_aj.shape, weights_aj.shape)

# %% [markdown]
# A decoder must not look ahead (section 3.2.3): a boolean mask, `True` = may attend,
# removes the future keys before the softmax, and their weights are exactly 0.

# %%
_, causal_weights = aj.scaled_dot_product_attention(Q, K, V, mask=aj.causal_mask(T))
assert np.all(np.triu(np.asarray(causal_weights), k=1) == 0)  # nothing above the diagonal
viz.attention_heatmap(causal_weights, tokens, tokens, title="with aj.causal_mask(T)")
plt.show()

# %% [markdown]
# ## Many heads at once (section 3.2.2)
#
# Multi-head attention runs h heads in parallel, each with its own projections, so
# different heads can attend to different things. `aj.dot_product_attention` takes the
# layout `[B, T, N, H]` (batch, length, heads, head dim) and maps the one-head function
# over heads and batch with `jax.vmap`; a Python loop over heads gives the same result.

# %%
B, N, H = 1, 2, 8  # batch, heads, head dim: N·H = D, as in the paper (d_k = d_model / h)
W_Qh, W_Kh, W_Vh = (
    (rng.normal(size=(D, N, H)) / np.sqrt(D)).astype(np.float32) for _ in range(3)
)  # [D, N, H] each
x = X[None]  # [B, T, D]
q = np.einsum("BTD,DNH->BTNH", x, W_Qh)  # [B, T, N, H]
k = np.einsum("BTD,DNH->BTNH", x, W_Kh)
v = np.einsum("BTD,DNH->BTNH", x, W_Vh)

heads, head_weights = aj.dot_product_attention(q, k, v, return_weights=True)
# heads [B, T, N, H], head_weights [B, N, T, S]
loop = np.stack(
    [aj.scaled_dot_product_attention(q[0, :, n], k[0, :, n], v[0, :, n])[0] for n in range(N)],
    axis=1,
)  # [T, N, H]
np.testing.assert_allclose(heads[0], loop, rtol=1e-5, atol=1e-6)
print("vmapped heads == loop over heads:", heads.shape, head_weights.shape)

viz.attention_grid(head_weights[0], tokens, tokens, row_names=["self-attention"])
plt.show()

# %% [markdown]
# ## The full block: projections included
#
# MultiHead(Q, K, V) = Concat(head_1, …, head_h)·W_O with
# head_i = Attention(Q·W_Q,i, K·W_K,i, V·W_V,i). `aj.multi_head_attention` is that block as a
# pure function of a parameter pytree (laid out like Flax's `MultiHeadDotProductAttention`),
# and `aj.init_multi_head_attention` makes one. Below, the block agrees with projecting by
# hand, attending per head, and merging with W_O.

# %%
params = aj.init_multi_head_attention(jax.random.key(0), D, num_heads=N)
print(jax.tree.map(np.shape, params))  # kernels [D, N, H] and [N, H, D]
y = aj.multi_head_attention(params, x, num_heads=N)  # [B, T, D]


def project(p, x):  # [B, T, D] -> [B, T, N, H]
    return np.einsum("BTD,DNH->BTNH", x, p["kernel"]) + np.asarray(p["bias"])


by_hand = aj.dot_product_attention(*(project(params[n], x) for n in ("query", "key", "value")))
W_O, b_O = (np.asarray(params["out"][n]) for n in ("kernel", "bias"))  # [N, H, D], [D]
by_hand = np.einsum("BTNH,NHD->BTD", by_hand, W_O) + b_O  # Concat(heads)·W_O
np.testing.assert_allclose(y, by_hand, rtol=1e-5, atol=1e-5)
print("aj.multi_head_attention == Concat(heads)·W_O:", y.shape)

# %% [markdown]
# Every output row was computed from all tokens at once, with no loop over positions: that
# is the parallelism the paper trades recurrence for. What self-attention cannot see is
# *order*; notebook 02 adds it back with positional encodings.
