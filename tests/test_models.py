"""Score networks: shapes, initialisation, dropout, time conditioning, the score contract, a real
learning run, and the parameter tree of the paper's CIFAR-10 network.

Regenerate the parameter-table fixture after an intended change to the network with
`MLSCORE_UPDATE_FIXTURES=1 .venv/bin/pytest tests/test_models.py -k fixture`.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mlscore_jax import losses
from mlscore_jax.models import (
    MLP,
    MODELS,
    DDPMpp,
    abstract_variables,
    get_model,
    get_noise_fn,
    get_score_fn,
    init_variables,
    param_count,
    param_table,
    score_fn_from_noise_fn,
)
from mlscore_jax.models.layers import sinusoidal_embedding
from mlscore_jax.sde import VESDE, VPSDE, SubVPSDE

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "ddpmpp_cifar10_params.txt"

# A tiny member of the family: two levels, one block per level, attention at 4x4 for 8x8 input.
# Compilation dominates the run time on CPU, so the tests share a few modules and shapes:
# parameters are created once (batch 1) and every evaluation uses a [4, 8, 8, 1] batch. Keys for
# parameters and dropout use the "rbg" PRNG, which XLA compiles several times faster than
# threefry (eager init of the tiny network: 13 s instead of 25 s); no test depends on the values.
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
# Evaluation network; its dropout rate matters only with train=True and its init_scale only at
# init, so it evaluates the parameters of every tiny variant below.
NET = DDPMpp(**TINY, dropout=0.5)
TRAIN_NET = DDPMpp(**TINY, dropout=0.0)
SHAPE = (4, 8, 8, 1)
TIMES = jnp.array([1e-3, 0.3, 0.6, 1.0])

U = 2.0**-24  # float32 unit roundoff
# Float32 error of the tiny network's output between two programs that compute it with other op
# orders (parameters as arguments or baked-in constants, other fusions), relative to the scale of
# the output (its largest |value| per example, not each element: a near-zero output element
# carries the same absolute error as the others). About 30 accumulating layers (3x3 convs over
# up to 32 channels, K <= 288 terms; NINs; attention), each erring by <~ sqrt(K) u relative to
# its output scale (rounding errors of a reordered sum add like a random walk), with GroupNorm
# keeping that scale O(1) so the errors add up rather than compound: 30 sqrt(288) u ~ 512 u.
NET_ROUNDING = 512 * U


def rbg_key(seed):
    return jax.random.key(seed, impl="rbg")


def assert_close_at_scale(actual, desired, rel, extra=0.0):
    """|actual - desired| <= (rel + extra) * max |desired| of the same example, elementwise."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    axes = tuple(range(1, desired.ndim))
    scale = np.abs(desired).max(axis=axes, keepdims=True)
    excess = np.abs(actual - desired) - (rel + extra) * scale
    assert (excess <= 0).all(), (
        f"{int((excess > 0).sum())} of {excess.size} elements beyond {(rel + extra) / U:.0f} u "
        f"x scale; worst |diff| / scale = {(np.abs(actual - desired) / scale).max() / U:.0f} u"
    )


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, x, t, train=False, key=None):
    rngs = None if key is None else {"dropout": key}
    return model.apply(variables, x, t, train=train, rngs=rngs)


@pytest.fixture(scope="module")
def paper_init():
    """Tiny DDPM++ with the paper's init_scale=0."""
    return init_variables(DDPMpp(**TINY), rbg_key(0), (1, 8, 8, 1))


@pytest.fixture(scope="module")
def unit_init():
    """Tiny DDPM++ with init_scale=1, so outputs are O(1)."""
    return init_variables(DDPMpp(**TINY, init_scale=1.0), rbg_key(0), (1, 8, 8, 1))


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), SHAPE)


# ------------------------------------------------------------------------------------------
# Shapes and selection by name.


@pytest.mark.parametrize(
    "shape, attn",
    [((2, 8, 8, 1), (4,)), ((2, 28, 28, 1), (14,)), ((2, 32, 32, 3), (16,))],
    ids=["8x8x1", "28x28x1", "32x32x3"],
)
def test_ddpmpp_output_shape_equals_input_shape(shape, attn):
    model = DDPMpp(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=attn)

    def forward(key, x, t):
        variables = init_variables(model, key, shape)
        return model.apply(variables, x, t, train=True, rngs={"dropout": key})

    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    out = jax.eval_shape(forward, jax.random.key(0), x, t)
    assert (out.shape, out.dtype) == (shape, jnp.float32)


@pytest.mark.parametrize("shape", [(5, 2), (3, 8, 8), (3, 8, 8, 1)])
def test_mlp_output_shape_equals_input_shape(shape):
    model = MLP(width=32, num_blocks=2, embedding_dim=16)

    def forward(key, x, t):
        return model.apply(init_variables(model, key, shape), x, t, train=False)

    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct(shape[:1], jnp.float32)
    assert jax.eval_shape(forward, jax.random.key(0), x, t).shape == shape


def test_scalar_time_is_broadcast_over_the_batch(unit_init, x):
    # Two programs (t of shape [] and [4]) that may fuse differently: NET_ROUNDING. A t used
    # unbroadcast would change every output by O(1) (std 0.1 and more, below).
    assert_close_at_scale(
        _apply(NET, unit_init, x, jnp.float32(0.3)),
        _apply(NET, unit_init, x, jnp.full(4, 0.3)),
        NET_ROUNDING,
    )
    with pytest.raises(ValueError, match="t must be"):
        jax.eval_shape(lambda: NET.apply(unit_init, x, jnp.ones(2), train=False))


# Keyword arguments, each unlike its default, for every registered model.
MODEL_KWARGS = {
    "ddpmpp": dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.25),
    "mlp": dict(width=24, num_blocks=1, embedding_dim=8, init_scale=1.0),
}


@pytest.mark.parametrize("name", sorted(MODEL_KWARGS))
def test_get_model_builds_the_registered_network_with_its_kwargs(name):
    model = get_model(name, **MODEL_KWARGS[name])
    cls = type(model)
    assert MODELS[name] is cls and model == cls(**MODEL_KWARGS[name])
    for field, value in MODEL_KWARGS[name].items():
        assert getattr(model, field) == value != getattr(cls(), field), field
    # ... and it is a working noise network: eps_hat shaped like x.
    shape = (2, 8, 8, 1)
    out = jax.eval_shape(
        lambda k, x, t: model.apply(init_variables(model, k, shape), x, t, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct(shape, jnp.float32),
        jax.ShapeDtypeStruct(shape[:1], jnp.float32),
    )
    assert out.shape == shape


def test_get_model_rejects_unknown_names_and_arguments():
    assert set(MODEL_KWARGS) == set(MODELS)  # every registered model is covered above
    choices = re.escape(str(sorted(MODELS)))
    with pytest.raises(ValueError, match=rf"unknown model 'unet'; choose one of {choices}"):
        get_model("unet")
    with pytest.raises(ValueError, match="unknown model 'DDPMpp'"):  # names are the keys
        get_model("DDPMpp")
    with pytest.raises(TypeError, match="width"):  # a keyword of another model
        get_model("ddpmpp", width=32)


def test_bad_image_size_is_an_error():
    model = DDPMpp(nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="not divisible"):
        jax.eval_shape(lambda: init_variables(model, jax.random.key(0), (1, 6, 6, 1)))


def test_sinusoidal_embedding_matches_its_formula():
    labels = jnp.array([0.0, 1.0, 998.0])
    emb = sinusoidal_embedding(labels, 8)
    log_freqs = -np.arange(4) * np.log(10000.0) / 3  # float64 reference
    angles = np.asarray(labels, np.float64)[:, None] * np.exp(log_freqs)
    expected = np.concatenate([np.sin(angles), np.cos(angles)], 1)
    # float32: exp's argument -log_step k carries 2 |log_step k| u (constant and product), exp 2u
    # more, the angle 1 u, so |d angle| <= (2 |log_step k| + 3) u |angle|; sin and cos add a few
    # ulps plus a range reduction error ~ u |angle|.
    angle_err = np.tile(np.abs(angles) * (2 * np.abs(log_freqs) + 4), 2)
    np.testing.assert_array_less(np.abs(np.asarray(emb) - expected), U * (angle_err + 4))


# ------------------------------------------------------------------------------------------
# Initialisation: what is (and what is not) zero.


def test_initial_output_is_tiny_but_not_exactly_zero(paper_init, unit_init, x):
    """init_scale=0 means variance scale 1e-10 (official `default_init`), not zero weights.

    Exactly zero at init: every bias (conv, dense, NIN, GroupNorm offset). Tiny
    (|W| <= sqrt(3e-10 / fan_avg)): the last conv of every ResBlock, the attention output NIN_3
    and the output conv Conv_1. So each residual branch and the network output start at ~1e-5;
    the output would be exactly zero only with a zero output kernel.
    """
    params = paper_init["params"]
    out = _apply(NET, paper_init, x, TIMES)
    assert 0.0 < float(jnp.max(jnp.abs(out))) < 1e-3

    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith(("['bias']", "['b']")):
            assert not bool(jnp.any(leaf)), name

    def bound(kernel):  # uniform variance scaling with scale 1e-10, fan_avg
        receptive = math.prod(kernel.shape[:-2])
        fan_avg = receptive * (kernel.shape[-2] + kernel.shape[-1]) / 2
        return math.sqrt(3e-10 / fan_avg)

    tiny = [params["Conv_1"]["kernel"]]
    tiny += [params[k]["Conv_1"]["kernel"] for k in params if k.startswith("ResnetBlock")]
    tiny += [params[k]["NIN_3"]["W"] for k in params if k.startswith("AttnBlock")]
    assert len(tiny) == 1 + 10 + 3  # output conv, 10 ResBlocks, 3 attention blocks
    for kernel in tiny:
        assert 0.0 < float(jnp.max(jnp.abs(kernel))) <= bound(kernel)
    first = params["ResnetBlockBigGANpp_0"]["Conv_0"]["kernel"]
    assert float(jnp.max(jnp.abs(first))) > 1e3 * bound(first)  # default scale 1 elsewhere

    zeroed = {"params": {**params, "Conv_1": {**params["Conv_1"]}}}  # exactly 0 * h + 0
    zeroed["params"]["Conv_1"]["kernel"] = jnp.zeros_like(params["Conv_1"]["kernel"])
    assert not bool(jnp.any(_apply(NET, zeroed, x, TIMES)))

    # The same network with init_scale=1 has O(1) outputs.
    assert float(jnp.std(_apply(NET, unit_init, x, TIMES))) > 0.1


# ------------------------------------------------------------------------------------------
# Dropout and time conditioning.


def test_dropout_only_in_training(unit_init, x):
    eval_a = _apply(NET, unit_init, x, TIMES)
    eval_b = _apply(NET, unit_init, x, TIMES, key=rbg_key(5))  # key unused in eval
    assert_close_at_scale(eval_b, eval_a, NET_ROUNDING)  # another program: rounding only

    train_a = _apply(NET, unit_init, x, TIMES, train=True, key=rbg_key(1))
    train_b = _apply(NET, unit_init, x, TIMES, train=True, key=rbg_key(2))
    train_a2 = _apply(NET, unit_init, x, TIMES, train=True, key=rbg_key(1))
    # Dropout at rate 0.5 changes O(1) outputs by O(1): 1e-2 is ~300 NET_ROUNDINGs below that.
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-2
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-2
    np.testing.assert_array_equal(train_a, train_a2)  # same program, same inputs: same bits
    with pytest.raises(Exception, match="dropout"):
        NET.apply(unit_init, x, TIMES, train=True)


_OPTIMIZER = optax.adam(2e-3)


def _per_example_loss(model, params, x0, key):
    """Likelihood-weighted, importance-sampled DSM loss of a noise network on x0; [B]."""
    noise_fn = get_noise_fn(model, {"params": params}, train=True)
    return losses.dsm_loss(
        None, VPSDE(), x0, key, weighting="likelihood", importance_sampling=True, noise_fn=noise_fn
    )


def _loss(model, params, x0, key):
    return jnp.mean(_per_example_loss(model, params, x0, key))


@functools.partial(jax.jit, static_argnames="model")
def _train_step(model, params, opt_state, x0, key):
    """One Adam step; also returns the loss and gradients at the incoming parameters."""
    loss, grads = jax.value_and_grad(lambda p: _loss(model, p, x0, key))(params)
    updates, opt_state = _OPTIMIZER.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, grads


def _gaussian_batch(key, batch):
    """Gaussian 8x8 images: a fixed +-0.5 pattern plus N(0, 0.1^2) per pixel."""
    mean = 0.5 * jnp.sign(jnp.sin(jnp.arange(64.0) + 0.5)).reshape(1, 8, 8, 1)
    return mean + 0.1 * jax.random.normal(key, (batch, 8, 8, 1))


def test_time_conditioning_after_one_gradient_step(paper_init, x):
    def time_effect(variables):
        lo = _apply(NET, variables, x, jnp.full(4, 0.1))
        return float(jnp.max(jnp.abs(lo - _apply(NET, variables, x, jnp.full(4, 0.9)))))

    params = paper_init["params"]
    stepped, *_ = _train_step(
        TRAIN_NET,
        params,
        _OPTIMIZER.init(params),
        _gaussian_batch(jax.random.key(3), 32),
        jax.random.key(4),
    )
    # At init the time path is multiplied by two ~1e-5 kernels (block output, output conv): an
    # effect ~1e-10 (rounding of outputs ~1e-5 is ~1e-12); one Adam step of 2e-3 moves every
    # kernel by ~2e-3 and opens the path to ~1e-3. The thresholds sit between, decades from both.
    assert time_effect(paper_init) < 1e-7
    assert time_effect({"params": stepped}) > 1e-4


# ------------------------------------------------------------------------------------------
# The score contract: s = -eps_hat / sigma(t).


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_score_is_minus_noise_over_std(sde, unit_init, x):
    eps_hat = _apply(NET, unit_init, x, TIMES)
    _, std = sde.marginal(TIMES)
    expected = -eps_hat / std[:, None, None, None]
    score_fn = score_fn_from_noise_fn(lambda x, t: _apply(NET, unit_init, x, t), sde)
    # The same eps_hat (one compiled program) and the same eager sigma(t) on both sides, one
    # correctly rounded division each: equal, or 1 ulp apart (2 u) if sigma is recomputed.
    np.testing.assert_allclose(score_fn(x, TIMES), expected, rtol=2 * U, atol=0)


def test_get_score_fn_and_get_noise_fn(unit_init, x):
    sde = VPSDE()
    eps_hat = _apply(NET, unit_init, x, TIMES)
    noise_fn = jax.jit(get_noise_fn(NET, unit_init))
    score_fn = jax.jit(get_score_fn(NET, unit_init, sde))
    # Parameters baked in as constants fold and fuse differently: NET_ROUNDING of eps_hat's
    # scale (measured: up to 54 u). Not elementwise relative: a near-zero element carries the
    # same absolute error as the largest one.
    assert_close_at_scale(noise_fn(x, TIMES), eps_hat, NET_ROUNDING)
    # s = -eps_hat / sigma: the same relative-to-scale error (scale |eps_hat| / sigma, ~300 at
    # t = 1e-3), plus sigma (recomputed in the program, 2 u) and the division (1 u) here and
    # there. Elementwise rtol fails here: 1e-4 missed by 1.4e-4 on one near-zero element.
    expected = -eps_hat / sde.marginal(TIMES)[1][:, None, None, None]
    assert_close_at_scale(score_fn(x, TIMES), expected, NET_ROUNDING, extra=4 * U)


def test_score_and_noise_give_the_same_loss():
    shape = (4, 2)
    sde = VPSDE()
    model = MLP(width=32, num_blocks=1, embedding_dim=16, init_scale=1.0)
    variables = init_variables(model, rbg_key(0), shape)
    x0 = jax.random.normal(jax.random.key(1), shape)
    kw = dict(weighting="likelihood", importance_sampling=True)
    key = jax.random.key(2)
    noise_fn, outputs = get_noise_fn(model, variables), []

    def recording_noise_fn(x, t):  # dsm_loss runs eagerly: eps_hat at its (x_t, t)
        outputs.append(noise_fn(x, t))
        return outputs[-1]

    via_score = losses.dsm_loss(get_score_fn(model, variables, sde), sde, x0, key, **kw)
    via_noise = losses.dsm_loss(None, sde, x0, key, noise_fn=recording_noise_fn, **kw)
    # Same t, z and eps_hat on both paths (same eager ops); the score path forms
    # sigma * (-eps_hat / sigma) = -eps_hat (1 + d), |d| <= 2u, before r = z - eps_hat. With
    # loss = c |r|^2 / D (c = Z / (T - eps)), the residual's perturbation 2u |eps_hat| + 2u |r|
    # and the roundings of r^2, the sum and c give, by Cauchy-Schwarz,
    #     |d loss| <= 4u sqrt(c loss / D) |eps_hat|_2 + (2 D + 6) u loss;  twice that here.
    (eps_hat,) = outputs
    d = math.prod(shape[1:])
    c = float(sde.importance_normalizer(1e-5)) / (sde.T - 1e-5)
    loss = np.asarray(via_noise, np.float64)
    norm = np.linalg.norm(np.asarray(eps_hat, np.float64).reshape(len(loss), -1), axis=1)
    bound = 2 * U * (4 * np.sqrt(c * loss / d) * norm + (2 * d + 6) * loss)
    np.testing.assert_array_less(np.abs(np.asarray(via_score, np.float64) - loss), bound)
    assert float(jnp.std(eps_hat)) > 0.1  # a network with O(1) outputs, not a trivial match


# ------------------------------------------------------------------------------------------
# A real learning run: likelihood weighting with importance sampling on Gaussian 8x8 data.


def test_tiny_ddpmpp_learns_gaussian_data_with_likelihood_weighting(paper_init):
    params = paper_init["params"]
    opt_state = _OPTIMIZER.init(params)
    held_x0 = _gaussian_batch(jax.random.key(100), 256)  # fixed batch, times and noise
    held_loss = jax.jit(lambda p: _per_example_loss(TRAIN_NET, p, held_x0, jax.random.key(101)))

    before = np.asarray(held_loss(params), np.float64)
    history = []
    key = jax.random.key(42)
    for i in range(100):  # the held-out loss has plateaued (~0.4x) by 100 steps
        key_x, key_loss = jax.random.split(jax.random.fold_in(key, i))
        params, opt_state, loss, _ = _train_step(
            TRAIN_NET, params, opt_state, _gaussian_batch(key_x, 32), key_loss
        )
        history.append(float(loss))
    after = np.asarray(held_loss(params), np.float64)

    assert np.all(np.isfinite(history))
    # Learned: the held-out loss (the same x0, t and noise before and after) drops by 30 % or
    # more (here ~60 %), and the paired per-example drop is K_SE = 4.5 standard errors above
    # zero (a chance drop that large: 3.4e-6 one-sided), so it is no artefact of a few examples.
    assert after.mean() < 0.7 * before.mean()
    drop = before - after
    assert drop.mean() > 4.5 * drop.std(ddof=1) / math.sqrt(drop.size)


# ------------------------------------------------------------------------------------------
# The paper's network: parameter counts and the full parameter tree.


def _closed_form_count(nf, ch_mult, num_res_blocks, attn_resolutions, size, channels):
    """Parameter count of DDPM++ from the architecture description alone."""
    temb = 4 * nf

    def conv(c_in, c_out, k):
        return k * k * c_in * c_out + c_out

    def res(c_in, c_out, resample=False):
        n = 2 * c_in + conv(c_in, c_out, 3) + temb * c_out + c_out + 2 * c_out
        n += conv(c_out, c_out, 3)
        return n + (conv(c_in, c_out, 1) if c_in != c_out or resample else 0)

    def attn(c):
        return 2 * c + 4 * (c * c + c)

    total = (nf * temb + temb) + (temb * temb + temb) + conv(channels, nf, 3)
    skips, c = [nf], nf
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            total += res(c, nf * mult) + (attn(nf * mult) if size in attn_resolutions else 0)
            c = nf * mult
            skips.append(c)
        if level != len(ch_mult) - 1:
            total += res(c, c, True)
            skips.append(c)
            size //= 2
    total += 2 * res(c, c) + attn(c)
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += res(c + skips.pop(), nf * ch_mult[level])
            c = nf * ch_mult[level]
        total += attn(c) if size in attn_resolutions else 0
        if level != 0:
            total += res(c, c, True)
            size *= 2
    return total + 2 * c + conv(c, channels, 3)


@pytest.mark.parametrize(
    "num_res_blocks, expected", [(4, 61_804_419), (8, 106_632_579)], ids=["standard", "deep"]
)
def test_cifar10_parameter_count(num_res_blocks, expected):
    params = abstract_variables(DDPMpp(num_res_blocks=num_res_blocks), (1, 32, 32, 3))["params"]
    # The network's count, against the paper's number and an independent count from the
    # architecture description.
    closed_form = _closed_form_count(128, (1, 2, 2, 2), num_res_blocks, (16,), 32, 3)
    assert param_count(params) == closed_form == expected
    n_res = sum(k.startswith("ResnetBlockBigGANpp_") for k in params)
    n_attn = sum(k.startswith("AttnBlockpp_") for k in params)
    # Down: 4 levels x num_res_blocks + 3 down; middle 2; up: 4 x (num_res_blocks + 1) + 3 up.
    # Attention after every block at 16x16 on the way down, once in the middle, once going up.
    assert (n_res, n_attn) == (8 * num_res_blocks + 12, num_res_blocks + 2)


def _cifar10_table() -> str:
    params = abstract_variables(DDPMpp(), (1, 32, 32, 3))["params"]
    header = (
        "# DDPMpp() = CIFAR-10 DDPM++ cont.: nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4,\n"
        "# attn_resolutions=(16,), input [B, 32, 32, 3]. Paths and names are those of the\n"
        "# official NCSNpp parameter tree. Generated by tests/test_models.py via jax.eval_shape.\n"
    )
    return header + param_table(params)


def test_cifar10_parameter_table_matches_fixture():
    table = _cifar10_table()
    if os.environ.get("MLSCORE_UPDATE_FIXTURES"):
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(table)
    assert FIXTURE.read_text() == table, "network structure changed; see the module docstring"


@pytest.mark.parametrize(
    "size,kernel,strides,padding,lhs_dil,rhs_dil",
    [
        (8, 3, (1, 1), "SAME", None, None),  # every DDPM++ conv
        (8, 1, (1, 1), "SAME", None, None),
        (9, 3, (2, 2), "SAME", None, None),
        (7, 3, (2, 1), ((0, 1), (2, 0)), None, None),
        (6, 3, (1, 1), ((1, 1), (1, 1)), (2, 2), (1, 2)),
    ],
)
def test_loop_friendly_conv_matches_lax_values_and_gradients(
    size, kernel, strides, padding, lhs_dil, rhs_dil
):
    """layers.conv_general_dilated (the CPU path of DDPM++) is lax's conv with another VJP."""
    from jax import lax

    from mlscore_jax.models import layers

    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv):
        return lambda x, w: jnp.sum(
            jnp.sin(conv(x, w, strides, padding, lhs_dil, rhs_dil, dimension_numbers=dn))
        )

    ours, ref = loss(layers.conv_general_dilated), loss(lax.conv_general_dilated)
    # The forward pass is the same lax convolution (same primitive, shapes and dimension
    # numbers, so the same executable): the same bits.
    np.testing.assert_array_equal(ours(x, w), ref(x, w))
    # The gradients are other convolutions of the same cotangent cos(y) (bit-equal on both
    # sides): each output is a sum of K products, so each side is within gamma_K = K u of the
    # exact sum of |terms| (deterministic bound), i.e. |ours - ref| <= 2 K u (|g| * |w| or
    # |x| * |g|), computed exactly that way with absolute values. K: kh kw C_out for dx, the
    # N H' W' output positions for dw.
    y = lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, dimension_numbers=dn)
    conv_abs = lambda a, b: lax.conv_general_dilated(  # noqa: E731
        a, b, strides, padding, lhs_dil, rhs_dil, dimension_numbers=dn
    )
    _, vjp_abs = jax.vjp(conv_abs, jnp.abs(x), jnp.abs(w))
    sums = vjp_abs(jnp.abs(jnp.cos(y)))
    ks = (kernel * kernel * w.shape[-1], math.prod(y.shape[:3]))
    grads = zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w), sums, ks, strict=True)
    for a, b, abs_sum, k in grads:
        np.testing.assert_array_less(np.abs(a - b), 2 * k * U * np.asarray(abs_sum) + 1e-30)
    # ... and its backward pass only has canonical (NHWC x HWIO -> NHWC) convolutions.
    jaxpr = str(jax.make_jaxpr(jax.grad(ours, (0, 1)))(x, w))
    specs = re.findall(r"lhs_spec=\(([\d, ]+)\), rhs_spec=\(([\d, ]+)\)", jaxpr)
    assert len(specs) == 3 and set(specs) == {("0, 3, 1, 2", "3, 2, 0, 1")}


def test_ddpmpp_cpu_conv_grads_change_nothing_but_speed(unit_init):
    """The training step's loss and gradients with the loop-friendly convolution VJPs (the
    default, compiled once for the tests above) and with JAX's own."""
    params = unit_init["params"]  # O(1) parameters: every layer's gradient is awake
    x0, key = _gaussian_batch(jax.random.key(3), 32), jax.random.key(4)
    lax_net = DDPMpp(**TINY, dropout=0.0, cpu_conv_grads=False)
    *_, loss_a, ga = _train_step(TRAIN_NET, params, _OPTIMIZER.init(params), x0, key)
    *_, loss_b, gb = _train_step(lax_net, params, _OPTIMIZER.init(params), x0, key)
    # The forward convolutions are the same lax convolutions: the same loss, bit for bit.
    np.testing.assert_array_equal(loss_a, loss_b)
    # The backward convolutions are written differently (explicit transposes, or JAX's
    # transpose rules): reordered sums, whose errors propagate back through the network like
    # the forward pass's do (NET_ROUNDING), relative to each gradient leaf's scale.
    for u, v in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        assert_close_at_scale(u[None], v[None], NET_ROUNDING)
