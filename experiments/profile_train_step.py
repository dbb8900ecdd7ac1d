"""Where one training step's time goes on XLA:CPU: a JAX profiler trace, grouped by XLA op kind.

    .venv/bin/python experiments/profile_train_step.py [--steps 3] [--top 25]

The network of the speed issue (`configs/vp/cifar10_ddpmpp_continuous.py` at nf 32, ch_mult
(1, 2, 2), 2 residual blocks, attention at 16x16, dropout 0.1; batch 32 of random uint8 images;
the paper's loss, Adam, EMA): one jitted `train.train_step`, timed alone, then traced for
`--steps` steps with `jax.profiler`. The trace's thunk events are summed per op kind (the
fusion's name without its number, e.g. `multiply_reduce_fusion`) over all threads, in ms of
thread time per step, with how many such ops a step runs.

Reading it: convolutions run as Eigen tasks that the trace does not name (the
`conv_general_dilated` events are their dispatch only), so the named kinds are the rest of the
step: the fusions (GroupNorm statistics and their gradients, bias gradients, transposes) and the
dots. Thread time beyond the named events is mostly convolution work. Needs TensorFlow's
`xplane_pb2` (tensorflow-cpu is a dependency) to read the trace.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs.vp.cifar10_ddpmpp_continuous as cifar10  # noqa: E402
from mlscore_jax import datasets, experiment, train  # noqa: E402


def build_step():
    cfg = cifar10.get_config()
    cfg.model.nf, cfg.model.ch_mult, cfg.model.num_res_blocks = 32, (1, 2, 2), 2
    cfg.training.batch_size = 32
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    exp = experiment.from_config(
        cfg, source="profile", dataset=datasets.Dataset("cifar10", x, x, levels=256)
    )
    tx, schedule = train.make_optimizer(exp.optim)
    state = train.init_state(exp, tx, jax.random.key(0))
    loss = train.score_loss(exp)
    step = jax.jit(
        lambda s, b: train.train_step(
            s, b, None, loss_fn=loss, tx=tx, schedule=schedule, ema_rate=exp.train.ema_rate
        )
    )
    return step, state, x[:32]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    step, state, batch = build_step()
    jax.block_until_ready(step(state, batch))
    times = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(step(state, batch))
        times.append(time.perf_counter() - t)
    wall = float(np.median(times))
    print(f"one step: {wall * 1e3:.0f} ms (median of 5), {32 / wall:.1f} images/s\n")

    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        for _ in range(args.steps):
            jax.block_until_ready(step(state, batch))
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())

    total: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if "ThunkExecutor" in name:
                    continue
                kind = re.sub(r"\.\d+$", "", name)
                total[kind] += event.duration_ps / 1e9 / args.steps
                count[kind] += 1 / args.steps
    print("| op kind | thread ms per step | ops per step |")
    print("|---|---:|---:|")
    for kind, ms in total.most_common(args.top):
        print(f"| {kind} | {ms:.1f} | {count[kind]:.0f} |")
    print(f"| all named ops | {sum(total.values()):.1f} | {sum(count.values()):.0f} |")
    print(f"\nthread time available: {2 * wall * 1e3:.0f} ms per step on 2 threads")


if __name__ == "__main__":
    main()
