"""The chaos harness, benchmarks/chaos.py, loaded once for the tests that drive training runs
as subprocesses (tests/test_chaos.py, tests/test_checkpoint_recovery.py)."""

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_harness():
    name = "benchmarks_chaos"  # registered: its dataclasses look their module up
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "chaos.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


chaos = _load_harness()
