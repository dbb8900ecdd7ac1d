"""Test harness: strict JAX numerics and 4 CPU devices in every test process.

* `jax_numpy_rank_promotion = "raise"`: an implicit broadcast between arrays of different rank
  (the classic [B] + [B, 1] -> [B, B] bug) is an error in tests, not a silent wrong answer.
* 4 CPU devices in process (`jax_num_cpu_devices`), so sharding over a mesh is tested without a
  subprocess; only tests that need several *processes* (gloo collectives, SIGKILL, SIGTERM)
  start them. It must be set before the backend starts, so it is set at import of this file,
  before any test module runs a computation.
"""

import jax

NUM_TEST_DEVICES = 4

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", NUM_TEST_DEVICES)
jax.config.update("jax_numpy_rank_promotion", "raise")
