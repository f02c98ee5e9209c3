"""Orbax checkpoints of the train state (params, optimizer state, step, RNG) and metadata.

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when
complete), so an interrupted save never becomes the latest checkpoint.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
    """`CheckpointManager` over ``<workdir>/checkpoints``: keep the last `keep`, save every
    `every` steps (and whenever `force` is passed)."""

    def __init__(self, workdir: str, *, keep: int = 3, every: int = 1000):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every, create=True
            ),
            item_names=("state", "meta"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def restore(self, step: int, abstract_state):
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
