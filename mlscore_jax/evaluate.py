"""Bits/dim of a trained model over a whole split, by the probability-flow ODE and by the bound.

`evaluate(config, workdir)` restores a checkpoint (the newest, or `eval.ckpt_step`), takes the EMA
parameters (`eval.use_ema`), and for `eval.num_repeats` repeats of the whole split
(`eval.bpd_dataset`: 'test' or 'train') computes per image

* the ODE NLL (`likelihood.ode_nll`, `eval.ode`) and its NFE,
* the variational bound (`bound.nll_bound`, `eval.bound`) with its Monte-Carlo standard error,

on uniformly dequantized images (fresh dequantization noise, probes and time draws per repeat),
converted to bits/dim by `bpd.nats_to_bpd` (continuous data: nats). Every image counts exactly
once per repeat (padded batches with a mask). Each (repeat, batch) result is written to its own
file as soon as it is computed, so a killed evaluation resumes where it stopped and gives the
same final numbers. At the end it writes `per_image.npz`, `metrics.json` and a line of
`workdir/results.md`.

Two standard errors are reported for each mean:
* `mc_stderr`: the Monte-Carlo error of the reported number for this fixed set of images (the
  spread of the R repeat means / sqrt(R)); it shrinks as 1 / sqrt(R);
* `stderr_images`: the spread of the per-image values / sqrt(N), the uncertainty of the mean as
  an estimate over the data distribution; more repeats do not shrink it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlscore_jax import (
    bound,
    bpd,
    checkpoint,
    data,
    experiment,
    likelihood,
    models,
    parallel,
    sampling,
    train,
)
from mlscore_jax.sde import SDE

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What an evaluation computes; results are only ever combined for equal settings."""

    split: str = "test"
    batch_size: int = 1024
    num_repeats: int = 1
    ode: bool = True
    bound: bool = True
    eps: float = 1e-5
    rtol: float = 1e-5
    atol: float = 1e-5
    solver: str = "dopri5"
    divergence: str = "rademacher"
    max_steps: int = 4096
    num_t: int = 1000
    draws_per_call: int = 1
    offset: bool = True
    estimator: str = "dsm"
    seed: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> EvalSettings:
        e = config.eval
        return cls(
            split=e.bpd_dataset,
            batch_size=e.batch_size,
            num_repeats=e.num_repeats,
            ode=e.ode,
            bound=e.bound,
            eps=float(config.training.smallest_time),
            rtol=e.rtol,
            atol=e.atol,
            solver=e.solver,
            divergence=e.divergence,
            max_steps=e.max_steps,
            num_t=e.num_t,
            draws_per_call=e.draws_per_call,
            offset=e.offset,
            estimator="dsm" if e.dsm else "ssm",
            seed=config.seed,
        )

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def _batch_fn(
    score_fn: ScoreFn,
    sde: SDE,
    preprocessing: experiment.Preprocessing,
    num_dims: int,
    settings: EvalSettings,
) -> Callable[[Array, Array], dict[str, Array]]:
    """(integer or float batch [B, ...], key) -> per-image results, all [B]."""
    levels = preprocessing.levels
    to_units = (
        (lambda nll: nll)
        if levels is None
        else (
            lambda nll: bpd.nats_to_bpd(
                nll, num_dims, levels=levels, centered=preprocessing.centered
            )
        )
    )
    dequantize = dataclasses.replace(
        preprocessing, uniform_dequantization=levels is not None, random_flip=False
    )

    def fn(batch: Array, key: Array) -> dict[str, Array]:
        k_deq, k_ode, k_bound = jax.random.split(key, 3)
        x = dequantize(k_deq, batch)
        out = {}
        if settings.ode:
            r = likelihood.ode_nll(
                score_fn,
                sde,
                x,
                k_ode,
                eps=settings.eps,
                rtol=settings.rtol,
                atol=settings.atol,
                divergence=settings.divergence,
                solver=settings.solver,
                max_steps=settings.max_steps,
            )
            out["ode"] = to_units(r.nll)
            out["ode_nfe"] = r.nfe
        if settings.bound:
            b = bound.nll_bound(
                score_fn,
                sde,
                x,
                k_bound,
                eps=settings.eps,
                num_t=settings.num_t,
                offset=settings.offset,
                estimator=settings.estimator,
                draws_per_call=settings.draws_per_call,
            )
            out["bound"] = to_units(b.nll)
            scale = 1.0 if levels is None else 1.0 / (num_dims * math.log(2.0))
            out["bound_stderr"] = b.stderr * scale
        return out

    return fn


def evaluate_split(
    score_fn: ScoreFn,
    sde: SDE,
    preprocessing: experiment.Preprocessing,
    images: np.ndarray,
    settings: EvalSettings,
    out_dir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate every image of `images` `settings.num_repeats` times; resumable through out_dir.

    Args:
      score_fn: s(x [B, ...], t [B]) -> [B, ...] of the model to evaluate.
      sde: its forward SDE.
      preprocessing: how the stored images become model inputs (dequantization is forced on
        for quantized data, flips off).
      images: [N, ...] the split, integer images or float points.
      settings: what to compute.
      out_dir: directory for per-batch results (created; reused to resume).
      mesh: device mesh (default: every device); batches are sharded over it.
      info: entries to record with the metrics (e.g. the checkpoint step).

    Returns:
      The metrics dictionary (also written to out_dir/metrics.json).
    """
    if settings.num_repeats < 1:
        raise ValueError("eval.num_repeats must be >= 1")
    if not (settings.ode or settings.bound):
        raise ValueError("nothing to evaluate: eval.ode and eval.bound are both False")
    mesh = mesh if mesh is not None else parallel.make_mesh()
    parallel.per_process_batch_size(settings.batch_size, mesh)  # divisibility check
    os.makedirs(out_dir, exist_ok=True)
    settings_path = os.path.join(out_dir, "settings.json")
    if jax.process_index() == 0 and not os.path.exists(settings_path):
        with open(settings_path, "w") as f:
            json.dump(dataclasses.asdict(settings), f, indent=1)

    num = images.shape[0]
    num_dims = math.prod(images.shape[1:])
    fn = jax.jit(
        _batch_fn(score_fn, sde, preprocessing, num_dims, settings),
        in_shardings=(parallel.data_sharding(mesh), parallel.replicated(mesh)),
        out_shardings=parallel.replicated(mesh),
    )
    base = jax.random.key(settings.seed)
    num_batches = data.num_eval_batches(num, settings.batch_size)
    for r in range(settings.num_repeats):
        batches = data.eval_batches(
            images,
            settings.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        for b, (batch, _) in enumerate(batches):
            path = os.path.join(out_dir, f"repeat{r:03d}_batch{b:05d}.npz")
            if os.path.exists(path):
                continue  # computed before an interruption
            key = jax.random.fold_in(jax.random.fold_in(base, r), b)
            out = jax.device_get(fn(parallel.shard_batch(batch, mesh), key))
            if jax.process_index() == 0:
                tmp = path + ".tmp.npz"
                np.savez(tmp, **out)
                os.replace(tmp, path)  # atomic: a killed write leaves no partial result
            logger.info("repeat %d/%d batch %d/%d", r + 1, settings.num_repeats, b + 1, num_batches)

    return _summarize(
        out_dir, settings, num, num_batches, levels=preprocessing.levels, info=info or {}
    )


def _gather(out_dir: str, settings: EvalSettings, num: int, num_batches: int) -> dict:
    """Per-image arrays [R, N] from the per-batch files (padding dropped)."""
    per = {}
    for r in range(settings.num_repeats):
        rows: dict[str, list] = {}
        for b in range(num_batches):
            with np.load(os.path.join(out_dir, f"repeat{r:03d}_batch{b:05d}.npz")) as f:
                for k in f.files:
                    rows.setdefault(k, []).append(f[k])
        for k, v in rows.items():
            per.setdefault(k, []).append(np.concatenate(v)[:num])
    return {k: np.stack(v) for k, v in per.items()}


def _summarize(
    out_dir: str,
    settings: EvalSettings,
    num: int,
    num_batches: int,
    *,
    levels: int | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    per = _gather(out_dir, settings, num, num_batches)
    unit = "nats" if levels is None else "bits/dim"
    metrics: dict[str, Any] = {
        **info,
        "unit": unit,
        "split": settings.split,
        "num_images": num,
        "num_repeats": settings.num_repeats,
        "settings": dataclasses.asdict(settings),
    }
    for name in ("ode", "bound"):
        if name not in per:
            continue
        values = per[name].astype(np.float64)  # [R, N]
        repeat_means = values.mean(axis=1)
        image_means = values.mean(axis=0)
        entry = {
            "mean": float(values.mean()),
            "stderr_images": float(image_means.std(ddof=1) / math.sqrt(num)) if num > 1 else None,
            "mc_stderr": (
                float(repeat_means.std(ddof=1) / math.sqrt(settings.num_repeats))
                if settings.num_repeats > 1
                else None
            ),
            "repeat_means": repeat_means.tolist(),
        }
        if name == "bound":
            # the bound's own Monte-Carlo error, from its time draws: valid even for R = 1
            # (the mean over R x N independent estimates: sum of their variances / (R N)^2)
            var = (per["bound_stderr"].astype(np.float64) ** 2).sum()
            entry["mc_stderr_from_draws"] = float(math.sqrt(var) / (num * settings.num_repeats))
        if name == "ode":
            nfe = per["ode_nfe"]
            entry["nfe"] = {"mean": float(nfe.mean()), "min": int(nfe.min()), "max": int(nfe.max())}
        metrics[name] = entry
    if jax.process_index() == 0:
        np.savez(os.path.join(out_dir, "per_image.npz"), **per)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
    return metrics


def format_metric(entry: dict | None) -> str:
    """'3.1234 +- 0.0012' (Monte-Carlo error when known, else the image spread)."""
    if entry is None:
        return "-"
    se = entry.get("mc_stderr") or entry.get("mc_stderr_from_draws") or entry.get("stderr_images")
    return f"{entry['mean']:.4f} +- {se:.4f}" if se is not None else f"{entry['mean']:.4f}"


def restore_for_eval(
    config: ml_collections.ConfigDict, workdir: str, exp: experiment.Experiment, mesh
) -> tuple[Any, int]:
    """(train state, step) of `eval.ckpt_step` (-1: the newest checkpoint of either kind)."""
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        abstract = train.abstract_state(exp, train.optimizer_from_config(config)[0], mesh)
        step = int(config.eval.ckpt_step)
        if step < 0:
            restored = ckpt.restore_latest(abstract)
            if restored is None:
                raise FileNotFoundError(
                    f"no checkpoint in {workdir}: train first (make train CONFIG=... "
                    f"WORKDIR={workdir})"
                )
            return restored
        for kind in ("snapshot", "preemption"):
            if step in ckpt.steps(kind):
                return ckpt.restore(step, abstract, kind=kind), step
        raise FileNotFoundError(
            f"no checkpoint of step {step} in {workdir}; snapshots: {ckpt.snapshot_steps()}, "
            f"pre-emption: {ckpt.steps('preemption')}"
        )
    finally:
        ckpt.close()


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    exp: experiment.Experiment | None = None,
) -> dict[str, Any]:
    """Evaluate the checkpoint of `config` in `workdir`; returns (and writes) the metrics.

    `eval.enable_bpd`: bits/dim by ODE and bound (`evaluate_split`) into
    workdir/eval/<split>_step<step>_<ema|raw>_<settings digest>/; `eval.enable_sampling`:
    `eval.num_samples` samples by `config.sampling` into workdir/eval/samples_step<step>.{npz,png}.
    """
    exp = exp if exp is not None else experiment.from_config(config)
    if not (config.eval.enable_bpd or config.eval.enable_sampling):
        raise ValueError("nothing to do: eval.enable_bpd and eval.enable_sampling are both False")
    mesh = parallel.make_mesh()
    state, step = restore_for_eval(config, workdir, exp, mesh)
    params = state.ema_params if config.eval.use_ema else state.params
    metrics: dict[str, Any] = {"step": step, "ema": bool(config.eval.use_ema)}
    if config.eval.enable_bpd:
        score_fn = models.get_score_fn(exp.model, {"params": params}, exp.sde)
        settings = EvalSettings.from_config(config)
        images = {"test": exp.dataset.test, "train": exp.dataset.train}.get(settings.split)
        if images is None:
            raise ValueError(f"eval.bpd_dataset must be 'test' or 'train', got {settings.split!r}")
        if images.shape[0] == 0:
            raise ValueError(f"the {settings.split} split of {exp.dataset.name} is empty")
        out_dir = os.path.join(
            workdir,
            "eval",
            f"{settings.split}_step{step}_{'ema' if config.eval.use_ema else 'raw'}"
            f"_{settings.digest()}",
        )
        metrics = evaluate_split(
            score_fn,
            exp.sde,
            exp.preprocessing,
            images,
            settings,
            out_dir,
            mesh=mesh,
            info={**metrics, "dir": out_dir},
        )
        if jax.process_index() == 0:
            _append_result(workdir, metrics, exp)
            logger.info("metrics: %s", json.dumps({k: metrics.get(k) for k in ("ode", "bound")}))
    if config.eval.enable_sampling:
        metrics["samples"] = sample_to_files(
            config, exp, params, os.path.join(workdir, "eval", f"samples_step{step}")
        )
    return metrics


def sample_to_files(
    config: ml_collections.ConfigDict, exp: experiment.Experiment, params: Any, prefix: str
) -> dict[str, Any]:
    """`eval.num_samples` samples by `config.sampling`: prefix.npz (model space) and, for
    images, prefix.png (a grid); returns the sampler, its NFE and the file names."""
    shape = (config.eval.num_samples, *exp.example_shape)
    key = jax.random.fold_in(jax.random.key(config.seed), 0x5A3)  # not a training/eval key

    def draw(params: Any, key: Array) -> sampling.SampleResult:
        score_fn = models.get_score_fn(exp.model, {"params": params}, exp.sde)
        return sampling.sample_from_config(score_fn, exp.sde, shape, key, config.sampling)

    start = time.perf_counter()
    result = jax.device_get(jax.jit(draw)(params, key))
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "method": config.sampling.method,
        "num_samples": shape[0],
        "nfe_mean": float(np.mean(result.nfe)),
        "seconds_incl_compile": seconds,
    }
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        np.savez(prefix + ".npz", x=result.x, nfe=result.nfe)
        out["npz"] = prefix + ".npz"
        levels = exp.dataset.levels
        if exp.dataset.is_image and levels is not None:
            images = bpd.to_uint(
                jnp.asarray(result.x), levels=levels, centered=exp.preprocessing.centered
            )
            # Show the levels as intensities 0..255 (digits have 17 levels).
            images = np.asarray(images, np.float64) * (255.0 / (levels - 1))
            sampling.save_image_grid(prefix + ".png", np.round(images).astype(np.uint8))
            out["png"] = prefix + ".png"
        logger.info("samples: %s", out)
    return out


def _append_result(workdir: str, metrics: dict[str, Any], exp: experiment.Experiment) -> None:
    path = os.path.join(workdir, "results.md")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write(
                "| date | data | split | step | images x repeats | unit | ODE | ODE NFE mean "
                "[min-max] | bound |\n|---|---|---|---|---|---|---|---|---|\n"
            )
        ode = metrics.get("ode")
        nfe = ode["nfe"] if ode else None
        f.write(
            f"| {datetime.date.today()} | {exp.dataset.name} | {metrics['split']} | "
            f"{metrics['step']} | {metrics['num_images']} x {metrics['num_repeats']} | "
            f"{metrics['unit']} | {format_metric(ode)} | "
            + (f"{nfe['mean']:.0f} [{nfe['min']}-{nfe['max']}]" if nfe else "-")
            + f" | {format_metric(metrics.get('bound'))} |\n"
        )
