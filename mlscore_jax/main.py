"""Command line: flags only.

    python -m mlscore_jax.main --config configs/vp/cifar10_ddpmpp_continuous.py \\
        --workdir runs/cifar10_vp --mode train [--config.training.batch_size=256 ...]

Modes: `train` (the score model), `train_deq` (then the Flow++ dequantizer against it, in
WORKDIR/dequantizer), `eval` (bits/dim with `--config.eval.dequantization=uniform|variational|
truncated_normal`, samples).

Multi-host: pass --coordinator_address, --num_processes and --process_id (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; on TPU pods and SLURM nothing is
needed). Every process runs the same command.

Everything is logged to WORKDIR/log.txt; the console shows this package's messages. A mistake of
the user (a bad config key, a missing checkpoint, data that is not prepared) ends the program
with one line saying what is wrong, exit status 2; `--verbose` shows the traceback (the log file
always has it).
"""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from mlscore_jax import experiment, logs, parallel

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results (stable).")
flags.DEFINE_enum(
    "mode",
    "train",
    ["train", "train_deq", "eval"],
    "train: the score model; train_deq: the variational dequantizer against the trained score "
    "model (in WORKDIR/dequantizer); eval: bits/dim and samples.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-host).")
flags.DEFINE_bool("progress", True, "Show progress bars on process 0.")
flags.DEFINE_bool("verbose", False, "Show tracebacks and every log record's origin.")
flags.mark_flags_as_required(["config", "workdir"])

logger = logging.getLogger("mlscore_jax.main")


def run(config_file: str) -> None:
    parallel.initialize_distributed(
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    logger.info(
        "process %d/%d, %d local / %d global devices: %s",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices(),
    )
    exp = experiment.from_config(FLAGS.config, source=config_file)
    if FLAGS.mode == "train":
        from mlscore_jax import train

        train.train_and_evaluate(exp, FLAGS.workdir, progress=FLAGS.progress)
    elif FLAGS.mode == "train_deq":
        from mlscore_jax import train_deq

        train_deq.train_dequantizer(exp, FLAGS.workdir, progress=FLAGS.progress)
    else:
        from mlscore_jax import evaluate

        evaluate.evaluate(exp, FLAGS.workdir, progress=FLAGS.progress)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    log_file = os.path.join(FLAGS.workdir, "log.txt")
    logs.setup(log_file, verbose=FLAGS.verbose)
    config_file = config_flags.get_config_filename(FLAGS["config"])
    logger.info("command: %s", " ".join(sys.argv))
    with logs.user_errors(log_file, verbose=FLAGS.verbose):
        run(config_file)


if __name__ == "__main__":
    app.run(main)
