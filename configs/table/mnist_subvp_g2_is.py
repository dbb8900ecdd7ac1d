"""Paper table, mnist: subVP SDE, lambda = g^2, t ~ p(t) ~ g^2 / sigma^2 (the paper's objective).

One row of `experiments/paper_table.py --dataset mnist` (`configs/table/rows.py`); alone:

    make train CONFIG=configs/table/mnist_subvp_g2_is.py WORKDIR=runs/table_mnist/subvp_g2_is/seed0
"""

import ml_collections

from configs.table import rows


def get_config() -> ml_collections.ConfigDict:
    return rows.config("mnist", "subvp_g2_is")
