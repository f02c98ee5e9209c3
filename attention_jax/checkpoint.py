"""Orbax checkpoints of the train state (params, optimizer state, step, RNG), metadata (the
model's shape, the vocabulary's fingerprint) and the data iterator's state (grain's).

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when
complete), so an interrupted save never becomes the latest checkpoint.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """`CheckpointManager` over ``<workdir>/checkpoints``: keep the last `keep`, save every
    `every` steps (and whenever `force` is passed)."""

    def __init__(self, workdir: str, *, keep: int = 3, every: int = 1000, data_state: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        if data_state:  # grain writes one small JSON file per process
            import grain

            handlers["data"] = grain.checkpoint.CheckpointHandler()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every, create=True
            ),
            item_handlers=handlers,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state, meta: dict, *, force: bool = False, data_iterator=None
    ) -> bool:
        """Saves (asynchronously) if `step` is due or `force`; with `data_iterator`, its
        state too, so a resumed run continues the exact data stream."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state, *, data_iterator=None):
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (and
        the data iterator's position into `data_iterator`, in place)."""
        items = {
            "state": ocp.args.StandardRestore(abstract_state),
            "meta": ocp.args.JsonRestore(),
        }
        if data_iterator is not None:
            import grain

            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["meta"]

    def restore_on_one_device(self, step: int, device=None) -> dict:
        """The state saved at `step` as a plain tree on one device (default: the first local
        one), whatever mesh or number of hosts wrote it: for evaluation, decoding and
        averaging on a machine other than the one that trained."""
        device = jax.local_devices()[0] if device is None else device
        one = jax.sharding.SingleDeviceSharding(device)
        saved = self.manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), saved)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"]

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def average_checkpoints(workdir: str, last_k: int):
    """The mean of the params of the last `last_k` checkpoints in `workdir` (the paper averages
    the last 5 checkpoints for base models and 20 for big ones, section 6.1).

    Returns ``(params, steps)``: params as host NumPy arrays (float32 sums, cast back to each
    leaf's dtype) and the steps averaged. Raises if fewer than `last_k` checkpoints exist.
    """
    if isinstance(last_k, bool) or not isinstance(last_k, int) or last_k < 1:
        raise ValueError(f"last_k must be a positive int, got {last_k!r}")
    ckpt = Checkpointer(workdir)
    try:
        steps = sorted(ckpt.manager.all_steps())[-last_k:]
        if len(steps) < last_k:
            raise ValueError(
                f"average_checkpoints: asked for the last {last_k} checkpoints, but "
                f"{ckpt.directory} holds {len(steps)} ({steps})"
            )
        total, dtypes = None, None
        for step in steps:
            restored = ckpt.restore_on_one_device(step)
            params = jax.tree.map(np.asarray, restored["params"])
            if total is None:
                dtypes = jax.tree.map(lambda x: x.dtype, params)
                total = jax.tree.map(lambda x: x.astype(np.float32), params)
            else:
                total = jax.tree.map(lambda t, x: t + x.astype(np.float32), total, params)
    finally:
        ckpt.close()
    mean = jax.tree.map(lambda t, d: (t / len(steps)).astype(d), total, dtypes)
    return mean, steps
