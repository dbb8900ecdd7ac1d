"""Guards against known miscompilations of the XLA version we run on, and the workaround's
version gate."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mlscore_jax  # (sets XLA_FLAGS before the backend starts)


def test_fused_reduce_with_expm1_matches_op_by_op():
    """jaxlib 0.10.2's YNNPACK fusion got this wrong by O(1); mlscore_jax disables it there.

    On every other jaxlib the fusion runs, and this test is the detector: if it fails, the
    version belongs in mlscore_jax.YNN_MISCOMPILING_JAXLIB. The op-by-op reference and the
    fused program compute the same float32 chain: a sum of 4 (in any order within 3 u of the
    exact sum of |z_i|), two expm1, a divide and a multiply (a few ulps each, ~6 u on the ratio
    r = expm1(2t) / expm1(t) in [2, 3.8]). Each side is thus within 8 u (sum |z_i| r + |f|) of
    the exact value (measured: 3.9 u), and the two within 16 u of that. Not an elementwise
    rtol: the sum of 4 can cancel.
    """
    t = jax.random.uniform(jax.random.key(0), (200, 500), jnp.float32, 1e-2, 1.0)
    z = jax.random.normal(jax.random.key(1), (200, 500, 4))

    def f(t, z):
        return jnp.sum(z, -1) * jnp.expm1(2 * t) / jnp.expm1(t)

    t64, z64 = np.asarray(t, np.float64), np.asarray(z, np.float64)
    ratio = np.expm1(2 * t64) / np.expm1(t64)
    scale = np.abs(z64).sum(-1) * ratio + np.abs(z64.sum(-1) * ratio)
    fused, op_by_op = np.asarray(jax.jit(f)(t, z)), np.asarray(f(t, z))
    np.testing.assert_array_less(np.abs(fused - op_by_op), 16 * 2.0**-24 * scale)


@pytest.mark.parametrize(
    ("flags", "version", "expected"),
    [
        ("", "0.10.2", "--xla_cpu_experimental_ynn_fusion_type="),  # miscompiles: workaround
        ("--a=1", "0.10.2", "--a=1 --xla_cpu_experimental_ynn_fusion_type="),
        ("", "0.10.1", ""),  # not known to miscompile: untouched
        ("--a=1", "0.11.0", "--a=1"),
        (
            "--xla_cpu_experimental_ynn_fusion_type=all",
            "0.10.2",
            "--xla_cpu_experimental_ynn_fusion_type=all",
        ),  # noqa: E501 (the user's own choice wins)
        ("", None, ""),
    ],
)
def test_workaround_applies_only_to_the_miscompiling_jaxlib(flags, version, expected):
    assert mlscore_jax.xla_flags_with_workaround(flags, version) == expected


def test_import_sets_the_flag_for_the_installed_jaxlib():
    code = "import os, mlscore_jax; print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    installed = mlscore_jax._jaxlib_version()
    assert out.stdout.strip() == mlscore_jax.xla_flags_with_workaround("", installed)
    assert ("ynn_fusion_type=" in out.stdout) == (installed in mlscore_jax.YNN_MISCOMPILING_JAXLIB)
