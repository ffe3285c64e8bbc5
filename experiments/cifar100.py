"""CIFAR-100, Table 2: the CIFAR-10 net with 100 maps in the last cccp, no augmentation, 35.68%
test error.

  python -m nin_jax.main --config experiments/cifar100.py --workdir runs/cifar100

With init='paper', the authors' CIFAR-100 stds apply (conv1 0.001, cccp1/2 0.01, else 0.05).
"""

from experiments import cifar10


def get_config():
  config = cifar10.get_config()
  config.experiment = 'cifar100'
  config.dataset = 'cifar100'
  config.num_classes = 100
  return config
