"""What a training run reports: metrics.jsonl and TensorBoard event files in the workdir, and a
progress bar on the terminal. Only process 0 writes or prints anything.

TensorBoard files are written with tensorboardX (numpy + protobuf; no TensorFlow), under
``<workdir>/tensorboard``; view them with ``tensorboard --logdir <workdir>`` (``pip install
'attention_jax[tensorboard]'`` installs TensorBoard). metrics.jsonl is strict JSON: a NaN or
infinite value is written as null (`read_metrics` reads it back as NaN).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import tqdm

from attention_jax.workdir import metrics_path, tensorboard_dir

_SPLITS = ("train", "eval", "test")


def _tag(key: str) -> str:
    """``train_loss`` -> ``train/loss``: TensorBoard groups the charts by split."""
    split, _, name = key.partition("_")
    return f"{split}/{name}" if split in _SPLITS and name else key


class MetricsWriter:
    """Appends ``{"step": ..., metrics...}`` records to ``metrics.jsonl`` and the same scalars
    to TensorBoard. Resuming at `resume_step` first drops every record past that step from
    both (TensorBoard's ``purge_step``), so the logs equal an uninterrupted run's (and the
    final test report, which the resumed run writes again, and a line a kill cut short)."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.path = metrics_path(workdir)
        self.enabled = jax.process_index() == 0
        self._tb = None
        if not self.enabled:
            return
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if _kept(line, resume_step)]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
        self._tb = _summary_writer_class()(
            tensorboard_dir(workdir), purge_step=resume_step or None, flush_secs=30
        )

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(to_json_line({"step": step, **metrics}))
        for key, value in metrics.items():
            self._tb.add_scalar(_tag(key), value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported here (only process 0 writes) and without
    torch: tensorboardX imports torch, when it is installed, only to accept torch tensors
    (``writer.numpy_compatible``), and that import alone takes ~9 s on a 2-core CPU. Scalars
    never need it, so while tensorboardX loads, ``import torch`` fails and tensorboardX
    takes its no-torch path. A program that already imported torch keeps it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def to_json_line(record: dict) -> str:
    """One metrics.jsonl line. NaN and ±Inf (a diverged loss) are written as null: Python's
    json writes them as the bare words NaN / Infinity, which are not JSON, and which `jq`,
    JavaScript and most other readers refuse."""

    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return json.dumps({k: finite(v) for k, v in record.items()}, allow_nan=False) + "\n"


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl, null (and, from older files, bare NaN / Infinity)
    read as float NaN / ±Inf; a last line cut short by a kill is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)  # Python's json accepts the bare words too
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(
                    {k: math.nan if v is None and k != "step" else v for k, v in record.items()}
                )
    return records


def _kept(line: str, resume_step: int) -> bool:
    """Whether a metrics.jsonl record survives a resume at `resume_step`: not past it, not
    the final test report (the resumed run writes it again), not a line cut short by a kill."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    if not line.endswith("\n") or not isinstance(record, dict):
        return False
    return record.get("step", resume_step + 1) <= resume_step and not any(
        k.startswith("test_") for k in record
    )


def _si(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e4 else f"{x:.0f}"


class Progress:
    """A tqdm bar (steps, loss, tokens/s, MFU, ETA) when stderr is a terminal or notebook;
    otherwise one plain line per logging interval, which reads well in log files and CI."""

    def __init__(self, total: int, initial: int = 0):
        self.total = total
        self.enabled = jax.process_index() == 0
        interactive = self.enabled and (sys.stderr.isatty() or "ipykernel" in sys.modules)
        self._bar = (
            tqdm.tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            if interactive
            else None
        )
        self._done = initial

    def update(self, step: int, record: dict, eta_s: float) -> None:
        """Shows `record` (train_loss, train_accuracy, tokens_per_s, optional mfu) at `step`."""
        if not self.enabled:
            return
        stats = {
            "loss": f"{record['train_loss']:.4f}",
            "acc": f"{record['train_accuracy']:.3f}",
            "tok/s": _si(record["tokens_per_s"]),
        }
        if "mfu" in record:
            stats["MFU"] = f"{100 * record['mfu']:.1f}%"
        if self._bar is not None:
            self._bar.set_postfix(stats, refresh=False)
            self._bar.update(step - self._done)
        else:
            shown = "  ".join(f"{k} {v}" for k, v in stats.items())
            print(f"step {step}/{self.total}  {shown}  ETA {eta_s:.0f}s", flush=True)
        self._done = step

    def print(self, message: str) -> None:
        """A line of its own, above the bar."""
        if self._bar is not None:
            self._bar.write(message)
        elif self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
