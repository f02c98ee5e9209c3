"""Barriers between the processes of a multi-host run: the one place they are written.

A leaf (JAX only), so that every layer that needs to wait for the others (the data layer
while process 0 trains the vocabulary, the checkpointer while it moves a damaged checkpoint
aside) uses the same barrier.
"""

import jax
from jax.experimental import multihost_utils


def sync(name: str) -> None:
    """Waits until every process of a multi-host run got here (nothing in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
