"""Test harness: strict JAX numerics and 4 CPU devices in every test process.

* `jax_numpy_rank_promotion = "raise"`: an implicit broadcast between arrays of different rank
  (the classic [B] + [B, 1] -> [B, B] bug) is an error in tests, not a silent wrong answer.
* Compiled programs are cached on disk (`.pytest_cache/jax_compilation_cache`, also for the
  processes the tests start: the environment variables are inherited): many tests train and
  evaluate the same tiny models, and a fresh `jax.jit` of an identical program would otherwise
  compile again. The cache key covers the program, the jax/jaxlib versions and the XLA flags,
  so an ISA cap (XLA_FLAGS) or another device count never reuses another's executable.
* 4 CPU devices in process (`jax_num_cpu_devices`), so sharding over a mesh is tested without a
  subprocess; only tests that need several *processes* (gloo collectives, SIGKILL, SIGTERM)
  start them. It must be set before the backend starts, so it is set at import of this file,
  before any test module runs a computation.
"""

import os
from pathlib import Path

import jax

NUM_TEST_DEVICES = 4
COMPILATION_CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(COMPILATION_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
jax.config.update("jax_numpy_rank_promotion", "raise")
