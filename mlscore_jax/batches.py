"""Deterministic host batches: pure functions of (seed, step, process).

`train_batch`, `train_batches` (n consecutive steps stacked, for `n_jitted_steps`) and
`eval_batches` (the whole split in a fixed order, the last batch padded, with a mask). No tf.data
in the training loop; the batch of step k is the same after a restart and is split disjointly
over processes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np


def _read_only(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)
    return x


def _check_processes(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index ({process_index}) < process_count ({process_count})"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by process_count "
            f"{process_count}"
        )
    return global_batch_size // process_count


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the examples in one epoch: int64 [num_examples], read-only."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return _read_only(perm)


def train_indices(
    num_examples: int,
    *,
    seed: int,
    first_step: int,
    num_steps: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Which examples this process trains on at steps first_step .. first_step + num_steps - 1.

    The training stream is a sequence of epochs, each a permutation of the N examples drawn by
    `np.random.default_rng([seed, epoch])`. Example j (0 <= j < global_batch_size) of the global
    batch at `step` is stream position g = step * global_batch_size + j: epoch g // N, position
    g % N in that epoch's permutation. Batches run across epoch boundaries without dropping or
    repeating anything, so every example is seen once per epoch. Process p takes the contiguous
    slice j in [p * B_local, (p + 1) * B_local) with B_local = global_batch_size / process_count.

    Returns:
      int64 [num_steps, B_local], indices into the training array.
    """
    local = _check_processes(global_batch_size, process_index, process_count)
    if num_examples <= 0:
        raise ValueError("no training examples")
    if seed < 0 or first_step < 0 or num_steps < 0:
        raise ValueError(
            f"seed, first_step and num_steps must be >= 0, got {seed}, {first_step}, {num_steps}"
        )
    steps = first_step + np.arange(num_steps, dtype=np.int64)
    offsets = process_index * local + np.arange(local, dtype=np.int64)
    stream = steps[:, None] * global_batch_size + offsets[None, :]  # [num_steps, B_local]
    epoch, position = np.divmod(stream, num_examples)
    out = np.empty_like(stream)
    for e in np.unique(epoch):
        in_e = epoch == e
        out[in_e] = _epoch_permutation(int(seed), int(e), int(num_examples))[position[in_e]]
    return out


def train_batches(
    images: np.ndarray,
    *,
    seed: int,
    first_step: int,
    num_steps: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This process's training batches for `num_steps` consecutive steps, stacked.

    A pure function of its arguments (see `train_indices`): a run resumed at step k gets
    exactly the batches it would have got, and the processes' slices of one global batch are
    disjoint and together make up the 1-process global batch.

    Args:
      images: [N, ...] training array (uint8 [N, H, W, C] or float32 [N, 2]; may be a memmap).
      seed: data seed (>= 0).
      first_step: the first training step (0-based).
      num_steps: how many consecutive steps (e.g. n_jitted_steps fused per dispatch).
      global_batch_size: batch size summed over processes.
      process_index, process_count: this process and how many there are.

    Returns:
      [num_steps, global_batch_size // process_count, ...], same dtype as images.
    """
    idx = train_indices(
        len(images),
        seed=seed,
        first_step=first_step,
        num_steps=num_steps,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return np.take(images, idx.reshape(-1), axis=0).reshape(*idx.shape, *images.shape[1:])


def train_batch(
    images: np.ndarray,
    *,
    seed: int,
    step: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This process's training batch at `step`: [global_batch_size // process_count, ...].

    Same as `train_batches(..., first_step=step, num_steps=1)[0]`.
    """
    return train_batches(
        images,
        seed=seed,
        first_step=step,
        num_steps=1,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )[0]


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Number of (global) evaluation batches covering num_examples: ceil(N / batch_size)."""
    return -(-num_examples // batch_size)


def eval_batches(
    images: np.ndarray,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The whole split in its stored order, in fixed-shape batches with a validity mask.

    Global batch b holds examples [b * batch_size, (b + 1) * batch_size); process p gets the
    contiguous slice of B_local = batch_size / process_count rows starting at
    b * batch_size + p * B_local. Rows past the end are zero padding with mask False, so every
    example is counted exactly once (the official code dropped the last partial batch: 784 of
    the 10 000 CIFAR-10 test images at batch size 1024). Every process yields the same number
    of batches, `num_eval_batches(N, batch_size)`.

    Args:
      images: [N, ...] split (e.g. `Dataset.test`).
      batch_size: global evaluation batch size.
      process_index, process_count: this process and how many there are.

    Yields:
      (batch [B_local, ...] same dtype as images, mask bool [B_local]).
    """
    local = _check_processes(batch_size, process_index, process_count)
    num = len(images)
    for b in range(num_eval_batches(num, batch_size)):
        start = b * batch_size + process_index * local
        stop = min(start + local, num)
        valid = max(stop - start, 0)
        batch = np.zeros((local, *images.shape[1:]), images.dtype)
        batch[:valid] = images[start : start + valid]
        yield batch, np.arange(local) < valid
