"""Guards against known miscompilations of the XLA version we run on."""

import jax
import jax.numpy as jnp
import numpy as np

import mlscore_jax  # noqa: F401  (sets XLA_FLAGS before the backend starts)


def test_fused_reduce_with_expm1_matches_op_by_op():
    """jaxlib 0.10.2's YNNPACK fusion got this wrong by O(1); mlscore_jax disables it."""
    t = jax.random.uniform(jax.random.key(0), (200, 500), jnp.float32, 1e-2, 1.0)
    z = jax.random.normal(jax.random.key(1), (200, 500, 4))

    def f(t, z):
        return jnp.sum(z, -1) * jnp.expm1(2 * t) / jnp.expm1(t)

    np.testing.assert_allclose(jax.jit(f)(t, z), f(t, z), rtol=1e-5, atol=1e-5)
