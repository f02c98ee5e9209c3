"""``attention-jax train``: train a Transformer or a decoder-only LM in a workdir (rerun to resume).

    attention-jax train --config=default --workdir=/tmp/aj           (a shipped config's name)
    attention-jax train --config=lm --workdir=/tmp/aj_lm             (a decoder-only LM)
    attention-jax train --config=experiments/configs/default.py ...   (or any config file)
    attention-jax train --list_configs                                (the shipped configs)
    attention-jax train --config=wmt14_base --dry_run                 (the resolved config)

Any failure is one line on stderr and exit status 1 (``--verbosity=1`` or
ATTENTION_JAX_TRACEBACK=1 shows the traceback); SIGTERM / Ctrl-C save a checkpoint and exit
143 / 130. ``experiments/train.py`` runs this module.

JAX and the library are imported inside the functions that use them, not here: ``--help``,
``--list_configs`` and a mistyped flag answer without loading them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from attention_jax import configs
from attention_jax.cli import errors

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    f"A shipped config's name ({', '.join(configs.names())}; --list_configs) or an "
    "ml_collections config file.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Checkpoints and metrics go here; reused to resume.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-host run via jax.distributed.initialize(); with no "
    "coordinator flags JAX detects the cluster (Cloud TPU pods, SLURM, Open MPI).",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_bool(
    "dry_run",
    False,
    "Check the config, print it resolved (the model's TransformerConfig included) and exit "
    "without training or writing anything.",
)
flags.DEFINE_bool("list_configs", False, "List the shipped configs (--config=NAME) and exit.")
flags.register_multi_flags_validator(
    ["workdir", "dry_run", "list_configs"],
    lambda values: bool(values["workdir"] or values["dry_run"] or values["list_configs"]),
    message="--workdir is required (or --dry_run, --list_configs)",
)


class TrainingStopped(errors.CommandError):
    """An operational stop of a run (its message is complete, on one line)."""


def _one_line(message: str) -> str:
    """A multi-line message (a list of differing fields) joined onto one line."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    out = parts[0] if parts else ""
    for part in parts[1:]:
        out += (" " if out.endswith(":") else "; ") + part
    return out


def parse_flags(argv):
    """absl's parsing (app.run's flags_parser): a shipped config's name is turned into its
    file, and what config_flags lets through as a traceback (a missing or broken config
    file, an override of a field the file does not define) is reported like an unknown flag:
    one line, exit code 1."""
    try:
        argv = _config_names_to_paths(argv)
        rest = FLAGS(argv)
        if FLAGS.config is None:
            if FLAGS.list_configs:
                return rest
            raise flags.Error(
                "--config is required: a shipped config's name "
                f"({', '.join(configs.names())}) or a config file"
            )
        FLAGS.config.keys()  # a file that failed to load raises only when first read
        return rest
    except flags.Error as e:
        message = str(e)
        if "--config=None" in message and _config_path(argv)[0]:  # get_config() returned None
            message = _config_error(argv, e)
    except Exception as e:  # the config file's own code may raise anything
        message = _config_error(argv, e)
    sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help.")


def _config_names_to_paths(argv) -> list[str]:
    """``--config=default`` -> ``--config=<package>/configs/default.py`` (configs.resolve)."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        match = re.match(r"(--?config=)(.*)$", arg)
        if match:
            argv[i] = match.group(1) + configs.resolve(match.group(2))
        elif re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
            argv[i + 1] = configs.resolve(argv[i + 1])
    return argv


def _config_path(argv) -> list[str]:
    """[path] or [path, argument] of the last --config=PATH[:ARG] or --config PATH[:ARG]."""
    value = ""
    for i, arg in enumerate(argv):
        if re.match(r"--?config(=|$)", arg):
            value = arg.partition("=")[2] if "=" in arg else "".join(argv[i + 1 : i + 2])
    return value.split(":", 1)  # config_flags passes ARG to get_config


def _config_error(argv, error) -> str:
    """What went wrong with --config, found again from the file (this is the error path)."""
    if isinstance(error, ValueError) and "no shipped config" in str(error):
        return f"--config: {error} (or give a config file's path)"
    path, *argument = _config_path(argv)
    if not os.path.isfile(path):
        return f"--config={path}: no such file"
    if isinstance(error, SyntaxError):
        return f"--config={path}, line {error.lineno}: syntax error: {error.msg}"
    try:
        spec = importlib.util.spec_from_file_location("config_file", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            return f"--config={path} defines no get_config() function"
        config = module.get_config(*argument)
    except Exception as e:  # the file's own error
        return f"--config={path}: loading it raised {type(e).__name__}: {e}"
    if not isinstance(config, ml_collections.ConfigDict):
        return f"--config={path}: get_config() returned {type(config).__name__}, not a ConfigDict"
    for arg in argv:
        match = re.match(r"--?(?:no)?config\.([^=]+)", arg)
        if not match:
            continue
        node, walked = config, "config"
        for key in match.group(1).split("."):
            if not hasattr(node, "keys") or key not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                return (
                    f"{arg}: {walked} has no field {key!r} (an override can change a field "
                    f"of {path}, not add one); its fields: {known}"
                )
            node, walked = node[key], f"{walked}.{key}"
    return f"--config={path}: {type(error).__name__}: {error}"


def list_configs() -> str:
    width = max(map(len, configs.names()))
    lines = [f"{name:<{width}}  {configs.summary(name)}" for name in configs.names()]
    lines.append(f"(files in {configs.HERE}; --config=NAME or --config=PATH.py)")
    return "\n".join(lines)


def dry_run(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
    """The config as a run in `workdir` would use it (train.loop.resolve_config: the
    vocabulary's size, the absolute data dir), then the model's TransformerConfig. Reads
    files, writes nothing."""
    import jax.numpy as jnp

    from attention_jax.data.sources import DatasetNotPreparedError
    from attention_jax.train.loop import resolve_config
    from attention_jax.workdir.experiment import model_config

    note = ""
    try:
        config = resolve_config(config, workdir if workdir and os.path.isdir(workdir) else None)
    except DatasetNotPreparedError as e:  # still worth showing; training would refuse
        note = f"\n(not resolved against the data: {_one_line(str(e))})"
    cfg = model_config(config)

    def show(name):
        value = getattr(cfg, name)
        return jnp.dtype(value).name if name in ("dtype", "param_dtype") else repr(value)

    model = "\n".join(f"  {f.name}: {show(f.name)}" for f in dataclasses.fields(cfg))
    resolved = config.to_json_best_effort(indent=2, sort_keys=True)
    return f"config:\n{resolved}\nTransformerConfig:\n{model}{note}"


def _operational(error: BaseException) -> bool:
    """Errors a run meets in normal use, whose message is the whole story."""
    from attention_jax.data.sources import DatasetNotPreparedError
    from attention_jax.train.loop import NoIntactCheckpointError, NonFiniteError
    from attention_jax.workdir import WorkdirInUseError
    from attention_jax.workdir.checkpoint import IncompatibleCheckpointError

    return isinstance(
        error,
        (
            NonFiniteError,
            IncompatibleCheckpointError,
            DatasetNotPreparedError,
            WorkdirInUseError,
            NoIntactCheckpointError,
        ),
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.list_configs:
        print(list_configs())
        return
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO

    from attention_jax.nn.sharding import initialize_distributed
    from attention_jax.train import loop as train_loop
    from attention_jax.workdir.experiment import check_experiment

    # Checked before a multi-host run is joined; the mesh, which needs the devices, is
    # checked by train_and_evaluate (and a dry run may describe another machine's).
    check_experiment(FLAGS.config, devices=False)
    if FLAGS.dry_run:
        print(dry_run(FLAGS.config, FLAGS.workdir))
        return
    if FLAGS.distributed or FLAGS.coordinator_address:
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        train_loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)  # checks it all again
    except Exception as e:
        if _operational(e):
            raise TrainingStopped(_one_line(str(e))) from e
        raise


def prog_name(argv0: str) -> str:
    """``train.py`` for experiments/train.py, ``attention-jax train`` for the dispatcher."""
    return argv0 if " " in argv0 else os.path.basename(argv0)


def run(argv: list[str] | None = None) -> None:
    """The command: flags from `argv` (default sys.argv), errors as one line."""
    argv = list(sys.argv if argv is None else argv)
    for flag in FLAGS.get_key_flags_for_module(__name__):  # --helpshort lists the main
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)  # module's: these are ours
    errors.run(main, prog_name(argv[0]), argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
