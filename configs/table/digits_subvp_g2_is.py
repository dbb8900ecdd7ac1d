"""Paper table, digits: subVP SDE, lambda = g^2, t ~ p(t) ~ g^2 / sigma^2 (the paper's objective).

One row of `experiments/paper_table.py --dataset digits` (`configs/table/rows.py`); alone:

    make train CONFIG=configs/table/digits_subvp_g2_is.py WORKDIR=runs/table_digits/subvp_g2_is/seed0
"""

import ml_collections

from configs.table import rows


def get_config() -> ml_collections.ConfigDict:
    return rows.config("digits", "subvp_g2_is")
