"""A residual MLP on 2-D toy data (checkerboard by default): NLL in nats, no quantization.

make train CONFIG=configs/cpu/toy2d_mlp.py WORKDIR=runs/toy2d
make train CONFIG=configs/cpu/toy2d_mlp.py WORKDIR=runs/moons ARGS="--config.data.distribution=moons"
"""

import ml_collections

from configs import default_cifar10


def get_config() -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    training = config.training
    training.batch_size = 256
    training.n_iters = 5000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 500
    training.log_freq = 100
    training.eval_freq = 500
    training.smallest_time = 1e-3

    data = config.data
    data.dataset = "toy2d"
    data.distribution = "checkerboard"
    data.centered = False  # the points are already centred around 0

    model = config.model
    model.name = "mlp"
    model.width = 256
    model.num_blocks = 3
    model.embedding_dim = 64
    model.dropout = 0.0
    model.ema_rate = 0.999

    config.optim.lr = 1e-3
    config.optim.warmup = 100
    evaluate = config.eval
    evaluate.batch_size = 500
    evaluate.num_repeats = 1
    evaluate.num_t = 200
    config.seed = 0
    return config
