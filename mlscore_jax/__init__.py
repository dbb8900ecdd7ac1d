"""mlscore_jax: maximum-likelihood training of score-based diffusion models in JAX."""

import os


def _disable_miscompiling_cpu_fusion() -> None:
    """Turn off XLA:CPU's YNNPACK fusions before JAX starts its backend.

    jaxlib 0.10.2 miscompiles a reduction fused with elementwise expm1/divide into one
    "__ynn_fusion" (for example mean(z, -1) * expm1(2 t) / expm1(t) over [200, 500]: errors of
    order one, even sign flips). tests/test_platform.py reproduces it. The flag is read when the
    CPU backend starts, so it must be set before the first computation; an explicit setting by
    the user is left alone.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_disable_miscompiling_cpu_fusion()

__version__ = "0.1.0"
