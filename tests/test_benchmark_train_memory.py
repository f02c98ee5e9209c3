"""benchmarks/train_memory.py: its tables, ratios, goals and exit status (on made-up row
results, checked against hand-computed ratios), and one real row in a child process."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "train_memory.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_memory_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MIB = 1024  # KiB


def fake_results(spec):
    """Made-up results: + step 1000 / 700 / 400 / 600 MiB (half with scan), step 1.0 /
    1.05 / 1.4 / 1.1 s; compile 10 s (L=1), 20 s (L=2), under scan 10 s and 11 s."""
    if spec["kind"] == "step":
        over, step_s = {(False, "none"): (1000, 1.0), (True, "none"): (700, 1.05),
                        (True, "full"): (400, 1.4), (True, "dots"): (600, 1.1)}[
            spec["loss_chunk"] > 0, spec["remat"]]  # fmt: skip
        over //= 2 if spec["scan"] else 1  # scan_layers: half the + step
        return {"status": "ok", "params": 1_000_000, "state_bytes": 50 * 2**20,
                "over_step_kib": over * MIB, "step_peak_kib": (over + 500) * MIB,
                "xla_temp_bytes": over * 2**20 // 2, "step_s": step_s, "compile_s": 3.0,
                "load_after": (1.0, 1.0, 1.0)}  # fmt: skip
    seconds = {(1, False): 10.0, (2, False): 20.0, (1, True): 10.0, (2, True): 11.0}
    return {"status": "ok", "params": 1_000_000, "lower_s": 1.0, "xla_temp_bytes": 2**20,
            "compile_s": seconds[spec["layers"], spec["scan"]]}  # fmt: skip


def table_rows(out, first):
    """{row name: [cells]} of the Markdown rows whose first cell starts with `first`."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].startswith(first):
            rows[cells[0]] = cells
    return rows


def test_tables_ratios_goals_and_exit_status(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "measure", fake_results)
    out_json = tmp_path / "rows.json"
    assert bench.main(["--smoke", "--in_process", "--json_out", str(out_json)]) == 0
    out = capsys.readouterr().out
    steps = table_rows(out, "chunk") | table_rows(out, "plain")
    assert sorted(steps) == sorted(
        ["plain", "chunk", "chunk+full", "chunk+dots", "chunk+full+scan", "chunk+dots+scan"]
    )
    # row, loss_chunk, remat, scan, params, state, + step, x, temp, x, peak, step s, x, ...
    assert steps["chunk+full"][1:4] == ["8", "full", "False"]
    assert steps["chunk+dots+scan"][1:4] == ["8", "dots", "True"]
    assert steps["chunk+full"][6:10] == ["400", "**0.40x**", "200", "0.40x"]
    assert steps["chunk"][6:8] == ["700", "**0.70x**"]
    assert steps["chunk+dots"][11:13] == ["1.10", "**1.10x**"]
    assert steps["plain"][5:8] == ["50", "1,000", "**1.00x**"]
    compiles = table_rows(out, "compile_L")
    assert sorted(compiles) == ["compile_L1", "compile_L1_scan", "compile_L2", "compile_L2_scan"]
    assert compiles["compile_L2"][5:7] == ["20.0", "**2.00x**"]
    assert compiles["compile_L2_scan"][5:7] == ["11.0", "**1.10x**"]
    assert "chunk+full '+ step' / plain = 0.40x (goal <= 0.5x: met)" in out
    assert "chunk+dots step time / plain = 1.10x (goal <= 1.15x: met" in out
    assert "chunk+full+scan '+ step' / plain = 0.20x (goal <= 0.5x: met)" in out
    assert "scan L=2 / L=1 = 1.10x; unscanned L=2 / L=1 = 2.00x" in out
    record = json.loads(out_json.read_text())
    assert [r["row"] for r in record["rows"]][:2] == ["plain", "chunk"]
    assert record["goals_met"] == {"peak": True, "time": True, "peak+scan": True,
                                   "time+scan": True, "flat": True}  # fmt: skip

    # A missing option is n/a (exit 0); a failing row makes the script exit 1.
    def flaky(spec):
        if spec.get("scan"):
            return {"status": "n/a", "note": "scan_layers not available"}
        if spec.get("remat") == "dots":
            return {"status": "error", "note": "ValueError: boom"}
        return fake_results(spec)

    monkeypatch.setattr(bench, "measure", flaky)
    assert bench.main(["--smoke", "--in_process", "--rows", "compile"]) == 0
    out = capsys.readouterr().out
    assert (
        "n/a (scan_layers not available)"
        in table_rows(out, "compile_L2_scan")["compile_L2_scan"][3]
    )
    assert bench.main(["--smoke", "--in_process", "--rows", "plain,chunk+dots"]) == 1
    captured = capsys.readouterr()
    assert "error: ValueError: boom" in table_rows(captured.out, "chunk+dots")["chunk+dots"][4]
    assert "FAILED rows: chunk+dots" in captured.err
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--rows", "plain,nonsense"])


def test_one_real_row_in_a_child_process(tmp_path):
    out_json = tmp_path / "rows.json"
    r = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--rows", "plain", "--json_out", str(out_json)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["status"] == "ok" and row["backend"] == "cpu"
    assert 0 <= row["state_bytes"] - 3 * 4 * row["params"] < 64  # params, Adam mu and nu
    assert row["over_step_kib"] >= 0 and row["xla_temp_bytes"] > 0 and row["step_s"] > 0
    # the tiny preset, V = 64: shared embeddings, 2 + 2 post-LN layers (no final norms)
    assert row["params"] == sum(
        [64 * 32, 2 * (4 * (32 * 32 + 32) + 2 * 32 * 64 + 64 + 32 + 4 * 32),  # encoder
         2 * (8 * (32 * 32 + 32) + 2 * 32 * 64 + 64 + 32 + 6 * 32)]  # decoder
    )  # fmt: skip
    assert "| plain " in r.stdout and "chunk+full peak vs plain: not measured" in r.stdout
