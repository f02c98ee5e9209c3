"""The chaos harness, benchmarks/chaos.py, loaded once for the tests that drive training runs
as subprocesses (tests/test_chaos.py, tests/test_checkpoint_recovery.py)."""

import importlib.util
import pathlib
import sys

from shared_fixtures import build_once, shared_root

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_harness():
    name = "benchmarks_chaos"  # registered: its dataclasses look their module up
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "chaos.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


chaos = _load_harness()


def session_env(tmp_path_factory) -> dict:
    """The training subprocesses' environment, with one JAX compilation cache for all xdist
    workers of the session: test_chaos.py and test_checkpoint_recovery.py launch the same
    reversal model, so whichever worker compiles a program first serves the other."""
    return chaos.child_env(str(shared_root(tmp_path_factory) / "chaos_jax_cache"))


def trained_once(tmp_path_factory, name: str, steps: int, every: int, env: dict) -> str:
    """A reversal run of `steps` steps (a checkpoint every `every`), never interrupted,
    trained once per session whichever worker asks first (shared_fixtures.build_once).
    Shared: a test may read it, never write it (copy it first)."""

    def build(path):
        path.mkdir()
        code, out = chaos.run_to_completion(str(path / "w"), steps, every, env, str(path / "log"))
        assert code == 0, out

    return str(build_once(tmp_path_factory, name, build) / "w")
