"""TFDS sources without TensorFlow: local corpora (parallel and text) and WMT14 written as
array_record and read back by index; bad files, missing datasets; WMT14 and lm1b prepared
offline from a fake statmt.org."""

import http.server
import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import threading

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums as tfds_checksums
from tensorflow_datasets.translate import wmt14

from attention_jax.data import sources

SOURCES = ["Hello world.", "Ünïcödé: 1\u20132 \u2028 inside a line", "", "tab\u00a0less"]
TARGETS = ["Hallo Welt.", "Unicode: a\fb", "empty source above", "x"]


def _write(path, lines, newline="\n"):
    path.write_bytes("".join(line + newline for line in lines).encode("utf-8"))
    return path


def _read_all(source):
    return [source[i] for i in range(len(source))]


def _pairs(sources_, targets):
    return [{"source": s, "target": t} for s, t in zip(sources_, targets, strict=True)]


# ----------------------------------------------------------------------- round trips


def test_two_files_round_trip_in_order(tmp_path):
    src = _write(tmp_path / "train.en", SOURCES)
    tgt = _write(tmp_path / "train.de", TARGETS, newline="\r\n")  # Windows line ends
    path = sources.prepare_local_corpus(
        {"train": (src, tgt)}, data_dir=tmp_path / "data", name="toy_pairs"
    )
    assert path == tmp_path / "data" / "toy_pairs" / sources.LOCAL_CORPUS_VERSION
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["toy_pairs"]  # nothing else
    train = sources.load_source("toy_pairs", "train", data_dir=tmp_path / "data")
    assert len(train) == len(SOURCES)
    assert _read_all(train) == _pairs(SOURCES, TARGETS)
    assert train[-1] == {"source": SOURCES[-1], "target": TARGETS[-1]}
    assert train.__getitems__([3, 0]) == [train[3], train[0]]
    assert list(train) == _read_all(train)  # iteration stops at IndexError
    assert all(isinstance(v, str) for example in train for v in example.values())


def test_tsv_and_several_splits(tmp_path):
    train = _write(
        tmp_path / "train.tsv", [f"{s}\t{t}" for s, t in zip(SOURCES, TARGETS, strict=True)]
    )
    # The last line has no final newline; it is still a line.
    (tmp_path / "dev.tsv").write_text("a\tA\nb\tB", encoding="utf-8")
    sources.prepare_local_corpus(
        {"train": train, "validation": tmp_path / "dev.tsv"},
        data_dir=tmp_path,
        name="toy_tsv",
    )
    assert _read_all(sources.load_source("toy_tsv", "train", data_dir=tmp_path)) == _pairs(
        SOURCES, TARGETS
    )
    dev = sources.load_source("toy_tsv", "validation", data_dir=str(tmp_path))
    assert _read_all(dev) == _pairs("ab", "AB")


def test_source_pickles_for_worker_processes(tmp_path):
    _write(tmp_path / "c.tsv", ["a\tA", "b\tB", "c\tC"])
    sources.prepare_local_corpus({"train": tmp_path / "c.tsv"}, data_dir=tmp_path, name="toy_p")
    train = sources.load_source("toy_p", "train", data_dir=tmp_path)
    clone = pickle.loads(pickle.dumps(train))
    assert _read_all(clone) == _pairs("abc", "ABC")
    with pytest.raises(IndexError, match="index 3 out of range for 3"):
        train[3]


def test_overwrite_only_when_asked(tmp_path):
    _write(tmp_path / "c.tsv", ["a\tA"])
    sources.prepare_local_corpus({"train": tmp_path / "c.tsv"}, data_dir=tmp_path, name="toy_o")
    _write(tmp_path / "c.tsv", ["b\tB", "c\tC"])
    with pytest.raises(FileExistsError, match=r"toy_o.*already prepared.*overwrite=True"):
        sources.prepare_local_corpus({"train": tmp_path / "c.tsv"}, data_dir=tmp_path, name="toy_o")
    sources.prepare_local_corpus(
        {"train": tmp_path / "c.tsv"}, data_dir=tmp_path, name="toy_o", overwrite=True
    )
    assert _read_all(sources.load_source("toy_o", "train", data_dir=tmp_path)) == _pairs("bc", "BC")


# ------------------------------------------------------------------------ bad input


def _prepare(tmp_path, files):
    return sources.prepare_local_corpus(
        {"train": files}, data_dir=tmp_path / "data", name="bad_corpus"
    )


def test_line_count_mismatch_names_both_files_and_counts(tmp_path):
    src = _write(tmp_path / "a.en", ["1", "2", "3"])
    tgt = _write(tmp_path / "a.de", ["1", "2"])
    with pytest.raises(ValueError) as info:
        _prepare(tmp_path, (src, tgt))
    message = str(info.value)
    assert f"{src} has 3 lines" in message and f"{tgt} has 2" in message
    assert not (tmp_path / "data").exists()  # nothing written


def test_empty_file(tmp_path):
    src = _write(tmp_path / "a.en", ["1"])
    (tmp_path / "a.de").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'a.de'} is empty"):
        _prepare(tmp_path, (src, tmp_path / "a.de"))


def test_undecodable_bytes_name_file_and_line(tmp_path):
    src = _write(tmp_path / "a.en", ["1", "2", "3"])
    (tmp_path / "a.de").write_bytes(b"eins\nzwei \xff\xfe drei\nvier\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'a.de'}, line 2: not valid UTF-8"):
        _prepare(tmp_path, (src, tmp_path / "a.de"))
    assert not (tmp_path / "data").exists()


def test_tsv_column_count(tmp_path):
    tsv = _write(tmp_path / "a.tsv", ["a\tA", "b\tB\textra"])
    with pytest.raises(ValueError, match=r"a.tsv, line 2: expected 2 tab-separated.*found 3"):
        _prepare(tmp_path, tsv)


def test_missing_file(tmp_path):
    src = _write(tmp_path / "a.en", ["1"])
    with pytest.raises(FileNotFoundError, match=rf"target file {tmp_path / 'nope.de'}"):
        _prepare(tmp_path, (src, tmp_path / "nope.de"))
    with pytest.raises(FileNotFoundError, match=rf"TSV file {tmp_path / 'nope.tsv'}"):
        _prepare(tmp_path, tmp_path / "nope.tsv")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "My-Corpus"}, "lower_snake_case"),
        ({"name": "mnist"}, "taken by the TFDS dataset"),
        ({"splits": {}}, "splits is empty"),
        ({"splits": {"train[:5]": "x.tsv"}}, "split names"),
        ({"splits": {"train": ("a", "b", "c")}}, "a TSV path or a"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = {"splits": {"train": _write(tmp_path / "a.tsv", ["a\tA"])}, "name": "ok_name"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sources.prepare_local_corpus(data_dir=tmp_path, **args)


def test_missing_dataset_says_where_and_how(tmp_path):
    for name in ("never_prepared", sources.WMT14):  # unknown name; a TFDS builder not prepared
        with pytest.raises(sources.DatasetNotPreparedError) as info:
            sources.load_source(name, "train", data_dir=tmp_path)
        message = str(info.value)
        assert repr(name) in message and str(tmp_path) in message
        # The command for its kind: a WMT name is downloaded, any other is a local corpus.
        dataset = name if name == sources.WMT14 else f"local --name={name}"
        assert f"python -m attention_jax prepare --dataset={dataset} " in message
        assert f"--data_dir={tmp_path}" in message


def test_missing_split_lists_splits(tmp_path):
    _write(tmp_path / "c.tsv", ["a\tA"])
    sources.prepare_local_corpus({"train": tmp_path / "c.tsv"}, data_dir=tmp_path, name="toy_s")
    with pytest.raises(ValueError, match=r"no split 'test'; it has \['train'\]"):
        sources.load_source("toy_s", "test", data_dir=tmp_path)


# ------------------------------------------------------------------------------ WMT14

# WMT14 de-en as TFDS fetches it: statmt.org archive URL -> {path inside archive: lines}.
FAKE_WMT14 = {
    "http://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz": {
        "training/europarl-v7.de-en.de": ["Hallo Welt", "Guten Tag"],
        "training/europarl-v7.de-en.en": ["Hello world", "Good day"],
    },
    "http://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz": {
        "commoncrawl.de-en.de": ["Katze"],
        "commoncrawl.de-en.en": ["cat"],
    },
    "http://www.statmt.org/wmt14/training-parallel-nc-v9.tgz": {
        "training/news-commentary-v9.de-en.de": ["Hund"],
        "training/news-commentary-v9.de-en.en": ["dog"],
    },
    "http://data.statmt.org/wmt19/translation-task/dev.tgz": {
        "dev/newstest2013.de": ["Haus", "Baum"],
        "dev/newstest2013.en": ["house", "tree"],
        "dev/newstest2014-deen-src.de.sgm": ['<doc docid="1">', '<seg id="1">Der Apfel</seg>'],
        "dev/newstest2014-deen-ref.en.sgm": ['<doc docid="1">', '<seg id="1">The apple</seg>'],
    },
}
WMT14_EN_DE = {
    "train": {("Hello world", "Hallo Welt"), ("Good day", "Guten Tag"), ("cat", "Katze")}
    | {("dog", "Hund")},
    "validation": {("house", "Haus"), ("tree", "Baum")},
    "test": {("The apple", "Der Apfel")},
}


# lm1b as TFDS fetches it: one archive; train = training-monolingual.tokenized.shuffled/
# news.en-*, test = heldout-monolingual.tokenized.shuffled/news.en.heldout-*.
_LM1B_DIR = "1-billion-word-language-modeling-benchmark-r13output"
FAKE_LM1B = {
    f"http://www.statmt.org/lm-benchmark/{_LM1B_DIR}.tar.gz": {
        f"{_LM1B_DIR}/training-monolingual.tokenized.shuffled/news.en-00001-of-00100": [
            "The cat sat .",
            "Ünïcödé \u2028 text",
        ],
        f"{_LM1B_DIR}/training-monolingual.tokenized.shuffled/news.en-00002-of-00100": [
            "  Padded line  ",
        ],
        f"{_LM1B_DIR}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050": [
            "Held out .",
        ],
    },
}
# TFDS's lm1b strips each line (str.strip: also U+2028 at the ends, not inside).
LM1B_TEXT = {
    "train": {"The cat sat .", "Ünïcödé \u2028 text", "Padded line"},
    "test": {"Held out ."},
}


def _tgz(files):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, lines in files.items():
            data = "\n".join(lines).encode("utf-8")
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def fake_statmt(monkeypatch):
    """An HTTP proxy on localhost that answers the WMT14 URLs with small archives, so the
    unmodified TFDS download -> extract -> prepare path runs with no network."""
    archives = {url: _tgz(files) for url, files in {**FAKE_WMT14, **FAKE_LM1B}.items()}
    requested = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # a proxy gets the full URL as the path
            requested.append(self.path)
            body = archives.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    for var in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, proxy)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield requested
    server.shutdown()
    server.server_close()
    thread.join()


def test_wmt14_prepared_offline_and_read_both_ways(tmp_path, fake_statmt, monkeypatch):
    # TFDS checks each download against the size and SHA-256 it has on record for the real
    # archives; ours are fakes, so that record is emptied for this test.
    monkeypatch.setattr(tfds_checksums, "get_all_url_infos", dict)
    monkeypatch.setattr(wmt14.Wmt14Translate, "url_infos", {})
    path = sources.prepare_wmt14(tmp_path / "data", download_dir=tmp_path / "dl")
    assert sorted(fake_statmt) == sorted(FAKE_WMT14)  # each archive fetched once
    assert path == tmp_path / "data" / "wmt14_translate" / "de-en" / "1.0.0"
    for split, expected in WMT14_EN_DE.items():
        en_de = sources.load_wmt14(split, data_dir=tmp_path / "data")
        de_en = sources.load_wmt14(split, data_dir=tmp_path / "data", direction="de-en")
        assert len(en_de) == len(expected)
        assert {(e["source"], e["target"]) for e in _read_all(en_de)} == expected
        assert {(e["target"], e["source"]) for e in _read_all(de_en)} == expected


def test_lm1b_prepared_offline_and_read(tmp_path, fake_statmt, monkeypatch):
    builder_cls = tfds.builder_cls(sources.LM1B)
    module = sys.modules[builder_cls.__module__]
    tf_before = module.tf  # TFDS's lazy TensorFlow, which fails here; a shim globs meanwhile
    monkeypatch.setattr(tfds_checksums, "get_all_url_infos", dict)
    monkeypatch.setattr(builder_cls, "url_infos", {})
    path = sources.prepare_lm1b(tmp_path / "data", download_dir=tmp_path / "dl")
    assert sorted(fake_statmt) == sorted(FAKE_LM1B)
    assert path == tmp_path / "data" / "lm1b" / "1.1.0"
    assert sources.split_names("lm1b", tmp_path / "data", text=True) == ("train", "test")
    for split, expected in LM1B_TEXT.items():
        source = sources.load_text_source("lm1b", split, data_dir=tmp_path / "data")
        texts = [source[i]["text"] for i in range(len(source))]
        assert len(texts) == len(expected) and set(texts) == expected
    assert module.tf is tf_before  # the shim is gone


def test_text_source_reads_and_pickles(tmp_path):
    _write(tmp_path / "t.txt", ["one", "", "two \u2028 three", "  "])
    sources.prepare_text_corpus({"train": tmp_path / "t.txt"}, data_dir=tmp_path, name="toy_t")
    train = sources.load_text_source("toy_t", "train", data_dir=tmp_path)
    assert list(train) == [{"text": "one"}, {"text": "two \u2028 three"}]
    assert train.__getitems__([1, 0]) == [train[1], train[0]]
    assert list(pickle.loads(pickle.dumps(train))) == list(train)
    with pytest.raises(IndexError, match="index 2 out of range for 2"):
        train[2]
    with pytest.raises(FileExistsError, match="already prepared"):
        sources.prepare_text_corpus({"train": tmp_path / "t.txt"}, data_dir=tmp_path, name="toy_t")


@pytest.mark.parametrize(
    ("data", "paragraphs", "expected"),
    [
        (b"a\n\nb\r\n", False, ["a", "b"]),
        (b"\xef\xbb\xbfa\nb\n\nc", True, ["a\nb", "c"]),  # BOM dropped; no final newline
        (b"a\rb\x0bc\n \t \nd", False, ["a\rb\x0bc", "d"]),  # only \n ends a line
        (b"\n\na\n  \nb\nc\n\n", True, ["a", "b\nc"]),  # spaces-only line: blank
        (b"\xef\xbb\xbf", False, []),
    ],
)
def test_text_examples(tmp_path, data, paragraphs, expected):
    (tmp_path / "t.txt").write_bytes(data)
    assert list(sources.text_examples(tmp_path / "t.txt", paragraphs=paragraphs)) == expected


def test_bad_text_files(tmp_path):
    (tmp_path / "ok.txt").write_text("fine\n", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"fine\nfine\nnot \xc3\x28 fine\n")

    def prepare(*files, paragraphs=False):
        return sources.prepare_text_corpus(
            {"train": [tmp_path / f for f in files]},
            data_dir=tmp_path / "data",
            name="bad_text",
            paragraphs=paragraphs,
        )

    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.txt'}, line 3: not valid UTF-8"):
        prepare("ok.txt", "bad.txt", paragraphs=True)
    with pytest.raises(FileNotFoundError, match=rf"text file {tmp_path / 'no.txt'} does not"):
        prepare("ok.txt", "no.txt")
    assert sources.read_text_file(tmp_path / "ok.txt") == [{"text": "fine"}]
    (tmp_path / "blank.txt").write_bytes(b" \n\n")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'blank.txt'} holds no text"):
        sources.read_text_file(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.txt'}, line 3: not valid UTF-8"):
        sources.read_text_file(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'no.txt'} does not exist"):
        sources.read_text_file(tmp_path / "no.txt")
    with pytest.raises(ValueError, match="give a text file or a list of them"):
        sources.prepare_text_corpus({"train": []}, data_dir=tmp_path, name="bad_text")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("direction", ["en-fr", "en_de", "en-en", "de-en-de", None])
def test_wmt14_bad_direction(direction):
    with pytest.raises(ValueError, match="'en-de' or 'de-en'"):
        sources.wmt14_keys(direction)


def test_to_pair_maps_wmt_features():
    example = {"de": b"Hallo", "en": b"Hello"}
    assert sources.to_pair(example, *sources.wmt14_keys("en-de")) == {
        "source": "Hello",
        "target": "Hallo",
    }


def test_no_tensorflow_needed(tmp_path):
    """With `import tensorflow` made to fail, a parallel and a text corpus are prepared and
    read, and a .tgz is extracted by TFDS's download manager."""
    (tmp_path / "a.tgz").write_bytes(_tgz({"d/x.txt": ["hi"]}))
    script = textwrap.dedent(
        f"""
        import sys

        class NoTensorFlow:  # as if TensorFlow were not installed, even where it is
            def __init__(self, finders):
                self.finders = finders

            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorflow":
                    return None
                for finder in self.finders:
                    spec = finder.find_spec(name, path, target)
                    if spec is not None:
                        return spec
                return None

        sys.meta_path[:] = [NoTensorFlow(list(sys.meta_path))]
        import tensorflow_datasets as tfds
        from attention_jax.data import sources
        data = {str(tmp_path)!r}
        with open(data + "/c.tsv", "w") as f:
            f.write("a\\tA\\n")
        sources.prepare_local_corpus({{"train": data + "/c.tsv"}}, data_dir=data, name="no_tf")
        assert list(sources.load_source("no_tf", "train", data_dir=data)) == [
            {{"source": "a", "target": "A"}}
        ]
        sources.prepare_text_corpus({{"train": data + "/c.tsv"}}, data_dir=data, name="no_tf_t")
        assert list(sources.load_text_source("no_tf_t", "train", data_dir=data)) == [
            {{"text": "a\\tA"}}
        ]
        manager = tfds.download.DownloadManager(download_dir=data + "/dl")
        with sources._tf_free_extraction():
            out = manager.extract(data + "/a.tgz")
        assert (out / "d" / "x.txt").read_text() == "hi"
        assert "tensorflow" not in sys.modules
        print("ok")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_wmt17_is_an_option_with_the_same_reader(tmp_path):
    with pytest.raises(
        sources.DatasetNotPreparedError, match=r"--dataset=wmt17_translate/de-en --data_dir="
    ):
        sources.load_wmt14("train", data_dir=tmp_path, name=sources.WMT17)
    with pytest.raises(ValueError, match="WMT dataset must be one of"):
        sources.load_wmt14("train", data_dir=tmp_path, name="wmt19_translate/de-en")
