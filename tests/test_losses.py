"""Denoising score matching losses: weightings, importance sampling, parameterisations.

Monte-Carlo checks are at 4.5 standard errors (a two-sided normal tail of 6.8e-6; seeds fixed).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlscore_jax.gaussian import GaussianData
from mlscore_jax.losses import dsm_loss
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

U = 2.0**-24  # float32 unit roundoff
K_SE = 4.5


def unit_gaussian_score(x, t):
    """A fixed, deliberately imperfect score: that of N(0, I) at every t."""
    return -x


def _loss_samples(sde, eps, importance_sampling, n=100_000):
    """n independent per-example losses (each example draws its own t and noise)."""
    x0 = jnp.full((n, 4), 0.7)
    fn = jax.jit(
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
    return np.asarray(fn(jax.random.key(0)))


@pytest.mark.parametrize("sde,eps", [(VPSDE(), 1e-5), (SubVPSDE(), 1e-2)])
def test_importance_sampling_same_mean_lower_variance(sde, eps):
    plain = _loss_samples(sde, eps, importance_sampling=False)
    isamp = _loss_samples(sde, eps, importance_sampling=True)
    # 10^5 independent draws each. The plain estimator is heavy-tailed (weight g^2 / sigma^2
    # ~ 1 / t near eps, variance ~ 1 / eps): its sample variance is itself noisy, one more
    # reason for 4.5 rather than 3 (here z = -1.6 and 2.1).
    se = np.sqrt(plain.var() / plain.size + isamp.var() / isamp.size)
    assert abs(plain.mean() - isamp.mean()) < K_SE * se, (plain.mean(), isamp.mean(), se)
    # near eps the weight g^2 / sigma^2 of the plain estimator explodes; IS removes it
    # (variance ratio measured 0.006 for VP, 0.15 for subVP at eps = 1e-2: 0.5 is no close call)
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
    # 20001-point rule: error ~ (h / 2) |f(T) - f(eps)| / (T - eps) < 1e-4 << se ~ 2e-3.
    se = float(loss.std() / np.sqrt(loss.size))
    assert abs(float(loss.mean()) - expected) < K_SE * se


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()])
def test_noise_fn_and_score_fn_agree(sde):
    x0 = jax.random.normal(jax.random.key(0), (16, 2, 2, 1))
    net = lambda x, t: jnp.tanh(x) * t[:, None, None, None]  # noqa: E731
    score = lambda x, t: -net(x, t) / sde.marginal(t)[1][:, None, None, None]  # noqa: E731
    outputs = []

    def recording_net(x, t):  # dsm_loss runs eagerly: the net's output at its (x_t, t)
        outputs.append(net(x, t))
        return outputs[-1]

    kw = dict(weighting="score", eps=1e-3)
    a = dsm_loss(score, sde, x0, jax.random.key(1), **kw)
    b = dsm_loss(None, sde, x0, jax.random.key(1), noise_fn=recording_net, **kw)
    # Same t, z, sigma and net output on both paths; the score path forms sigma * (-n / sigma)
    # = -n (1 + d), |d| <= 2u, before r = z - n. With loss = |r|^2 / D, the residual's
    # perturbation 2u |n| + 2u |r| and the roundings of r^2 and the mean give, by
    # Cauchy-Schwarz, |d loss| <= 4u sqrt(loss / D) |n|_2 + (2 D + 6) u loss; twice that.
    # (An elementwise rtol has no basis: r can nearly cancel.)
    (n,) = outputs
    d = math.prod(x0.shape[1:])
    loss = np.asarray(b, np.float64)
    norm = np.linalg.norm(np.asarray(n, np.float64).reshape(len(loss), -1), axis=1)
    bound = 2 * U * (4 * np.sqrt(loss / d) * norm + (2 * d + 6) * loss)
    np.testing.assert_array_less(np.abs(np.asarray(a, np.float64) - loss), bound)


def test_reductions_and_normalization():
    sde = VPSDE()
    x0 = jnp.ones((3, 4, 4, 1))
    kw = dict(weighting="likelihood", importance_sampling=True, eps=1e-5)
    mean = dsm_loss(unit_gaussian_score, sde, x0, jax.random.key(0), **kw)
    total = dsm_loss(unit_gaussian_score, sde, x0, jax.random.key(0), reduce="sum", **kw)
    # A sum of 16 squares (>= 0) within gamma_15 = 15 u of the exact sum whatever the order;
    # the mean is that sum / 16 (exact scaling by a power of two): 2 x 15 u apart at most.
    np.testing.assert_allclose(total, 16 * mean, rtol=30 * U)
    raw = dsm_loss(
        unit_gaussian_score, sde, x0, jax.random.key(0), normalize_importance=False, **kw
    )
    # (raw Z) / (T - eps), the division by raw, and Z / (1 - eps) here: <= 5 roundings.
    expected = sde.importance_normalizer(1e-5) / (1 - 1e-5)
    np.testing.assert_allclose(mean / raw, expected, rtol=8 * U)


def test_bad_arguments():
    sde, x0, k = VPSDE(), jnp.ones((2, 3)), jax.random.key(0)
    with pytest.raises(ValueError, match="weighting"):
        dsm_loss(unit_gaussian_score, sde, x0, k, weighting="lw")
    with pytest.raises(ValueError, match="importance_sampling"):
        dsm_loss(unit_gaussian_score, sde, x0, k, weighting="score", importance_sampling=True)
    with pytest.raises(ValueError, match="exactly one"):
        dsm_loss(None, sde, x0, k)
