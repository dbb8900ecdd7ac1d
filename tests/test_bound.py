"""The variational bound against closed forms on Gaussian data (exact score)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sde import LinearLogSNR

from mlscore_jax.bound import nll_bound
from mlscore_jax.gaussian import GaussianData
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

DATA = GaussianData(mean=jnp.linspace(-0.5, 0.5, 4), std=0.3)
N = 4000


def _bound(sde, eps, x, key, **kw):
    fn = jax.jit(lambda x, k: nll_bound(DATA.score_fn(sde), sde, x, k, eps=eps, **kw))
    return fn(x, key)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (LinearLogSNR(), 1e-3)])
@pytest.mark.parametrize("importance_sampling", [True, False])
def test_mean_bound_equals_entropy_plus_prior_kl(sde, eps, importance_sampling):
    """E_x0[bound without offset] = H(p_eps) + KL(p_T || prior) when the score is exact."""
    x = DATA.sample(jax.random.key(0), N)
    r = _bound(
        sde,
        eps,
        x,
        jax.random.key(1),
        num_t=50,
        importance_sampling=importance_sampling,
        offset=False,
    )
    se = float(r.nll.std() / math.sqrt(N))
    expected = float(DATA.expected_bound(sde, eps))
    assert abs(float(r.nll.mean()) - expected) < 3 * se, (float(r.nll.mean()), expected, se)
    np.testing.assert_array_equal(r.offset, 0.0)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2)])
def test_offset_bound_upper_bounds_the_data_nll(sde, eps):
    """With the [0, eps] decoder term the bound is on -log p_0 itself: close to, not below, it."""
    x = DATA.sample(jax.random.key(0), N)
    r = _bound(sde, eps, x, jax.random.key(1), num_t=50, offset=True)
    se = float(r.nll.std() / math.sqrt(N))
    truth = float(jnp.mean(DATA.data_nll(x)))
    assert float(r.nll.mean()) > truth - 3 * se
    # E[bound] - H(p_0) = KL(p_T || prior) + the decoder's gap, both tiny here
    assert float(r.nll.mean()) < truth + 3 * se + 0.01
    # the control-variate offset of an exact denoiser is tiny: D log(1/alpha_eps) + O(sigma^2)
    assert float(jnp.abs(r.offset).mean()) < 0.02


def test_stderr_is_calibrated():
    sde, eps = VPSDE(), 1e-5
    x = DATA.sample(jax.random.key(0), 3)
    keys = jax.random.split(jax.random.key(5), 300)
    reps = jax.jit(
        jax.vmap(lambda k: nll_bound(DATA.score_fn(sde), sde, x, k, eps=eps, num_t=40).nll)
    )(keys)
    stderr = _bound(sde, eps, x, jax.random.key(7), num_t=40).stderr
    np.testing.assert_allclose(reps.std(0), stderr, rtol=0.35)


def test_ssm_and_chunked_draws_agree_with_dsm():
    sde, eps = SubVPSDE(), 1e-2
    x = DATA.sample(jax.random.key(0), 2000)
    dsm = _bound(sde, eps, x, jax.random.key(1), num_t=20, offset=False)
    ssm = _bound(sde, eps, x, jax.random.key(2), num_t=20, offset=False, estimator="ssm")
    chunked = _bound(sde, eps, x, jax.random.key(3), num_t=20, offset=False, draws_per_call=5)
    se = lambda r: float(r.nll.std() / math.sqrt(x.shape[0]))  # noqa: E731
    for r in (ssm, chunked):
        assert abs(float(r.nll.mean() - dsm.nll.mean())) < 3 * math.hypot(se(r), se(dsm))


def test_ve_bound_runs_with_generic_importance_sampling():
    sde = VESDE(sigma_min=0.01, sigma_max=5.0)
    x = DATA.sample(jax.random.key(0), N)
    r = _bound(sde, 1e-5, x, jax.random.key(1), num_t=20, offset=False)
    se = float(r.nll.std() / math.sqrt(N))
    assert abs(float(r.nll.mean()) - float(DATA.expected_bound(sde, 1e-5))) < 3 * se


def test_bad_arguments():
    sde, x, k = VPSDE(), jnp.zeros((2, 4)), jax.random.key(0)
    with pytest.raises(ValueError, match="multiple"):
        nll_bound(DATA.score_fn(sde), sde, x, k, num_t=10, draws_per_call=3)
    with pytest.raises(ValueError, match="estimator"):
        nll_bound(DATA.score_fn(sde), sde, x, k, estimator="ism")
    with pytest.raises(ValueError, match="eps"):
        nll_bound(DATA.score_fn(sde), sde, x, k, eps=0.0)


@pytest.mark.parametrize("c", [0.8, 1.25])
@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE()], ids=["vp", "subvp"])
def test_inexact_score_the_bound_bounds_the_sde_model_not_the_ode_model(sde, c):
    """With a wrong score the bound still upper-bounds the NLL of the reverse-SDE model, but the
    probability-flow ODE is another model and its NLL can lie far above the bound.

    Data N(0, s^2 I), score s(x, t) = -x / (c v(t)) with v the true marginal variance. Both models
    are then Gaussian, N(0, V I), with V(T) = 1 (the prior) and, backwards in time,
        reverse SDE: dV/dt = 2 (f + g^2 / (c v)) V - g^2;  ODE: dV/dt = 2 (f + g^2 / (2 c v)) V.
    This is why a trained model can show a bound below its ODE NLL (see the evaluation notes).
    """
    from scipy.integrate import solve_ivp

    from mlscore_jax.likelihood import ode_nll

    eps, d = 1e-5, 4
    data = GaussianData(mean=jnp.zeros(d), std=0.5)
    # Coefficients on a fine geometric grid (one vectorised call), interpolated by the solver.
    ts = np.geomspace(eps, sde.T, 20_001)
    tj = jnp.asarray(ts, jnp.float32)
    f_grid = np.asarray(jax.vmap(jax.grad(lambda t: jnp.log(sde.marginal(t)[0])))(tj))  # f
    g2_grid = np.asarray(sde.likelihood_weight(tj))
    v_grid = np.asarray(data.marginal_var(sde, tj))
    f, g2, v = (lambda t, a=a: np.interp(t, ts, a) for a in (f_grid, g2_grid, v_grid))

    def final_var(rhs) -> float:
        sol = solve_ivp(lambda t, y: [rhs(t, y[0])], (sde.T, eps), [1.0], rtol=1e-9, atol=1e-12)
        return float(sol.y[0, -1])

    v_sde = final_var(lambda t, var: 2 * (f(t) + g2(t) / (c * v(t))) * var - g2(t))
    v_ode = final_var(lambda t, var: 2 * (f(t) + g2(t) / (2 * c * v(t))) * var)
    q = v(eps)  # the data at time eps, where both models are evaluated

    def cross_entropy(var):
        return d * (0.5 * math.log(2 * math.pi * var) + q / (2 * var))

    def score(x, t):
        return -x / (c * data.marginal_var(sde, t))[:, None]

    x = data.sample(jax.random.key(0), 2000)
    b = jax.jit(lambda x, k: nll_bound(score, sde, x, k, eps=eps, num_t=100, offset=False))(
        x, jax.random.key(1)
    )
    b_mean, b_se = float(b.nll.mean()), float(b.nll.std()) / math.sqrt(2000)
    o = jax.jit(lambda x, k: ode_nll(score, sde, x, k, eps=eps, divergence="exact"))(
        x[:200], jax.random.key(2)
    )
    o_mean, o_se = float(o.nll.mean()), float(o.nll.std()) / math.sqrt(200)

    assert b_mean > cross_entropy(v_sde) - 3 * b_se  # the bound holds for the SDE model
    assert abs(o_mean - cross_entropy(v_ode)) < 4 * o_se + 1e-3  # ode_nll is that ODE model's
    assert cross_entropy(v_ode) > b_mean + 10 * b_se  # ... whose NLL exceeds the bound
