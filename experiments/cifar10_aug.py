"""CIFAR-10 with augmentation, Table 1: translation + horizontal flip, 8.81% test error.

  python -m nin_jax.main --config experiments/cifar10_aug.py --workdir runs/cifar10_aug
"""

from experiments import cifar10


def get_config():
  config = cifar10.get_config()
  config.experiment = 'cifar10_aug'
  config.augment = 'translate_flip'
  config.translate_pixels = 4          # random crops of the 4-pixel zero-padded image
  return config
