"""CIFAR-10, Table 5: mlpconv + fully connected + dropout before it, 10.88% test error.

  python -m nin_jax.main --config experiments/cifar10_fc_dropout.py --workdir runs/cifar10_fc_dropout
"""

from experiments import cifar10


def get_config():
  config = cifar10.get_config()
  config.experiment = 'cifar10_fc_dropout'
  config.head = 'fc_dropout'
  return config
