"""Sharding is data: a device mesh with named axes and one table of logical-axis rules.

Every parameter carries logical axis names (``vocab, embed, heads, kv, mlp, position``, and
``kv_heads`` for grouped-query key/value heads; see layers.py). A rules table maps each
logical name to a mesh axis (or None = replicated), and batches are split along ``data``
(and ``fsdp``). A name without a rule is replicated: the default table has none for
``kv_heads``, so any K works on any ``model`` axis (add ``("kv_heads", "model")`` when the
model axis divides K). Under ``scan_layers`` the stacked layer parameters have a leading
``layers`` axis (replicated by default: every device holds every layer's shard).

Activations carry logical names too (``nn.with_logical_constraint`` in model.py and
layers.py): ``activation_batch, activation_length, activation_embed`` for the residual
stream [B, T, D], ``activation_heads, activation_kv`` for the attention heads [B, T, N, H],
``activation_mlp`` for the feed-forward hidden [B, T, F] and ``activation_vocab`` for the
logits [B, T, V]. Their rules (`ACTIVATION_RULES`) split batch rows as the batches are split
and the heads, feed-forward width and vocabulary over ``model``, as the parameters that
produce them are, so a ``model``-parallel mesh does not replicate them. The constraints act
only inside `under_rules` (the jitted train and eval steps and `create_train_state` trace
under it); elsewhere (decoding, a bare ``model.apply``) they are no-ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# Megatron-style tensor parallelism over `model` (heads, feed-forward width, vocabulary),
# optional FSDP over `embed`, data parallelism over `data`.
PARAMETER_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("position", None),
    ("layers", None),  # the stacked layer axis under scan_layers
)

# Activations: batch rows over data x fsdp (as `batch_sharding` splits the batches), heads,
# feed-forward width and vocabulary over `model` (as their parameters), length, embed and the
# head dimension whole. A heads count the model axis does not divide is still correct
# (GSPMD pads the shards), only less even.
ACTIVATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "model"),
    ("activation_kv", None),
    ("activation_mlp", "model"),
    ("activation_vocab", "model"),
)

DEFAULT_RULES = PARAMETER_RULES + ACTIVATION_RULES


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
    """A mesh over all (or the given) devices with axes ``('data', 'fsdp', 'model')``.

    One size may be -1, meaning "the rest of the devices". The devices are laid out by
    ``jax.make_mesh``: along the physical torus on TPUs (so the ``model`` axis, the last
    and most talkative, gets neighbouring chips), by XLA's topology-aware device ids on
    GPUs, in the order given on CPU. The axes are ``AxisType.Auto``: the steps give
    shardings to ``jit`` and the constraints, and the compiler propagates the rest.
    (``jax.make_mesh`` defaults to ``Explicit`` axes since JAX 0.7, where each array's
    sharding is part of its type and ops with ambiguous shardings must be annotated.)
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = {"data": data, "fsdp": fsdp, "model": model}
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name} must be a positive int or -1, got {size!r}")
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if rest:
        if len(devices) % known:
            raise ValueError(
                f"mesh {sizes}: the fixed axes ({known} devices) do not divide the "
                f"{len(devices)} available devices"
            )
        sizes[rest[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(
            f"mesh {sizes} needs {total} devices, but {len(devices)} are available "
            f"({devices[0].platform}); use -1 for one axis to take the rest"
        )
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def check_rules(rules: Sequence[tuple[str, str | None]]) -> tuple:
    """Validates a logical-axis rules table: known mesh axes, no logical name twice.

    Returns it as a tuple of ``(name, axis)`` pairs, a list of mesh axes (as a rules table
    read back from ``config.json`` has them) turned into a tuple."""
    seen = set()
    out = []
    for rule in rules:
        if isinstance(rule, str) or len(rule) != 2:
            raise ValueError(f"a sharding rule is (logical_name, mesh_axis or None), got {rule!r}")
        logical, axis = rule
        if logical in seen:
            raise ValueError(f"sharding rules name logical axis {logical!r} twice")
        seen.add(logical)
        if isinstance(axis, list):
            axis = tuple(axis)
        axes = axis if isinstance(axis, tuple) else (axis,)
        for a in axes:
            if a is not None and a not in MESH_AXES:
                raise ValueError(
                    f"sharding rule {tuple(rule)!r} maps to unknown mesh axis {a!r}; "
                    f"mesh axes are {MESH_AXES}"
                )
        out.append((logical, axis))
    return tuple(out)


def complete_rules(rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> tuple:
    """`check_rules`, then the `ACTIVATION_RULES` entry of each activation name the table
    does not name, appended: a table written for the parameters alone (as every one before
    activation names existed) keeps the activations sharded, instead of replicating them
    by omission. To replicate an activation axis, name it: ``("activation_heads", None)``."""
    rules = check_rules(rules)
    named = {logical for logical, _ in rules}
    return rules + tuple(r for r in ACTIVATION_RULES if r[0] not in named)


@contextlib.contextmanager
def under_rules(mesh: Mesh, rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    """Traces what runs inside under `mesh` and the (completed) logical-axis `rules`, so the
    model's ``nn.with_logical_constraint`` calls take effect; use it inside the function
    given to ``jax.jit`` (``jax.set_mesh`` is refused there, and a context around the call
    would be missing from the jit's cache key). Outside it the constraints are no-ops."""
    with (
        jax.sharding.use_abstract_mesh(mesh.abstract_mesh),
        nn.logical_axis_rules(complete_rules(rules)),
    ):
        yield


def logical_shardings(boxed_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of ``nn.Partitioned`` values (or their abstract shapes),
    from their logical axis names and the rules. Unboxed leaves are replicated."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, complete_rules(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over ``data`` and ``fsdp`` along their first axis."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Places this process's share of a batch as global arrays split over data/fsdp.

    Each process passes its local rows (``global_batch / process_count``); the global batch
    size must be divisible by the data-parallel size.
    """
    sharding = batch_sharding(mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for name, local in batch.items():
        local = np.asarray(local)
        global_rows = local.shape[0] * jax.process_count()
        if global_rows % dp:
            raise ValueError(
                f"batch '{name}' has {global_rows} rows in all, not divisible by the "
                f"data-parallel size {dp} (mesh {dict(mesh.shape)})"
            )
        out[name] = jax.make_array_from_process_local_data(sharding, local)
    return out


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins a multi-process run (``jax.distributed.initialize``); call before any JAX work.

    With no arguments JAX detects the cluster itself (Cloud TPU pods, SLURM, Open MPI). On
    CPU the processes exchange data through gloo, so two processes on one machine
    (``coordinator_address='127.0.0.1:PORT'``) exercise the same multi-host code as a pod.
    """
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError(
            "give all of coordinator_address, num_processes and process_id, or none of "
            f"them (auto-detect); got {coordinator_address=}, {num_processes=}, {process_id=}"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    # Only affects the CPU backend: cross-process collectives between CPU devices need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
