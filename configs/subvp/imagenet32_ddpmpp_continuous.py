"""subVP SDE, DDPM++ cont., ImageNet 32x32.

Official counterpart: `configs/subvp/imagenet32_ddpmpp_continuous.py`

Train (likelihood weighting + importance sampling, the paper's method):

    make train CONFIG=configs/subvp/imagenet32_ddpmpp_continuous.py WORKDIR=runs/imagenet32_subvp

Evaluate bits/dim (probability-flow ODE and bound, uniform dequantization):

    make eval CONFIG=configs/subvp/imagenet32_ddpmpp_continuous.py WORKDIR=runs/imagenet32_subvp

Baseline row (score SDE weighting lambda = sigma^2): add
`--config.training.likelihood_weighting=False --config.training.importance_weighting=False`.

Numbers to reach: the paper's best ImageNet 32x32 models give 3.76 bits/dim by the ODE and
3.86 by the bound (likelihood weighting + importance sampling + variational dequantization).
Per-row numbers are in the paper's Table 2.
"""

import ml_collections

from configs import default_imagenet32


def get_config() -> ml_collections.ConfigDict:
    config = default_imagenet32.get_default_configs()
    config.training.sde = "subvpsde"
    config.training.smallest_time = 1e-2
    config.sampling.smallest_time = 1e-2
    return config
