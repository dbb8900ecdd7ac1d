"""Probability-flow ODE likelihood against the closed form on Gaussian data (exact score).

Pointwise comparisons with the closed form are at the error bound the solve itself implies
(`nll_error_bound`), not at a fixed tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sde import LinearLogSNR

from mlscore_jax import parallel
from mlscore_jax.gaussian import GaussianData
from mlscore_jax.likelihood import ode_nll
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

DATA = GaussianData(mean=jnp.linspace(-0.5, 0.5, 16), std=0.1)
CASES = [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5), (LinearLogSNR(), 1e-3)]
# Solver tolerances of the pointwise checks. At the default rtol = atol = 1e-5 the solves take
# 10-20 steps, too few for the embedded error estimate to be reliable: in one subVP sample of
# tests/test_sampling.py an accepted step of h = 0.26 errs by 1.9e-3, ~75 times the tolerance
# it passed. At 1e-7 they take 25-45 steps and stay well inside the bounds below.
TIGHT = dict(rtol=1e-7, atol=1e-7)

U = 2.0**-24  # float32 unit roundoff
# Float32 rounding of one Runge-Kutta update y + h sum_i b_i k_i, relative to |y|: the final add,
# and the stage sum, whose terms are at most |y| in size and each carry a few roundings.
ROUND_PER_STEP = 4 * U


def assert_within(actual, desired, bound, what=""):
    """|actual - desired| <= bound elementwise (bound broadcasts against actual), in float64."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    excess = np.abs(actual - desired) - np.broadcast_to(np.asarray(bound, np.float64), actual.shape)
    assert np.isfinite(actual).all() and (excess <= 0).all(), (
        f"{what}: {int((excess > 0).sum())} of {excess.size} beyond the bound, worst by "
        f"{excess.max():.3g}; |diff| {np.abs(actual - desired).max():.3g}"
    )


def variance_path(data, sde, eps, n=4097):
    """v(t) = alpha^2 s^2 + sigma^2 on a geometric grid of [eps, T] (float64), v[0] = v(eps)."""
    t = jnp.asarray(np.geomspace(eps, sde.T, n), jnp.float32)
    return np.asarray(data.marginal_var(sde, t), np.float64)


def nll_error_bound(r, sde, log_phi, mean, rtol, atol):
    """Bound on |r.nll - exact| per example for `ode_nll` of a model whose flow is affine,
    x(t) = alpha(t) mean + Phi(t) (x(eps) - alpha(eps) mean), and whose divergence does not
    depend on x (Gaussian data with its exact score, or the linear scores of tests/test_bound.py).

    log_phi: log Phi(t) on a grid of [eps, T] (log_phi[0] = 0); for Gaussian data with the
    exact score Phi = sqrt(v(t) / v(eps)) (`data_log_phi`).

    The controller accepts a step when the RMS over the D + 1 components of the augmented state
    of err_i / (atol + rtol |y_i|) is <= 1, so the local error vector, weighted by those scales,
    has 2-norm <= sqrt(D + 1). An x error made at time t reaches z scaled by Phi(T) / Phi(t), at
    most g = max_t Phi(T) / Phi(t), and -log pi(z) moves by z dz / s^2; delta errors just add
    up. By Cauchy-Schwarz a step then moves the NLL by at most
        sqrt(D + 1) * hypot(|z|_2 / s^2 * (atol g + rtol X), atol + rtol delta_max),
    with X >= |x_j(t)| Phi(T) / Phi(t) (= |mean| g + |z - alpha_T mean| along the exact path)
    and delta_max = max_t |delta(t)|, delta(t) being proportional to log Phi(t). Summed over the
    attempted steps (rejected ones only add margin), with rtol raised by the float32 rounding
    of each update, plus the float32 rounding of a closed form (a few u of |log pi| + |delta|).
    """
    z = np.asarray(r.z, np.float64).reshape(len(r.nll), -1)
    d = z.shape[1]
    g = math.exp(np.max(log_phi[-1] - log_phi))
    delta_max = np.abs(np.asarray(r.delta_logp, np.float64)) * np.abs(log_phi).max()
    delta_max /= abs(log_phi[-1])
    mean = np.broadcast_to(np.asarray(mean, np.float64).ravel(), (d,))
    alpha_t = float(sde.marginal(jnp.asarray(sde.T))[0])
    x_scale = np.abs(mean).max() * g + np.abs(z - alpha_t * mean).max(1)
    rt = rtol + ROUND_PER_STEP
    per_step = math.sqrt(d + 1) * np.hypot(
        np.linalg.norm(z, axis=1) / sde.prior_std**2 * (atol * g + rt * x_scale),
        atol + rt * delta_max,
    )
    oracle = 8 * U * (np.abs(np.asarray(r.prior_logp)) + np.abs(np.asarray(r.delta_logp)))
    return np.asarray(r.num_steps) * per_step + oracle


def data_log_phi(data, sde, eps):
    """log Phi(t) = log sqrt(v(t) / v(eps)) for Gaussian data with the exact score."""
    v = variance_path(data, sde, eps)
    return 0.5 * np.log(v / v[0])


def exact_score_bound(r, sde, eps, rtol, atol):
    """`nll_error_bound` for DATA with its exact score."""
    return nll_error_bound(r, sde, data_log_phi(DATA, sde, eps), DATA.mean, rtol, atol)


@pytest.mark.parametrize("sde,eps", CASES, ids=["vp", "subvp", "ve", "linear-logsnr"])
def test_exact_trace_matches_closed_form(sde, eps):
    x = DATA.sample(jax.random.key(0), 6)
    r = jax.jit(
        lambda x: ode_nll(DATA.score_fn(sde), sde, x, None, eps=eps, divergence="exact", **TIGHT)
    )(x)
    bound = exact_score_bound(r, sde, eps, **TIGHT)
    assert_within(r.nll, DATA.ode_nll(sde, x, eps), bound, "nll")
    assert bool(r.success.all())
    assert r.z.shape == x.shape and r.nfe.shape == (6,)


def test_rademacher_is_exact_for_a_diagonal_jacobian():
    """Isotropic Gaussian data: the drift's Jacobian is c(t) I and v^T c I v = c D exactly."""
    sde, eps = VPSDE(), 1e-5
    x = DATA.sample(jax.random.key(0), 4)
    r = ode_nll(DATA.score_fn(sde), sde, x, jax.random.key(1), eps=eps, **TIGHT)
    bound = exact_score_bound(r, sde, eps, **TIGHT)
    assert_within(r.nll, DATA.ode_nll(sde, x, eps), bound, "nll")


@pytest.mark.parametrize("sde,eps", CASES[:2], ids=["vp", "subvp"])
def test_gaussian_probes_unbiased(sde, eps):
    x = DATA.sample(jax.random.key(0), 1)
    xs = jnp.repeat(x, 200, axis=0)  # one image, 200 independent probes
    r = jax.jit(
        lambda x, k: ode_nll(DATA.score_fn(sde), sde, x, k, eps=eps, divergence="gaussian")
    )(xs, jax.random.key(3))
    se = float(r.nll.std() / math.sqrt(xs.shape[0]))
    assert se > 0.1  # Gaussian probes do have variance here (Rademacher ones would not)
    # 4.5 standard errors: a false failure once in ~1e5 seeds (two-sided normal tail); the
    # solve's own error (nll_error_bound, ~1e-2 at the default tolerances) is << se.
    assert abs(float(r.nll.mean() - DATA.ode_nll(sde, x, eps)[0])) < 4.5 * se


def test_jit_and_vmap_give_the_same_numbers():
    """Gaussian probes, so the NLL depends on the key and a mix-up of keys would show."""
    sde, eps = SubVPSDE(), 1e-2
    x = DATA.sample(jax.random.key(0), 4)
    key = jax.random.key(1)

    def f(x, k):
        return ode_nll(DATA.score_fn(sde), sde, x, k, eps=eps, divergence="gaussian")

    eager = f(x, key)
    jitted = jax.jit(f)(x, key)
    # vmap over two batches of two; the probes of each batch come from its own key
    vmapped = jax.vmap(f)(jnp.stack([x, x]), jnp.stack([key, key]))
    # The programs differ only in float32 rounding, but a rounding difference can flip an
    # accept/reject decision of the step controller, so two results agree to within the sum of
    # their error bounds (both bound the distance to the same exact value, same probes).
    bound = exact_score_bound(eager, sde, eps, 1e-5, 1e-5)
    for i in range(3):
        other = jitted if i == 0 else jax.tree.map(lambda a, i=i: a[i - 1], vmapped)
        other_bound = exact_score_bound(other, sde, eps, 1e-5, 1e-5)
        assert_within(other.nll, eager.nll, bound + other_bound, "nll")
    # Another key draws other probes: far outside those bounds.
    assert (np.abs(np.asarray(f(x, jax.random.key(2)).nll - eager.nll)) > 10 * bound).all()


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
        for pcoeff, icoeff in ((0.3, 0.4), (0.0, 1.0)):  # the default PI and the I controller
            calls.clear()
            r = ode_nll(
                counting_score,
                sde,
                x,
                jax.random.key(1),
                eps=eps,
                solver=solver,
                pcoeff=pcoeff,
                icoeff=icoeff,
            )
            jax.effects_barrier()
            assert len(calls) == int(r.nfe[0]) > 10, (solver, pcoeff, len(calls), r.nfe)


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


def test_sharded_over_four_cpu_devices():
    """A batch sharded over the 4 in-process CPU devices (tests/conftest.py) stays sharded and
    gives the unsharded numbers; Gaussian probes, so the probes must be the same ones too."""
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 4 and {d.platform for d in mesh.devices.flat} == {"cpu"}
    sde, eps = VPSDE(), 1e-5
    x = DATA.sample(jax.random.key(0), 8)
    key = jax.random.key(1)
    f = jax.jit(lambda x, k: ode_nll(DATA.score_fn(sde), sde, x, k, eps=eps, divergence="gaussian"))
    ref = f(x, key)
    xs = parallel.shard_batch(np.asarray(x), mesh)
    assert xs.sharding.is_equivalent_to(parallel.data_sharding(mesh), x.ndim)
    out = f(xs, key)
    assert out.nll.sharding.device_set == set(mesh.devices.flat), out.nll.sharding
    assert not out.nll.sharding.is_fully_replicated
    # Each example is solved on its own; only the vectorisation over the batch (8 rows on one
    # device, 2 on each of 4) differs, i.e. float32 rounding, which may flip a step decision:
    # the two agree to within the sum of their solve error bounds (default rtol = atol = 1e-5).
    bound = exact_score_bound(ref, sde, eps, 1e-5, 1e-5)
    bound = bound + exact_score_bound(out, sde, eps, 1e-5, 1e-5)
    assert_within(out.nll, ref.nll, bound, "sharded nll")


GAUSSIAN_VARIABLE_CASES = [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)]
# The bar for a reparametrised solve: the Gaussian closed form to 1e-4 nats at TIGHT.
# The a-priori bound of the t solve (`nll_error_bound`, Cauchy-Schwarz over the 17 components)
# is 2e-3 here, far above what the solves err: all of t / logsnr / scaled x vjp / jvp were
# within 4e-5 on an AVX2 machine (and pass under --xla_cpu_max_isa=SSE4_2).
VARIABLE_TOL = 1e-4


@pytest.mark.parametrize("variable", ["t", "logsnr", "scaled"])
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
@pytest.mark.parametrize("sde,eps", GAUSSIAN_VARIABLE_CASES, ids=["vp", "subvp", "ve"])
def test_integration_variables_and_modes_match_closed_form(sde, eps, variable, mode):
    """Every integration variable (t; log-SNR; y = x / alpha with its D log alpha term) and
    both Hutchinson modes give the closed-form NLL (Rademacher probes are exact here)."""
    x = DATA.sample(jax.random.key(0), 6)
    r = jax.jit(
        lambda x: ode_nll(
            DATA.score_fn(sde),
            sde,
            x,
            jax.random.key(1),
            eps=eps,
            mode=mode,
            variable=variable,
            **TIGHT,
        )
    )(x)
    assert bool(r.success.all())
    assert_within(r.nll, DATA.ode_nll(sde, x, eps), VARIABLE_TOL, f"{variable}/{mode}")
    if variable == "scaled":  # z is x(T), not y(T) = x(T) / alpha(T)
        exact_z = _gaussian_flow(sde, x, eps)
        assert_within(r.z, exact_z, 1e-3 * float(jnp.abs(exact_z).max()), "z")


def _gaussian_flow(sde, x, eps):
    alpha_e, _ = sde.marginal(jnp.asarray(eps))
    alpha_t, _ = sde.marginal(jnp.asarray(sde.T))
    v_e = DATA.marginal_var(sde, jnp.asarray(eps))
    v_t = DATA.marginal_var(sde, jnp.asarray(sde.T))
    mean = jnp.broadcast_to(DATA.mean, x.shape)
    return alpha_t * mean + jnp.sqrt(v_t / v_e) * (x - alpha_e * mean)


def test_reparametrised_variables_need_a_closed_form_time_change():
    x = DATA.sample(jax.random.key(0), 2)
    sde = LinearLogSNR()
    for variable in ("logsnr", "scaled"):
        with pytest.raises(ValueError, match="closed-form inverse of the log-SNR"):
            ode_nll(DATA.score_fn(sde), sde, x, jax.random.key(1), eps=1e-3, variable=variable)
    with pytest.raises(ValueError, match="eps > 0"):
        ode_nll(DATA.score_fn(VPSDE()), VPSDE(), x, jax.random.key(1), eps=0.0, variable="logsnr")
    with pytest.raises(ValueError, match="integration variable"):
        ode_nll(DATA.score_fn(VPSDE()), VPSDE(), x, jax.random.key(1), variable="lambda")
    with pytest.raises(ValueError, match="mode"):
        ode_nll(DATA.score_fn(VPSDE()), VPSDE(), x, jax.random.key(1), mode="forward")


def test_forward_mode_through_a_convolutional_network():
    """mode='jvp' runs DDPM++ (whose CPU convolutions have a custom VJP, which forward mode
    cannot push through) and gives the VJP mode's NLL: the same estimate, v^T J v, so they
    differ by float32 rounding and what it does to the step decisions (at rtol = atol = 1e-6,
    a solve error of order 1e-6 x (|NLL| + |z|^2) per step: 1e-2 nats is far above it)."""
    from mlscore_jax.models import DDPMpp, get_score_fn, init_variables

    model = DDPMpp(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    sde = VPSDE()
    variables = init_variables(model, jax.random.key(0, impl="rbg"), (1, 4, 4, 1))
    score = get_score_fn(model, variables, sde)
    x = jax.random.uniform(jax.random.key(1), (2, 4, 4, 1), minval=-1.0, maxval=1.0)
    f = jax.jit(
        lambda x, mode: ode_nll(score, sde, x, jax.random.key(2), rtol=1e-6, atol=1e-6, mode=mode),
        static_argnums=1,
    )
    vjp, jvp = f(x, "vjp"), f(x, "jvp")
    assert bool(vjp.success.all()) and bool(jvp.success.all())
    np.testing.assert_allclose(jvp.nll, vjp.nll, atol=1e-2)
