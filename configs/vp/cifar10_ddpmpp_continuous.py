"""VP SDE, DDPM++ cont., CIFAR-10: official `configs/vp/cifar10_ddpmpp_continuous.py`.

Train (likelihood weighting + importance sampling, the paper's method):

    make train CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_vp

Evaluate bits/dim (probability-flow ODE and bound, uniform dequantization):

    make eval CONFIG=configs/vp/cifar10_ddpmpp_continuous.py WORKDIR=runs/cifar10_vp

Baseline row (score SDE weighting lambda = sigma^2): add
`--config.training.likelihood_weighting=False --config.training.importance_weighting=False`.

Numbers to reach: the paper's best CIFAR-10 models give 2.83 bits/dim by the ODE (likelihood
weighting + importance sampling + variational dequantization, no augmentation; 2.90 by the
bound with flips). The score SDE paper reports 3.16 bits/dim (ODE, uniform dequantization)
for this network trained with the baseline weighting. Per-row numbers of the paper's method
are in its Table 2.

Released checkpoints (README "Released checkpoints"; file names inferred from the official
configs). The paper's model, score_flow folder `cifar10_vp_likelihood_iw[_flip]`:

    make reproduce-scoreflow-vp-cifar10 SCORE=.../cifar10_vp_likelihood_iw/checkpoints/checkpoint_26 \
        DEQ=.../cifar10_vp_likelihood_iw/flowpp_dequantizer/checkpoints/checkpoint_6

which is

    python -m mlscore_jax.convert --config configs/vp/cifar10_ddpmpp_continuous.py --workdir runs/released/scoreflow_vp_cifar10 \
        --score .../checkpoints/checkpoint_26 --dequantizer .../flowpp_dequantizer/checkpoints/checkpoint_6
    python -m mlscore_jax.main --config configs/vp/cifar10_ddpmpp_continuous.py --workdir runs/released/scoreflow_vp_cifar10 \
        --mode eval --config.eval.num_repeats=5 --config.eval.dequantization=variational

(and once more with `dequantization=uniform`). Expect the paper's Table 2 value of this row; the
best cifar10 row gives 2.83 (ODE, variational; 2.80 with flips, bound 2.90 with flips). Estimated cost: `experiments/reproduction_cost.py`.
The score SDE baseline (lambda = sigma^2), score_sde `vp/cifar10_ddpmpp_continuous` (the larger
checkpoint number, or score_sde_pytorch's `.pth`): `make reproduce-scoresde-vp-cifar10 SCORE=...`, ODE
with uniform dequantization, 5 repeats; expect 3.16 bits/dim.
"""

import ml_collections

from configs import default_cifar10


def get_config() -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    config.training.sde = "vpsde"
    config.training.smallest_time = 1e-5
    config.sampling.smallest_time = 1e-3
    return config
