"""mlscore_jax: maximum-likelihood training of score-based diffusion models in JAX."""

__version__ = "0.1.0"
