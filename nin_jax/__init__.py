"""nin_jax: Network In Network (Lin, Chen & Yan, ICLR 2014) in JAX and Flax."""

__version__ = "0.1.0"
