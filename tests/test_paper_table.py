"""experiments/paper_table.py: a killed table run resumes without retraining finished rows, and
the report's statistics."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import paper_table  # noqa: E402

# a tiny budget: nf 8, 20 steps, bound only (the ODE's compile would dominate), 20 test images
TINY = [
    "--dataset=digits",
    "--seeds=1",
    "--rows=vp_sigma2,vp_g2",
    "--test-images=20",
    "--curve-images=10",
    "--curve-num-t=4",  # = eval.num_t: the curve and the final bound share one compiled program
    "--gap-images=2",  # the one ODE: bound and ODE at the snapshot of the first row
    "--set=model.nf=8",
    "--set=training.n_iters=20",
    "--set=training.snapshot_freq=20",
    "--set=training.snapshot_freq_for_preemption=10",
    "--set=training.log_freq=5",
    "--set=training.eval_freq=10",
    "--set=eval.ode=False",
    "--set=eval.num_t=4",
    "--set=eval.batch_size=10",
]


def _start(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "paper_table.py"),
        f"--workdir={tmp_path / 'runs'}",
        f"--out={tmp_path / 'out'}",
        *TINY,
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    with open(tmp_path / "table.out", "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _output(tmp_path) -> str:
    return (tmp_path / "table.out").read_text()[-4000:]


def _wait_for(path: Path, proc, tmp_path, timeout: float = 600.0) -> None:
    start = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"table run ended early:\n{_output(tmp_path)}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.5)


def test_killed_table_resumes_without_retraining_finished_rows(tmp_path):
    runs = tmp_path / "runs"
    first, second = runs / "vp_sigma2" / "seed0", runs / "vp_g2" / "seed0"
    proc = _start(tmp_path)
    # the first row is finished, the second is training: kill the table run there
    _wait_for(first / "table" / "tprofile.json", proc, tmp_path)
    _wait_for(second / "train_log.txt", proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "digits.md").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (first / "table").iterdir()}
    checkpoints = sorted(p.name for p in (first / "checkpoints").iterdir())

    proc = _start(tmp_path)
    assert proc.wait(timeout=900) == 0, _output(tmp_path)
    # the finished row was neither retrained nor re-evaluated
    assert {p.name: p.stat().st_mtime_ns for p in (first / "table").iterdir()} == done
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == checkpoints
    starts = (first / "train_log.txt").read_text().count("start score model")
    assert starts == 1
    # the killed row finished, and the report has both rows
    assert (second / "table" / "tprofile.json").exists()
    table = json.loads((tmp_path / "out" / "digits.json").read_text())
    assert set(table) == {"vp_sigma2", "vp_g2"}
    text = (tmp_path / "out" / "digits.md").read_text()
    assert "| `vp_sigma2` |" in text and "| `vp_g2` |" in text
    assert (tmp_path / "out" / "digits_curves.png").exists()
    assert (tmp_path / "out" / "digits_loss_variance.png").exists()
    gap = json.loads((first / "table" / "gap.json").read_text())
    assert gap["num_images"] == 2 and [p["step"] for p in gap["points"]] == [20]
    assert all(math.isfinite(p["ode"]) and math.isfinite(p["gap"]) for p in gap["points"])
    assert (tmp_path / "out" / "digits_gap.png").exists()
    train = json.loads((second / "table" / "train.json").read_text())
    assert train["steps"] == 20 and all(math.isfinite(s["loss_var"]) for s in train["series"])
    # every stage's record names the code and the machine that produced it, and so does the report
    assert train["commit"] != "unknown" and " cores, " in train["machine"]
    assert "Stages by the commit that ran them: " in text


def test_train_log_parsing_keeps_the_last_line_of_a_repeated_step(tmp_path):
    log = tmp_path / "train_log.txt"
    log.write_text(
        "start score model step=0\n"
        "step=5 loss=1.0 loss_var=2.0\nstep=10 loss=0.5 loss_var=1.0\n"
        "start score model step=5\nstep=10 loss=0.25 loss_var=0.5\n"
    )
    parsed = paper_table.parse_train_log(log)
    assert [v["step"] for v in parsed] == [5, 10]
    assert parsed[1]["loss"] == 0.25 and parsed[1]["loss_var"] == 0.5


@pytest.mark.parametrize(
    ("diff", "se", "verdict"),
    [(-0.3, 0.1, "held"), (0.3, 0.1, "did not hold"), (-0.1, 0.1, "not resolved")],
)
def test_verdicts_need_two_standard_errors(diff, se, verdict):
    assert paper_table._verdict(diff, se, -1).startswith(verdict)


def test_paired_differences_are_per_image_within_a_seed():
    a = {
        "uniform": [{"bound": {"per_image": [1.0, 2.0, 3.0]}}, {"bound": {"per_image": [2.0] * 3}}]
    }
    b = {
        "uniform": [{"bound": {"per_image": [0.5, 1.5, 2.5]}}, {"bound": {"per_image": [1.0] * 3}}]
    }
    m, se, pse, n = paper_table._paired(a, "uniform", b, "uniform", "bound")
    assert n == 2 and m == pytest.approx(0.75)
    assert se == pytest.approx(np.std([0.5, 1.0], ddof=1) / math.sqrt(2))
    assert pse == pytest.approx(0.0)


def test_stage_commits_count_every_record_and_the_unstamped_ones():
    table = {
        "vp_g2": {
            "seeds": [0, 1],
            "train": [{"commit": "abc1234"}, {"commit": "def5678"}],
            "uniform": [{"commit": "abc1234"}, None],
            "tprofile": {"step": 3},  # recorded before the stamp
        },
        "vp_sigma2": {"seeds": [0], "train": [{"commit": "abc1234"}], "tprofile": None},
    }
    assert paper_table.stage_commits(table) == {"abc1234": 3, "def5678": 1, "not recorded": 1}


def test_claim_four_reports_the_gap_at_every_snapshot():
    points = [
        {"step": 500, "gap": -0.5, "gap_se": 0.02},
        {"step": 1000, "gap": -0.25, "gap_se": 0.01},
    ]
    table = {"vp_g2": {"seeds": [0], "gap": {"num_images": 50, "points": points}}}
    args = argparse.Namespace(rows=["vp_g2"], first_seed=0)
    text = paper_table.claims(table, args)[3]
    assert "first 50 test images" in text
    assert "vp_g2 -0.50, -0.25 (steps 500..1000, ± ≤ 0.02)" in text
