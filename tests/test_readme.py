"""README's example of calling the pure functions runs as written and gives the stated shapes."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _block(marker):
    """The README's python block containing `marker`."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_example_runs():
    scope = {}
    exec(compile(_block("scaled_dot_product_attention("), "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 6, 64)  # [B, T, D]
    assert scope["out"].shape == (6, 16) and scope["w"].shape == (6, 6)  # one head
    np.testing.assert_allclose(np.asarray(scope["w"]).sum(-1), 1.0, rtol=1e-5)
    assert all(np.all(np.isfinite(g)) for g in __import__("jax").tree.leaves(scope["g"]))


def test_readme_long_sequence_example_runs():
    # As written but at T = 4,096 instead of 100,000 (minutes on 2 cores; the benchmark
    # benchmarks/long_context.py runs the full length).
    block = _block("100_000")
    scope = {}
    exec(compile(block.replace("100_000", "4_096"), "README.md", "exec"), scope)
    assert scope["out"].shape == (1, 4096, 8, 64)
    np.testing.assert_allclose(np.asarray(scope["out"]), 1.0, rtol=1e-6)  # v = 1 everywhere


def test_readme_model_example_runs():
    scope = {}
    exec(compile(_block("aj.Transformer(cfg)"), "README.md", "exec"), scope)
    assert scope["logits"].shape == (1, 5, 100) and scope["enc"].shape == (1, 4, 32)
    assert "intermediates" in scope["state"]


def test_readme_decoding_example_runs():
    scope = {}
    exec(compile(_block("aj.Transformer(cfg)"), "README.md", "exec"), scope)  # the model
    exec(compile(_block("greedy"), "README.md", "exec"), scope)
    assert scope["ids"].shape == scope["greedy"].shape == (1, 8)
    assert scope["sampled"].shape == (1, 8)
    np.testing.assert_array_equal(scope["sampled"][:, :2], scope["tgt"][:, :2])  # the prompt
