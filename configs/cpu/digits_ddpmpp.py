"""A small DDPM++ on scikit-learn's 8x8 digits (17 levels): the `make demo` configuration.

Runs offline on 2 CPU cores in a few minutes:

    make train CONFIG=configs/cpu/digits_ddpmpp.py WORKDIR=runs/digits_ddpmpp

VP SDE, likelihood weighting + importance sampling, the same network family as the paper with
fewer channels and levels (8x8 -> 4x4 -> 2x2, attention at 4x4). nf = 16 (317,121 parameters):
sized so that `make demo` (train, then evaluate all 300 test images and draw samples) stays
near 5 minutes on a slow 2-core machine; nf = 32 (1.26 M) trains and evaluates several times
slower.
"""

import ml_collections

from configs import default_cifar10


def get_config() -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    training = config.training
    training.batch_size = 64
    training.n_iters = 3000
    training.snapshot_freq = 1000
    training.snapshot_freq_for_preemption = 250
    training.log_freq = 50
    training.eval_freq = 250
    training.n_jitted_steps = 5

    data = config.data
    data.dataset = "digits"
    data.image_size = 8
    data.num_channels = 1
    # Train on uniformly dequantized pixels, the density that evaluation measures. The official
    # default (False: bin centres) costs little at 256 levels but not at 17: bins 2/17 wide in
    # model space teach the network point masses that the dequantized test data do not have (a
    # 3000-step run of nf = 32 trained on bin centres: test ODE 2.51 bits/dim, bound 6.70).
    data.uniform_dequantization = True

    model = config.model
    model.nf = 16
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (4,)
    model.dropout = 0.0
    model.ema_rate = 0.999

    config.optim.lr = 2e-3
    config.optim.warmup = 200

    evaluate = config.eval
    evaluate.batch_size = 50  # the vmapped ODE solves run until the batch's slowest is done
    evaluate.num_repeats = 2
    evaluate.num_t = 200
    evaluate.num_samples = 64
    # A small Flow++ dequantizer (the CIFAR-10 variant's structure): --mode train_deq
    deq = config.deq
    deq.filters = 32
    deq.components = 8
    deq.blocks = 1
    deq.heads = 2
    deq.context_channels = 16
    deq.n_iters = 1000
    config.seed = 0
    return config
