"""Command line: flags only.

    python -m mlscore_jax.main --config configs/vp/cifar10_ddpmpp_continuous.py \\
        --workdir runs/cifar10_vp --mode train [--config.training.batch_size=256 ...]

Multi-host: pass --coordinator_address, --num_processes and --process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; on TPU pods and SLURM nothing is
needed). Every process runs the same command.
"""

from __future__ import annotations

import logging

import jax
from absl import app, flags
from ml_collections import config_flags

from mlscore_jax import parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (stable).")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to run.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host).")
flags.DEFINE_bool("progress", True, "Show a progress bar on process 0.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    parallel.initialize_distributed(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    logging.info(
        "process %d/%d, %d local / %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    if FLAGS.mode == "train":
        from mlscore_jax import train

        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    else:
        from mlscore_jax import evaluate

        evaluate.evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
