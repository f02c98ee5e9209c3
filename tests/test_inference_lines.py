"""How translate / evaluate read and write lines (attention_jax.decode.translator), in-process: one
line per "\\n", whatever else the text holds; streaming reads; writing through symlinks,
FIFOs and /dev/fd/N. The CLIs themselves: test_cli_fuzz.py."""

import os
import re
import stat
import threading

import pytest

from attention_jax.decode.translator import (
    LINE_BREAKS,
    LineReader,
    Output,
    check_text_file,
    one_line,
    read_lines,
    split_lines,
)

# Everything str.splitlines() splits on, written out by hand (the Python docs' table).
SPLITLINES = ["\n", "\r", "\r\n", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
PIECES = [
    b"a", b"word ", b"\xc3\xa9", b"\xe2\x80\xa8", b"\xe2\x80\xa9", b"\xc2\x85", b"\x0b",
    b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\r", b"\r\n", b"\n", b"\n\n", b" ", b"\t",
    b"\xef\xbb\xbf", b"\xf0\x9f\x99\x82",
]  # fmt: skip


def _expected_count(data: bytes) -> int:
    """Lines = "\\n" characters, plus an unterminated last line (the reference rule)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def test_the_line_breaks_are_exactly_what_splitlines_splits_on():
    assert set(LINE_BREAKS) == {c for s in SPLITLINES for c in s}
    for c in map(chr, range(0x3000)):  # and nothing else in the BMP's first 12k characters
        assert (len(f"a{c}b".splitlines()) == 2) == (c in LINE_BREAKS), repr(c)


@pytest.mark.parametrize("sep", SPLITLINES)
def test_only_newline_ends_a_line(sep):
    data = f"one{sep}two\nthree\n".encode()
    lines = split_lines(data, "--input x")
    if sep in ("\n", "\r\n"):
        assert lines == ["one", "two", "three"]
    else:
        assert lines == ["one two", "three"]  # a space inside the line


def test_bom_crlf_empty_and_final_line():
    assert split_lines(b"", "x") == []
    assert split_lines(b"\xef\xbb\xbf", "x") == []
    assert split_lines(b"\n", "x") == [""]
    assert split_lines(b"\xef\xbb\xbfa\r\nb", "x") == ["a", "b"]
    assert split_lines(b"a\n\n  \nb\n", "x") == ["a", "", "  ", "b"]
    assert split_lines(b"a\rb\rc\r", "x") == ["a b c"]  # lone CRs: one line (documented)
    assert split_lines(b"x\xef\xbb\xbfy\n", "x") == ["x\ufeffy"]  # a BOM later is text


def test_random_texts_give_one_line_per_newline(rng):
    for _ in range(400):
        data = b"".join(PIECES[i] for i in rng.integers(0, len(PIECES), rng.integers(0, 30)))
        lines = split_lines(data, "x")
        assert len(lines) == _expected_count(data), data
        assert not any(c in LINE_BREAKS for line in lines for c in line), data


def test_nul_and_invalid_utf8_name_the_line():
    with pytest.raises(ValueError, match=r"--input f, line 3: a NUL byte at byte 2"):
        split_lines(b"a\nb\nc\0d\n", "--input f")
    with pytest.raises(ValueError, match=r"--input f, line 2: not valid UTF-8 at byte 3"):
        split_lines(b"ok\nab\xff\n", "--input f")
    with pytest.raises(ValueError, match=r"line 1: not valid UTF-8"):
        split_lines(b"\xed\xa0\x80\n", "--input f")  # a lone surrogate is not UTF-8


def test_one_line_replaces_every_break_with_a_space():
    text = "a" + "b".join(LINE_BREAKS) + "c"
    assert one_line(text) == "a" + "b".join(" " * len(LINE_BREAKS)) + "c"
    assert len(one_line(text).splitlines()) == 1


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 16])
def test_line_reader_in_chunks_equals_split_lines(chunk, rng):
    for _ in range(30):
        data = b"".join(PIECES[i] for i in rng.integers(0, len(PIECES), rng.integers(0, 40)))
        r, w = os.pipe()
        threading.Thread(target=lambda d=data, w=w: (os.write(w, d), os.close(w))).start()
        with os.fdopen(r, "rb") as f:
            got = list(LineReader(f, "x", chunk=chunk))
        assert got == split_lines(data, "x"), data


def test_line_reader_gives_what_has_arrived_without_waiting_for_a_full_batch():
    r, w = os.pipe()
    with os.fdopen(r, "rb") as f:
        reader = LineReader(f, "--input (stdin)")
        batches = reader.batches(64)
        os.write(w, "\ufeffone\ntwo\r\nthr".encode())
        first = []
        t = threading.Thread(target=lambda: first.append(next(batches)))
        t.start()
        t.join(10)
        assert first == [["one", "two"]]  # 2 lines, no EOF yet: not waiting for 62 more
        os.write(w, b"ee\nfour")
        os.close(w)
        assert list(batches) == [["three", "four"]]
        assert reader.count == 4


def test_line_reader_batches_a_file_fully(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(130)))
    with open(path, "rb") as f:
        sizes = [len(b) for b in LineReader(f, "x").batches(64)]
    assert sizes == [64, 64, 2]
    assert check_text_file(str(path), "--input") == 130
    assert read_lines(str(path), "--input")[-1] == "line 129"


def test_input_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--input .* does not exist"):
        read_lines(str(tmp_path / "nope"), "--input")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        check_text_file(str(tmp_path), "--input")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n" * 1998 + b"caf\xe9\n")  # latin-1 on line 1,999
    with pytest.raises(ValueError, match=re.escape(f"--input {bad}, line 1999: not valid UTF-8")):
        check_text_file(str(bad), "--input")


# ---- Output. ---------------------------------------------------------------------------


def _write(output: Output, lines):
    with output.open() as write:
        write(lines)


def test_output_to_a_new_and_an_existing_file_keeps_the_mode(tmp_path):
    path = tmp_path / "out.txt"
    _write(Output(str(path), "--output"), ["a", "b\u2028c"])
    assert path.read_bytes() == b"a\nb c\n"
    os.chmod(path, 0o640)
    _write(Output(str(path), "--output"), ["new"])
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left


def test_output_through_a_symlink_writes_its_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.txt"
    target.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    _write(Output(str(link), "--output"), ["x"])
    assert link.is_symlink() and target.read_text() == "x\n"
    dangling = tmp_path / "dangling.txt"
    dangling.symlink_to(tmp_path / "real" / "later.txt")
    _write(Output(str(dangling), "--output"), ["y"])
    assert dangling.is_symlink() and (tmp_path / "real" / "later.txt").read_text() == "y\n"


def test_a_failed_run_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        with Output(str(path), "--output").open() as write:
            write(["half"])
            raise KeyboardInterrupt
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_output_to_a_fifo_and_dev_fd(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    _write(Output(str(fifo), "--output"), ["one", "two"])
    reader.join(10)
    assert got == [b"one\ntwo\n"] and stat.S_ISFIFO(os.stat(fifo).st_mode)

    r, w = os.pipe()
    try:
        _write(Output(f"/dev/fd/{w}", "--output"), ["via fd"])
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        assert f.read() == b"via fd\n"

    appended = tmp_path / "log.txt"
    appended.write_text("kept\n")
    fd = os.open(appended, os.O_WRONLY | os.O_APPEND)  # as a shell's 3>>log.txt
    try:
        _write(Output(f"/dev/fd/{fd}", "--output"), ["added"])
    finally:
        os.close(fd)
    assert appended.read_text() == "kept\nadded\n"


def test_bad_outputs_are_refused_before_anything_runs(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"--output .* is a directory"):
        Output(str(tmp_path), "--output")
    with pytest.raises(FileNotFoundError, match=r"the folder .* does not exist"):
        Output(str(tmp_path / "no" / "out.txt"), "--output")
    with pytest.raises(FileNotFoundError, match="file descriptor 987 is not open"):
        Output("/dev/fd/987", "--output")


def test_expected_count_reference_is_itself_right():
    assert [_expected_count(d) for d in (b"", b"a", b"a\n", b"a\nb", b"\n\n")] == [0, 1, 1, 2, 2]
