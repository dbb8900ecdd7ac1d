"""Mesh, shardings and multi-host start-up for data-parallel training.

The whole project is data parallel over one mesh axis called ``'data'`` that spans every device of
every process: parameters, optimizer state and EMA parameters are replicated
(:func:`replicated`), batches are split along their batch axis (:func:`data_sharding`). There is
no ``pmap`` and no ``with mesh:``; shardings are passed explicitly to ``jax.jit``
(``in_shardings``/``out_shardings``) or carried by the arrays themselves.

Typical start-up (every process runs the same program)::

    parallel.initialize_distributed()          # before any other JAX call; no-op for one process
    mesh = parallel.make_mesh()                # 1-D, axis 'data', all devices of all processes
    local_bs = parallel.per_process_batch_size(config.training.batch_size, mesh)
    ...
    batch = parallel.shard_batch(local_numpy_batch, mesh)  # [local_bs, ...] -> global [B, ...]
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
"""Name of the single mesh axis; batches are split along it, parameters are replicated over it."""

COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"


def _int_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> None:
    """Starts the JAX distributed runtime when this program is one of several processes.

    Must be called before any other JAX call (anything that touches devices). Each argument left
    as ``None`` is read from an environment variable:

    - ``coordinator_address`` from ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0),
    - ``num_processes`` from ``JAX_NUM_PROCESSES``,
    - ``process_id`` from ``JAX_PROCESS_ID``.

    Then:

    - ``num_processes == 1``: nothing happens (single process, no coordinator).
    - some of the three are known: ``jax.distributed.initialize`` is called with them; JAX's own
      cluster detection fills in the rest where it can (e.g. the process id under SLURM).
    - none is known: ``jax.distributed.initialize()`` runs JAX's auto-detection (SLURM, Open MPI,
      Cloud TPU, ...). If it finds no cluster the program runs as a single process.

    On CPU, cross-process collectives use gloo: ``jax_cpu_collectives_implementation`` is set to
    ``'gloo'`` when it is unset (JAX >= 0.5 already defaults to gloo). It only affects the CPU
    backend, so it is harmless on GPU/TPU hosts.

    Calling it again after a successful initialisation is a no-op.

    Args:
      coordinator_address: ``host:port`` where process 0 runs the coordinator service.
      num_processes: total number of processes in the job.
      process_id: this process's index in ``[0, num_processes)``.
      initialization_timeout: seconds to wait for all processes to connect before failing.

    Raises:
      RuntimeError: if JAX's backend was already initialised by an earlier JAX call.
      ValueError: if an environment variable is not an integer, or JAX rejects the arguments.
    """
    if jax.distributed.is_initialized():
        logging.info("jax.distributed is already initialised; nothing to do.")
        return
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ADDRESS_ENV) or None
    if num_processes is None:
        num_processes = _int_from_env(NUM_PROCESSES_ENV)
    if process_id is None:
        process_id = _int_from_env(PROCESS_ID_ENV)

    if num_processes == 1:
        logging.info("num_processes=1: running as a single process.")
        return

    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")

    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=initialization_timeout,
        )
    except ValueError:
        if explicit:
            raise
        # JAX's auto-detection found no cluster environment (no SLURM, MPI, TPU pod, ...):
        # it raises before touching any state, so running as one process is safe.
        logging.info("No multi-process environment detected: running as a single process.")
        return
    logging.info(
        "jax.distributed initialised: process %d of %d.",
        jax.process_index(),
        jax.process_count(),
    )


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis name ``'data'``.

    The axis type is ``Auto`` (sharding propagated by the compiler from the shardings of the
    inputs), not JAX's new default ``Explicit``: the model and loss code is written for plain
    data parallelism and need not annotate shardings of intermediate values.
    """
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def data_sharding(mesh: Mesh, *, batch_axis: int = 0) -> NamedSharding:
    """Sharding that splits axis ``batch_axis`` over the ``'data'`` mesh axis.

    ``batch_axis=0`` gives ``PartitionSpec('data')`` for ``[B, ...]`` batches; ``batch_axis=1``
    gives ``PartitionSpec(None, 'data')`` for ``[n_steps, B, ...]`` stacks of batches consumed by
    a ``lax.scan`` of ``n_steps`` training steps. Other axes are not split.
    """
    if batch_axis < 0:
        raise ValueError(f"batch_axis must be non-negative, got {batch_axis}")
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of ``mesh`` (parameters, optimizer state)."""
    return NamedSharding(mesh, PartitionSpec())


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Rows of each global batch that this process loads (``global_batch_size / process_count``).

    Raises:
      ValueError: if ``global_batch_size`` is not a positive multiple of the mesh's device count
        (which every process needs for an equal share per device).
    """
    num_devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the number of "
            f"devices ({num_devices})."
        )
    return global_batch_size // jax.process_count()


def shard_batch(local_batch: Any, mesh: Mesh, *, batch_axis: int = 0) -> Any:
    """Assembles each process's slice of the global batch into global ``jax.Array``s.

    Every process calls this with its own rows (same shapes on every process); process ``p``'s
    rows become rows ``[p * local_B, (p + 1) * local_B)`` of the global batch (the devices of a
    process are contiguous along the ``'data'`` axis of :func:`make_mesh`'s mesh).

    Args:
      local_batch: a pytree of numpy (or jax) arrays of shape ``[local_B, ...]`` when
        ``batch_axis=0``, or ``[n_steps, local_B, ...]`` when ``batch_axis=1``.
      mesh: the mesh from :func:`make_mesh`.
      batch_axis: the axis that holds the batch.

    Returns:
      The same pytree of global arrays, axis ``batch_axis`` of size ``local_B * process_count``,
      sharded with :func:`data_sharding` (``batch_axis``).

    Raises:
      ValueError: if the global batch size is not divisible by the number of devices.
    """
    sharding = data_sharding(mesh, batch_axis=batch_axis)
    num_processes = jax.process_count()
    num_devices = mesh.devices.size

    def to_global(path: Any, x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim <= batch_axis:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path) or '<root>'} has shape {x.shape}: no "
                f"batch axis {batch_axis}"
            )
        local_b = x.shape[batch_axis]
        global_b = local_b * num_processes
        if global_b % num_devices:
            raise ValueError(
                f"global batch size {global_b} ({local_b} per process x {num_processes} "
                f"processes) of leaf {jax.tree_util.keystr(path) or '<root>'} is not divisible "
                f"by the number of devices ({num_devices}); use a global batch size that is a "
                f"multiple of {num_devices}."
            )
        global_shape = x.shape[:batch_axis] + (global_b,) + x.shape[batch_axis + 1 :]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(to_global, local_batch)
