"""Language-model data: a local text corpus prepared by the command and read back exactly,
bad text files refused in one line, the packed LM pipeline (every token once, segments and
positions, seeds, resume, per-process shares), byte counts for bits per byte, `LMTask`.

Stand-in tokenizer (the pipeline only calls ``encode_with_bytes``): `SpanTokenizer` over a
source whose example i is the words ``b_i, b_i + 1, ...`` (one id per word, every id in the
corpus distinct), so that every packed token names the example and the place it came from.
"""

import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from attention_jax.data import pipeline, sources, tasks, toy_translation
from attention_jax.data.tokenizer import EOS_ID, UNK_ID, Tokenizer, default_vocab_path

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ the command


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "prepare_data.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        timeout=300,
    )


def _assert_one_line_failure(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr  # one line, not the flags' help
    for needle in needles:
        assert needle in lines[0], lines[0]


# Raw bytes of a train file: a BOM, CRLF endings, U+2028 inside a line, a form feed, blank
# and whitespace-only lines, non-ASCII, and no newline at the end.
TRAIN_BYTES = (
    b"\xef\xbb\xbfthe small dog sees a red car .\r\n"
    b"\r\n"
    b"caf\xc3\xa9 na\xc3\xafve \xe2\x80\x94 line\xe2\x80\xa8still the same line\n"
    b"  \t \n"
    b"  leading spaces kept\x0cform feed\n"
    b"second paragraph, line 2\n"
    b"\n"
    b"\n"
    b"last line without newline"
)
# Written out by hand from the bytes above.
TRAIN_LINES = [
    "the small dog sees a red car .",
    "café naïve — line\u2028still the same line",
    "  leading spaces kept\fform feed",
    "second paragraph, line 2",
    "last line without newline",
]
TRAIN_PARAGRAPHS = [
    "the small dog sees a red car .",
    "café naïve — line\u2028still the same line",
    "  leading spaces kept\fform feed\nsecond paragraph, line 2",
    "last line without newline",
]
MORE_TRAIN = [f"the {w} sleeps ." for w in ("cat", "owl", "fox", "king")]
VALIDATION = ["a dog runs .", "the owl sang ."]


@pytest.fixture
def text_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(TRAIN_BYTES)
    (tmp_path / "b.txt").write_text("".join(t + "\n" for t in MORE_TRAIN), encoding="utf-8")
    (tmp_path / "dev.txt").write_text("\n".join(VALIDATION) + "\n", encoding="utf-8")
    return tmp_path


def _texts(name, split, data_dir):
    source = sources.load_text_source(name, split, data_dir=data_dir)
    return [source[i]["text"] for i in range(len(source))]


def test_local_text_corpus_read_back_exactly(text_files):
    args = ["--dataset=local_text", "--name=my_text", "--train=a.txt,b.txt"]
    result = _cli(*args, "--validation=dev.txt", "--data_dir=data", "--vocab_size=60",
                  cwd=text_files)  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = text_files / "data"
    assert _texts("my_text", "train", data) == TRAIN_LINES + MORE_TRAIN
    assert _texts("my_text", "validation", data) == VALIDATION
    assert sources.split_names("my_text", data) == ("train", "validation")
    tokenizer = Tokenizer.load(default_vocab_path(data, "my_text", 60))
    assert tokenizer.vocab_size == 60
    for text in TRAIN_LINES + MORE_TRAIN:  # every character was in the vocabulary's text
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert "examples: train 9, validation 2" in result.stdout

    # Prepared already: refused; --paragraphs with --overwrite replaces it.
    _assert_one_line_failure(
        _cli(*args, "--validation=dev.txt", "--data_dir=data", cwd=text_files), "--overwrite"
    )
    result = _cli(*args, "--validation=dev.txt", "--data_dir=data", "--vocab_size=60",
                  "--paragraphs", "--overwrite", cwd=text_files)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # b.txt has no blank line: one paragraph. A paragraph never runs on into the next file.
    assert _texts("my_text", "train", data) == [*TRAIN_PARAGRAPHS, "\n".join(MORE_TRAIN)]
    tokenizer = Tokenizer.load(default_vocab_path(data, "my_text", 60))
    assert tokenizer.decode(tokenizer.encode(TRAIN_PARAGRAPHS[2])) == TRAIN_PARAGRAPHS[2]


@pytest.mark.parametrize(
    "train, validation, needles",
    [
        ("a.txt,empty.txt", "dev.txt", ["empty.txt is empty", "'train'"]),
        ("a.txt", "blank.txt", ["blank.txt holds no text", "all blank lines"]),
        ("a.txt", "latin1.txt", ["latin1.txt, line 2: not valid UTF-8"]),
        ("a.txt", "nul.txt", ["nul.txt, line 1: a NUL byte"]),
        ("a.txt,missing.txt", "dev.txt", ["missing.txt does not exist"]),
        ("a.txt", None, ["--dataset=local_text needs --validation"]),
        ("a.txt,", "dev.txt", ["--train='a.txt,'"]),
    ],
)
def test_bad_text_files_one_line_and_nothing_written(text_files, train, validation, needles):
    (text_files / "empty.txt").write_bytes(b"")
    (text_files / "blank.txt").write_bytes(b"\n  \n\t\n")
    (text_files / "latin1.txt").write_bytes("ok\nna\u00efve\n".encode("latin-1"))
    (text_files / "nul.txt").write_bytes(b"a\x00b\n")
    args = ["--dataset=local_text", "--name=bad_text", f"--train={train}", "--data_dir=data"]
    if validation:
        args.append(f"--validation={validation}")
    _assert_one_line_failure(_cli(*args, cwd=text_files), *needles)
    assert not (text_files / "data" / "bad_text").exists()


def test_flags_that_do_not_go_together(text_files):
    result = _cli("--dataset=local", "--name=x", "--train=a.txt,b.txt", "--paragraphs",
                  "--data_dir=data", cwd=text_files)  # fmt: skip
    _assert_one_line_failure(result, "--paragraphs only goes with --dataset=local_text")
    result = _cli("--dataset=lm1b", "--train=a.txt", "--data_dir=data", cwd=text_files)
    _assert_one_line_failure(result, "--train only go with")


def test_parallel_and_text_corpora_are_not_mixed_up(tmp_path):
    (tmp_path / "c.tsv").write_text("a\tA\n", encoding="utf-8")
    (tmp_path / "c.txt").write_text("a\n", encoding="utf-8")
    sources.prepare_local_corpus({"train": tmp_path / "c.tsv"}, data_dir=tmp_path, name="par")
    sources.prepare_text_corpus({"train": tmp_path / "c.txt"}, data_dir=tmp_path, name="txt")
    with pytest.raises(ValueError, match=r"no feature 'text'.*parallel corpus.*local_text"):
        sources.load_text_source("par", "train", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"no feature 'source'.*is a text corpus"):
        sources.load_source("txt", "train", data_dir=tmp_path)
    with pytest.raises(sources.DatasetNotPreparedError, match="--dataset=local_text --name=nope"):
        sources.load_text_source("nope", "train", data_dir=tmp_path)

    def config(name, task=None):
        c = ml_collections.ConfigDict({"data": {"dataset": name, "data_dir": str(tmp_path)}})
        if task:
            c.data.task = task
        return c

    kinds = {n: tasks.task_kind(config(n)) for n in ("par", "txt", "toy_lm", "lm1b")}
    kinds |= {n: tasks.task_kind(config(n)) for n in ("reversal", "toy_translation")}
    assert kinds == {"par": "translation", "txt": "lm", "toy_lm": "lm", "lm1b": "lm",
                     "reversal": "reversal", "toy_translation": "translation"}  # fmt: skip
    assert tasks.task_kind(config("nope", "lm")) == "lm"  # not prepared: the config says
    with pytest.raises(ValueError, match=r"config.data.task is 'lm' but dataset 'par' is a par"):
        tasks.task_kind(config("par", "lm"))
    with pytest.raises(sources.DatasetNotPreparedError, match="--dataset=local_text"):
        tasks.check_dataset(config("nope", "lm"))


# ------------------------------------------------------------------ the pipeline


class SpanTokenizer:
    """ "7 8 9" -> ids [7, 8, 9]; each word stands for its bytes, the space before it
    included (so the counts sum to the text's length)."""

    def encode_with_bytes(self, text):
        words = text.split(" ")
        ids = np.array([int(w) for w in words], np.int32)
        return ids, np.array([len(w) + (i > 0) for i, w in enumerate(words)], np.int32)


def span_source(lengths):
    """Example i: words base_i, base_i + 1, ... (lengths[i] of them), every id distinct."""
    examples, base = [], 3
    for n in lengths:
        examples.append({"text": " ".join(str(base + k) for k in range(n))})
        base += n
    return examples


LENGTHS = [1 + (5 * i) % 9 for i in range(40)] + [23, 30]  # two longer than max_length 12
MAX_LENGTH = 12


def expected_pieces(source, order):
    """The (ids, bytes) pieces of the examples `order` in turn, as the pipeline cuts them."""
    out = []
    for index in order:
        encoded = pipeline.encode_text(SpanTokenizer(), source[index]["text"])
        for piece in pipeline.chunk_example(encoded, MAX_LENGTH):
            out.append((tuple(piece["targets"].tolist()), tuple(piece["targets_bytes"].tolist())))
    return out


def segments(batch):
    """Every packed segment of a batch as (ids, bytes), checking the packing keys on the way:
    segments numbered 1, 2, ... from the left of a row, positions 0, 1, ... within each,
    padding all 0."""
    out = []
    for row in range(batch["targets"].shape[0]):
        seg = batch["targets_segmentation"][row]
        pad = seg == 0
        for key in pipeline.LM_BATCH_KEYS:
            assert not batch[key][row][pad].any(), key
        used = int((~pad).sum())
        assert not pad[:used].any()  # segments first, padding after
        ids = sorted(set(seg[:used].tolist()))
        assert ids == list(range(1, len(ids) + 1))
        for s in ids:
            where = seg == s
            assert np.array_equal(batch["targets_positions"][row][where], np.arange(where.sum()))
            assert np.all(np.diff(np.nonzero(where)[0]) == 1)  # contiguous
            out.append(
                (
                    tuple(batch["targets"][row][where].tolist()),
                    tuple(batch["targets_bytes"][row][where].tolist()),
                )
            )
    return out


def lm_stream(source, *, seed=0, batch_size=3, **kwargs):
    return pipeline.lm_train_dataset(
        source, SpanTokenizer(), seed=seed, batch_size=batch_size, max_length=MAX_LENGTH,
        prefetch=0, **kwargs,
    )  # fmt: skip


def test_packing_keeps_every_token_once_in_stream_order():
    source = span_source(LENGTHS)
    # The first two epochs' example order, as the pipeline shuffles them (seed 0, one process).
    order = list(pipeline.shard_and_shuffle(source, seed=0)[: 2 * len(source)])
    index_of = {ex["text"]: i for i, ex in enumerate(source)}
    stream = expected_pieces(source, [index_of[ex["text"]] for ex in order])
    it, seen = iter(lm_stream(source)), []
    while len(seen) < len(stream) // 2 + 5:  # past the first epoch's end
        batch = next(it)
        assert {k: v.shape for k, v in batch.items()} == {
            k: (3, MAX_LENGTH) for k in pipeline.LM_BATCH_KEYS
        }
        seen += segments(batch)
        # First-fit packing hands out whole rounds: the batches so far hold exactly the
        # first len(seen) pieces of the stream (in some order), each once.
        assert sorted(seen) == sorted(stream[: len(seen)])
    # The long examples (23 and 30 words, + EOS) were cut into pieces of at most 12 tokens.
    ids_seen = {ids for ids, _ in seen}
    words = [int(w) for w in source[-2]["text"].split(" ")]
    assert {tuple(words[:12]), (*words[12:], EOS_ID)} <= ids_seen
    words = [int(w) for w in source[-1]["text"].split(" ")]
    assert {tuple(words[:12]), tuple(words[12:24]), (*words[24:], EOS_ID)} <= ids_seen


def test_same_seed_same_stream_other_seed_other_stream():
    source = span_source(LENGTHS)

    def first(seed, n=6):
        it = iter(lm_stream(source, seed=seed))
        return [next(it) for _ in range(n)]

    a, b, c = first(0), first(0), first(1)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    assert any(not np.array_equal(x["targets"], y["targets"]) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("k", [1, 2, 5, 9])
def test_resume_from_state_gives_the_same_stream(k):
    source = span_source(LENGTHS)
    it = iter(lm_stream(source))
    for _ in range(k):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(8)]  # runs past the first epoch for k = 9
    resumed = iter(lm_stream(source))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[key], want[key]) for key in pipeline.LM_BATCH_KEYS)


def test_two_processes_partition_the_examples():
    source = span_source(LENGTHS)
    example_of = {}  # token id -> example index
    for i, ex in enumerate(source):
        example_of.update({int(w): i for w in ex["text"].split(" ")})

    def examples_seen(process_index):
        it = iter(lm_stream(source, process_index=process_index, process_count=2))
        seen = set()
        for _ in range(30):  # several epochs of a 21-example share
            batch = next(it)
            tokens = batch["targets"][batch["targets"] > EOS_ID]
            seen |= {example_of[int(t)] for t in tokens}
        return seen

    zero, one = examples_seen(0), examples_seen(1)
    assert zero == set(range(0, len(source), 2)) and one == set(range(1, len(source), 2))

    # Evaluation: the two shares hold every token once, and as many batches each.
    full = pipeline.lm_eval_batches(source, SpanTokenizer(), batch_size=2, max_length=MAX_LENGTH)
    parts = [
        pipeline.lm_eval_batches(
            source,
            SpanTokenizer(),
            batch_size=2,
            max_length=MAX_LENGTH,
            process_index=p,
            process_count=2,
        )
        for p in (0, 1)
    ]
    assert len(parts[0]) == len(parts[1])
    assert sorted(s for part in parts for b in part for s in segments(b)) == sorted(
        s for b in full for s in segments(b)
    )
    assert sum(p.num_bytes for p in parts) == full.num_bytes


@pytest.mark.parametrize("packed", [True, False])
def test_eval_batches_hold_every_token_once_in_order(packed):
    source = span_source(LENGTHS)
    ev = pipeline.lm_eval_batches(
        source, SpanTokenizer(), batch_size=4, max_length=MAX_LENGTH, packed=packed
    )
    got = [s for batch in ev for s in segments(batch)]
    assert got == expected_pieces(source, range(len(source)))  # file order
    rows = sum(len(b["valid"]) for b in ev)
    filled = sum(int(b["valid"].sum()) for b in ev)
    assert all(b["targets"][~b["valid"]].sum() == 0 for b in ev)
    assert rows % 4 == 0 and rows - filled < 4
    assert ev.num_tokens == sum(LENGTHS) + len(LENGTHS)  # EOS once per example
    if not packed:
        assert filled == sum(-(-(n + 1) // MAX_LENGTH) for n in LENGTHS)  # a piece per row


# ------------------------------------------------------------------ bytes and scores


def test_bytes_of_a_tiny_example_by_hand():
    # "7 88 9": words of 1, 2, 1 characters; the 2nd and 3rd carry the space before them.
    out = pipeline.encode_text(SpanTokenizer(), "7 88 9")
    assert out["targets"].tolist() == [7, 88, 9, EOS_ID]
    assert out["targets_bytes"].tolist() == [1, 3, 2, 1]  # EOS: the example's newline


def test_sentencepiece_bytes_sum_to_the_corpus_size(tmp_path):
    train = [s for s, _ in toy_translation.load_split("train", sizes=(200, 0, 0))]
    train += ["Grüße, naïve café — «quoted»", "a line\u2028with a separator"]
    tokenizer = Tokenizer.train(train, 150)
    # Validation text with characters the vocabulary never saw (UNK), spaces at both ends.
    validation = ["  the dog sees ÿ a ☃ car .  ", "Größe: 3½ m²", "  the dog runs .  "]
    validation += train[:30]
    unknown = 0
    for text in validation:
        ids, counts = tokenizer.encode_with_bytes(text)
        assert np.array_equal(ids, tokenizer.encode(text))
        assert counts.sum() == len(text.encode("utf-8")) and counts.min() >= 0
        if UNK_ID in ids:
            unknown += 1
            continue
        # The first k pieces decode to the text's first (their counts' sum) bytes.
        ends = np.cumsum(counts)
        for k in range(1, len(ids) + 1):
            assert tokenizer.decode(ids[:k]) == text.encode("utf-8")[: ends[k - 1]].decode()
    assert unknown == 2  # ÿ, ☃, ö, ½, ²: counted by SentencePiece's offsets
    # Through the evaluation batches: every byte of the split, plus 1 per example (EOS).
    (tmp_path / "dev.txt").write_text("\n".join(validation) + "\n", encoding="utf-8")
    size = (tmp_path / "dev.txt").stat().st_size  # UTF-8 bytes, one "\n" per example
    examples = [{"text": t} for t in sources.text_examples(tmp_path / "dev.txt")]
    for packed in (True, False):
        ev = pipeline.lm_eval_batches(
            examples, tokenizer, batch_size=4, max_length=16, packed=packed
        )
        assert sum(int(b["targets_bytes"].sum()) for b in ev) == ev.num_bytes == size
        eos = [b["targets_bytes"][b["targets"] == EOS_ID] for b in ev]
        assert np.concatenate(eos).tolist() == [1] * len(validation)


def test_language_model_scores_by_hand():
    # Two tokens with probabilities 1/2 and 1/4: NLL = ln 2 + ln 4 = 3 ln 2 nats, over 3 bytes.
    scores = pipeline.language_model_scores(3 * math.log(2), 2, 3)
    assert scores["loss"] == pytest.approx(1.5 * math.log(2), rel=1e-15)
    assert scores["perplexity"] == pytest.approx(2**1.5, rel=1e-15)  # 2.8284271...
    assert scores["bits_per_byte"] == pytest.approx(1.0, rel=1e-15)
    assert pipeline.language_model_scores(3 * math.log(2), 2, 6)["bits_per_byte"] == 0.5
    empty = pipeline.language_model_scores(0.0, 0, 0)
    assert all(math.isnan(v) for v in empty.values())
    with pytest.raises(ValueError, match="num_bytes must be >= 0, got -1"):
        pipeline.language_model_scores(1.0, 1, -1)


def test_bad_arguments_are_refused():
    source = span_source([3, 4])
    with pytest.raises(ValueError, match="encode_with_bytes"):
        pipeline.lm_train_dataset(source, object(), seed=0, batch_size=1, max_length=4)
    with pytest.raises(ValueError, match="max_length must be an int >= 1, got 0"):
        pipeline.lm_eval_batches(source, SpanTokenizer(), batch_size=1, max_length=0)
    with pytest.raises(ValueError, match="process 2 of 3 gets no examples"):
        lm_stream(source, process_index=2, process_count=3)

    class Liar:
        def encode_with_bytes(self, text):
            return np.array([5]), np.array([len(text) + 1])

    with pytest.raises(ValueError, match="counted 3 bytes for 'ab', which has 2"):
        pipeline.encode_text(Liar(), "ab")


# ------------------------------------------------------------------ the task


def lm_config(**data):
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "batch_size": 4,
            "model": {"vocab_size": 200},
            "data": {
                "dataset": "toy_lm",
                "corpus_sizes": (300, 20, 10),
                "max_length": 32,
                "eval_batch_size": 8,
                "eval_examples": 0,
                **data,
            },
        }
    )


def test_lm_task_on_the_built_in_corpus(tmp_path):
    config = lm_config()
    task = tasks.make_task(config, str(tmp_path), data_parallel=2)
    assert isinstance(task, tasks.LMTask) and task.vocab_size == 200
    assert (tmp_path / "vocab.model").exists()  # the workdir's vocabulary
    batch = task.next_batch(0)
    assert {k: v.shape for k, v in batch.items()} == {k: (4, 32) for k in pipeline.LM_BATCH_KEYS}
    assert {k: v.shape for k, v in task.example_batch().items()} == {
        k: (4, 32) for k in pipeline.LM_BATCH_KEYS
    }
    # The built-in corpus is the English side of the translation corpus, from its seed.
    english = [s for s, _ in toy_translation.load_split("validation", sizes=(300, 20, 10))]
    assert tasks.load_eval_texts(config, "validation") == english
    ev = task.eval_data("validation")
    assert ev.references is None and all(len(b["valid"]) % 2 == 0 for b in ev.batches)
    total = sum(int(b["targets_bytes"].sum()) for b in ev.batches)
    assert total == sum(len(s.encode("utf-8")) + 1 for s in english)
    decoded, pending = [], []  # a long example's pieces follow each other; EOS ends it
    for b in ev.batches:
        for tokens, seg in zip(b["targets"], b["targets_segmentation"], strict=True):
            for s in range(1, int(seg.max()) + 1):
                pending += tokens[seg == s].tolist()
                if pending[-1] == EOS_ID:
                    decoded.append(task.tokenizer.decode(pending))
                    pending = []
    assert decoded == english and not pending

    # Resume: a second task in the same workdir, given the first one's iterator state,
    # continues with the same batches.
    state = task.iterator.get_state()
    want = [task.next_batch(i) for i in range(3)]
    again = tasks.make_task(config, str(tmp_path), data_parallel=2)
    again.iterator.set_state(state)
    for expected in want:
        got = again.next_batch(0)
        assert all(np.array_equal(got[k], expected[k]) for k in pipeline.LM_BATCH_KEYS)
    other = [s for s, _ in toy_translation.load_split("validation", seed=1, sizes=(300, 20, 10))]
    assert tasks.load_eval_texts(lm_config(corpus_seed=1), "validation") == other != english
