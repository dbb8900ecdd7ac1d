"""Probability-flow ODE likelihood against the closed form on Gaussian data (exact score)."""

import math
import os
import subprocess
import sys
import textwrap

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sde import LinearLogSNR

from mlscore_jax.gaussian import GaussianData
from mlscore_jax.likelihood import EVALS, ode_nll
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

DATA = GaussianData(mean=jnp.linspace(-0.5, 0.5, 16), std=0.1)
CASES = [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5), (LinearLogSNR(), 1e-3)]


@pytest.mark.parametrize("sde,eps", CASES)
def test_exact_trace_matches_closed_form(sde, eps):
    x = DATA.sample(jax.random.key(0), 6)
    r = jax.jit(lambda x: ode_nll(DATA.score_fn(sde), sde, x, None, eps=eps, divergence="exact"))(x)
    np.testing.assert_allclose(r.nll, DATA.ode_nll(sde, x, eps), rtol=1e-4)
    assert bool(r.success.all())
    assert r.z.shape == x.shape and r.nfe.shape == (6,)


def test_rademacher_is_exact_for_a_diagonal_jacobian():
    """Isotropic Gaussian data: the drift's Jacobian is c(t) I and v^T c I v = c D exactly."""
    sde, eps = VPSDE(), 1e-5
    x = DATA.sample(jax.random.key(0), 4)
    r = ode_nll(DATA.score_fn(sde), sde, x, jax.random.key(1), eps=eps)
    np.testing.assert_allclose(r.nll, DATA.ode_nll(sde, x, eps), rtol=1e-4)


@pytest.mark.parametrize("sde,eps", CASES[:2])
def test_gaussian_probes_unbiased(sde, eps):
    x = DATA.sample(jax.random.key(0), 1)
    xs = jnp.repeat(x, 200, axis=0)  # one image, 200 independent probes
    r = jax.jit(
        lambda x, k: ode_nll(DATA.score_fn(sde), sde, x, k, eps=eps, divergence="gaussian")
    )(xs, jax.random.key(3))
    se = float(r.nll.std() / math.sqrt(xs.shape[0]))
    assert se > 0.1  # Gaussian probes do have variance here
    assert abs(float(r.nll.mean() - DATA.ode_nll(sde, x, eps)[0])) < 3 * se


def test_jit_and_vmap_give_the_same_numbers():
    sde, eps = SubVPSDE(), 1e-2
    x = DATA.sample(jax.random.key(0), 4)
    key = jax.random.key(1)
    f = lambda x, k: ode_nll(DATA.score_fn(sde), sde, x, k, eps=eps).nll  # noqa: E731
    eager = f(x, key)
    jitted = jax.jit(f)(x, key)
    # vmap over two batches of two; the probes of each batch come from its own key
    keys = jnp.stack([key, key])
    xs = jnp.stack([x, x])
    vmapped = jax.vmap(f)(xs, keys)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    np.testing.assert_allclose(vmapped[0], eager, rtol=1e-5)
    np.testing.assert_allclose(vmapped[1], eager, rtol=1e-5)


def test_nfe_counts_every_vector_field_evaluation():
    """The NFE formula (start-up + per-step x steps) checked against a host-side counter."""
    sde, eps = VPSDE(), 1e-5
    x = DATA.sample(jax.random.key(0), 1)
    exact_score = DATA.score_fn(sde)
    calls = []

    def counting_score(x, t):
        jax.debug.callback(lambda: calls.append(1), ordered=False)
        return exact_score(x, t)

    for solver in ("tsit5", "dopri5", "bosh3", "heun"):
        calls.clear()
        r = ode_nll(counting_score, sde, x, jax.random.key(1), eps=eps, solver=solver)
        jax.effects_barrier()
        assert len(calls) == int(r.nfe[0]), (solver, len(calls), r.nfe, r.num_steps)
    assert EVALS[diffrax.Tsit5] == (1, 6)


def test_max_steps_exceeded_is_a_clear_error_or_a_flag():
    sde, eps = VPSDE(), 1e-5
    x = DATA.sample(jax.random.key(0), 2)
    with pytest.raises(Exception, match="maximum number of solver steps"):
        ode_nll(DATA.score_fn(sde), sde, x, jax.random.key(1), eps=eps, max_steps=3)
    r = ode_nll(DATA.score_fn(sde), sde, x, jax.random.key(1), eps=eps, max_steps=3, throw=False)
    assert not bool(r.success.any()) and bool(jnp.isnan(r.nll).all())


def test_bad_arguments():
    sde, x = VPSDE(), jnp.zeros((2, 4))
    with pytest.raises(ValueError, match="divergence"):
        ode_nll(DATA.score_fn(sde), sde, x, jax.random.key(0), divergence="hutchinson")
    with pytest.raises(ValueError, match="PRNG key"):
        ode_nll(DATA.score_fn(sde), sde, x, None)
    with pytest.raises(ValueError, match="solver"):
        ode_nll(DATA.score_fn(sde), sde, x, jax.random.key(0), solver="rk45")


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mlscore_jax.gaussian import GaussianData
    from mlscore_jax.likelihood import ode_nll
    from mlscore_jax.sde import VPSDE
    assert jax.device_count() == 4, jax.devices()
    data = GaussianData(mean=jnp.linspace(-0.5, 0.5, 16), std=0.1)
    sde = VPSDE()
    x = data.sample(jax.random.key(0), 8)
    key = jax.random.key(1)
    f = jax.jit(lambda x, k: ode_nll(data.score_fn(sde), sde, x, k, eps=1e-5).nll)
    ref = np.asarray(f(x, key))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    out = f(xs, key)
    assert len(out.sharding.device_set) == 4, out.sharding
    np.testing.assert_allclose(np.asarray(out), ref, rtol=2e-5)  # float32 round-off
    print("SHARDED_OK")
    """
)


def test_sharded_over_four_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
