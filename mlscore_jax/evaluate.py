"""Bits/dim of a trained model over a whole split, by the probability-flow ODE and by the bound.

`evaluate(exp, workdir)` restores the parameters of a checkpoint (the newest, or
`exp.eval.ckpt_step`): the EMA parameters (`exp.eval.use_ema`) and the step, nothing else, so the
optimizer settings need not match the training run's. For `num_repeats` repeats of the whole split
(`exp.eval.bpd`, a `settings.BpdSettings`) it computes per image

* the ODE NLL (`likelihood.ode_nll`, `eval.ode`) and its NFE,
* the variational bound (`bound.nll_bound`, `eval.bound`) with its Monte-Carlo standard error,

on uniformly dequantized images (fresh dequantization noise, probes and time draws per repeat),
converted to bits/dim by `bpd.nats_to_bpd` (continuous data: nats). Parameters enter the compiled
batch function as an argument, and the compiled function is cached by (score model, SDE,
preprocessing, settings, mesh): evaluating a second checkpoint of the same model compiles nothing.
Every image counts exactly once per repeat (padded batches with a mask). Each (repeat, batch)
result is written to its own file as soon as it is computed, so a killed evaluation resumes where
it stopped and gives the same final numbers. At the end it writes `per_image.npz`, `metrics.json`
and a line of `workdir/results.md`.

Two standard errors are reported for each mean:
* `mc_stderr`: the Monte-Carlo error of the reported number for this fixed set of images (the
  spread of the R repeat means / sqrt(R)); it shrinks as 1 / sqrt(R);
* `stderr_images`: the spread of the per-image values / sqrt(N), the uncertainty of the mean as
  an estimate over the data distribution; more repeats do not shrink it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mlscore_jax import (
    batches,
    bound,
    dequantizers,
    experiment,
    likelihood,
    models,
    outputs,
    parallel,
    sampling,
)
from mlscore_jax.preprocessing import Preprocessing
from mlscore_jax.sde import SDE
from mlscore_jax.settings import BpdSettings, SamplingSettings
from mlscore_jax.train import restore_params

Array = jax.Array
ParamScoreFn = Callable[[Any, Array, Array], Array]  # score(params, x [B, ...], t [B])
logger = logging.getLogger(__name__)


def _batch_fn(
    score_fn: ParamScoreFn,
    sde: SDE,
    preprocessing: Preprocessing,
    dequantizer: dequantizers.Dequantizer,
    num_dims: int,
    settings: BpdSettings,
) -> Callable[[Any, Any, Array, Array], dict[str, Array]]:
    """(params, dequantizer params, integer or float batch [B, ...], key) -> per-image results.

    Every entry is [B]. With K = settings.num_dequant_samples dequantization draws per image,
    'ode' / 'bound' are the importance-weighted K-sample numbers and 'ode_single' /
    'bound_single' the mean of the K single-sample ones (K > 1 only); 'log_q' is the
    dequantizer's term (mean over the K draws), all in bits/dim (nats for continuous data).

    The K draws share the Hutchinson probe of the ODE and the time and noise draws of the bound.
    The importance-weighted estimate is -log (1/K sum_k exp(-(nll_k + log q_k))) with estimated
    nll_k; if their Monte-Carlo errors were independent across k, the log-mean-exp would pick
    the luckiest error and fall below the K-sample bound (by about 1.4 sigma - log K nats for
    K = 8 and errors of sigma >> 1 nat). Shared random numbers make the errors nearly equal,
    and a common error passes through the log-mean-exp unchanged, with mean zero.
    """
    num = settings.num_dequant_samples
    to_bpd = preprocessing.nats_to_bpd
    scale = preprocessing.nats_scale(num_dims)

    def one_draw(params: Any, deq_params: Any, batch: Array, keys: Array) -> dict[str, Array]:
        """One dequantization draw: totals in nats, nll + log q (per image)."""
        k_deq, k_ode, k_bound = keys

        def score(x: Array, t: Array) -> Array:
            return score_fn(params, x, t)

        d = dequantizer(deq_params, k_deq, batch)
        out = {"log_q": d.log_q}
        if settings.ode:
            r = likelihood.ode_nll(
                score,
                sde,
                d.x,
                k_ode,
                eps=settings.eps,
                rtol=settings.rtol,
                atol=settings.atol,
                divergence=settings.divergence,
                solver=settings.solver,
                max_steps=settings.max_steps,
                mode=settings.mode,
                variable=settings.variable,
                pcoeff=settings.pcoeff,
                icoeff=settings.icoeff,
            )
            out["ode"] = r.nll + d.log_q
            out["ode_nfe"] = r.nfe
        if settings.bound:
            b = bound.nll_bound(
                score,
                sde,
                d.x,
                k_bound,
                eps=settings.eps,
                num_t=settings.num_t,
                offset=settings.offset,
                estimator=settings.estimator,
                draws_per_call=settings.draws_per_call,
                time_sampling=settings.time_sampling,
            )
            out["bound"] = b.nll + d.log_q
            out["bound_stderr"] = b.stderr
        return out

    def bits_per_dim_batch(params: Any, deq_params: Any, batch: Array, key: Array) -> dict:
        keys = jax.random.split(key, 3)
        if num == 1:  # the unsplit keys: uniform dequantization gives the numbers it always gave
            per = jax.tree.map(lambda a: a[None], one_draw(params, deq_params, batch, keys))
        else:
            # K dequantization draws that share the ODE's probe and the bound's time draws
            # (common random numbers): their Monte-Carlo errors then nearly coincide and cancel
            # in the importance weights; independent errors would bias the log-mean-exp low
            deq_keys = jax.random.split(keys[0], num)
            per = jax.lax.map(
                lambda k: one_draw(params, deq_params, batch, (k, keys[1], keys[2])), deq_keys
            )
        out = {}
        for name in ("ode", "bound"):
            if name not in per:
                continue
            stderr = per.get(f"{name}_stderr")
            iw, iw_stderr = dequantizers.importance_weighted(per[name], stderr)
            out[name] = to_bpd(iw, num_dims)
            if stderr is not None:
                out[f"{name}_stderr"] = iw_stderr * scale
            if num > 1:
                out[f"{name}_single"] = to_bpd(per[name].mean(0), num_dims)
                if stderr is not None:
                    # shared random numbers: the K errors are (nearly) the same error
                    out[f"{name}_single_stderr"] = stderr.mean(0) * scale
        if "ode_nfe" in per:
            out["ode_nfe"] = per["ode_nfe"].mean(0) if num > 1 else per["ode_nfe"][0]
        if not isinstance(dequantizer, dequantizers.Uniform):
            out["log_q"] = per["log_q"].mean(0) * scale
        return out

    return bits_per_dim_batch


@functools.lru_cache(maxsize=16)
def _compiled_batch_fn(
    score_fn: ParamScoreFn,
    sde: SDE,
    preprocessing: Preprocessing,
    dequantizer: dequantizers.Dequantizer,
    num_dims: int,
    settings: BpdSettings,
    mesh: jax.sharding.Mesh,
) -> Callable[[Any, Any, Array, Array], dict[str, Array]]:
    """One jitted batch function per (score model, SDE, preprocessing, dequantizer, settings,
    mesh): jit caches its compiled programs on this object, so a second checkpoint reuses them."""
    replicated = parallel.replicated(mesh)
    return jax.jit(
        _batch_fn(score_fn, sde, preprocessing, dequantizer, num_dims, settings),
        in_shardings=(replicated, replicated, parallel.data_sharding(mesh), replicated),
        out_shardings=replicated,
    )


class _Progress:
    """A progress bar over images (process 0, when asked): images done / total, NFE so far."""

    def __init__(self, total: int, done: int, enabled: bool, what: str):
        self.bar = None
        self.nfe: list[float] = []
        if enabled and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, unit="img", desc=what, dynamic_ncols=True, leave=True
            )

    def update(self, n: int, out: dict[str, np.ndarray], valid: int) -> None:
        if self.bar is None:
            return
        if "ode_nfe" in out:
            self.nfe.append(float(np.mean(out["ode_nfe"][:valid])))
            self.bar.set_postfix(ode_nfe_mean=f"{np.mean(self.nfe):.0f}")
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def evaluate_split(
    score_fn: ParamScoreFn,
    sde: SDE,
    preprocessing: Preprocessing,
    images: np.ndarray,
    settings: BpdSettings,
    out_dir: str,
    *,
    params: Any = None,
    dequantizer: dequantizers.Dequantizer | None = None,
    deq_params: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    info: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate every image of `images` `settings.num_repeats` times; resumable through out_dir.

    Args:
      score_fn: score(params, x [B, ...], t [B]) -> [B, ...] of the model to evaluate (e.g.
        `models.ScoreModel(model, sde)`; a closed-form score may ignore params). Compiled
        programs are cached by its identity or value, so pass the same object (or an equal
        `ScoreModel`) for another checkpoint.
      sde: its forward SDE.
      preprocessing: how the stored images become model inputs; evaluation uses
        `preprocessing.for_likelihood()` (uniform dequantization for quantized data, no flips).
      images: [N, ...] the split, integer images or float points.
      settings: what to compute.
      out_dir: directory for per-batch results (created; reused to resume).
      params: the parameters passed to score_fn (replicated over the mesh).
      dequantizer: how integer images become points (`dequantizers`); default
        `dequantizers.Uniform(preprocessing)`. Must agree with `settings.dequantization`.
      deq_params: the parameters passed to the dequantizer (variational only).
      mesh: device mesh (default: every device); batches are sharded over it.
      info: entries to record with the metrics (e.g. the checkpoint step).
      progress: show a progress bar (images done / total, NFE so far) on process 0.

    Returns:
      The metrics dictionary (also written to out_dir/metrics.json).
    """
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
    if num == 0:
        raise ValueError(f"no images to evaluate in the {settings.split} split")
    num_dims = math.prod(images.shape[1:])
    if dequantizer is None:
        dequantizer = dequantizers.Uniform(preprocessing)
    if dequantizers.kind_of(dequantizer) != settings.dequantization:
        raise ValueError(
            f"settings.dequantization={settings.dequantization!r} but the dequantizer is "
            f"{dequantizers.kind_of(dequantizer)!r}"
        )
    fn = _compiled_batch_fn(score_fn, sde, preprocessing, dequantizer, num_dims, settings, mesh)
    params = jax.device_put(params, parallel.replicated(mesh))
    deq_params = jax.device_put(deq_params, parallel.replicated(mesh))
    base = jax.random.key(settings.seed)
    num_batches = batches.num_eval_batches(num, settings.batch_size)

    def path_of(r: int, b: int) -> str:
        return os.path.join(out_dir, f"repeat{r:03d}_batch{b:05d}.npz")

    def images_in(b: int) -> int:
        return min(settings.batch_size, num - b * settings.batch_size)

    todo = [(r, b) for r in range(settings.num_repeats) for b in range(num_batches)]
    done = sum(images_in(b) for r, b in todo if os.path.exists(path_of(r, b)))
    bar = _Progress(settings.num_repeats * num, done, progress, f"bits/dim ({settings.split})")
    try:
        for r in range(settings.num_repeats):
            split = batches.eval_batches(
                images,
                settings.batch_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
            for b, (batch, _) in enumerate(split):
                path = path_of(r, b)
                if os.path.exists(path):
                    continue  # computed before an interruption
                key = jax.random.fold_in(jax.random.fold_in(base, r), b)
                out = jax.device_get(fn(params, deq_params, parallel.shard_batch(batch, mesh), key))
                if jax.process_index() == 0:
                    tmp = path + ".tmp.npz"
                    np.savez(tmp, **out)
                    os.replace(tmp, path)  # atomic: a killed write leaves no partial result
                logger.debug(
                    "repeat %d/%d batch %d/%d", r + 1, settings.num_repeats, b + 1, num_batches
                )
                bar.update(images_in(b), out, images_in(b))
    finally:
        bar.close()

    return _summarize(
        out_dir, settings, num, num_batches, levels=preprocessing.levels, info=info or {}
    )


def _gather(out_dir: str, settings: BpdSettings, num: int, num_batches: int) -> dict:
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
    settings: BpdSettings,
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
    for name in ("ode", "bound", "ode_single", "bound_single", "log_q"):
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
        if f"{name}_stderr" in per:
            # the bound's own Monte-Carlo error, from its time draws: valid even for R = 1
            # (the mean over R x N independent estimates: sum of their variances / (R N)^2)
            var = (per[f"{name}_stderr"].astype(np.float64) ** 2).sum()
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


def bpd_directory(
    exp: experiment.Experiment, workdir: str, step: int, deq_step: int | None = None
) -> str:
    """Where the per-batch results of this evaluation live (named by its settings' digest and,
    for variational dequantization, the dequantizer's step)."""
    s = exp.eval.bpd
    kind = "ema" if exp.eval.use_ema else "raw"
    deq = f"_deq{deq_step}" if deq_step is not None else ""
    return os.path.join(workdir, "eval", f"{s.split}_step{step}{deq}_{kind}_{s.digest()}")


def dequantizer_of(
    exp: experiment.Experiment, workdir: str, mesh: jax.sharding.Mesh
) -> tuple[dequantizers.Dequantizer, Any, int | None]:
    """(dequantizer, its parameters, its step) of `exp.eval.bpd.dequantization`; the
    variational one is restored from workdir/dequantizer (`train_deq.restore_dequantizer`)."""
    kind = exp.eval.bpd.dequantization
    if kind != "variational":
        deq = dequantizers.make(kind, exp.preprocessing, sde=exp.sde, eps=exp.eval.bpd.eps)
        return deq, None, None
    from mlscore_jax import train_deq

    deq_params, deq_step = train_deq.restore_dequantizer(exp, workdir, mesh)
    return dequantizers.Variational(exp.dequantizer, exp.preprocessing), deq_params, deq_step


def bits_per_dim(
    exp: experiment.Experiment,
    workdir: str,
    images: np.ndarray,
    settings: BpdSettings,
    out_dir_of: Callable[[int | None], str],
    *,
    params: Any,
    step: int,
    mesh: jax.sharding.Mesh,
    info: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """`evaluate_split` of `images` under the score model `params` (checkpoint `step`) of `exp`,
    with the dequantizer `settings.dequantization` of `workdir` (`dequantizer_of`), into
    `out_dir_of(dequantizer step or None)`; what `evaluate` and `nll` share. The metrics record
    the step, EMA, directory, dequantization (and its step) and `info`."""
    deq, deq_params, deq_step = dequantizer_of(exp, workdir, mesh)
    out_dir = out_dir_of(deq_step)
    record = {"step": step, "ema": exp.eval.use_ema, "dir": out_dir, **(info or {})}
    record["dequantization"] = settings.dequantization
    if deq_step is not None:
        record["deq_step"] = deq_step
    return evaluate_split(
        models.ScoreModel(exp.model, exp.sde),
        exp.sde,
        exp.preprocessing,
        images,
        settings,
        out_dir,
        params=params,
        dequantizer=deq,
        deq_params=deq_params,
        mesh=mesh,
        info=record,
        progress=progress,
    )


def evaluate(exp: experiment.Experiment, workdir: str, *, progress: bool = False) -> dict[str, Any]:
    """Evaluate the checkpoint `exp.eval.ckpt_step` of `workdir`; returns (and writes) metrics.

    `exp.eval.enable_bpd`: bits/dim by ODE and bound (`evaluate_split`) into
    `bpd_directory(...)`, with the dequantization of `exp.eval.bpd.dequantization`;
    `exp.eval.enable_sampling`: `exp.eval.num_samples` samples by `exp.sampling` into
    workdir/eval/samples_step<step>.{npz,png}.
    """
    mesh = parallel.make_mesh()
    params, step = restore_params(exp, workdir, mesh)
    metrics: dict[str, Any] = {"step": step, "ema": exp.eval.use_ema}
    if exp.eval.enable_bpd:
        settings = exp.eval.bpd
        images = exp.dataset.test if settings.split == "test" else exp.dataset.train
        if images.shape[0] == 0:
            raise ValueError(f"the {settings.split} split of {exp.dataset.name} is empty")
        metrics = bits_per_dim(
            exp,
            workdir,
            images,
            settings,
            lambda deq_step: bpd_directory(exp, workdir, step, deq_step),
            params=params,
            step=step,
            mesh=mesh,
            progress=progress,
        )
        if jax.process_index() == 0:
            _append_result(workdir, metrics, exp)
            logger.info(
                "metrics: %s",
                json.dumps({k: metrics.get(k) for k in ("ode", "bound", "log_q") if k in metrics}),
            )
    if exp.eval.enable_sampling:
        metrics["samples"] = sample_to_files(
            exp, params, os.path.join(workdir, "eval", f"samples_step{step}")
        )
    return metrics


@functools.lru_cache(maxsize=8)
def _compiled_sampler(
    score_fn: ParamScoreFn, sde: SDE, shape: tuple[int, ...], settings: SamplingSettings
) -> Callable[[Any, Array], sampling.SampleResult]:
    def draw(params: Any, key: Array) -> sampling.SampleResult:
        return sampling.sample(lambda x, t: score_fn(params, x, t), sde, shape, key, settings)

    return jax.jit(draw)


def sample_to_files(
    exp: experiment.Experiment,
    params: Any,
    prefix: str,
    *,
    settings: SamplingSettings | None = None,
) -> dict[str, Any]:
    """`exp.eval.num_samples` samples by `settings` (default `exp.sampling`): prefix.npz (model
    space) and, for images, prefix.png (a grid); returns the sampler, its NFE and the files."""
    settings = settings or exp.sampling
    shape = (exp.eval.num_samples, *exp.example_shape)
    key = jax.random.fold_in(jax.random.key(exp.train.seed), 0x5A3)  # not a training/eval key
    draw = _compiled_sampler(models.ScoreModel(exp.model, exp.sde), exp.sde, shape, settings)
    start = time.perf_counter()
    result = jax.device_get(draw(params, key))
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {
        "method": settings.method,
        "num_samples": shape[0],
        "nfe_mean": float(np.mean(result.nfe)),
        "seconds_incl_compile": seconds,
    }
    if jax.process_index() == 0:
        levels = exp.dataset.levels if exp.dataset.is_image else None
        out.update(
            outputs.write_samples(
                prefix, result.x, result.nfe, levels=levels, centered=exp.preprocessing.centered
            )
        )
        logger.info("samples: %s", out)
    return out


def _append_result(workdir: str, metrics: dict[str, Any], exp: experiment.Experiment) -> None:
    path = os.path.join(workdir, "results.md")
    new = not os.path.exists(path)
    s = exp.eval.bpd
    with open(path, "a") as f:
        if new:
            f.write(
                "| date | data | split | step | images x repeats | dequantization (K) | unit "
                "| ODE | ODE NFE mean [min-max] | bound |\n"
                "|---|---|---|---|---|---|---|---|---|---|\n"
            )
        ode = metrics.get("ode")
        nfe = ode["nfe"] if ode else None
        deq = s.dequantization + (f" step {metrics['deq_step']}" if "deq_step" in metrics else "")
        f.write(
            f"| {datetime.date.today()} | {exp.dataset.name} | {metrics['split']} | "
            f"{metrics['step']} | {metrics['num_images']} x {metrics['num_repeats']} | "
            f"{deq} ({s.num_dequant_samples}) | {metrics['unit']} | {format_metric(ode)} | "
            + (f"{nfe['mean']:.0f} [{nfe['min']}-{nfe['max']}]" if nfe else "-")
            + f" | {format_metric(metrics.get('bound'))} |\n"
        )
