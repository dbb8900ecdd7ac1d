"""mlscore_jax: maximum-likelihood training of score-based diffusion models in JAX.

Platform workaround (the one place it is documented): jaxlib 0.10.2's XLA:CPU miscompiles a
reduction fused with elementwise expm1/divide into one "__ynn_fusion" (for example
mean(z, -1) * expm1(2 t) / expm1(t) over [200, 500]: errors of order one, even sign flips), which
the VP/subVP marginals hit. For the jaxlib versions in `YNN_MISCOMPILING_JAXLIB` importing this
package adds `--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK fusions off) to XLA_FLAGS. The
flag is read when the CPU backend starts, so the package must be imported before the first
computation; an explicit setting of that flag by the user is left alone, and other jaxlib
versions run untouched. tests/test_platform.py reproduces the miscompile on every version: on a
new jaxlib that still miscompiles it fails, and the version belongs in the set.
"""

import os
from importlib import metadata

__version__ = "0.1.0"

YNN_MISCOMPILING_JAXLIB = frozenset({"0.10.2"})
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def xla_flags_with_workaround(flags: str, jaxlib_version: str | None) -> str:
    """XLA_FLAGS with YNNPACK fusions off when `jaxlib_version` miscompiles them."""
    if jaxlib_version not in YNN_MISCOMPILING_JAXLIB or "xla_cpu_experimental_ynn_fusion" in flags:
        return flags
    return (flags + " " + _YNN_FLAG).strip()


def _jaxlib_version() -> str | None:
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:  # pragma: no cover
        return None


os.environ["XLA_FLAGS"] = xla_flags_with_workaround(
    os.environ.get("XLA_FLAGS", ""), _jaxlib_version()
)
if not os.environ["XLA_FLAGS"]:
    del os.environ["XLA_FLAGS"]
