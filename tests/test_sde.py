"""SDEs: marginals, drift/diffusion, importance sampling against the reference values.

Reference values are correctly rounded decimals: each is uncertain by half a unit in its last
digit, which sets the tolerance where it exceeds the float32 error of the computation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlscore_jax.sde import SDE, VESDE, VPSDE, SubVPSDE, get_sde


class LinearLogSNR(SDE):
    """A user-defined VP SDE given by its log-SNR lambda(t) = 10 - 20 t (no closed forms)."""

    def marginal(self, t):
        lam = 10.0 - 20.0 * t
        return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


# (SDE, eps, Z, quantiles at 10/25/50/75/90 %) from ../shared/reference/scoreflow.md section 2.2.
REFERENCE = [
    (VPSDE(), 1e-5, 23.864472, [1.077e-4, 3.005e-3, 0.11442, 0.63696, 0.87263]),
    (VPSDE(), 5e-5, 22.251064, [4.453e-4, 7.495e-3, 0.16679, 0.66738, 0.88181]),
    (SubVPSDE(), 1e-2, 22.484136, [0.02032, 0.05292, 0.2289, 0.66393, 0.88051]),
    (SubVPSDE(), 1e-5, 37.678946, [6.54e-5, 1.01e-3, 0.03055, 0.35382, 0.78981]),
]
PROBS = jnp.array([0.1, 0.25, 0.5, 0.75, 0.9])
U = 2.0**-24  # float32 unit roundoff
# The reference quantiles have 3 to 5 significant digits: half a unit in the last is <= 7.7e-4
# relative (6.54e-5); float32 adds <= 20 u (measured 16 u: t(u) is conditioned by 1 / (t p(t))).
QUANTILE_RTOL = 1e-3


def test_marginal_reference_values():
    vp, subvp = VPSDE(), SubVPSDE()
    a, s = vp.marginal(jnp.array([1e-5, 5e-5, 1.0]))
    # 6 significant digits: <= 5e-6 relative; float32 sqrt(-expm1(-B)) a few u (B: 3 roundings).
    np.testing.assert_allclose(s, [1.00050e-3, 2.24162e-3, 0.9999784], rtol=1e-5)
    # 5 digits: 7.6e-6; float32 exp(-B / 2) with B / 2 ~ 5: ~5 x 3 u from B's rounding.
    np.testing.assert_allclose(a[2], 0.0065716, rtol=1e-5)
    _, s = subvp.marginal(jnp.array([1e-2, 1.0]))
    np.testing.assert_allclose(s, [1.99301e-3, 0.9999568], rtol=1e-5)  # <= 2.5e-6, a few u
    assert s.dtype == jnp.float32


@pytest.mark.parametrize("sde,eps,z,quantiles", REFERENCE)
def test_importance_closed_form(sde, eps, z, quantiles):
    # Z = A(T) - A(eps), A = log(e^B - 1) (VP) or 2 log(e^B - 1) - B (subVP): no cancellation
    # (A(T) > 0 > A(eps)), each A within ~8 u max(|A|, 1) (B's 3 roundings enter with weight
    # max(1, B) <= 10), so <= 8 u (|A(T)| + |A(eps)|) / Z ~ 8 u; Z has 8 digits (2e-8): 1e-6.
    np.testing.assert_allclose(sde.importance_normalizer(eps), z, rtol=1e-6)
    t = sde.importance_inverse_cdf(PROBS * z, eps)
    np.testing.assert_allclose(t, quantiles, rtol=QUANTILE_RTOL)
    # The inverse really inverts the CDF: F(t) = A(t) - A(eps), |A| <= 40 here, errs by
    # <= 8 u (|A(t)| + |A(eps)|) <= 2.4e-5 (plus t's own rounding, u |dF / d log t| <= 2u)
    # against F >= 2.2: rtol 1e-5 (measured 1.1e-7).
    np.testing.assert_allclose(sde.importance_cdf(t, eps), PROBS * z, rtol=1e-5)


@pytest.mark.parametrize("sde,eps,z,quantiles", REFERENCE)
def test_generic_numerical_inverse_cdf_matches_closed_form(sde, eps, z, quantiles):
    # Simpson on 4096 log-spaced panels (h = 2.8e-3 in log t: error ~h^4, < 1e-10) of a smooth
    # positive integrand, then a float32 cumulative sum of 4096 positive terms: its rounding
    # grows like sqrt(n) u (random-walk rounding errors; 5 sqrt(4096) u = 1.9e-5, the
    # probabilistic bound of Higham and Mary), where the worst case n u = 2.4e-4 never occurs
    # (measured 2 u). Twice the probabilistic bound:
    z_num = SDE.importance_normalizer(sde, eps)
    np.testing.assert_allclose(z_num, z, rtol=4e-5)
    u = jnp.linspace(0.01, 0.99, 50) * z
    t_num = SDE.importance_inverse_cdf(sde, u, eps)
    # log t interpolated in the table: the table's error dF <= 2e-5 F moves log t by dF / (dF /
    # d log t) <= 2e-5 F / (t g^2 / sigma^2) <= 2.5e-5 here; linear interpolation adds
    # ~h^2 / 8 |d log(t g^2 / sigma^2) / d log t| ~ 1e-6 (measured 2.2e-6 in all).
    np.testing.assert_allclose(t_num, sde.importance_inverse_cdf(u, eps), rtol=1e-4)


@pytest.mark.parametrize("sde", [VESDE(), VESDE(linear=True)], ids=["geometric", "linear"])
def test_ve_closed_form_importance_matches_the_generic_quadrature(sde):
    """VE: F(t) = 2 log(sigma_max / sigma_min) (t - eps) (geometric) or 2 log(t / eps)
    (linear), written by hand, against the base class's quadrature table (tolerances as in
    the test above: the table's float32 cumulative sum, 4e-5; its interpolated inverse, 1e-4)."""
    eps = 1e-5
    z = sde.importance_normalizer(eps)
    np.testing.assert_allclose(SDE.importance_normalizer(sde, eps), z, rtol=4e-5)
    u = jnp.linspace(0.01, 0.99, 50) * z
    t = sde.importance_inverse_cdf(u, eps)
    np.testing.assert_allclose(SDE.importance_inverse_cdf(sde, u, eps), t, rtol=1e-4)
    # and the closed forms invert each other: a few roundings of log / exp of |F| <= 26
    np.testing.assert_allclose(sde.importance_cdf(t, eps), u, rtol=1e-5, atol=8 * U * float(z))


def test_vp_inverse_cdf_point():
    # 6 digits (1.2e-6 relative) and float32 (<= 20 u, as for the quantiles).
    np.testing.assert_allclose(VPSDE().importance_inverse_cdf(10.0, 1e-5), 0.0420609, rtol=1e-5)


def test_sampled_times_follow_the_density():
    """The fraction of draws below each reference quantile t_p is p, within 4.5 binomial
    standard errors sqrt(p (1 - p) / n) (a false failure: 6.8e-6 per quantile, seed fixed).
    (Comparing empirical quantiles instead needs the density at t_p: at p = 0.25 their relative
    standard error is 2.3 %.) The references' rounding moves p by <= 4e-5, << 1e-3."""
    sde, eps, n = VPSDE(), 1e-5, 200_000
    t = np.asarray(sde.sample_importance_time(jax.random.key(0), (n,), eps))
    assert t.min() >= eps and t.max() <= 1.0
    p = np.asarray(PROBS, np.float64)
    below = (t[:, None] <= np.asarray(REFERENCE[0][3])).mean(0)
    assert (np.abs(below - p) < 4.5 * np.sqrt(p * (1 - p) / n)).all(), below


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VESDE(linear=True)])
def test_closed_forms_match_autodiff_of_marginal(sde):
    """drift and g^2 written by hand equal those derived from the marginal by the base class."""
    t = jnp.array([1e-3, 0.1, 0.5, 0.9])
    # f = d log alpha / dt by forward mode: 2-3 roundings either way (VE: both exactly 0).
    np.testing.assert_allclose(sde.drift_coeff(t), SDE.drift_coeff(sde, t), rtol=8 * U, atol=0)
    # g^2 = d sigma^2 / dt - 2 f sigma^2: two terms >= 0 (no cancellation), each within ~8 u
    # (sqrt, square, expm1 or pow and their derivatives; the exp's conditioning B u enters
    # weighted by e^-B); twice that (measured <= 1.8 u).
    np.testing.assert_allclose(
        sde.likelihood_weight(t), SDE.likelihood_weight(sde, t), rtol=32 * U, atol=0
    )
    # sqrt, then square: 2 roundings (measured <= 1.4 u).
    np.testing.assert_allclose(sde.diffusion(t) ** 2, sde.likelihood_weight(t), rtol=4 * U)


def test_user_defined_sde_gets_everything():
    sde = LinearLogSNR()
    t = jnp.array([0.1, 0.5, 0.9])
    a, s = sde.marginal(t)
    # sigmoid(lam) + sigmoid(-lam): each term within ~4 u (sigmoid, sqrt, square), sum 1.
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=8 * U)  # variance preserving
    # f = d log alpha / dt = -(1/2) d/dt log(1 + e^{-lam}) and g^2 = -2 f for a VP SDE.
    # JAX differentiates sigmoid as s (1 - s): at lam = 8 (t = 0.1) 1 - s = 3.4e-4 cancels, so
    # f carries a relative error ~u (1 + e^lam) (measured 720 u there, against 2982 u): the
    # tolerance follows lam, elementwise.
    lam = 10.0 - 20.0 * np.asarray(t, np.float64)
    rtol = 2 * U * (1.0 + np.exp(lam)) + 8 * U
    f = np.asarray(sde.drift_coeff(t), np.float64)
    exact_f = -10.0 / (1.0 + np.exp(lam))
    np.testing.assert_array_less(np.abs(f - exact_f), rtol * np.abs(exact_f))
    # g^2 is accurate (~1 u measured), but -2 f carries f's error.
    lw = np.asarray(sde.likelihood_weight(t), np.float64)
    np.testing.assert_array_less(np.abs(lw + 2.0 * f), rtol * np.abs(2.0 * exact_f))
    ts = sde.sample_importance_time(jax.random.key(0), (1000,), 1e-3)
    assert ts.shape == (1000,) and float(ts.min()) >= 1e-3


def test_vp_drift_and_prior():
    sde = VPSDE()
    x = jnp.ones((2, 3, 3, 1))
    t = jnp.array([0.0, 1.0])
    # One to three float32 roundings each; 2822.979 has 7 digits (1.8e-7): rtol 1e-6.
    np.testing.assert_allclose(sde.drift(x, t)[:, 0, 0, 0], [-0.05, -10.0], rtol=1e-6)
    np.testing.assert_allclose(sde.drift_divergence(x, t), [-0.05 * 9, -10.0 * 9], rtol=1e-6)
    z = jnp.zeros((1, 3072))
    np.testing.assert_allclose(-sde.prior_logp(z), 2822.979, rtol=1e-6)
    ve = VESDE()
    np.testing.assert_allclose(-ve.prior_logp(z), 3072 / 2 * np.log(2 * np.pi * 50.0**2), rtol=1e-6)


def test_sdes_are_pytrees_usable_under_jit():
    """Coefficients are traced leaves: one compilation serves every beta_min, with its value."""
    traces = []

    @jax.jit
    def f(sde, t):
        traces.append(1)  # runs only while tracing
        return sde.marginal(t)[1]

    t = jnp.array([0.5])
    for beta_min in (0.1, 0.2):
        sde = VPSDE(beta_min=beta_min)
        # the same ops as eagerly, fused: sqrt(-expm1(-B)) within a few u
        np.testing.assert_allclose(f(sde, t), sde.marginal(t)[1], rtol=8 * U)
    assert len(traces) == 1
    assert float(f(VPSDE(beta_min=0.2), t)[0]) > float(f(VPSDE(), t)[0])  # larger B: larger std


def test_get_sde_by_name():
    sde = get_sde("subvpsde", beta_max=10.0)
    assert type(sde) is SubVPSDE and sde.beta_max == 10.0 and sde.beta_min == 0.1
    assert type(get_sde("VPSDE")) is VPSDE and get_sde("vesde", sigma_max=5.0).sigma_max == 5.0
    with pytest.raises(ValueError, match=r"unknown SDE 'vp-sde'; choose one of \['subvpsde'"):
        get_sde("vp-sde")


def test_importance_sampling_rejects_eps_zero_for_generic():
    with pytest.raises(ValueError, match="eps > 0"):
        SDE.importance_normalizer(VESDE(), 0.0)
