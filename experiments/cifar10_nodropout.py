"""CIFAR-10 without dropout, Section 4.2 / Figure 3: 14.51% test error.

  python -m nin_jax.main --config experiments/cifar10_nodropout.py --workdir runs/cifar10_nodropout
"""

from experiments import cifar10


def get_config():
  config = cifar10.get_config()
  config.experiment = 'cifar10_nodropout'
  config.dropout_rate = 0.0
  return config
