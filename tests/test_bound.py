"""The variational bound against closed forms on Gaussian data (exact score).

Monte-Carlo checks are at K_SE = 4.5 standard errors: a two-sided normal tail of 6.8e-6 per
check, so a false failure of any of the ~40 checks here needs a seed in ~4e3 (seeds are fixed).
The float32 rounding of the means (sums of <= 4000 terms of size ~10: < 1e-4) is far below the
standard errors (>= 1e-3).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_likelihood import TIGHT, U, assert_within, nll_error_bound
from test_sde import LinearLogSNR

from mlscore_jax.bound import nll_bound
from mlscore_jax.gaussian import GaussianData
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

DATA = GaussianData(mean=jnp.linspace(-0.5, 0.5, 4), std=0.3)
N = 4000
K_SE = 4.5


def _bound(sde, eps, x, key, **kw):
    fn = jax.jit(lambda x, k: nll_bound(DATA.score_fn(sde), sde, x, k, eps=eps, **kw))
    return fn(x, key)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2), (LinearLogSNR(), 1e-3)])
@pytest.mark.parametrize("importance_sampling", [True, False])
@pytest.mark.parametrize("time_sampling", ["stratified", "iid"])
def test_mean_bound_equals_entropy_plus_prior_kl(sde, eps, importance_sampling, time_sampling):
    """E_x0[bound without offset] = H(p_eps) + KL(p_T || prior) when the score is exact: both
    time samplings are unbiased."""
    x = DATA.sample(jax.random.key(0), N)
    r = _bound(
        sde,
        eps,
        x,
        jax.random.key(1),
        num_t=50,
        importance_sampling=importance_sampling,
        offset=False,
        time_sampling=time_sampling,
    )
    se = float(r.nll.std() / math.sqrt(N))
    expected = float(DATA.expected_bound(sde, eps))
    assert abs(float(r.nll.mean()) - expected) < K_SE * se, (float(r.nll.mean()), expected, se)
    np.testing.assert_array_equal(r.offset, 0.0)


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2)])
def test_offset_bound_upper_bounds_the_data_nll(sde, eps):
    """With the [0, eps] decoder term the bound is on -log p_0 itself: close to, not below, it.

    For the exact score, with x_eps = alpha x_0 + sigma n and v = v(eps), the offset's mean is
        E[O] = D log(1 / alpha) + E[|n + sigma s|^2 - |n|^2] / 2 = D log(1 / alpha) - D sigma^2 / 2v
    and E[bound] - H(p_0) = H(p_eps) + KL(p_T || prior) + E[O] - H(p_0): the gap, in closed form.
    """
    d = DATA.mean.size
    x = DATA.sample(jax.random.key(0), N)
    r = _bound(sde, eps, x, jax.random.key(1), num_t=50, offset=True)
    alpha, sigma = (float(c) for c in sde.marginal(jnp.asarray(eps)))
    v = float(DATA.marginal_var(sde, jnp.asarray(eps)))
    mean_offset = -d * math.log(alpha) - d * sigma**2 / (2 * v)
    entropy_0 = 0.5 * d * math.log(2 * math.pi * math.e * DATA.std**2)
    gap = float(DATA.expected_bound(sde, eps)) + mean_offset - entropy_0
    # Paired with -log p_0 of the same x, which removes the spread of the data from the error.
    diff = np.asarray(r.nll - DATA.data_nll(x), np.float64)
    se = diff.std(ddof=1) / math.sqrt(N)
    assert diff.mean() > -K_SE * se  # not below the data NLL
    assert abs(diff.mean() - gap) < K_SE * se, (diff.mean(), gap, se)  # by the closed-form gap
    # The offset itself: |n + sigma s|^2 - |n|^2 (two sums of D squares ~1, differing by ~1e-4)
    # carries float32 rounding up to ~2 D^2 u, the same in every draw: allowed on top.
    offset = np.asarray(r.offset, np.float64)
    offset_se = offset.std(ddof=1) / math.sqrt(N)
    assert abs(offset.mean() - mean_offset) < K_SE * offset_se + 2 * d**2 * U


def _repeated(time_sampling, n=300, num_t=40):
    """n independent repetitions of the bound of 3 fixed examples."""
    sde, eps = VPSDE(), 1e-5
    x = DATA.sample(jax.random.key(0), 3)
    keys = jax.random.split(jax.random.key(5), n)
    return jax.jit(
        jax.vmap(
            lambda k: nll_bound(
                DATA.score_fn(sde), sde, x, k, eps=eps, num_t=num_t, time_sampling=time_sampling
            )
        )
    )(keys)


def test_stderr_is_calibrated():
    """i.i.d. times: stderr^2 is an unbiased estimate of Var[nll]: its mean over independent
    repetitions matches the spread of their nll."""
    n = 300
    r = _repeated("iid", n)
    nll, var = np.asarray(r.nll, np.float64), np.asarray(r.stderr, np.float64) ** 2  # [n, 3]
    # log of the sample std of nll: standard error sqrt((kurtosis - 1) / 4n) (delta method);
    # log of sqrt(mean stderr^2): std(stderr^2) / (2 mean(stderr^2) sqrt(n)). Correlated
    # positively (same repetitions), so the hypot of the two over-states the difference's error.
    c = nll - nll.mean(0)
    kurtosis = (c**4).mean(0) / (c**2).mean(0) ** 2
    se_spread = np.sqrt((kurtosis - 1) / (4 * n))
    se_stderr = var.std(0, ddof=1) / (2 * var.mean(0) * math.sqrt(n))
    log_ratio = np.log(nll.std(0, ddof=1)) - 0.5 * np.log(var.mean(0))
    assert (np.abs(log_ratio) < K_SE * np.hypot(se_spread, se_stderr)).all(), log_ratio


def test_stratified_times_do_not_raise_the_variance_and_their_stderr_is_conservative():
    """Stratified times: the spread over repetitions is not above the i.i.d. one, and the
    paired-strata stderr does not understate it (it may overstate: adjacent strata have
    different means). For this oracle the integrand's spread comes almost all from z, not
    from t, so stratifying t gains little here; the gain on a trained model is measured by
    experiments/bench_bound.py (4.3x fewer draws)."""
    n = 300
    strat, iid = _repeated("stratified", n), _repeated("iid", n)
    sd_strat = np.asarray(strat.nll, np.float64).std(0, ddof=1)
    sd_iid = np.asarray(iid.nll, np.float64).std(0, ddof=1)
    # the log of a sample std has standard error ~ sqrt((kurtosis - 1) / 4n) <= sqrt(2 / 4n)
    # for near-normal estimates (kurtosis ~ 3): 0.041 at n = 300
    se_log = math.sqrt(2 / (4 * n))
    assert (np.log(sd_strat / sd_iid) < K_SE * math.sqrt(2) * se_log).all(), (sd_iid, sd_strat)
    rms_stderr = np.sqrt((np.asarray(strat.stderr, np.float64) ** 2).mean(0))
    assert (np.log(rms_stderr / sd_strat) > -K_SE * math.sqrt(2) * se_log).all(), (
        rms_stderr,
        sd_strat,
    )


def test_ssm_and_chunked_draws_agree_with_dsm():
    sde, eps = SubVPSDE(), 1e-2
    x = DATA.sample(jax.random.key(0), 2000)
    dsm = _bound(sde, eps, x, jax.random.key(1), num_t=20, offset=False)
    ssm = _bound(sde, eps, x, jax.random.key(2), num_t=20, offset=False, estimator="ssm")
    chunked = _bound(sde, eps, x, jax.random.key(3), num_t=20, offset=False, draws_per_call=5)
    # Paired over the same x (independent keys): the spread of the data cancels in the
    # per-example difference, whose standard error is the right one for the mean difference.
    for r in (ssm, chunked):
        diff = np.asarray(r.nll - dsm.nll, np.float64)
        assert abs(diff.mean()) < K_SE * diff.std(ddof=1) / math.sqrt(diff.size)


@pytest.mark.parametrize("linear", [False, True], ids=["geometric", "linear"])
def test_ve_bound_mean_equals_closed_form(linear):
    sde = VESDE(sigma_min=0.01, sigma_max=5.0, linear=linear)
    x = DATA.sample(jax.random.key(0), N)
    r = _bound(sde, 1e-5, x, jax.random.key(1), num_t=20, offset=False)
    se = float(r.nll.std() / math.sqrt(N))
    assert abs(float(r.nll.mean()) - float(DATA.expected_bound(sde, 1e-5))) < K_SE * se


def test_bad_arguments():
    sde, x, k = VPSDE(), jnp.zeros((2, 4)), jax.random.key(0)
    with pytest.raises(ValueError, match="multiple"):
        nll_bound(DATA.score_fn(sde), sde, x, k, num_t=10, draws_per_call=3)
    with pytest.raises(ValueError, match="estimator"):
        nll_bound(DATA.score_fn(sde), sde, x, k, estimator="ism")
    with pytest.raises(ValueError, match="eps"):
        nll_bound(DATA.score_fn(sde), sde, x, k, eps=0.0)
    with pytest.raises(ValueError, match="even num_t"):
        nll_bound(DATA.score_fn(sde), sde, x, k, num_t=5)
    with pytest.raises(ValueError, match="time_sampling"):
        nll_bound(DATA.score_fn(sde), sde, x, k, time_sampling="sobol")


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
    # (The float32 coefficients and scipy's rtol move cross_entropy by ~1e-5, << b_se.)
    assert b_mean > cross_entropy(v_sde) - K_SE * b_se  # the bound holds for the SDE model

    # ode_nll is that ODE model's NLL, pointwise: the flow is linear, x(t) = Phi(t) x(eps) with
    # log Phi(t) = int_eps^t lam, lam = f + g^2 / (2 c v), so with V = v_ode = Phi(T)^-2
    #     -log p^ODE(x) = D/2 log(2 pi V) + |x|^2 / 2V.
    # Reference error: the coefficients carry a few u each (float32), so log V errs by
    # <= 8 u int |lam| dt (+ scipy's 1e-9), times the NLL's sensitivity D/2 + |x|^2 / 2V.
    lam = f_grid + g2_grid / (2 * c * v_grid)
    log_phi = np.concatenate([[0.0], np.cumsum(np.diff(ts) * (lam[1:] + lam[:-1]) / 2)])
    abs_int = float(np.sum(np.diff(ts) * np.abs(lam[1:] + lam[:-1]) / 2))
    xo = x[:16]
    o = jax.jit(lambda x: ode_nll(score, sde, x, None, eps=eps, divergence="exact", **TIGHT))(xo)
    sq = np.sum(np.asarray(xo, np.float64) ** 2, axis=1)
    ode_model_nll = 0.5 * d * np.log(2 * math.pi * v_ode) + sq / (2 * v_ode)
    ref_err = (8 * U * abs_int + 1e-8) * (d / 2 + sq / (2 * v_ode))
    bound = nll_error_bound(o, sde, log_phi, np.zeros(d), **TIGHT) + ref_err
    assert_within(o.nll, ode_model_nll, bound, "ODE model NLL")
    # ... whose NLL exceeds the bound, significantly (by 26 to 340 standard errors here).
    assert cross_entropy(v_ode) > b_mean + K_SE * b_se
