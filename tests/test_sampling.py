"""ODE and predictor-corrector samplers against Gaussian data with the exact score."""

import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_likelihood import ROUND_PER_STEP, TIGHT, U, assert_within, variance_path

from mlscore_jax.gaussian import GaussianData
from mlscore_jax.likelihood import EVALS, ode_nll
from mlscore_jax.outputs import save_image_grid
from mlscore_jax.sampling import ode_sample, pc_sample
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

D, N_SAMPLES = 8, 2000
DATA = GaussianData(mean=jnp.linspace(-0.5, 0.5, D), std=0.5)
MU = np.asarray(DATA.mean, np.float64)
# (sde, eps): the official sampling.smallest_time for VP and subVP, the likelihood eps for VE.
CASES = [(VPSDE(), 1e-3), (SubVPSDE(), 1e-2), (VESDE(), 1e-5)]
IDS = ["vp", "subvp", "ve"]
# Monte-Carlo checks are at 4.5 standard errors: a two-sided normal tail of 6.8e-6, so with a
# few dozen such checks in this file a false failure needs a seed in ~1e4 (the seeds are fixed).
K_SE = 4.5


def assert_moments(x, mean, var, *, bias_mean=0.0, bias_var=0.0):
    """Sample mean per dimension and pooled variance of x [n, D] against N(mean, var I).

    Within K_SE standard errors (var / n for a mean; 2 / (n D) for the pooled variance ratio
    of D independent dimensions), plus an allowance for a known bias of the sampler.
    """
    x, mean, var = np.asarray(x, np.float64), np.asarray(mean, np.float64), float(var)
    n, d = x.shape
    mean_err = np.abs(x.mean(0) - mean)
    assert (mean_err < K_SE * math.sqrt(var / n) + bias_mean * math.sqrt(var)).all(), mean_err
    ratio = x.var(0).mean() / var
    assert abs(ratio - 1.0) < K_SE * math.sqrt(2.0 / (n * d)) + bias_var, ratio


def affine_map(sde, eps):
    """(alpha(eps), alpha(T), sqrt(v(eps) / v(T))) in float64: the exact ODE map between T and eps
    is x(eps) = alpha_e mu + sqrt(v_e / v_T) (x(T) - alpha_T mu)."""
    alpha_e = float(sde.marginal(jnp.asarray(eps))[0])
    alpha_t = float(sde.marginal(jnp.asarray(sde.T))[0])
    v_e = float(DATA.marginal_var(sde, jnp.asarray(eps)))
    v_t = float(DATA.marginal_var(sde, jnp.asarray(sde.T)))
    return alpha_e, alpha_t, math.sqrt(v_e / v_t)


def steps_of(nfe, denoise):
    """Attempted Tsit5 steps of ode_sample from its NFE (1 + 6 steps, + 1 for denoising)."""
    startup, per_step = EVALS[diffrax.Tsit5]
    return (np.asarray(nfe) - startup - int(denoise)) / per_step


def sample_error_bound(sde, eps, x, solves, rtol, atol):
    """Bound on |x - exact| per sample [n, 1] after solves ending at eps, for the exact score.

    `solves`: (attempted steps [n], dimension of the controller's RMS norm) for each solve. An
    accepted step errs by at most sqrt(dim) (atol + rtol |y_j|) in each component (RMS <= 1).
    The flow is affine, y(t) - alpha(t) mu scaling like sqrt(v(t)); so an error made at time t
    reaches eps scaled by sqrt(v(eps) / v(t)), at most A = max_t sqrt(v(eps) / v(t)) >= 1 (~1
    for VP and VE, 1.03 for subVP here), and |y_j(t)| sqrt(v(eps) / v(t)) <= A |mu| +
    |x_j - alpha_e mu_j|. Summing over steps, with rtol raised by float32 rounding per update:
        sum over solves of steps sqrt(dim) A (atol + rtol' (|mu| + max_j |x_j - alpha_e mu_j|)).
    """
    v = variance_path(DATA, sde, eps)
    growth = math.sqrt(v[0] / v.min())
    alpha_e = float(sde.marginal(jnp.asarray(eps))[0])
    x = np.asarray(x, np.float64)
    scale = np.abs(MU).max() + np.abs(x - alpha_e * MU).max(1)
    per_step = growth * (atol + (rtol + ROUND_PER_STEP) * scale)
    total = sum(np.asarray(steps) * math.sqrt(dim) for steps, dim in solves)
    return (total * per_step)[:, None]


@pytest.mark.parametrize("sde,eps", CASES, ids=IDS)
def test_ode_samples_follow_the_marginal_at_eps_and_the_data_after_denoising(sde, eps):
    score = DATA.score_fn(sde)
    z = sde.prior_sample(jax.random.key(0), (N_SAMPLES, D))
    # Eager calls share one compiled solve; TIGHT so that the pointwise check below is sharp.
    r = ode_sample(score, sde, z.shape, None, z=z, eps=eps, denoise=False, **TIGHT)
    x0 = ode_sample(score, sde, z.shape, None, z=z, eps=eps, denoise=True, **TIGHT).x

    alpha_e, alpha_t, ratio = affine_map(sde, eps)
    exact = alpha_e * MU + ratio * (np.asarray(z, np.float64) - alpha_t * MU)
    bound = sample_error_bound(sde, eps, exact, [(steps_of(r.nfe, False), D)], **TIGHT)
    assert_within(r.x, exact, bound, "x(eps)")
    v_e = float(DATA.marginal_var(sde, jnp.asarray(eps)))
    assert_moments(r.x, alpha_e * MU, v_e)  # p_eps = N(alpha mu, v(eps))
    # The data, N(mu, s^2): Tweedie's E[x_0 | x_eps] has variance alpha_e^2 s^4 / v_e, smaller
    # than s^2 by the relative amount 1 - alpha_e^2 s^2 / v_e = sigma_e^2 / v_e (< 5e-4 here).
    assert_moments(x0, MU, DATA.std**2, bias_var=1.0 - alpha_e**2 * DATA.std**2 / v_e)


def test_denoising_is_one_tweedie_step():
    """At a large eps the Tweedie step E[x_0 | x_eps] is visible: mean mu, variance shrunk."""
    sde, eps = VPSDE(), 0.1
    score = DATA.score_fn(sde)
    z = sde.prior_sample(jax.random.key(1), (N_SAMPLES, D))
    # The same compiled solve on the same z: the same x(eps) in both calls.
    x = ode_sample(score, sde, z.shape, None, z=z, eps=eps, denoise=False).x
    x0 = ode_sample(score, sde, z.shape, None, z=z, eps=eps, denoise=True).x
    alpha = float(sde.marginal(jnp.asarray(eps))[0])
    v = float(DATA.marginal_var(sde, jnp.asarray(eps)))
    gain = alpha * DATA.std**2 / v  # E[x_0 | x] = mu + gain (x - alpha mu), here in float64
    x = np.asarray(x, np.float64)
    # The library's (x + sigma^2 s) / alpha, s = -(x - alpha mu) / v: 7 float32 roundings on
    # terms of size <= |x| + |mu| (sigma^2 / v < 1), divided by alpha: 16 u (|x| + |mu|) / alpha.
    bound = 16 * U * (np.abs(x) + np.abs(MU)) / alpha
    assert_within(x0, MU + gain * (x - alpha * MU), bound, "denoised")
    # The setting makes the moment check discriminate: the shrunk variance is 20 % below s^2,
    # ~18 standard errors of the pooled variance at n D = 16000.
    assert alpha < 0.95 and gain**2 * v < 0.8 * DATA.std**2
    assert_moments(x0, MU, gain**2 * v)


@pytest.mark.parametrize("sde,eps", CASES, ids=IDS)
def test_ode_sampler_inverts_the_likelihood_path(sde, eps):
    score = DATA.score_fn(sde)
    x = DATA.sample(jax.random.key(2), 8)
    fwd = ode_nll(score, sde, x, jax.random.key(3), eps=eps, **TIGHT)
    back = ode_sample(score, sde, x.shape, None, z=fwd.z, eps=eps, denoise=False, **TIGHT)
    # An x error of the forward solve made at time t reaches z scaled by sqrt(v(T) / v(t)) and
    # comes back scaled by sqrt(v(eps) / v(T)): the same bound as a reverse solve, with the
    # forward controller's RMS over the D + 1 components of the augmented state.
    solves = [(fwd.num_steps, D + 1), (steps_of(back.nfe, False), D)]
    assert_within(back.x, x, sample_error_bound(sde, eps, x, solves, **TIGHT), "round trip")
    assert float(jnp.abs(fwd.z - x).mean()) > 0.1  # a real round trip


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
    # K_SE standard errors of N_SAMPLES draws, plus the samplers' own bias at 250 steps,
    # measured on 10^5 samples for each of these 12 cases: no detectable mean bias (<= 0.009
    # std, 2.8 standard errors there) and a variance up to 3.3 % high (finite steps; the
    # Langevin corrector's fixed snr keeps ~2.6 % at 500 steps too). Allowances: those plus 3
    # of their standard errors, 0.02 std and 0.04.
    assert_moments(x, MU, target_var, bias_mean=0.02, bias_var=0.04)
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

    def never_called(x, t):
        return jnp.full_like(x, jnp.nan)

    r = pc_sample(
        never_called, sde, (N_SAMPLES, D), jax.random.key(0), predictor="none", corrector="none"
    )
    assert (np.asarray(r.nfe) == 0).all()
    assert_moments(r.x, np.zeros(D), sde.prior_std**2)  # N(0, 50^2 I), no NaN from the score


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
