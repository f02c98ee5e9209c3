"""What checkpoint digests cost: save and restore time of a train state with and without
them (issue 19; goal: at most 10% slower).

    python benchmarks/checkpoint_digest.py                  # the base model, V=32000
    python benchmarks/checkpoint_digest.py --repeats 5 --dir /fast/disk

The state is the one `experiments/train.py` builds for TransformerConfig.base (params, Adam's
two moments, step, RNG), its floating-point leaves filled with random values (a trained
state's bytes: neither zeros nor anything a compressor shrinks). Each repeat saves it to a
fresh directory through `Checkpointer.save` (the part the training loop waits for) +
`wait` (the rest of the asynchronous save, the digests included: Orbax's save thread) and
restores it through `Checkpointer.restore_newest` (they are checked there), once with
digests and once without (``write_digests`` / ``verify_digests`` replaced by no-ops), the
order alternating. The files are in the page cache when they are hashed and read back, as
right after a save; a restore from a cold disk reads them once more for the digests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.model import Transformer
from attention_jax.nn.sharding import make_mesh
from attention_jax.train.step import create_train_state, make_optimizer
from attention_jax.workdir import checkpoint


def base_state(vocab_size: int, seed: int = 0):
    cfg = TransformerConfig.base(vocab_size=vocab_size)
    batch = {"inputs": jnp.ones((2, 16), jnp.int32), "targets": jnp.ones((2, 16), jnp.int32)}
    state, shardings = create_train_state(
        Transformer(cfg), make_optimizer(cfg.d_model), batch, jax.random.key(seed), make_mesh()
    )
    rng = np.random.default_rng(seed)

    def fill(x, s):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jax.device_put(rng.standard_normal(x.shape, np.float32).astype(x.dtype), s)

    return jax.tree.map(fill, state, shardings), shardings


def once(directory: str, state, abstract, digests: bool) -> tuple[float, float, float]:
    write, verify = checkpoint.write_digests, checkpoint.verify_digests
    if not digests:
        checkpoint.write_digests = lambda step_dir: None
        checkpoint.verify_digests = lambda step_dir, select=None: (None, None)
    try:
        ckpt = checkpoint.Checkpointer(directory, data_state=False, log=lambda m: None)
        start = time.perf_counter()
        ckpt.save(1, state, {"benchmark": True}, force=True)
        blocking = time.perf_counter() - start  # what the training loop waits for
        ckpt.wait()
        saved = time.perf_counter() - start
        ckpt.close()
        ckpt = checkpoint.Checkpointer(directory, data_state=False, create=False)
        start = time.perf_counter()
        step, restored = ckpt.restore_newest(abstract)
        jax.block_until_ready(restored)
        restored_in = time.perf_counter() - start
        ckpt.close()
        assert step == 1
        step_dir = os.path.join(ckpt.directory, "1")
        assert os.path.exists(os.path.join(step_dir, checkpoint.DIGESTS_FILE)) == digests
    finally:
        checkpoint.write_digests, checkpoint.verify_digests = write, verify
    return blocking, saved, restored_in


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="", help="where the checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    state, shardings = base_state(args.vocab_size)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    root = tempfile.mkdtemp(prefix="aj_digest_", dir=args.dir or None)
    times = {True: [], False: []}
    try:
        once(os.path.join(root, "warmup"), state, abstract, True)  # compiles, warms caches
        for r in range(args.repeats):
            for digests in (r % 2 == 0, r % 2 != 0):
                directory = os.path.join(root, f"{r}-{digests}")
                times[digests].append(once(directory, state, abstract, digests))
                shutil.rmtree(directory)
        step_dir = os.path.join(root, "warmup", "checkpoints", "1")
        files = checkpoint._files(step_dir)
        on_disk = sum(os.path.getsize(os.path.join(step_dir, n)) for n in files)
        start = time.perf_counter()
        checkpoint.file_digests(step_dir)
        hashing = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"train state {size / 2**20:.0f} MiB in memory, {on_disk / 2**20:.0f} MiB in "
        f"{len(files)} files; sha256 of them all: {hashing:.2f} s "
        f"({on_disk / hashing / 1e9:.2f} GB/s, {os.cpu_count()} CPUs)"
    )
    print("| | save() blocks (s) | save + wait (s) | restore (s) |")
    print("|---|---|---|---|")
    medians = {}
    for digests in (False, True):
        columns = list(zip(*times[digests], strict=True))
        medians[digests] = [statistics.median(c) for c in columns]
        print(
            f"| {'with' if digests else 'without'} digests | "
            + " | ".join(
                f"{m:.2f} ({', '.join(f'{t:.2f}' for t in c)})"
                for m, c in zip(medians[digests], columns, strict=True)
            )
            + " |"
        )
    slower = [100 * (medians[True][i] / medians[False][i] - 1) for i in range(3)]
    print(
        f"digests cost (medians): save() {slower[0]:+.1f}%, save + wait {slower[1]:+.1f}%, "
        f"restore {slower[2]:+.1f}%"
    )


if __name__ == "__main__":
    main()
