"""The second training stage: the Flow++ dequantizer q_phi(u | x) against the frozen score model.

`train_dequantizer(exp, workdir)` (`--mode train_deq`) reads the score model's EMA parameters
from `workdir` (the checkpoint `eval.ckpt_step`, default the newest) and trains the dequantizer
`exp.dequantizer` in `workdir/dequantizer/` with the same loop as the score model
(`train.run_loop`): the same checkpoints, resumable bit for bit, pre-emption safe, a non-finite
loss stops it. The dequantizer's parameters are initialised from the first training batch
(data-dependent initialisation, `models.flowpp.init_dequantizer`).

The objective per image k (`../shared/reference/flowpp_dequantizer.md` section 8), in nats:

    L(phi) = B_theta(x) + log q_phi(u | k),   u = flow_phi(eta; k), eta ~ N(0, I),
             x = 2 (k + u) / L - 1,

with B_theta the one-sample bound of `bound.nll_bound` (`num_t = 1`): the prior term, one
importance-sampled time draw of the score-matching integrand and one draw of the [0, eps]
offset (`deq.offset`). Its expectation upper-bounds -log P(k) up to the constant of
`bpd.bpd_offset`, so the loss in bits/dim (`bpd` in the log) is directly comparable with the
evaluation's numbers. Gradients reach phi through x: the score network is differentiated with
respect to its input, its parameters stay fixed (they enter as an argument and are not
trained). Differences from the official loss, none of which changes its expectation's gradient:
the prior term in closed form instead of one sample, the drift divergence with its
importance weight (the official one is biased by a constant; flowpp_dequantizer.md section 8),
and the offset with a zero-mean control variate (`bound.py`).

Adam with warm-up and clipping (`optim.*`), EMA `deq.ema_rate`, `deq.n_iters` steps; batch size
and frequencies from `training.*`; flips follow `data.random_flip` as in the official code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from mlscore_jax import bound, checkpoint, dequantizers, experiment, models, parallel, train
from mlscore_jax.models import flowpp

Array = jax.Array
logger = logging.getLogger(__name__)

SUBDIR = "dequantizer"
META_FILE = "dequantizer.json"


def dequantizer_dir(workdir: str) -> str:
    """Where the dequantizer of the score model in `workdir` is trained and stored."""
    return os.path.join(workdir, SUBDIR)


def description(exp: experiment.Experiment) -> dict[str, Any]:
    """What a dequantizer checkpoint is for: network, data set, image shape, levels."""
    module = exp.dequantizer
    fields = {
        f: getattr(module, f) for f in module.__dataclass_fields__ if f not in ("parent", "name")
    }
    return {
        "network": type(module).__name__,
        "fields": fields,
        "dataset": exp.dataset.name,
        "example_shape": list(exp.example_shape),
        "levels": exp.dataset.levels,
    }


def _differences(exp: experiment.Experiment, directory: str) -> list[str]:
    """How the dequantizer stored in `directory` differs from the one `exp` asks for."""
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    want = json.loads(json.dumps(description(exp)))
    diff = [
        f"{key}: checkpoint {saved.get(key)!r}, config {want[key]!r}"
        for key in ("dataset", "example_shape", "levels", "network")
        if saved.get(key) != want[key]
    ]
    diff += [
        f"deq.{k}: checkpoint {saved['fields'].get(k)!r}, config {v!r}"
        for k, v in want["fields"].items()
        if saved.get("fields", {}).get(k) != v
    ]
    return diff


def _mismatch(directory: str, diff: list[str]) -> str:
    return (
        f"{directory} holds a dequantizer for another data set or network ("
        + "; ".join(diff)
        + "); use the config it was trained with, or another workdir"
    )


def _require_dequantizer(exp: experiment.Experiment) -> flowpp.FlowppDequantizer:
    if exp.dequantizer is None:
        raise experiment.ConfigError(
            f"{exp.source}: no dequantizer to train: the config has no `deq` section or the "
            "data are continuous"
        )
    return exp.dequantizer


def dequantizer_loss(
    exp: experiment.Experiment,
) -> train.LossFn:
    """L(phi) per image (module docstring), in nats: (deq params, score params, k, key) -> [B]."""
    module = _require_dequantizer(exp)
    score = models.ScoreModel(exp.model, exp.sde)
    pre = exp.preprocessing
    deq = dequantizers.Variational(module, pre)

    def loss(params: Any, score_params: Any, batch: Array, key: Array, train_mode: bool) -> Array:
        k_flip, k_deq, k_bound = jax.random.split(key, 3)
        if pre.random_flip and train_mode:
            flip = jax.random.bernoulli(k_flip, 0.5, batch.shape[:1])[:, None, None, None]
            batch = jnp.where(flip, jnp.flip(batch, axis=-2), batch)
        x, log_q = deq(params, k_deq, batch)
        b = bound.nll_bound(
            score.bind(score_params),
            exp.sde,
            x,
            k_bound,
            eps=exp.eval.bpd.eps,
            num_t=1,
            offset=exp.deq.offset,
            num_offset=1,
        )
        return b.nll + log_q

    return loss


def init_fn(exp: experiment.Experiment):
    """(key, first integer batch) -> fresh TrainState of the dequantizer (data-dependent init)."""
    module = _require_dequantizer(exp)
    tx, _ = train.make_optimizer(exp.optim)

    def init(key: Array, batch: Array) -> train.TrainState:
        init_key, train_key = jax.random.split(key)
        params = flowpp.init_dequantizer(module, init_key, batch)["params"]
        return train.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            ema_params=params,
            key=train_key,
        )

    return init


def train_dequantizer(
    exp: experiment.Experiment, workdir: str, *, progress: bool = True
) -> train.TrainState:
    """Train the dequantizer of the score model in `workdir` (module docstring).

    Raises:
      FileNotFoundError: no score-model checkpoint in workdir (train it first).
      checkpoint.CheckpointError: workdir/dequantizer holds a dequantizer of another network,
        size or data set.
    """
    _require_dequantizer(exp)
    mesh = parallel.make_mesh()
    score_params, score_step = train.restore_params(exp, workdir, mesh)
    directory = dequantizer_dir(workdir)
    diff = _differences(exp, directory)
    if diff:
        raise checkpoint.CheckpointError(_mismatch(directory, diff))
    os.makedirs(directory, exist_ok=True)
    if jax.process_index() == 0:
        meta = {**description(exp), "score_step": score_step, "config": exp.source}
        with open(os.path.join(directory, META_FILE + ".tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(directory, META_FILE + ".tmp"), os.path.join(directory, META_FILE))
    num_dims = math.prod(exp.example_shape)
    settings = dataclasses.replace(exp.train, n_iters=exp.deq.n_iters, ema_rate=exp.deq.ema_rate)
    num_params = models.param_count(abstract_params(exp, mesh))
    loop = train.Loop(
        name="dequantizer",
        train=settings,
        optim=exp.optim,
        dataset=exp.dataset,
        init=init_fn(exp),
        loss=dequantizer_loss(exp),
        to_bpd=lambda nats: float(exp.preprocessing.nats_to_bpd(jnp.asarray(nats), num_dims)),
        describe=(
            f"score_step={score_step} network={type(exp.dequantizer).__name__} "
            f"params={num_params} data={exp.dataset!r} config={exp.source}"
        ),
    )
    return train.run_loop(loop, directory, frozen=score_params, progress=progress)


def abstract_params(exp: experiment.Experiment, mesh: jax.sharding.Mesh) -> Any:
    """The dequantizer's parameters as replicated `jax.ShapeDtypeStruct`s (a restore target)."""
    module = _require_dequantizer(exp)
    batch = jax.ShapeDtypeStruct((2, *exp.example_shape), exp.dataset.train.dtype)
    abstract = jax.eval_shape(
        lambda k, b: flowpp.init_dequantizer(module, k, b)["params"], jax.random.key(0), batch
    )
    replicated = parallel.replicated(mesh)
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )


def restore_dequantizer(
    exp: experiment.Experiment,
    workdir: str,
    mesh: jax.sharding.Mesh,
    *,
    step: int | None = None,
) -> tuple[Any, int]:
    """(EMA parameters, step) of the dequantizer trained in workdir/dequantizer.

    Raises:
      FileNotFoundError: nothing trained there, with the command that trains it.
      checkpoint.StateMismatchError: a parameter of another shape (naming its path and both
        shapes), e.g. a dequantizer of other sizes or another data set.
    """
    _require_dequantizer(exp)
    step = exp.eval.deq_ckpt_step if step is None else step
    directory = dequantizer_dir(workdir)
    diff = _differences(exp, directory)
    target = {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh)),
        "ema_params": abstract_params(exp, mesh),
    }
    how = (
        f"train one first: python -m mlscore_jax.main --config {exp.source} --workdir {workdir} "
        "--mode train_deq (or make train-deq CONFIG=... WORKDIR=...)"
    )
    ckpt = checkpoint.Checkpointer(directory, read_only=True)
    try:
        try:
            params, found = _restore_ema(ckpt, target, step, how)
        except checkpoint.StateMismatchError as e:  # names the parameter path and both shapes
            raise checkpoint.StateMismatchError(
                f"{e}" + (f"; {_mismatch(directory, diff)}" if diff else "")
            ) from e
    finally:
        ckpt.close()
    if diff:  # same shapes, other settings (e.g. deq.heads)
        raise checkpoint.CheckpointError(_mismatch(directory, diff))
    return params, found


def _restore_ema(
    ckpt: checkpoint.Checkpointer, target: dict, step: int, how: str
) -> tuple[Any, int]:
    hint = f"eval.dequantization='variational' needs a trained dequantizer; {how}"
    restored = ckpt.restore_step(step, target, fields=True, what="dequantizer ", hint=hint)
    return restored[0]["ema_params"], restored[1]
