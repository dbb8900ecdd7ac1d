"""Dequantization: the three dequantizers, the K-sample bound, and evaluation through them.

The "model" in the evaluation tests is a closed-form Gaussian density (exact score, no
network), so every difference between two runs comes from the dequantization alone.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import special
from scipy import stats

from mlscore_jax import datasets, dequantizers, evaluate
from mlscore_jax.gaussian import GaussianData
from mlscore_jax.preprocessing import Preprocessing
from mlscore_jax.sde import VPSDE, SubVPSDE
from mlscore_jax.settings import BpdSettings

DIGITS = Preprocessing(levels=17)
# A Gaussian density over the 64 pixels of a digit in model space: a proper (if poor) model.
MODEL = GaussianData(mean=jnp.zeros((8, 8, 1)), std=0.6)
SETTINGS = BpdSettings(batch_size=16, num_repeats=1, num_t=32, rtol=1e-5, atol=1e-5, seed=5)


def _images(n: int = 24) -> np.ndarray:
    return datasets.load("digits").test[:n]


def _score(sde):
    score = MODEL.score_fn(sde)
    return lambda params, x, t: score(x, t)


def test_uniform_dequantizer_draws_what_preprocessing_draws():
    k = jnp.asarray(_images(8))
    key = jax.random.key(3)
    d = dequantizers.Uniform(DIGITS)(None, key, k)
    np.testing.assert_array_equal(d.x, DIGITS.for_likelihood()(key, k))
    np.testing.assert_array_equal(d.log_q, np.zeros(8))


@pytest.mark.parametrize(
    "sde, eps, levels",
    [(VPSDE(), 1e-5, 256), (SubVPSDE(), 1e-2, 256), (VPSDE(), 2e-3, 17)],
    ids=["vp-256", "subvp-256", "vp-17-wide"],
)
def test_truncated_normal_is_the_truncated_normal_it_claims(sde, eps, levels):
    """x = alpha c + sigma n with n ~ N(0, 1) truncated to the bin: the support, the law of n
    (Kolmogorov-Smirnov against scipy), and log q (its mean against the closed-form entropy)."""
    pre = Preprocessing(levels=levels)
    tn = dequantizers.TruncatedNormal(pre, sde, eps)
    alpha, tau, a = tn.scales()
    alpha_ref, sigma_ref = (float(v[0]) for v in sde.marginal(jnp.full((1,), eps)))
    assert math.isclose(tau, sigma_ref / alpha_ref) and math.isclose(alpha, alpha_ref)
    w = dequantizers.bin_width(pre)
    assert math.isclose(a, w / (2 * tau))

    n_img, shape = 4000, (2, 2, 1)
    k = jax.random.randint(jax.random.key(0), (n_img, *shape), 0, levels).astype(jnp.uint8)
    d = jax.jit(lambda key: tn(None, key, k))(jax.random.key(1))
    centre = (np.asarray(k, np.float64) + 0.5) / levels * 2 - 1
    n = (np.asarray(d.x, np.float64) / alpha - centre) / tau
    # n is recovered from float32 x: |dn| <= ulp(|x| <= 1) / (alpha tau) ~ 6e-8 / tau
    slack = 2.0**-23 / (alpha * tau)
    assert np.all(np.abs(n) <= a + slack)
    ks = stats.kstest(n.ravel()[:8000], stats.truncnorm(-a, a).cdf)
    assert ks.pvalue > 1e-3, ks

    # E[log q] = -H: entropy of the truncated normal in u = 1/2 + tau n / w, minus D log alpha
    dims = math.prod(shape)
    expected = -dims * (stats.truncnorm(-a, a).entropy() + math.log(tau / w) + math.log(alpha))
    log_q = np.asarray(d.log_q, np.float64)
    assert abs(log_q.mean() - expected) < 4.5 * log_q.std() / math.sqrt(n_img), (
        log_q.mean(),
        expected,
    )
    # and per image, log q from scipy's density of the recovered n (float64)
    ref = stats.truncnorm(-a, a).logpdf(n).reshape(n_img, -1).sum(1) + dims * (
        math.log(w / tau) - math.log(alpha)
    )
    # float32 log q: |d log phi| = |n dn| <= a * slack per pixel plus rounding of the sum
    tol = dims * (a * slack + 1e-5 * (1 + a * a))
    np.testing.assert_allclose(log_q, ref, atol=tol)


def test_importance_weighted_bound():
    total = jnp.asarray(np.random.default_rng(0).normal(10.0, 3.0, (8, 5)), jnp.float32)
    stderr = jnp.full((8, 5), 0.5, jnp.float32)
    one, se1 = dequantizers.importance_weighted(total[:1], stderr[:1])
    np.testing.assert_array_equal(one, total[0])  # K = 1: the single-sample bound itself
    np.testing.assert_array_equal(se1, stderr[0])
    iw, se = dequantizers.importance_weighted(total, stderr)
    t64 = np.asarray(total, np.float64)
    ref = -np.log(np.mean(np.exp(-t64), axis=0))
    np.testing.assert_allclose(iw, ref, rtol=1e-6)  # float32 logsumexp of 8 terms ~ 10
    assert np.all(np.asarray(iw) <= t64.mean(0) + 1e-5)  # Jensen: never above the mean
    # first-order error with fully correlated errors: d estimate / d total_k = w_k
    w = np.exp(-t64) / np.exp(-t64).sum(0)
    np.testing.assert_allclose(w.sum(0), 1.0)
    np.testing.assert_allclose(se, 0.5 * w.sum(0), rtol=1e-5)
    grad = jax.grad(lambda t: dequantizers.importance_weighted(t)[0].sum())(total)
    np.testing.assert_allclose(grad, w, rtol=1e-4, atol=1e-7)
    # equal totals: the combination is the common value; a common error passes through
    flat, flat_se = dequantizers.importance_weighted(jnp.full((4, 3), 2.0), jnp.ones((4, 3)))
    np.testing.assert_allclose(flat, 2.0, rtol=1e-6)
    np.testing.assert_allclose(flat_se, 1.0, rtol=1e-6)


class _NormalCdfFlow(nn.Module):
    """An exactly uniform variational dequantizer: u = Phi(eta) with eta ~ N(0, I), log q = 0
    (computed as the flow would: log N(eta) - log |du / d eta|)."""

    @nn.compact
    def __call__(self, eta, k):
        self.param("unused", nn.initializers.zeros, ())
        u, du = jax.jvp(special.ndtr, (eta,), (jnp.ones_like(eta),))
        log_q = jax.scipy.stats.norm.logpdf(eta) - jnp.log(du)
        return u, jnp.sum(log_q.reshape(eta.shape[0], -1), axis=-1)


def test_an_exactly_uniform_variational_dequantizer_gives_the_uniform_numbers(tmp_path):
    """The variational path (network call, log q term, same keys) with q = U[0, 1)^D gives the
    numbers of uniform dequantization on the same images and keys: Phi(eta) for the normal
    draw eta of a key equals the uniform draw of that key up to float32 rounding."""
    sde, images = VPSDE(), _images()
    uniform = evaluate.evaluate_split(
        _score(sde), sde, DIGITS, images, SETTINGS, str(tmp_path / "u")
    )
    settings = dataclasses.replace(SETTINGS, dequantization="variational")
    flow = _NormalCdfFlow()
    params = flow.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), images[:1])["params"]
    variational = evaluate.evaluate_split(
        _score(sde),
        sde,
        DIGITS,
        images,
        settings,
        str(tmp_path / "v"),
        dequantizer=dequantizers.Variational(flow, DIGITS),
        deq_params=params,
    )
    pu, pv = np.load(tmp_path / "u" / "per_image.npz"), np.load(tmp_path / "v" / "per_image.npz")
    # u differs by ~1e-7 (erf(erfinv(.)) rounding) and log q by ~1e-6 per pixel: 64 pixels give
    # < 1e-4 nats, i.e. < 3e-6 bits/dim; the adaptive ODE solve may take another step for such
    # a change, which moves its result by no more than its tolerance (~1e-4 nats at 1e-5).
    np.testing.assert_allclose(pv["log_q"], 0.0, atol=3e-6)
    np.testing.assert_allclose(pv["bound"], pu["bound"], atol=1e-5)
    np.testing.assert_allclose(pv["ode"], pu["ode"], atol=1e-5)
    assert abs(variational["ode"]["mean"] - uniform["ode"]["mean"]) < 1e-5


def test_k_samples_are_tighter_than_their_mean_and_the_evaluation_reports_both(tmp_path):
    """K = 4 draws per image: 'ode' / 'bound' (importance weighted) lie below 'ode_single' /
    'bound_single' (their mean, the K = 1 estimate) for every image: the same draws, Jensen."""
    sde, images = VPSDE(), _images(16)
    settings = dataclasses.replace(
        SETTINGS, dequantization="truncated_normal", num_dequant_samples=4, eps=2e-3
    )
    tn = dequantizers.TruncatedNormal(DIGITS, sde, settings.eps)
    m = evaluate.evaluate_split(
        _score(sde), sde, DIGITS, images, settings, str(tmp_path), dequantizer=tn
    )
    per = np.load(tmp_path / "per_image.npz")
    for name in ("ode", "bound"):
        assert per[name].shape == per[f"{name}_single"].shape == (1, 16)
        assert np.all(per[name] <= per[f"{name}_single"] + 1e-6), name
        assert m[name]["mean"] < m[f"{name}_single"]["mean"]
    assert "log_q" in m and m["log_q"]["mean"] != 0.0
    assert np.all(per["bound_stderr"] > 0) and np.all(per["bound_single_stderr"] > 0)


def test_the_dequantizer_must_match_the_settings(tmp_path):
    sde = VPSDE()
    tn = dequantizers.TruncatedNormal(DIGITS, sde, 1e-5)
    with pytest.raises(ValueError, match="dequantization='uniform' but the dequantizer is"):
        evaluate.evaluate_split(
            _score(sde), sde, DIGITS, _images(4), SETTINGS, str(tmp_path), dequantizer=tn
        )
    with pytest.raises(ValueError, match="continuous"):
        dequantizers.make("truncated_normal", Preprocessing(levels=None), sde=sde, eps=1e-5)
    with pytest.raises(ValueError, match="eval.dequantization must be one of"):
        BpdSettings(dequantization="gaussian")
    with pytest.raises(ValueError, match="num_dequant_samples"):
        BpdSettings(num_dequant_samples=0)
