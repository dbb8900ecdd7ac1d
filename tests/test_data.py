"""Tests for mlscore_jax.data: loaders (TFDS mocked offline, digits, npz, toy2d), deterministic
resumable batches, exact preprocessing and its bits/dim consistency, and the error messages."""

from __future__ import annotations

import functools
import hashlib
import math
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlscore_jax import batches, bpd, datasets, preprocessing

# The `shared` folder beside the repository root (lossless MNIST / CIFAR-10 subsets).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _sha256(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection from Python fails the test loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("the test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------------------------------------
# Names, import cost
# ------------------------------------------------------------------------------------------------


def test_import_and_offline_paths_do_not_import_tensorflow(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 4, 4, 1), np.uint8))
    code = (
        "import sys\n"
        "import mlscore_jax.datasets as d\n"
        "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules\n"
        "d.load('digits'); d.load('toy2d'); d.load('npz', train_file=sys.argv[1])\n"
        "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npz")], check=True)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown data set 'cifar-10'") as e:
        datasets.load("cifar-10")
    for name in ("cifar10", "imagenet32", "imagenet_resized32", "mnist", "digits", "npz", "toy2d"):
        assert name in str(e.value)


def test_options_are_checked_per_data_set():
    with pytest.raises(TypeError, match="'digits' does not take option"):
        datasets.load("digits", data_dir="/somewhere")
    with pytest.raises(TypeError, match=r"'npz' needs option\(s\) \['train_file'\]"):
        datasets.load("npz")


# ------------------------------------------------------------------------------------------------
# digits (the offline default)
# ------------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_and_exact():
    from sklearn.datasets import load_digits

    ds = datasets.load("digits")
    assert ds.levels == 17 and ds.example_shape == (8, 8, 1) and ds.num_dims == 64
    assert ds.train.shape == (1497, 8, 8, 1) and ds.test.shape == (300, 8, 8, 1)
    assert ds.train.dtype == np.uint8 and int(ds.train.max()) == 16
    images = load_digits().images
    np.testing.assert_array_equal(ds.train[..., 0], images[:1497])
    np.testing.assert_array_equal(ds.test[..., 0], images[1497:])
    # Pinned: if scikit-learn ever changes its digits, bits/dim stop being comparable.
    assert _sha256(ds.train) == "f708c157fe383473ebf076231e3126f5097bb2eab4486c2ee551438ec8f08649"
    assert _sha256(ds.test) == "7f1cbfeaacf7c6c89b256737f67e73a407bbc5081002ce36ac267f0c0fc7bada"
    with pytest.raises(ValueError, match="read-only"):
        ds.train[0, 0, 0, 0] = 1


# ------------------------------------------------------------------------------------------------
# toy2d
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", datasets.TOY2D_DISTRIBUTIONS)
def test_toy2d_is_deterministic_continuous_data(distribution):
    ds = datasets.load("toy2d", distribution=distribution, num_train=4000, num_test=1000, seed=3)
    assert ds.levels is None and not ds.is_image and ds.example_shape == (2,)
    assert ds.train.dtype == np.float32 and ds.train.shape == (4000, 2)
    assert ds.test.shape == (1000, 2) and np.isfinite(ds.train).all()
    again = datasets.load("toy2d", distribution=distribution, num_train=4000, num_test=1000, seed=3)
    np.testing.assert_array_equal(ds.train, again.train)
    other = datasets.load("toy2d", distribution=distribution, num_train=4000, num_test=1000, seed=4)
    assert not np.array_equal(ds.train, other.train)
    assert not np.array_equal(ds.train[:1000], ds.test)
    # Continuous data pass through preprocessing untouched.
    np.testing.assert_array_equal(preprocessing.preprocess(None, ds.train, levels=None), ds.train)
    with pytest.raises(ValueError, match="continuous"):
        preprocessing.preprocess(
            jax.random.key(0), ds.train, levels=None, uniform_dequantization=True
        )


def test_toy2d_shapes_are_the_textbook_ones():
    def draw(name):
        return datasets.load("toy2d", distribution=name, num_train=20_000, num_test=1).train

    board = draw("checkerboard")
    assert np.abs(board).max() <= 4
    cells = np.floor(board / 2).astype(int)  # squares of side 2, alternate ones filled
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    gauss = draw("8gaussians")
    # 20,000 draws: standard errors of these means are ~3e-3 (norm) and ~1.4e-2 (mean); the
    # tolerances are several of them, wide enough for any seed, narrow enough to catch a wrong
    # radius, centre or scale.
    np.testing.assert_allclose(np.linalg.norm(gauss, axis=1).mean(), 4 / math.sqrt(2), atol=0.1)
    np.testing.assert_allclose(gauss.mean(0), 0.0, atol=0.05)
    roll = draw("swissroll") * 5  # radius ~ t in [1.5 pi, 4.5 pi], plus N(0, 1) noise
    np.testing.assert_allclose(np.linalg.norm(roll, axis=1).mean(), 3 * np.pi, rtol=0.03)
    moons = draw("moons")  # sklearn's make_moons (mean (1/2, 1/4)), times 2, minus (1, 0.2)
    np.testing.assert_allclose(moons.mean(0), [0.0, 0.3], atol=0.03)
    with pytest.raises(ValueError, match="unknown toy2d distribution"):
        datasets.load("toy2d", distribution="spiral")


# ------------------------------------------------------------------------------------------------
# npz
# ------------------------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", x=x, y=np.arange(10))
    np.savez(tmp_path / "test.npz", x=x[:4])
    ds = datasets.load("npz", train_file=tmp_path / "train.npz", test_file=tmp_path / "test.npz")
    assert ds.levels == 256 and ds.example_shape == (6, 5, 3)
    np.testing.assert_array_equal(ds.train, x)
    np.testing.assert_array_equal(ds.test, x[:4])
    only_train = datasets.load("npz", train_file=str(tmp_path / "train.npz"))
    assert only_train.test.shape == (0, 6, 5, 3)
    assert list(batches.eval_batches(only_train.test, 4)) == []
    # A plain .npy is memory-mapped; a levels option for non-8-bit data.
    np.save(tmp_path / "train17.npy", x % 17)
    ds17 = datasets.load("npz", train_file=tmp_path / "train17.npy", levels=17)
    assert isinstance(ds17.train, np.memmap) and ds17.levels == 17


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"x": np.zeros((3, 4, 4, 1), np.float32)}, "must be uint8"),
        ({"x": np.zeros((3, 4, 4), np.uint8)}, r"\[N, H, W, C\].*x\[\.\.\., None\]"),
        ({"x": np.zeros((3, 16), np.uint8)}, r"must be \[N, H, W, C\]"),
        ({"images": np.zeros((3, 4, 4, 1), np.uint8)}, r"no array 'x' \(it holds \['images'\]\)"),
        ({"x": np.zeros((0, 4, 4, 1), np.uint8)}, "no images"),
    ],
)
def test_npz_rejects_bad_files(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        datasets.load("npz", train_file=tmp_path / "bad.npz")


def test_npz_rejects_inconsistent_files(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.full((3, 4, 4, 1), 20, np.uint8))
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="differ from train images"):
        datasets.load("npz", train_file=tmp_path / "a.npz", test_file=tmp_path / "b.npz")
    with pytest.raises(ValueError, match="pixel value 20 >= levels=17"):
        datasets.load("npz", train_file=tmp_path / "a.npz", levels=17)
    with pytest.raises(FileNotFoundError, match="train file not found"):
        datasets.load("npz", train_file=tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------------
# The real benchmark files in ../shared/data, through the npz path
# ------------------------------------------------------------------------------------------------


def _shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return path


def test_real_mnist_through_npz():
    ds = datasets.load(
        "npz", train_file=_shared("mnist_train.npz"), test_file=_shared("mnist_test.npz")
    )
    assert ds.train.shape == (60000, 28, 28, 1) and ds.test.shape == (10000, 28, 28, 1)
    assert ds.levels == 256
    # Statistics and hashes from ../shared/data/README.md.
    np.testing.assert_allclose(ds.train.mean(dtype=np.float64), 33.3184, atol=5e-5)
    np.testing.assert_allclose(ds.test.mean(dtype=np.float64), 33.7912, atol=5e-5)
    assert _sha256(ds.train) == "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757"


def test_real_cifar10_subset_reaches_training_unchanged():
    ds = datasets.load(
        "npz",
        train_file=_shared("cifar10_train_first4000.npz"),
        test_file=_shared("cifar10_test_first1000.npz"),
    )
    assert ds.train.shape == (4000, 32, 32, 3) and ds.test.shape == (1000, 32, 32, 3)
    assert _sha256(ds.train) == "bac45b45504ed1289a3f437be4bfbefece248abbc094a428a0b4dfab00e776ae"
    assert _sha256(ds.test) == "da362006b99671213d1a5d856cab2bedf64d40bad4501630ee60f4ceb2d3ec7f"
    np.testing.assert_allclose(
        ds.train.mean(axis=(0, 1, 2), dtype=np.float64), [125.36, 122.85, 113.39], atol=0.005
    )
    assert list(ds.train[0, 0, :10, 0]) == [59, 43, 50, 68, 98, 119, 139, 145, 149, 149]
    idx = batches.train_indices(4000, seed=1, first_step=7, num_steps=1, global_batch_size=16)[0]
    batch = batches.train_batch(ds.train, seed=1, step=7, global_batch_size=16)
    np.testing.assert_array_equal(batch, ds.train[idx])
    x = preprocessing.preprocess(None, batch, levels=ds.levels)
    np.testing.assert_array_equal(np.asarray(x), 2 * ((batch + 0.5) / 256).astype(np.float32) - 1)


# ------------------------------------------------------------------------------------------------
# TFDS, offline through tfds.testing.mock_data
# ------------------------------------------------------------------------------------------------

_TFDS_CASES = {
    "cifar10": ("cifar10", (32, 32, 3)),
    "mnist": ("mnist", (28, 28, 1)),
    "imagenet32": ("downsampled_imagenet/32x32", (32, 32, 3)),
}
_NUM_FAKE = 9


def _fake_32x32(self, split, decoders=None, read_config=None, shuffle_files=False):
    """Fake records for downsampled_imagenet, whose features declare (None, None, 3): TFDS's own
    fake generator draws random sizes; the real images are 32x32."""
    import tensorflow as tf

    seed = {"train": 0, "validation": 1}[str(split)]
    images = np.random.default_rng(seed).integers(0, 256, (_NUM_FAKE, 32, 32, 3), np.uint8)
    return tf.data.Dataset.from_tensor_slices({"image": images})


def _expected_fake_images(tfds, tfds_name: str, split: str) -> np.ndarray:
    if tfds_name.startswith("downsampled_imagenet"):
        return np.random.default_rng({"train": 0, "validation": 1}[split]).integers(
            0, 256, (_NUM_FAKE, 32, 32, 3), np.uint8
        )
    from tensorflow_datasets.testing.mocking import RandomFakeGenerator

    features = tfds.builder(tfds_name).info.features
    return np.stack([ex["image"] for ex in RandomFakeGenerator(features, _NUM_FAKE)])


@pytest.mark.parametrize("name", list(_TFDS_CASES))
def test_tfds_path_with_mock_data(name, tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds_name, shape = _TFDS_CASES[name]
    as_dataset_fn = _fake_32x32 if name == "imagenet32" else None
    # mock_data fakes the records; the prepared-files check is ours, so say "prepared" too.
    with (
        tfds.testing.mock_data(num_examples=_NUM_FAKE, as_dataset_fn=as_dataset_fn),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
        mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare") as prepare,
    ):
        ds = datasets.load(name, data_dir=tmp_path)
        test_split = "validation" if name == "imagenet32" else "test"
        expected_train = _expected_fake_images(tfds, tfds_name, "train")
        expected_test = _expected_fake_images(tfds, tfds_name, test_split)
    prepare.assert_not_called()
    assert ds.name == name and ds.levels == 256 and ds.example_shape == shape
    assert ds.train.dtype == np.uint8 and ds.train.shape == (_NUM_FAKE, *shape)
    np.testing.assert_array_equal(ds.train, expected_train)
    np.testing.assert_array_equal(ds.test, expected_test)
    # The decoded splits were cached; a later load needs neither TFDS data nor the mock.
    assert isinstance(ds.train, np.memmap)
    again = datasets.load(name, data_dir=tmp_path)
    np.testing.assert_array_equal(again.train, expected_train)
    np.testing.assert_array_equal(again.test, expected_test)
    # ... and the arrays reach training unchanged.
    stack = batches.train_batches(ds.train, seed=0, first_step=0, num_steps=3, global_batch_size=4)
    idx = batches.train_indices(_NUM_FAKE, seed=0, first_step=0, num_steps=3, global_batch_size=4)
    np.testing.assert_array_equal(stack, expected_train[idx])
    x = preprocessing.preprocess(None, stack, levels=ds.levels, centered=False)
    np.testing.assert_array_equal(np.asarray(x), ((expected_train[idx] + 0.5) / 256))


def test_tfds_rejects_images_of_the_wrong_size(tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    # TFDS's default fake downsampled_imagenet images have random sizes.
    with (
        tfds.testing.mock_data(num_examples=3),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", return_value=True),
    ):
        with pytest.raises(ValueError, match=r"imagenet32/train: .* not \[32, 32, 3\]"):
            datasets.load("imagenet32", data_dir=tmp_path, cache=False)


def test_tfds_download_only_when_asked(tmp_path, no_network):
    tfds = pytest.importorskip("tensorflow_datasets")
    with (
        tfds.testing.mock_data(num_examples=2),
        mock.patch.object(tfds.core.DatasetBuilder, "download_and_prepare") as prepare,
    ):
        with pytest.raises(datasets.DatasetNotPreparedError):
            datasets.load("mnist", data_dir=tmp_path)
        prepare.assert_not_called()
        ds = datasets.load("mnist", data_dir=tmp_path, download=True, cache=False)
    prepare.assert_called_once()
    assert ds.train.shape == (2, 28, 28, 1) and not isinstance(ds.train, np.memmap)
    assert not (tmp_path / "mlscore_jax_cache").exists()


@pytest.mark.parametrize("name", ["cifar10", "imagenet32"])
def test_unprepared_tfds_data_fails_fast_with_the_ways_out(name, tmp_path, no_network):
    with pytest.raises(datasets.DatasetNotPreparedError) as e:  # no_network: nothing waits
        datasets.load(name, data_dir=tmp_path / "tfds")
    message = str(e.value)
    tfds_name = _TFDS_CASES[name][0]
    for part in [
        f"Data set {name!r}",
        str(tmp_path / "tfds"),
        f"tfds.builder('{tfds_name}', data_dir='{tmp_path / 'tfds'}').download_and_prepare()",
        f"tfds build {tfds_name} --data_dir={tmp_path / 'tfds'}",
        "download=True",
        "--config.data.dataset=npz --config.data.train_file=train.npz",
        "datasets.load('npz', train_file='train.npz', test_file='test.npz')",
        "numpy.savez('train.npz', x=images)",
    ]:
        assert part in message, part
    assert isinstance(e.value, FileNotFoundError)
    if name == "imagenet32":
        assert "imagenet_resized32" in message and "not comparable" in message


# ------------------------------------------------------------------------------------------------
# Training batches: deterministic, resumable, partitioned across processes
# ------------------------------------------------------------------------------------------------

IDS = np.arange(1000, dtype=np.int64)  # "images" that are their own index


def test_resume_gives_the_same_batches():
    kwargs = dict(seed=5, global_batch_size=96)
    k = 37  # straddles several epoch boundaries (N = 1000)
    one_go = batches.train_batches(IDS, first_step=0, num_steps=k + 11, **kwargs)[k:]
    batches._epoch_permutation.cache_clear()  # a fresh process
    resumed = np.stack([batches.train_batch(IDS, step=s, **kwargs) for s in range(k, k + 11)])
    np.testing.assert_array_equal(one_go, resumed)
    chunked = batches.train_batches(IDS, first_step=k, num_steps=11, **kwargs)
    np.testing.assert_array_equal(chunked, resumed)
    other_seed = batches.train_batches(
        IDS, first_step=k, num_steps=11, seed=6, global_batch_size=96
    )
    assert not np.array_equal(resumed, other_seed)


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_split_the_global_batch(process_count):
    kwargs = dict(seed=1, first_step=20, num_steps=6, global_batch_size=64)
    full = batches.train_batches(IDS, **kwargs)
    parts = [
        batches.train_batches(IDS, process_index=p, process_count=process_count, **kwargs)
        for p in range(process_count)
    ]
    assert all(part.shape == (6, 64 // process_count) for part in parts)
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), full)
    for step_batch in full:  # never the same example twice in one global batch (B <= N)
        assert len(np.unique(step_batch)) == 64


def test_every_epoch_is_a_permutation():
    n, batch = 100, 32
    stream = batches.train_batches(
        IDS[:n], seed=0, first_step=0, num_steps=10, global_batch_size=batch
    )
    stream = stream.reshape(-1)[: 3 * n].reshape(3, n)
    for epoch in stream:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    assert not np.array_equal(stream[0], stream[1])


def test_batch_arguments_are_checked():
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        batches.train_batch(IDS, seed=0, step=0, global_batch_size=64, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        batches.train_batch(
            IDS, seed=0, step=0, global_batch_size=64, process_index=2, process_count=2
        )
    with pytest.raises(ValueError, match=">= 0"):
        batches.train_batch(IDS, seed=0, step=-1, global_batch_size=64)


# ------------------------------------------------------------------------------------------------
# Evaluation batches: the whole split, exactly once
# ------------------------------------------------------------------------------------------------


def test_eval_counts_every_image_once():
    ids = np.arange(10_000, dtype=np.int32)[:, None] + 1
    split = list(batches.eval_batches(ids, 1024))
    assert len(split) == batches.num_eval_batches(10_000, 1024) == 10
    assert all(b.shape == (1024, 1) and m.shape == (1024,) and m.dtype == bool for b, m in split)
    # The last batch holds the 784 images that drop_remainder=True used to drop.
    assert [int(m.sum()) for _, m in split] == [1024] * 9 + [784]
    np.testing.assert_array_equal(np.concatenate([b[m] for b, m in split]), ids)
    assert (split[-1][0][~split[-1][1]] == 0).all()


@pytest.mark.parametrize("process_count", [2, 4])
def test_eval_processes_cover_the_split(process_count):
    ids = np.arange(1001, dtype=np.int32)[:, None]
    per_process = [
        list(batches.eval_batches(ids, 128, process_index=p, process_count=process_count))
        for p in range(process_count)
    ]
    assert len({len(batches) for batches in per_process}) == 1  # same number everywhere
    seen = [b[m] for step in zip(*per_process, strict=True) for b, m in step]
    np.testing.assert_array_equal(np.concatenate(seen), ids)


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [256, 17])
def test_bin_centres_and_centering(levels):
    k = np.arange(levels, dtype=np.uint8).reshape(1, 1, levels, 1)
    y = preprocessing.preprocess(None, k, levels=levels, centered=False)
    # y = (k + 1/2) / L in float32: at most two roundings (XLA may multiply by 1/L), 2^-23
    # relative; x = 2y - 1 doubles y's error and adds one rounding: < 3e-7 absolute on [-1, 1).
    np.testing.assert_allclose(y, (k + 0.5) / levels, rtol=2.4e-7)
    x = preprocessing.preprocess(None, k, levels=levels)  # centred is the default
    np.testing.assert_allclose(x, 2 * (k + 0.5) / levels - 1, atol=3e-7)


@pytest.mark.parametrize("levels", [256, 17])
def test_uniform_dequantization(levels):
    k = np.random.default_rng(0).integers(0, levels, (64, 16, 16, 3), dtype=np.uint8)
    opts = dict(levels=levels, uniform_dequantization=True)
    y = np.asarray(preprocessing.preprocess(jax.random.key(1), k, **opts, centered=False))
    assert y.dtype == np.float32 and y.min() >= 0.0 and y.max() < 1.0
    u = y.astype(np.float64) * levels - k
    assert u.min() > -1e-4 and u.max() < 1 + 1e-4  # float32 rounding of (k + u) / L
    sigma = math.sqrt(1 / 12 / u.size)
    assert abs(u.mean() - 0.5) < 5 * sigma
    # the variance estimate of n = 49,152 uniforms has standard error sqrt((1/80 - 1/144) / n)
    # = 3.4e-4; 0.002 is 6 of them
    assert abs(u.var() - 1 / 12) < 0.002
    x = preprocessing.preprocess(jax.random.key(1), k, **opts)
    assert float(x.min()) >= -1.0 and float(x.max()) < 1.0


@pytest.mark.parametrize("levels", [256, 17])
@pytest.mark.parametrize("centered", [True, False])
def test_uniform_density_is_log2_levels_bits_per_dim(levels, centered):
    """A uniform density on the support of the dequantized data gives every integer image the
    probability L^-D, i.e. exactly log2(L) bits/dim: the conventions of preprocess and bpd agree."""
    k = np.random.default_rng(2).integers(0, levels, (32, 8, 8, 3), dtype=np.uint8)
    x = preprocessing.preprocess(
        jax.random.key(0), k, levels=levels, uniform_dequantization=True, centered=centered
    )
    low, width = (-1.0, 2.0) if centered else (0.0, 1.0)
    assert float(x.min()) >= low and float(x.max()) < low + width  # inside the support
    num_dims = 8 * 8 * 3
    nll = np.full(len(k), num_dims * math.log(width))  # -log of density width^-D, in nats
    bits = bpd.nats_to_bpd(nll, num_dims, levels=levels, centered=centered)
    np.testing.assert_allclose(bits, math.log2(levels), rtol=1e-6)


def test_preprocess_jits_and_flips_only_when_asked():
    k = np.random.default_rng(3).integers(0, 256, (5, 64, 4, 4, 1), dtype=np.uint8)  # [n, B, ...]
    key = jax.random.key(7)
    opts = dict(levels=256, uniform_dequantization=True, centered=True)
    no_flip = preprocessing.preprocess(key, k, **opts)
    jitted = jax.jit(functools.partial(preprocessing.preprocess, **opts, random_flip=True))
    flipped = np.asarray(jitted(key, k))
    assert flipped.shape == k.shape and flipped.dtype == np.float32
    np.testing.assert_allclose(flipped, preprocessing.preprocess(key, k, **opts, random_flip=True))
    # Without flips the dequantization noise is the same draw; with them each image is either
    # untouched or mirrored left-right, and both happen.
    centres = np.asarray(preprocessing.preprocess(None, k, levels=256))
    flipped_centres = np.asarray(
        jax.jit(functools.partial(preprocessing.preprocess, levels=256, random_flip=True))(key, k)
    )
    same = (flipped_centres == centres).all(axis=(2, 3, 4))
    mirrored = (flipped_centres == centres[:, :, :, ::-1]).all(axis=(2, 3, 4))
    assert (same | mirrored).all() and (~same).any() and (~mirrored).any()
    # Without flips it is exactly the dequantization of these pixels with this key, in place.
    expected = bpd.to_model_space(bpd.dequantize(key, k, 256), centered=True)
    np.testing.assert_array_equal(np.asarray(no_flip), np.asarray(expected))


def test_one_preprocessing_object_for_training_and_evaluation():
    k = np.random.default_rng(4).integers(0, 17, (6, 8, 8, 1), dtype=np.uint8)
    key = jax.random.key(2)
    train_map = preprocessing.Preprocessing(levels=17, random_flip=True)
    np.testing.assert_array_equal(
        train_map(key, k), preprocessing.preprocess(key, k, levels=17, random_flip=True)
    )
    evaluation = train_map.for_likelihood()  # dequantized (the density bits/dim measure), no flips
    assert evaluation == preprocessing.Preprocessing(levels=17, uniform_dequantization=True)
    continuous = preprocessing.Preprocessing(levels=None).for_likelihood()
    assert not continuous.uniform_dequantization
    # its unit conversion is bpd.py's: nats of the model-space density -> bits/dim
    nll = jnp.array([0.0, 64 * math.log(2.0)])
    np.testing.assert_allclose(
        evaluation.nats_to_bpd(nll, 64), [math.log2(17) - 1, math.log2(17)], rtol=1e-6
    )
    np.testing.assert_array_equal(continuous.nats_to_bpd(nll, 64), nll)  # stays in nats
    assert evaluation.nats_scale(64) == pytest.approx(1 / (64 * math.log(2.0)))


def test_bits_per_dim_offsets():
    """The additive constant of bits/dim: log2(levels) - log2(dx/dy); the paper's "+7" for
    8-bit centred data ([-1, 1): dx/dy = 2), 8 uncentred."""
    assert bpd.bpd_offset(256, centered=True) == 7.0
    assert bpd.bpd_offset(256, centered=False) == 8.0
    assert bpd.bpd_offset(17, centered=True) == pytest.approx(math.log2(17) - 1.0)
    # a density of 1 per unit volume of model space: 0 nats, bits/dim = the offset alone
    np.testing.assert_allclose(bpd.nats_to_bpd(jnp.zeros(2), 3072), [7.0, 7.0])
    # D ln 2 nats more is exactly one more bit per dimension
    np.testing.assert_allclose(bpd.nats_to_bpd(jnp.array([3072 * math.log(2.0)]), 3072), [8.0])
    # a dequantizer's log q(u|x) adds its own nats through the same scale
    np.testing.assert_allclose(
        bpd.nats_to_bpd(jnp.zeros(1), 4, log_q_dequant=jnp.array([-4 * math.log(2.0)])), [6.0]
    )
    with pytest.raises(ValueError, match="levels"):
        bpd.bpd_offset(1)
    with pytest.raises(ValueError, match="num_dims"):
        bpd.bits_per_dim_scale(0)


def test_preprocess_rejects_misuse():
    k = np.zeros((2, 4, 4, 1), np.uint8)
    with pytest.raises(TypeError, match="integer pixels"):
        preprocessing.preprocess(None, k.astype(np.float32), levels=256)
    with pytest.raises(ValueError, match="need a PRNG key"):
        preprocessing.preprocess(None, k, levels=256, uniform_dequantization=True)
