"""Test set-up: 8 fake CPU devices (for sharding tests) and strict JAX.

The device count must be fixed before JAX initialises its backends, so it is set here, at
import time of the first conftest, before any test module imports jax.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by the xdist workers and by the CLI subprocesses
# the tests start (they inherit the environment): the same tiny models are compiled by many
# tests, and a cached executable loads in milliseconds instead of compiling for seconds. The
# key is a hash of the program, the compile options and the jax version, so an entry is never
# stale. Outside the clone, so repeated runs on one machine reuse it; any writable folder will
# do (ATTENTION_JAX_TEST_CACHE overrides, an empty value turns the cache off).
_cache = os.environ.get(
    "ATTENTION_JAX_TEST_CACHE",
    str(pathlib.Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
        / "attention_jax" / "jax-test-cache"),
)  # fmt: skip
if _cache:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    # JAX writes entries in place: a reader racing a writer (two workers compiling one
    # program), or a process killed mid-write (the chaos tests), finds a partial entry, warns
    # and compiles afresh, which is the right outcome; the warning is not a failure.
    _partial = "ignore:Error reading persistent compilation cache entry"
    _inherited = os.environ.get("PYTHONWARNINGS", "")
    if _partial not in _inherited:
        os.environ["PYTHONWARNINGS"] = ",".join(w for w in (_inherited, _partial) if w)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402  (after the environment above)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    """A fresh NumPy generator per test; the seed is in the failure report via its name."""
    return np.random.default_rng(0)
