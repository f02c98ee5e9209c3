"""Regenerates the README pictures in docs/images/ from the library's own functions.

    python docs/make_figures.py                 # writes docs/images/*.png
    python docs/make_figures.py --out_dir /tmp  # somewhere else

self_attention_weights.png  the attention weights of notebook 01's walkthrough ("I love
                            eating fresh apple in the morning.", same seed, same steps)
positional_encoding.png     the sinusoidal encodings and the cosine similarity of positions
                            (notebook 02)
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")  # a script: no display needed

import matplotlib.pyplot as plt
import numpy as np

import attention_jax as aj
from attention_jax import visualize as viz

IMAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "images")
DPI = 100


def self_attention_weights(out_dir: str) -> str:
    """Notebook 01: random embeddings (seed 0, d_model 16), projections to d_k = 8, one head."""
    tokens = ["I", "love", "eating", "fresh", "apple", "in", "the", "morning", "."]
    D, d_k = 16, 8
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    rng = np.random.default_rng(0)
    embedding_table = rng.normal(size=(len(vocab), D)).astype(np.float32)  # [V, D]
    X = embedding_table[[vocab[t] for t in tokens]]  # [T, D]
    W_Q, W_K, W_V = ((rng.normal(size=(D, d_k)) / np.sqrt(D)).astype(np.float32) for _ in range(3))
    _, weights = aj.scaled_dot_product_attention(X @ W_Q, X @ W_K, X @ W_V)  # [T, T]
    ax = viz.attention_heatmap(
        weights, tokens, tokens, annotate=True,
        title="softmax(Q·Kᵀ/√d_k): one head, random embeddings and projections",
    )  # fmt: skip
    ax.title.set_fontsize(10)
    return viz.save_figure(ax, os.path.join(out_dir, "self_attention_weights.png"), dpi=DPI,
                           close=True)  # fmt: skip


def positional_encoding(out_dir: str) -> str:
    """Notebook 02: the sinusoids for 100 positions, d_model 128, and their similarity."""
    pe = aj.sinusoidal_positional_encoding(100, 128)  # [T, D]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    viz.positional_encoding_heatmap(pe, ax=left, title="sinusoidal positional encoding")
    viz.position_similarity(pe, ax=right, title="cosine similarity of positions")
    return viz.save_figure(fig, os.path.join(out_dir, "positional_encoding.png"), dpi=DPI,
                           close=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=IMAGES, help="where to write (default: %(default)s)")
    args = parser.parse_args()
    for make in (self_attention_weights, positional_encoding):
        path = make(args.out_dir)
        print(f"{path}  {os.path.getsize(path) / 1024:.0f} KB")


if __name__ == "__main__":
    main()
