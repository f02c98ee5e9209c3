"""Train a Transformer: thin absl entry point around attention_jax.train_loop.

python experiments/train.py --config=experiments/configs/default.py --workdir=/tmp/aj
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attention_jax.sharding import initialize_distributed
from attention_jax.train_loop import train_and_evaluate

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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    if FLAGS.distributed or FLAGS.coordinator_address:
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
