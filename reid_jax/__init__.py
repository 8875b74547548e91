"""reid-jax: CLIP-based person re-identification with MLLM-written text, in JAX/Flax."""

__version__ = "0.1.0"
