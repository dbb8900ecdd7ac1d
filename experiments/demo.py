"""`make demo`: maximum-likelihood training of a small DDPM++ on scikit-learn's 8x8 digits, offline.

1. trains `configs/cpu/digits_ddpmpp.py` (VP SDE, likelihood weighting + importance sampling) in
   `--workdir` (resumes if a checkpoint is there; nothing to do if training is complete);
2. evaluates test bits/dim with the EMA parameters by the probability-flow ODE and by the bound,
   over all 300 test images (`mlscore_jax.evaluate`; `--repeats R` for R repeats);
3. draws 64 samples with the predictor-corrector sampler (reverse diffusion + Langevin, 500
   steps) and 64 with the probability-flow ODE sampler from the same model, into
   `<workdir>/eval/samples_step<step>.png` and `samples_ode_step<step>.png`;
4. prints a table, with the bits/dim of simple reference models on the same dequantized test
   images (uniform over the 17 levels; a per-pixel categorical and a full-covariance Gaussian,
   both fitted on the training split), so the number means something.

    .venv/bin/python experiments/demo.py [--workdir runs/demo] [--steps 3000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import mlscore_jax  # noqa: F401  (sets the XLA:CPU flag before any computation)

# isort: split

import jax
import numpy as np

from mlscore_jax import bpd, evaluate, experiment, logs, parallel, train

REPO = Path(__file__).resolve().parents[1]


def reference_bpd(train: np.ndarray, test: np.ndarray, levels: int, seed: int = 0) -> dict:
    """Bits/dim on `test` of three simple models fitted on `train` (integer images [N, ...]).

    * uniform: log2(levels);
    * per-pixel categorical, add-one smoothing: a discrete model, exact bits/dim;
    * full-covariance Gaussian on dequantized values k + u (u ~ U[0, 1)): a density over the same
      continuous variable the diffusion model sees, so its dequantized NLL is, like the
      diffusion model's, an upper bound on a discrete NLL (averaged over 8 noise draws).
    """
    rng = np.random.default_rng(seed)
    xtr = train.reshape(train.shape[0], -1).astype(np.int64)
    xte = test.reshape(test.shape[0], -1).astype(np.int64)
    d = xtr.shape[1]
    counts = np.stack([np.bincount(col, minlength=levels) for col in xtr.T]) + 1.0  # [D, L]
    log_p = np.log2(counts / counts.sum(1, keepdims=True))
    categorical = -log_p[np.arange(d), xte].sum(1).mean() / d

    ytr = xtr + rng.random(xtr.shape)
    mean = ytr.mean(0)
    cov = np.cov(ytr, rowvar=False) + 1e-3 * np.eye(d)
    chol = np.linalg.cholesky(cov)
    log_det = 2.0 * np.log(np.diag(chol)).sum()
    nats = []
    for _ in range(8):
        r = np.linalg.solve(chol, (xte + rng.random(xte.shape) - mean).T)
        nats.append(0.5 * (r**2).sum(0) + 0.5 * log_det + 0.5 * d * math.log(2 * math.pi))
    gaussian = float(np.mean(nats)) * bpd.bits_per_dim_scale(d)  # density of k + u: bins of 1
    return {
        "uniform over the levels": math.log2(levels),
        "per-pixel categorical (fitted on train)": float(categorical),
        "full-covariance Gaussian (fitted on train)": gaussian,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(REPO / "runs" / "demo"))
    parser.add_argument("--steps", type=int, default=None, help="training steps (config: 3000)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="eval repeats (1 keeps the demo near 5 min)"
    )
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from configs.cpu import digits_ddpmpp

    logs.setup(str(Path(args.workdir) / "log.txt"))
    exp = experiment.from_config(digits_ddpmpp.get_config(), source="configs/cpu/digits_ddpmpp.py")
    exp = exp.replace(
        train=dataclasses.replace(exp.train, n_iters=args.steps or exp.train.n_iters),
        eval=dataclasses.replace(
            exp.eval,
            bpd=dataclasses.replace(exp.eval.bpd, num_repeats=args.repeats),
            enable_sampling=True,
        ),
        # 500 predictor-corrector steps (NFE 1000) instead of the official 1000: half the time,
        # samples of the same look on 8x8 digits
        sampling=dataclasses.replace(exp.sampling, method="pc", num_scales=500),
    )
    print(f"data: {exp.dataset!r}\nworkdir: {args.workdir}", flush=True)

    start = time.perf_counter()
    state = train.train_and_evaluate(exp, args.workdir, progress=True)
    train_s = time.perf_counter() - start
    if int(state.step) < exp.train.n_iters:  # SIGTERM: checkpointed, stop here
        print(f"stopped at step {int(state.step)} (pre-emption); rerun the same command to resume")
        return
    start = time.perf_counter()
    metrics = evaluate.evaluate(exp, args.workdir, progress=True)
    params, step = evaluate.restore_params(exp, args.workdir, parallel.make_mesh())
    ode_samples = evaluate.sample_to_files(
        exp,
        params,
        f"{args.workdir}/eval/samples_ode_step{step}",
        settings=dataclasses.replace(exp.sampling, method="ode"),
    )
    eval_s = time.perf_counter() - start

    levels = exp.dataset.levels
    refs = reference_bpd(exp.dataset.train, exp.dataset.test, levels)
    ode, bnd, samples = metrics["ode"], metrics["bound"], metrics["samples"]
    n, r = metrics["num_images"], metrics["num_repeats"]
    per = np.load(Path(metrics["dir"]) / "per_image.npz")
    gap = (per["bound"] - per["ode"]).astype(np.float64).mean(0)  # [N], paired per image

    def with_se(entry: dict) -> str:
        text = f"{entry['mean']:.4f} +- {entry['stderr_images']:.4f}"
        mc = entry.get("mc_stderr") or entry.get("mc_stderr_from_draws")
        return text + (f" (Monte-Carlo +- {mc:.4f})" if mc is not None else "")

    nfe = ode["nfe"]
    rows = [
        (
            "training steps (wall time of this run, incl. compile)",
            f"{metrics['step']} ({train_s:.0f} s)",
        ),
        (f"test bits/dim, probability-flow ODE ({n} images x {r} repeats)", with_se(ode)),
        ("  ODE NFE per image, mean [min-max]", f"{nfe['mean']:.0f} [{nfe['min']}-{nfe['max']}]"),
        ("test bits/dim, likelihood bound (same images)", with_se(bnd)),
        (
            "  bound - ODE, paired over images",
            f"{gap.mean():+.4f} +- {gap.std(ddof=1) / math.sqrt(n):.4f}",
        ),
        ("evaluation wall time (incl. compile and both samplers)", f"{eval_s:.0f} s"),
        (
            f"samples ({samples['num_samples']}, {samples['method']} sampler, NFE "
            f"{samples['nfe_mean']:.0f})",
            samples.get("png", samples["npz"]),
        ),
        (
            f"samples (64, {ode_samples['method']} sampler, NFE {ode_samples['nfe_mean']:.0f})",
            ode_samples.get("png", ode_samples["npz"]),
        ),
    ]
    rows += [(f"reference: {name}", f"{value:.4f}") for name, value in refs.items()]
    width = max(len(a) for a, _ in rows)
    print(f"\n| {'mlscore_jax demo: digits 8x8, 17 levels'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for a, b in rows:
        print(f"| {a.ljust(width)} | {b} |")
    print(
        "\n+- : standard error of the mean over the test images (what another draw of test "
        "images would change); Monte-Carlo: the error from dequantization noise, probes and "
        "time draws alone (more repeats shrink it: --repeats R)."
    )
    summary = {"train_seconds": train_s, "eval_seconds": eval_s, "references": refs, **metrics}
    with open(Path(args.workdir) / "demo.json", "w") as f:
        json.dump(summary, f, indent=1)
    if jax.process_index() == 0:
        print(f"metrics: {metrics['dir']}/metrics.json, summary: {args.workdir}/demo.json")


if __name__ == "__main__":
    main()
