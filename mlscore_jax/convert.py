"""Released checkpoints in: the official score_flow / score_sde (flax) and score_sde_pytorch files.

    python -m mlscore_jax.convert --config configs/vp/cifar10_ddpmpp_deep_continuous.py \\
        --score PATH/checkpoints/checkpoint_19 \\
        [--dequantizer PATH/flowpp_dequantizer/checkpoints/checkpoint_6] --workdir runs/released

reads a released score-model checkpoint and, optionally, a released Flow++ dequantizer, checks
every parameter path and shape against the networks the config builds, and writes `--workdir`
as an ordinary workdir of this suite: `--mode eval` evaluates it, `--mode train` fine-tunes it,
`--mode train_deq` trains a dequantizer for it. What was converted is recorded in
`WORKDIR/converted.json` (source file, its SHA-256, format, step, which copy).

Formats (`../shared/reference/checkpoints_and_likelihood.md` part A), detected from the bytes:

* **flax msgpack** (`checkpoint_N` of score_flow and score_sde, no extension): the score model's
  `State` (`params_ema`, `optimizer.target`, `step`, ...; no `params` level) or the dequantizer's
  `DeqState` (`params_ema.params`, `ema_train_bpd`, ...). Read with msgpack and numpy only
  (`read_flax_msgpack`): neither flax 0.3 nor TensorFlow is needed.
* **PyTorch** (`checkpoint_N.pth` of score_sde_pytorch): `{'model', 'ema', 'optimizer', 'step'}`
  with `module.all_modules.<i>.<Sub>.<leaf>` keys. Needs torch, an optional extra
  (`pip install -e '.[torch]'`), imported only for these files. The EMA weights are the unnamed
  `ema.shadow_params` list in parameter order: they are named by zipping with the state dict's
  parameter keys (the buffer `module.sigmas` left out) and each pair's shape is checked. Module
  `i` of `all_modules` is the i-th top-level module this suite's DDPM++ creates (read off the
  network itself, `_call_order`); Conv2d (O, I, kh, kw) -> HWIO, Linear (out, in) -> (in, out),
  GroupNorm weight -> scale, NIN W/b as they are. No spatial flip: both compute correlations.

The **EMA** parameters are taken (what the papers evaluate); `--raw` takes the raw ones
(`optimizer.target` / `model`). The chosen weights become both the parameters and the EMA of a
train state at the source checkpoint's step, with a fresh optimizer state: fine-tuning restarts
Adam's moments and its learning-rate warm-up (`optim.warmup`, counted by the optimizer), from
the recorded step up to `training.n_iters`.

Python API: `read_score_checkpoint(path, config) -> params` and
`read_dequantizer_checkpoint(path, config) -> variables` (this suite's trees, numpy float32;
`with_info=True` adds a `SourceInfo`: format, step, copy, SHA-256), `convert(...)`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mlscore_jax import checkpoint, experiment, models, parallel, train

logger = logging.getLogger(__name__)

META_FILE = "converted.json"
TORCH_HINT = (
    "reading a PyTorch .pth checkpoint needs torch, an optional extra: pip install -e '.[torch]' "
    "(a CPU build is enough: add --extra-index-url https://download.pytorch.org/whl/cpu)"
)
# Paper configs a score checkpoint may belong to (searched for a match when the tree differs).
PAPER_CONFIGS = tuple(
    f"configs/{sde}/{data}_ddpmpp{deep}_continuous.py"
    for data in ("cifar10", "imagenet32")
    for deep in ("", "_deep")
    for sde in ("vp", "subvp")
)

Params = dict[str, Any]


class ConversionError(ValueError):
    """The file is not a usable checkpoint, or it does not fit the config's network."""


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Where converted parameters came from."""

    path: str
    format: str  # 'flax-msgpack' | 'torch'
    kind: str  # 'score' | 'dequantizer'
    step: int  # the source checkpoint's training step
    copy: str  # 'ema' | 'raw'
    sha256: str
    num_params: int


def _source_info(path: str, fmt: str, kind: str, step: int, raw: bool, tree: Any) -> SourceInfo:
    return SourceInfo(
        path=os.path.abspath(path),
        format=fmt,
        kind=kind,
        step=step,
        copy="raw" if raw else "ema",
        sha256=_sha256(path),
        num_params=models.param_count(tree),
    )


# ---------------------------------------------------------------------------------------------
# Reading files


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve(path: str, what: str) -> str:
    """A checkpoint file; a directory stands for its newest `checkpoint_N[.pth]`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} checkpoint {path} does not exist")
    if not os.path.isdir(path):
        return path
    found = []
    for name in glob.glob(os.path.join(path, "checkpoint_*")):
        m = re.fullmatch(r"checkpoint_(\d+)(\.pth)?", os.path.basename(name))
        if m and os.path.isfile(name):
            found.append((int(m.group(1)), name))
    if not found:
        raise ConversionError(
            f"{path} is a directory without checkpoint_N files; pass the {what} checkpoint file"
        )
    newest = max(found)[1]
    logger.info("%s: using the newest checkpoint %s", path, newest)
    return newest


def detect_format(path: str) -> str:
    """'torch' (a zip archive or a legacy torch pickle) or 'flax-msgpack', from the bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        raise ConversionError(f"{path} is empty: not a checkpoint")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9"):
        return "torch"
    return "flax-msgpack"


def read_flax_msgpack(path: str) -> dict[str, Any]:
    """A flax `to_bytes` file (what `flax.training.checkpoints` writes) as nested dicts of numpy
    arrays, with msgpack and numpy only. Maps keep their stored order; arrays are copies.

    Raises:
      ConversionError: not msgpack, truncated, or not a map at the top.
    """
    import msgpack

    def ext_hook(code: int, data: bytes) -> Any:
        if code in (1, 3):  # ndarray / numpy scalar: msgpack of (shape, dtype name, C-order bytes)
            shape, dtype, buffer = msgpack.unpackb(data, raw=False)
            array = np.frombuffer(buffer, dtype=np.dtype(dtype)).reshape(shape).copy()
            return array if code == 1 else array[()]
        if code == 2:  # complex
            re_, im = msgpack.unpackb(data, raw=False)
            return complex(re_, im)
        return msgpack.ExtType(code, data)

    with open(path, "rb") as f:
        blob = f.read()
    try:
        tree = msgpack.unpackb(blob, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except Exception as e:  # noqa: BLE001 (msgpack raises ValueError, ExtraData, TypeError, ...)
        raise ConversionError(
            f"{path} is not a flax msgpack checkpoint, or it is truncated "
            f"({type(e).__name__}: {e}; {len(blob):,} bytes)"
        ) from e
    if not isinstance(tree, dict):
        raise ConversionError(
            f"{path} is not a checkpoint: msgpack holding a {type(tree).__name__}"
        )
    if _find(tree, lambda d: "__msgpack_chunked_array__" in d):
        raise ConversionError(f"{path}: chunked arrays (leaves over 1 GiB) are not supported")
    return tree


def _find(tree: Any, predicate) -> bool:
    if isinstance(tree, dict):
        return predicate(tree) or any(_find(v, predicate) for v in tree.values())
    return False


def read_torch(path: str) -> dict[str, Any]:
    """A `torch.save` file as nested dicts and lists of numpy arrays (`weights_only=True`).

    Raises:
      ConversionError: torch is not installed (saying how to install it), or the file is damaged.
    """
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: {TORCH_HINT}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (zip, pickle and storage errors)
        raise ConversionError(
            f"{path} is not a readable PyTorch checkpoint, or it is truncated "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e

    def to_numpy(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy().copy()
        if isinstance(x, Mapping):
            return {k: to_numpy(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [to_numpy(v) for v in x]
        return x

    tree = to_numpy(obj)
    if not isinstance(tree, dict):
        raise ConversionError(f"{path} holds a {type(tree).__name__}, not a checkpoint dict")
    return tree


def _kind_of_flax(tree: dict[str, Any]) -> str:
    ema = tree.get("params_ema")
    if not isinstance(ema, dict) or "optimizer" not in tree:
        raise ConversionError(
            "not a score_flow / score_sde checkpoint: top-level keys "
            f"{sorted(map(str, tree))} (expected step, optimizer, params_ema, ...)"
        )
    if "ema_train_bpd" in tree or set(ema) == {"params"}:
        return "dequantizer"
    return "score"


def _kind_of_torch(tree: dict[str, Any]) -> str:
    if {"model", "ema"} <= set(tree):
        return "score"
    raise ConversionError(
        "not a score_sde_pytorch checkpoint: top-level keys "
        f"{sorted(map(str, tree))} (expected model, ema, optimizer, step)"
    )


def _read(path: str, want: str) -> tuple[str, dict[str, Any]]:
    """(format, tree) of a checkpoint that must hold a `want` ('score' or 'dequantizer')."""
    fmt = detect_format(path)
    tree = read_torch(path) if fmt == "torch" else read_flax_msgpack(path)
    kind = _kind_of_torch(tree) if fmt == "torch" else _kind_of_flax(tree)
    if kind != want:
        flag = "--dequantizer" if kind == "dequantizer" else "--score"
        what = "a Flow++ dequantizer (DeqState)" if kind == "dequantizer" else "a score model"
        raise ConversionError(
            f"{path} holds {what}, not a {'score model' if want == 'score' else 'dequantizer'}: "
            f"pass it as {flag}"
        )
    return fmt, tree


# ---------------------------------------------------------------------------------------------
# Trees


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    return flax.traverse_util.flatten_dict(tree)


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _natural(path: tuple[str, ...]) -> list:
    return [(a, int(b) if b else -1) for a, b in re.findall(r"(\D*)(\d*)", _name(path))]


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {p: tuple(np.shape(x)) for p, x in _flatten(tree).items()}


def _first_mismatch(
    got: Mapping[tuple[str, ...], tuple[int, ...]],
    want: Mapping[tuple[str, ...], tuple[int, ...]],
) -> str | None:
    """The first (natural order) path that is missing, extra or of another shape, in words."""
    for path in sorted(set(got) | set(want), key=_natural):
        if path not in got:
            return f"{_name(path)} {want[path]} is missing from the checkpoint"
        if path not in want:
            return f"{_name(path)} {got[path]} is in the checkpoint but not in the network"
        if got[path] != want[path]:
            return f"{_name(path)}: checkpoint {got[path]}, network {want[path]}"
    return None


def experiment_for(
    config: ml_collections.ConfigDict | experiment.Experiment, source: str = "<config>"
) -> experiment.Experiment:
    """The Experiment of `config`. Converting needs the networks and the image shape, not the
    data: a data set that is not prepared here stands in empty (`require_data=False`)."""
    if isinstance(config, experiment.Experiment):
        return config
    return experiment.from_config(config, source=source, require_data=False)


def _network_shapes(exp: experiment.Experiment) -> dict[tuple[str, ...], tuple[int, ...]]:
    abstract = models.abstract_variables(exp.model, (1, *exp.example_shape))["params"]
    return _shapes(abstract)


def _describe_score(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> str:
    """What a DDPM++ parameter tree looks like, in config words (for error messages)."""
    conv0 = shapes.get(("Conv_0", "kernel"))
    blocks = {p[0] for p in shapes if p[0].startswith("ResnetBlockBigGANpp_")}
    attn = {p[0] for p in shapes if p[0].startswith("AttnBlockpp_")}
    if conv0 is None or len(conv0) != 4:
        return f"{len(shapes)} tensors, no DDPM++ input convolution Conv_0"
    return (
        f"nf={conv0[-1]}, {conv0[2]} image channels, {len(blocks)} residual blocks, "
        f"{len(attn)} attention blocks, {sum(math.prod(s) for s in shapes.values()):,} parameters"
    )


def _suggest_configs(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> list[str]:
    """Paper configs whose network has exactly these paths and shapes."""
    conv0 = tuple(shapes.get(("Conv_0", "kernel"), ()))
    blocks = len({p[0] for p in shapes if p[0].startswith("ResnetBlockBigGANpp_")})
    return [
        rel
        for rel in PAPER_CONFIGS
        if len(conv0) == 4 and _paper_config_shapes(rel, conv0[2], conv0[3], blocks) == dict(shapes)
    ]


@functools.cache
def _paper_config_shapes(
    rel: str, channels: int, nf: int, blocks: int
) -> dict[tuple[str, ...], tuple[int, ...]] | None:
    """The parameter shapes of a paper config's network (None: it cannot have `channels` input
    channels, `nf` filters and `blocks` residual blocks, or the config cannot be read)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        return None
    try:
        spec = importlib.util.spec_from_file_location("_paper_config", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, root)
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(root)
        network, shape = experiment.network_from_config(module.get_config(), source=rel)
        # DDPM++ has L (2 n + 3) residual blocks for L levels of n blocks (down, mid, up)
        levels, n = len(network.ch_mult), network.num_res_blocks
        if (network.nf, shape[-1], levels * (2 * n + 3)) != (nf, channels, blocks):
            return None  # cheap: no network to trace
        return _shapes(models.abstract_variables(network, (1, *shape))["params"])
    except Exception:  # noqa: BLE001 (a config that cannot be built suggests nothing)
        return None


def _check_tree(
    got: Params, want: Mapping[tuple[str, ...], tuple[int, ...]], path: str, exp, kind: str
) -> None:
    shapes = _shapes(got)
    problem = _first_mismatch(shapes, want)
    if problem is None:
        return
    if kind == "score":
        hint = f"the checkpoint's network: {_describe_score(shapes)}"
        suggested = _suggest_configs(shapes)
        hint += (
            f"; configs that match it: {', '.join(suggested)}"
            if suggested
            else "; no paper config matches it: set --config.model.nf / ch_mult / "
            "num_res_blocks / attn_resolutions to the checkpoint's"
        )
    else:
        hint = f"the checkpoint's dequantizer: {_describe_deq(shapes)}"
    raise ConversionError(f"{path} does not fit the network of {exp.source}: {problem}; {hint}")


# ---------------------------------------------------------------------------------------------
# Score model


def _call_order(exp: experiment.Experiment) -> list[str]:
    """The top-level submodules of the score network in the order it creates them: the order of
    score_sde_pytorch's `all_modules` (each created once, in the same sequence)."""
    import flax.linen as nn

    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        path = context.module.scope.path if context.module.scope is not None else ()
        if len(path) == 1 and path[0] not in order:
            order.append(path[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        models.abstract_variables(exp.model, (1, *exp.example_shape))
    return order


def _torch_leaf(module_type: str, leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """(flax leaf name, array) of one torch tensor (A.6 of the reference)."""
    if leaf in ("W", "b"):  # NIN: the same in both
        return leaf, value
    if leaf == "bias":
        return "bias", value
    if leaf != "weight":
        raise ConversionError(f"unexpected torch parameter name {leaf!r} in {module_type}")
    if value.ndim == 4:  # Conv2d (O, I, kh, kw) -> HWIO
        return "kernel", np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if value.ndim == 2:  # Linear (out, in) -> (in, out)
        return "kernel", np.ascontiguousarray(value.T)
    if value.ndim == 1:  # GroupNorm
        return "scale", value
    raise ConversionError(f"unexpected rank-{value.ndim} weight in {module_type}")


def _torch_score_params(tree: dict[str, Any], exp, raw: bool, path: str) -> Params:
    state = tree["model"]
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: 'model' is not a state dict")
    pattern = re.compile(r"(?:module\.)?all_modules\.(\d+)\.(.+)")
    param_keys = [k for k in state if pattern.fullmatch(k)]
    buffers = [k for k in state if not pattern.fullmatch(k)]
    if raw:
        values = [state[k] for k in param_keys]
    else:
        shadow = tree["ema"].get("shadow_params") if isinstance(tree["ema"], Mapping) else None
        if not isinstance(shadow, list):
            raise ConversionError(f"{path}: 'ema' has no shadow_params list")
        if len(shadow) != len(param_keys):
            raise ConversionError(
                f"{path}: {len(shadow)} EMA tensors but {len(param_keys)} parameters in the "
                f"state dict (buffers left out: {buffers})"
            )
        for key, value in zip(param_keys, shadow, strict=True):
            if np.shape(value) != np.shape(state[key]):
                raise ConversionError(
                    f"{path}: EMA tensor for {key} has shape {np.shape(value)}, the parameter "
                    f"{np.shape(state[key])}: the EMA list is not in parameter order"
                )
        values = shadow
    order = _call_order(exp)
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in zip(param_keys, values, strict=True):
        index, rest = pattern.fullmatch(key).groups()
        index = int(index)
        if index >= len(order):
            raise ConversionError(
                f"{path}: {key}: module {index} but the network of {exp.source} has "
                f"{len(order)} top-level modules; {_torch_summary(param_keys, state)}"
            )
        *subs, leaf = rest.split(".")
        top = order[index]
        name, array = _torch_leaf(top, leaf, np.asarray(value, np.float32))
        flat[(top, *subs, name)] = array
    return flax.traverse_util.unflatten_dict(flat)


def _torch_summary(keys: list[str], state: Mapping[str, Any]) -> str:
    n = sum(math.prod(np.shape(state[k])) for k in keys)
    return f"the checkpoint has {len(keys)} parameter tensors, {n:,} parameters"


def read_score_checkpoint(
    path: str,
    config: ml_collections.ConfigDict | experiment.Experiment,
    *,
    raw: bool = False,
    with_info: bool = False,
) -> Params | tuple[Params, SourceInfo]:
    """The score network's parameters of a released checkpoint, in this suite's tree.

    Args:
      path: a flax msgpack `checkpoint_N` (score_flow, score_sde) or a score_sde_pytorch
        `checkpoint_N.pth`; a directory stands for its newest checkpoint file.
      config: the config (or `Experiment`) whose network the parameters are for.
      raw: the raw parameters instead of the EMA ones.
      with_info: also return where they came from (`SourceInfo`).

    Returns:
      params: a numpy float32 tree equal in paths and shapes to
      `models.abstract_variables(exp.model, ...)['params']`; `(params, info)` with `with_info`.

    Raises:
      ConversionError: not a checkpoint, a dequantizer checkpoint, a truncated file, or a network
        that does not match (naming the first mismatching path, both shapes and the configs that
        would match).
    """
    exp = experiment_for(config)
    path = _resolve(path, "score")
    fmt, tree = _read(path, "score")
    if fmt == "torch":
        params = _torch_score_params(tree, exp, raw, path)
        step = int(tree.get("step", 0))
    else:
        model_state = tree.get("model_state")
        if model_state:  # NCSNpp has none; another network (batch norm) would
            raise ConversionError(f"{path}: non-empty model_state {list(model_state)}")
        source = tree["optimizer"]["target"] if raw else tree["params_ema"]
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(source))
        step = int(np.asarray(tree.get("step", 0)))
    _check_tree(params, _network_shapes(exp), path, exp, "score")
    if with_info:
        return params, _source_info(path, fmt, "score", step, raw, params)
    return params


# ---------------------------------------------------------------------------------------------
# Dequantizer


def _describe_deq(shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> str:
    """Flow++ sizes read off a parameter tree (the heads cannot be: no shape depends on them)."""
    flat = {_name(p): s for p, s in shapes.items()}
    variant = "flowpp_imagenet32" if any("DeepProcessor_0" in p for p in flat) else "flowpp_cifar10"
    pos = flat.get("params/MixLogisticAttnCoupling_0/pos_emb")
    blocks = {
        m.group(1) for p in flat if (m := re.search(r"MixLogisticAttnCoupling_0/block(\d+)_", p))
    }
    out = [s for p, s in flat.items() if re.search(r"Coupling_0/block\d+_(proj_out_W|c2_V)$", p)]
    parts = [f"deq.name={variant}"]
    if pos is not None:
        parts.append(f"deq.filters={pos[-1]}")
    proj_in = [s for p, s in flat.items() if re.search(r"Coupling_0/(proj_in_W|c1_V)$", p)]
    if out and proj_in and len(proj_in[0]) == 4:
        channels = proj_in[0][2]  # the coupling's input: one half of the image, C channels
        parts.append(f"deq.components={(out[0][-1] // channels - 2) // 3}")
    parts.append(f"deq.blocks={len(blocks)}")
    return ", ".join(parts) + " (deq.heads cannot be read off the shapes)"


def read_dequantizer_checkpoint(
    path: str,
    config: ml_collections.ConfigDict | experiment.Experiment,
    *,
    raw: bool = False,
    with_info: bool = False,
) -> Params | tuple[Params, SourceInfo]:
    """The Flow++ dequantizer variables ({'params': ...}) of a released score_flow `DeqState`.

    The official CIFAR-10 variant's swapped-axes kernels are this suite's layout too
    (`models.flowpp`), so the arrays are taken as they are.

    Raises:
      ConversionError: as `read_score_checkpoint`, and a config without a `deq` section.
    """
    exp = experiment_for(config)
    if exp.dequantizer is None:
        raise ConversionError(f"{exp.source} has no `deq` section: no dequantizer to load into")
    path = _resolve(path, "dequantizer")
    fmt, tree = _read(path, "dequantizer")
    source = tree["optimizer"]["target"] if raw else tree["params_ema"]
    variables = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(source))
    from mlscore_jax import train_deq

    want = _shapes({"params": train_deq.abstract_params(exp, parallel.make_mesh())})
    _check_tree(variables, want, path, exp, "dequantizer")
    if with_info:
        step = int(np.asarray(tree.get("step", 0)))
        return variables, _source_info(path, fmt, "dequantizer", step, raw, variables)
    return variables


# ---------------------------------------------------------------------------------------------
# Writing a workdir


def _train_state(exp: experiment.Experiment, params: Params, step: int) -> train.TrainState:
    """A train state at `step` holding `params` as parameters and EMA, fresh optimizer."""
    tx, _ = train.make_optimizer(exp.optim)
    params = jax.tree.map(jnp.asarray, params)
    _, train_key = jax.random.split(jax.random.key(exp.train.seed))
    return train.TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params,
        key=train_key,
    )


def _write_state(directory: str, state: train.TrainState, step: int) -> None:
    ckpt = checkpoint.Checkpointer(directory)
    try:
        existing = ckpt.snapshot_steps() + ckpt.steps("preemption")
        if existing:
            raise ConversionError(
                f"{directory} already holds checkpoints (steps {sorted(set(existing))}); "
                "convert into a new workdir"
            )
        ckpt.save(step, state)
    finally:
        ckpt.close()


def _write_json(path: str, value: dict[str, Any]) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def convert(
    config: ml_collections.ConfigDict | experiment.Experiment,
    workdir: str,
    *,
    score: str,
    dequantizer: str | None = None,
    raw: bool = False,
) -> dict[str, Any]:
    """Write `workdir` from released checkpoints (module docstring); returns what it recorded.

    Converting the same files into the same workdir again does nothing; a workdir that holds
    other checkpoints is an error (nothing is overwritten).
    """
    exp = experiment_for(config)
    meta_path = os.path.join(workdir, META_FILE)
    params, info = read_score_checkpoint(score, exp, raw=raw, with_info=True)
    deq = (
        read_dequantizer_checkpoint(dequantizer, exp, raw=raw, with_info=True)
        if dequantizer
        else None
    )
    record = {
        "config": exp.source,
        "converted": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "score": dataclasses.asdict(info),
        "dequantizer": dataclasses.asdict(deq[1]) if deq else None,
    }
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        same = old.get("score", {}).get("sha256") == info.sha256 and (
            (old.get("dequantizer") or {}).get("sha256") == (deq[1].sha256 if deq else None)
        )
        if same and old["score"]["copy"] == info.copy:
            logger.info("%s already holds this conversion; nothing to do", workdir)
            return old
    os.makedirs(workdir, exist_ok=True)
    _write_state(workdir, _train_state(exp, params, info.step), info.step)
    if deq is not None:
        from mlscore_jax import train_deq

        directory = train_deq.dequantizer_dir(workdir)
        _write_state(directory, _train_state(exp, deq[0]["params"], deq[1].step), deq[1].step)
        _write_json(
            os.path.join(directory, train_deq.META_FILE),
            {**train_deq.description(exp), "score_step": info.step, "config": exp.source,
             "converted_from": dataclasses.asdict(deq[1])},
        )  # fmt: skip
    _write_json(meta_path, record)
    logger.info(
        "wrote %s: score model step %d (%s, %s weights, %d parameters)%s",
        workdir,
        info.step,
        info.format,
        info.copy,
        info.num_params,
        f"; dequantizer step {deq[1].step} ({deq[1].num_params} parameters)" if deq else "",
    )
    return record


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    from mlscore_jax import logs

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    workdir = FLAGS.workdir
    os.makedirs(workdir, exist_ok=True)
    log_file = os.path.join(workdir, "log.txt")
    logs.setup(log_file, verbose=FLAGS.verbose)
    config_file = config_flags.get_config_filename(FLAGS["config"])
    logger.info("command: %s", " ".join(sys.argv))
    with logs.user_errors(log_file, verbose=FLAGS.verbose):
        exp = experiment_for(FLAGS.config, source=config_file)
        record = convert(
            exp, workdir, score=FLAGS.score, dequantizer=FLAGS.dequantizer, raw=FLAGS.raw
        )
    print(
        f"{workdir}: score model step {record['score']['step']} from {record['score']['format']}"
        + (f", dequantizer step {record['dequantizer']['step']}" if record["dequantizer"] else "")
        + f". Evaluate: python -m mlscore_jax.main --config {config_file} --workdir {workdir} "
        "--mode eval"
    )


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Configuration file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Workdir to write (new, or a previous conversion).")
    flags.DEFINE_string("score", None, "Score-model checkpoint: flax checkpoint_N or .pth.")
    flags.DEFINE_string("dequantizer", None, "Flow++ dequantizer checkpoint (score_flow DeqState).")
    flags.DEFINE_bool("raw", False, "Take the raw (non-EMA) parameters.")
    flags.DEFINE_bool("verbose", False, "Show tracebacks.")
    flags.mark_flags_as_required(["config", "workdir", "score"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
