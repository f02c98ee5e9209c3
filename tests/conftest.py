"""Test set-up: 8 fake CPU devices (for sharding tests) and strict JAX.

The device count must be fixed before JAX initialises its backends, so it is set here, at
import time of the first conftest, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    """A fresh NumPy generator per test; the seed is in the failure report via its name."""
    return np.random.default_rng(0)
