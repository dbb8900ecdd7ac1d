"""The paper's table at CPU scale: trains and evaluates every row, then writes the table and plots.

For a data set (`--dataset digits` or `mnist`) and S seeds, each row of `configs/table/rows.py`
(VP / subVP x {lambda = sigma^2, lambda = g^2, lambda = g^2 + importance sampling}, one config
file per row under `configs/table/`) goes through these stages, each one resumable and skipped
when its result file exists (`<workdir>/<row>/seed<s>/table/<stage>.json`):

1. `train`: the score model (`train.train_and_evaluate`: resumes bit for bit from its newest
   checkpoint; snapshots every `training.snapshot_freq` steps feed the learning curve). The log
   gives the per-step variance of the per-example training losses across the batch.
2. `curve`: test bits/dim by the bound on the first `--curve-images` test images at every
   snapshot (stratified time draws, `--curve-num-t` per image): bits/dim vs training step.
3. `uniform`: the final EMA model on the first `--test-images` test images (default all): ODE
   and bound, uniform dequantization (the config's `eval.*`: Bosh3 at rtol = atol = 5e-5,
   200 time draws).
4. g^2 + IS rows only: `train_deq` (the Flow++ dequantizer, `deq.n_iters` steps), then
   `variational` and `truncated_normal`: ODE and bound with those dequantizations.
5. `tprofile` (seed 0): the one-sample training loss as a function of t, on 256 training
   images: its mean and spread at 40 times, for the loss-variance-vs-t plot.

Then (`report`, also alone with `--report-only`) it writes `<out>/<dataset>.md` (one row per
configuration: mean +- standard error over the seeds, and the mean per-image standard error;
the CIFAR-10 numbers of the paper and of score SDE beside them for orientation; the four
claims, each with its numbers; command, commit, machine) and `<out>/<dataset>_curves.png`,
`<out>/<dataset>_loss_variance.png`.

    .venv/bin/python experiments/paper_table.py --dataset digits [--seeds 3] [--jobs 1] \\
        [--workdir runs/table_digits] [--rows vp_sigma2,vp_g2_is] [--set KEY=VALUE ...]

`--set` overrides a config key in every row (e.g. `--set training.n_iters=10` for a smoke
test); the overrides are part of the written command. A killed run continues where it stopped:
rerun the same command.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import functools
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import mlscore_jax  # noqa: E402,F401  (sets the XLA:CPU flag before any computation)

# isort: split

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import provenance  # noqa: E402  (experiments/provenance.py)

from configs.table import rows as table_rows  # noqa: E402
from mlscore_jax import (  # noqa: E402
    checkpoint,
    evaluate,
    experiment,
    logs,
    losses,
    models,
    parallel,
    train,
    train_deq,
)
from mlscore_jax.sde import broadcast_to_data  # noqa: E402

# the code a result depends on: a stage's record says whether it differed from the commit
CODE = ("mlscore_jax", "configs", "experiments/paper_table.py", "experiments/provenance.py")

logger = logging.getLogger("paper_table")


@functools.cache
def code_commit() -> str:
    """The commit of CODE as this process loaded it: taken at its first call (`main` calls it
    at start), so a commit made while a long table run works does not relabel its records."""
    return provenance.commit(CODE)


ROWS = table_rows.ROWS
LABELS = {
    "sigma2": "λ = σ², t ~ U",
    "g2": "λ = g², t ~ U",
    "g2_is": "λ = g², IS",
}
# CIFAR-10 numbers for orientation (bits/dim, test split), from `../shared/reference/scoreflow.md`
# section 4: score SDE's baselines (lambda = sigma^2; ODE, uniform dequantization, DDPM++ cont.)
# and the ScoreFlow paper's best models (g^2 + IS + variational dequantization; which SDE is
# not recorded there, so they stand beside both g^2 + IS rows). The paper's per-row Table 2
# is not in the project's references and is not quoted.
CIFAR10_REFERENCE = {
    "vp_sigma2": "score SDE: ODE 3.16",
    "subvp_sigma2": "score SDE: ODE 3.02",
    "vp_g2_is": "ScoreFlow best: ODE 2.83 (variational), bound 2.90 (with flips)",
    "subvp_g2_is": "ScoreFlow best: ODE 2.83 (variational), bound 2.90 (with flips)",
}
MNIST_LITERATURE = {"FFJORD": 0.99, "ResFlow": 0.97}
STAGES_IS = ("train_deq", "variational", "truncated_normal")


# -- configuration ----------------------------------------------------------------------------


def row_config_path(dataset: str, row: str) -> str:
    return f"configs/table/{dataset}_{row}.py"


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("table_config", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config, items: list[str]) -> None:
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = config
        for name in sections:
            node = node[name]
        if leaf not in node:
            raise SystemExit(f"--set {key}: no such config key")
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value


def run_experiment(args: argparse.Namespace, row: str, seed: int) -> experiment.Experiment:
    path = row_config_path(args.dataset, row)
    config = load_config(path)
    if args.dataset == "mnist" and args.mnist_npz:
        config.data.dataset = "npz"
        config.data.train_file = os.path.join(args.mnist_npz, "mnist_train.npz")
        config.data.test_file = os.path.join(args.mnist_npz, "mnist_test.npz")
    apply_overrides(config, args.set)
    config.seed = seed
    return experiment.from_config(config, source=path)


def run_dir(args: argparse.Namespace, row: str, seed: int) -> Path:
    return Path(args.workdir) / row / f"seed{seed}"


# -- stages -----------------------------------------------------------------------------------


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)  # atomic: a killed write leaves no result, so the stage reruns


def _stage(directory: Path, name: str, fn) -> dict:
    """The stage's recorded result, or run it and record what it returns (with its seconds)."""
    path = directory / "table" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    logger.info("%s: %s", directory, name)
    start = time.perf_counter()
    result = fn()
    result["seconds"] = time.perf_counter() - start
    result["commit"] = code_commit()
    result["machine"] = provenance.machine()
    _write_json(path, result)
    return result


def parse_train_log(path: Path) -> list[dict[str, float]]:
    """The logged scalars per step (the last line of a step wins: a resumed run repeats some)."""
    by_step: dict[int, dict[str, float]] = {}
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        if not line.startswith("step="):
            continue
        values = {}
        for item in line.split():
            key, _, value = item.partition("=")
            try:
                values[key] = float(value)
            except ValueError:
                pass
        by_step[int(values["step"])] = values
    return [by_step[s] for s in sorted(by_step)]


def _train(exp: experiment.Experiment, workdir: Path) -> dict:
    train.train_and_evaluate(exp, str(workdir), progress=False)
    log = parse_train_log(workdir / "train_log.txt")
    if not log or log[-1]["step"] < exp.train.n_iters:
        raise RuntimeError(f"{workdir}: training stopped before step {exp.train.n_iters}")
    series = [
        {
            "step": int(v["step"]),
            "loss": v.get("loss_mean", v["loss"]),
            "loss_var": v.get("loss_var", math.nan),
        }
        for v in log
    ]
    rel = np.array([s["loss_var"] / s["loss"] ** 2 for s in series])
    return {
        "steps": exp.train.n_iters,
        "batch_size": exp.train.batch_size,
        "images_seen": exp.train.n_iters * exp.train.batch_size,
        "params": models.param_count(
            models.abstract_variables(exp.model, (1, *exp.example_shape))["params"]
        ),
        "images_per_s_median": float(np.median([v["images_per_s"] for v in log[1:] or log])),
        "series": series,
        # Var / mean^2 of the per-example losses across a step's batch, averaged over all steps
        # (the running mean at the end) and over the second half
        "loss_rel_var_mean": float(np.mean(rel)),
        "loss_rel_var_second_half": float(np.mean(rel[len(rel) // 2 :])),
    }


def _bpd(exp, workdir: Path, images, bpd_settings, step: int, name: str) -> dict:
    mesh = parallel.make_mesh()
    run = exp.replace(eval=dataclasses.replace(exp.eval, bpd=bpd_settings, ckpt_step=step))
    params, step = train.restore_params(run, str(workdir), mesh)

    def out_dir_of(deq_step):
        base = Path(evaluate.bpd_directory(run, str(workdir), step, deq_step))
        return str(base.with_name(f"{base.name}_{name}{len(images)}"))

    metrics = evaluate.bits_per_dim(
        run, str(workdir), images, bpd_settings, out_dir_of, params=params, step=step, mesh=mesh
    )
    per = np.load(Path(metrics["dir"]) / "per_image.npz")
    out = {"step": step, "num_images": int(images.shape[0])}
    for key in ("ode", "bound", "log_q"):
        if key in metrics:
            out[key] = {k: metrics[key][k] for k in ("mean", "stderr_images")}
            out[key]["per_image"] = per[key].astype(np.float64).mean(0).tolist()
    if "ode" in metrics:
        out["ode"]["nfe_mean"] = metrics["ode"]["nfe"]["mean"]
    if "deq_step" in metrics:
        out["deq_step"] = metrics["deq_step"]
    return out


def _snapshot_steps(workdir: Path) -> list[int]:
    ckpt = checkpoint.Checkpointer(str(workdir), read_only=True)
    try:
        return ckpt.snapshot_steps()
    finally:
        ckpt.close()


def _curve(exp, workdir: Path, args) -> dict:
    steps = _snapshot_steps(workdir)
    images = exp.dataset.test[: args.curve_images]
    settings = dataclasses.replace(
        exp.eval.bpd, ode=False, bound=True, num_t=args.curve_num_t, dequantization="uniform"
    )
    points = []
    for step in steps:
        r = _bpd(exp, workdir, images, settings, step, "curve")
        points.append(
            {"step": step, "bound": r["bound"]["mean"], "se": r["bound"]["stderr_images"]}
        )
    return {"num_images": int(images.shape[0]), "num_t": args.curve_num_t, "points": points}


def _gap(exp, workdir: Path, args) -> dict:
    """Bound and ODE (the final evaluation's settings, uniform dequantization) at every snapshot
    on the first `args.gap_images` test images: does the bound - ODE gap close with training?"""
    steps = _snapshot_steps(workdir)
    images = exp.dataset.test[: args.gap_images]
    settings = dataclasses.replace(exp.eval.bpd, ode=True, bound=True, dequantization="uniform")
    points = []
    for step in steps:
        r = _bpd(exp, workdir, images, settings, step, "gap")
        d = np.asarray(r["bound"]["per_image"]) - np.asarray(r["ode"]["per_image"])
        points.append(
            {
                "step": step,
                "ode": r["ode"]["mean"],
                "bound": r["bound"]["mean"],
                "gap": float(d.mean()),
                "gap_se": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan,
            }
        )
    return {"num_images": int(images.shape[0]), "points": points}


def _final(exp, workdir: Path, args, dequantization: str) -> dict:
    images = exp.dataset.test[: args.test_images]
    settings = dataclasses.replace(exp.eval.bpd, dequantization=dequantization)
    return _bpd(exp, workdir, images, settings, exp.train.n_iters, "first")


def _train_deq(exp, workdir: Path) -> dict:
    train_deq.train_dequantizer(exp, str(workdir), progress=False)
    log = parse_train_log(Path(train_deq.dequantizer_dir(str(workdir))) / "train_log.txt")
    return {"steps": exp.deq.n_iters, "last_bpd": log[-1].get("bpd") if log else None}


def t_profile(exp, params, images: np.ndarray, key, num_times: int = 40) -> dict:
    """The one-sample training objective at fixed t, written as an estimate of the integral it
    targets: (T - eps) lambda(t) / sigma(t)^2 r for uniform t, Z r under importance sampling
    (r = mean over dimensions of ||sigma s + z||^2, Z the IS normalizer). Its mean over (x, z)
    at t, and its standard deviation, for `num_times` log-spaced t in [eps, T]."""
    sde, spec = exp.sde, exp.loss
    eps, T = spec.eps, sde.T
    times = np.geomspace(eps, T, num_times).astype(np.float32)
    k_pre, k_z = jax.random.split(key)
    x0 = exp.preprocessing(k_pre, jnp.asarray(images))

    @jax.jit
    def residual(t_scalar, k):
        t = jnp.full((x0.shape[0],), t_scalar)
        z = jax.random.normal(k, x0.shape, x0.dtype)
        alpha, sigma = sde.marginal(t)
        xt = broadcast_to_data(alpha, x0) * x0 + broadcast_to_data(sigma, x0) * z

        def noise_fn(x, tt):
            return exp.model.apply({"params": params}, x, tt, train=False)

        res = losses.scaled_score(None, noise_fn, xt, t, sigma) + z
        r = jnp.mean(res.reshape(x0.shape[0], -1) ** 2, axis=-1)
        if spec.weighting == "score":
            return (T - eps) * r
        if spec.importance_sampling:
            return sde.importance_normalizer(eps) * r
        return (T - eps) * sde.likelihood_weight(t) / sigma**2 * r

    mean, std = [], []
    for i, t in enumerate(times):
        f = np.asarray(residual(jnp.float32(t), jax.random.fold_in(k_z, i)), np.float64)
        mean.append(float(f.mean()))
        std.append(float(f.std(ddof=1)))
    return {"t": times.tolist(), "mean": mean, "std": std, "num_images": int(images.shape[0])}


def _tprofile(exp, workdir: Path) -> dict:
    mesh = parallel.make_mesh()
    params, step = train.restore_params(exp, str(workdir), mesh, step=exp.train.n_iters)
    images = exp.dataset.train[:256]
    out = t_profile(exp, params, images, jax.random.key(exp.train.seed + 7))
    out["step"] = step
    return out


def archive_dir(args: argparse.Namespace, row: str, seed: int) -> Path:
    """Where the stage results of a run are kept with the report (committed with it): a table
    run on another machine or in a later session starts from them instead of from nothing."""
    return Path(args.out) / f"{args.dataset}_runs" / row / f"seed{seed}"


def _archive(args: argparse.Namespace, row: str, seed: int, stage: str | None = None) -> None:
    """Copy the run's stage results (only `stage`'s, when given) to the archive."""
    table = run_dir(args, row, seed) / "table"
    if not table.is_dir():
        return
    target = archive_dir(args, row, seed)
    for path in sorted(table.glob("*.json" if stage is None else f"{stage}.json")):
        _write_json(target / path.name, json.loads(path.read_text()))


def _has_checkpoint(directory: Path, step: int) -> bool:
    if not directory.is_dir():
        return False
    ckpt = checkpoint.Checkpointer(str(directory), read_only=True)
    try:
        return step in ckpt.steps("snapshot") or step in ckpt.steps("preemption")
    finally:
        ckpt.close()


def run_one(args: argparse.Namespace, row: str, seed: int) -> None:
    """Every stage of one (row, seed) that has no result yet, in the workdir or the archive."""
    exp = run_experiment(args, row, seed)
    workdir = run_dir(args, row, seed)
    table = workdir / "table"
    table.mkdir(parents=True, exist_ok=True)
    archived = archive_dir(args, row, seed)
    if archived.is_dir():
        for path in archived.glob("*.json"):
            if not (table / path.name).exists():
                _write_json(table / path.name, json.loads(path.read_text()))
    stages = [
        ("train", lambda: _train(exp, workdir)),
        ("curve", lambda: _curve(exp, workdir, args)),
        ("uniform", lambda: _final(exp, workdir, args, "uniform")),
    ]
    if exp.loss.importance_sampling and not args.no_deq:
        stages += [
            ("train_deq", lambda: _train_deq(exp, workdir)),
            ("variational", lambda: _final(exp, workdir, args, "variational")),
            ("truncated_normal", lambda: _final(exp, workdir, args, "truncated_normal")),
        ]
    if seed == args.first_seed:
        stages.append(("tprofile", lambda: _tprofile(exp, workdir)))
        if args.gap_images > 0:
            stages.append(("gap", lambda: _gap(exp, workdir, args)))
    missing = [name for name, _ in stages if not (table / f"{name}.json").exists()]
    # results taken from the archive without their checkpoints: the stages still to run read
    # the model, so train it again (bit for bit the recorded run: batches and randomness are
    # pure functions of the seed and the step)
    if missing and "train" not in missing and not _has_checkpoint(workdir, exp.train.n_iters):
        train.train_and_evaluate(exp, str(workdir), progress=False)
    deq_dir = Path(train_deq.dequantizer_dir(str(workdir)))
    if (
        "variational" in missing
        and "train_deq" not in missing
        and not _has_checkpoint(deq_dir, exp.deq.n_iters)
    ):
        train_deq.train_dequantizer(exp, str(workdir), progress=False)
    for name, fn in stages:
        _stage(workdir, name, fn)
        _archive(args, row, seed, name)  # after every stage: a run cut off keeps what it did


# -- orchestration ----------------------------------------------------------------------------


def _child_command(args: argparse.Namespace, row: str, seed: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--dataset", args.dataset]
    cmd += ["--workdir", args.workdir, "--out", args.out, "--seeds", str(args.seeds)]
    cmd += ["--first-seed"]
    cmd += [str(args.first_seed), "--curve-images", str(args.curve_images)]
    cmd += ["--curve-num-t", str(args.curve_num_t), "--gap-images", str(args.gap_images)]
    if args.test_images is not None:
        cmd += ["--test-images", str(args.test_images)]
    if args.mnist_npz:
        cmd += ["--mnist-npz", args.mnist_npz]
    if args.no_deq:
        cmd.append("--no-deq")
    for item in args.set:
        cmd += ["--set", item]
    return cmd + ["--only", f"{row}:{seed}"]


def run_all(args: argparse.Namespace, todo: list[tuple[str, int]]) -> None:
    """Seed-major order (every row's first seed, then the second, ...); `--jobs J` runs J
    (row, seed) pairs at a time, each in its own process on its own share of the cores."""
    if args.jobs <= 1:
        for row, seed in todo:
            run_one(args, row, seed)
        return
    cores = os.cpu_count() or 1
    per = max(1, cores // args.jobs)
    running: list[tuple[subprocess.Popen, str, int, int]] = []
    failed = []
    queue = list(todo)
    while queue or running:
        while queue and len(running) < args.jobs:
            row, seed = queue.pop(0)
            busy = {item[3] for item in running}
            slot = min(s for s in range(args.jobs) if s not in busy)  # its cores are free
            env = dict(os.environ)
            cpus = ",".join(str((slot * per + i) % cores) for i in range(per))
            run_dir(args, row, seed).mkdir(parents=True, exist_ok=True)
            log = open(run_dir(args, row, seed).parent / f"seed{seed}.out", "a")  # noqa: SIM115
            proc = subprocess.Popen(
                ["taskset", "-c", cpus, *_child_command(args, row, seed)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running.append((proc, row, seed, slot))
        time.sleep(2.0)
        for item in list(running):
            proc, row, seed, _ = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    failed.append((row, seed, proc.returncode))
    if failed:
        raise SystemExit(f"failed runs (see <workdir>/<row>/seed<s>.out): {failed}")


# -- report -----------------------------------------------------------------------------------


def _read(args: argparse.Namespace, row: str, seed: int, stage: str) -> dict | None:
    for path in (
        run_dir(args, row, seed) / "table" / f"{stage}.json",
        archive_dir(args, row, seed) / f"{stage}.json",  # a report from the committed results
    ):
        if path.exists():
            return json.loads(path.read_text())
    return None


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    a = np.asarray(values, np.float64)
    if a.size == 0:
        return math.nan, None
    return float(a.mean()), (float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else None)


def _fmt(values: list[float], digits: int = 3) -> str:
    m, se = _mean_se(values)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {se:.{digits}f}" if se is not None else f"{m:.{digits}f}"


def _judge(diff: float, se: float | None, per_image_se: float, expected_sign: int) -> str:
    """The verdict by the standard error over seeds; with one seed by the per-image paired
    standard error (which leaves out the seed-to-seed spread: says so)."""
    if se is not None:
        return _verdict(diff, se, expected_sign)
    if math.isnan(per_image_se):
        return "not resolved (no runs)"
    return _verdict(diff, per_image_se, expected_sign) + " (one seed: per-image SE only)"


def _verdict(diff: float, se: float | None, expected_sign: int) -> str:
    """'held' when the difference has the expected sign by more than 2 standard errors,
    'did not hold' when it has the opposite sign by more than 2, else 'not resolved'."""
    if se is None or math.isnan(diff):
        return "not resolved (one seed)"
    z = expected_sign * diff / se if se > 0 else math.inf * np.sign(expected_sign * diff)
    if z > 2:
        return "held"
    if z < -2:
        return "did not hold"
    return "not resolved (within 2 standard errors)"


def collect(args: argparse.Namespace) -> dict:
    """Per row and stage: the seeds' values (means over the images) and per-image errors."""
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    table: dict[str, Any] = {}
    for row in args.rows:
        entry: dict[str, Any] = {"seeds": []}
        for seed in seeds:
            stages = {
                s: _read(args, row, seed, s)
                for s in ("train", "curve", "uniform", "variational", "truncated_normal")
            }
            if stages["uniform"] is None:
                continue
            entry["seeds"].append(seed)
            for name, value in stages.items():
                entry.setdefault(name, []).append(value)
        entry["tprofile"] = _read(args, row, args.first_seed, "tprofile")
        entry["gap"] = _read(args, row, args.first_seed, "gap")
        table[row] = entry
    return table


def stage_commits(table: dict) -> dict[str, int]:
    """How many recorded stages each commit produced ('not recorded': stages from before the
    records carried their commit)."""
    counts: dict[str, int] = {}
    for entry in table.values():
        records = [v for name, vs in entry.items() if name != "seeds" and isinstance(vs, list)
                   for v in vs]  # fmt: skip
        records += [entry.get("tprofile"), entry.get("gap")]
        for v in records:
            if isinstance(v, dict):
                key = v.get("commit", "not recorded")
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _values(entry: dict, stage: str, key: str) -> list[float]:
    return [v[key]["mean"] for v in entry.get(stage, []) if v is not None and key in v]


def _train_values(entry: dict, key: str) -> list[float]:
    return [v[key] for v in entry.get("train", []) if v is not None]


def _per_image_se(entry: dict, stage: str, key: str) -> str:
    se = [v[key]["stderr_images"] for v in entry.get(stage, []) if v is not None and key in v]
    return f"{np.mean(se):.3f}" if se else "-"


def _paired(
    entry_a: dict, stage_a: str, entry_b: dict, stage_b: str, key: str, key_b: str | None = None
):
    """a's `key` - b's `key_b` (default `key`) over the seeds both have, paired per image:
    (mean, se over seeds, mean per-image paired se, number of seeds)."""
    key_b = key if key_b is None else key_b
    da, db = entry_a.get(stage_a, []), entry_b.get(stage_b, [])
    diffs, pse = [], []
    for va, vb in zip(da, db, strict=False):
        if va is None or vb is None or key not in va or key_b not in vb:
            continue
        d = np.asarray(va[key]["per_image"]) - np.asarray(vb[key_b]["per_image"])
        diffs.append(float(d.mean()))
        pse.append(float(d.std(ddof=1) / math.sqrt(d.size)))
    m, se = _mean_se(diffs)
    return m, se, (float(np.mean(pse)) if pse else math.nan), len(diffs)


def _compare(a: dict, stage_a: str, b: dict, stage_b: str, key: str, what: str, label: str):
    """a's `key` minus b's, paired per image, as (the claim's text, the verdict '<label> ...')
    for a claim that expects a to be lower."""
    m, se, pse, n = _paired(a, stage_a, b, stage_b, key)
    return _claim_text(m, se, pse, n, what), f"{label} {_judge(m, se, pse, -1)}".strip()


def _claim_text(m: float, se: float | None, pse: float, n: int, what: str) -> str:
    if n == 0:
        return f"{what}: no runs"
    se_text = f"± {se:.3f} over {n} seeds" if se is not None else "(1 seed)"
    return f"{what} {m:+.3f} {se_text} (per-image paired ± {pse:.3f})"


def report(args: argparse.Namespace, command: str) -> str:
    for row in args.rows:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            _archive(args, row, seed)
    table = collect(args)
    ds = args.dataset
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    any_train = next((v for e in table.values() for v in e.get("train", []) if v is not None), None)
    any_uniform = next(
        (v for e in table.values() for v in e.get("uniform", []) if v is not None), None
    )
    exp0 = run_experiment(args, args.rows[0], args.first_seed)
    b = exp0.eval.bpd
    lines = [
        f"# The paper's table at CPU scale: {ds}",
        "",
        f"Runs: `make table-{ds}` (`python experiments/paper_table.py --dataset {ds} "
        "--jobs 2`, resumable); this report: "
        f"`{command}`  ",
        f"Commit: {code_commit()}; machine: {provenance.machine()}; "
        f"jax {jax.__version__}; "
        f"written {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC.  ",
        "Stages by the commit that ran them: "
        + ", ".join(f"{c}: {n}" for c, n in stage_commits(table).items())
        + " (each stage's record in "
        f"`experiments/results/{ds}_runs/<row>/seed<s>/` names its commit and machine).",
        "",
    ]
    if any_train is not None:
        secs = [v["seconds"] for e in table.values() for v in e.get("train", []) if v is not None]
        lines += [
            f"**Budget, every row**: {any_train['steps']} steps at batch "
            f"{any_train['batch_size']} ({any_train['images_seen']:,} images seen), "
            f"{any_train['params']:,} parameters, the same network, optimizer and seeds for "
            f"every row (planned {args.first_seed}..{args.first_seed + args.seeds - 1}; the "
            f"'seeds' column says how many are done); training wall time per run "
            f"{np.median(secs):.0f} s (median, incl. compilation, as the runs went: other work "
            "may have shared the machine).",
        ]
    if any_uniform is not None:
        n = any_uniform["num_images"]
        secs = [v["seconds"] for e in table.values() for v in e.get("uniform", []) if v]
        lines += [
            f"**Evaluation**: EMA parameters at the last step, the first {n} test images "
            f"(of {exp0.dataset.test.shape[0]}), 1 repeat; ODE {b.solver} at rtol = atol = "
            f"{b.rtol:g} (Hutchinson by {b.mode}, Rademacher), bound with {b.num_t} stratified "
            f"time draws per image, ε = training.smallest_time of the row (VP 1e-5, subVP "
            f"1e-2), bits/dim with the dequantization's offset. ± after a mean: standard error "
            f"over the seeds; 'per image': the mean over seeds of the standard error over the "
            f"test images. Learning curves: the bound on the first {args.curve_images} test "
            f"images with {args.curve_num_t} time draws at every snapshot. Wall time of the "
            f"uniform-dequantization evaluation (ODE and bound) per run: {np.median(secs):.0f} s "
            "(median).",
        ]
    lines += [
        "",
        "| row | SDE | weighting | seeds | ODE, uniform | (per image) | bound, uniform | "
        "(per image) | ODE, variational | bound, variational | ODE, truncated normal | "
        "bound, truncated normal | train loss Var/mean² (all steps / second half) | "
        "CIFAR-10 (paper / score SDE; not comparable in value) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in args.rows:
        e = table[row]
        sde, w = row.split("_", 1)
        rel = _train_values(e, "loss_rel_var_mean")
        rel2 = _train_values(e, "loss_rel_var_second_half")
        lines.append(
            f"| `{row}` | {'VP' if sde == 'vp' else 'subVP'} | {LABELS[w]} | "
            f"{len(e['seeds'])} | {_fmt(_values(e, 'uniform', 'ode'))} | "
            f"{_per_image_se(e, 'uniform', 'ode')} | {_fmt(_values(e, 'uniform', 'bound'))} | "
            f"{_per_image_se(e, 'uniform', 'bound')} | "
            f"{_fmt(_values(e, 'variational', 'ode'))} | "
            f"{_fmt(_values(e, 'variational', 'bound'))} | "
            f"{_fmt(_values(e, 'truncated_normal', 'ode'))} | "
            f"{_fmt(_values(e, 'truncated_normal', 'bound'))} | {_fmt(rel, 2)} / {_fmt(rel2, 2)} | "
            f"{CIFAR10_REFERENCE.get(row, '-')} |"
        )
    lines += ["", "## The four claims", ""]
    lines += claims(table, args)
    if ds == "mnist":
        lit = ", ".join(f"{k} {v}" for k, v in MNIST_LITERATURE.items())
        lines += [
            "",
            f"Literature on MNIST (bits/dim, full test split, far larger budgets): {lit}.",
        ]
    curves = plot_curves(table, args, out_dir / f"{ds}_curves.png")
    prof = plot_tprofile(table, args, out_dir / f"{ds}_loss_variance.png")
    gap = plot_gap(table, args, out_dir / f"{ds}_gap.png")
    lines += ["", "## Plots", ""]
    if curves:
        lines += [f"![bits/dim vs training step]({curves.name})", ""]
    if gap:
        lines += [f"![bound minus ODE vs training step]({gap.name})", ""]
    if prof:
        lines += [
            f"![loss spread vs t]({prof.name})",
            "",
            "Loss spread vs t: the one-sample training loss at fixed t, written as an estimate "
            "of the integral it targets ((T − ε) λ(t)/σ(t)² r(t) for uniform t, Z r(t) with "
            "importance sampling; r = mean over pixels of ||σ s + z||²), on 256 training images "
            "of the seed-0 model; its standard deviation over (x, z) at t, divided by the "
            "objective's value (the mean over t of the uniform-t estimate).",
        ]
    text = "\n".join(lines) + "\n"
    (out_dir / f"{ds}.md").write_text(text)
    (out_dir / f"{ds}.json").write_text(json.dumps(summary_json(table), indent=1))
    return text


def summary_json(table: dict) -> dict:
    """Seeds' means per row and stage (what the markdown shows, for scripts)."""
    out = {}
    for row, e in table.items():
        out[row] = {"seeds": e["seeds"]}
        for stage in ("uniform", "variational", "truncated_normal"):
            for key in ("ode", "bound"):
                vals = _values(e, stage, key)
                if vals:
                    out[row][f"{stage}_{key}"] = vals
        rel = _train_values(e, "loss_rel_var_mean")
        if rel:
            out[row]["loss_rel_var_mean"] = rel
    return out


def claims(table: dict, args: argparse.Namespace) -> list[str]:
    out = []
    # 1. g^2 beats sigma^2 on the bound
    parts, verdicts = [], []
    for sde in ("vp", "subvp"):
        a, b = f"{sde}_g2", f"{sde}_sigma2"
        if a in table and b in table:
            text, verdict = _compare(
                table[a],
                "uniform",
                table[b],
                "uniform",
                "bound",
                f"{sde}: bound(g²) − bound(σ²)",
                "",
            )
            parts.append(text)
            verdicts.append(verdict)
    out.append(
        "1. **λ = g² gives a better bound than λ = σ²** (uniform t, uniform dequantization): "
        + "; ".join(parts or ["(rows not in this table)"])
        + f" bits/dim → {', '.join(verdicts) or '-'}."
    )
    # 2. IS lowers the loss variance and improves the NLL, more for VP
    parts, verdicts = [], []
    for sde in ("vp", "subvp"):
        a, b = f"{sde}_g2_is", f"{sde}_g2"
        if a in table and b in table:
            ma, _ = _mean_se(_train_values(table[a], "loss_rel_var_mean"))
            mb, _ = _mean_se(_train_values(table[b], "loss_rel_var_mean"))
            parts.append(f"{sde}: training-loss Var/mean² {mb:.2f} (uniform t) → {ma:.2f} (IS)")
            for key in ("bound", "ode"):
                what = f"{key}(IS) − {key}(uniform t)"
                text, verdict = _compare(
                    table[a], "uniform", table[b], "uniform", key, what, f"{sde} {key}"
                )
                parts.append(text)
                verdicts.append(verdict)
    out.append(
        "2. **Importance sampling lowers the loss variance and the NLL, more for VP**: "
        + "; ".join(parts or ["(rows not in this table)"])
        + f" bits/dim → {', '.join(verdicts) or '-'}."
    )
    # 1 and 2 together, where the table has no lambda = g^2 row (MNIST): the ScoreFlow objective
    # against score SDE's
    parts, verdicts = [], []
    for sde in ("vp", "subvp"):
        a, b = f"{sde}_g2_is", f"{sde}_sigma2"
        if a in table and b in table and f"{sde}_g2" not in table:
            for key in ("bound", "ode"):
                what = f"{sde} {key}(g² + IS) − {key}(σ²)"
                text, verdict = _compare(
                    table[a], "uniform", table[b], "uniform", key, what, f"{sde} {key}"
                )
                parts.append(text)
                verdicts.append(verdict)
    if parts:
        out.append(
            "1 and 2 together (no λ = g², uniform t row here): **λ = g² + IS gives a better NLL "
            "than λ = σ²**: " + "; ".join(parts) + f" bits/dim → {', '.join(verdicts)}."
        )
    # 3. variational beats uniform dequantization
    parts, verdicts = [], []
    for sde in ("vp", "subvp"):
        a = f"{sde}_g2_is"
        if a in table:
            for key in ("ode", "bound"):
                what = f"{sde} {key}: variational − uniform"
                text, verdict = _compare(
                    table[a], "variational", table[a], "uniform", key, what, f"{sde} {key}"
                )
                parts.append(text)
                verdicts.append(verdict)
    out.append(
        "3. **Variational dequantization improves on uniform** (λ = g² + IS rows): "
        + "; ".join(parts or ["(rows not in this table)"])
        + f" bits/dim → {', '.join(verdicts) or '-'}."
    )
    # 4. bound and ODE agree closely
    parts = []
    for row in args.rows:
        if row not in table:
            continue
        for stage in ("uniform", "variational"):
            m, se, pse, n = _paired(table[row], stage, table[row], stage, "bound", "ode")
            if n:
                parts.append(_claim_text(m, se, pse, n, f"{row} {stage}: bound − ODE"))
    trend, n_gap = [], 0
    for row in args.rows:
        g = table.get(row, {}).get("gap")
        if g and len(g["points"]) > 1:
            n_gap = g["num_images"]
            pts = g["points"]
            trend.append(
                f"{row} " + ", ".join(f"{p['gap']:+.2f}" for p in pts)
                + f" (steps {pts[0]['step']}..{pts[-1]['step']}, "
                f"± ≤ {max(p['gap_se'] for p in pts):.2f})"
            )  # fmt: skip
    out.append(
        "4. **The bound and the ODE likelihood agree closely for well-trained models** "
        "(CIFAR-10: 2.90 vs 2.83 bits/dim, a gap of 0.07): "
        + "; ".join(parts or ["(rows not in this table)"])
        + " bits/dim."
        + (
            f" Bound − ODE during training (seed {args.first_seed}, first {n_gap} test images, "
            "per-image paired SE): " + "; ".join(trend) + "."
            if trend
            else ""
        )
    )
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sde_panels(
    path: Path,
    table: dict,
    stage: str,
    draw,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    subtitle: str = "",
    grid: str = "major",
    zero_line: bool = False,
    **kw,
) -> Path | None:
    """A VP and a subVP panel side by side, a curve per weighting: `draw(ax, record, w)` draws
    the row's `stage` record (a row without it is left out). Saved to `path` (and returned)
    only when some panel has data."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), **kw)
    drawn = False
    for ax, sde in zip(axes, ("vp", "subvp"), strict=True):
        for w in ("sigma2", "g2", "g2_is"):
            record = table.get(f"{sde}_{w}", {}).get(stage)
            if record:
                draw(ax, record, w)
                drawn = True
        if zero_line:
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which=grid)
        ax.set_title(f"{'VP' if sde == 'vp' else 'subVP'} SDE{subtitle}")
        ax.legend()
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


def plot_curves(table: dict, args: argparse.Namespace, path: Path) -> Path | None:
    def draw(ax, curves: list, w: str) -> None:
        steps = [p["step"] for p in curves[0]["points"]]
        vals = np.array(
            [[p["bound"] for p in c["points"]] for c in curves if len(c["points"]) == len(steps)]
        )
        mean = vals.mean(0)
        ax.plot(steps, mean, marker="o", label=f"{LABELS[w]} ({len(vals)} seeds)")
        if len(vals) > 1:
            se = vals.std(0, ddof=1) / math.sqrt(len(vals))
            ax.fill_between(steps, mean - se, mean + se, alpha=0.25)

    table = {row: {"curve": [c for c in e.get("curve", []) if c]} for row, e in table.items()}
    return _sde_panels(
        path,
        table,
        "curve",
        draw,
        sharey=True,
        xlabel="training step",
        ylabel=f"test bits/dim (bound, first {args.curve_images} images)",
        title=f"{args.dataset}: test bound vs training step (EMA; ± standard error over seeds)",
    )


def plot_tprofile(table: dict, args: argparse.Namespace, path: Path) -> Path | None:
    def draw(ax, prof: dict, w: str) -> None:
        t, std, mean = map(np.asarray, (prof["t"], prof["std"], prof["mean"]))
        # the objective's value: the uniform-t average of the mean estimate over log-spaced t
        # (trapezoid in t)
        value = np.trapezoid(mean, t) / (t[-1] - t[0])
        ax.loglog(t, std / value, label=LABELS[w])

    return _sde_panels(
        path,
        table,
        "tprofile",
        draw,
        xlabel="t",
        grid="both",
        ylabel="std of the one-sample loss at t / objective",
        title=f"{args.dataset}: spread of the training loss vs t, per weighting / sampler",
        subtitle=f" (seed {args.first_seed})",
    )


def plot_gap(table: dict, args: argparse.Namespace, path: Path) -> Path | None:
    def draw(ax, g: dict, w: str) -> None:
        steps = [p["step"] for p in g["points"]]
        gap = [p["gap"] for p in g["points"]]
        se = [p["gap_se"] for p in g["points"]]
        ax.errorbar(steps, gap, yerr=se, marker="o", capsize=3, label=LABELS[w])

    n = next((e["gap"]["num_images"] for e in table.values() if e.get("gap")), 0)
    return _sde_panels(
        path,
        table,
        "gap",
        draw,
        sharey=True,
        zero_line=True,
        xlabel="training step",
        ylabel=f"bound − ODE, bits/dim (first {n} test images)",
        title=f"{args.dataset}: bound − ODE likelihood vs training step (EMA; ± paired "
        "standard error over the images)",
        subtitle=f" (seed {args.first_seed})",
    )


# -- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=table_rows.DATASETS, default="digits")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of rows")
    parser.add_argument("--workdir", default=None, help="default runs/table_<dataset>")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results"))
    parser.add_argument("--test-images", type=int, default=None, help="first N (default all)")
    parser.add_argument("--curve-images", type=int, default=100)
    parser.add_argument("--curve-num-t", type=int, default=50)
    parser.add_argument(
        "--gap-images",
        type=int,
        default=None,
        help="bound and ODE at every snapshot of the first seed on the first N test images "
        "(default: digits 50, mnist 0 = not run)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="(row, seed) runs at a time")
    parser.add_argument("--mnist-npz", default=None, help="folder of mnist_{train,test}.npz")
    parser.add_argument("--no-deq", action="store_true", help="skip the dequantizer stages")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # ROW:SEED (a child)
    args = parser.parse_args(argv)
    code_commit()  # the code as loaded, before the runs take hours
    args.rows = [r for r in args.rows.split(",") if r]
    for row in args.rows:
        if row not in ROWS:
            parser.error(f"unknown row {row!r}; choose from {ROWS}")
    args.workdir = args.workdir or str(REPO / "runs" / f"table_{args.dataset}")
    if args.test_images is None and args.dataset == "mnist":
        args.test_images = 1000
    if args.gap_images is None:
        args.gap_images = 50 if args.dataset == "digits" else 0
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    logs.setup(str(Path(args.workdir) / "log.txt"), verbose=False)

    if args.only:
        row, seed = args.only.split(":")
        run_one(args, row, int(seed))
        return
    command = "python experiments/paper_table.py " + " ".join(
        re.sub(r"^/.*?/(runs/|experiments/)", r"\1", a) for a in (argv or sys.argv[1:])
    )
    if not args.report_only:
        seeds = range(args.first_seed, args.first_seed + args.seeds)
        todo = [(row, seed) for seed in seeds for row in args.rows]
        start = time.perf_counter()
        run_all(args, todo)
        logger.info("table runs done in %.0f s", time.perf_counter() - start)
    print(report(args, command))


if __name__ == "__main__":
    main()
