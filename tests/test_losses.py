"""Denoising score matching losses: weightings, importance sampling, parameterisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlscore_jax.gaussian import GaussianData
from mlscore_jax.losses import dsm_loss
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE


def unit_gaussian_score(x, t):
    """A fixed, deliberately imperfect score: that of N(0, I) at every t."""
    return -x


def _loss_samples(sde, eps, importance_sampling, n_keys=200, batch=500):
    x0 = jnp.full((batch, 4), 0.7)
    keys = jax.random.split(jax.random.key(0), n_keys)
    fn = jax.jit(
        jax.vmap(
            lambda k: dsm_loss(
                unit_gaussian_score,
                sde,
                x0,
                k,
                weighting="likelihood",
                importance_sampling=importance_sampling,
                eps=eps,
            )
        )
    )
    return np.asarray(fn(keys)).ravel()


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2)])
def test_importance_sampling_same_mean_lower_variance(sde, eps):
    plain = _loss_samples(sde, eps, importance_sampling=False)
    isamp = _loss_samples(sde, eps, importance_sampling=True)
    se = np.sqrt(plain.var() / plain.size + isamp.var() / isamp.size)
    assert abs(plain.mean() - isamp.mean()) < 3 * se, (plain.mean(), isamp.mean(), se)
    # near eps the weight g^2 / sigma^2 of the plain estimator explodes; IS removes it
    assert isamp.var() < 0.5 * plain.var()


def test_exact_score_gives_the_denoising_floor():
    """With the exact score of Gaussian data, the 'score' loss is E||sigma s + z||^2 = D s^2-ish."""
    sde = VPSDE()
    data = GaussianData(mean=jnp.zeros((8,)), std=0.5)
    x0 = data.sample(jax.random.key(1), 20000)
    loss = dsm_loss(data.score_fn(sde), sde, x0, jax.random.key(2), weighting="score", eps=1e-5)
    # E over t of 1 - sigma^2 / v(t), per dimension (mean reduction); check by quadrature
    t = jnp.linspace(1e-5, 1.0, 20001)
    _, sigma = sde.marginal(t)
    expected = float(jnp.mean(1.0 - sigma**2 / data.marginal_var(sde, t)))
    se = float(loss.std() / np.sqrt(loss.size))
    assert abs(float(loss.mean()) - expected) < 4 * se


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()])
def test_noise_fn_and_score_fn_agree(sde):
    x0 = jax.random.normal(jax.random.key(0), (16, 2, 2, 1))
    net = lambda x, t: jnp.tanh(x) * t[:, None, None, None]  # noqa: E731
    score = lambda x, t: -net(x, t) / sde.marginal(t)[1][:, None, None, None]  # noqa: E731
    kw = dict(weighting="score", eps=1e-3)
    a = dsm_loss(score, sde, x0, jax.random.key(1), **kw)
    b = dsm_loss(None, sde, x0, jax.random.key(1), noise_fn=net, **kw)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_reductions_and_normalization():
    sde = VPSDE()
    x0 = jnp.ones((3, 4, 4, 1))
    kw = dict(weighting="likelihood", importance_sampling=True, eps=1e-5)
    mean = dsm_loss(unit_gaussian_score, sde, x0, jax.random.key(0), **kw)
    total = dsm_loss(unit_gaussian_score, sde, x0, jax.random.key(0), reduce="sum", **kw)
    np.testing.assert_allclose(total, 16 * mean, rtol=1e-6)
    raw = dsm_loss(
        unit_gaussian_score, sde, x0, jax.random.key(0), normalize_importance=False, **kw
    )
    np.testing.assert_allclose(mean / raw, sde.importance_normalizer(1e-5) / (1 - 1e-5), rtol=1e-6)


def test_bad_arguments():
    sde, x0, k = VPSDE(), jnp.ones((2, 3)), jax.random.key(0)
    with pytest.raises(ValueError, match="weighting"):
        dsm_loss(unit_gaussian_score, sde, x0, k, weighting="lw")
    with pytest.raises(ValueError, match="importance_sampling"):
        dsm_loss(unit_gaussian_score, sde, x0, k, weighting="score", importance_sampling=True)
    with pytest.raises(ValueError, match="exactly one"):
        dsm_loss(None, sde, x0, k)
