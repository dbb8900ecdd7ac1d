"""Typed settings of a run: what training, evaluation and sampling take instead of a config.

`experiment.from_config` is the only code that reads a ConfigDict; it checks every key of every
section and fills these frozen dataclasses. Everything downstream (`train`, `evaluate`,
`sampling.sample`) takes them, so a test or a script can build a run in Python without a config:

    settings.TrainSettings(batch_size=64, n_iters=1000, ...)

Field names follow the official configs' keys (`config.training.*`, `config.optim.*`, ...) where
there is one; the config key is named in the comment where it differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The training loop (`config.training.*`, plus `seed` and `model.ema_rate`)."""

    batch_size: int = 128  # global, summed over devices and processes
    n_iters: int = 1_300_001
    snapshot_freq: int = 50_000  # kept forever (what evaluation reads)
    snapshot_freq_for_preemption: int = 10_000  # kept one deep
    log_freq: int = 100
    eval_freq: int = 100  # EMA loss on a test batch, to TensorBoard
    n_jitted_steps: int = 5  # steps fused with lax.scan in one dispatch
    ema_rate: float = 0.9999  # config.model.ema_rate
    seed: int = 42  # config.seed

    def __post_init__(self) -> None:
        n = self.n_jitted_steps
        if n < 1:
            raise ValueError(f"training.n_jitted_steps must be >= 1, got {n}")
        if self.batch_size < 1 or self.n_iters < 0:
            raise ValueError(
                f"training.batch_size must be >= 1 and training.n_iters >= 0, got "
                f"{self.batch_size} and {self.n_iters}"
            )
        for name in ("log_freq", "eval_freq", "snapshot_freq", "snapshot_freq_for_preemption"):
            value = getattr(self, name)
            if value <= 0 or value % n:
                raise ValueError(
                    f"training.{name}={value} must be a positive multiple of "
                    f"training.n_jitted_steps={n} (steps run {n} at a time)"
                )
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"model.ema_rate must be in [0, 1), got {self.ema_rate}")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """Adam with linear warm-up and global-norm clipping (`config.optim.*`, official)."""

    lr: float = 2e-4
    beta1: float = 0.9
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 5000  # steps of linear warm-up from 0 to lr; 0: none
    grad_clip: float = 1.0  # global-norm clipping; <= 0: none

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.warmup < 0 or self.weight_decay < 0:
            raise ValueError(
                f"optim.lr must be > 0, optim.warmup and optim.weight_decay >= 0; got "
                f"{self.lr}, {self.warmup}, {self.weight_decay}"
            )


DEQUANTIZATIONS = ("uniform", "variational", "truncated_normal")


@dataclasses.dataclass(frozen=True)
class BpdSettings:
    """What a bits/dim evaluation computes; results are only combined for equal settings.

    `digest()` names the directory of the per-batch results, so different settings never mix.
    """

    split: str = "test"  # config.eval.bpd_dataset
    batch_size: int = 1024
    num_repeats: int = 1
    ode: bool = True
    bound: bool = True
    eps: float = 1e-5  # config.training.smallest_time
    rtol: float = 5e-5
    atol: float = 5e-5
    solver: str = "bosh3"
    divergence: str = "rademacher"
    max_steps: int = 4096
    # how the ODE is integrated (`likelihood.ode_nll`): Hutchinson by JVP or VJP, the variable
    # (t, log-SNR, or y = x / alpha over log-SNR), the PI step-size controller's coefficients
    mode: str = "jvp"
    variable: str = "t"
    pcoeff: float = 0.0
    icoeff: float = 1.0
    num_t: int = 1000
    time_sampling: str = "stratified"  # the bound's time draws: 'stratified' or 'iid'
    draws_per_call: int = 1
    offset: bool = True
    estimator: str = "dsm"  # config.eval.dsm: 'dsm' if True else 'ssm'
    seed: int = 0  # config.seed
    # how the integer images become continuous points (`dequantizers.py`): 'uniform' (u ~ U[0,1)),
    # 'variational' (the trained Flow++ q(u | x), `--mode train_deq`), 'truncated_normal'
    # (training-free, i-DODE); continuous data ignore it
    dequantization: str = "uniform"
    # K: dequantization samples per image and repeat; K > 1 gives the importance-weighted
    # estimate -log (1/K sum_k p(y_k) / q(u_k | x)) next to the mean of the K single-sample ones
    num_dequant_samples: int = 1

    def __post_init__(self) -> None:
        if self.split not in ("test", "train"):
            raise ValueError(f"eval.bpd_dataset must be 'test' or 'train', got {self.split!r}")
        if self.num_repeats < 1:
            raise ValueError("eval.num_repeats must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.dequantization not in DEQUANTIZATIONS:
            raise ValueError(
                f"eval.dequantization must be one of {DEQUANTIZATIONS}, got {self.dequantization!r}"
            )
        if self.mode not in ("jvp", "vjp"):
            raise ValueError(f"eval.hutchinson must be 'jvp' or 'vjp', got {self.mode!r}")
        if self.variable not in ("t", "logsnr", "scaled"):
            raise ValueError(
                f"eval.variable must be 't', 'logsnr' or 'scaled', got {self.variable!r}"
            )
        if self.time_sampling not in ("stratified", "iid"):
            raise ValueError(
                f"eval.time_sampling must be 'stratified' or 'iid', got {self.time_sampling!r}"
            )
        if self.num_dequant_samples < 1:
            raise ValueError(
                f"eval.num_dequant_samples must be >= 1, got {self.num_dequant_samples}"
            )

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """An evaluation run (`config.eval.*`): which checkpoint, and what to compute from it."""

    bpd: BpdSettings = BpdSettings()
    ckpt_step: int = -1  # -1: the newest checkpoint of either kind
    deq_ckpt_step: int = -1  # the dequantizer's checkpoint (eval.dequantization='variational')
    use_ema: bool = True
    enable_bpd: bool = True
    enable_sampling: bool = False
    num_samples: int = 64

    def __post_init__(self) -> None:
        if not (self.enable_bpd or self.enable_sampling):
            raise ValueError(
                "nothing to do: eval.enable_bpd and eval.enable_sampling are both False"
            )
        if self.num_samples < 1:
            raise ValueError(f"eval.num_samples must be >= 1, got {self.num_samples}")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """The sampler (`config.sampling.*`): 'ode' (probability-flow ODE) or 'pc'."""

    method: str = "ode"
    smallest_time: float = 1e-3
    noise_removal: bool = True  # one Tweedie denoising step at the end
    rtol: float = 1e-5  # ode
    atol: float = 1e-5  # ode
    predictor: str = "reverse_diffusion"  # pc
    corrector: str = "langevin"  # pc
    n_steps_each: int = 1  # pc: corrector steps per time step
    snr: float = 0.16  # pc: Langevin signal-to-noise ratio
    num_scales: int = 1000  # pc: number of time steps

    def __post_init__(self) -> None:
        if self.method not in ("ode", "pc"):
            raise ValueError(f"unknown sampling.method {self.method!r}; choose 'ode' or 'pc'")


@dataclasses.dataclass(frozen=True)
class DequantizerSettings:
    """Training of the variational dequantizer (`config.deq.*`, `--mode train_deq`).

    The loop is the score model's (`train.run_loop`), with `training.*` for batch size,
    checkpoint and log frequencies, `optim.*` for Adam; these replace what differs.
    """

    n_iters: int = 300_001
    ema_rate: float = 0.99
    offset: bool = True  # the [0, eps] decoder term in the bound the dequantizer minimises

    def __post_init__(self) -> None:
        if self.n_iters < 0:
            raise ValueError(f"deq.n_iters must be >= 0, got {self.n_iters}")
        if not 0.0 <= self.ema_rate < 1.0:
            raise ValueError(f"deq.ema_rate must be in [0, 1), got {self.ema_rate}")
