"""Flow++ dequantizer (mlscore_jax.models.flowpp): invertibility and log-determinants of every
layer and of the whole flow against brute-force Jacobians, the mixture-CDF bisection, the
data-dependent init, and agreement with the official score_flow code on its fixtures (outputs,
inverse, EMA vs non-EMA weights, CIFAR conv orientation, parameter trees).

Compilation dominates on CPU (XLA:CPU spends ~10 ms per fused kernel, a flow has hundreds, and
every eager jax op is a program of its own), so: each check is one compiled program computing
everything it needs, shared through module-scoped fixtures; inputs are drawn with numpy, and
most parameters of the flow tests too (`_random_params`: no init to compile); and programs are
compiled at LLVM optimisation level 0 (`_jit0`: the same HLO with less optimised machine code,
~3x faster to compile; it runs slower, which costs little at these sizes, and may order
float32 reductions differently, within the tolerances).

Brute-force Jacobians use reverse mode (`jax.vjp`, `_jacobians`): on CPU the convolutions go
through `layers.conv_general_dilated`, a custom VJP (loop-friendly gradients) without a forward
mode. Reverse mode is also what training differentiates.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from types import SimpleNamespace

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlscore_jax.models.flowpp import (
    DEQUANTIZERS,
    VARIANTS,
    FlowppDequantizer,
    MixLogisticAttnCoupling,
    Norm,
    Pointwise,
    checkerboard_merge,
    checkerboard_split,
    cifar10_dequantizer,
    concat_elu,
    dense,
    imagenet32_dequantizer,
    init_dequantizer,
    mixlogistic_cdf,
    mixlogistic_invcdf,
    mixlogistic_logpdf,
    sigmoid_flow,
    wn_conv,
)

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official"
U = 2.0**-24  # float32 unit roundoff
ULP1 = 2.0**-23  # float32 spacing above 1

_jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# Tiny members of both variants (context nets shrunk too): every code path, few kernels.
TINY = dict(
    levels=17,
    filters=8,
    components=3,
    blocks=1,
    heads=2,
    context_channels=8,
    context_blocks=1,
    context_heads=2,
)
# Per-example image shapes of the whole-flow tests, D = 32 and 24: C = 2 (a real 2x2 Pointwise)
# for CIFAR; C = 1, H != W/2 and an odd W/2 for ImageNet32.
FLOW_SHAPES = {"cifar10": (4, 4, 2), "imagenet32": (4, 6, 1)}
INIT_BATCH = 16
N_FLOW = 6  # examples of the whole-flow checks (plus N_FLOW with eps * BIG)
BIG = 8.0  # eps scaled up far enough to saturate the final sigmoid
# Coupling heads of the host-drawn parameters: s, t and the mixture parameters ~HEAD, far from
# the near-identity of a data-initialised coupling (init_scale 0.1), yet 8 couplings in a row
# keep u away from 0 and 1.
HEAD = 0.3
# The official fixtures' constructor (README of the fixtures, sections 3 and 4).
FIXTURE_MODEL = dict(filters=16, components=4, blocks=1, heads=2, levels=256)
FULL_TOTALS = {"cifar10": 3_466_976, "imagenet32": 35_482_720}


# ---------------------------------------------------------------------------------------------
# Helpers: inputs, parameters, flattening, brute-force log-dets and the float32 tolerances.


def _normal(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pair(seed: int, shape, batch):
    return _normal(seed, (batch, *shape)), _normal(seed + 1000, (batch, *shape))


def _random_params(abstract, seed: int):
    """Parameters for a tree of shapes, drawn on the host at init-like scales: kernels
    N(0, 1 / fan_in), so every layer is O(1), coupling heads times HEAD; biases, Norm shifts and
    position embeddings 0.1 N; Norm scales exp(0.1 N); gains 1 + 0.1 N; Pointwise I + 0.3 N."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        normal = rng.standard_normal(shape).astype(np.float32)
        head = HEAD if re.fullmatch(r"block\d+_(proj_out|c2)_[WVg]", name) else 1.0
        if re.fullmatch(r"W\d", name):
            return np.eye(shape[0], dtype=np.float32) + 0.3 * normal
        if re.fullmatch(r"norm\d_g", name):
            return np.exp(0.1 * normal)
        if name.endswith(("_W", "_V")):
            return head * normal / np.float32(math.sqrt(math.prod(shape[:-1])))
        if name.endswith("_g"):
            return head * (1.0 + 0.1 * normal)
        return 0.1 * normal

    return jax.tree_util.tree_map_with_path(draw, abstract)


def _abstract_variables(module, k_shape):
    """The variables' shapes (of module.init: the tree init_dequantizer returns, traced once)."""
    k = jax.ShapeDtypeStruct(k_shape, jnp.int32)
    eps = jax.ShapeDtypeStruct(k_shape, jnp.float32)
    return jax.eval_shape(lambda e, k: module.init(jax.random.key(0), e, k), eps, k)


def _flat(xs):
    """Per-example concatenation of a pair of halves: 2 x [B, ...] -> [B, D] (in programs)."""
    return jnp.concatenate([x.reshape(x.shape[0], -1) for x in xs], axis=1)


def _flat_np(xs) -> np.ndarray:
    return np.concatenate([np.asarray(x).reshape(len(x), -1) for x in xs], axis=1)


def _unflat(v, shape: tuple[int, ...]):
    """Inverse of `_flat` for halves of per-example shape `shape`."""
    n = math.prod(shape)
    return v[:, :n].reshape((-1, *shape)), v[:, n:].reshape((-1, *shape))


def _log_normal(x) -> np.ndarray:
    """sum log N(x; 0, I) per example, in float64."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return np.sum(-0.5 * x**2 - 0.5 * math.log(2 * math.pi), axis=1)


def _brute_logdet(jac) -> np.ndarray:
    """log|det| of float32 Jacobians [N, D, D], factorised in float64 (so the only error left is
    that of the Jacobian entries)."""
    sign, logdet = np.linalg.slogdet(np.asarray(jac, np.float64))
    assert np.all(sign != 0)
    return logdet


def _logdet_tol(jac, terms: int) -> np.ndarray:
    """Bound on |analytic log-det - brute force| per example from float32 rounding, [N].

    * Brute force: each Jacobian entry is a chain of a few dozen rounded operations, relative
      error <= 64 u; entries perturbed so (|dJ| <= 64 u |J|) move log|det J| by tr(J^-1 dJ) <=
      64 u sum_ij |J^-1|_ji |J|_ij (the condition count of J, >= D).
    * Analytic: a float32 sum of n = `terms` terms; each addition rounds by <= u of its
      partial sum, and the partial sums stay within a term (<~ 10) of the total's size
      |log det|. Those roundings are independent, so their sum is ~sqrt(n) of them (Higham,
      "Accuracy and Stability of Numerical Algorithms", sec. 4.2), here 4 sqrt(n) u (|log det|
      + 10) (the worst case, n u (...), is ~sqrt(n) / 4 times larger and never approached).
    """
    jac = np.asarray(jac, np.float64)
    count = np.einsum("nji,nij->n", np.abs(np.linalg.inv(jac)), np.abs(jac))
    total = np.abs(np.linalg.slogdet(jac)[1])
    return 64 * U * count + _sum_tol(terms, total)


def _sum_tol(terms, size):
    """Rounding of a float32 sum of `terms` terms whose partial sums are <~ size + 10."""
    return 4 * math.sqrt(terms) * U * (np.asarray(size, np.float64) + 10) + 1e-6


def _saturation_tol(u) -> np.ndarray:
    """Extra brute-force error where a sigmoid saturates, summed per example, [N].

    Autodiff differentiates sigmoid as s (1 - s): once s is rounded near 1 (or 0), 1 - s (or s)
    keeps only ~u / min(s, 1 - s) relative accuracy; the analytic log-det -softplus(z) -
    softplus(-z) does not lose it. u: [N, ...], the sigmoid outputs.
    """
    u = np.asarray(u, np.float64).reshape(np.shape(u)[0], -1)
    return np.sum(4 * U / np.minimum(u, 1.0 - u), axis=1)


def _roundtrip_tol(jac, y, x) -> np.ndarray:
    """Bound on |f^-1(f(x)) - x| per element from float32 rounding, [N, D].

    The forward pass delivers y = f(x) + dy, with dy its float32 rounding: every layer rounds
    its output to ~16 ulp (a dozen rounded operations), and the last layers dominate what
    reaches y, so |dy_j| <= 16 ulp(y_j). The inverse maps it back, x_hat = x + J^-1 dy
    (its own rounding is of the same kind and size), so |dx_i| <= 32 sum_j |J^-1|_ij ulp(y_j),
    plus the final rounding of x_hat, ulp(x_i). (A coupling's bisection stops at the float32 x
    nearest the target: an error ulp(logit F) / (logit F)', a rounding of the same kind, carried
    back by the same J^-1.) jac: [N, D, D]; y, x: [N, D].
    """
    inv = np.abs(np.linalg.inv(np.asarray(jac, np.float64)))
    ulp_y = ULP1 * np.maximum(np.abs(np.asarray(y, np.float64)), 2.0**-10)
    return 32 * np.einsum("nij,nj->ni", inv, ulp_y) + ULP1 * np.abs(np.asarray(x)) + 1e-12


def _jacobians(f, x):
    """Per-example Jacobians [B, D_out, D_in] of f: [B, ...] -> ([B, D_out], aux) whose examples
    are independent, by reverse mode: row j of every example's Jacobian at once, from one VJP
    with the cotangent e_j in every example. Returns (f(x)[0], aux, jacobians)."""
    y, vjp, aux = jax.vjp(f, x, has_aux=True)
    basis = jnp.broadcast_to(jnp.eye(y.shape[1], dtype=y.dtype)[:, None, :], (y.shape[1], *y.shape))
    (rows,) = jax.vmap(vjp)(basis)  # [D_out, B, ...]
    return y, aux, jnp.moveaxis(rows.reshape(y.shape[1], y.shape[0], -1), 0, 1)


def _check_layer(apply, shape, xs, n_terms, cond=None):
    """Round trip and log-det against the reverse-mode Jacobian for a layer apply(xs, inverse,
    cond) -> (ys, logdet) on halves of per-example `shape` (cond: per-example conditioning or
    None), all in one compiled program. Returns ys."""

    @_jit0
    def run(xs, cond):
        def forward(v):
            ys, logdet = apply(_unflat(v, shape), False, cond)
            return _flat(ys), (ys, logdet)

        _, (ys, logdet), jac = _jacobians(forward, _flat(xs))
        xs_back, logdet_inv = apply(ys, True, cond)
        return ys, logdet, xs_back, logdet_inv, jac

    ys, logdet, xs_back, logdet_inv, jac = run(xs, cond)
    err = np.abs(_flat_np(xs_back) - _flat_np(xs))
    tol = _roundtrip_tol(jac, _flat_np(ys), _flat_np(xs))
    assert np.all(err <= tol), (err / tol).max()
    diff = np.abs(np.asarray(logdet) - _brute_logdet(jac))
    assert np.all(diff <= _logdet_tol(jac, n_terms)), (diff, _logdet_tol(jac, n_terms))
    # The inverse's log-det is the negated forward one at the same point, to the rounding of
    # both sums (as in _logdet_tol).
    sum_tol = 2 * _sum_tol(n_terms, np.abs(np.asarray(logdet)))
    assert np.all(np.abs(np.asarray(logdet_inv + logdet)) <= sum_tol)
    return ys


# ---------------------------------------------------------------------------------------------
# Parameter-free layers and the mixture of logistics.


def test_split_merge_are_inverse_permutations():
    @_jit0
    def run(x):
        a, b = checkerboard_split(x)
        jac = jax.jacrev(lambda v: _flat(checkerboard_split(v.reshape(1, 4, 6, 3)))[0])
        return a, b, checkerboard_merge(a, b), jac(x[0].ravel())

    x = _normal(1, (2, 4, 6, 3))
    a, b, merged, jac = (np.asarray(v) for v in run(x))
    np.testing.assert_array_equal(a, x[:, :, 0::2])  # even columns
    np.testing.assert_array_equal(b, x[:, :, 1::2])  # odd columns
    np.testing.assert_array_equal(merged, x)  # exact: only data movement
    # A permutation matrix: |det| = 1, log-det 0, as the flow assumes.
    assert set(np.unique(jac)) == {0.0, 1.0}
    np.testing.assert_array_equal(jac.sum(axis=0), 1.0)
    np.testing.assert_array_equal(jac.sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="even"):
        checkerboard_split(np.zeros((1, 4, 5, 1), np.float32))


def test_sigmoid_flow():
    @_jit0
    def run(z):
        u, logdet = sigmoid_flow(z)
        z_back, logdet_inv = sigmoid_flow(u, inverse=True)
        jac = jax.jacrev(lambda v: sigmoid_flow(v[None])[0][0])(z[0])
        return u, logdet, z_back, logdet_inv, jac

    z = np.concatenate([np.linspace(-12, 12, 25), [-200, -90, 17, 200]]).astype(np.float32)
    u, logdet, z_back, logdet_inv, jac = (np.asarray(a) for a in run(z[None]))
    u64, z64 = np.asarray(u[0], np.float64), np.asarray(z, np.float64)
    ok = slice(0, 25)  # not saturated (sigmoid(17) rounds to 1, sigmoid(-90) is subnormal)
    # Round trip: log u - log(1 - u) carries the rounding of u (<= 2^-24 near 1, relative
    # elsewhere) by 1 / (u (1 - u)); the logs add ~2 ulp of the result.
    tol = 2 * U / (u64[ok] * (1 - u64[ok])) + 4 * ULP1 * np.abs(z64[ok])
    assert np.all(np.abs(z_back[0, ok] - z64[ok]) <= tol)
    # The log-det formula against the Jacobian's diagonal, and the module against the formula
    # (29 softplus terms, each to a few ulp).
    brute = np.sum(np.log(np.diag(np.asarray(jac, np.float64))[ok]))
    formula = -np.logaddexp(0, z64) - np.logaddexp(0, -z64)
    assert abs(formula[ok].sum() - brute) <= _saturation_tol(u[:, ok])[0] + 25 * 10 * U
    assert abs(float(logdet[0]) - formula.sum()) <= 29 * 10 * U * abs(formula.sum())
    # The inverse log-det, -log u - log(1 - u), at u as it is (clipped where saturated).
    expected_inv = np.sum(-np.log(u64) - np.log1p(-u64))
    assert abs(float(logdet_inv[0]) - expected_inv) <= 29 * 10 * U * abs(expected_inv)
    # u strictly inside (0, 1) although sigmoid saturates; everything finite.
    assert np.all((u > 0) & (u < 1)) and np.all(np.isfinite(z_back))


def test_mixture_cdf_inverse_converges():
    @_jit0
    def run(x, logits, means, logscales):
        y = mixlogistic_cdf(x, logits, means, logscales)
        x_hat = mixlogistic_invcdf(y, logits, means, logscales)
        residual = mixlogistic_cdf(x_hat, logits, means, logscales) - y
        pdf = jnp.exp(mixlogistic_logpdf(x, logits, means, logscales))
        grad = jax.vmap(jax.grad(mixlogistic_cdf))(x, logits, means, logscales)
        return x_hat, residual, pdf, grad

    rng = np.random.default_rng(2)
    logits, means = rng.standard_normal((128, 5)), 2 * rng.standard_normal((128, 5))
    logscales = rng.uniform(-2.0, 1.0, (128, 5))
    logscales[64:] += 3.0  # wide mixtures: log-scales up to 4, a bracket of +-200 S ~ 5e4
    x = np.concatenate([np.linspace(-6, 6, 64), np.linspace(-60, 60, 64)])
    args = (a.astype(np.float32) for a in (x, logits, means, logscales))
    x_hat, residual, pdf, grad = (np.asarray(a, np.float64) for a in run(*args))
    # Converged: F(x_hat) equals the target to the rounding of F (a few u): the bisection has
    # shrunk the bracket to float32 spacing.
    assert np.abs(residual).max() <= 8 * U
    # Hence |x_hat - x| ~ residual / F'(x) <= 1e-5 wherever F' >= 8 u / 1e-5 ~ 0.05, and
    # |x_hat - x| <= (residual + u) / F' + ulp(x) everywhere.
    err = np.abs(x_hat - x)
    well = pdf >= 0.05
    assert well.sum() >= 30
    assert err[well].max() <= 1e-5
    assert np.all(err <= 9 * U / pdf + ULP1 * np.abs(x))
    # The density is the CDF's derivative (autodiff of the official CDF formula).
    np.testing.assert_allclose(pdf, grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Layers with parameters, one at a time.


def test_norm_layer():
    shape = (4, 2, 2)
    xs = _pair(4, shape, INIT_BATCH)
    xs = (3 * xs[0] + 1, 0.5 * xs[1] - 2)  # not standard, so the init has work to do

    @_jit0
    def init_and_apply(key, xs):
        variables = Norm().init(key, xs)
        return variables, Norm().apply(variables, xs)[0]

    variables, ys = init_and_apply(jax.random.key(5), xs)
    # Data-dependent init: the init batch leaves standardised (bounds: _check_standardised).
    for y in ys:
        y = np.asarray(y, np.float64)
        assert np.abs(y.mean(axis=0)).max() <= 1e-5
        assert np.abs(y.var(axis=0) - 1.0).max() <= 1e-4

    def apply(xs, inverse, _):
        return Norm().apply(variables, xs, inverse=inverse)

    _check_layer(apply, shape, _pair(6, shape, 3), 32)


@pytest.mark.parametrize("channels", [1, 2])
def test_pointwise_layer(channels):
    shape = (3, 2, channels)
    xs = _pair(7, shape, 2)
    # Far from the identity init (I + 0.001 N(0, 1), checked on a whole flow below).
    params = _random_params(jax.eval_shape(Pointwise().init, jax.random.key(0), xs)["params"], 9)
    assert params["W0"].shape == (channels, channels)

    def apply(xs, inverse, _):
        return Pointwise().apply({"params": params}, xs, inverse=inverse)

    _check_layer(apply, shape, xs, 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_coupling_layer(variant):
    shape = (4, 3, 2)
    coupling = MixLogisticAttnCoupling(variant, filters=8, components=3, blocks=1, heads=2)
    xs = _pair(10, shape, 3)
    context = _normal(11, (3, *shape[:2], 8))
    abstract = jax.eval_shape(lambda: coupling.init(jax.random.key(0), xs, context))
    params = _random_params(abstract["params"], seed=12)

    def apply(xs, inverse, context):
        return coupling.apply({"params": params}, xs, context, inverse=inverse)

    cf, ef = _check_layer(apply, shape, xs, 24, cond=context)
    np.testing.assert_array_equal(cf, xs[0])  # the conditioning half passes unchanged
    assert np.abs(np.asarray(ef) - xs[1]).max() > 0.5


# ---------------------------------------------------------------------------------------------
# The whole flow, tiny models of both variants. CIFAR: data-initialised by init_dequantizer
# inside the same program, whose promises are checked on its outputs; ImageNet32: host-drawn
# parameters (its 8 couplings make a compiled init slow; its init rules: _WeightNormLayers).


def _is_norm(module, method_name):
    return isinstance(module, Norm) and method_name == "__call__"


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request):
    """A tiny dequantizer and, in one program: (CIFAR) init_dequantizer on a batch of 16 and the
    forward of that batch with its Norm and sown conv / dense outputs; then per example of
    [eps, BIG eps] (N_FLOW each) u, log q and the Jacobian du/deps; and the inverse of u."""
    variant = request.param
    shape = FLOW_SHAPES[variant]
    module = FlowppDequantizer(variant=variant, **TINY)
    k = np.random.default_rng(20).integers(0, TINY["levels"], (INIT_BATCH, *shape), np.int32)
    eps = _normal(21, (INIT_BATCH, *shape))
    k_flow = np.concatenate([k[:N_FLOW], k[:N_FLOW]])
    eps_flow = np.concatenate([eps[:N_FLOW], BIG * eps[:N_FLOW]])
    data_init = variant == "cifar10"
    params = None
    if not data_init:
        params = _random_params(_abstract_variables(module, k.shape)["params"], seed=22)

    @_jit0
    def run(key, params):
        intermediates = None
        if data_init:
            params = init_dequantizer(module, key, k, eps)["params"]
            _, state = module.apply(
                {"params": params}, eps, k, capture_intermediates=_is_norm, mutable=True
            )
            intermediates = state["intermediates"]
        variables = {"params": params}

        def forward(e):
            u, log_q = module.apply(variables, e, k_flow)
            return u.reshape(len(e), -1), (u, log_q)

        _, (u, log_q), jac = _jacobians(forward, eps_flow)
        eps_hat, log_q_inv = module.apply(variables, u, k_flow, inverse=True)
        return params, intermediates, (u, log_q, jac, eps_hat, log_q_inv)

    key = jax.random.key(23)
    params, intermediates, out = run(key, params)
    u, log_q, jac, eps_hat, log_q_inv = (np.asarray(a) for a in out)
    return SimpleNamespace(
        variant=variant,
        run=run,
        key=key,
        params=params,
        intermediates=intermediates,
        eps_flow=eps_flow,
        u=u,
        log_q=log_q,
        jac=jac,
        eps_hat=eps_hat,
        log_q_inv=log_q_inv,
    )


def _n_log_terms(variant, d):
    """Log-det terms summed per example: D per Norm, Pointwise, coupling and the sigmoid."""
    return (4 * 3 + 1 if variant == "cifar10" else 8 * 2 + 1) * d


def test_flow_round_trip(tiny):
    ok, flat = slice(0, N_FLOW), (N_FLOW, -1)
    err = np.abs(tiny.eps_hat - tiny.eps_flow)[ok].reshape(flat)
    tol = _roundtrip_tol(tiny.jac[ok], tiny.u[ok].reshape(flat), tiny.eps_flow[ok].reshape(flat))
    assert np.all(err <= tol), (err / tol).max()
    # The inverse reports the same log q(u | k) = log N(eps_hat) + inverse log-dets: the same
    # terms summed in another order (each sum as in _logdet_tol, its partial sums within the
    # sizes of log N and the log-det), and log N moved by the round-trip error (|d log N| <=
    # sum |eps| |d eps|).
    d = tiny.eps_flow[0].size
    n_terms = _n_log_terms(tiny.variant, d) + d
    log_n = _log_normal(tiny.eps_flow)
    sizes = np.abs(log_n) + np.abs(log_n - tiny.log_q)
    shift = np.sum(
        np.abs(tiny.eps_flow * (tiny.eps_hat - tiny.eps_flow)).reshape(len(sizes), -1), 1
    )
    tol = 2 * _sum_tol(n_terms, sizes) + 2 * shift
    assert np.all(np.abs(tiny.log_q_inv - tiny.log_q)[ok] <= tol[ok])


def test_flow_log_q_matches_jacobian(tiny):
    """log q(u | k) = log N(eps) - log|det du/deps|, the determinant by brute force."""
    ok = slice(0, N_FLOW)
    log_det = (_log_normal(tiny.eps_flow) - tiny.log_q)[ok]
    brute = _brute_logdet(tiny.jac[ok])
    n_terms = _n_log_terms(tiny.variant, tiny.eps_flow[0].size)
    tol = _logdet_tol(tiny.jac[ok], n_terms) + _saturation_tol(tiny.u[ok])
    assert np.all(np.abs(log_det - brute) <= tol), (log_det - brute, tol)
    assert np.abs(brute).min() > 1.0  # not vacuous: far from volume-preserving


def test_flow_u_strictly_inside_unit_interval(tiny):
    assert tiny.u.dtype == np.float32 and tiny.u.shape == tiny.eps_flow.shape
    assert np.all((tiny.u > 0) & (tiny.u < 1))
    # BIG eps drive the final sigmoid into saturation (sigmoid(z) rounds to 1 for z > 16.6),
    # where the clip keeps u off 1; log q and the inverse stay finite.
    assert tiny.u[N_FLOW:].max() == np.float32(1 - 2**-24)
    assert np.all(np.isfinite(tiny.log_q)) and np.all(np.isfinite(tiny.eps_hat))


def _check_standardised(intermediates, n_sown):
    """Norm outputs and sown conv / dense outputs of a data-initialised model on its init batch.

    * Norm, per position and channel over the batch: mean = the rounding of x g + b, a few u of
      (|m| + sigma) g, so <= 1e-5 for |m| / sigma <~ 30; variance v g^2 = v / (v + 1e-6) within
      1e-6 / v <= 1e-4 of 1 for activations with v >~ 0.01.
    * conv / dense outputs, per channel over (N, H, W): mean 0 (the bias is minus the mean of
      the output of the same W) to rounding, and standard deviation init_scale sqrt(v / (v +
      1e-6)), v the variance of the output of the 0.05 N(0, 1) kernel: within 1e-2 below
      init_scale for v >~ 5e-5. init_scale 0.1 for gated c2, attention proj2, coupling heads.
    """
    seen = 0
    for scope, sown in intermediates.items():
        for name, value in sown.items():
            if name == "__call__":  # a captured Norm output
                ((ys, _),) = value
                for y in ys:
                    y = np.asarray(y, np.float64)
                    assert np.abs(y.mean(axis=0)).max() <= 1e-5, scope
                    assert np.abs(y.var(axis=0) - 1.0).max() <= 1e-4, scope
                continue
            (y,) = value
            y = np.asarray(y, np.float64).reshape(-1, y.shape[-1])
            scale = 0.1 if re.search(r"(_c2|proj2|proj_out)$", name) else 1.0
            where = f"{scope}/{name}"
            assert np.abs(y.mean(axis=0)).max() <= 1e-5 * max(1.0, np.abs(y).max()), where
            std = y.std(axis=0)
            assert np.all((std <= scale * (1 + 1e-5)) & (std >= scale * (1 - 1e-2))), where
            seen += 1
    assert seen == n_sown


def test_data_dependent_init_cifar10_flow(tiny):
    """init_dequantizer on a whole CIFAR-variant flow (plain convs, dense, Norm, Pointwise,
    context net), each layer initialised on the outputs of the already initialised ones."""
    if tiny.variant != "cifar10":
        pytest.skip("ImageNet32's init rules: test_data_dependent_init_weight_norm")
    # The tree of module.init (init_dequantizer creates the same parameters in an apply).
    module = FlowppDequantizer(variant="cifar10", **TINY)
    expected = _abstract_variables(module, (INIT_BATCH, *FLOW_SHAPES["cifar10"]))
    assert _tree({"params": tiny.params}) == _tree(expected)
    # context: proj + 3 x (c1, c2); 4 couplings x (proj_in, c1, a_proj, c2, proj1, proj2, head)
    _check_standardised(tiny.intermediates, n_sown=7 + 4 * 7)
    for i in range(4):  # Pointwise: I + 0.001 N(0, 1)
        for w in tiny.params[f"Pointwise_{i}"].values():
            assert 0 < np.abs(np.asarray(w) - np.eye(2)).max() < 0.01
    # Deterministic given (key, data) -- the same program again -- and the key matters.
    again = tiny.run(tiny.key, None)[0]
    assert jax.tree.all(jax.tree.map(np.array_equal, again, tiny.params))
    other = tiny.run(jax.random.key(24), None)[0]
    name = ("MixLogisticAttnCoupling_0", "proj_in_W")
    assert not np.array_equal(other[name[0]][name[1]], tiny.params[name[0]][name[1]])


class _WeightNormLayers(nn.Module):
    """A weight-normalised conv (ImageNet32's, init_scale 0.1 as a gated c2) and a dense layer
    after it: the init rules the CIFAR flow above does not use, on sequential inputs (a whole
    ImageNet32 flow has 8 couplings and ~70 random draws: slow to compile)."""

    @nn.compact
    def __call__(self, x):
        y = wn_conv(self, "c0_c2", x, 6, init_scale=0.1)
        return dense(self, "dqattn0_proj1", concat_elu(y), 5)


def test_data_dependent_init_weight_norm():
    x = 0.3 * _normal(32, (INIT_BATCH, 4, 3, 4)) + 0.2
    # mutable=True keeps what init itself sows: the output of each layer just initialised, on
    # its input from the already initialised layer before it.
    variables = _jit0(lambda key, x: _WeightNormLayers().init(key, x, mutable=True))(
        jax.random.key(34), x
    )
    _check_standardised({"top": variables["intermediates"]}, n_sown=2)
    # V keeps its 0.05 N(0, 1) draw; the effective kernel g V / |V| carries the scale.
    v = np.asarray(variables["params"]["c0_c2_V"])
    assert 0.04 < v.std() < 0.06


@pytest.mark.parametrize(
    ("variant", "shape", "levels"),
    [("cifar10", (8, 8, 1), 17), ("imagenet32", (28, 28, 1), 256)],
)
def test_shapes_follow_the_input(variant, shape, levels):
    """The CPU data sets (digits 8x8, MNIST 28x28, one channel): shapes only (eval_shape)."""
    module = FlowppDequantizer(variant=variant, **{**TINY, "levels": levels})
    variables = _abstract_variables(module, (2, *shape))
    params = variables["params"]
    h, w2, c = shape[0], shape[1] // 2, shape[2]
    assert params["Norm_0"]["norm1_g"].shape == (h, w2, c)
    assert params["MixLogisticAttnCoupling_0"]["pos_emb"].shape == (h, w2, TINY["filters"])
    if variant == "cifar10":
        assert params["Pointwise_0"]["W0"].shape == (1, 1)
    eps = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    k = jax.ShapeDtypeStruct((2, *shape), jnp.uint8)
    u, log_q = jax.eval_shape(module.apply, variables, eps, k)
    assert (u.shape, u.dtype) == (eps.shape, jnp.float32)
    assert (log_q.shape, log_q.dtype) == ((2,), jnp.float32)


def test_constructors():
    assert set(DEQUANTIZERS) == {"flowpp_cifar10", "flowpp_imagenet32"}
    assert DEQUANTIZERS["flowpp_cifar10"] is cifar10_dequantizer
    assert DEQUANTIZERS["flowpp_imagenet32"] is imagenet32_dequantizer
    assert cifar10_dequantizer() == FlowppDequantizer(
        variant="cifar10", filters=96, components=32, blocks=2, heads=4
    )
    assert imagenet32_dequantizer(levels=17, blocks=1) == FlowppDequantizer(
        variant="imagenet32", levels=17, filters=128, components=32, blocks=1, heads=4
    )
    with pytest.raises(ValueError, match="variant"):
        _abstract_variables(FlowppDequantizer(variant="mnist"), (1, 4, 4, 1))
    # Loading weights of another configuration fails with the parameter's name.
    small = _abstract_variables(FlowppDequantizer(**TINY), (1, 4, 4, 1))
    other = FlowppDequantizer(**{**TINY, "filters": 16})
    x = jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32)
    with pytest.raises(ValueError, match="pos_emb"):
        jax.eval_shape(other.apply, small, x, x)


# ---------------------------------------------------------------------------------------------
# Against the official code (score_flow), on its fixtures.


def _require_fixtures():
    if not FIXTURES.is_dir():
        pytest.skip(f"official fixtures not found at {FIXTURES} (../shared/fixtures/official)")


def _read_tree(path: Path) -> set[tuple[str, tuple[int, ...]]]:
    """`path shape` lines of a *_params.txt file (skipping `#` headers and the `total` line)."""
    rows = set()
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("total "):
            continue
        name, shape = re.fullmatch(r"(\S+) \((.*)\)", line).groups()
        rows.add((name, tuple(int(s) for s in shape.split(",") if s.strip())))
    return rows


def _read_total(path: Path) -> int:
    (total,) = re.findall(r"^total (\d+)$", path.read_text(), flags=re.M)
    return int(total)


def _tree(variables) -> set[tuple[str, tuple[int, ...]]]:
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {("/".join(str(k.key) for k in path), tuple(leaf.shape)) for path, leaf in flat}


def _standard_nhwc_kernels(variables):
    """Every rank-4 kernel transposed (1, 0, 2, 3), i.e. the official CIFAR kernels converted for
    a standard NHWC conv: wrong for this module, which keeps the official layout."""
    return jax.tree.map(lambda w: w.transpose(1, 0, 2, 3) if w.ndim == 4 else w, variables)


@pytest.fixture(scope="module", params=VARIANTS)
def official(request):
    """The official checkpoint and outputs, and ours, from one forward and one inverse program
    (weights as arguments): forward with the EMA weights, with the non-EMA weights and (CIFAR)
    with the kernels read the standard NHWC way; inverse of the official u."""
    _require_fixtures()
    variant = request.param
    ckpt = flax.serialization.msgpack_restore(
        (FIXTURES / f"deq_{variant}_flax" / "checkpoint_1").read_bytes()
    )
    ref = dict(np.load(FIXTURES / f"deq_{variant}_flax.npz"))
    module = FlowppDequantizer(variant=variant, **FIXTURE_MODEL)
    forward = _jit0(lambda v, e, k: module.apply(v, e, k))
    inverse = _jit0(lambda v, u, k: module.apply(v, u, k, inverse=True))
    ema, target = ckpt["params_ema"], ckpt["optimizer"]["target"]
    eps, k = ref["eps"], ref["x_uint8"]
    u, log_q = (np.asarray(a) for a in forward(ema, eps, k))
    u_nonema, log_q_nonema = (np.asarray(a) for a in forward(target, eps, k))
    eps_hat, log_q_inv = (np.asarray(a) for a in inverse(ema, ref["u"], k))
    u_standard = None
    if variant == "cifar10":
        u_standard = np.asarray(forward(_standard_nhwc_kernels(ema), eps, k)[0])
    return SimpleNamespace(
        variant=variant,
        module=module,
        ckpt=ckpt,
        ref=ref,
        u=u,
        log_q=log_q,
        u_nonema=u_nonema,
        log_q_nonema=log_q_nonema,
        eps_hat=eps_hat,
        log_q_inv=log_q_inv,
        u_standard=u_standard,
    )


def test_official_forward(official):
    ref = official.ref
    # The context sees k / 255 exactly as the official pipeline's x = float32(k) float32(1/255).
    assert np.array_equal(ref["x_uint8"].astype(np.float32) * np.float32(1 / 255), ref["x"])
    # The fixtures' tolerances: the official float32 forward itself is off its float64 value by
    # |du| <= 6.3e-7 and |d neg_log_q| <= 8e-4.
    np.testing.assert_allclose(official.u, ref["u"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(official.log_q, -ref["neg_log_q"], rtol=0, atol=1e-2)
    # The official log N(eps), a float32 sum of 3072 terms (ulp(4400) = 5e-4), against float64.
    np.testing.assert_allclose(_log_normal(ref["eps"]), ref["logp_eps"], rtol=0, atol=4e-3)


def test_official_inverse(official):
    ref = official.ref
    # The fixture's u is float32-rounded, and the final logit amplifies that near 0 and 1: the
    # fixtures' tolerance (the official inverse recovers eps to 2.9e-5 / 2.6e-5).
    np.testing.assert_allclose(official.eps_hat, ref["eps"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(official.log_q_inv, -ref["neg_log_q"], rtol=0, atol=1e-2)
    # The official inverse's second output is sum(inverse log-dets) - log N(u); ours is
    # log N(eps_hat) + sum(inverse log-dets): the same log-dets (~5,100 in size, float32).
    ours = official.log_q_inv - _log_normal(official.eps_hat)
    theirs = ref["inv_out2"] + _log_normal(ref["u"])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-2)


def test_official_non_ema_weights(official):
    """optimizer.target holds other weights: they reproduce the official non-EMA outputs, which
    differ noticeably from the EMA ones (a negative control for picking params_ema)."""
    ref = official.ref
    np.testing.assert_allclose(official.u_nonema, ref["u_nonema"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(official.log_q_nonema, -ref["neg_log_q_nonema"], rtol=0, atol=1e-2)
    assert np.abs(official.u_nonema - official.u).max() > 0.05  # 0.21 (CIFAR), 0.079 (IN32)


def test_official_cifar_kernel_orientation(official):
    """The module keeps the official (swapped spatial axes) kernel layout, so loading is the
    identity; kernels converted for a standard NHWC conv are far off (a negative control)."""
    if official.variant != "cifar10":
        pytest.skip("only the CIFAR variant has the swapped conv layout")
    assert np.abs(official.u_standard - official.ref["u"]).max() > 0.05


def test_official_small_tree(official):
    path = FIXTURES / f"deq_{official.variant}_flax_params.txt"
    expected = _read_tree(path)
    assert _tree(official.ckpt["params_ema"]) == expected
    assert _tree(official.ckpt["optimizer"]["target"]) == expected
    ours = _abstract_variables(official.module, official.ref["x_uint8"].shape)
    assert _tree(ours) == expected
    assert sum(math.prod(s) for _, s in expected) == _read_total(path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_official_full_tree(variant):
    _require_fixtures()
    path = FIXTURES / f"deq_{variant}_full_params.txt"
    ours = _tree(_abstract_variables(DEQUANTIZERS[f"flowpp_{variant}"](), (2, 32, 32, 3)))
    assert ours == _read_tree(path)
    assert sum(math.prod(s) for _, s in ours) == _read_total(path) == FULL_TOTALS[variant]
