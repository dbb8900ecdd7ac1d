"""A small DDPM++ on MNIST (28x28, 256 levels) for CPU experiments.

MNIST comes from TFDS (prepared offline, see README "Data"), or from an npz file:

    make train CONFIG=configs/cpu/mnist_ddpmpp.py WORKDIR=runs/mnist_ddpmpp
    make train CONFIG=configs/cpu/mnist_ddpmpp.py WORKDIR=runs/mnist_ddpmpp \\
        ARGS="--config.data.dataset=npz --config.data.train_file=mnist_train.npz --config.data.test_file=mnist_test.npz"

FFJORD reports 0.99 bits/dim on MNIST (a reference point, not a target for this small model).
"""

import ml_collections

from configs import default_cifar10


def get_config() -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    training = config.training
    training.batch_size = 64
    training.n_iters = 20_000
    training.snapshot_freq = 5000
    training.snapshot_freq_for_preemption = 500
    training.log_freq = 100
    training.eval_freq = 500

    data = config.data
    data.dataset = "mnist"
    data.image_size = 28
    data.num_channels = 1
    data.uniform_dequantization = True  # train on the density evaluation measures

    model = config.model
    model.nf = 32
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (7,)
    model.dropout = 0.0
    model.ema_rate = 0.999

    config.optim.lr = 1e-3
    config.optim.warmup = 500
    config.eval.batch_size = 250
    config.eval.num_repeats = 1
    config.seed = 0
    return config
