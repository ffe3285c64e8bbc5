"""CIFAR-10, Table 5 (GAP as a regularizer): mlpconv + fully connected instead of global average
pooling, 11.59% test error.

  python -m nin_jax.main --config experiments/cifar10_fc.py --workdir runs/cifar10_fc

The last cccp keeps 192 maps; they are flattened (8x8x192) into one fully connected layer.
"""

from experiments import cifar10


def get_config():
  config = cifar10.get_config()
  config.experiment = 'cifar10_fc'
  config.head = 'fc'
  return config
