"""SentencePiece tokenizer: lossless round trips, special ids, determinism, files, pickling,
sampling helpers and bad inputs. Vocabularies are small (300 pieces on 2,000 toy pairs) so
that each training is quick."""

import inspect
import io
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from attention_jax.core.masks import padding_mask
from attention_jax.data import tokenizer as tok_lib
from attention_jax.data import toy_translation
from attention_jax.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, Tokenizer
from attention_jax.nn.config import TransformerConfig
from attention_jax.nn.model import shift_right, shift_right_packed

VOCAB = 300
UNICODE = [
    "Grüße aus Köln — naïve café, „Anführungszeichen“ und ß.",
    "東京タワー 😀 κόσμος Здравствуй мир!",
    "  two  spaces,\tone tab, a trailing space ",
    "\u00a0non-breaking space, ﬁ ligature, full-width Ｆｕｌｌ, ½",
]


@pytest.fixture(scope="module")
def sentences():
    """Both languages of 2,000 toy train pairs, plus the unicode lines (so their characters
    are in the vocabulary)."""
    pairs = toy_translation.load_split("train", sizes=(2000, 0, 0))
    return [s for pair in pairs for s in pair] + UNICODE


@pytest.fixture(scope="module")
def tok(sentences):
    return Tokenizer.train(sentences, VOCAB)


def test_core_and_nn_defaults_use_the_pad_id():
    # core and nn may not import data, so their defaults restate PAD_ID; they must agree.
    assert TransformerConfig(vocab_size=8).pad_id == PAD_ID
    for fn, arg in (
        (shift_right, "bos_id"),
        (shift_right_packed, "bos_id"),
        (padding_mask, "pad_id"),
    ):
        assert inspect.signature(fn).parameters[arg].default == PAD_ID, fn.__name__


def test_special_ids_and_vocab_size(tok):
    assert (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    assert tok.vocab_size == VOCAB
    proc = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    assert [proc.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert proc.bos_id() == -1


def test_round_trip_both_languages(tok):
    held_out = toy_translation.load_split("validation", sizes=(0, 200, 0))  # not trained on
    for source, target in held_out:
        for text in (source, target):
            ids = tok.encode(text)
            assert ids.dtype == np.int32 and ids.ndim == 1
            assert ids.min() > UNK_ID and ids.max() < VOCAB  # no special ids, no EOS added
            assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [*UNICODE, ""])
def test_round_trip_unicode_and_whitespace(tok, text):
    ids = tok.encode(text)
    assert UNK_ID not in ids
    assert tok.decode(ids) == text  # no normalization: spaces, NFKC-foldable characters kept
    assert "".join(tok.pieces(text)).replace("▁", " ") == " " * bool(text) + text


def test_unseen_character_is_unk(tok):
    ids = tok.encode("the dog ✓")
    assert ids[-1] == UNK_ID and UNK_ID not in ids[:-1]
    assert tok.decode(ids) == "the dog  ⁇ "


def test_decode_stops_at_eos_and_drops_pad(tok):
    x, y = "the small dog sees a red car .", "ta hund malo na avtol kraso videm ."
    ids = tok.encode(x).tolist()
    assert tok.decode([*ids, EOS_ID, *tok.encode(y).tolist()]) == x
    assert tok.decode([PAD_ID, *ids[:2], PAD_ID, *ids[2:], EOS_ID, PAD_ID]) == x
    assert tok.decode(np.array([*ids, EOS_ID, 99999], dtype=np.int64)) == x  # after EOS: ignored
    assert tok.decode(tuple(ids)) == tok.decode(np.asarray(ids, np.int32)) == x
    assert tok.decode([]) == tok.decode([EOS_ID, *ids]) == tok.decode([PAD_ID] * 3) == ""
    batch = np.zeros((2, len(ids) + 3), np.int32)  # [B, T], padded after EOS
    batch[0, : len(ids)], batch[0, len(ids)] = ids, EOS_ID
    assert tok.decode_batch(batch) == [x, ""]
    assert tok.decode_batch([ids, [EOS_ID]]) == [x, ""]
    assert tok.decode_batch([]) == []


def test_encode_batch_matches_encode(tok, sentences):
    texts = sentences[:50]
    for ids, text in zip(tok.encode_batch(texts), texts, strict=True):
        np.testing.assert_array_equal(ids, tok.encode(text))
        assert ids.dtype == np.int32


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(ValueError, match=r"in \[0, 300\).*\[300, 1000\]"):
        tok.decode([5, 300, 1000, EOS_ID, 5000])
    with pytest.raises(ValueError, match=r"\[-3\]"):
        tok.decode([-3])
    with pytest.raises(ValueError, match=r"shape \(1, 2\)"):
        tok.decode([[5, 6]])
    with pytest.raises(TypeError, match="float"):
        tok.decode([5.0, 6.0])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"bytes")


def test_training_is_deterministic(sentences, tok):
    again = Tokenizer.train(iter(sentences), VOCAB)  # an iterator, not the list
    assert again.model_proto == tok.model_proto
    assert again.fingerprint == tok.fingerprint and again == tok
    assert len(tok.fingerprint) == 16 and int(tok.fingerprint, 16) >= 0
    other = Tokenizer.train(sentences, VOCAB + 1)
    assert other.fingerprint != tok.fingerprint and other != tok


def test_max_sentences_samples_deterministically(sentences):
    a = Tokenizer.train(sentences, 200, max_sentences=1000)
    assert a == Tokenizer.train(sentences, 200, max_sentences=1000)
    assert a != Tokenizer.train(sentences, 200, max_sentences=1000, seed=1)
    assert a != Tokenizer.train(sentences, 200)


def test_reservoir_is_an_ordered_uniform_sample():
    items = [f"s{i}" for i in range(10_000)]
    sample, seen = tok_lib._reservoir(["", *items, ""], 1000, seed=0)
    assert seen == 10_000 and len(sample) == 1000 and len(set(sample)) == 1000
    indices = [int(s[1:]) for s in sample]
    assert indices == sorted(indices)
    assert 4500 < np.mean(indices) < 5500  # uniform: mean 4999.5, std of the mean ~91
    assert tok_lib._reservoir(items, 1000, seed=0)[0] == sample
    assert tok_lib._reservoir(items, 20_000, seed=0) == (items, 10_000)


def test_sample_pairs():
    np.testing.assert_array_equal(tok_lib.sample_pairs(7, 14), np.arange(7))
    np.testing.assert_array_equal(tok_lib.sample_pairs(0, 14), np.arange(0))
    picked = tok_lib.sample_pairs(100_000, 20_001)
    assert len(picked) == 10_000 and len(np.unique(picked)) == 10_000
    assert np.all(np.diff(picked) > 0) and 0 <= picked[0] and picked[-1] < 100_000
    assert 47_000 < picked.mean() < 53_000  # uniform
    np.testing.assert_array_equal(picked, tok_lib.sample_pairs(100_000, 20_001))
    assert not np.array_equal(picked, tok_lib.sample_pairs(100_000, 20_001, seed=1))
    with pytest.raises(ValueError, match="max_sentences must be >= 2"):
        tok_lib.sample_pairs(10, 1)


def test_pair_sentences_reads_both_sides_in_order():
    pairs = [{"source": f"s{i}", "target": f"t{i}"} for i in range(5)]
    got = list(tok_lib.pair_sentences(pairs, [0, 3, 4], chunk_size=2))
    assert got == ["s0", "t0", "s3", "t3", "s4", "t4"]


def test_save_load_round_trip(tok, sentences, tmp_path):
    path = tok.save(tmp_path / "new" / "dir" / "vocab.model")  # parents created
    assert path.read_bytes() == tok.model_proto
    loaded = Tokenizer.load(path)
    assert loaded == tok and loaded.fingerprint == tok.fingerprint
    assert loaded.decode(loaded.encode(UNICODE[0])) == UNICODE[0]
    Tokenizer.train(sentences, 100).save(path)  # replaced in place
    assert Tokenizer.load(str(path)).vocab_size == 100
    assert sorted(p.name for p in path.parent.iterdir()) == ["vocab.model"]  # no temp files


def test_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone == tok and clone is not tok
    assert clone.encode(UNICODE[1]).tolist() == tok.encode(UNICODE[1]).tolist()
    assert repr(clone) == f"Tokenizer(vocab_size=300, fingerprint='{tok.fingerprint}')"


def test_vocab_too_large_suggests_a_size_that_works(sentences):
    with pytest.raises(ValueError, match=r"vocab_size=100000 .* at most (\d+)") as info:
        Tokenizer.train(sentences[:200], 100_000)
    limit = int(info.value.args[0].rsplit(" ", 1)[1])
    assert Tokenizer.train(sentences[:200], limit).vocab_size == limit


def test_vocab_too_small(sentences):
    with pytest.raises(ValueError, match=r"vocab_size=10 is too small.*at least \d+"):
        Tokenizer.train(sentences, 10)


@pytest.mark.parametrize("corpus", [[], ["", ""], iter([])])
def test_empty_corpus(corpus):
    with pytest.raises(ValueError, match="no sentences"):
        Tokenizer.train(corpus, 100)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(vocab_size=0), ValueError, "vocab_size must be an int >= 1, got 0"),
        (dict(vocab_size=True), ValueError, "vocab_size"),
        (dict(vocab_size=100, max_sentences=0), ValueError, "max_sentences"),
        (dict(vocab_size=100, model_type="wordpiece"), ValueError, "model_type"),
    ],
)
def test_bad_training_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Tokenizer.train(["a b c"], **kwargs)


def test_bad_sentences():
    with pytest.raises(TypeError, match="not one string"):
        Tokenizer.train("a whole corpus in one string", 100)
    with pytest.raises(TypeError, match="must be str, got int"):
        Tokenizer.train(["fine", 3], 100)


def test_load_missing_file(tmp_path):
    missing = tmp_path / "nope" / "vocab.model"
    with pytest.raises(FileNotFoundError, match=f"{missing} does not exist"):
        Tokenizer.load(missing)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"not a model\n", bytes(range(256)) * 4])
def test_load_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: .*SentencePiece model"):
        Tokenizer.load(path)


def test_model_with_other_special_ids_is_refused(sentences, tmp_path):
    model = io.BytesIO()  # SentencePiece's defaults: unk 0, bos 1, eos 2, no pad
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=100, minloglevel=2
    )
    path = tmp_path / "other.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ValueError, match=f"{path}: .*special ids .*'pad': -1"):
        Tokenizer.load(path)
    with pytest.raises(ValueError, match="expected the bytes"):
        Tokenizer("not bytes")


def test_default_vocab_path(tmp_path):
    path = tok_lib.default_vocab_path(tmp_path, "wmt14_translate/de-en", 37000)
    assert path == tmp_path / "wmt14_translate" / "de-en" / "spm_bpe_37000.model"
    assert tok_lib.default_vocab_path("d", "toy_translation", 1000).as_posix() == (
        "d/toy_translation/spm_bpe_1000.model"
    )
    for bad in ["../escape", "/abs", "a/../b", "Upper", "a/b/c", ""]:
        with pytest.raises(ValueError, match="TFDS name"):
            tok_lib.default_vocab_path(tmp_path, bad, 100)
    with pytest.raises(ValueError, match="vocab_size"):
        tok_lib.default_vocab_path(tmp_path, "toy_translation", 0)
