"""A built-in translation corpus: English into an invented verb-final language, made offline.

Two pairs (worked out by hand from the rules below; the tests check them)::

    the small dog sees a red car .
    ta hund malo na avtol kraso videm .

    the teachers who like the old book slept quietly in the garden .
    tai lerimar ki te knig stari volemu te vrtal vu tihe spavuvu .

Source grammar (English, lower case, words and the final "." separated by spaces)::

    sentence    = clause [("and" | "but" | "because") clause] "."
    clause      = subject verb [noun-phrase] [adverb] [preposition noun-phrase]
    subject     = noun-phrase [("who" | "that") verb [noun-phrase]]   (a person or an animal)
    noun-phrase = determiner adjective{0,2} noun

Determiners: the, a/an, some, this, these. Nouns are singular or plural; verbs are present
or past, and transitive (then they take the noun phrase) or intransitive. The lexicon never
uses a word in two roles, so every source sentence has exactly one parse and one
translation (`translate`). Sentences have 4 to 25 words (longer draws are dropped).

Target language rules:

* Nouns have one of two genders, "a" and "e", fixed per noun and unrelated to meaning.
* Articles: a consonant for the determiner (the: t, a/an/some: n, this/these: s), then the
  gender vowel, then "i" in the plural: the dog = "ta hund", these cats = "sei mizelen".
* Plural nouns add -ar (gender a) or -en (gender e).
* Adjectives follow the noun, in mirror order, and agree: -o, -os (a, sg/pl), -i, -is (e).
* Every clause ends in its verb (subject, place phrase, object, adverb, verb). The verb
  agrees with its subject: present -em (sg), -emu (pl); past -ava (a, sg), -eve (e, sg),
  -uvu (pl). A relative clause is "ki [object] verb" after the noun and its adjectives.
* Prepositions become postpositions: "in the garden" = "te vrtal vu".
* "A and/but B" becomes "A ja/ali B"; "A because B" becomes "B jer A" (reason first).

Corpus: parse trees are drawn with `random.Random(seed)`; a source drawn a second time is
dropped, so pairs are distinct. Splits: a sentence's split is fixed by a hash of its source
text (1/20 test, 1/20 validation, 18/20 train), so no held-out source sentence is in any
train split, for any seed or sizes. Files: `{split}.en` and `{split}.tgt`, line-aligned.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import tempfile
from pathlib import Path
from typing import NamedTuple

from attention_jax.data._checks import check_int

SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = (20_000, 1_000, 1_000)
# A cost cap (its generation time: BUILD_NOTES.md), not the grammar's size: ~2e31 sentences
# of <= 25 words.
MAX_PAIRS = 1_000_000
MAX_WORDS = 25

# Lexicon: "english[:plural]=stem.gender". Adjectives are listed in the English order of
# their kinds (opinion, size, age, colour) so that two of them read naturally when sorted.
_PERSONS = """teacher=lerim.a child:children=kopel.e man:men=dorn.a woman:women=zenik.e
    farmer=grask.a doctor=medun.e king=rojat.a girl=tesin.e boy=malek.a student=skolin.e
    sailor=marot.a baker=brodis.e"""
_ANIMALS = """dog=hund.a cat=mizel.e horse=kabal.a bird=pitek.e fox:foxes=lisk.a
    mouse:mice=mirat.e wolf:wolves=vulp.a cow=bovin.e rabbit=zekan.a owl=sovul.e
    elephant=olifan.a snake=zmij.e"""
_THINGS = """book=knig.e car=avtol.a house=domak.a apple=jabol.e tree=derv.a river=reken.e
    table=stolun.a letter=pismen.e song=pesan.a city:cities=gorod.e box:boxes=kasot.a
    ship=korab.e egg=jajek.a island=ostrov.e window=oknel.a stone=kamen.e bridge=mostar.a
    garden=vrtal.e key=kljun.a lamp=svetil.e"""
_ADJECTIVES = """happy=rad sad=tuz quiet=tih angry=zlob clever=umn brave=hrab lazy=len
    hungry=glad poor=bedn rich=bogat strange=cud small=mal big=vel tall=visok heavy=tez
    old=star young=mlad new=nov warm=topl cold=hlad bright=jasn dark=temn empty=prazd
    red=kras green=zelen yellow=zolt blue=sin"""
# "base:3rd-singular:past=stem"; no verb's past equals its present, so tense is visible.
_TRANSITIVE = """see:sees:saw=vid like:likes:liked=vol find:finds:found=najd
    carry:carries:carried=nos watch:watches:watched=gled follow:follows:followed=sled
    help:helps:helped=pomag visit:visits:visited=poset paint:paints:painted=slik
    call:calls:called=zov build:builds:built=grad buy:buys:bought=kup take:takes:took=uzm
    love:loves:loved=ljub draw:draws:drew=crt catch:catches:caught=lov push:pushes:pushed=tolk
    open:opens:opened=otvor hold:holds:held=derz write:writes:wrote=pis"""
_INTRANSITIVE = """sleep:sleeps:slept=spav run:runs:ran=beg sing:sings:sang=poj
    swim:swims:swam=plav laugh:laughs:laughed=smej wait:waits:waited=cek
    dance:dances:danced=tanc smile:smiles:smiled=smih fall:falls:fell=pad
    arrive:arrives:arrived=prid cry:cries:cried=plac jump:jumps:jumped=skok sit:sits:sat=sed
    walk:walks:walked=hod"""
_ADVERBS = """quickly=brze slowly=polke quietly=tihe loudly=glasne happily=vesele
    carefully=pazne gently=nezne proudly=ponosne calmly=mirne eagerly=zeljne"""
_PREPOSITIONS = "in=vu on=nad near=kraj behind=zad under=pod beside=bok with=kon"
_CONJUNCTIONS = {"and": "ja", "but": "ali", "because": "jer"}
# determiner kind -> (singular, plural, target consonant)
_DET = {"def": ("the", "the", "t"), "indef": ("a", "some", "n"), "dem": ("this", "these", "s")}


def _entries(table: str) -> list[tuple[list[str], str]]:
    return [(e.split("=")[0].split(":"), e.split("=")[1]) for e in table.split()]


def _nouns(table: str) -> list[tuple[str, str, str, str]]:
    """(singular, plural, stem, gender); a missing plural is singular + "s"."""
    out = []
    for forms, target in _entries(table):
        stem, gender = target.split(".")
        out.append((forms[0], forms[1] if len(forms) > 1 else forms[0] + "s", stem, gender))
    return out


_NOUN = {n[0]: n for n in _nouns(_PERSONS) + _nouns(_ANIMALS) + _nouns(_THINGS)}
_ANIMATE = [n[0] for n in _nouns(_PERSONS) + _nouns(_ANIMALS)]
_PERSON = {n[0] for n in _nouns(_PERSONS)}  # take "who"; animals take "that"
_PLACES = [n[0] for n in _nouns(_THINGS)]
_ADJ = {forms[0]: stem for forms, stem in _entries(_ADJECTIVES)}
_ADJ_RANK = {adj: i for i, adj in enumerate(_ADJ)}
_VERB = {f[0]: (*f, stem, True) for f, stem in _entries(_TRANSITIVE)}  # (base, s3, past, stem, tr)
_VERB.update({f[0]: (*f, stem, False) for f, stem in _entries(_INTRANSITIVE)})
_ADV = {forms[0]: t for forms, t in _entries(_ADVERBS)}
_PREP = {forms[0]: t for forms, t in _entries(_PREPOSITIONS)}
_ALL_NOUNS, _ALL_ADJS, _ALL_VERBS = list(_NOUN), list(_ADJ), list(_VERB)
_ALL_ADVS, _ALL_PREPS, _ALL_CONJS = list(_ADV), list(_PREP), list(_CONJUNCTIONS)
_TENSES = ("present", "past")


class _NP(NamedTuple):
    det: str  # "def" | "indef" | "dem"
    adjs: tuple[str, ...]  # English order
    noun: str  # singular English form
    plural: bool
    rel: tuple | None  # (verb, tense, object _NP | None) or None


class _Clause(NamedTuple):
    subj: _NP
    verb: str
    tense: str  # "present" | "past"
    obj: _NP | None
    adv: str | None
    pp: tuple[str, _NP] | None  # (preposition, noun phrase)


# ---- English and target rendering of a parse tree. ---------------------------------------


def _en_verb(verb: str, tense: str, plural: bool) -> str:
    base, s3, past, _, _ = _VERB[verb]
    return past if tense == "past" else (base if plural else s3)


def _en_np(np_: _NP) -> list[str]:
    words = [*np_.adjs, _NOUN[np_.noun][1] if np_.plural else np_.noun]
    det = _DET[np_.det][np_.plural]
    if det == "a" and words[0][0] in "aeio":  # no lexicon word starts with u or a silent h
        det = "an"
    if np_.rel:
        verb, tense, obj = np_.rel
        words += ["who" if np_.noun in _PERSON else "that", _en_verb(verb, tense, np_.plural)]
        words += _en_np(obj) if obj else []
    return [det, *words]


def _en_clause(c: _Clause) -> list[str]:
    words = [*_en_np(c.subj), _en_verb(c.verb, c.tense, c.subj.plural)]
    words += (_en_np(c.obj) if c.obj else []) + ([c.adv] if c.adv else [])
    return words + ([c.pp[0], *_en_np(c.pp[1])] if c.pp else [])


def _tgt_verb(verb: str, tense: str, gender: str, plural: bool) -> str:
    # Present agrees in number only; past also in gender (in the singular), like Slavic pasts.
    if tense == "present":
        suffix = "emu" if plural else "em"
    else:
        suffix = "uvu" if plural else {"a": "ava", "e": "eve"}[gender]
    return _VERB[verb][3] + suffix


def _tgt_np(np_: _NP) -> list[str]:
    _, _, stem, gender = _NOUN[np_.noun]
    article = _DET[np_.det][2] + gender + ("i" if np_.plural else "")
    noun = stem + ({"a": "ar", "e": "en"}[gender] if np_.plural else "")
    agree = {"a": "o", "e": "i"}[gender] + ("s" if np_.plural else "")
    words = [article, noun] + [_ADJ[adj] + agree for adj in reversed(np_.adjs)]
    if np_.rel:
        verb, tense, obj = np_.rel
        words += ["ki", *(_tgt_np(obj) if obj else []), _tgt_verb(verb, tense, gender, np_.plural)]
    return words


def _tgt_clause(c: _Clause) -> list[str]:
    words = _tgt_np(c.subj) + ([*_tgt_np(c.pp[1]), _PREP[c.pp[0]]] if c.pp else [])
    words += (_tgt_np(c.obj) if c.obj else []) + ([_ADV[c.adv]] if c.adv else [])
    return [*words, _tgt_verb(c.verb, c.tense, _NOUN[c.subj.noun][3], c.subj.plural)]


def _render(first: _Clause, conj: str | None, second: _Clause | None) -> tuple[str, str]:
    source = _en_clause(first) + ([conj, *_en_clause(second)] if second else [])
    if conj == "because":  # the reason clause moves to the front, like Japanese "B kara A"
        target = [*_tgt_clause(second), "jer", *_tgt_clause(first)]
    else:
        tail = [_CONJUNCTIONS[conj], *_tgt_clause(second)] if second else []
        target = _tgt_clause(first) + tail
    return " ".join([*source, "."]), " ".join([*target, "."])


# ---- Sampling. -------------------------------------------------------------------------------


def _sampler(seed: int):
    """A function drawing one random parse tree. Only `random.random()` is used: Python
    guarantees its sequence for a given seed across versions (unlike `choice`, `randint`)."""
    u = random.Random(seed).random

    def pick(options):
        return options[int(u() * len(options))]

    def np_(nouns, rel_ok):
        n_adj = 0 if (r := u()) < 0.45 else 1 if r < 0.85 else 2
        adjs = sorted({pick(_ALL_ADJS) for _ in range(n_adj)}, key=_ADJ_RANK.get)
        rel = None
        if rel_ok and u() < 0.2:
            verb = pick(_ALL_VERBS)
            rel = (verb, pick(_TENSES), np_(_ALL_NOUNS, False) if _VERB[verb][4] else None)
        det = "def" if (r := u()) < 0.5 else "indef" if r < 0.8 else "dem"
        return _NP(det, tuple(adjs), pick(nouns), u() < 0.4, rel)

    def clause():
        verb = pick(_ALL_VERBS)
        return _Clause(
            np_(_ANIMATE, True),
            verb,
            pick(_TENSES),
            np_(_ALL_NOUNS, False) if _VERB[verb][4] else None,
            pick(_ALL_ADVS) if u() < 0.3 else None,
            (pick(_ALL_PREPS), np_(_PLACES, False)) if u() < 0.3 else None,
        )

    def sentence():
        if u() < 0.25:
            return clause(), pick(_ALL_CONJS), clause()
        return clause(), None, None

    return sentence


def _distinct_pairs(seed: int):
    """Endless stream of distinct (source, target) pairs, at most MAX_WORDS source words."""
    sentence, seen = _sampler(seed), set()
    while True:
        source, target = _render(*sentence())
        if source not in seen and source.count(" ") < MAX_WORDS:  # spaces = words - 1
            seen.add(source)
            yield source, target


# ---- Parsing: the translation as a function of the source text alone. -----------------------


def _english_index() -> dict[str, tuple]:
    """word -> (category, ...). Refuses a word in two roles: that would make parses ambiguous."""
    index: dict[str, tuple] = {}
    entries = [("the", ("det", "def")), ("a", ("det", "indef")), ("an", ("det", "indef"))]
    entries += [("some", ("det", "indef")), ("this", ("det", "dem")), ("these", ("det", "dem"))]
    entries += [("who", ("rel",)), ("that", ("rel",)), (".", (".",))]
    for sg, pl, _, _ in _NOUN.values():
        entries += [(sg, ("noun", sg, False)), (pl, ("noun", sg, True))]
    for base, s3, past, _, _ in _VERB.values():
        entries += [(w, ("verb", base, t)) for w, t in ((base, "present"), (s3, "present"))]
        entries.append((past, ("verb", base, "past")))
    for category, words in (("adj", _ADJ), ("adv", _ADV), ("prep", _PREP), ("conj", _CONJUNCTIONS)):
        entries += [(w, (category, w)) for w in words]
    for word, entry in entries:
        if index.setdefault(word, entry) != entry:
            raise RuntimeError(f"toy lexicon uses {word!r} as both {index[word]} and {entry}")
    return index


_EN = _english_index()


def _parse(words: list[str]) -> tuple[_Clause, str | None, _Clause | None]:
    pos = 0

    def peek(category):
        return pos < len(words) and _EN.get(words[pos], ("",))[0] == category

    def take(category):
        nonlocal pos
        if not peek(category):
            got = repr(words[pos]) if pos < len(words) else "the end of the sentence"
            raise ValueError(f"toy grammar expected a {category!r} at word {pos + 1}, got {got}")
        pos += 1
        return _EN[words[pos - 1]]

    def np_(rel_ok):
        det, adjs = take("det")[1], []
        while peek("adj"):
            adjs.append(take("adj")[1])
        _, noun, plural = take("noun")
        rel = None
        if rel_ok and peek("rel"):
            take("rel")
            _, verb, tense = take("verb")
            rel = (verb, tense, np_(False) if _VERB[verb][4] else None)
        return _NP(det, tuple(adjs), noun, plural, rel)

    def clause():
        subj, (_, verb, tense) = np_(True), take("verb")
        obj = np_(False) if _VERB[verb][4] else None
        adv = take("adv")[1] if peek("adv") else None
        pp = (take("prep")[1], np_(False)) if peek("prep") else None
        return _Clause(subj, verb, tense, obj, adv, pp)

    first, conj, second = clause(), None, None
    if peek("conj"):
        conj, second = take("conj")[1], clause()
    take(".")
    if pos != len(words):
        raise ValueError(f"toy grammar expected the sentence to end after '.', got {words[pos:]}")
    return first, conj, second


def translate(source: str) -> str:
    """The target sentence of an English sentence of the toy grammar (its syntax; subjects
    and places need not be of the kinds the sampler draws). Raises ValueError otherwise."""
    expected, target = _render(*_parse(source.split(" ")))
    if expected != source:  # the parse ignores agreement and a/an; re-rendering checks them
        raise ValueError(f"not a toy-grammar sentence: {source!r}; the nearest is {expected!r}")
    return target


# ---- Public corpus API. ------------------------------------------------------------------


def generate_pairs(num_pairs: int, seed: int = 0) -> list[tuple[str, str]]:
    """`num_pairs` distinct (English, target) pairs drawn with `seed`; a pure function of
    (num_pairs, seed), and a prefix of the list for any larger `num_pairs`. Ignores splits:
    train on `load_split`, so that held-out sentences stay held out."""
    num_pairs = check_int("num_pairs", num_pairs, 0, MAX_PAIRS)
    return list(itertools.islice(_distinct_pairs(check_int("seed", seed, 0, 2**63)), num_pairs))


def _split_of(source: str) -> str:
    # blake2b, not hash(): Python salts str hashes per process.
    digest = hashlib.blake2b(source.encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _fill(wanted: tuple[str, ...], seed: int, sizes) -> dict[str, list[tuple[str, str]]]:
    if not (isinstance(sizes, (tuple, list)) and len(sizes) == len(SPLITS)):
        raise ValueError(f"sizes must be (train, validation, test) counts, got {sizes!r}")
    sizes = [check_int(f"{n} size", s, 0, MAX_PAIRS) for n, s in zip(SPLITS, sizes, strict=True)]
    need = max(-(-sizes[0] * 20 // 18), sizes[1] * 20, sizes[2] * 20)
    if need > MAX_PAIRS:
        raise ValueError(
            f"sizes {tuple(sizes)} need about {need:,} generated sentences (train gets 18/20 of "
            f"them, validation and test 1/20 each), more than MAX_PAIRS={MAX_PAIRS:,}"
        )
    out = {name: [] for name in wanted}
    pending = {name for name in wanted if sizes[SPLITS.index(name)]}
    stream = _distinct_pairs(check_int("seed", seed, 0, 2**63))
    while pending:
        pair = next(stream)
        name = _split_of(pair[0])
        if name in pending:
            out[name].append(pair)
            if len(out[name]) == sizes[SPLITS.index(name)]:
                pending.remove(name)
    return out


def load_split(split: str, *, seed: int = 0, sizes=DEFAULT_SIZES) -> list[tuple[str, str]]:
    """The first `sizes[i]` pairs of the stream for `seed` whose hash bucket is `split`.

    A split depends only on (split, seed, its own size): the test set stays the same when the
    train size changes. Source sentences never repeat within or across splits."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return _fill((split,), seed, sizes)[split]


def write_split_files(directory, *, seed: int = 0, sizes=DEFAULT_SIZES) -> dict[str, tuple]:
    """Writes `{split}.en` and `{split}.tgt` under `directory`: UTF-8, one sentence per line,
    line i of the two files a pair. Each file is replaced atomically, so a reader never sees
    a half-written file. Returns {split: (en_path, tgt_path)}, the `splits` argument of
    `sources.prepare_local_corpus` (which refuses empty files, so give no size 0 there)."""
    splits = _fill(SPLITS, seed, sizes)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in splits.items():
        paths[name] = (directory / f"{name}.en", directory / f"{name}.tgt")
        for path, column in zip(paths[name], (0, 1), strict=True):
            _write_atomic(path, "".join(pair[column] + "\n" for pair in pairs))
    return paths


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0o600 files; corpora are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
