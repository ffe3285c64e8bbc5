"""EMNIST byclass: the real handwritten counterpart of the generated 62 classes (no paper figure).

  python -m nin_jax.main --config experiments/emnist_byclass.py --workdir runs/emnist_byclass

The MNIST net with 62 maps in its last cccp; 698k training images of 0-9, A-Z, a-z.
"""

from experiments import mnist


def get_config():
  config = mnist.get_config()
  config.experiment = 'emnist_byclass'
  config.dataset = 'emnist/byclass'
  config.num_classes = 62
  config.num_epochs = 20
  config.augment = 'translate'
  return config
