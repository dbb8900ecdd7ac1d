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
