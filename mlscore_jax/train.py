"""Training: train state, one jitted multi-step function, and the loop around it.

`train_and_evaluate(exp, workdir)` trains an `experiment.Experiment` (built from a config by
`experiment.from_config`) on every device of every process:

* data parallel over a 1-D mesh (`parallel.make_mesh`): the batch is split over the 'data' axis,
  parameters, optimizer state and EMA are replicated; no pmap;
* `training.n_jitted_steps` steps are fused with `lax.scan` in one dispatch of one jitted,
  donated function `train_steps(state, batches) -> (state, metrics)`;
* the batch of step k is a pure function of (seed, k, process) (`data.train_batches`) and the
  randomness of step k is `fold_in(state.key, k)`, so a run resumed from a checkpoint at step k
  continues bit for bit as if it had never stopped;
* a non-finite loss or gradient norm stops training with an error naming the step, before
  anything is checkpointed; SIGTERM saves and exits cleanly (`checkpoint.PreemptionGuard`).

Logs on process 0 only: a progress bar, TensorBoard scalars (loss, grad norm, lr, images/s,
achieved FLOP/s) in `workdir/tensorboard`, and `workdir/train_log.txt`. FLOP/s count
`step_flops` (XLA's cost analysis of ONE step, unscanned) times the steps taken: the cost analysis
of the scanned function counts a rolled loop's body once, not `n_jitted_steps` times.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlscore_jax import batches, checkpoint, datasets, experiment, losses, models, parallel
from mlscore_jax.settings import OptimizerSettings, TrainSettings

Array = jax.Array
logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; checkpointed as a whole)."""

    step: Array  # int32 [] steps taken
    params: Any
    opt_state: Any
    ema_params: Any
    key: Array  # typed PRNG key; step k uses fold_in(key, k)


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite loss or gradient norm."""


def make_optimizer(
    optim: OptimizerSettings,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam with linear warm-up lr * min(step / warmup, 1) and global-norm clipping (official).

    Returns:
      (the optax transformation, the learning-rate schedule step -> lr).
    """
    if optim.warmup > 0:
        schedule = optax.linear_schedule(0.0, optim.lr, optim.warmup)
    else:
        schedule = optax.constant_schedule(optim.lr)
    parts = []
    if optim.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    kwargs = dict(b1=optim.beta1, b2=0.999, eps=optim.eps)
    if optim.weight_decay > 0:
        parts.append(optax.adamw(schedule, weight_decay=optim.weight_decay, **kwargs))
    else:
        parts.append(optax.adam(schedule, **kwargs))
    return optax.chain(*parts), schedule


def init_state(
    exp: experiment.Experiment, tx: optax.GradientTransformation, key: Array
) -> TrainState:
    """A fresh train state: network initialised at `key`, EMA equal to the parameters."""
    init_key, train_key = jax.random.split(key)
    variables = exp.model.init(
        {"params": init_key},
        jnp.zeros((1,) + exp.example_shape, jnp.float32),
        jnp.ones((1,), jnp.float32),
        train=False,
    )
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params,
        key=train_key,
    )


def batch_loss(
    exp: experiment.Experiment,
    params: Any,
    batch: Array,
    key: Array,
    *,
    train: bool,
) -> Array:
    """Per-example training losses [B] of one integer batch [B, ...] (preprocessing included)."""
    k_pre, k_loss, k_drop = jax.random.split(key, 3)
    x = exp.preprocessing(k_pre, batch)

    def noise_fn(xt: Array, t: Array) -> Array:
        return exp.model.apply({"params": params}, xt, t, train=train, rngs={"dropout": k_drop})

    per_example = losses.dsm_loss(
        None,
        exp.sde,
        x,
        k_loss,
        noise_fn=noise_fn,
        weighting=exp.loss.weighting,
        importance_sampling=exp.loss.importance_sampling,
        eps=exp.loss.eps,
        reduce=exp.loss.reduce,
        # the official training objective: the IS loss without its constant Z / (T - eps)
        normalize_importance=False,
    )
    return per_example


def abstract_state(exp: experiment.Experiment, tx: optax.GradientTransformation, mesh) -> Any:
    """The TrainState as `jax.ShapeDtypeStruct`s replicated over `mesh`: the restore target of
    a checkpoint (training resumes, evaluation reads), built without allocating anything."""
    abstract = jax.eval_shape(lambda k: init_state(exp, tx, k), jax.random.key(0))
    replicated = parallel.replicated(mesh)
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )


# (params, frozen, integer batch [B, ...], key, train) -> per-example losses [B]; the step
# minimises their mean and logs their variance across the batch (the estimator's variance that
# importance sampling of t lowers). `frozen` is whatever else the loss reads and does not train
# (the score model's parameters when the dequantizer trains; None for the score model), passed as
# an argument, not a constant.
LossFn = Callable[[Any, Any, Array, Array, bool], Array]


def score_loss(exp: experiment.Experiment) -> LossFn:
    """The score model's training loss (`batch_loss`) in the loop's signature."""

    def loss(params: Any, frozen: Any, batch: Array, key: Array, train: bool) -> Array:
        del frozen
        return batch_loss(exp, params, batch, key, train=train)

    return loss


def train_step(
    state: TrainState,
    batch: Array,
    frozen: Any = None,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    ema_rate: float,
) -> tuple[TrainState, dict[str, Array]]:
    """One optimisation step on the global batch [B, ...]; pure."""
    key = jax.random.fold_in(state.key, state.step)

    def mean_loss(p: Any) -> tuple[Array, Array]:
        per_example = loss_fn(p, frozen, batch, key, True)
        return jnp.mean(per_example), per_example

    (loss, per_example), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, state.ema_params, params)
    metrics = {
        "loss": loss,
        # variance across the batch of the per-example losses (ddof = 1): one-sample variance of
        # the Monte-Carlo loss, in the loss's units squared
        "loss_var": jnp.var(per_example, ddof=1) if per_example.shape[0] > 1 else jnp.nan,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(state.step),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema
    )
    return new_state, metrics


def train_steps(
    state: TrainState, batches: Array, frozen: Any = None, *, unroll: bool = False, **kwargs
) -> tuple[TrainState, dict]:
    """`batches.shape[0]` steps fused with lax.scan; metrics are stacked [n].

    `unroll=True` unrolls the scan into straight-line code. Training keeps it rolled on every
    backend: on XLA:CPU convolution gradients inside a loop body used to be far slower than in
    straight-line code, but DDPM++ differentiates its convolutions through
    `models.layers.conv_general_dilated` on CPU, and rolled is then as fast as unrolled and
    compiles faster (`experiments/bench_train_loop.py`; its numbers are in
    experiments/README.md).
    """
    return jax.lax.scan(
        lambda s, b: train_step(s, b, frozen, **kwargs), state, batches, unroll=unroll
    )


def _restore_target(exp: experiment.Experiment, mesh: jax.sharding.Mesh, use_ema: bool) -> dict:
    """The fields evaluation reads from a train state: the step and one parameter tree."""
    replicated = parallel.replicated(mesh)
    params = models.abstract_variables(exp.model, (1, *exp.example_shape))["params"]
    params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params
    )
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        "ema_params" if use_ema else "params": params,
    }


def restore_params(
    exp: experiment.Experiment,
    workdir: str,
    mesh: jax.sharding.Mesh,
    *,
    step: int | None = None,
    use_ema: bool | None = None,
) -> tuple[Any, int]:
    """(parameters, step) of a checkpoint of `workdir`, reading nothing else.

    Only the step and the EMA (or raw) parameters are read: the optimizer state is not, so
    evaluation does not depend on the optimizer settings of the run that trained the model.

    Args:
      exp: the experiment (its network gives the parameter shapes).
      workdir: the training run's directory.
      mesh: parameters are replicated over it.
      step: which checkpoint; default `exp.eval.ckpt_step` (-1: the newest of either kind).
      use_ema: EMA parameters (default `exp.eval.use_ema`) or the raw ones.

    Raises:
      FileNotFoundError: no checkpoint (of that step) in workdir.
    """
    step = exp.eval.ckpt_step if step is None else step
    use_ema = exp.eval.use_ema if use_ema is None else use_ema
    target = _restore_target(exp, mesh, use_ema)
    name = "ema_params" if use_ema else "params"
    ckpt = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        hint = f"train first (make train CONFIG=... WORKDIR={workdir})"
        restored = ckpt.restore_step(step, target, fields=True, hint=hint)
        return restored[0][name], restored[1]
    finally:
        ckpt.close()


def step_flops(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    state: Any,
    batch_shape: tuple[int, ...],
    batch_dtype: Any,
    frozen: Any = None,
    *,
    ema_rate: float = 0.999,
) -> float | None:
    """FLOPs of ONE training step on a global batch, by XLA's cost analysis (None if unknown).

    Counted on the lowered (unoptimised, unsharded) single step, so the number is the global
    work of a step whatever the loop around it: the cost analysis of `train_steps` counts the
    body of its rolled `lax.scan` once, not `n_jitted_steps` times. Tracing only, no compile.
    """

    def one(s: TrainState, b: Array, f: Any) -> Any:
        return train_step(s, b, f, loss_fn=loss_fn, tx=tx, schedule=schedule, ema_rate=ema_rate)

    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (state, frozen))
    batch = jax.ShapeDtypeStruct(batch_shape, batch_dtype)
    try:
        cost = jax.jit(one).lower(abstract[0], batch, abstract[1]).cost_analysis()
    except Exception:  # noqa: BLE001 (backends without cost analysis)
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


class _Logger:
    """Process-0 logging: text file, TensorBoard, progress bar."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, progress: bool):
        self.active = jax.process_index() == 0
        self.text = self.writer = self.bar = None
        if not self.active:
            return
        self.text = open(os.path.join(workdir, "train_log.txt"), "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # pragma: no cover
            self.writer = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def line(self, message: str, *, level: int = logging.INFO) -> None:
        if not self.active:
            return
        logger.log(level, message)
        self.text.write(message + "\n")
        self.text.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def progress(self, n: int, loss: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4g}", img_s=f"{images_per_s:.0f}")

    def close(self) -> None:
        for thing in (self.bar, self.writer, self.text):
            if thing is not None:
                thing.close()


@dataclasses.dataclass(frozen=True)
class Loop:
    """What `run_loop` trains: the score model (`train_and_evaluate`) and the dequantizer
    (`train_deq.train_dequantizer`) share the loop, its checkpoints and its pre-emption safety.

    Attributes:
      name: what is trained, for log lines ('score model', 'dequantizer').
      train: batch size, step count, checkpoint and log frequencies, EMA rate, seed.
      optim: the optimizer.
      dataset: train batches come from `dataset.train`, the EMA eval loss from `dataset.test`.
      init: (key, first global batch) -> fresh TrainState (the batch serves data-dependent
        initialisation; the score model ignores it).
      loss: the training loss (`LossFn`).
      to_bpd: turns a logged loss into bits/dim for the log (None: not a likelihood).
      describe: extra words for the start line (data set, config file).
      notes: lines for the log file only (e.g. the config keys ignored by name).
    """

    name: str
    train: TrainSettings
    optim: OptimizerSettings
    dataset: datasets.Dataset
    init: Callable[[Array, Array], TrainState]
    loss: LossFn
    to_bpd: Callable[[float], float] | None = None
    describe: str = ""
    notes: tuple[str, ...] = ()


def _host_batches(loop: Loop, first_step: int, mesh) -> Array:
    """The global batches of steps first_step .. first_step + n_jitted_steps - 1, sharded."""
    t = loop.train
    local = batches.train_batches(
        loop.dataset.train,
        seed=t.seed,
        first_step=first_step,
        num_steps=t.n_jitted_steps,
        global_batch_size=t.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return parallel.shard_batch(local, mesh, batch_axis=1)


def run_loop(loop: Loop, workdir: str, *, frozen: Any = None, progress: bool = True) -> TrainState:
    """Train `loop` in `workdir`, resuming from its newest complete checkpoint if there is one.

    The batch of step k is a pure function of (seed, k, process) and the randomness of step k
    is fold_in(state.key, k), so a resumed run continues bit for bit. `frozen` (replicated) is
    passed to the loss unchanged (the score model's parameters for the dequantizer).

    Raises:
      NonFiniteError: a non-finite loss or gradient norm, naming the step.
    """
    os.makedirs(workdir, exist_ok=True)
    t = loop.train
    n_jit = t.n_jitted_steps
    mesh = parallel.make_mesh()
    local_batch = parallel.per_process_batch_size(t.batch_size, mesh)
    replicated = parallel.replicated(mesh)
    frozen = jax.device_put(frozen, replicated)

    # the data-dependent init sees the first global batch (steps 0's), sharded like training's
    init = jax.jit(
        loop.init,
        in_shardings=(replicated, parallel.data_sharding(mesh)),
        out_shardings=replicated,
    )  # sharded from creation
    root_key = jax.random.key(t.seed)
    first = jax.ShapeDtypeStruct(
        (t.batch_size, *loop.dataset.example_shape), loop.dataset.train.dtype
    )
    abstract = jax.eval_shape(loop.init, root_key, first)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )

    ckpt = checkpoint.Checkpointer(
        workdir, snapshot_freq=t.snapshot_freq, preemption_freq=t.snapshot_freq_for_preemption
    )
    restored = ckpt.restore_latest(abstract)
    if restored is None:
        first_batch = batches.train_batch(
            loop.dataset.train,
            seed=t.seed,
            step=0,
            global_batch_size=t.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        state, step = init(root_key, parallel.shard_batch(first_batch, mesh)), 0
    else:
        state, step = restored
    if step % n_jit:
        raise ValueError(f"checkpoint step {step} is not a multiple of n_jitted_steps={n_jit}")

    tx, schedule = make_optimizer(loop.optim)
    step_fn = jax.jit(
        lambda s, b, f: train_steps(
            s, b, f, loss_fn=loop.loss, tx=tx, schedule=schedule, ema_rate=t.ema_rate
        ),
        in_shardings=(replicated, parallel.data_sharding(mesh, batch_axis=1), replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        lambda p, f, b, k: jnp.mean(loop.loss(p, f, b, k, False)),
        in_shardings=(replicated, replicated, parallel.data_sharding(mesh), replicated),
        out_shardings=replicated,
    )

    total = int(math.ceil(t.n_iters / n_jit) * n_jit)
    log = _Logger(workdir, total, step, progress)
    log.line(
        f"start {loop.name} step={step} total={total} devices={jax.device_count()} "
        f"processes={jax.process_count()} global_batch={t.batch_size} local_batch={local_batch} "
        + loop.describe
    )
    for note in loop.notes:
        log.line(note, level=logging.DEBUG)
    compiled = None
    flops = step_flops(
        loop.loss,
        tx,
        schedule,
        state,
        (t.batch_size, *loop.dataset.example_shape),
        loop.dataset.train.dtype,
        frozen,
        ema_rate=t.ema_rate,
    )
    last_time, last_step = time.perf_counter(), step
    interval_loss, interval_var = [], []  # every step's since the last log line
    try:
        with checkpoint.PreemptionGuard() as guard:
            while step < total:
                host = _host_batches(loop, step, mesh)
                if compiled is None:
                    compiled = step_fn.lower(state, host, frozen).compile()
                state, metrics = compiled(state, host, frozen)
                metrics = jax.device_get(metrics)
                finite = np.isfinite(metrics["loss"]) & np.isfinite(metrics["grad_norm"])
                if not finite.all():
                    bad = step + int(np.argmin(finite)) + 1
                    raise NonFiniteError(
                        f"non-finite loss or gradient norm at step {bad} (loss="
                        f"{metrics['loss'].tolist()}, grad_norm={metrics['grad_norm'].tolist()}); "
                        f"the newest checkpoint in {workdir} is untouched"
                    )
                step += n_jit
                interval_loss.extend(np.asarray(metrics["loss"]).tolist())
                interval_var.extend(np.asarray(metrics["loss_var"]).tolist())

                if step % t.log_freq == 0 or step == total:
                    now = time.perf_counter()
                    dt = max(now - last_time, 1e-9)
                    images_per_s = (step - last_step) * t.batch_size / dt
                    values = {
                        "loss": float(metrics["loss"][-1]),
                        "grad_norm": float(metrics["grad_norm"][-1]),
                        "lr": float(metrics["lr"][-1]),
                        "images_per_s": images_per_s,
                        # means over the steps since the last line: the loss and the variance of
                        # the per-example losses across each step's batch
                        "loss_mean": float(np.mean(interval_loss)),
                        "loss_var": float(np.mean(interval_var)),
                    }
                    interval_loss, interval_var = [], []
                    if loop.to_bpd is not None:
                        values["bpd"] = loop.to_bpd(values["loss_mean"])  # the interval's
                    if flops is not None:
                        values["flops_per_s"] = flops * (step - last_step) / dt
                    log.scalars(step, values)
                    log.line(
                        f"step={step} " + " ".join(f"{k}={v:.6g}" for k, v in values.items()),
                        level=logging.DEBUG,  # the progress bar shows it; the log file keeps it
                    )
                    log.progress(step - last_step, values["loss"], images_per_s)
                    last_time, last_step = now, step
                if step % t.eval_freq == 0 and loop.dataset.test.shape[0] >= t.batch_size:
                    test = batches.train_batch(
                        loop.dataset.test,
                        seed=t.seed + 1,
                        step=step // t.eval_freq,
                        global_batch_size=t.batch_size,
                        process_index=jax.process_index(),
                        process_count=jax.process_count(),
                    )
                    eval_key = jax.random.fold_in(jax.random.key(t.seed + 1), step)
                    eval_loss = float(
                        eval_fn(
                            state.ema_params, frozen, parallel.shard_batch(test, mesh), eval_key
                        )
                    )
                    log.scalars(step, {"eval_loss_ema": eval_loss})
                    if loop.to_bpd is not None:
                        log.scalars(step, {"eval_bpd_ema": loop.to_bpd(eval_loss)})
                ckpt.maybe_save(step, state)
                if guard.requested_by_any_process():
                    log.line(f"pre-emption requested: saving step {step} and stopping")
                    break
        ckpt.maybe_save(step, state, force=True)
        log.line(f"stop {loop.name} step={step}")
    finally:
        ckpt.close()
        log.close()
    return state


def train_and_evaluate(
    exp: experiment.Experiment, workdir: str, *, progress: bool = True
) -> TrainState:
    """Train the score model of `exp` in `workdir`, resuming from its newest complete checkpoint.

    Args:
      exp: the experiment (`experiment.from_config(config)`); its `train` and `optim` settings
        drive the loop.
      workdir: stable directory for checkpoints and logs; the same directory resumes.
      progress: show a progress bar on process 0.

    Returns:
      The final train state (replicated over the mesh).

    Raises:
      NonFiniteError: a non-finite loss or gradient norm, naming the step.
    """
    tx, _ = make_optimizer(exp.optim)
    loop = Loop(
        name="score model",
        train=exp.train,
        optim=exp.optim,
        dataset=exp.dataset,
        init=lambda key, batch: init_state(exp, tx, key),
        loss=score_loss(exp),
        describe=f"data={exp.dataset!r} config={exp.source}",
        notes=("config keys ignored by name: " + "; ".join(exp.ignored),) if exp.ignored else (),
    )
    return run_loop(loop, workdir, progress=progress)
