"""Shared defaults of the ImageNet 32x32 configurations (official `default_imagenet32_configs.py`).

The data set is the paper's: TFDS `downsampled_imagenet/32x32` (van den Oord et al. 2016), here
named `imagenet32`. The later `imagenet_resized/32x32` (`imagenet_resized32`) is a different
down-sampling whose NLLs are not comparable. Differences from CIFAR-10: no dropout, one repeat of
the bits/dim evaluation, the validation split for evaluation.
"""

import ml_collections

from configs import default_cifar10


def get_default_configs() -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    config.data.dataset = "imagenet32"
    config.data.random_flip = False
    config.model.dropout = 0.0
    config.eval.bpd_dataset = "test"  # the validation split: imagenet32 has no test split
    config.eval.num_repeats = 1
    config.deq.name = "flowpp_imagenet32"  # 35,482,720 parameters at these sizes
    config.deq.filters = 128
    config.deq.blocks = 8
    return config


def get_config() -> ml_collections.ConfigDict:
    return get_default_configs()
