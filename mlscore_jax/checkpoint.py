"""Checkpoints of the training state; the only module in the project that talks to orbax.

Layout under a stable ``workdir`` (the official score_flow layout, directories named by step)::

    workdir/checkpoints/<step>/        snapshots, every ``snapshot_freq`` steps, kept forever
                                       (what evaluation reads)
    workdir/checkpoints-meta/<step>/   pre-emption checkpoints, every ``preemption_freq`` steps
                                       and on request (SIGTERM, end of training), kept 1 deep
    workdir/checkpoints-damaged/       damaged checkpoints moved out of the way on resume

Unlike score_flow (``checkpoints/checkpoint_{step // snapshot_freq}``) directories are named by
training step, so snapshot ``k`` of the paper is ``checkpoints/{k * snapshot_freq}``.

Each step directory holds two orbax items: ``state`` (the pytree, orbax ``StandardSave``: OCDBT +
zarr via tensorstore) and ``integrity`` (JSON: per leaf its path, shape, dtype, PRNG
implementation for typed keys, and a 32-bit fingerprint of its bits).

Guarantees:

- **Atomic**: orbax writes into ``<step>.orbax-checkpoint-tmp-<time>/`` and renames it to
  ``<step>/`` once every process has finished (on GCS it writes ``commit_success.txt`` instead).
  Unfinished directories are never listed as checkpoints; a writer removes leftovers when it starts.
- **Damage is detected**: restoring re-computes every leaf's fingerprint and compares it with the
  one recorded at save time, so missing, truncated or bit-flipped files are all caught, including
  damage orbax itself reads without complaint. ``restore_latest`` skips a damaged checkpoint with
  a ``logging.warning`` naming its directory and uses the next older one.
- **Nothing non-finite is written**: ``maybe_save`` raises :class:`NonFiniteStateError` naming
  the step and the leaves if a floating leaf holds a NaN or an infinity.
- **Typed PRNG keys** (``jax.random.key``) are stored as ``jax.random.key_data`` (uint32) plus
  the implementation's name, and re-wrapped on restore into the dtype the target asks for.
- **Sharded restore**: the caller passes an abstract target (``jax.ShapeDtypeStruct`` with
  ``sharding``, e.g. ``replicated(mesh)``, or concrete arrays); arrays come back with those
  shardings.
- **Multi-host**: every process calls every method (``maybe_save``, ``restore*``); orbax
  coordinates the writing, the ``integrity`` JSON is written by process 0 only, and processes
  agree on whether a restore succeeded before going on.

Usage in a training loop::

    ckpt = Checkpointer(workdir, snapshot_freq=50_000, preemption_freq=10_000)
    abstract = jax.eval_shape(init_fn, ...)  # with shardings, e.g. via out_shardings
    restored = ckpt.restore_latest(abstract)
    state, step = restored if restored is not None else (init_state(), 0)
    with PreemptionGuard() as guard:
        while step < num_steps:
            state = train_step(state, ...); step += 1
            ckpt.maybe_save(step, state)
            if guard.requested_by_any_process():
                ckpt.maybe_save(step, state, force=True)
                break
    ckpt.maybe_save(step, state, force=True)
    ckpt.close()  # waits for asynchronous writes

Evaluation, possibly while training runs: ``Checkpointer(workdir, read_only=True)``, then
``snapshot_steps()`` and ``restore(step, {'step': ..., 'ema_params': ...}, fields=True)``: only
the fields it needs are read, so the optimizer state (whose structure depends on the optimizer
settings) is neither read nor needs a matching target.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

Kind = Literal["snapshot", "preemption"]
SNAPSHOT_DIR = "checkpoints"
PREEMPTION_DIR = "checkpoints-meta"
DAMAGED_DIR = "checkpoints-damaged"
_DIRS: dict[str, str] = {"snapshot": SNAPSHOT_DIR, "preemption": PREEMPTION_DIR}
_STATE_ITEM = "state"
_INTEGRITY_ITEM = "integrity"
_FORMAT_VERSION = 1
# Suffix orbax gives to directories that are still being written (atomicity_types.TMP_DIR_SUFFIX).
_TMP_DIR_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, damaged, or no usable checkpoint among several."""


class DamagedCheckpointError(CheckpointError):
    """A finalized checkpoint's files are missing or do not match what was written."""


class StateMismatchError(ValueError):
    """The restore target's tree, shapes or dtypes differ from what the checkpoint holds."""


class NonFiniteStateError(ValueError):
    """``save`` refused a state holding NaN or infinity."""


# ---------------------------------------------------------------------------------------------
# Leaf helpers


def _is_key(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32 words, same leading shape (one extra axis for 64-bit/complex)."""
    if _is_key(x):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    itemsize = x.dtype.itemsize
    if itemsize in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if itemsize == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"cannot checkpoint dtype {x.dtype}")


def _fingerprint(x: jax.Array) -> jax.Array:
    """``sum_i word_i * (2 i + 1) mod 2**32`` over the row-major flat index ``i``.

    Integer sums wrap exactly, so the value does not depend on sharding or reduction order; any
    single flipped bit changes it (an odd factor times a power of two is non-zero mod 2**32), and
    so do most permutations. The index is built from iotas, so sharded arrays are not reshaped.
    """
    words = _leaf_words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * np.uint32(stride % 2**32)
        stride *= words.shape[axis]
    return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


def _all_finite(x: jax.Array) -> jax.Array:
    if _is_key(x) or not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.bool_(True)
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _inspect(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per leaf: all-finite flag [n] and fingerprint [n], in one program."""
    finite = jnp.stack([_all_finite(x) for x in leaves])
    prints = jnp.stack([_fingerprint(x) for x in leaves])
    return finite, prints


def _inspect_tree(leaves: list[jax.Array]) -> tuple[np.ndarray, np.ndarray]:
    if not leaves:
        return np.zeros(0, bool), np.zeros(0, np.uint32)
    finite, prints = _inspect(leaves)
    return np.asarray(finite), np.asarray(prints)


def _key_impl_name(x: Any) -> str | None:
    return str(jax.random.key_impl(x)) if _is_key(x) else None


def _record_path(path: tuple, fields: bool) -> str:
    """The integrity record's name of a leaf: ``keystr`` of its path in the saved state.

    With ``fields`` the target is ``{field: subtree}`` of a saved dataclass state, whose leaves
    were recorded as ``.field[...]``.
    """
    if fields:
        head, *rest = path
        return f".{head.key}" + jax.tree_util.keystr(tuple(rest))
    return jax.tree_util.keystr(path) or "<root>"


def _check_leaves(tree: Any, what: str, fields: bool = False) -> tuple[list[str], list[Any], Any]:
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [_record_path(p, fields) for p, _ in paths_leaves]
    leaves = [x for _, x in paths_leaves]
    for path, x in zip(paths, leaves, strict=True):
        if not isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct):
            raise TypeError(
                f"{what} leaf {path} is a {type(x).__name__}; checkpointed states must hold "
                "only jax/numpy arrays (wrap Python scalars with jnp.asarray)."
            )
    return paths, leaves, treedef


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        if jax.process_count() > 1:
            raise ValueError(
                "restore target leaves need a sharding in a multi-process run; build the target "
                "with jax.ShapeDtypeStruct(shape, dtype, sharding=...)."
            )
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _storage_abstract(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """Typed key targets become their uint32 key data, same sharding (trailing axes unsplit)."""
    if not _is_key(x):
        return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)


# ---------------------------------------------------------------------------------------------
# Checkpointer


class Checkpointer:
    """Periodic snapshots and pre-emption checkpoints of a training-state pytree.

    See the module docstring for the directory layout and the guarantees.

    Args:
      workdir: the run's stable working directory (local path or a URL orbax understands).
      snapshot_freq: write ``checkpoints/<step>`` when ``step`` is a positive multiple of it;
        ``None`` for never. Snapshots are never deleted.
      preemption_freq: write ``checkpoints-meta/<step>`` when ``step`` is a positive multiple
        of it (and no snapshot is written at that step); ``None`` for never. Only the newest is
        kept.
      async_save: write in background threads; ``maybe_save`` returns once the arrays are
        copied to host memory, so the caller may donate or overwrite them. Call
        :meth:`wait_until_finished` or :meth:`close` before exiting.
      read_only: open for reading (evaluation): saving raises, nothing is created, cleaned or
        moved, and step lists are re-read from disk on every call so checkpoints written by a
        running training job appear.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        snapshot_freq: int | None = None,
        preemption_freq: int | None = None,
        async_save: bool = False,
        read_only: bool = False,
    ) -> None:
        for name, freq in (("snapshot_freq", snapshot_freq), ("preemption_freq", preemption_freq)):
            if freq is not None and (not isinstance(freq, int) or freq <= 0):
                raise ValueError(f"{name} must be a positive int or None, got {freq!r}")
        workdir = os.fspath(workdir)
        if "://" not in workdir:  # orbax wants absolute local paths; URLs stay as they are
            workdir = os.path.abspath(workdir)
        self.workdir = str(epath.Path(workdir))
        self.snapshot_freq = snapshot_freq
        self.preemption_freq = preemption_freq
        self.read_only = read_only
        self._async_save = async_save
        self._managers: dict[str, ocp.CheckpointManager] = {}
        if not read_only:
            for kind in _DIRS:
                for tmp in self._unfinished_dirs(kind):
                    logging.warning("Removing unfinished checkpoint directory %s", tmp)
                self._manager(kind)  # creates the directory and removes unfinished writes

    # -- paths and managers --------------------------------------------------------------------

    def directory(self, kind: Kind = "snapshot") -> str:
        """The directory that holds checkpoints of ``kind`` ('snapshot' or 'preemption')."""
        if kind not in _DIRS:
            raise ValueError(f"kind must be 'snapshot' or 'preemption', got {kind!r}")
        return str(epath.Path(self.workdir) / _DIRS[kind])

    def step_directory(self, step: int, kind: Kind = "snapshot") -> str:
        """The directory of the checkpoint of ``kind`` at ``step`` (it may not exist)."""
        return str(epath.Path(self.directory(kind)) / str(step))

    def _manager(self, kind: Kind) -> ocp.CheckpointManager | None:
        manager = self._managers.get(kind)
        if manager is None:
            directory = self.directory(kind)
            if self.read_only and not epath.Path(directory).is_dir():
                return None  # nothing written yet; look again next time
            if kind == "snapshot":
                policy = ocp.checkpoint_managers.LatestN(n=None)  # keep all
            else:
                policy = ocp.checkpoint_managers.LatestN(n=1)
            options = ocp.CheckpointManagerOptions(
                enable_async_checkpointing=self._async_save,
                read_only=self.read_only,
                create=not self.read_only,
                cleanup_tmp_directories=not self.read_only,
                preservation_policy=policy,
            )
            manager = ocp.CheckpointManager(
                directory, item_names=(_STATE_ITEM, _INTEGRITY_ITEM), options=options
            )
            self._managers[kind] = manager
        elif self.read_only:
            manager.reload()
        return manager

    def _unfinished_dirs(self, kind: Kind) -> list[str]:
        directory = epath.Path(self.directory(kind))
        if not directory.is_dir():
            return []
        return sorted(str(path) for path in directory.iterdir() if _TMP_DIR_MARKER in path.name)

    def steps(self, kind: Kind = "snapshot") -> list[int]:
        """Steps of the complete (finalized) checkpoints of ``kind``, ascending."""
        manager = self._manager(kind)
        return sorted(manager.all_steps()) if manager is not None else []

    def snapshot_steps(self) -> list[int]:
        """Steps of the complete snapshots, ascending (what evaluation iterates over)."""
        return self.steps("snapshot")

    # -- saving --------------------------------------------------------------------------------

    def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Saves ``state`` as the checkpoint of ``step`` if the step calls for one.

        A snapshot is written when ``step`` is a positive multiple of ``snapshot_freq``;
        otherwise a pre-emption checkpoint is written when ``step`` is a positive multiple of
        ``preemption_freq`` or ``force`` is set (on SIGTERM, at the end of training). A step that
        already has a checkpoint of that kind is not written again. Every process must call it.

        Args:
          step: the number of training steps ``state`` has taken.
          state: a pytree of jax/numpy arrays (typed PRNG keys allowed).
          force: write a pre-emption checkpoint even off the schedule.

        Returns:
          Whether a checkpoint was written (or, with ``async_save``, started).

        Raises:
          NonFiniteStateError: a floating leaf holds NaN or infinity; nothing is written.
        """
        if self.read_only:
            raise CheckpointError(f"Checkpointer for {self.workdir} is read-only")
        step = int(step)
        if step > 0 and self.snapshot_freq and step % self.snapshot_freq == 0:
            kind: Kind = "snapshot"
        elif force or (step > 0 and self.preemption_freq and step % self.preemption_freq == 0):
            kind = "preemption"
        else:
            return False
        return self.save(step, state, kind=kind)

    def save(self, step: int, state: Any, *, kind: Kind = "snapshot") -> bool:
        """Saves ``state`` as the checkpoint of ``kind`` at ``step``, whatever the schedule
        (e.g. a converted checkpoint at its source step). ``maybe_save`` decides when to call it.

        Returns:
          Whether a checkpoint was written (False: one of that kind and step exists already).

        Raises:
          NonFiniteStateError: a floating leaf holds NaN or infinity; nothing is written.
        """
        if self.read_only:
            raise CheckpointError(f"Checkpointer for {self.workdir} is read-only")
        step = int(step)
        manager = self._manager(kind)
        assert manager is not None  # writable checkpointers always have managers
        if step in manager.all_steps():
            logging.info("A %s checkpoint of step %d exists already; not saving.", kind, step)
            return False

        paths, leaves, _ = _check_leaves(state, "state")
        finite, prints = _inspect_tree(leaves)
        if not finite.all():
            bad = [p for p, ok in zip(paths, finite, strict=True) if not ok]
            raise NonFiniteStateError(
                f"refusing to checkpoint step {step}: non-finite values in {len(bad)} leaves: "
                + ", ".join(bad[:10])
                + (" ..." if len(bad) > 10 else "")
            )
        integrity = {
            "format": _FORMAT_VERSION,
            "step": step,
            "leaves": {
                path: {
                    "shape": list(x.shape),
                    "dtype": str(x.dtype),
                    "key_impl": _key_impl_name(x),
                    "fingerprint": int(fp),
                }
                for path, x, fp in zip(paths, leaves, prints, strict=True)
            },
        }
        stored = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)
        manager.save(
            step,
            args=ocp.args.Composite(
                **{
                    _STATE_ITEM: ocp.args.StandardSave(stored),
                    _INTEGRITY_ITEM: ocp.args.JsonSave(integrity),
                }
            ),
            force=True,
        )
        logging.info("Saved %s checkpoint %s", kind, self.step_directory(step, kind))
        return True

    def wait_until_finished(self) -> None:
        """Blocks until every asynchronous write has been finalized (no-op when synchronous)."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending writes and releases orbax's resources."""
        for manager in self._managers.values():
            manager.close()
        self._managers.clear()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- restoring -----------------------------------------------------------------------------

    def restore(
        self, step: int, abstract_state: Any, *, kind: Kind = "snapshot", fields: bool = False
    ) -> Any:
        """Restores the checkpoint of ``kind`` at ``step`` into ``abstract_state``'s layout.

        Args:
          step: a step listed by :meth:`steps` (:meth:`snapshot_steps` for snapshots).
          abstract_state: a pytree of ``jax.ShapeDtypeStruct`` (or arrays) with the same
            structure, shapes and dtypes as the saved state; each leaf's ``sharding`` says where
            the restored array goes. Leaves without one go to the first device (one process only).
          kind: 'snapshot' or 'preemption'.
          fields: restore only some top-level fields of the saved state: ``abstract_state`` is
            then a dict ``{field name: target subtree}`` (e.g. ``{'step': ..., 'ema_params':
            ...}`` of a train state) and only those leaves are read and verified; the rest of
            the checkpoint (e.g. the optimizer state) may have any structure.

        Returns:
          The restored state (a dict of the fields, with ``fields``), bit-identical to what was
          saved, with the requested shardings.

        Raises:
          CheckpointError: no complete checkpoint of ``kind`` at ``step``.
          DamagedCheckpointError: the checkpoint's files are missing or damaged.
          StateMismatchError: the target's tree, shapes or dtypes differ from the checkpoint's.
        """
        step = int(step)
        available = self.steps(kind)
        if step not in available:
            raise CheckpointError(
                f"no complete {kind} checkpoint of step {step} in {self.directory(kind)} "
                f"(complete: {available})"
            )
        return self._restore_verified(kind, step, abstract_state, fields)

    def restore_step(
        self,
        step: int,
        abstract_state: Any,
        *,
        fields: bool = False,
        what: str = "",
        hint: str = "",
    ) -> tuple[Any, int]:
        """``(state, step)`` of the checkpoint a user asks for by step: ``step < 0`` is the
        newest usable one (:meth:`restore_latest`); otherwise the snapshot of that step, else
        the pre-emption checkpoint of that step.

        Raises:
          FileNotFoundError: no such checkpoint: "no {what}checkpoint in ...: {hint}", or the
            steps there are when a step was asked for.
          Otherwise as :meth:`restore`.
        """
        if step < 0:
            restored = self.restore_latest(abstract_state, fields=fields)
            if restored is None:
                raise FileNotFoundError(f"no {what}checkpoint in {self.workdir}: {hint}")
            return restored
        for kind in ("snapshot", "preemption"):
            if step in self.steps(kind):  # type: ignore[arg-type]
                return self.restore(step, abstract_state, kind=kind, fields=fields), step
        raise FileNotFoundError(
            f"no {what}checkpoint of step {step} in {self.workdir}; snapshots: "
            f"{self.snapshot_steps()}, pre-emption: {self.steps('preemption')}"
        )

    def restore_latest(
        self, abstract_state: Any, *, fields: bool = False
    ) -> tuple[Any, int] | None:
        """Restores the newest usable checkpoint among snapshots and pre-emption checkpoints.

        Damaged checkpoints are skipped with a ``logging.warning`` naming their directory; when
        an older checkpoint is usable and this checkpointer is writable they are moved to
        ``workdir/checkpoints-damaged/`` so their steps can be written again. Unfinished
        (temporary) directories are ignored with a warning.

        Args:
          abstract_state, fields: as for :meth:`restore`.

        Returns:
          ``(state, step)``, or ``None`` when there is no checkpoint at all.

        Raises:
          CheckpointError: checkpoints exist but every one of them is damaged.
          StateMismatchError: the target does not match the checkpoint's tree, shapes or dtypes.
        """
        candidates: list[tuple[int, int, Kind]] = []
        for rank, kind in enumerate(("preemption", "snapshot")):  # snapshot first on a tie
            for tmp in self._unfinished_dirs(kind):
                logging.warning("Ignoring unfinished checkpoint directory %s", tmp)
            candidates.extend((step, rank, kind) for step in self.steps(kind))
        candidates.sort(reverse=True)
        damaged: list[tuple[Kind, int, str]] = []
        for step, _, kind in candidates:
            try:
                state = self._restore_verified(kind, step, abstract_state, fields)
            except DamagedCheckpointError as e:
                logging.warning("Skipping damaged checkpoint %s", e)
                damaged.append((kind, step, str(e)))
                continue
            if damaged:
                logging.warning(
                    "Resuming from older checkpoint %s", self.step_directory(step, kind)
                )
                # Only once a usable checkpoint is found: if none is, a restarted job must fail
                # again rather than silently start from scratch.
                for bad_kind, bad_step, _ in damaged:
                    self._quarantine(bad_kind, bad_step)
            return state, step
        if damaged:
            raise CheckpointError(
                f"all {len(damaged)} checkpoints under {self.workdir} are damaged:\n"
                + "\n".join(reason for _, _, reason in damaged)
            )
        return None

    def _restore_verified(
        self, kind: Kind, step: int, abstract_state: Any, fields: bool = False
    ) -> Any:
        manager = self._manager(kind)
        assert manager is not None
        where = self.step_directory(step, kind)
        if fields and not isinstance(abstract_state, dict):
            raise TypeError("with fields=True the restore target is a dict {field: subtree}")
        paths, leaves, treedef = _check_leaves(abstract_state, "restore target", fields)
        target = [_abstract_leaf(x) for x in leaves]

        error: BaseException | None = None
        restored: list[Any] = []
        record: dict[str, Any] = {}
        try:
            record = manager.restore(
                step, args=ocp.args.Composite(**{_INTEGRITY_ITEM: ocp.args.JsonRestore()})
            )[_INTEGRITY_ITEM]
            _compare_with_record(where, paths, target, record, subset=fields)
            storage = jax.tree_util.tree_unflatten(treedef, [_storage_abstract(x) for x in target])
            if fields:  # only these leaves: orbax's partial restore of the state item
                with ocp.PyTreeCheckpointer() as reader:
                    restored_tree = reader.restore(
                        epath.Path(where) / _STATE_ITEM,
                        args=ocp.args.PyTreeRestore(
                            item=storage,
                            restore_args=ocp.checkpoint_utils.construct_restore_args(storage),
                            partial_restore=True,
                        ),
                    )
            else:
                restored_tree = manager.restore(
                    step,
                    args=ocp.args.Composite(**{_STATE_ITEM: ocp.args.StandardRestore(storage)}),
                )[_STATE_ITEM]
            restored = jax.tree_util.tree_leaves(restored_tree)
        except StateMismatchError:
            raise
        except Exception as e:  # orbax/tensorstore/json raise many types for unreadable files
            error = e
        if not _every_process_agrees(error is None):
            reason = f"{type(error).__name__}: {error}" if error else "failed on another process"
            raise DamagedCheckpointError(f"{where}: {reason}") from error

        _, prints = _inspect_tree(restored)
        bad = [
            path
            for path, fp in zip(paths, prints, strict=True)
            if int(fp) != record["leaves"][path]["fingerprint"]
        ]
        if bad:
            raise DamagedCheckpointError(
                f"{where}: contents differ from what was written (fingerprint mismatch) in "
                + ", ".join(bad[:10])
            )
        out = []
        for x, want, path in zip(restored, target, paths, strict=True):
            impl = record["leaves"][path]["key_impl"]
            if impl is not None:
                x = jax.random.wrap_key_data(x, impl=impl)
                if x.sharding != want.sharding:
                    x = jax.device_put(x, want.sharding)
            out.append(x)
        logging.info("Restored %s", where)
        return jax.tree_util.tree_unflatten(treedef, out)

    def _quarantine(self, kind: Kind, step: int) -> None:
        """Moves a damaged checkpoint out of the managed directory (writers only, process 0)."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            source = self.step_directory(step, kind)
            dest_dir = epath.Path(self.workdir) / DAMAGED_DIR
            dest_dir.mkdir(parents=True, exist_ok=True)
            dest = dest_dir / f"{_DIRS[kind]}-{step}-{int(time.time())}"
            epath.Path(source).rename(dest)
            logging.warning("Moved damaged checkpoint %s to %s", source, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mlscore_jax quarantine {kind} {step}")
        manager = self._managers.get(kind)
        if manager is not None:
            manager.reload()


def _compare_with_record(
    where: str,
    paths: list[str],
    target: list[jax.ShapeDtypeStruct],
    record: dict[str, Any],
    *,
    subset: bool = False,
) -> None:
    saved = record["leaves"]
    missing = [p for p in paths if p not in saved]
    extra = [] if subset else [p for p in saved if p not in set(paths)]
    if missing or extra:
        raise StateMismatchError(
            f"{where}: restore target and checkpoint have different trees; only in the target: "
            f"{missing[:10]}, only in the checkpoint: {extra[:10]}"
        )
    wrong = [
        f"{p}: checkpoint {tuple(saved[p]['shape'])} {saved[p]['dtype']}, target "
        f"{tuple(x.shape)} {x.dtype}"
        for p, x in zip(paths, target, strict=True)
        if tuple(saved[p]["shape"]) != tuple(x.shape) or saved[p]["dtype"] != str(x.dtype)
    ]
    if wrong:
        raise StateMismatchError(
            f"{where}: restore target differs from the checkpoint: " + "; ".join(wrong[:10])
        )


def _every_process_agrees(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray(ok, dtype=np.int32))
    return bool(np.all(flags))


# ---------------------------------------------------------------------------------------------
# Pre-emption


class PreemptionGuard:
    """Turns SIGTERM (by default) into a flag that the training loop polls.

    The handler only records the request; the loop saves a checkpoint and leaves its loop at
    the next step boundary, then the program exits normally (status 0). Use it as a context
    manager (installs on enter, restores the previous handlers on exit) or call
    :meth:`install`/:meth:`uninstall`. Signal handlers can only be installed from the main thread.

    In a multi-process job the signal may reach processes at different steps; poll
    :meth:`requested_by_any_process` (a tiny collective, called by every process at the same
    point of the loop) so all processes stop at the same step. Install the guard after
    :func:`mlscore_jax.parallel.initialize_distributed`: JAX's own pre-emption notifier also
    listens for SIGTERM, and the handler installed last wins.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._requested = False

    def install(self) -> PreemptionGuard:
        """Installs the handlers (idempotent); returns ``self``."""
        for sig in self._signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restores the handlers that were installed before :meth:`install`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._requested = True
        logging.warning(
            "Received %s: will checkpoint and stop at the next step.", signal.Signals(signum).name
        )

    def requested(self) -> bool:
        """Whether this process has received one of the signals (no communication)."""
        return self._requested

    def requested_by_any_process(self) -> bool:
        """Whether any process has received one of the signals.

        A collective in a multi-process job: every process must call it at the same point.
        The same as :meth:`requested` in a single process.
        """
        if jax.process_count() == 1:
            return self._requested
        flags = multihost_utils.process_allgather(np.asarray(self._requested, dtype=np.int32))
        return bool(np.any(flags))

    def __enter__(self) -> PreemptionGuard:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()
