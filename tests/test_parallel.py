"""Mesh, shardings and multi-process start-up: 4 CPU devices, and 2 real processes x 2 devices."""

import time

import jax
import numpy as np
import pytest
from _multiprocess_worker import Jobs, free_port, run_jobs
from jax.sharding import PartitionSpec

from mlscore_jax import parallel


def test_shardings_on_the_current_devices():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    assert parallel.data_sharding(mesh).spec == PartitionSpec("data")
    assert parallel.data_sharding(mesh, batch_axis=1).spec == PartitionSpec(None, "data")
    assert parallel.replicated(mesh).spec == PartitionSpec()
    n = jax.device_count()
    batch = {"image": np.ones((2 * n, 4, 4, 3), np.float32), "label": np.arange(2 * n)}
    out = parallel.shard_batch(batch, mesh)
    assert out["image"].shape == (2 * n, 4, 4, 3)
    assert out["image"].sharding == parallel.data_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
    with pytest.raises(ValueError, match="no batch axis 1"):
        parallel.shard_batch(np.zeros(4), mesh, batch_axis=1)


def test_single_process_is_a_no_op(monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    parallel.initialize_distributed()
    assert not jax.distributed.is_initialized()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        parallel.initialize_distributed()


def test_mesh_and_shard_batch_over_four_devices():
    (job,) = run_jobs([["mesh"]], num_devices=4, timeout=120)
    r = job.result
    assert not r["distributed"]  # nothing configured: auto-detection found no cluster
    assert r["mesh_shape"] == {"data": 4} and r["mesh_devices"] == 4
    assert r["shape"] == [8, 3] and r["spec"] == "P('data',)" and r["is_data_sharding"]
    assert r["shard_rows"] == [[0, 3], [6, 9], [12, 15], [18, 21]]  # 2 rows per device, in order
    assert r["same"]
    assert r["scan_shape"] == [5, 8, 3] and r["scan_spec"] == "P(None, 'data')"
    assert r["scan_shard_shape"] == [5, 2, 3] and r["scan_label_spec"] == "P(None, 'data')"
    assert r["scan_same"]
    assert r["per_process_batch_size"] == 8
    assert "not divisible by the number of devices (4)" in r["errors"]["shard_batch"]
    assert "multiple of the number of devices (4)" in r["errors"]["per_process_batch_size"]


def test_two_processes_compute_the_single_process_result():
    port = free_port()
    jobs = [
        [
            "dist-parallel",
            "--port",
            str(port),
            "--num-processes",
            "2",
            "--process-id",
            str(i),
            "--local-devices",
            "2",
        ]
        for i in range(2)
    ]
    results = [job.result for job in run_jobs(jobs, num_devices=2, timeout=120)]
    assert [r["process_index"] for r in results] == [0, 1]
    for r in results:
        assert r["process_count"] == 2 and r["local_device_count"] == 2
        assert r["device_count"] == 4 and r["mesh_devices"] == 4
        assert r["global_shape"] == [8, 3] and r["spec"] == "P('data',)"
        for name, value in r["result"].items():
            assert value == pytest.approx(r["reference"][name], rel=1e-5, abs=1e-5), name
        assert r["gathered_same"]  # process p's rows are rows [4p, 4p + 4) of the global batch
        assert r["scan_shape"] == [2, 8, 3]
        np.testing.assert_allclose(r["scan_sums"], r["scan_reference"], rtol=1e-5)
    assert results[0]["result"] == results[1]["result"]


def test_a_missing_peer_fails_instead_of_hanging():
    # process 1 never starts: process 0 must give up on its own (jax.distributed's
    # initialization_timeout), and run_jobs' deadline would kill it if it did not
    runner = Jobs(
        [
            [
                "dist-parallel",
                "--port",
                str(free_port()),
                "--num-processes",
                "2",
                "--init-timeout",
                "2",
            ]
        ],
        num_devices=2,
    )
    try:
        start = time.monotonic()
        (job,) = runner.wait(timeout=90)
    finally:
        runner.close()
    assert job.returncode != 0
    assert time.monotonic() - start < 60
