"""The package as a user installs it: a wheel holds the library, the shipped configs,
py.typed and the LICENSE, and its `attention-jax` command works away from the repository.

The wheel is built from a copy of the files setuptools reads (not in the working tree: no
build/ or egg-info written there) without build isolation, so no network is needed; it is
installed with --no-deps into a folder put first on PYTHONPATH (the dependencies are this
environment's). About 10 s.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ("default", "reversal", "wmt14_base", "wmt14_big")


def _run(*command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("wheel", reason="building a wheel without isolation needs `wheel`")
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "attention_jax", src / "attention_jax",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )  # fmt: skip
    out = tmp_path_factory.mktemp("dist")
    result = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "--no-index", "-q", "-w", str(out), str(src),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("attention_jax-*.whl")
    return path


def test_the_wheel_holds_the_package_configs_license_and_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "attention_jax/__init__.py" in names and "attention_jax/cli/train.py" in names
    assert "attention_jax/py.typed" in names
    assert {f"attention_jax/configs/{c}.py" for c in CONFIGS} <= names
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.startswith(f"{info}/") and n.endswith("LICENSE") for n in names)
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "attention-jax = attention_jax.cli:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "Provides-Extra: tensorboard" in metadata


def test_the_installed_command_runs_away_from_the_repository(wheel, tmp_path):
    target = tmp_path / "site"
    result = _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                  "--target", str(target), str(wheel))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}
    command = target / "bin" / "attention-jax"
    home = tmp_path / "elsewhere"  # not the repository: experiments/ is not there
    home.mkdir()

    result = _run(str(command), "--help", cwd=home, env=env)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "prepare" in result.stdout

    # The shipped configs, from the installed copy: listed, and one resolved by name (with
    # wmt14_big importing wmt14_base) without training.
    result = _run(str(command), "train", "--list_configs", cwd=home, env=env)
    assert result.returncode == 0, result.stderr
    assert all(c in result.stdout for c in CONFIGS)
    assert str(target / "attention_jax" / "configs") in result.stdout
    result = _run(sys.executable, "-m", "attention_jax", "train", "--config=wmt14_big",
                  "--dry_run", "--config.model.pre_ln=True", cwd=home, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "  d_model: 1024" in result.stdout and "  pre_ln: True" in result.stdout
    assert not list(home.iterdir())  # a dry run writes nothing
