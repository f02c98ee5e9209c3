"""A built-in sequence-to-sequence task that needs no files: sequence reversal.

Token ids: 0 = padding (`PAD_ID`), 1 = end of sequence (`EOS_ID`), 2 .. V-1 = symbols. The
target of a source ``[a, b, c]`` is ``[c, b, a, EOS]``. Batches are a pure function of
``(seed, split, index)``, so a resumed run sees exactly the batches it would have seen, with
no iterator state.
"""

from __future__ import annotations

import numpy as np

from attention_jax.data.tokenizer import EOS_ID, PAD_ID

_SPLITS = {"train": 0, "validation": 1, "test": 2}


def reversal_batch(
    index: int,
    *,
    batch_size: int,
    vocab_size: int,
    min_len: int,
    max_len: int,
    seed: int = 0,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
) -> dict:
    """Batch number `index` of a split: ``{'inputs': [b, max_len], 'targets': [b, max_len+1]}``
    int32, right-padded. With several processes, each gets its own ``batch_size /
    process_count`` rows of the same global batch."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    if vocab_size < 3 or not 1 <= min_len <= max_len:
        raise ValueError(
            f"reversal task needs vocab_size >= 3 and 1 <= min_len <= max_len, got "
            f"vocab_size={vocab_size}, min_len={min_len}, max_len={max_len}"
        )
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    lengths = rng.integers(min_len, max_len + 1, size=batch_size)
    symbols = rng.integers(2, vocab_size, size=(batch_size, max_len))
    keep = np.arange(max_len)[None, :] < lengths[:, None]  # [b, max_len]
    inputs = np.where(keep, symbols, PAD_ID)
    targets = np.zeros((batch_size, max_len + 1), np.int64)
    for row, n in enumerate(lengths):
        targets[row, :n] = inputs[row, :n][::-1]
        targets[row, n] = EOS_ID
    rows = slice(
        process_index * batch_size // process_count,
        (process_index + 1) * batch_size // process_count,
    )
    return {"inputs": inputs[rows].astype(np.int32), "targets": targets[rows].astype(np.int32)}
