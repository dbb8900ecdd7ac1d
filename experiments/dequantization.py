"""Uniform vs truncated-normal vs variational dequantization of one score model, side by side.

For a config and workdir it (1) trains the score model if its training is not complete,
(2) trains the Flow++ dequantizer against it (`--mode train_deq`; resumes, nothing to do if
complete), (3) evaluates the test split with each dequantization, K draws per image, by the
probability-flow ODE and by the bound (resumable: `evaluate.evaluate`), and (4) prints a
markdown table (also written to `<workdir>/dequantization.md`):

* K = 1: the mean of the K single-draw estimates (the paper's number; averaging K draws only
  lowers its Monte-Carlo noise), K = K: the importance-weighted K-draw bound
  -log (1/K sum_k p(x_k) / q(u_k | x));
* each mean with its standard error over the test images, and the gain against uniform
  dequantization with the paired standard error (the same images; the spread of the per-image
  differences / sqrt(N)).

    .venv/bin/python experiments/dequantization.py --config configs/cpu/digits_ddpmpp.py \\
        --workdir runs/digits_deq [--k 8] [--repeats 1] [--num_images N] [--set KEY=VALUE]

Results go to `<workdir>/eval/<the evaluation's directory>_first<N>/`, resumable.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import math
import sys
import time
from pathlib import Path

import mlscore_jax  # noqa: F401  (sets the XLA:CPU flag before any computation)

# isort: split

import jax
import numpy as np
import provenance  # noqa: E402  (experiments/provenance.py)

from mlscore_jax import evaluate, experiment, logs, models, parallel, train, train_deq

REPO = Path(__file__).resolve().parents[1]
KINDS = ("uniform", "truncated_normal", "variational")


def load_config(path: str):
    """get_config() of a config file (configs/... import each other: the repository on sys.path)."""
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _per_image(metrics: dict) -> dict[str, np.ndarray]:
    with np.load(Path(metrics["dir"]) / "per_image.npz") as f:
        return {k: f[k].astype(np.float64).mean(0) for k in f.files}  # mean over repeats: [N]


def _fmt(values: np.ndarray) -> str:
    return f"{values.mean():.4f} ± {values.std(ddof=1) / math.sqrt(values.size):.4f}"


def _gain(values: np.ndarray, base: np.ndarray) -> str:
    d = values - base
    return f"{d.mean():+.4f} ± {d.std(ddof=1) / math.sqrt(d.size):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu/digits_ddpmpp.py")
    parser.add_argument("--workdir", default="runs/digits_deq")
    parser.add_argument("--k", type=int, default=8, help="dequantization draws per image")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the test split")
    parser.add_argument("--num_images", type=int, default=None, help="first N test images")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.uniform_dequantization=False",
    )
    args = parser.parse_args()
    logs.setup(str(Path(args.workdir) / "log.txt"), verbose=False)

    config = load_config(args.config)
    for item in args.set:
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = config
        for name in sections:
            node = node[name]
        node[leaf] = ast.literal_eval(value)
    exp = experiment.from_config(config, source=args.config)
    start = time.perf_counter()
    train.train_and_evaluate(exp, args.workdir)  # resumes; nothing to do when complete
    train_deq.train_dequantizer(exp, args.workdir)
    train_s = time.perf_counter() - start

    mesh = parallel.make_mesh()
    params, step = evaluate.restore_params(exp, args.workdir, mesh)
    images = exp.dataset.test[: args.num_images]
    results, seconds = {}, {}
    for kind in KINDS:
        bpd = dataclasses.replace(
            exp.eval.bpd, dequantization=kind, num_dequant_samples=args.k, num_repeats=args.repeats
        )
        run = exp.replace(eval=dataclasses.replace(exp.eval, bpd=bpd))
        deq, deq_params, deq_step = evaluate.dequantizer_of(run, args.workdir, mesh)
        out_dir = Path(evaluate.bpd_directory(run, args.workdir, step, deq_step))
        out_dir = out_dir.with_name(f"{out_dir.name}_first{len(images)}")
        start = time.perf_counter()
        results[kind] = evaluate.evaluate_split(
            models.ScoreModel(exp.model, exp.sde),
            exp.sde,
            exp.preprocessing,
            images,
            bpd,
            str(out_dir),
            params=params,
            dequantizer=deq,
            deq_params=deq_params,
            mesh=mesh,
            info={"step": step, "deq_step": deq_step, "dir": str(out_dir)},
            progress=True,
        )
        seconds[kind] = time.perf_counter() - start

    per = {kind: _per_image(m) for kind, m in results.items()}
    k = args.k
    one = "_single" if k > 1 else ""
    rows = [
        f"| dequantization | ODE K=1 | ODE K={k} | bound K=1 | bound K={k} | log q (bits/dim) "
        f"| ODE NFE | gain vs uniform: ODE K=1 | ODE K={k} | bound K=1 | bound K={k} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = per["uniform"]
    for kind in KINDS:
        p = per[kind]
        log_q = _fmt(p["log_q"]) if "log_q" in p else "0"
        gains = (
            ["-"] * 4
            if kind == "uniform"
            else [
                _gain(p[f"ode{one}"], base[f"ode{one}"]),
                _gain(p["ode"], base["ode"]),
                _gain(p[f"bound{one}"], base[f"bound{one}"]),
                _gain(p["bound"], base["bound"]),
            ]
        )
        name = kind + (f" (step {results[kind]['deq_step']})" if kind == "variational" else "")
        rows.append(
            f"| {name} | {_fmt(p[f'ode{one}'])} | {_fmt(p['ode'])} | {_fmt(p[f'bound{one}'])} | "
            f"{_fmt(p['bound'])} | {log_q} | {p['ode_nfe'].mean():.0f} | "
            + " | ".join(gains)
            + " |"
        )
    m = results["uniform"]
    header = [
        f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"Commit {provenance.commit()}; {provenance.machine()}; jax {jax.__version__}.",
        f"Score model: step {m['step']} of `{args.config}`"
        + "".join(f" `{item}`" for item in args.set)
        + " (EMA); test split, "
        f"{m['num_images']} images x {args.repeats} repeat(s), {k} dequantization draws each; "
        f"ODE {exp.eval.bpd.solver} rtol = atol = {exp.eval.bpd.rtol:g}, bound "
        f"{exp.eval.bpd.num_t} time draws; eps = {exp.eval.bpd.eps:g}. bits/dim, "
        "± standard error over the test images (gains: paired over the same images).",
        "Seconds (evaluation, this machine): "
        + ", ".join(f"{kind} {s:.0f}" for kind, s in seconds.items())
        + f"; training (score model + dequantizer, 0 if already done): {train_s:.0f}.",
    ]
    text = "\n".join(header) + "\n\n" + "\n".join(rows) + "\n"
    print(text)
    if jax.process_index() == 0:
        (Path(args.workdir) / "dequantization.md").write_text(text)


if __name__ == "__main__":
    main()
