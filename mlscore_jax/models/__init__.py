"""Noise-predicting score networks (Flax linen) and the score-function contract.

Every network here is a linen module called as

    model.apply(variables, x, t, train=bool, rngs={'dropout': key})  ->  eps_hat, shaped like x

with x [B, ...] in model space and t [B] continuous time in [0, 1]. The score follows from the
marginal std of the SDE (official `models/utils.py::get_score_fn`, continuous VP/subVP case):

    s_theta(x, t) = -eps_hat(x, t) / sigma(t).

`get_score_fn` returns exactly that `score_fn(x, t)`, the contract of `losses.dsm_loss`, the bound
and the ODE likelihood; `get_noise_fn` returns eps_hat itself (losses can use it directly).

Models are chosen by name from the explicit `MODELS` mapping; constructors take plain keyword
arguments (ints, floats, tuples), never a ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlscore_jax.models.ddpmpp import DDPMpp
from mlscore_jax.models.mlp import MLP
from mlscore_jax.sde import SDE, broadcast_to_data

Array = jax.Array
Variables = Mapping[str, Any]
NoiseFn = Callable[[Array, Array], Array]
ScoreFn = Callable[[Array, Array], Array]

MODELS: dict[str, type[nn.Module]] = {"ddpmpp": DDPMpp, "mlp": MLP}

__all__ = [
    "DDPMpp",
    "MLP",
    "MODELS",
    "get_model",
    "get_noise_fn",
    "get_score_fn",
    "ScoreModel",
    "score_fn_from_noise_fn",
    "init_variables",
    "abstract_variables",
    "param_count",
    "param_table",
]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the network called `name` (a key of MODELS) with keyword arguments `kwargs`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def init_variables(model: nn.Module, key: Array, input_shape: tuple[int, ...]) -> Variables:
    """Initial variables ({'params': ...}) for inputs of shape input_shape = (B, ...).

    Runs eagerly (wrap it in jax.jit, with out_shardings, to create sharded parameters).
    """
    x = jnp.zeros(input_shape, jnp.float32)
    t = jnp.ones(input_shape[:1], jnp.float32)
    return model.init({"params": key}, x, t, train=False)


def abstract_variables(model: nn.Module, input_shape: tuple[int, ...]) -> Variables:
    """Shapes and dtypes of the variables (jax.ShapeDtypeStruct leaves), without allocating."""
    return jax.eval_shape(lambda k: init_variables(model, k, input_shape), jax.random.key(0))


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def param_table(params: Any) -> str:
    """One line per parameter, `path shape`, sorted by path with numbers in numeric order.

    The last line is `total <number of scalars>`.
    """
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        rows.append(("/".join(str(getattr(k, "key", k)) for k in path), tuple(leaf.shape)))
    rows.sort(key=lambda row: _natural_key(row[0]))
    lines = [f"{name} {shape}" for name, shape in rows]
    lines.append(f"total {param_count(params)}")
    return "\n".join(lines) + "\n"


def _natural_key(path: str) -> list[tuple[str, int]]:
    """Sort key that puts Block_2 before Block_10."""
    return [(a, int(b) if b else -1) for a, b in re.findall(r"(\D*)(\d*)", path)]


def get_noise_fn(
    model: nn.Module,
    variables: Variables,
    *,
    train: bool = False,
    rng: Array | None = None,
) -> NoiseFn:
    """eps_hat(x [B, ...], t [B]) -> [B, ...] for fixed variables.

    With train=True and dropout > 0, `rng` is the dropout key (the same mask for every call of
    the returned function).
    """
    rngs = None if rng is None else {"dropout": rng}

    def noise_fn(x: Array, t: Array) -> Array:
        return model.apply(variables, x, t, train=train, rngs=rngs)

    return noise_fn


def score_fn_from_noise_fn(noise_fn: NoiseFn, sde: SDE) -> ScoreFn:
    """s(x, t) = -eps_hat(x, t) / sigma(t) with sigma the marginal std of `sde`; t is [B]."""

    def score_fn(x: Array, t: Array) -> Array:
        _, sigma = sde.marginal(jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1]))
        return -noise_fn(x, t) / broadcast_to_data(sigma, x)

    return score_fn


def get_score_fn(
    model: nn.Module,
    variables: Variables,
    sde: SDE,
    *,
    train: bool = False,
    rng: Array | None = None,
) -> ScoreFn:
    """score_fn(x [B, ...], t [B]) -> [B, ...] = -eps_hat(x, t) / sigma(t) for a noise network."""
    return score_fn_from_noise_fn(get_noise_fn(model, variables, train=train, rng=rng), sde)


@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """score(params, x [B, ...], t [B]) -> [B, ...] of a noise network: parameters as an argument.

    The parameters enter a jitted function as an argument, not as constants baked into the
    program, so one compiled program serves every checkpoint of a model. Instances compare (and
    hash) equal for equal (model, sde), so code that caches compiled functions by their score
    model (`evaluate`) reuses them across checkpoints.
    """

    model: nn.Module
    sde: SDE

    def __call__(self, params: Any, x: Array, t: Array) -> Array:
        return get_score_fn(self.model, {"params": params}, self.sde)(x, t)

    def bind(self, params: Any) -> ScoreFn:
        """score_fn(x, t) for fixed parameters."""
        return lambda x, t: self(params, x, t)
