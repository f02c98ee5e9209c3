"""Train a Transformer: thin absl entry point around attention_jax.train_loop.

python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/aj
"""

import importlib.util
import os
import re
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention_jax.config import check_experiment_config
from attention_jax.sharding import initialize_distributed, make_mesh
from attention_jax.train_loop import model_config, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "ml_collections config file.", lock_config=True)
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
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
    """absl's parsing (app.run's flags_parser), with what config_flags lets through as a
    traceback (a missing or broken config file, an override of a field the file does not
    define) reported like an unknown flag: one line, exit code 1."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.keys()  # a file that failed to load raises only when first read
        return rest
    except flags.Error as e:
        message = str(e)
        if "--config=None" in message and _config_path(argv)[0]:  # get_config() returned None
            message = _config_error(argv, e)
    except Exception as e:  # the config file's own code may raise anything
        message = _config_error(argv, e)
    sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help.")


def _config_path(argv) -> list[str]:
    """[path] or [path, argument] of the last --config=PATH[:ARG] or --config PATH[:ARG]."""
    value = ""
    for i, arg in enumerate(argv):
        if re.match(r"--?config(=|$)", arg):
            value = arg.partition("=")[2] if "=" in arg else "".join(argv[i + 1 : i + 2])
    return value.split(":", 1)  # config_flags passes ARG to get_config


def _config_error(argv, error) -> str:
    """What went wrong with --config, found again from the file (this is the error path)."""
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    try:  # checked before the workdir is created or anything is trained
        model_config(FLAGS.config)
        check_experiment_config(FLAGS.config)
    except ValueError as e:
        sys.exit(f"train.py: error: {e}")
    if FLAGS.distributed or FLAGS.coordinator_address:
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    try:
        make_mesh(**FLAGS.config.mesh)  # needs the devices: after joining a multi-host run
    except ValueError as e:
        sys.exit(f"train.py: error: config.mesh: {e}")
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
