"""The notebooks: each .ipynb equals its jupytext .py source and carries no outputs, and each
runs top to bottom in its TINY mode (ATTENTION_JAX_TINY=1: tiny models, a few steps, on CPU)
in a fresh kernel of this Python, without writing into the repository and without leaving
anything in the temporary directory (the kernel's TMPDIR, a fresh one per notebook)."""

import json
import os
import pathlib
import sys
import time

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("*.py"))
IPYNBS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # per cell; TINY notebooks take well under a minute in all
KERNEL = "attention_jax_test"
BADGE = "https://colab.research.google.com/github/attention-jax/attention_jax/blob/main/notebooks/"
# Left out of the check that TINY runs write nothing into the repository: VCS and caches.
IGNORED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"}


def _cells(path):
    """(cell type, source) of every cell, as jupytext reads the .py or .ipynb."""
    return [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_ipynb_is_in_sync_with_its_py_source(source):
    ipynb = source.with_suffix(".ipynb")
    assert ipynb.exists(), f"run: jupytext --to ipynb {source.relative_to(ROOT)}"
    assert _cells(ipynb) == _cells(source), (
        f"{ipynb.name} differs from {source.name}; the .py is the source: run "
        f"jupytext --to ipynb {source.relative_to(ROOT)}"
    )


@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.name)
def test_ipynb_has_a_source_no_outputs_and_a_colab_badge(ipynb):
    assert ipynb.with_suffix(".py").exists(), f"{ipynb.name} has no jupytext .py source"
    nb = nbformat.read(ipynb, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{ipynb.name} cell {i} has outputs: strip them"
            assert cell.execution_count is None, f"{ipynb.name} cell {i} has an execution count"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert BADGE + ipynb.name in first.source, "the Open in Colab badge must open this notebook"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, monkeypatch_module):
    """A kernel spec for the Python running the tests (whatever `python3` points to)."""
    spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    jupyter_path = [str(spec_dir.parent.parent), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch_module.setenv("JUPYTER_PATH", os.pathsep.join(p for p in jupyter_path if p))
    return KERNEL


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _kernel_env(cache_dir, tmp_dir):
    env = dict(os.environ)
    # tempfile.mkdtemp() in the kernel (and its subprocesses) creates under this directory,
    # which the test checks is empty afterwards: a TINY run cleans up after itself.
    env.update(TMPDIR=str(tmp_dir), TEMP=str(tmp_dir), TMP=str(tmp_dir))
    # XLA programs compiled by one notebook (or a run repeated inside one, as 04 resumes)
    # are reused from this cache by the next: most of a TINY notebook's time is compiling.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    # One CPU device: conftest's 8 fake devices would only slow the notebooks down here.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", ATTENTION_JAX_TINY="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _repo_files():
    """{path: mtime} of the repository's files, caches and VCS left out."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in IGNORED and not d.endswith(".egg-info")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            files[path] = os.stat(path).st_mtime_ns
    return files


@pytest.mark.slow
@pytest.mark.parametrize("ipynb", IPYNBS, ids=lambda p: p.name)
def test_notebook_runs_in_tiny_mode(ipynb, kernel, compilation_cache, tmp_path):
    nb = nbformat.read(ipynb, as_version=4)
    tmp_dir = tmp_path / "kernel_tmp"
    tmp_dir.mkdir()
    before = _repo_files()
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    # A failing cell raises CellExecutionError, which shows the cell and its traceback.
    client.execute(env=_kernel_env(compilation_cache, tmp_dir))
    seconds = time.perf_counter() - start
    print(f"{ipynb.name}: {seconds:.1f} s in TINY mode")
    after = _repo_files()
    # Sources (.py, .ipynb, .md) may be edited meanwhile; a run writes data and pictures.
    new = sorted(p for p in set(after) - set(before) if not p.endswith((".py", ".ipynb", ".md")))
    changed = sorted(p for p in before if p in after and after[p] != before[p])
    assert not new, f"{ipynb.name} wrote into the repository in TINY mode: {new}"
    # Full mode writes pictures into docs/ and runs into workdir/; TINY mode must not.
    outputs = [p for p in changed if f"{os.sep}docs{os.sep}" in p or f"{os.sep}workdir" in p]
    assert not outputs, f"{ipynb.name} changed {outputs} in TINY mode"
    left = sorted(p.name for p in tmp_dir.iterdir())
    assert not left, f"{ipynb.name} left {left} in its temporary directory in TINY mode"
