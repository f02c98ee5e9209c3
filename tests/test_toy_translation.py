"""The built-in toy translation corpus: literal pairs, determinism, splits, target-side rules.

References: four pairs translated by hand from the rules in the module docstring, and
target-language rules checked token by token over whole corpora with only the lexicon
stems (not the module's rendering code).
"""

import re

import pytest

from attention_jax.data import toy_translation as tt

# English -> target, worked out by hand from the module docstring's rules and lexicon.
LITERAL_PAIRS = [
    ("the small dog sees a red car .", "ta hund malo na avtol kraso videm ."),
    (
        "the teachers who like the old book slept quietly in the garden .",
        "tai lerimar ki te knig stari volemu te vrtal vu tihe spavuvu .",
    ),
    (  # "because": the reason clause comes first; adjectives in mirror order.
        "these women found some small red apples because a cat sang .",
        "ne mizel pojeve jer sei zeniken nei jabolen krasis malis najduvu .",
    ),
    (  # "an" before a vowel; a relative clause is verb-final too.
        "an old owl that watches this empty box waits near a bridge and the men run .",
        "ne sovul stari ki sa kasot prazdo gledem na mostar kraj cekem ja tai dornar begemu .",
    ),
]

ARTICLES = {c + g + n: (g, n == "i") for c in "tns" for g in "ae" for n in ("", "i")}
ADJ_SUFFIX = {("a", False): "o", ("a", True): "os", ("e", False): "i", ("e", True): "is"}
VERB_FORMS = {v[3] + s for v in tt._VERB.values() for s in ("em", "emu", "ava", "eve", "uvu")}
ADJ_FORMS = {stem + s: s for stem in tt._ADJ.values() for s in ("o", "os", "i", "is")}
NOUN_GENDER = {stem: gender for _, _, stem, gender in tt._NOUN.values()}
CONJUNCTIONS = {"ja", "ali", "jer"}


@pytest.fixture(scope="module")
def corpus():
    return tt.generate_pairs(20_000)


@pytest.fixture(scope="module")
def splits():
    return {name: tt.load_split(name) for name in tt.SPLITS}


# ---- Literal translations. ------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), LITERAL_PAIRS)
def test_literal_pairs(source, target):
    assert tt.translate(source) == target


def test_agreement_literal():
    # The same adjective "small" (mal-) and verb "sleep" (spav-) across gender and number.
    assert tt.translate("the small dog slept .") == "ta hund malo spavava ."
    assert tt.translate("the small cat slept .") == "te mizel mali spaveve ."
    assert tt.translate("the small dogs slept .") == "tai hundar malos spavuvu ."
    assert tt.translate("the small cats sleep .") == "tei mizelen malis spavemu ."
    assert tt.translate("a small cat sleeps .") == "ne mizel mali spavem ."


def test_module_docstring_examples_are_translations():
    lines = [line.strip() for line in tt.__doc__.splitlines()]
    for source, target in LITERAL_PAIRS[:2]:
        assert lines[lines.index(source) + 1] == target


# ---- Determinism and size. -------------------------------------------------------------------


def test_same_seed_same_corpus_different_seed_different():
    a, b = tt.generate_pairs(2_000, seed=0), tt.generate_pairs(2_000, seed=0)
    assert a == b
    assert tt.generate_pairs(500, seed=0) == a[:500]  # a prefix of any longer corpus
    other = tt.generate_pairs(2_000, seed=1)
    assert len({s for s, _ in a} & {s for s, _ in other}) < 200  # only a few short ones


def test_at_least_20000_distinct_pairs(corpus):
    assert len(corpus) == 20_000
    assert len({s for s, _ in corpus}) == len({t for _, t in corpus}) == 20_000


def test_sentence_lengths_vary_within_bounds(corpus):
    lengths = [len(s.split()) for s, _ in corpus]
    assert min(lengths) == 4 and max(lengths) == tt.MAX_WORDS
    assert 7 <= sum(lengths) / len(lengths) <= 13
    assert sum(n >= 15 for n in lengths) > 0.1 * len(lengths)
    assert all(s.endswith(" .") and t.endswith(" .") for s, t in corpus)
    assert all(abs(len(s.split()) - len(t.split())) <= 1 for s, t in corpus)


def test_vocabulary_sizes(corpus):
    source_vocab = {w for s, _ in corpus for w in s.split()}
    target_vocab = {w for _, t in corpus for w in t.split()}
    assert 50 <= len(source_vocab) <= 1000, len(source_vocab)  # 246 at the time of writing
    assert 50 <= len(target_vocab) <= 1000, len(target_vocab)  # 399
    assert len(target_vocab) > len(source_vocab)  # agreement makes more forms per stem


# ---- The translation is a function of the source text. ---------------------------------------


def test_translation_is_a_function_across_seeds(corpus):
    seen = dict(corpus)
    for seed in (1, 2):
        for source, target in tt.generate_pairs(5_000, seed=seed):
            assert seen.setdefault(source, target) == target
    assert len(seen) > len(corpus)  # the other seeds did add new sentences


def test_translate_reproduces_every_generated_target(corpus):
    # `translate` parses the English text alone, so each source has exactly one target.
    assert all(tt.translate(s) == t for s, t in corpus)


def test_target_words_have_one_role():
    groups = [
        set(ARTICLES),
        VERB_FORMS,
        set(ADJ_FORMS),
        set(NOUN_GENDER) | {stem + {"a": "ar", "e": "en"}[g] for stem, g in NOUN_GENDER.items()},
        set(tt._ADV.values()),
        set(tt._PREP.values()),
        CONJUNCTIONS | {"ki", "."},
    ]
    assert sum(map(len, groups)) == len(set().union(*groups))


# ---- Word order and agreement, checked over the corpus. --------------------------------------


def test_every_clause_is_verb_final(corpus):
    for _, target in corpus:
        words = target.split()
        ends = [i - 1 for i, w in enumerate(words) if w in CONJUNCTIONS or w == "."]
        assert all(words[i] in VERB_FORMS for i in ends), target


def test_the_verb_is_not_final_in_english(corpus):
    # With an object, adverb or place phrase the English verb is followed by more words.
    english_verbs = {form for v in tt._VERB.values() for form in v[:3]}
    final = sum(s.split()[-2] in english_verbs for s, _ in corpus)
    assert final < 0.3 * len(corpus)


def test_adjectives_follow_the_noun_and_agree(corpus):
    n_checked = 0
    for _, target in corpus:
        words = target.split()
        for i, word in enumerate(words):
            if word not in ARTICLES:
                continue
            gender, plural = ARTICLES[word]
            stem = re.sub("(ar|en)$", "", words[i + 1]) if plural else words[i + 1]
            assert NOUN_GENDER[stem] == gender, target
            j = i + 2
            while j < len(words) and words[j] in ADJ_FORMS:
                assert ADJ_FORMS[words[j]] == ADJ_SUFFIX[gender, plural], target
                j, n_checked = j + 1, n_checked + 1
        assert not any(w in ADJ_FORMS and words[i - 1] in ARTICLES for i, w in enumerate(words))
    assert n_checked > 10_000


# ---- Splits and files. -----------------------------------------------------------------------


def test_splits_have_their_sizes_and_are_disjoint(splits):
    assert [len(splits[name]) for name in tt.SPLITS] == list(tt.DEFAULT_SIZES)
    sources = {name: {s for s, _ in pairs} for name, pairs in splits.items()}
    assert [len(sources[name]) for name in tt.SPLITS] == list(tt.DEFAULT_SIZES)
    assert not sources["train"] & sources["validation"]
    assert not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]


def test_held_out_sentences_stay_held_out_for_other_seeds_and_sizes(splits):
    train_seed_1 = {s for s, _ in tt.load_split("train", seed=1, sizes=(5_000, 0, 0))}
    assert not train_seed_1 & {s for s, _ in splits["test"] + splits["validation"]}
    smaller = tt.load_split("test", sizes=(10, 10, 300))
    assert smaller == splits["test"][:300]  # a split depends only on its own size


def test_write_split_files_round_trip(tmp_path):
    sizes = (300, 30, 20)
    paths = tt.write_split_files(tmp_path / "toy", seed=3, sizes=sizes)
    tt.write_split_files(tmp_path / "toy", seed=3, sizes=sizes)  # overwriting is fine
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == sorted(
        f"{name}.{ext}" for name in tt.SPLITS for ext in ("en", "tgt")
    )
    for name in tt.SPLITS:
        en_path, tgt_path = paths[name]
        en = en_path.read_text(encoding="utf-8").splitlines()
        tgt = tgt_path.read_text(encoding="utf-8").splitlines()
        assert list(zip(en, tgt, strict=True)) == tt.load_split(name, seed=3, sizes=sizes)


# ---- Bad inputs. -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: tt.load_split("dev"),
            "split must be one of ('train', 'validation', 'test'), got 'dev'",
        ),
        (lambda: tt.load_split("train", sizes=(10, 10)), "sizes must be (train, validation, test)"),
        (
            lambda: tt.load_split("test", sizes=(-1, 0, 0)),
            "train size must be an int in [0, 1,000,000], got -1",
        ),
        (
            lambda: tt.load_split("test", sizes=(0, 0, 60_000)),
            "need about 1,200,000 generated sentences",
        ),
        (lambda: tt.load_split("test", seed=-1), "seed must be an int in [0,"),
        (lambda: tt.generate_pairs(1.5), "num_pairs must be an int in [0, 1,000,000], got 1.5"),
        (lambda: tt.generate_pairs(tt.MAX_PAIRS + 1), "num_pairs must be an int in [0, 1,000,000]"),
        (lambda: tt.generate_pairs(True), "num_pairs must be an int"),
        (lambda: tt.write_split_files("unused", sizes=(1, 1)), "sizes must be (train"),
        (lambda: tt.translate("the dog sees ."), "expected a 'det' at word 4, got '.'"),
        (lambda: tt.translate("the dog sleeps"), "expected a '.' at word 4, got the end"),
        (lambda: tt.translate("the dog sleeps . ."), "expected the sentence to end after '.'"),
        (lambda: tt.translate("the dogs sleeps ."), "nearest is 'the dogs sleep .'"),
        (lambda: tt.translate("a old dog sleeps ."), "nearest is 'an old dog sleeps .'"),
        (
            lambda: tt.translate("the unicorn sleeps ."),
            "expected a 'noun' at word 2, got 'unicorn'",
        ),
    ],
)
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()
