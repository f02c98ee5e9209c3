"""The grain input pipeline: packed training batches, padded evaluation batches.

Training (`train_dataset`): deterministic, resumable, multi-host aware, and packed, so every
batch on every process has the same fixed shape (which multi-host
``jax.make_array_from_process_local_data`` needs) and little compute goes to padding::

    source                      {'source': str, 'target': str}, random access, N examples
      [process_index::process_count]   this process's share, taken BEFORE shuffling: the
                                       shares are disjoint and together cover every example
      shuffle(seed') . repeat()        a new order every epoch, forever
      tokenize                         inputs = encode(source) + [EOS], targets likewise
      length filter                    drop pairs with a side longer than max_length
      first-fit packing                batch_size bins of max_length tokens per side
      batch(batch_size)                -> one batch of numpy int32 [B, max_length] arrays
      prefetch                         a thread, or worker processes (`train_dataset`)

A batch has ``inputs``, ``targets`` (tokens, 0 = padding), ``inputs_positions``,
``targets_positions`` (position within its example, restarting at 0) and
``inputs_segmentation``, ``targets_segmentation`` (1, 2, ... = which example of the row;
0 = padding). ``batch_size`` is this process's rows: the global batch is
``process_count * batch_size`` rows of ``max_length`` tokens per side, so a budget of T tokens
per side means ``batch_size ≈ T / max_length / process_count``
(`tokens_per_batch_to_batch_size`).

Seeds: process p shuffles its share with ``shuffle_seed(seed, p)``, a hash of (seed, p).
grain reshuffles epoch e with seed' + e, so seed' = seed + p would give process 1 the order
process 0 uses one epoch later, and run seed 1 the order of run seed 0's next epoch; the hash
keeps all of them independent. Each process's stream is a function of (source, tokenizer,
seed, batch_size, max_length, process_index, process_count, worker_count) alone: rerunning
any process reproduces it exactly. A different process or worker count is a different
stream (resume with the same ones).

State: ``iter(train_dataset(...))`` is a grain ``DatasetIterator``; ``get_state()`` is a
JSON-able dict and ``set_state(state)`` on a fresh iterator of the same pipeline continues
with exactly the batches the saved one would have given next (also across epochs), so it
goes into the training checkpoint with ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore`` in an Orbax ``CheckpointManager``. `example_counts(state)` reads from
it how many examples were read and how many were dropped as too long.

What is dropped in training: pairs with a side longer than ``max_length`` tokens (EOS
included), counted; a shard in which nothing fits raises instead of looping forever. No
example is split across rows, and nothing is dropped at epoch ends (packing runs straight
through them, so a batch can hold the last examples of one epoch and the first of the next).

Evaluation (`eval_batches`) is unpacked and keeps everything: every example of the split
(this process's share), in file order, right-padded, truncated to ``max_length`` when longer.

Language modelling (`lm_train_dataset`, `lm_eval_batches`): the same stages on text
examples ``{'text': str}``, one side (``targets``) plus ``targets_bytes``, the UTF-8 bytes
each token stands for, from which `language_model_scores` gives bits per byte; long
examples are cut into pieces instead of dropped or truncated (see the section below).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np
from absl import flags

from attention_jax.data._checks import check_int
from attention_jax.data.tokenizer import EOS_ID, PAD_ID

SIDES = ("inputs", "targets")
BATCH_KEYS = (
    "inputs",
    "targets",
    "inputs_positions",
    "targets_positions",
    "inputs_segmentation",
    "targets_segmentation",
)
# grain's packer names -> ours (the names attention_jax.train.step.PACKING_KEYS reads).
_RENAME = {f"{side}_segment_ids": f"{side}_segmentation" for side in SIDES}
_FILTER_STATE = "length_filter"  # marks our filter's part of the nested iterator state


class Tokenizer(Protocol):
    """All the pipeline needs from a tokenizer: ids of a text, without EOS, all > EOS_ID."""

    def encode(self, text: str) -> np.ndarray: ...


# ---------------------------------------------------------------------------- checks


def _check_process(process_index: Any, process_count: Any) -> tuple[int, int]:
    process_count = check_int("process_count", process_count, 1)
    process_index = check_int("process_index", process_index, 0)
    if process_index >= process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    return process_index, process_count


def _check_random_access(source: Any) -> None:
    if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
        raise ValueError(
            f"source must have __len__ and __getitem__ (random access), got {type(source)}"
        )


def _check_source(source: Any, process_index: int, process_count: int) -> int:
    """The number of examples in this process's share; refuses an empty one."""
    _check_random_access(source)
    share = len(range(process_index, len(source), process_count))
    if share == 0:
        raise ValueError(
            f"process {process_index} of {process_count} gets no examples: the source has "
            f"{len(source)}"
        )
    return share


def _check_loader(num_threads: Any, prefetch: Any, worker_count: Any) -> tuple[int, int, int]:
    """The training pipelines' loader settings (`train_dataset`), each an int >= 0."""
    return (
        check_int("num_threads", num_threads, 0),
        check_int("prefetch", prefetch, 0),
        check_int("worker_count", worker_count, 0),
    )


def _check_tokenizer(tokenizer: Any) -> None:
    if not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(f"tokenizer must have encode(text) -> ids, got {type(tokenizer)}")


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Ids of `text` followed by EOS, int32 [n + 1]."""
    ids = np.asarray(tokenizer.encode(text))
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(
            f"tokenizer.encode must return a 1-D array of integer ids, got {ids.dtype} "
            f"{ids.shape} for {text!r}"
        )
    if ids.size and ids.min() <= EOS_ID:
        raise ValueError(
            f"tokenizer.encode gave a reserved id (PAD {PAD_ID} or EOS {EOS_ID}) for "
            f"{text!r}: {ids.tolist()}"
        )
    out = np.empty(ids.size + 1, np.int32)
    out[:-1] = ids
    out[-1] = EOS_ID
    return out


def _tokenize(tokenizer: Tokenizer, example: Mapping[str, str]) -> dict[str, np.ndarray]:
    return {
        "inputs": _encode(tokenizer, example["source"]),
        "targets": _encode(tokenizer, example["target"]),
    }


# ---------------------------------------------------------------------------- training


def shuffle_seed(seed: int, process_index: int) -> int:
    """The shuffle seed of one process: a hash of (seed, process_index) in [0, 2**32).

    Not ``seed + process_index``: grain shuffles epoch e with the seed plus e, so sums would
    make one process's epoch the next epoch of another."""
    seed = check_int("seed", seed, 0)
    state = np.random.SeedSequence((seed, process_index)).generate_state(1, np.uint32)
    return int(state[0])


def shard_and_shuffle(
    source: Any, *, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """This process's share of `source`, reshuffled each epoch, repeated forever.

    Element ``k * n + j`` (n = the share's size) is example j of epoch k's order; the share
    is the global indices ``process_index, process_index + process_count, ...``.
    """
    process_index, process_count = _check_process(process_index, process_count)
    _check_source(source, process_index, process_count)
    share = grain.MapDataset.source(source)[process_index::process_count]
    return share.shuffle(seed=shuffle_seed(seed, process_index)).repeat(None)


class _LengthFilterIterator(grain.DatasetIterator):
    """Drops examples with a side longer than max_length, counting them in its state."""

    def __init__(self, parent: grain.DatasetIterator, max_length: int, share: int):
        super().__init__(parent)
        self._max_length = max_length
        self._share = share
        self._read = 0
        self._dropped = 0
        self._dropped_in_a_row = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            example = next(self._parent)
            self._read += 1
            if all(len(example[side]) <= self._max_length for side in SIDES):
                self._dropped_in_a_row = 0
                return example
            self._dropped += 1
            self._dropped_in_a_row += 1
            if self._dropped_in_a_row >= self._share:
                raise ValueError(
                    f"no example of this process's {self._share} fits max_length="
                    f"{self._max_length} tokens per side (EOS included); nothing to train on"
                )

    def get_state(self) -> dict[str, Any]:
        counts = {"read": self._read, "dropped": self._dropped}
        return {"parent": self._parent.get_state(), _FILTER_STATE: counts}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._read = int(state[_FILTER_STATE]["read"])
        self._dropped = int(state[_FILTER_STATE]["dropped"])
        self._dropped_in_a_row = 0


class _LengthFilterIterDataset(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, max_length: int, share: int):
        super().__init__(parent)
        self._max_length = max_length
        self._share = share

    def __iter__(self) -> _LengthFilterIterator:
        return _LengthFilterIterator(self._parent.__iter__(), self._max_length, self._share)

    def __str__(self) -> str:
        return f"LengthFilterIterDataset(max_length={self._max_length})"


def _rename(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {_RENAME.get(k, k): v for k, v in batch.items()}


def train_dataset(
    source: Any,
    tokenizer: Tokenizer,
    *,
    seed: int,
    batch_size: int,
    max_length: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 0,
    prefetch: int = 2,
    worker_count: int = 0,
) -> grain.IterDataset:
    """Infinite packed training batches of this process's share of `source`.

    Each element is a dict of numpy int32 arrays [batch_size, max_length], keys
    `BATCH_KEYS`; see the module docstring for the stages, the seeds and the state.
    Where the work runs (none of it changes the batches, except worker_count):
    - ``num_threads`` > 0: that many threads read and tokenize ahead (the tokenizer must be
      thread-safe). Worth it for slow reads (remote storage), not for tokenizing: the GIL
      serialises it, and threads made the pipeline slower (benchmarks/input_pipeline.py;
      numbers in BUILD_NOTES.md), hence the default 0.
    - ``prefetch`` > 0: that many batches are packed ahead in a background thread.
    - ``worker_count`` > 0: that many worker processes run the whole pipeline, each on
      every worker_count-th element of the shuffled stream, ``prefetch`` batches ahead
      each; batches come round-robin. This is what keeps up with an accelerator: one
      process packs fewer tokens per second than the base model's step consumes on a GPU
      at the paper's batch, and 8 workers more (BUILD_NOTES.md, "Benchmark:
      benchmarks/input_pipeline.py"). The stream, and the state's format, depend on
      worker_count: resume with the same value. The source and the tokenizer must pickle
      (cloudpickle); workers take seconds to start, and the iterator should be closed
      (``it.close()``) when done.

    >>> it = iter(train_dataset(src, tok, seed=0, batch_size=64, max_length=256))
    >>> batch = next(it); state = it.get_state()   # JSON-able; it.set_state(state) resumes
    """
    process_index, process_count = _check_process(process_index, process_count)
    batch_size = check_int("batch_size", batch_size, 1)
    max_length = check_int("max_length", max_length, 2)  # one token + EOS
    num_threads, prefetch, worker_count = _check_loader(num_threads, prefetch, worker_count)
    _check_tokenizer(tokenizer)
    share = _check_source(source, process_index, process_count)

    ds = _encoded_stream(
        source,
        functools.partial(_tokenize, tokenizer),
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=num_threads,
        batch_size=batch_size,
    )
    ds = _LengthFilterIterDataset(ds, max_length, share)
    ds = _pack(ds, {side: max_length for side in SIDES}, batch_size, _rename)
    return _prefetch(ds, prefetch, worker_count)


def _encoded_stream(
    source: Any,
    encode,
    *,
    seed: int,
    process_index: int,
    process_count: int,
    num_threads: int,
    batch_size: int,
) -> grain.IterDataset:
    """The training pipelines' first stages: this process's share of `source`, shuffled
    and repeated (`shard_and_shuffle`), each example through `encode`, read ahead."""
    ds = shard_and_shuffle(
        source, seed=seed, process_index=process_index, process_count=process_count
    )
    ds = ds.map(encode)
    # Threads suit tokenizers that release the GIL (SentencePiece); a deep buffer smooths
    # the packer's bursts (it reads until a whole batch is full).
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8 * batch_size)
    return ds.to_iter_dataset(read)


def _pack(ds: grain.IterDataset, lengths: dict[str, int], batch_size: int, rename):
    """First-fit packing into rows of `lengths` tokens per key, `batch_size` rows a batch;
    the batch's keys through `rename`."""
    # batch_size bins: the packer emits all bins once an example fits in none, and every
    # bin is non-empty then (an empty bin takes any example that passed the filter), so
    # each batch below is exactly one packing round. Row order carries no information, so
    # the bins are not shuffled.
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=lengths, num_packing_bins=batch_size, shuffle_bins=False
    )
    return ds.batch(batch_size, drop_remainder=True).map(rename)


def _prefetch(ds: grain.IterDataset, prefetch: int, worker_count: int) -> grain.IterDataset:
    """`ds` run ahead: by ``worker_count`` processes (``prefetch`` batches each), else by a
    thread (``prefetch`` batches), else as it is."""
    if worker_count:
        # Worker w runs everything before this on elements w, w + worker_count, ... of the
        # shuffled stream; batches come round-robin. Deterministic for a fixed worker_count.
        options = grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=max(prefetch, 1)
        )
        _unparsed_flags_workaround()
        return ds.mp_prefetch(options)
    if prefetch:
        return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def _unparsed_flags_workaround() -> None:
    """grain 0.2.18's mp_prefetch reads the absl flag below even when absl has parsed no
    flags (any program not run by absl.app: tests, notebooks) and fails with
    UnparsedFlagAccessError (google/grain#1355, fixed upstream by falling back to the
    default). Marking that one flag as given lets it read its default, False; no other
    flag changes, and a later parse of the command line still sets it."""
    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS:
        flags.FLAGS[name].present = True


def example_counts(state: Mapping[str, Any]) -> dict[str, int]:
    """``{'read': examples read from the share so far, 'dropped': of them, too long}`` from
    a `train_dataset` iterator's ``get_state()`` (summed over worker processes). Counted up
    to the last batch handed out; ``read / share size`` is the number of epochs done."""
    counts, found, stack = {"read": 0, "dropped": 0}, False, [state]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            if _FILTER_STATE in node:
                found = True
                for key in counts:
                    counts[key] += int(node[_FILTER_STATE][key])
            stack.extend(node.values())
        elif isinstance(node, list | tuple):
            stack.extend(node)
    if not found:
        raise ValueError("state has no length-filter counts: is it a train_dataset iterator's?")
    return counts


def tokens_per_batch_to_batch_size(
    tokens_per_batch: int, max_length: int, *, process_count: int = 1, data_parallel: int = 1
) -> int:
    """Rows per process for a budget of `tokens_per_batch` tokens per side per step.

    The global rows, ``tokens_per_batch // max_length`` rounded DOWN (never over budget) to
    a multiple of lcm(data_parallel, process_count), so that they split evenly over the
    data-parallel devices and over the processes; returns them divided by process_count.
    The paper's 25,000 tokens at max_length 256 on 8 devices and 1 process: 96 rows.
    """
    tokens_per_batch = check_int("tokens_per_batch", tokens_per_batch, 1)
    max_length = check_int("max_length", max_length, 1)
    process_count = check_int("process_count", process_count, 1)
    data_parallel = check_int("data_parallel", data_parallel, 1)
    unit = math.lcm(data_parallel, process_count)
    rows = tokens_per_batch // max_length // unit * unit
    if rows == 0:
        raise ValueError(
            f"tokens_per_batch={tokens_per_batch} is less than one row of max_length="
            f"{max_length} tokens per device: the smallest global batch splitting over "
            f"data_parallel={data_parallel} devices and process_count={process_count} "
            f"processes is {unit} rows = {unit * max_length} tokens"
        )
    return rows // process_count


def padding_fraction(batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Fraction of the token slots that hold no real token, per side:
    ``{'inputs': f, 'targets': f}``. Packed batches count segment 0, unpacked ones PAD."""
    out = {}
    for side in SIDES:
        segments = batch.get(f"{side}_segmentation")
        padding = np.asarray(batch[side] if segments is None else segments) == 0
        out[side] = float(padding.mean()) if padding.size else 0.0
    return out


# -------------------------------------------------------------------------- evaluation


class _Batches:
    """An evaluation split's ``batches`` list: its length and iteration are the batches'."""

    batches: list[dict[str, np.ndarray]]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)


@dataclasses.dataclass(frozen=True)
class EvalSplit(_Batches):
    """One process's share of an evaluation split, ready to score.

    ``batches``: dicts with ``inputs``, ``targets`` (int32 [B, max_length], right-padded with
    0; both end in EOS unless truncated) and ``valid`` (bool [B]: False marks the all-zero
    rows that fill the last batches). ``sources`` and ``references`` are the raw strings of
    the valid rows in order (for BLEU on detokenized text), ``indices`` their positions in
    the split (int64 [n]). ``num_truncated``: examples cut to max_length.
    Iterating an EvalSplit iterates its batches.
    """

    batches: list[dict[str, np.ndarray]]
    sources: list[str]
    references: list[str]
    indices: np.ndarray
    num_truncated: int


def eval_batches(
    source: Any,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_length: int,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
) -> EvalSplit:
    """The first `limit` examples of `source` (all if None), this process's share
    (``[process_index::process_count]``), in file order, as unpacked padded batches.

    Nothing is dropped, so scores cover the whole split: a longer example is truncated to
    max_length tokens, its input keeping EOS last (the encoder sees a shortened sentence)
    and its target cut to its first max_length tokens (no EOS is invented, so the loss
    counts only real tokens); BLEU uses the untruncated reference strings. Every process
    gets the same number of batches, ceil(ceil(n / process_count) / batch_size), so
    multi-host evaluation runs the same number of steps everywhere; missing rows are all 0
    and ``valid = False``.
    """
    process_index, process_count = _check_process(process_index, process_count)
    batch_size = check_int("batch_size", batch_size, 1)
    max_length = check_int("max_length", max_length, 2)
    _check_tokenizer(tokenizer)
    _check_random_access(source)
    total = len(source)
    if limit is not None:
        total = min(check_int("limit", limit, 1), total)
    indices = np.arange(process_index, total, process_count, dtype=np.int64)
    per_process = -(-total // process_count)  # the largest share
    num_batches = -(-per_process // batch_size)

    sources, references, truncated = [], [], 0
    shape = (num_batches * batch_size, max_length)
    inputs, targets = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    for row, index in enumerate(indices):
        example = source[int(index)]
        sources.append(example["source"])
        references.append(example["target"])
        x, y = (_encode(tokenizer, example[k]) for k in ("source", "target"))
        if len(x) > max_length or len(y) > max_length:
            truncated += 1
            x = np.concatenate([x[: max_length - 1], x[-1:]])  # keep EOS last
            y = y[:max_length]
        inputs[row, : len(x)] = x
        targets[row, : len(y)] = y
    valid = np.arange(shape[0]) < len(indices)
    batches = [
        {"inputs": inputs[s], "targets": targets[s], "valid": valid[s]}
        for s in (slice(i, i + batch_size) for i in range(0, shape[0], batch_size))
    ]
    return EvalSplit(batches, sources, references, indices, truncated)


# ----------------------------------------------------------------- language modelling
#
# A text example is ``{'text': str}``; its tokens are ``encode(text) + [EOS]``, so the model
# learns where an example (a line, a paragraph) ends. Bytes: each token carries the number
# of UTF-8 bytes of the text it stands for (`Tokenizer.encode_with_bytes`), and EOS one byte,
# for the newline that ends the example in its file (plus any bytes the tokenizer dropped,
# none for this package's vocabularies). So an example of text t carries
# ``len(t.encode('utf-8')) + 1`` bytes in all, and a split's bytes are the size of its text
# written one example per line (for a line corpus without BOM or CRs: its file's size).
# Bits per byte = (sum of the per-token NLL in nats) / ln 2 / (sum of those tokens' bytes):
# `language_model_scores`.

LM_BATCH_KEYS = ("targets", "targets_positions", "targets_segmentation", "targets_bytes")
_LM_KEEP = {
    "targets": "targets",
    "targets_positions": "targets_positions",
    "targets_segment_ids": "targets_segmentation",
    "targets_bytes": "targets_bytes",
}


class TextTokenizer(Protocol):
    """What the LM pipeline needs: ids of a text (without EOS, all > EOS_ID) and the UTF-8
    bytes each id stands for."""

    def encode_with_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...


def _check_text_tokenizer(tokenizer: Any) -> None:
    if not callable(getattr(tokenizer, "encode_with_bytes", None)):
        raise ValueError(
            f"tokenizer must have encode_with_bytes(text) -> (ids, bytes), got {type(tokenizer)}"
        )


def encode_text(tokenizer: TextTokenizer, text: str) -> dict[str, np.ndarray]:
    """``{'targets': ids + [EOS], 'targets_bytes': bytes per token}``, int32 [n + 1] each;
    the bytes sum to ``len(text.encode('utf-8')) + 1`` (EOS: 1 byte, the example's newline,
    plus whatever the tokenizer's counts left out)."""
    ids, counts = tokenizer.encode_with_bytes(text)
    ids, counts = np.asarray(ids), np.asarray(counts)
    if ids.ndim != 1 or counts.shape != ids.shape:
        raise ValueError(
            f"tokenizer.encode_with_bytes must return two 1-D arrays of one length, got "
            f"{ids.shape} and {counts.shape} for {text!r}"
        )
    if ids.size and (ids.min() <= EOS_ID or counts.min() < 0):
        raise ValueError(
            f"tokenizer.encode_with_bytes gave a reserved id (PAD {PAD_ID} or EOS {EOS_ID}) or "
            f"a negative byte count for {text!r}: {ids.tolist()}, {counts.tolist()}"
        )
    total = len(text.encode("utf-8"))
    covered = int(counts.sum())
    if covered > total:
        raise ValueError(
            f"tokenizer.encode_with_bytes counted {covered} bytes for {text!r}, which has {total}"
        )
    targets = np.append(ids, EOS_ID).astype(np.int32)
    return {
        "targets": targets,
        "targets_bytes": np.append(counts, 1 + total - covered).astype(np.int32),
    }


def _encode_example(tokenizer: TextTokenizer, example: Mapping[str, str]) -> dict:
    return encode_text(tokenizer, example["text"])


def chunk_example(example: Mapping[str, np.ndarray], max_length: int) -> list[dict]:
    """An encoded example cut into consecutive pieces of at most ``max_length`` tokens (one
    piece when it fits). Each piece is packed as an example of its own (positions restart at
    0; a piece after the first does not see the ones before it), so no token is dropped."""
    n = len(example["targets"])
    return [{k: v[i : i + max_length] for k, v in example.items()} for i in range(0, n, max_length)]


class _Chunk(grain.experimental.FlatMapTransform):
    max_fan_out = 1 << 20  # unused by IterDataset flat maps (no index arithmetic)

    def __init__(self, max_length: int):
        self.max_length = max_length

    def flat_map(self, element):
        return chunk_example(element, self.max_length)


def _lm_rename(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {new: batch[old] for old, new in _LM_KEEP.items()}


def lm_train_dataset(
    source: Any,
    tokenizer: TextTokenizer,
    *,
    seed: int,
    batch_size: int,
    max_length: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 0,
    prefetch: int = 2,
    worker_count: int = 0,
) -> grain.IterDataset:
    """Infinite packed language-model batches of this process's share of `source` (random
    access to ``{'text': str}``).

    Each element is a dict of numpy int32 arrays [batch_size, max_length], keys
    `LM_BATCH_KEYS`: ``targets`` (tokens, each example ending in EOS; 0 = padding),
    ``targets_positions``, ``targets_segmentation`` (as in `train_dataset`) and
    ``targets_bytes`` (the UTF-8 bytes each token stands for; see above). Stages as in
    `train_dataset` (shard, then shuffle with `shuffle_seed`, repeat, tokenize, first-fit
    packing, batch, prefetch; the same state and resume guarantees), except that nothing is
    dropped: an example longer than ``max_length`` tokens is cut into pieces
    (`chunk_example`), and a resumed iterator continues inside a cut example exactly.
    ``example_counts`` does not apply (there is no length filter).
    """
    process_index, process_count = _check_process(process_index, process_count)
    batch_size = check_int("batch_size", batch_size, 1)
    max_length = check_int("max_length", max_length, 1)
    num_threads, prefetch, worker_count = _check_loader(num_threads, prefetch, worker_count)
    _check_text_tokenizer(tokenizer)
    _check_source(source, process_index, process_count)

    ds = _encoded_stream(
        source,
        functools.partial(_encode_example, tokenizer),
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=num_threads,
        batch_size=batch_size,
    )
    ds = grain.experimental.FlatMapIterDataset(ds, _Chunk(max_length))
    lengths = {"targets": max_length, "targets_bytes": max_length}
    ds = _pack(ds, lengths, batch_size, _lm_rename)
    return _prefetch(ds, prefetch, worker_count)


@dataclasses.dataclass(frozen=True)
class LMEvalSplit(_Batches):
    """One process's share of a text split, ready to score.

    ``batches``: dicts with `LM_BATCH_KEYS` (int32 [B, max_length]) and ``valid`` (bool
    [B]: False marks the all-zero rows that fill the last batches). ``num_examples``,
    ``num_tokens`` (EOS included) and ``num_bytes`` (UTF-8 bytes + 1 per example) are the
    share's totals, which the batches' tokens and ``targets_bytes`` sum to.
    Iterating an LMEvalSplit iterates its batches.
    """

    batches: list[dict[str, np.ndarray]]
    num_examples: int
    num_tokens: int
    num_bytes: int


def lm_eval_batches(
    source: Any,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    max_length: int,
    packed: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    limit: int | None = None,
) -> LMEvalSplit:
    """The first `limit` examples of `source` (all if None), this process's share
    (``[process_index::process_count]``), in order, as evaluation batches that hold every
    token once: an example longer than ``max_length`` tokens is cut into pieces
    (`chunk_example`), as in training. ``packed``: pieces go into rows in order, a new row
    when the next piece does not fit in the current one (segments 1, 2, ...); else one piece
    per row. Both score the same tokens with the same context, so their sums agree. Every
    process gets the same number of batches (rows of all 0 with ``valid = False`` fill in).
    """
    process_index, process_count = _check_process(process_index, process_count)
    batch_size = check_int("batch_size", batch_size, 1)
    max_length = check_int("max_length", max_length, 1)
    _check_text_tokenizer(tokenizer)
    _check_random_access(source)
    total = len(source)
    if limit is not None:
        total = min(check_int("limit", limit, 1), total)

    def rows_of(index_range) -> list[list[dict]]:
        rows, row, used = [], [], 0
        for index in index_range:
            for piece in chunk_example(
                encode_text(tokenizer, source[int(index)]["text"]), max_length
            ):
                n = len(piece["targets"])
                if row and (not packed or used + n > max_length):
                    rows.append(row)
                    row, used = [], 0
                row.append(piece)
                used += n
        return rows + ([row] if row else [])

    # Every process packs every share to learn the largest row count (cheap next to scoring).
    shares = [range(p, total, process_count) for p in range(process_count)]
    mine = rows_of(shares[process_index])
    most = max(len(rows_of(share)) for share in shares) if process_count > 1 else len(mine)
    num_rows = max(-(-most // batch_size), 1) * batch_size
    arrays = {k: np.zeros((num_rows, max_length), np.int32) for k in LM_BATCH_KEYS}
    for r, row in enumerate(mine):
        start = 0
        for s, piece in enumerate(row, start=1):
            n = len(piece["targets"])
            window = slice(start, start + n)
            arrays["targets"][r, window] = piece["targets"]
            arrays["targets_bytes"][r, window] = piece["targets_bytes"]
            arrays["targets_positions"][r, window] = np.arange(n)
            arrays["targets_segmentation"][r, window] = s
            start += n
    valid = np.arange(num_rows) < len(mine)
    batches = [
        {
            **{k: v[i : i + batch_size] for k, v in arrays.items()},
            "valid": valid[i : i + batch_size],
        }
        for i in range(0, num_rows, batch_size)
    ]
    return LMEvalSplit(
        batches,
        num_examples=len(shares[process_index]),
        num_tokens=int((arrays["targets_segmentation"] > 0).sum()),
        num_bytes=int(arrays["targets_bytes"].sum()),
    )


def language_model_scores(nll_nats: float, num_tokens: float, num_bytes: float) -> dict[str, float]:
    """Per-token loss, perplexity and bits per byte from sums over the same tokens:
    ``nll_nats`` (the summed negative log-likelihood, natural log), ``num_tokens`` (how
    many tokens it sums over, EOS included) and ``num_bytes`` (their ``targets_bytes``).

    loss = nll / tokens (nats per token); perplexity = exp(loss); bits_per_byte =
    nll / ln(2) / bytes, the figure that compares models with different vocabularies.
    A count of 0 gives NaN for what divides by it."""
    nll, tokens, count = float(nll_nats), float(num_tokens), float(num_bytes)
    for name, value in (("nll_nats", nll), ("num_tokens", tokens), ("num_bytes", count)):
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"{name} must be >= 0, got {value}")
    loss = nll / tokens if tokens else math.nan
    return {
        "loss": loss,
        "perplexity": math.inf if loss > 700 else math.exp(loss),  # NaN stays NaN
        "bits_per_byte": nll / math.log(2) / count if count else math.nan,
    }


__all__: Sequence[str] = (
    "BATCH_KEYS",
    "LM_BATCH_KEYS",
    "EvalSplit",
    "LMEvalSplit",
    "Tokenizer",
    "chunk_example",
    "encode_text",
    "eval_batches",
    "example_counts",
    "language_model_scores",
    "lm_eval_batches",
    "lm_train_dataset",
    "padding_fraction",
    "shard_and_shuffle",
    "shuffle_seed",
    "tokens_per_batch_to_batch_size",
    "train_dataset",
)
