"""attention_jax.visualize: what each picture shows (labels, ticks, image data), reading a real
metrics.jsonl, atomic PNG writing, and clear errors for bad input. Agg backend, no display."""

import json
import os
import stat
import subprocess
import sys

import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")  # headless; before pyplot is imported anywhere in this process

import matplotlib.pyplot as plt

from attention_jax import sinusoidal_positional_encoding
from attention_jax import visualize as viz
from attention_jax.train.reporting import MetricsWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUERIES = ["The", "cat", "sat"]  # T = 3
KEYS = ["on", "the", "mat", "."]  # S = 4


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _weights(*lead, T=3, S=4):
    """Rows that sum to 1, like softmax output: [*lead, T, S]."""
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.ones(S), size=(*lead, T))


def _ticks(labels):
    return [t.get_text() for t in labels]


def test_import_needs_no_display_and_picks_no_backend():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND")}
    code = (
        "import sys, attention_jax.visualize; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported at import time'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_attention_heatmap_labels_ticks_and_data():
    w = _weights()
    ax = viz.attention_heatmap(jnp.asarray(w), QUERIES, KEYS, title="one head")
    assert (ax.get_ylabel(), ax.get_xlabel(), ax.get_title()) == ("query", "key", "one head")
    assert _ticks(ax.get_yticklabels()) == QUERIES
    assert _ticks(ax.get_xticklabels()) == KEYS
    assert all(t.get_rotation() != 0 for t in ax.get_xticklabels())  # keys rotated
    image = ax.images[0].get_array()
    assert image.shape == (3, 4)
    np.testing.assert_allclose(image, w, rtol=1e-6)  # float32 round trip via jnp
    assert len(ax.figure.axes) == 2  # the heatmap and its colorbar


def test_attention_heatmap_into_given_axes_with_annotations():
    _, (left, right) = plt.subplots(1, 2)
    ax = viz.attention_heatmap(_weights(), ax=right, annotate=True, colorbar=False)
    assert ax is right and not left.images
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 3 * 4
    assert texts[0] == format(_weights()[0, 0], ".2f")


def test_matrix_heatmap_is_centred_for_signed_values():
    m = np.array([[-1.0, 0.5], [2.0, 0.0]])
    ax = viz.matrix_heatmap(m, ["a", "b"], ["x", "y"], xlabel="dim", ylabel="token")
    assert ax.images[0].get_clim() == (-2.0, 2.0)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("dim", "token")
    assert _ticks(ax.get_yticklabels()) == ["a", "b"]


def test_attention_grid_layers_by_heads():
    L, N = 2, 3
    w = _weights(L, N)
    fig = viz.attention_grid(w, QUERIES, KEYS, title="all heads")
    heatmaps = [ax for ax in fig.axes if ax.images]
    assert len(heatmaps) == L * N
    assert len(fig.axes) == L * N + 1  # one shared colorbar
    titles = [ax.get_title() for ax in heatmaps]
    assert titles == [f"layer {i}, head {j}" for i in range(L) for j in range(N)]
    for k, ax in enumerate(heatmaps):
        np.testing.assert_array_equal(ax.images[0].get_array(), w[k // N, k % N])
        assert ax.images[0].get_clim() == heatmaps[0].images[0].get_clim()  # one scale
    first, bottom_left = heatmaps[0], heatmaps[N]
    assert _ticks(first.get_yticklabels()) == QUERIES and first.get_ylabel() == "query"
    assert _ticks(bottom_left.get_xticklabels()) == KEYS and bottom_left.get_xlabel() == "key"
    assert fig._suptitle.get_text() == "all heads"


def test_attention_grid_names_and_one_layer():
    fig = viz.attention_grid(_weights(2), row_names=["encoder"], col_names=["h1", "h2"])
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["encoder, h1", "encoder, h2"]


def test_positional_encoding_heatmap():
    T, D = 20, 16
    pe = sinusoidal_positional_encoding(T, D)
    ax = viz.positional_encoding_heatmap(pe, title="sinusoids")
    assert (ax.get_ylabel(), ax.get_xlabel(), ax.get_title()) == (
        "position",
        "dimension",
        "sinusoids",
    )
    assert ax.images[0].get_array().shape == (T, D)
    lo, hi = ax.images[0].get_clim()
    assert lo == -hi and hi == pytest.approx(1.0, abs=1e-6)  # diverging, centred on 0
    assert ax.images[0].get_cmap().name == "RdBu_r"


def test_position_similarity_matches_the_closed_form():
    """For the sinusoids, cos_sim(p, q) = mean_i cos((p - q)·ω_i), ω_i = 10000^(-2i/D)."""
    T, D = 24, 32
    ax = viz.position_similarity(sinusoidal_positional_encoding(T, D))
    sim = ax.images[0].get_array()
    assert sim.shape == (T, T)
    omega = 10000.0 ** (-np.arange(0, D, 2) / D)  # [D/2]
    offsets = np.arange(T)[:, None] - np.arange(T)[None, :]  # [T, T]
    expected = np.cos(offsets[..., None] * omega).mean(-1)
    np.testing.assert_allclose(sim, expected, atol=2e-5)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("position", "position")


def _write_metrics(workdir):
    writer = MetricsWriter(str(workdir))
    for step, loss in ((10, 2.0), (20, 1.5), (30, 1.0)):
        writer.write(step, {"train_loss": loss, "train_accuracy": 1 / loss})
        if step >= 20:
            writer.write(step, {"eval_loss": loss + 0.25})
    writer.close()
    return os.path.join(str(workdir), "metrics.jsonl")


def test_training_curves_reads_a_metrics_writer_file(tmp_path):
    path = _write_metrics(tmp_path)
    ax = viz.training_curves(path, title="run")
    lines = {line.get_label(): line for line in ax.lines}
    assert list(lines) == ["train_loss", "eval_loss"]
    np.testing.assert_array_equal(lines["train_loss"].get_xdata(), [10, 20, 30])
    np.testing.assert_array_equal(lines["train_loss"].get_ydata(), [2.0, 1.5, 1.0])
    np.testing.assert_array_equal(lines["eval_loss"].get_xdata(), [20, 30])
    np.testing.assert_array_equal(lines["eval_loss"].get_ydata(), [1.75, 1.25])
    assert ax.get_xlabel() == "step" and ax.get_title() == "run"
    assert ax.get_legend() is not None
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train_loss", "eval_loss"]


def test_training_curves_keys_workdir_and_rows(tmp_path):
    _write_metrics(tmp_path)
    ax = viz.training_curves(tmp_path, keys=["train_accuracy"])  # a workdir
    assert [line.get_label() for line in ax.lines] == ["train_accuracy"]
    rows = [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.0, "note": "x"}]
    ax = viz.training_curves(iter(rows))
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 2])


def test_save_figure_writes_png_atomically(tmp_path):
    ax = viz.attention_heatmap(_weights(), QUERIES, KEYS)
    target = tmp_path / "new" / "dir" / "attention.png"
    assert viz.save_figure(ax, target, dpi=50) == str(target)
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert os.listdir(target.parent) == ["attention.png"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not a temp file's 0600
    viz.save_figure(ax.figure, str(target))  # overwrite, given the Figure
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert os.listdir(target.parent) == ["attention.png"]


def test_save_figure_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.png"
    target.write_bytes(b"old")
    fig = viz.attention_heatmap(_weights()).figure

    def broken(f, **kwargs):
        f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        viz.save_figure(fig, target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.png"]


W2 = np.full((3, 4), 0.25)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: viz.attention_heatmap(np.zeros((2, 3, 4))), ValueError,
         r"attention_heatmap: weights must be 2-D \[T, S\], got shape \(2, 3, 4\)"),
        (lambda: viz.attention_heatmap(W2, ["a", "b"], KEYS), ValueError,
         "query_labels has 2 labels but there are 3 query rows T"),
        (lambda: viz.attention_heatmap(W2, QUERIES, ["a"] * 5), ValueError,
         "key_labels has 5 labels but there are 4 key columns S"),
        (lambda: viz.attention_heatmap(W2, "The cat sat", KEYS), TypeError,
         "not a single string"),
        (lambda: viz.attention_heatmap(np.array([["a", "b"]])), TypeError,
         "weights must be a real numeric array"),
        (lambda: viz.attention_heatmap(np.zeros((0, 4))), ValueError, "empty dimension"),
        (lambda: viz.attention_grid(W2), ValueError,
         r"attention_grid: weights must be 3-D or 4-D \[L, N, T, S\], got shape \(3, 4\)"),
        (lambda: viz.attention_grid(np.zeros((2, 1, 3, 4)), row_names=["x"]), ValueError,
         "row_names has 1 labels but there are 2 layers L"),
        (lambda: viz.positional_encoding_heatmap(np.zeros(8)), ValueError,
         r"positional_encoding_heatmap: pe must be 2-D \[T, D\], got shape \(8,\)"),
        (lambda: viz.position_similarity(np.zeros((2, 3, 4))), ValueError,
         r"position_similarity: pe must be 2-D"),
        (lambda: viz.training_curves([]), ValueError, "has no rows"),
        (lambda: viz.training_curves({"step": 1}), TypeError, "single dict"),
        (lambda: viz.training_curves([{"loss": 1.0}]), ValueError, "row 1 .* no numeric 'step'"),
        (lambda: viz.training_curves([{"step": 1, "acc": 0.5}]), ValueError,
         r"no loss-like key .* \['acc'\]"),
        (lambda: viz.training_curves([{"step": 1, "loss": 1.0}], keys=["bleu"]), ValueError,
         r"key\(s\) \['bleu'\] not found"),
        (lambda: viz.save_figure("not a figure", "x.png"), TypeError,
         "expected a matplotlib Figure or Axes, got str"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_bad_files_raise_clear_errors(tmp_path):
    missing = tmp_path / "nowhere" / "metrics.jsonl"
    with pytest.raises(FileNotFoundError, match=f"no metrics file at '{missing}'"):
        viz.training_curves(missing)
    broken = tmp_path / "metrics.jsonl"
    broken.write_text(json.dumps({"step": 1, "train_loss": 1.0}) + "\n{oops\n")
    with pytest.raises(ValueError, match=f"{broken}:2 is not valid JSON"):
        viz.training_curves(broken)
    fig = viz.attention_heatmap(W2).figure
    with pytest.raises(ValueError, match=r"cannot write format 'xyz'"):
        viz.save_figure(fig, tmp_path / "a.xyz")
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
