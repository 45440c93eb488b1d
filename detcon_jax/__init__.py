"""detcon-jax: object-aware self-supervised pretraining in JAX/Flax."""
