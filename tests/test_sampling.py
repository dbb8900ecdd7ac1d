"""ODE and predictor-corrector samplers against Gaussian data with the exact score."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mlscore_jax.gaussian import GaussianData
from mlscore_jax.likelihood import ode_nll
from mlscore_jax.outputs import save_image_grid
from mlscore_jax.sampling import ode_sample, pc_sample
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

D, N_SAMPLES = 8, 2000
DATA = GaussianData(mean=jnp.linspace(-0.5, 0.5, D), std=0.5)
# (sde, eps): the official sampling.smallest_time for VP and subVP, the likelihood eps for VE.
CASES = [(VPSDE(), 1e-3), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)]
IDS = ["vp", "subvp", "ve"]


def assert_moments(x, mean, var, *, z_mean=4.5, z_var=4.5):
    """Sample mean per dimension and pooled variance within z standard errors of N(mean, var)."""
    x, mean, var = np.asarray(x, np.float64), np.asarray(mean), float(var)
    n = x.shape[0]
    mean_z = (x.mean(0) - mean) / math.sqrt(var / n)
    assert np.abs(mean_z).max() < z_mean, mean_z
    ratio = x.var(0).mean() / var  # pooled over D independent dimensions
    assert abs(ratio - 1.0) < z_var * math.sqrt(2.0 / (n * x.shape[1])), ratio


@pytest.mark.parametrize("sde,eps", CASES, ids=IDS)
def test_ode_samples_follow_the_marginal_at_eps_and_the_data_after_denoising(sde, eps):
    score = DATA.score_fn(sde)
    z = sde.prior_sample(jax.random.key(0), (N_SAMPLES, D))
    sample = jax.jit(
        lambda z, denoise: ode_sample(score, sde, z.shape, None, z=z, eps=eps, denoise=denoise),
        static_argnums=1,
    )
    x, x0 = sample(z, False).x, sample(z, True).x

    # The exact ODE map is affine: x(eps) = alpha_e mu + sqrt(v_e / v_T) (z - alpha_T mu).
    (alpha_e, _), (alpha_t, _) = sde.marginal(jnp.asarray(eps)), sde.marginal(jnp.asarray(sde.T))
    v_e, v_t = DATA.marginal_var(sde, jnp.asarray(eps)), DATA.marginal_var(sde, jnp.asarray(sde.T))
    np.testing.assert_allclose(
        x, alpha_e * DATA.mean + jnp.sqrt(v_e / v_t) * (z - alpha_t * DATA.mean), atol=2e-4
    )
    assert_moments(x, alpha_e * DATA.mean, v_e)  # p_eps = N(alpha mu, v(eps))
    assert_moments(x0, DATA.mean, DATA.std**2)  # the data, N(mu, s^2)


def test_denoising_is_one_tweedie_step():
    """At a large eps the Tweedie step E[x_0 | x_eps] is visible: mean mu, variance shrunk."""
    sde, eps = VPSDE(), 0.1
    score = DATA.score_fn(sde)
    z = sde.prior_sample(jax.random.key(1), (N_SAMPLES, D))
    x = ode_sample(score, sde, z.shape, None, z=z, eps=eps, denoise=False).x
    x0 = ode_sample(score, sde, z.shape, None, z=z, eps=eps, denoise=True).x
    alpha, _ = sde.marginal(jnp.asarray(eps))
    v = DATA.marginal_var(sde, jnp.asarray(eps))
    gain = alpha * DATA.std**2 / v  # E[x_0 | x] = mu + gain (x - alpha mu)
    np.testing.assert_allclose(x0, DATA.mean + gain * (x - alpha * DATA.mean), atol=1e-5)
    assert float(alpha) < 0.95 and float(gain**2 * v) < 0.8 * DATA.std**2
    assert_moments(x0, DATA.mean, gain**2 * v)


@pytest.mark.parametrize("sde,eps", CASES, ids=IDS)
def test_ode_sampler_inverts_the_likelihood_path(sde, eps):
    score = DATA.score_fn(sde)
    x = DATA.sample(jax.random.key(2), 8)
    z = ode_nll(score, sde, x, jax.random.key(3), eps=eps).z
    back = ode_sample(score, sde, x.shape, None, z=z, eps=eps, denoise=False).x
    np.testing.assert_allclose(back, x, atol=1e-3)
    assert float(jnp.abs(z - x).mean()) > 0.1  # a real round trip


PC_CASES = [
    (sde, eps, pred, corr)
    for sde, eps in CASES
    for pred in ("euler_maruyama", "reverse_diffusion")
    for corr in ("langevin", "none")
]


@pytest.mark.parametrize(
    "sde,eps,predictor,corrector",
    PC_CASES,
    ids=[f"{i}-{p}-{c}" for i in IDS for p in ("em", "rd") for c in ("langevin", "none")],
)
def test_pc_samples_reproduce_the_data(sde, eps, predictor, corrector):
    num_steps = 250
    r = jax.jit(
        lambda key: pc_sample(
            DATA.score_fn(sde),
            sde,
            (N_SAMPLES, D),
            key,
            eps=eps,
            num_steps=num_steps,
            predictor=predictor,
            corrector=corrector,
        )
    )(jax.random.key(4))
    x = np.asarray(r.x)
    target_var = float(DATA.marginal_var(sde, jnp.asarray(0.0)))  # VE: s^2 + sigma_min^2
    assert np.isfinite(x).all()
    assert np.abs(x.mean(0) - DATA.mean).max() < 0.1 * DATA.std
    assert abs(x.var(0).mean() / target_var - 1.0) < 0.1
    np.testing.assert_array_equal(r.nfe, num_steps * (2 if corrector == "langevin" else 1))


def counting(score):
    calls = []

    def counting_score(x, t):
        jax.debug.callback(lambda: calls.append(1), ordered=False)
        return score(x, t)

    return counting_score, calls


@pytest.mark.parametrize(
    "predictor,corrector,n_steps_each",
    [("reverse_diffusion", "langevin", 2), ("none", "langevin", 1), ("euler_maruyama", "none", 3)],
)
def test_pc_nfe_counts_every_score_evaluation(predictor, corrector, n_steps_each):
    sde = SubVPSDE()
    score, calls = counting(DATA.score_fn(sde))
    r = pc_sample(
        score,
        sde,
        (2, D),
        jax.random.key(0),
        eps=1e-2,
        num_steps=5,
        predictor=predictor,
        corrector=corrector,
        n_steps_each=n_steps_each,
    )
    jax.effects_barrier()
    expected = 5 * ((n_steps_each if corrector == "langevin" else 0) + (predictor != "none"))
    assert len(calls) == expected and r.nfe.tolist() == [expected] * 2


def test_pc_without_predictor_or_corrector_returns_the_prior_draw():
    sde = VESDE()
    r = pc_sample(
        DATA.score_fn(sde), sde, (3, D), jax.random.key(0), predictor="none", corrector="none"
    )
    assert r.nfe.tolist() == [0, 0, 0] and float(jnp.abs(r.x).max()) > 10.0  # prior std 50


@pytest.mark.parametrize("solver", ["tsit5", "dopri5"])
@pytest.mark.parametrize("denoise", [False, True])
def test_ode_nfe_counts_every_score_evaluation(solver, denoise):
    """Same counter as tests/test_likelihood.py, on the reverse-time solve (+1 for denoising)."""
    sde = VPSDE()
    score, calls = counting(DATA.score_fn(sde))
    r = ode_sample(score, sde, (1, D), jax.random.key(5), solver=solver, denoise=denoise)
    jax.effects_barrier()
    assert len(calls) == int(r.nfe[0]) > 10, (solver, len(calls), r.nfe)


def test_bad_arguments():
    sde, score = VPSDE(), DATA.score_fn(VPSDE())
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="euler_maruyama"):
        pc_sample(score, sde, (2, D), key, predictor="ancestral_sampling")
    with pytest.raises(ValueError, match="langevin"):
        pc_sample(score, sde, (2, D), key, corrector="ald")
    with pytest.raises(ValueError, match="solver"):
        ode_sample(score, sde, (2, D), key, solver="rk45")
    with pytest.raises(ValueError, match="shape"):
        ode_sample(score, sde, (2, D), None, z=jnp.zeros((3, D)))
    with pytest.raises(Exception, match="maximum number of solver steps"):
        ode_sample(score, sde, (2, D), key, max_steps=3)
    r = ode_sample(score, sde, (2, D), key, max_steps=3, throw=False)
    assert bool(jnp.isnan(r.x).all())


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_writes_a_viewable_png(tmp_path, channels):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, channels), dtype=np.uint8)
    path = tmp_path / "nested" / "dir" / "samples.png"
    size = save_image_grid(path, images)
    # 3 per row, 2 rows, scaled x4 to 32 px, 2 px padding around every image.
    assert size == (3 * 34 + 2, 2 * 34 + 2)
    with Image.open(path) as png:
        assert png.size == size and png.mode == ("L" if channels == 1 else "RGB")
        pixels = np.asarray(png).reshape(size[1], size[0], channels)
    np.testing.assert_array_equal(pixels[2:34:4, 36:68:4], images[1])  # second image, row 0
    np.testing.assert_array_equal(pixels[0], 0)  # the padding

    assert save_image_grid(tmp_path / "row.png", images[:2], nrow=4, scale=1) == (22, 12)
    with pytest.raises(ValueError, match="to_uint"):
        save_image_grid(tmp_path / "bad.png", images.astype(np.float32))
