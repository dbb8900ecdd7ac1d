"""SDEs: marginals, drift/diffusion, importance sampling against the reference values."""

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


def test_marginal_reference_values():
    vp, subvp = VPSDE(), SubVPSDE()
    a, s = vp.marginal(jnp.array([1e-5, 5e-5, 1.0]))
    np.testing.assert_allclose(s, [1.00050e-3, 2.24162e-3, 0.9999784], rtol=2e-5)
    np.testing.assert_allclose(a[2], 0.0065716, rtol=1e-4)
    _, s = subvp.marginal(jnp.array([1e-2, 1.0]))
    np.testing.assert_allclose(s, [1.99301e-3, 0.9999568], rtol=2e-5)
    assert s.dtype == jnp.float32


@pytest.mark.parametrize("sde,eps,z,quantiles", REFERENCE)
def test_importance_closed_form(sde, eps, z, quantiles):
    np.testing.assert_allclose(sde.importance_normalizer(eps), z, rtol=1e-6)
    t = sde.importance_inverse_cdf(PROBS * z, eps)
    np.testing.assert_allclose(t, quantiles, rtol=1e-3)
    # the inverse really inverts the CDF
    np.testing.assert_allclose(sde.importance_cdf(t, eps), PROBS * z, rtol=1e-4)


@pytest.mark.parametrize("sde,eps,z,quantiles", REFERENCE)
def test_generic_numerical_inverse_cdf_matches_closed_form(sde, eps, z, quantiles):
    z_num = SDE.importance_normalizer(sde, eps)
    np.testing.assert_allclose(z_num, z, rtol=1e-4)
    u = jnp.linspace(0.01, 0.99, 50) * z
    t_num = SDE.importance_inverse_cdf(sde, u, eps)
    np.testing.assert_allclose(t_num, sde.importance_inverse_cdf(u, eps), rtol=1e-4)


def test_vp_inverse_cdf_point():
    np.testing.assert_allclose(VPSDE().importance_inverse_cdf(10.0, 1e-5), 0.0420609, rtol=1e-5)


def test_sampled_times_follow_the_density():
    sde, eps = VPSDE(), 1e-5
    t = sde.sample_importance_time(jax.random.key(0), (200_000,), eps)
    assert float(t.min()) >= eps and float(t.max()) <= 1.0
    emp = np.quantile(np.asarray(t), np.asarray(PROBS))
    np.testing.assert_allclose(emp, REFERENCE[0][3], rtol=0.03)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VESDE(linear=True)])
def test_closed_forms_match_autodiff_of_marginal(sde):
    """drift and g^2 written by hand equal those derived from the marginal by the base class."""
    t = jnp.array([1e-3, 0.1, 0.5, 0.9])
    np.testing.assert_allclose(sde.drift_coeff(t), SDE.drift_coeff(sde, t), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sde.likelihood_weight(t), SDE.likelihood_weight(sde, t), rtol=1e-3)
    np.testing.assert_allclose(sde.diffusion(t) ** 2, sde.likelihood_weight(t), rtol=1e-5)


def test_user_defined_sde_gets_everything():
    sde = LinearLogSNR()
    t = jnp.array([0.1, 0.5, 0.9])
    a, s = sde.marginal(t)
    np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)  # variance preserving
    # f = d log alpha / dt = -(1/2) d/dt log(1 + e^{-lam}) and g^2 = -2 f for a VP SDE
    f = sde.drift_coeff(t)
    np.testing.assert_allclose(f, -10.0 * jax.nn.sigmoid(-(10.0 - 20.0 * t)), rtol=1e-4)
    np.testing.assert_allclose(sde.likelihood_weight(t), -2.0 * f, rtol=1e-4)
    ts = sde.sample_importance_time(jax.random.key(0), (1000,), 1e-3)
    assert ts.shape == (1000,) and float(ts.min()) >= 1e-3


def test_vp_drift_and_prior():
    sde = VPSDE()
    x = jnp.ones((2, 3, 3, 1))
    t = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(sde.drift(x, t)[:, 0, 0, 0], [-0.05, -10.0], rtol=1e-6)
    np.testing.assert_allclose(sde.drift_divergence(x, t), [-0.05 * 9, -10.0 * 9], rtol=1e-6)
    z = jnp.zeros((1, 3072))
    np.testing.assert_allclose(-sde.prior_logp(z), 2822.979, rtol=1e-6)
    ve = VESDE()
    np.testing.assert_allclose(-ve.prior_logp(z), 3072 / 2 * np.log(2 * np.pi * 50.0**2), rtol=1e-6)


def test_sdes_are_pytrees_usable_under_jit():
    @jax.jit
    def f(sde, t):
        return sde.marginal(t)[1]

    a = f(VPSDE(), jnp.array([0.5]))
    b = f(VPSDE(beta_min=0.2), jnp.array([0.5]))
    assert not np.allclose(a, b)


def test_get_sde_by_name():
    assert isinstance(get_sde("subvpsde", beta_max=10.0), SubVPSDE)
    with pytest.raises(ValueError, match="vpsde"):
        get_sde("vp-sde")


def test_importance_sampling_rejects_eps_zero_for_generic():
    with pytest.raises(ValueError, match="eps > 0"):
        SDE.importance_normalizer(VESDE(), 0.0)
