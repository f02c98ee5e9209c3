"""Pictures of attention: weight heatmaps, positional encodings, training curves.

Matplotlib only, imported lazily: importing this module needs no display and does not
choose a backend. New figures are made with ``matplotlib.pyplot`` inside the functions, so
they show inline in notebooks (``plt.show()`` or the figure as a cell's last expression)
and work headless (``MPLBACKEND=Agg``); pass ``ax=`` to draw into a figure of your own.

Inputs may be NumPy or JAX arrays. Shapes use the project's legend: T query length, S key
length, N heads, L layers, D model width.

    ax = attention_heatmap(weights, tokens, tokens)            # weights [T, S]
    fig = attention_grid(weights, tokens, tokens)              # weights [L, N, T, S]
    ax = positional_encoding_heatmap(pe)                       # pe [T, D]
    ax = position_similarity(pe)                               # cosine similarity [T, T]
    ax = training_curves("workdir/default/metrics.jsonl")      # loss against step
    save_figure(ax, "docs/images/attention.png")               # atomic PNG
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------
# Heatmaps.
# --------------------------------------------------------------------------------------


def matrix_heatmap(
    values,
    row_labels: Sequence | None = None,
    col_labels: Sequence | None = None,
    *,
    ax=None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    cmap: str = "RdBu_r",
    center: float | None = 0.0,
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = False,
    fmt: str = ".2f",
    colorbar: bool = True,
):
    """Any 2-D matrix as a heatmap, rows on the y axis, with optional tick labels.

    Args:
      values: ``[R, C]`` array (NumPy or JAX).
      row_labels, col_labels: ``R`` / ``C`` labels for the ticks (e.g. tokens); None for
        plain indices.
      ax: Axes to draw into; None makes a new figure.
      title, xlabel, ylabel: text for the Axes.
      cmap: colormap name; the default is diverging, for signed values.
      center: with a diverging map, the value at the middle of the colour scale (the scale
        is symmetric around it); None to use the data's min and max.
      vmin, vmax: explicit colour limits (override ``center``).
      annotate: write each cell's value in the cell (for small matrices).
      fmt: format of the annotations.
      colorbar: add a colorbar next to the Axes.

    Returns:
      The matplotlib Axes (``ax.images[0].get_array()`` is ``values``).
    """
    name = "matrix_heatmap"
    values = _as_float_array(name, "values", values, ndim=2, legend="[R, C]")
    rows = _check_labels(name, "row_labels", row_labels, values.shape[0], "rows R")
    cols = _check_labels(name, "col_labels", col_labels, values.shape[1], "columns C")
    if center is not None and vmin is None and vmax is None:
        finite = values[np.isfinite(values)]
        half = float(np.max(np.abs(finite - center))) if finite.size else 1.0
        half = half or 1.0
        vmin, vmax = center - half, center + half
    return _heatmap(
        values, rows, cols, ax=ax, title=title, xlabel=xlabel, ylabel=ylabel, cmap=cmap,
        vmin=vmin, vmax=vmax, annotate=annotate, fmt=fmt, colorbar=colorbar,
    )  # fmt: skip


def attention_heatmap(
    weights,
    query_labels: Sequence | None = None,
    key_labels: Sequence | None = None,
    *,
    ax=None,
    title: str | None = None,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool = False,
    fmt: str = ".2f",
    colorbar: bool = True,
):
    """One head's attention weights as a heatmap: row t is how query t spreads its
    attention over the keys (rows of softmax weights sum to 1).

    Args:
      weights: ``[T, S]`` (NumPy or JAX), e.g. the second result of
        :func:`attention_jax.scaled_dot_product_attention`.
      query_labels: ``T`` labels (tokens) for the y axis ("query").
      key_labels: ``S`` labels (tokens) for the x axis ("key"), drawn rotated.
      ax: Axes to draw into; None makes a new figure.
      title: Axes title.
      cmap: colormap name.
      vmin, vmax: colour limits (default: the data's range).
      annotate: write each weight in its cell (for short sentences).
      fmt: format of the annotations.
      colorbar: add a colorbar.

    Returns:
      The matplotlib Axes (``ax.images[0].get_array()`` is ``weights``).
    """
    name = "attention_heatmap"
    weights = _as_float_array(name, "weights", weights, ndim=2, legend="[T, S]")
    queries = _check_labels(name, "query_labels", query_labels, weights.shape[0], "query rows T")
    keys = _check_labels(name, "key_labels", key_labels, weights.shape[1], "key columns S")
    return _heatmap(
        weights, queries, keys, ax=ax, title=title, xlabel="key", ylabel="query", cmap=cmap,
        vmin=vmin, vmax=vmax, annotate=annotate, fmt=fmt, colorbar=colorbar,
    )  # fmt: skip


def attention_grid(
    weights,
    query_labels: Sequence | None = None,
    key_labels: Sequence | None = None,
    *,
    row_names: Sequence[str] | None = None,
    col_names: Sequence[str] | None = None,
    title: str | None = None,
    cmap: str = "viridis",
    cell_size: float | None = None,
):
    """The attention weights of every layer and head as a grid of heatmaps.

    Rows are layers, columns heads; each Axes is titled ``"<row name>, <col name>"`` (by
    default ``"layer 0, head 0"``). One colour scale (0 to the largest weight) and one
    colorbar serve the whole grid, so heads can be compared. Tick labels are drawn on the
    outer Axes only: queries on the first column, keys on the last row.

    Args:
      weights: ``[L, N, T, S]``; a ``[N, T, S]`` array is one layer (``L = 1``).
      query_labels, key_labels: ``T`` and ``S`` labels (tokens).
      row_names: ``L`` names for the rows (default ``"layer 0"``, ...).
      col_names: ``N`` names for the columns (default ``"head 0"``, ...).
      title: figure title.
      cmap: colormap name.
      cell_size: width and height of one heatmap in inches (default: from T and S).

    Returns:
      The matplotlib Figure; ``fig.axes[:L * N]`` are the heatmaps in row-major order.
    """
    name = "attention_grid"
    weights = _as_float_array(name, "weights", weights, ndim=(3, 4), legend="[L, N, T, S]")
    if weights.ndim == 3:
        weights = weights[None]  # [N, T, S] -> [1, N, T, S]
    L, N, T, S = weights.shape
    queries = _check_labels(name, "query_labels", query_labels, T, "query rows T")
    keys = _check_labels(name, "key_labels", key_labels, S, "key columns S")
    row_names = _check_names(name, "row_names", row_names, L, "layers L", "layer")
    col_names = _check_names(name, "col_names", col_names, N, "heads N", "head")

    plt = _pyplot()
    if cell_size is None:  # grows with the sentence, shrinks so that wide grids stay ~16 in
        cell_size = min(float(np.clip(0.25 * max(T, S) + 1.2, 2.0, 5.0)), max(1.6, 15.0 / N))
    size = cell_size
    labelsize = float(np.clip(0.8 * 72 * size / max(T, S), 4.0, 10.0))  # points per row, shrunk
    fig, axes = plt.subplots(
        L, N, figsize=(size * N + 1.2, size * L + (0.5 if title else 0.2)),
        squeeze=False, layout="constrained",
    )  # fmt: skip
    finite = weights[np.isfinite(weights)]
    vmax = float(finite.max()) if finite.size else 1.0
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    image = None
    for i in range(L):
        for j in range(N):
            ax = axes[i, j]
            _heatmap(
                weights[i, j], queries, keys, ax=ax, title=f"{row_names[i]}, {col_names[j]}",
                xlabel="key" if i == L - 1 else None, ylabel="query" if j == 0 else None,
                cmap=cmap, vmin=vmin, vmax=vmax, annotate=False, fmt="", colorbar=False,
            )  # fmt: skip
            ax.tick_params(labelsize=labelsize)
            if j > 0:
                ax.tick_params(labelleft=False)
            if i < L - 1:
                ax.tick_params(labelbottom=False)
            image = ax.images[0]
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="weight")
    if title:
        fig.suptitle(title)
    return fig


def positional_encoding_heatmap(pe, *, ax=None, title: str | None = None, cmap: str = "RdBu_r"):
    """A positional-encoding table as a heatmap: position on the y axis (0 at the top),
    dimension on the x axis, a diverging colour scale centred on 0.

    Args:
      pe: ``[T, D]``, e.g. :func:`attention_jax.sinusoidal_positional_encoding`.
      ax: Axes to draw into; None makes a new figure.
      title: Axes title.
      cmap: a diverging colormap name.

    Returns:
      The matplotlib Axes (``ax.images[0].get_array()`` is ``pe``).
    """
    name = "positional_encoding_heatmap"
    pe = _as_float_array(name, "pe", pe, ndim=2, legend="[T, D]")
    finite = pe[np.isfinite(pe)]
    half = float(np.max(np.abs(finite))) if finite.size else 1.0
    half = half or 1.0
    return _heatmap(
        pe, None, None, ax=ax, title=title, xlabel="dimension", ylabel="position", cmap=cmap,
        vmin=-half, vmax=half, annotate=False, fmt="", colorbar=True, figsize=(7.0, 5.0),
    )  # fmt: skip


def position_similarity(pe, *, ax=None, title: str | None = None, cmap: str = "viridis"):
    """The cosine similarity of every pair of positional encodings, ``[T, T]``.

    For the sinusoids, nearby positions are similar and the similarity of positions p and
    p + k depends only on the offset k, so the picture is constant along diagonals.

    Args:
      pe: ``[T, D]`` positional encodings.
      ax: Axes to draw into; None makes a new figure.
      title: Axes title.
      cmap: colormap name.

    Returns:
      The matplotlib Axes; ``ax.images[0].get_array()`` is the ``[T, T]`` similarity.
    """
    name = "position_similarity"
    pe = _as_float_array(name, "pe", pe, ndim=2, legend="[T, D]")
    norms = np.linalg.norm(pe, axis=-1, keepdims=True)  # [T, 1]
    unit = pe / np.where(norms > 0, norms, 1.0)  # a zero row has similarity 0 to everything
    similarity = unit @ unit.T  # [T, T]
    return _heatmap(
        similarity, None, None, ax=ax, title=title, xlabel="position", ylabel="position",
        cmap=cmap, vmin=None, vmax=None, annotate=False, fmt="", colorbar=True,
        colorbar_label="cosine similarity", figsize=(6.0, 5.0),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# Training curves.
# --------------------------------------------------------------------------------------


def training_curves(
    metrics,
    *,
    keys: Sequence[str] | None = None,
    ax=None,
    title: str | None = None,
    logy: bool = False,
):
    """Metrics of a training run against the step, one line per key.

    Args:
      metrics: a path to a ``metrics.jsonl`` written by
        :class:`attention_jax.train.reporting.MetricsWriter` (one ``{"step": int, key: value,
        ...}`` object per line), a workdir holding one, or an iterable of such dicts.
      keys: the keys to plot (e.g. ``["train_accuracy", "eval_accuracy"]``); default: every
        key with "loss" in its name (``train_loss``, ``eval_loss``, ...), in order of first
        appearance. Rows without a key, or with a non-numeric value for it, are skipped.
      ax: Axes to draw into; None makes a new figure.
      title: Axes title.
      logy: logarithmic y axis.

    Returns:
      The matplotlib Axes; ``ax.lines`` holds one line per key, labelled with the key, whose
      x data are the steps of the rows that have it.
    """
    name = "training_curves"
    rows = _read_metrics(name, metrics)
    numeric: dict[str, None] = {}  # ordered set of keys with a numeric value somewhere
    for row in rows:
        for k, v in row.items():
            if k != "step" and _is_number(v):
                numeric.setdefault(k, None)
    if keys is None:
        keys = [k for k in numeric if "loss" in k]
        if not keys:
            raise ValueError(
                f"{name}: no loss-like key (name containing 'loss') in the metrics; numeric "
                f"keys present: {sorted(numeric)}; pass keys=[...]"
            )
    else:
        if isinstance(keys, str):
            keys = [keys]
        keys = list(keys)
        missing = [k for k in keys if k not in numeric]
        if missing:
            raise ValueError(
                f"{name}: key(s) {missing} not found with numeric values in the metrics; "
                f"numeric keys present: {sorted(numeric)}"
            )
    if ax is None:
        _, ax = _pyplot().subplots(figsize=(6.0, 3.8), layout="constrained")
    for key in keys:
        points = sorted((row["step"], float(row[key])) for row in rows if _is_number(row.get(key)))
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        few = len(points) < 20  # sparse series (evaluations, a final test) get markers
        ax.plot(steps, values, label=key, marker="o" if few else None, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel(
        keys[0] if len(keys) == 1 else "loss" if all("loss" in k for k in keys) else "value"
    )
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    return ax


# --------------------------------------------------------------------------------------
# Saving.
# --------------------------------------------------------------------------------------


def save_figure(fig_or_ax, path, *, dpi: int = 120, close: bool = False) -> str:
    """Writes a Figure (or the Figure of an Axes) to `path` atomically.

    The image is written to a temporary file in the same directory and moved into place
    with ``os.replace``, so `path` is either the old file or the complete new one, never
    half-written; parent directories are created. The format follows the suffix (``.png``,
    ``.svg``, ``.pdf``, ...; PNG when there is none).

    Args:
      fig_or_ax: a matplotlib Figure, SubFigure or Axes.
      path: where to write.
      dpi: resolution of raster formats.
      close: close the figure afterwards (frees pyplot's reference in scripts).

    Returns:
      The path written, as a string.
    """
    from matplotlib.axes import Axes
    from matplotlib.figure import FigureBase

    name = "save_figure"
    if isinstance(fig_or_ax, Axes):
        fig = fig_or_ax.figure
    elif isinstance(fig_or_ax, FigureBase):
        fig = fig_or_ax
    else:
        raise TypeError(
            f"{name}: expected a matplotlib Figure or Axes, got {type(fig_or_ax).__name__}"
        )
    while isinstance(getattr(fig, "figure", None), FigureBase) and fig.figure is not fig:
        fig = fig.figure  # a SubFigure: save the whole figure
    path = os.fspath(path)
    if not path or os.path.basename(path) in ("", ".", ".."):
        raise ValueError(f"{name}: path must name a file, got {path!r}")
    suffix = os.path.splitext(path)[1].lower()
    fmt = suffix[1:] if suffix else "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise ValueError(
            f"{name}: cannot write format {fmt!r} (from {path!r}); supported: "
            f"{sorted(fig.canvas.get_supported_filetypes())}"
        )
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600; os.open(0o666) lets the umask decide, so
    # the picture gets the permissions of any other file the user writes.
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if close:
        _pyplot().close(fig)
    return path


# --------------------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------------------


def _pyplot():
    """pyplot, imported on first use (so importing this module never picks a backend)."""
    import matplotlib.pyplot as plt

    return plt


def _heatmap(values, rows, cols, *, ax, title, xlabel, ylabel, cmap, vmin, vmax, annotate,
             fmt, colorbar, colorbar_label=None, figsize=None):  # fmt: skip
    R, C = values.shape
    if ax is None:
        if figsize is None:  # about 0.45 x 0.4 inches per cell, within bounds
            figsize = (float(np.clip(0.45 * C + 2.2, 4.0, 12.0)),
                       float(np.clip(0.4 * R + 1.5, 3.0, 10.0)))  # fmt: skip
        _, ax = _pyplot().subplots(figsize=figsize, layout="constrained")
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                      interpolation="nearest")  # fmt: skip
    if rows is not None:
        ax.set_yticks(np.arange(R))
        ax.set_yticklabels(rows)
    if cols is not None:
        ax.set_xticks(np.arange(C))
        ax.set_xticklabels(cols, rotation=45, ha="right", rotation_mode="anchor")
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if annotate:
        lo, hi = image.get_clim()
        span = (hi - lo) or 1.0
        cm = image.get_cmap()
        for r in range(R):
            for c in range(C):
                v = values[r, c]
                red, green, blue, _ = cm((v - lo) / span)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # luminance
                ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")  # fmt: skip
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    return ax


def _as_float_array(fn, arg, x, *, ndim, legend) -> np.ndarray:
    """`x` (NumPy, JAX, nested lists) as a float64 NumPy array of the expected rank."""
    try:
        arr = np.asarray(x)
    except Exception as e:  # e.g. a ragged list
        raise TypeError(f"{fn}: {arg} must be an array {legend}, got {type(x).__name__}") from e
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
    ):
        raise TypeError(f"{fn}: {arg} must be a real numeric array {legend}, got dtype {arr.dtype}")
    ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if arr.ndim not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{fn}: {arg} must be {want} {legend}, got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{fn}: {arg} has an empty dimension: shape {arr.shape}")
    return arr.astype(np.float64)


def _check_labels(fn, arg, labels, n, what) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(
            f"{fn}: {arg} must be a sequence of {n} labels, not a single string; "
            "use e.g. sentence.split()"
        )
    labels = [str(t) for t in labels]
    if len(labels) != n:
        raise ValueError(f"{fn}: {arg} has {len(labels)} labels but there are {n} {what}")
    return labels


def _check_names(fn, arg, names, n, what, default) -> list[str]:
    if names is None:
        return [f"{default} {i}" for i in range(n)]
    return _check_labels(fn, arg, names, n, what)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _read_metrics(fn, metrics) -> list[dict]:
    """Rows of a metrics.jsonl (path or workdir) or an iterable of dicts, checked."""
    source = "metrics"
    if isinstance(metrics, (str, os.PathLike)):
        path = os.fspath(metrics)
        if os.path.isdir(path):
            path = os.path.join(path, "metrics.jsonl")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{fn}: no metrics file at {path!r}")
        source = path
        rows = []
        with open(path) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{fn}: {path}:{n} is not valid JSON: {e.msg}") from e
    elif isinstance(metrics, Mapping):
        raise TypeError(
            f"{fn}: metrics must be a path or an iterable of row dicts, got a single dict; "
            "wrap it in a list"
        )
    elif isinstance(metrics, Iterable):
        rows = list(metrics)
    else:
        raise TypeError(
            f"{fn}: metrics must be a path to metrics.jsonl or an iterable of row dicts, "
            f"got {type(metrics).__name__}"
        )
    if not rows:
        raise ValueError(f"{fn}: {source} has no rows")
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise ValueError(f"{fn}: row {n} of {source} is not a dict: {row!r}")
        if not _is_number(row.get("step")):
            raise ValueError(f"{fn}: row {n} of {source} has no numeric 'step': {dict(row)!r}")
    return rows


__all__ = [
    "attention_grid",
    "attention_heatmap",
    "matrix_heatmap",
    "position_similarity",
    "positional_encoding_heatmap",
    "save_figure",
    "training_curves",
]
