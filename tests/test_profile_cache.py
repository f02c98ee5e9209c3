"""config.profile_steps (a jax.profiler trace in the workdir) and config.compilation_cache_dir
(JAX's persistent compilation cache), on a tiny reversal run of a few steps."""

import gzip
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from shared_fixtures import build_once

from attention_jax.train import loop as train_loop
from attention_jax.workdir import PROFILE_DIR
from attention_jax.workdir.experiment import check_experiment

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tiny_config(steps, **overrides):
    """The reversal config at its smallest: 1 layer, D = 16, short sequences, one held-out
    batch (the final report decodes it)."""
    spec = importlib.util.spec_from_file_location(
        "reversal_config", ROOT / "attention_jax" / "configs" / "reversal.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.model.update(d_model=16, num_heads=2, num_layers=1, d_ff=32, max_len=16)
    config.data.update(min_len=2, max_len=6)
    config.batch_size = 8
    config.num_train_steps = steps
    config.log_every = steps
    config.eval_every = 1000
    config.eval_batches = 1
    config.beam_size = 1
    config.checkpoint_every = 1000
    config.update(overrides)
    return config


_RUN = """
import json, sys
import jax
counts = {"hits": 0, "misses": 0}
def count(event, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":  # compiled and written
        counts["misses"] += 1
jax.monitoring.register_event_listener(count)
sys.path.insert(0, sys.argv[1])
from test_profile_cache import _tiny_config
from attention_jax.train import loop
overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[3]).items()}
loop.train_and_evaluate(_tiny_config(3, **overrides), sys.argv[2])
print("COUNTS", json.dumps(counts))
"""


def _run(workdir, **overrides):
    """A tiny 3-step run in a fresh process (one CPU device, none of the suite's cache
    settings): its compilation cache hits and misses."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}  # fmt: skip
    flags = env.pop("XLA_FLAGS", "").split()  # XLA reads a non-"--" value as a file name
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    argv = [sys.executable, "-c", _RUN, str(ROOT / "tests"), str(workdir), json.dumps(overrides)]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("COUNTS ")]
    return json.loads(line.removeprefix("COUNTS "))


@pytest.fixture
def two_runs(tmp_path_factory):
    """The same tiny run twice, each in a fresh process, with one compilation cache; the
    second also profiles steps [1, 3). Built once per session (shared_fixtures)."""

    def build(path):
        path.mkdir(parents=True)
        cache = str(path / "cache")
        counts = [
            _run(path / "first", compilation_cache_dir=cache),
            _run(path / "second", compilation_cache_dir=cache, profile_steps=[1, 3]),
        ]
        (path / "counts.json").write_text(json.dumps(counts))

    return build_once(tmp_path_factory, "profile_cache_runs", build)


def test_a_second_run_with_the_compilation_cache_compiles_less(two_runs):
    first, second = json.loads((two_runs / "counts.json").read_text())
    # init, train step, eval step, decoding: compiled and written by the first run ...
    assert first["hits"] == 0 and first["misses"] >= 3, first
    # ... and read back by the second, which compiles nothing
    assert second["hits"] >= first["misses"] and second["misses"] == 0, (first, second)
    assert any((two_runs / "cache").iterdir())


def test_a_profile_run_writes_a_trace_of_the_chosen_steps(two_runs):
    # <workdir>/profile/plugins/profile/<time>/<host>.xplane.pb (and .trace.json.gz)
    assert not (two_runs / "first" / PROFILE_DIR).exists()  # () = no profile
    (run,) = (two_runs / "second" / PROFILE_DIR / "plugins" / "profile").iterdir()
    files = [p.name for p in run.iterdir()]
    assert any(name.endswith(".xplane.pb") for name in files), files
    # Its step annotations: train steps 1 and 2, and no other.
    (trace,) = [p for p in run.iterdir() if p.name.endswith(".trace.json.gz")]
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    steps = sorted(
        int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e
    )
    assert steps == [1, 2], steps


def test_the_cache_settings_are_restored_after_the_run(tmp_path):
    """A notebook's later work is not cached in the run's folder (nothing is compiled here)."""
    before = [getattr(jax.config, name) for name in train_loop._CACHE_SETTINGS]
    with train_loop.compilation_cache_in(str(tmp_path / "c")):
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert [getattr(jax.config, name) for name in train_loop._CACHE_SETTINGS] == before
    with train_loop.compilation_cache_in(""):  # off: nothing changes
        assert [getattr(jax.config, name) for name in train_loop._CACHE_SETTINGS] == before


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("profile_steps", (13, 10), "(13, 10)"),
        ("profile_steps", (-1, 2), "(-1, 2)"),
        ("profile_steps", (3,), "(3,)"),
        ("profile_steps", (1.0, 2.0), "(1.0, 2.0)"),
    ],
)
def test_bad_values_are_refused_in_one_line(field, value, expected):
    config = _tiny_config(2)
    config[field] = value
    with pytest.raises(ValueError) as e:
        check_experiment(config, devices=False)
    message = str(e.value)
    assert message.startswith(f"config.{field} must be ") and message.endswith(f", got {expected}")
    assert "\n" not in message


@pytest.mark.parametrize("value", [(), None, (0, 1), [10, 13]])
def test_off_and_good_windows_pass(value):
    config = _tiny_config(2)
    config.profile_steps = value
    check_experiment(config, devices=False)
