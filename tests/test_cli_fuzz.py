"""translate.py and evaluate.py fed odd text, as subprocesses: one output line per input line
whatever the text holds, a clear exit status, one-line errors, never a traceback.

Each subprocess costs seconds of JAX start-up and model loading, so one file holds all the
odd cases (2,000 lines) and goes through each CLI once; the runs that check an exit status
fail before the model is loaded. The line-splitting rules themselves are tested
exhaustively in-process in test_inference_lines.py.
"""

import json
import os
import pathlib
import selectors
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from test_translate_cli import _snapshot, _truncate_arrays, trained_workdir

from attention_jax.data.tasks import load_eval_pairs
from attention_jax.decode.translator import eval_pairs
from attention_jax.workdir import load_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
LINES = 2000
# Both modules read the trained workdir of `trained_workdir`, built once per session
# (shared_fixtures.build_once; the xdist_group mark only documents the sharing).
pytestmark = pytest.mark.xdist_group("translate_workdir")

# (raw bytes of one input line without its "\n", whether it is blank: an empty output line)
ODD = [
    (b"\xef\xbb\xbfthe small dog sees a red car .", False),  # a BOM: dropped
    ("the cat\u2028sees the dog .".encode(), False),  # U+2028 LINE SEPARATOR: a space
    ("\u2029".encode(), True),  # U+2029 PARAGRAPH SEPARATOR alone: blank
    ("a red car\x85is big .".encode(), False),  # NEL (U+0085)
    (b"the dog\x0bsees\x0ca cat .", False),  # VT, FF
    (b"\x1c\x1d\x1e", True),  # the file/group/record separators: blank
    (b"the small dog sees a red car .\r", False),  # CRLF: the same as the first line
    (b"the cat\rsees\ra dog .", False),  # lone CRs: spaces, one line
    (b"", True),
    (b"  \t  ", True),
    (b"\t", True),
    (" ".join(["the red dog"] * 40).encode(), False),  # over-long: truncated
    ("caf\u00e9 \U0001f642 .".encode(), False),
    (b"\xef\xbb\xbf", False),  # a BOM inside the file is text (U+FEFF)
    (" ".join(["a cat"] * 300).encode(), False),  # over-long: truncated
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def zoo(workdir, tmp_path_factory):
    """A 2,000-line file: the odd lines first, then the test split's sentences with a blank
    line every 7th; the last line has no "\\n". Returns (path, lines, blank, too_long)."""
    sources, _ = load_eval_pairs(load_config(str(workdir)), "test")
    lines = [raw for raw, _ in ODD]
    blank = {i for i, (_, b) in enumerate(ODD) if b}
    while len(lines) < LINES:
        if len(lines) % 7 == 0:
            blank.add(len(lines))
            lines.append(b"")
        else:
            lines.append(sources[len(lines) % len(sources)].encode())
    path = tmp_path_factory.mktemp("zoo") / "zoo.txt"
    path.write_bytes(b"\n".join(lines))
    too_long = [i + 1 for i, (raw, _) in enumerate(ODD) if len(raw) > 200]
    return path, lines, blank, too_long


def _cli(script, *args, **kwargs):
    command = [sys.executable, str(ROOT / "experiments" / script)]
    if script == "-m":
        command = [sys.executable, "-m", "attention_jax"]
    return subprocess.run(
        [*command, *map(str, args)], capture_output=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, **kwargs,
    )  # fmt: skip


def _output_lines(data: bytes) -> list[str]:
    """The lines of a CLI's output, checking that it is whole lines of UTF-8."""
    assert data.endswith(b"\n") or not data
    return data.decode("utf-8").split("\n")[:-1]


def _one_error_line(r, prog: str, *needles: str) -> str:
    stderr = r.stderr.decode()
    assert r.returncode == 1, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _check_alignment(out: list[str], lines, blank) -> None:
    assert len(out) == len(lines) == LINES
    assert {i for i, x in enumerate(out) if not x} >= blank  # blank in, blank out
    # The trained model translates a sentence into words: a shift by one line anywhere
    # would put an empty output where a sentence was.
    words = [i for i in range(len(ODD), LINES) if i not in blank]
    assert sum(1 for i in words if out[i]) >= 0.95 * len(words)


def test_translate_writes_one_line_per_input_line(workdir, zoo, tmp_path):
    path, lines, blank, too_long = zoo
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "out.txt"
    target.write_text("old\n")
    link = tmp_path / "out.txt"
    link.symlink_to(target)
    r = _cli("translate.py", f"--workdir={workdir}", f"--input={path}", f"--output={link}",
             "--beam_size=1", "--batch_size=256")  # fmt: skip
    stderr = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link is kept
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temporary
    out = _output_lines(target.read_bytes())
    _check_alignment(out, lines, blank)
    assert out[0] == out[6] and out[0]  # a BOM and a CRLF change nothing
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, stderr
    assert warnings[0].startswith(
        "translate.py: warning: 2 line(s) longer than the model's max_len=64 tokens"
    )
    assert warnings[0].endswith("truncated to their first 64 tokens: line(s) 12, 15")
    assert too_long == [12, 15]
    assert out[too_long[0] - 1] and out[too_long[1] - 1]


def test_evaluate_scores_one_hypothesis_per_source_line(workdir, zoo, tmp_path):
    path, lines, blank, too_long = zoo
    reference = tmp_path / "ref.txt"
    reference.write_bytes(b"\r\n".join(lines) + b"\r\n")  # CRLF: the same 2,000 lines
    hypotheses = tmp_path / "hyp.txt"
    r = _cli("evaluate.py", f"--workdir={workdir}", f"--source={path}",
             f"--reference={reference}", f"--hypotheses={hypotheses}", "--beam_size=1",
             "--batch_size=256", "--too_long=skip")  # fmt: skip
    stderr, stdout = r.stderr.decode(), r.stdout.decode()
    assert r.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    assert f"sentences: {LINES}  checkpoints: [300]" in stdout and "BLEU" in stdout
    out = _output_lines(hypotheses.read_bytes())
    _check_alignment(out, lines, blank)
    assert out[too_long[0] - 1] == out[too_long[1] - 1] == ""  # skipped
    assert f"were skipped (empty output lines): line(s) {too_long[0]}, {too_long[1]}" in stderr


def test_bad_bytes_stop_before_the_model_loads_naming_the_line(workdir, tmp_path):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"the dog .\nthe\0cat .\n")
    out = tmp_path / "out.txt"
    r = _cli("-m", "translate", f"--workdir={workdir}", f"--input={nul}", f"--output={out}")
    _one_error_line(r, "attention-jax translate", f"--input {nul}, line 2: a NUL byte")
    assert not out.exists()

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"the dog .\n" * 1998 + b"caf\xe9 .\nthe cat .\n")
    r = _cli("translate.py", f"--workdir={workdir}", f"--input={latin1}", f"--output={out}")
    _one_error_line(r, "translate.py", f"--input {latin1}, line 1999: not valid UTF-8")
    assert not out.exists()

    good = tmp_path / "good.txt"
    good.write_bytes(b"a .\nb .\n")
    r = _cli("evaluate.py", f"--workdir={workdir}", f"--source={good}", f"--reference={latin1}")
    _one_error_line(r, "evaluate.py", f"--reference {latin1}, line 1999: not valid UTF-8")
    r = _cli("evaluate.py", f"--workdir={workdir}", f"--source={good}", f"--reference={nul}",
             "--data_dir=/ignored")  # fmt: skip
    _one_error_line(r, "evaluate.py", "--reference", "line 2: a NUL byte")


def test_evaluate_reads_the_data_dir_config_json_recorded(workdir, tmp_path):
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((copy / "config.json").read_text())
    config["data"].update(dataset="my_corpus", data_dir=str(tmp_path / "recorded"))
    (copy / "config.json").write_text(json.dumps(config))
    r = _cli("evaluate.py", f"--workdir={copy}")
    _one_error_line(r, "evaluate.py", "not prepared", str(tmp_path / "recorded"), "--data_dir")
    with pytest.raises(FileNotFoundError, match="not prepared in /elsewhere"):
        eval_pairs(load_config(str(copy)), "test", data_dir="/elsewhere")


# `python ARGS` with SIGINT at its default, as in a terminal, whatever this process inherited
# (a background job of a script inherits SIGINT ignored, and the commands keep it so).
SIGINT_DEFAULT = [
    sys.executable, "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])",
]  # fmt: skip


def _read_line(proc, timeout: float = 300) -> bytes:
    """One line of the process's stdout, failing after `timeout` s (a CLI that waits for
    EOF before writing would hang here)."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    assert selector.select(timeout), "no output line while stdin is still open"
    return proc.stdout.readline()


def test_stdin_is_streamed_interrupt_is_one_line_and_a_damaged_checkpoint_is_skipped(
    workdir, tmp_path
):
    copy = tmp_path / "w"
    shutil.copytree(workdir, copy)
    _truncate_arrays(copy / "checkpoints" / "300")
    before = _snapshot(copy)
    proc = subprocess.Popen(
        [*SIGINT_DEFAULT, str(ROOT / "experiments" / "translate.py"), f"--workdir={copy}",
         "--beam_size=1", "--batch_size=8"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, bufsize=0,
    )  # fmt: skip
    errors = []  # stderr, read all along: a full pipe would block the child
    drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    drain.start()
    try:
        proc.stdin.write(b"the dog sees a cat .\n")
        first = _read_line(proc)
        proc.stdin.write("\n\u2028\na red car .\r\n".encode())
        rest = [_read_line(proc) for _ in range(3)]
        proc.send_signal(signal.SIGINT)  # while it waits for more input
        proc.wait(timeout=120)
        stdout = proc.stdout.read()
        drain.join(30)
    finally:
        proc.kill()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass
    stderr = errors[0].decode()
    assert first.strip() and rest[0] == rest[1] == b"\n" and rest[2].strip() and not stdout
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    said = [line for line in stderr.splitlines() if line.startswith("translate.py: ")]
    assert said[-1] == "translate.py: interrupted"
    assert len(said) == 2 and "checkpoint of step 300" in said[0] and "trying step 200" in said[0]
    assert _snapshot(copy) == before  # nothing moved aside or written
