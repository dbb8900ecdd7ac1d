"""`python -m mlscore_jax.nll`: bits/dim of image files equal `evaluate.evaluate_split` on the
same images with the same settings and keys, bit for bit; file formats, user errors, skipping."""

import csv
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate import ROOT, TINY, _env, _exp

from mlscore_jax import evaluate, models, nll, parallel, train

NUM = 5  # test images
SMALL = ["--config.eval.batch_size=8"]  # one padded batch of 8 (4 devices): quick
SHAPE = (8, 8, 1)


def _small_exp(*overrides):
    return _exp(*SMALL, *overrides)


@pytest.fixture(scope="module")
def exp():
    return _small_exp()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a 20-step tiny digits MLP (as in test_evaluate)."""
    workdir = tmp_path_factory.mktemp("nll") / "run"
    train.train_and_evaluate(_exp(), str(workdir), progress=False)
    return workdir


def _write_pngs(folder, images):
    """8-bit grayscale PNGs holding the raw values (0..16 for digits)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, x in enumerate(images):
        path = folder / f"digit{i}.png"
        Image.fromarray(np.ascontiguousarray(x[..., 0])).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture
def pngs(exp, tmp_path):
    return _write_pngs(tmp_path / "png", exp.dataset.test[:NUM])


def _settings(exp, method, num_repeats):
    """The settings written out independently of nll.settings_for."""
    return dataclasses.replace(
        exp.eval.bpd, ode=method == "ode", bound=method == "bound", num_repeats=num_repeats
    )


def _reference(exp, workdir, images, settings, out_dir):
    """The evaluation path itself on `images`: per-image arrays [R, N] and metrics."""
    mesh = parallel.make_mesh()
    params, _ = train.restore_params(exp, str(workdir), mesh)
    metrics = evaluate.evaluate_split(
        models.ScoreModel(exp.model, exp.sde),
        exp.sde,
        exp.preprocessing,
        images,
        settings,
        str(out_dir),
        params=params,
        mesh=mesh,
    )
    with np.load(out_dir / "per_image.npz") as f:
        return {k: f[k] for k in f.files}, metrics


def _nll(workdir, *args):
    cmd = [
        sys.executable, "-m", "mlscore_jax.nll", f"--workdir={workdir}",
        "--config=configs/cpu/digits_mlp.py", "--progress=false", *TINY, *SMALL, *map(str, args),
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method,num_repeats", [("ode", 2), ("bound", 1)])
def test_files_give_the_numbers_of_the_evaluation_path(
    exp, trained, pngs, tmp_path, method, num_repeats
):
    """The headline: 5 digits PNGs through nll = evaluate_split on dataset.test[:5], exactly,
    per image and repeat; the table's error bars and NFE follow from those arrays."""
    settings = _settings(exp, method, num_repeats)
    ref, metrics = _reference(exp, trained, exp.dataset.test[:NUM], settings, tmp_path / "ref")

    out = nll.nll_of_files(exp, str(trained), pngs, method=method, num_repeats=num_repeats)
    assert out.images.settings == settings and out.images.step == 20 and out.skipped == []
    assert os.path.dirname(out.images.out_dir) == str(trained / "nll")
    assert method in os.path.basename(out.images.out_dir)
    for key in ref:
        np.testing.assert_array_equal(out.images.per[key], ref[key], err_msg=key)
    assert out.images.per[method].shape == (num_repeats, NUM)

    rows = out.rows
    assert [r.file for r in rows] == [*pngs, "mean"]
    values = ref[method].astype(np.float64)
    assert [r.bpd for r in rows[:-1]] == values.mean(axis=0).tolist()
    assert rows[-1].bpd == metrics[method]["mean"]
    if method == "ode":  # K = 2: the spread of the repeats; NFE of the solves
        se = values.std(axis=0, ddof=1) / np.sqrt(2)
        np.testing.assert_allclose([r.stderr for r in rows[:-1]], se, rtol=1e-12)
        assert rows[-1].stderr == pytest.approx(metrics["ode"]["mc_stderr"], rel=1e-12)
        assert [r.nfe for r in rows[:-1]] == ref["ode_nfe"].mean(axis=0).tolist()
        assert rows[-1].nfe == pytest.approx(metrics["ode"]["nfe"]["mean"])
        assert all(r.nfe >= 7 for r in rows)
    else:  # K = 1: the bound's own error from its draws; no NFE
        assert [r.stderr for r in rows[:-1]] == ref["bound_stderr"][0].astype(float).tolist()
        assert rows[-1].stderr == pytest.approx(metrics["bound"]["mc_stderr_from_draws"], rel=1e-12)
        assert all(r.nfe is None for r in rows)
    assert [float(r["bits_per_dim"]) for r in _read_csv(out.csv_path)] == [r.bpd for r in rows]


def test_the_command_prints_the_same_numbers_and_skips_non_images(exp, trained, pngs, tmp_path):
    """The real program on a fresh copy of the workdir (nothing to resume): the per-image ODE
    bits/dim of its CSV equal evaluate_split's; a text file and a truncated PNG are skipped."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("nll"))
    settings = _settings(exp, "ode", 2)
    ref, _ = _reference(exp, trained, exp.dataset.test[:NUM], settings, tmp_path / "ref")
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(pngs[0]).read_bytes()[:40])

    p = _nll(workdir, pngs[0], text, *pngs[1:3], truncated, *pngs[3:])
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert f"skipped {text}: not a readable image" in p.stderr
    assert f"skipped {truncated}: not a readable image" in p.stderr
    (out_dir,) = (workdir / "nll").glob("step20_ema_ode_*")
    csv_path = out_dir / "nll.csv"
    assert f"CSV written to {csv_path}" in p.stderr
    rows = _read_csv(csv_path)
    assert [r["file"] for r in rows] == [*pngs, "mean"]
    expected = ref["ode"].astype(np.float64).mean(axis=0).tolist()
    assert [float(r["bits_per_dim"]) for r in rows[:-1]] == expected
    assert all(r["stderr"] and float(r["nfe"]) > 0 for r in rows)
    table = p.stdout.strip().splitlines()
    assert table[0].split() == ["file", "ode", "bits/dim", "stderr", "NFE"]
    assert len(table) == 1 + NUM + 2 and table[-1].startswith("mean")
    assert table[1].split()[0] == pngs[0]
    assert float(table[1].split()[1]) == pytest.approx(float(rows[0]["bits_per_dim"]), abs=1e-4)


def test_npz_and_npy_give_the_numbers_of_the_pngs(exp, trained, pngs, tmp_path):
    images = exp.dataset.test[:NUM]
    np.savez(tmp_path / "x.npz", x=images, labels=np.arange(NUM))
    np.savez(tmp_path / "only.npz", digits=images)
    np.save(tmp_path / "nhwc.npy", images)
    np.save(tmp_path / "nhw.npy", images[..., 0].astype(np.int64))  # exact integers: accepted
    np.save(tmp_path / "one.npy", images[0])  # [H, W, C]: one image
    _, from_png, _ = nll.read_images(pngs, SHAPE, 17)
    np.testing.assert_array_equal(from_png, images)
    for name in ("x.npz", "only.npz", "nhwc.npy", "nhw.npy"):
        path = str(tmp_path / name)
        names, x, skipped = nll.read_images([path], SHAPE, 17)
        assert names == [f"{path}[{i}]" for i in range(NUM)] and skipped == []
        assert x.dtype == np.uint8
        np.testing.assert_array_equal(x, images)
    names, x, _ = nll.read_images([tmp_path / "one.npy", pngs[1]], SHAPE, 17)
    assert names == [f"{tmp_path / 'one.npy'}[0]", pngs[1]]
    np.testing.assert_array_equal(x, images[:2])

    # evaluated afresh (a copy without nll/): the same arrays as the PNGs give
    from_pngs = nll.nll_of_files(exp, str(trained), pngs, method="bound", num_repeats=1)
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("nll"))
    from_npz = nll.nll_of_files(
        exp, str(workdir), [tmp_path / "x.npz"], method="bound", num_repeats=1
    )
    for key, value in from_pngs.images.per.items():
        np.testing.assert_array_equal(from_npz.images.per[key], value, err_msg=key)
    assert [r.bpd for r in from_npz.rows] == [r.bpd for r in from_pngs.rows]

    # the same pixels again (another file format): the same directory, nothing recomputed
    batch_files = sorted(os.scandir(from_npz.images.out_dir), key=lambda e: e.name)
    before = {e.name: e.stat().st_mtime_ns for e in batch_files if e.name.startswith("repeat")}
    again = nll.nll_of_files(
        exp, str(workdir), [tmp_path / "nhwc.npy"], method="bound", num_repeats=1
    )
    assert again.images.out_dir == from_npz.images.out_dir
    after = {n: os.stat(os.path.join(again.images.out_dir, n)).st_mtime_ns for n in before}
    assert before and after == before
    # other images or settings: another directory
    other = nll.output_dir(
        str(workdir), images[::-1], from_npz.images.settings, step=20, use_ema=True
    )
    assert other != from_npz.images.out_dir
    more = dataclasses.replace(from_npz.images.settings, num_repeats=2)
    assert nll.output_dir(str(workdir), images, more, step=20, use_ema=True) != other


def test_wrong_size_is_one_line_exit_status_2(exp, pngs, tmp_path):
    """Nothing is trained or restored: the files are checked first."""
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(big)
    p = _nll(tmp_path / "empty", *pngs[:2], big)
    assert p.returncode == 2, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {big}: image of shape (9, 9, 1), but the model takes (8, 8, 1) "
        "(images are not resized)"
    ]
    assert "Traceback" not in p.stderr and p.stdout == ""


def _rgb(tmp_path, name, rgb):
    path = tmp_path / name
    Image.fromarray(np.ascontiguousarray(rgb)).save(path)
    return path


def test_channels_are_converted_only_without_changing_the_pixels(exp, tmp_path):
    gray = exp.dataset.test[0, ..., 0]  # [8, 8], 0..16
    colour = np.stack([gray, gray, np.roll(gray, 1)], axis=-1)
    with pytest.raises(ValueError, match=r"colour image of shape \(8, 8, 3\).*\(8, 8, 1\)"):
        nll.read_images([_rgb(tmp_path, "colour.png", colour)], SHAPE, 17)
    # an RGB file of a grayscale image, a grayscale palette, opaque alpha: the same pixels
    rgb = _rgb(tmp_path, "rgb.png", np.repeat(gray[..., None], 3, axis=-1))
    palette = tmp_path / "palette.png"
    p = Image.frombytes("P", (8, 8), np.ascontiguousarray(16 - gray).tobytes())
    p.putpalette([max(16 - i, 0) for i in range(256) for _ in range(3)])  # index i: 16 - i
    p.save(palette)
    la = _rgb(tmp_path, "la.png", np.stack([gray, np.full_like(gray, 255)], axis=-1))
    names, x, skipped = nll.read_images([rgb, palette, la], SHAPE, 17)
    assert skipped == [] and names == [str(rgb), str(palette), str(la)]
    np.testing.assert_array_equal(x, np.broadcast_to(gray[None, ..., None], (3, 8, 8, 1)))
    transparent = _rgb(tmp_path, "t.png", np.stack([gray, np.full_like(gray, 7)], axis=-1))
    with pytest.raises(ValueError, match="transparent pixels"):
        nll.read_images([transparent], SHAPE, 17)
    # an RGB model: colour files pass as they are, a grayscale file is an error
    names, x, _ = nll.read_images([tmp_path / "colour.png"], (8, 8, 3), 256)
    np.testing.assert_array_equal(x[0], colour)
    gray_png = tmp_path / "gray.png"
    Image.fromarray(gray).save(gray_png)
    with pytest.raises(ValueError, match=r"grayscale image of shape \(8, 8, 1\).*\(8, 8, 3\)"):
        nll.read_images([gray_png], (8, 8, 3), 256)
    # arrays of the wrong shape; an .npz that does not say which array holds the images
    np.save(tmp_path / "rgb.npy", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"rgb.npy: images of shape \(2, 8, 8, 3\).*\(8, 8, 1\)"):
        nll.read_images([tmp_path / "rgb.npy"], SHAPE, 17)
    np.savez(tmp_path / "two.npz", a=np.zeros((1, 8, 8, 1), np.uint8), b=np.zeros(3))
    with pytest.raises(ValueError, match="none is named 'x'"):
        nll.read_images([tmp_path / "two.npz"], SHAPE, 17)
    with pytest.raises(FileNotFoundError, match="missing.png: no such file"):
        nll.read_images([tmp_path / "missing.png"], SHAPE, 17)


def test_pixel_values_must_fit_the_levels(exp, tmp_path):
    x = exp.dataset.test[:4].copy()
    x[2, 3, 3, 0] = 17
    paths = _write_pngs(tmp_path / "png", x)
    with pytest.raises(ValueError, match=r"digit2.png: pixel value 17 >= levels=17 .*0..16"):
        nll.read_images(paths, SHAPE, 17)
    scaled = (exp.dataset.test[:2].astype(np.int64) * 255 // 16).astype(np.uint8)  # 0..255
    np.save(tmp_path / "scaled.npy", scaled)
    with pytest.raises(ValueError, match=r"scaled.npy\[0\]: pixel value 255 >= levels=17"):
        nll.read_images([tmp_path / "scaled.npy"], SHAPE, 17)
    np.save(tmp_path / "float.npy", exp.dataset.test[:2].astype(np.float32))
    with pytest.raises(ValueError, match="must be integers"):
        nll.read_images([tmp_path / "float.npy"], SHAPE, 17)
    assert nll.read_images(paths[:2], SHAPE, 17)[1].max() <= 16


def test_non_images_are_skipped_and_the_csv_has_the_rest(exp, trained, pngs, tmp_path, caplog):
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    fake = tmp_path / "fake.npy"
    fake.write_text("no numpy here")
    csv_path = tmp_path / "out" / "table.csv"
    out = nll.nll_of_files(
        exp, str(trained), [text, *pngs[:3], fake], method="bound", num_repeats=1,
        csv_path=str(csv_path),
    )  # fmt: skip
    assert out.skipped == [
        (str(text), f"not a readable image (cannot identify image file '{text}')"),
        (str(fake), "not a .npy file"),
    ]
    assert f"skipped {text}" in caplog.text and f"skipped {fake}" in caplog.text
    assert out.csv_path == str(csv_path)
    rows = _read_csv(csv_path)
    assert [r["file"] for r in rows] == [*pngs[:3], "mean"]
    assert [float(r["bits_per_dim"]) for r in rows] == [r.bpd for r in out.rows]
    assert [float(r["stderr"]) for r in rows] == [r.stderr for r in out.rows]
    assert all(r["nfe"] == "" for r in rows)
    with pytest.raises(ValueError, match="no images to evaluate: all 2 files were skipped"):
        nll.nll_of_files(exp, str(trained), [text, fake])


def test_per_image_table_and_its_text():
    rng = np.random.default_rng(0)
    per = {"ode": rng.normal(3.0, 0.1, (3, 4)), "ode_nfe": rng.integers(20, 40, (3, 4))}
    rows = nll.per_image_table(list("abcd"), per, "ode")
    assert rows[1].bpd == pytest.approx(per["ode"][:, 1].mean())
    assert rows[1].stderr == pytest.approx(per["ode"][:, 1].std(ddof=1) / np.sqrt(3))
    assert rows[-1].stderr == pytest.approx(per["ode"].mean(axis=1).std(ddof=1) / np.sqrt(3))
    assert rows[-1].nfe == pytest.approx(per["ode_nfe"].mean())
    one = nll.per_image_table(list("abcd"), {k: v[:1] for k, v in per.items()}, "ode")
    assert all(r.stderr is None for r in one)
    bound = {"bound": per["ode"][:2], "bound_stderr": np.full((2, 4), 0.3)}
    rows = nll.per_image_table(list("abcd"), bound, "bound")
    assert rows[0].stderr == pytest.approx(per["ode"][:2, 0].std(ddof=1) / np.sqrt(2))
    rows = nll.per_image_table(list("abcd"), {k: v[:1] for k, v in bound.items()}, "bound")
    assert rows[0].stderr == pytest.approx(0.3) and rows[-1].stderr == pytest.approx(0.3 / 2)
    text = nll.format_table(one).splitlines()
    assert text[0].split() == ["file", "bits/dim", "stderr", "NFE"]
    assert text[1].split()[2] == "-" and text[-1].split()[0] == "mean"
    with pytest.raises(ValueError, match="unknown method"):
        nll.settings_for(nll.BpdSettings(), "exact")
