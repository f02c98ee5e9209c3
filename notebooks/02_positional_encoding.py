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
# # 02 · Positional encoding
#
# Self-attention compares every token with every other token, but nothing in it says
# where a token is: shuffle the words and each word's output is the same vector, merely
# moved. This notebook shows that numerically on "The cat sat on the mat" against "The mat
# sat on the cat", then draws the paper's fix, the sinusoidal positional encodings of
# section 3.5 of *Attention Is All You Need* (their wavelengths, and why nearby positions
# look alike and only the offset between two positions matters), and checks that adding
# them makes the two sentences different to the model.
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/attention-jax/attention_jax/blob/main/notebooks/02_positional_encoding.ipynb)

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

np.set_printoptions(precision=4, suppress=True)

# %% [markdown]
# ## The problem: attention does not see order
#
# Two sentences with the same words in a different order. Embeddings come from a fixed
# random table (seed 0, d_model = 16), and one multi-head self-attention block with random
# parameters (`aj.init_multi_head_attention`, 2 heads) reads them.

# %%
sentence_a = "The cat sat on the mat".split()
sentence_b = "The mat sat on the cat".split()
perm = [0, 5, 2, 3, 4, 1]  # sentence_b[i] == sentence_a[perm[i]]
assert [sentence_a[i] for i in perm] == sentence_b

T, D, N = len(sentence_a), 16, 2  # length, d_model, heads
vocab = {tok: i for i, tok in enumerate(dict.fromkeys(sentence_a))}
rng = np.random.default_rng(0)
embedding_table = rng.normal(size=(len(vocab), D)).astype(np.float32)  # [V, D]
x_a = embedding_table[[vocab[t] for t in sentence_a]]  # [T, D]
x_b = embedding_table[[vocab[t] for t in sentence_b]]  # [T, D]
params = aj.init_multi_head_attention(jax.random.key(0), D, num_heads=N)


def self_attention(x):
    """[T, D] -> output [T, D] and weights [N, T, T] (a batch of one)."""
    y, w = aj.multi_head_attention(params, x[None], num_heads=N, return_weights=True)
    return np.asarray(y[0]), np.asarray(w[0])


y_a, w_a = self_attention(x_a)
y_b, w_b = self_attention(x_b)

# %% [markdown]
# Self-attention is *permutation-equivariant*: permuting the input tokens permutes the
# outputs the same way and changes nothing else. "cat" (position 1 in the first sentence,
# 5 in the second) gets exactly the same vector in both, and so does every other word; the
# attention weights are the same numbers with rows and columns reordered. Anything the
# model computes from these outputs, such as their mean, cannot tell who sat on whom.

# %%
np.testing.assert_allclose(y_b, y_a[perm], rtol=1e-5, atol=1e-6)  # outputs just moved
np.testing.assert_allclose(y_b[5], y_a[1], rtol=1e-5, atol=1e-6)  # "cat" == "cat"
np.testing.assert_allclose(w_b, w_a[:, perm][:, :, perm], rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(y_b.mean(0), y_a.mean(0), rtol=1e-5, atol=1e-6)
print('"cat" in sentence A:', y_a[1][:6], "...")
print('"cat" in sentence B:', y_b[5][:6], "...")

fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
viz.attention_heatmap(w_a[0], sentence_a, sentence_a, ax=axes[0], title="A, head 0, no positions")
viz.attention_heatmap(w_b[0], sentence_b, sentence_b, ax=axes[1], title="B, head 0, no positions")
plt.show()

# %% [markdown]
# ## The fix: add a position signal to each embedding
#
# The paper adds to the embedding of the token at position pos a vector of sinusoids
# (section 3.5):
#
# PE(pos, 2i) = sin(pos / 10000^(2i/d_model)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).
#
# Every value lies in [−1, 1] whatever the position, and each pair of dimensions (2i, 2i+1)
# is one frequency. Left columns oscillate fast, right columns barely change over 100
# positions: together they give every position its own pattern. (The stripes on the right
# are the interleaving: sin ≈ 0 next to cos ≈ 1 where the frequency is low.)

# %%
pe = np.asarray(aj.sinusoidal_positional_encoding(100, 128))  # [T, D]
viz.positional_encoding_heatmap(pe, title="sinusoidal_positional_encoding(100, 128)")
plt.show()

# %% [markdown]
# Single dimensions are sine waves whose wavelength grows geometrically with the dimension,
# in a geometric progression from 2π (dimension 0) towards 10000·2π (the last pair).

# %%
D_big = pe.shape[1]
fig, ax = plt.subplots(figsize=(9, 3.5), layout="constrained")
for dim in (0, 8, 32, 64):
    wavelength = 2 * np.pi * 10000 ** (dim / D_big)  # dim = 2i
    ax.plot(pe[:, dim], label=f"dimension {dim}: wavelength {wavelength:.1f}")
ax.set(xlabel="position", ylabel="PE(position, dimension)")
ax.legend(loc="lower left", fontsize=8)
plt.show()
pairs = np.array([0, 16, 32, 48, 63])  # i: the pair of dimensions (2i, 2i + 1)
print("pair i     :", pairs)
print("wavelength :", 2 * np.pi * 10000 ** (2 * pairs / D_big), "(limit 10000·2π ≈ 62832)")

# %% [markdown]
# ## Nearby positions are similar; only the offset matters
#
# The cosine similarity of two encodings is high for nearby positions and falls off with
# distance. More: it depends only on the offset k between the positions, not on where they
# are. PE(p)·PE(p + k) = Σ_i cos(k·ω_i) with ω_i = 10000^(−2i/d_model), and every encoding
# has the same norm √(d_model/2), so the picture is constant along its diagonals.

# %%
unit = pe / np.linalg.norm(pe, axis=1, keepdims=True)  # [T, D]
similarity = unit @ unit.T  # [T, T]
print("offset k | similarity of (p, p+k) for p = 0, 10, 40, 70")
for k in (1, 2, 5, 10, 20):
    values = np.array([similarity[p, p + k] for p in (0, 10, 40, 70)])
    print(f"{k:8d} | {values}")
    np.testing.assert_allclose(values, values[0], atol=1e-5)  # independent of p
distinct = np.linalg.norm(pe[:, None] - pe[None, :], axis=-1) + np.eye(len(pe)) * 1e9
print(f"smallest distance between two different positions: {distinct.min():.3f} (all unique)")

fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
viz.position_similarity(pe, ax=axes[0], title="cosine similarity of PE(p), PE(q)")
axes[1].plot(similarity[0], label="similarity of PE(0) and PE(k)")
axes[1].set(xlabel="offset k", ylabel="cosine similarity", title="the similarity against offset")
axes[1].legend()
plt.show()

# %% [markdown]
# The paper chose sinusoids because *"for any fixed offset k, PE_pos+k can be represented
# as a linear function of PE_pos"* (section 3.5): each (sin, cos) pair is rotated by the
# angle k·ω_i. One matrix M_k moves every position k steps along, so attention can learn
# to look at relative positions.

# %%
k = 3
omega = 10000.0 ** (-np.arange(0, D_big, 2) / D_big)  # [D/2]
M_k = np.zeros((D_big, D_big))
for i, angle in enumerate(k * omega):
    c, s = np.cos(angle), np.sin(angle)
    M_k[2 * i : 2 * i + 2, 2 * i : 2 * i + 2] = [[c, s], [-s, c]]  # (sin, cos) -> shifted
np.testing.assert_allclose(pe[k:], pe[:-k] @ M_k.T, atol=1e-4)
print(f"PE(p + {k}) == M_{k} · PE(p) for every p: one linear map per offset")

# %% [markdown]
# ## With the encodings added, order matters
#
# Back to the two sentences, now with `x + PE` as input (the paper also scales embeddings
# by √d_model first; our random embeddings already have entries of size about 1). "cat"
# now gets a different vector in each sentence, and so does the sentence as a whole.

# %%
pe_small = np.asarray(aj.sinusoidal_positional_encoding(T, D))  # [T, D]
y_a_pos, w_a_pos = self_attention(x_a + pe_small)
y_b_pos, w_b_pos = self_attention(x_b + pe_small)

change = np.linalg.norm(y_b_pos[5] - y_a_pos[1]) / np.linalg.norm(y_a_pos[1])
print(f'"cat": relative difference between the two sentences = {change:.2f}')
assert not np.allclose(y_b_pos[5], y_a_pos[1], rtol=1e-3, atol=1e-3)
assert not np.allclose(y_b_pos, y_a_pos[perm], rtol=1e-3, atol=1e-3)
assert not np.allclose(y_b_pos.mean(0), y_a_pos.mean(0), rtol=1e-3, atol=1e-3)

fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
viz.attention_heatmap(w_a_pos[0], sentence_a, sentence_a, ax=axes[0], title="A, head 0, x + PE")
viz.attention_heatmap(w_b_pos[0], sentence_b, sentence_b, ax=axes[1], title="B, head 0, x + PE")
plt.show()

# %% [markdown]
# The sinusoids are fixed, not learned, and defined for any position, which the paper
# hoped would let a model extrapolate to sentences longer than those it was trained on;
# learned position embeddings worked about as well (Table 3, row E). `attention_jax` also
# offers rotary encodings (`aj.apply_rotary_embedding`), which rotate queries and keys
# instead of adding to the embeddings.
