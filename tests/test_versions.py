"""Honest versions: what setup.cfg promises is what the tests run with, and the Colab
notebook leaves the runtime's JAX alone.

- Each floor in setup.cfg (install_requires and the `test`/`notebooks` extras CI installs) is
  at most the version this environment runs the suite with, so no floor is a version nobody
  tested; `python_requires` admits the interpreter running the tests.
- The install cell of notebooks/04_colab_tpu.ipynb (what Colab runs) is executed as on Colab,
  with `subprocess.run` recorded instead of run and the runtime's jax/jaxlib/libtpu versions
  faked: every pip command must keep those exact versions (pinned by a constraint, or
  --no-deps), name none of them, and upgrade nothing.

Each check is also run on a broken copy of its input, which it must reject. No network; <1 s.
"""

import configparser
import json
import pathlib
import platform
import subprocess
import sys
import types
from importlib import metadata

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUP_CFG = ROOT / "setup.cfg"
COLAB_NOTEBOOK = ROOT / "notebooks" / "04_colab_tpu.ipynb"
# The extras CI installs (`pip install -e '.[test]'`; `notebooks` is a subset of `test`). The
# `tensorboard` extra is the log viewer, a separate program the code never imports.
TESTED_EXTRAS = ("test", "notebooks")
# The accelerator runtime's own packages: the notebook must never change them.
RUNTIME_JAX = ("jax", "jaxlib", "libtpu", "libtpu-nightly")
# pip options that replace installed packages, and options that take a value.
UPGRADING = ("-U", "--upgrade", "--upgrade-strategy", "--force-reinstall", "-I",
             "--ignore-installed")  # fmt: skip
WITH_VALUE = ("-c", "--constraint", "-r", "--requirement", "-t", "--target", "-i",
              "--index-url", "--extra-index-url", "-f", "--find-links")  # fmt: skip


# ----------------------------------------------------------------------------- setup.cfg


def _lines(value: str) -> list[str]:
    return [s for line in value.splitlines() if (s := line.strip()) and not s.startswith("#")]


def parse_setup_cfg(text: str) -> tuple[str, list[Requirement]]:
    """(python_requires, the requirements CI installs) of a setup.cfg's text."""
    cfg = configparser.ConfigParser()
    cfg.read_string(text)
    requirements = _lines(cfg["options"]["install_requires"])
    for extra in TESTED_EXTRAS:
        requirements += _lines(cfg["options.extras_require"][extra])
    return cfg["options"]["python_requires"], [Requirement(r) for r in requirements]


def floor(requirement: Requirement) -> Version | None:
    """The lowest version a requirement admits (its >=, ~= or == bound), None if unbounded."""
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "~=", "==")]
    return max(bounds, default=None)


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def floor_problems(requirements, installed=installed_version) -> list[str]:
    """One line per requirement whose floor is missing or not a version the suite runs with."""
    problems = []
    for requirement in requirements:
        name, lowest = requirement.name, floor(requirement)
        version = installed(name)
        if lowest is None:
            problems.append(f"{requirement}: no floor (it admits any version, tested or not)")
        elif version is None:
            problems.append(f"{requirement}: not installed here, so its floor {lowest} is untested")
        elif Version(version) < lowest:
            problems.append(
                f"{requirement}: floor {lowest} is above the tested (installed) {name} {version}"
            )
        elif not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: does not admit the tested (installed) {version}")
    return problems


def python_problems(python_requires: str, version: str) -> list[str]:
    if SpecifierSet(python_requires).contains(version):
        return []
    return [f"python_requires {python_requires!r} does not admit the tested Python {version}"]


def test_setup_cfg_floors_are_versions_the_suite_runs_with():
    python_requires, requirements = parse_setup_cfg(SETUP_CFG.read_text())
    assert {canonicalize_name(r.name) for r in requirements} >= {"jax", "flax", "numpy"}
    assert floor_problems(requirements) == []
    assert python_problems(python_requires, platform.python_version()) == []


def test_the_floor_checks_reject_untested_claims():
    text = SETUP_CFG.read_text()
    jax = Version(metadata.version("jax"))
    untested = f"jax>={jax.major}.{jax.minor + 1}"  # a release newer than the one tested
    for bad, expected in [
        (f"\n    {untested}\n", "above the tested"),
        ("\n    jax\n", "no floor"),
        ("\n    not-a-package-anyone-installed>=1.0\n", "not installed"),
        ("\n    jax>=0.4,<0.5\n", "does not admit"),
    ]:
        broken = text.replace("install_requires =\n", "install_requires =" + bad, 1)
        assert broken != text
        problems = floor_problems(parse_setup_cfg(broken)[1])
        assert len(problems) == 1 and expected in problems[0], (bad, problems)
    running = Version(platform.python_version())
    assert python_problems(f">={running.major}.{running.minor + 1}", str(running))
    assert python_problems(f"<{running.major}.{running.minor}", str(running))


# ------------------------------------------------------------------- the Colab install cell


def install_cell() -> str:
    """The source of the notebook's first code cell (the install cell), as Colab runs it."""
    cells = json.loads(COLAB_NOTEBOOK.read_text())["cells"]
    source = next(c["source"] for c in cells if c["cell_type"] == "code")
    return "".join(source) if isinstance(source, list) else source


def run_as_on_colab(source, versions, monkeypatch, tmp_path) -> list[tuple[list[str], str]]:
    """Executes `source` as Colab would, with `versions` ({name: version}) as the runtime's
    installed jax/jaxlib/libtpu and commands recorded, not run: [(argv, constraints text)]."""
    calls = []

    def fake_run(argv, *args, **kwargs):
        argv = [str(a) for a in argv]
        constraints = []
        for i, arg in enumerate(argv):
            if arg in ("-c", "--constraint") and i + 1 < len(argv):
                constraints.append(pathlib.Path(argv[i + 1]).read_text())
            elif arg.startswith("--constraint="):
                constraints.append(pathlib.Path(arg.split("=", 1)[1]).read_text())
        calls.append((argv, "\n".join(constraints)))
        return subprocess.CompletedProcess(argv, 0, "", "")

    def fake_version(name):
        if name in versions:
            return versions[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(subprocess, "check_call", fake_run)
    monkeypatch.setattr(metadata, "version", fake_version)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    exec(compile(source, str(COLAB_NOTEBOOK), "exec"), {"__name__": "__main__"})
    return calls


def cell_problems(calls, versions) -> list[str]:
    """One line per way the recorded commands could change the runtime's JAX."""
    pip = [(argv, c) for argv, c in calls if "pip" in argv and "install" in argv]
    if not pip:
        return ["no `pip install` command ran: the package is not installed"]
    problems = []
    for argv, constraints in pip:
        args = argv[argv.index("install") + 1 :]
        problems += [f"{a} in {argv}" for a in args if a.split("=")[0] in UPGRADING]
        if any(a in ("-r", "--requirement") or a.startswith("--requirement=") for a in args):
            problems.append(f"a requirements file (unchecked) in {argv}")
        positional = [
            a for i, a in enumerate(args)
            if not a.startswith("-") and (i == 0 or args[i - 1] not in WITH_VALUE)
        ]  # fmt: skip
        for arg in positional:
            try:
                name = canonicalize_name(Requirement(arg).name)
            except InvalidRequirement:
                problems.append(f"{arg!r}: not a requirement this check can read")
                continue
            if name in RUNTIME_JAX:
                problems.append(f"{arg!r} installs the runtime's {name} in {argv}")
        if "--no-deps" in args:
            continue
        pins = {}
        for line in _lines(constraints):
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier)
        for name, version in versions.items():
            if pins.get(name) != f"=={version}":
                problems.append(
                    f"{name} is not kept at the runtime's {version} (constraint: "
                    f"{pins.get(name)!r}) in {argv}"
                )
    return problems


TPU_RUNTIME = {"jax": "0.0.1", "jaxlib": "0.0.2", "libtpu": "0.0.3"}
GPU_RUNTIME = {"jax": "0.0.4", "jaxlib": "0.0.5+cuda12"}


@pytest.mark.parametrize("versions", [TPU_RUNTIME, GPU_RUNTIME], ids=["tpu", "no-libtpu"])
def test_colab_install_cell_keeps_the_runtimes_jax(versions, monkeypatch, tmp_path):
    calls = run_as_on_colab(install_cell(), versions, monkeypatch, tmp_path)
    assert cell_problems(calls, versions) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('"install", ', '"install", "-U", ', "-U in"),
        ('"install", ', '"install", "--upgrade-strategy=eager", ', "--upgrade-strategy"),
        ('"--constraint", keep,', "", "not kept at the runtime's"),
        ('"--constraint", keep,', '"--constraint", keep, "jax[tpu]",', "installs the runtime's"),
        ("metadata.version(name)", "'0.4.35'", "not kept at the runtime's"),
        ('"pip", "install"', '"pip", "download"', "no `pip install`"),
    ],
    ids=["upgrade", "eager", "unpinned", "jax-tpu", "hard-coded", "no-install"],
)
def test_the_cell_check_rejects_a_cell_that_could_change_jax(
    old, new, expected, monkeypatch, tmp_path
):
    source = install_cell()
    broken = source.replace(old, new)
    assert broken != source, f"{old!r} is not in the install cell: update this test"
    calls = run_as_on_colab(broken, TPU_RUNTIME, monkeypatch, tmp_path)
    problems = cell_problems(calls, TPU_RUNTIME)
    assert problems and any(expected in p for p in problems), problems
