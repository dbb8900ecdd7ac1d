"""Paper table, digits: VP SDE, lambda = sigma^2, t ~ U[eps, 1] (the score SDE objective).

One row of `experiments/paper_table.py --dataset digits` (`configs/table/rows.py`); alone:

    make train CONFIG=configs/table/digits_vp_sigma2.py WORKDIR=runs/table_digits/vp_sigma2/seed0
"""

import ml_collections

from configs.table import rows


def get_config() -> ml_collections.ConfigDict:
    return rows.config("digits", "vp_sigma2")
