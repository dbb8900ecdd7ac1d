"""A residual MLP on flattened 8x8 digits: the fastest image configuration on a CPU.

make train CONFIG=configs/cpu/digits_mlp.py WORKDIR=runs/digits_mlp
"""

import ml_collections

from configs.cpu import digits_ddpmpp


def get_config() -> ml_collections.ConfigDict:
    config = digits_ddpmpp.get_config()
    config.model.name = "mlp"
    config.model.width = 512
    config.model.num_blocks = 4
    config.model.embedding_dim = 64
    return config
