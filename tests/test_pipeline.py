"""The grain input pipeline: determinism, exact resume (also through Orbax), disjoint
per-process shares, packing that splits back into the original examples, length handling
in training (dropped, counted) and evaluation (truncated, nothing lost), bad inputs.

Two stand-in tokenizers (the pipeline only calls ``encode``): a word-level one over the
built-in toy corpus, and `IndexTokenizer` over a source whose example i is the number
``i + 2`` repeated, so that every packed segment names the example it came from.
"""

import json

import grain
import numpy as np
import pytest

from attention_jax.data import pipeline, toy_translation
from attention_jax.data.tokenizer import EOS_ID, PAD_ID


class WordTokenizer:
    """Word-level ids >= 3 over a fixed list of texts (0 PAD, 1 EOS, 2 unused)."""

    def __init__(self, texts):
        self.vocab = {}
        for text in texts:
            for word in text.split():
                self.vocab.setdefault(word, len(self.vocab) + 3)

    def encode(self, text):
        return np.array([self.vocab[w] for w in text.split()], np.int32)


class IndexTokenizer:
    """ "5 5 5" -> [5, 5, 5]."""

    def encode(self, text):
        return np.array([int(w) for w in text.split()], np.int32)


def indexed_source(n, long_every=0, max_length=16):
    """Example i: source = (i + 2) repeated 1 + i % 7 times, target 1 + (3 i) % 5 times; with
    `long_every`, every long_every-th example has a source of max_length tokens (EOS makes
    it one too long)."""
    examples = []
    for i in range(n):
        n_source = max_length if long_every and i % long_every == 0 else 1 + i % 7
        word = str(i + 2)
        examples.append(
            {"source": " ".join([word] * n_source), "target": " ".join([word] * (1 + 3 * i % 5))}
        )
    return examples


def take(ds, n):
    it = iter(ds)
    batches = [next(it) for _ in range(n)]
    return batches, it


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def segments(batch, side):
    """[(row, segment id, tokens, positions)] for every example packed in `batch`."""
    out = []
    tokens, seg, pos = (batch[side], batch[f"{side}_segmentation"], batch[f"{side}_positions"])
    for row in range(tokens.shape[0]):
        for s in np.unique(seg[row][seg[row] > 0]):
            where = seg[row] == s
            out.append((row, int(s), tokens[row][where], pos[row][where]))
    return out


def batch_indices(batch):
    """The source indices of the examples in a batch of an `indexed_source`."""
    return [int(tokens[0]) - 2 for _, _, tokens, _ in segments(batch, "inputs")]


@pytest.fixture(scope="module")
def toy():
    pairs = toy_translation.load_split("train", sizes=(2000, 1, 1))
    source = [{"source": s, "target": t} for s, t in pairs]
    return source, WordTokenizer([s + " " + t for s, t in pairs])


# --------------------------------------------------------------------- determinism


def test_same_seed_same_batches_other_seed_other_order(toy):
    source, tok = toy
    kwargs = dict(batch_size=8, max_length=32)
    a, _ = take(pipeline.train_dataset(source, tok, seed=3, **kwargs), 4)
    b, _ = take(pipeline.train_dataset(source, tok, seed=3, **kwargs), 4)
    c, _ = take(pipeline.train_dataset(source, tok, seed=4, **kwargs), 4)
    assert_same_batches(a, b)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])


def test_each_epoch_is_a_new_permutation_of_the_share():
    n = 40
    ds = pipeline.shard_and_shuffle(indexed_source(n), seed=0)
    epochs = [[int(ds[e * n + j]["source"].split()[0]) - 2 for j in range(n)] for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    assert epochs[0] != list(range(n))


def test_process_seeds_are_hashed_not_added():
    # grain shuffles epoch e with seed + e: with seed + process_index, process 1's epoch 0
    # would be process 0's epoch 1.
    seeds = {pipeline.shuffle_seed(s, p) for s in range(4) for p in range(4)}
    assert len(seeds) == 16
    assert pipeline.shuffle_seed(0, 1) != pipeline.shuffle_seed(0, 0) + 1
    assert all(0 <= s < 2**32 for s in seeds)


# -------------------------------------------------------------------------- resume


@pytest.mark.parametrize("k", [0, 3, 11])
def test_resume_gives_exactly_the_next_batches_across_epochs(k):
    source = indexed_source(60)  # ~8 examples per batch: an epoch is ~8 batches
    ds = pipeline.train_dataset(source, IndexTokenizer(), seed=1, batch_size=4, max_length=16)
    _, it = take(ds, k)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [next(it) for _ in range(20)]
    assert pipeline.example_counts(it.get_state())["read"] > 2 * len(source)  # epochs crossed

    fresh = iter(ds)
    fresh.set_state(state)
    assert_same_batches([next(fresh) for _ in range(20)], expected)
    # An equal pipeline built anew (as after a restart) resumes the same way.
    rebuilt = iter(
        pipeline.train_dataset(source, IndexTokenizer(), seed=1, batch_size=4, max_length=16)
    )
    rebuilt.set_state(state)
    assert_same_batches([next(rebuilt) for _ in range(20)], expected)


def test_state_round_trip_through_orbax_checkpoint_manager(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    source = indexed_source(50)
    ds = pipeline.train_dataset(source, IndexTokenizer(), seed=2, batch_size=4, max_length=16)
    _, it = take(ds, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(6)]

    fresh = iter(ds)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        restored = manager.restore(
            5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
        )
    assert restored["data"] is fresh
    assert_same_batches([next(fresh) for _ in range(6)], expected)


# ---------------------------------------------------------------------- multi-host


def test_process_shares_are_disjoint_and_cover_every_example():
    n, count = 101, 3
    source = indexed_source(n)
    seen = []
    for p in range(count):
        ds = pipeline.shard_and_shuffle(source, seed=7, process_index=p, process_count=count)
        share = len(range(p, n, count))
        epoch = [int(ds[j]["source"].split()[0]) - 2 for j in range(share)]
        assert sorted(epoch) == list(range(p, n, count))  # this process's slice, permuted
        seen += epoch
    assert sorted(seen) == list(range(n))  # disjoint, and together everything, once


def test_packed_streams_of_two_processes_are_disjoint():
    n = 200
    source = indexed_source(n)
    streams = []
    for p in range(2):
        ds = pipeline.train_dataset(
            source,
            IndexTokenizer(),
            seed=0,
            batch_size=4,
            max_length=16,
            process_count=2,
            process_index=p,
        )
        batches, it = take(ds, 6)  # < one epoch of the 100-example share
        assert pipeline.example_counts(it.get_state())["read"] < n // 2
        indices = [i for b in batches for i in batch_indices(b)]
        assert len(indices) == len(set(indices))  # nothing twice within an epoch
        assert all(i % 2 == p for i in indices)
        streams.append(set(indices))
    assert not streams[0] & streams[1]


# ---------------------------------------------------------------------- packing


def test_fixed_shape_token_budget_and_small_padding(toy):
    source, tok = toy
    batch_size, max_length = 16, 32
    batches, _ = take(
        pipeline.train_dataset(source, tok, seed=0, batch_size=batch_size, max_length=max_length),
        30,
    )
    fractions = []
    for batch in batches:
        assert set(batch) == set(pipeline.BATCH_KEYS)
        for key, value in batch.items():
            assert value.shape == (batch_size, max_length) and value.dtype == np.int32, key
        for side in pipeline.SIDES:
            real = batch[f"{side}_segmentation"] > 0
            assert real.sum(axis=1).max() <= max_length
            assert real.sum() <= batch_size * max_length  # the per-side token budget
        fractions.append(pipeline.padding_fraction(batch))
    for side in pipeline.SIDES:
        mean = np.mean([f[side] for f in fractions])
        assert 0 <= mean < 0.15, (side, mean)


def test_rows_split_back_into_the_original_examples():
    source = indexed_source(120)
    max_length = 16
    ds = pipeline.train_dataset(
        source, IndexTokenizer(), seed=5, batch_size=4, max_length=max_length
    )
    batches, it = take(ds, 12)
    tok = IndexTokenizer()
    packed = 0
    for batch in batches:
        for side, key in (("inputs", "source"), ("targets", "target")):
            tokens, seg = batch[side], batch[f"{side}_segmentation"]
            np.testing.assert_array_equal(seg == 0, tokens == PAD_ID)  # padding exactly
            for row in range(tokens.shape[0]):  # segments are 1, 2, ..., left to right
                ids = seg[row][seg[row] > 0]
                assert ids[0] == 1 and set(np.diff(ids)) <= {0, 1}
                assert np.all(seg[row][len(ids) :] == 0)  # padding only at the end
            for _, _, got, positions in segments(batch, side):
                index = int(got[0]) - 2
                want = np.append(tok.encode(source[index][key]), EOS_ID)
                np.testing.assert_array_equal(got, want)
                np.testing.assert_array_equal(positions, np.arange(len(want)))
        # A row's inputs and targets hold the same examples in the same segments.
        by_side = [
            [(r, s, int(t[0])) for r, s, t, _ in segments(batch, side)] for side in pipeline.SIDES
        ]
        assert by_side[0] == by_side[1]
        packed += len(by_side[0])
    counts = pipeline.example_counts(it.get_state())
    assert counts == {"read": packed, "dropped": 0}  # every example read is in a batch


def test_long_examples_are_dropped_in_training_and_counted():
    max_length = 16
    source = indexed_source(100, long_every=5, max_length=max_length)
    ds = pipeline.train_dataset(
        source, IndexTokenizer(), seed=0, batch_size=4, max_length=max_length
    )
    batches, it = take(ds, 10)
    indices = [i for b in batches for i in batch_indices(b)]
    assert indices and not [i for i in indices if i % 5 == 0]
    counts = pipeline.example_counts(it.get_state())
    order = pipeline.shard_and_shuffle(source, seed=0)
    read = [int(order[j]["source"].split()[0]) - 2 for j in range(counts["read"])]
    assert counts["dropped"] == sum(i % 5 == 0 for i in read) > 0
    assert counts["read"] - counts["dropped"] == len(indices)


def test_a_share_where_nothing_fits_raises_instead_of_looping():
    source = indexed_source(10, long_every=1, max_length=8)
    ds = pipeline.train_dataset(source, IndexTokenizer(), seed=0, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match=r"no example .* fits max_length=8"):
        next(iter(ds))


# ------------------------------------------------------------------------ helpers


def test_tokens_per_batch_to_batch_size():
    # The paper: ~25k tokens per side; at 256 tokens, 97 rows -> 96 (a multiple of 8).
    assert pipeline.tokens_per_batch_to_batch_size(25_000, 256, data_parallel=8) == 96
    # 2 processes, 4 devices: 64 rows in all, 32 per process.
    assert pipeline.tokens_per_batch_to_batch_size(4096, 64, process_count=2, data_parallel=4) == 32
    # 3 processes, 2 devices: global rows a multiple of 6 -> 60 rows, 20 per process.
    assert (
        pipeline.tokens_per_batch_to_batch_size(65 * 64, 64, process_count=3, data_parallel=2) == 20
    )
    with pytest.raises(ValueError, match=r"less than one row .* per device"):
        pipeline.tokens_per_batch_to_batch_size(100, 64, data_parallel=2)


def test_padding_fraction_by_hand():
    packed = {
        "inputs": np.array([[5, 6, 0, 0], [7, 1, 8, 1]]),
        "inputs_segmentation": np.array([[1, 1, 0, 0], [1, 1, 2, 2]]),
        "targets": np.array([[5, 0, 0, 0], [7, 0, 0, 0]]),
        "targets_segmentation": np.array([[1, 0, 0, 0], [1, 0, 0, 0]]),
    }
    assert pipeline.padding_fraction(packed) == {"inputs": 2 / 8, "targets": 6 / 8}
    unpacked = {"inputs": np.array([[3, 1, 0]]), "targets": np.array([[3, 4, 1]])}
    assert pipeline.padding_fraction(unpacked) == {"inputs": 1 / 3, "targets": 0.0}


# --------------------------------------------------------------------- evaluation


def test_eval_covers_every_example_once_in_order_truncating_long_ones():
    max_length, batch_size, n = 8, 4, 21
    source = indexed_source(n, long_every=6, max_length=max_length + 3)
    tok = IndexTokenizer()
    shares = [
        pipeline.eval_batches(
            source,
            tok,
            batch_size=batch_size,
            max_length=max_length,
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    # Same number of batches on every process (11 and 10 examples -> 3 batches of 4).
    assert [len(s) for s in shares] == [3, 3]
    merged = {}
    for p, share in enumerate(shares):
        np.testing.assert_array_equal(share.indices, np.arange(p, n, 2))
        assert share.sources == [source[i]["source"] for i in share.indices]
        assert share.references == [source[i]["target"] for i in share.indices]
        assert share.num_truncated == sum(i % 6 == 0 for i in share.indices)
        rows = []
        for batch in share:
            assert set(batch) == {"inputs", "targets", "valid"}
            assert batch["inputs"].shape == batch["targets"].shape == (batch_size, max_length)
            assert batch["inputs"].dtype == np.int32 and batch["valid"].dtype == bool
            assert not batch["inputs"][~batch["valid"]].any()  # filler rows are all 0
            assert not batch["targets"][~batch["valid"]].any()
            rows += [(batch["inputs"][r], batch["targets"][r]) for r in np.where(batch["valid"])[0]]
        assert len(rows) == len(share.indices)
        assert not share.batches[-1]["valid"].all()  # the last batch is padded
        for index, (x, y) in zip(share.indices, rows, strict=True):
            merged[int(index)] = (x, y)
    assert sorted(merged) == list(range(n))  # every example once
    for index, (x, y) in merged.items():
        want_x = np.append(tok.encode(source[index]["source"]), EOS_ID)
        want_y = np.append(tok.encode(source[index]["target"]), EOS_ID)
        if len(want_x) > max_length:  # truncated: the input keeps EOS last
            np.testing.assert_array_equal(x, np.append(want_x[: max_length - 1], EOS_ID))
        else:
            np.testing.assert_array_equal(x[: len(want_x)], want_x)
            assert not x[len(want_x) :].any()
        np.testing.assert_array_equal(y[: len(want_y)], want_y[:max_length])


def test_eval_limit_and_determinism(toy):
    source, tok = toy
    a = pipeline.eval_batches(source, tok, batch_size=16, max_length=32, limit=40)
    b = pipeline.eval_batches(source, tok, batch_size=16, max_length=32, limit=40)
    assert len(a) == 3 and a.sources == [e["source"] for e in source[:40]]
    assert_same_batches(a.batches, b.batches)
    assert int(sum(batch["valid"].sum() for batch in a)) == 40


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_length=1), "max_length must be an int >= 2, got 1"),
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(batch_size=2.0), "batch_size must be an int"),
        (dict(process_index=2, process_count=2), r"process_index must be in \[0, process_co"),
        (dict(process_index=-1), "process_index must be an int >= 0"),
        (dict(process_count=0), "process_count must be an int >= 1"),
        (dict(seed=-1), "seed must be an int >= 0"),
        (dict(process_index=11, process_count=12), "process 11 of 12 gets no examples"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    args = dict(seed=0, batch_size=4, max_length=16) | kwargs
    with pytest.raises(ValueError, match=match):
        pipeline.train_dataset(indexed_source(10), IndexTokenizer(), **args)
    eval_args = {k: v for k, v in args.items() if k != "seed"}
    if "seed" not in kwargs and "11" not in match:  # eval has no seed; an empty share is fine
        with pytest.raises(ValueError, match=match):
            pipeline.eval_batches(indexed_source(10), IndexTokenizer(), **eval_args)


def test_bad_tokenizer_and_source_are_refused():
    with pytest.raises(ValueError, match="tokenizer must have encode"):
        pipeline.train_dataset(indexed_source(4), object(), seed=0, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="source must have __len__ and __getitem__"):
        pipeline.train_dataset(iter([]), IndexTokenizer(), seed=0, batch_size=2, max_length=8)
    reserved = [{"source": "5 1 6", "target": "5"}]  # EOS inside a sentence
    with pytest.raises(ValueError, match=r"reserved id .* for '5 1 6'"):
        pipeline.eval_batches(reserved, IndexTokenizer(), batch_size=1, max_length=8)


def test_eval_process_with_no_examples_still_gets_the_batches_of_the_others():
    share = pipeline.eval_batches(
        indexed_source(10),
        IndexTokenizer(),
        batch_size=4,
        max_length=8,
        process_index=11,
        process_count=12,
    )
    assert len(share) == 1 and not share.batches[0]["valid"].any() and share.sources == []


def test_worker_processes_give_a_deterministic_resumable_stream():
    # Worker w packs every 2nd element of the shuffled stream: a different stream from
    # worker_count=0, but the same on every run, resumable, and still each example once
    # per epoch.
    source = indexed_source(200)
    ds = pipeline.train_dataset(
        source, IndexTokenizer(), seed=1, batch_size=4, max_length=16, worker_count=2
    )
    it = iter(ds)
    try:
        first = [next(it) for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
        expected = [next(it) for _ in range(6)]
        counts = pipeline.example_counts(it.get_state())
    finally:
        it.close()
    fresh = iter(ds)
    try:
        fresh.set_state(state)
        assert_same_batches([next(fresh) for _ in range(6)], expected)
    finally:
        fresh.close()
    indices = [i for b in first + expected for i in batch_indices(b)]
    assert counts == {"read": len(indices), "dropped": 0}
    assert len(indices) < len(source) and len(set(indices)) == len(indices)
