"""The paper's recipes learn real images: scikit-learn's 1,797 handwritten digits.

Mock data proves the mechanics only: the CIFAR recipe once passed every test here and trained a
dead net on real CIFAR images (docs/recipes.md). These run each authors' net shape,
with its experiment config as written (its init, rates, schedule and preprocessing), on real
digits and require it to leave chance within its first 50 steps (the CIFAR-shaped net: 100), at 3
seeds. He init at the old rates stays at ln 10 there: these fail on the recipe that failed.
"""

import math
import os

import pytest

from nin_jax import probe
from conftest import REPO


@pytest.fixture(scope='module')
def digits():
  images, labels, class_names = probe.load_images('digits')
  rows_train, rows_test = probe.split(labels, 0.2)
  return images, labels, class_names, rows_train, rows_test


def _probe(digits, experiment: str, seed: int, steps: int) -> dict:
  """The first `steps` steps of experiments/`experiment` as written, on the digits."""
  images, labels, class_names, rows_train, rows_test = digits
  config = probe.load_config(os.path.join(REPO, 'experiments', experiment), seed)
  data = probe.make_data(config, images, labels, class_names, rows_train, rows_test)
  result = probe.probe(config, data, steps=steps, every=0, chance_fraction=0.9)
  return {**result, 'image_shape': data.image_shape}


# nin_mnist at 28x28 (MNIST's shape), and below the CIFAR-shaped net on 3-channel digits.
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_mnist_recipe_leaves_chance_on_real_digits_within_50_steps(digits, seed):
  result = _probe(digits, 'mnist.py', seed, steps=50)
  assert result['threshold'] == pytest.approx(0.9 * math.log(10), abs=1e-4)
  assert result['first_step_below'] is not None, (
      f'mnist seed {seed}: still above 0.9 ln 10 after 50 steps: {result["losses"]}')


# The CIFAR-shaped net (nin_cifar, GCN + ZCA, 32x32x3) on the digits resized to 32x32, grey in
# 3 channels. Measured (docs/recipes.md): it leaves at steps 48, 71 and 54 (seeds 0-2), so the
# bound is 100, not the 50 of the other nets, which the nets on whitened images do not meet
# (75 to over 110 steps on real CIFAR). The old recipe (He init, lr 0.01, 1% warmup) is still at
# 2.29-2.30 after 100 steps here: this fails on a dead or stalled recipe.
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_cifar_recipe_leaves_chance_on_real_3_channel_digits_within_100_steps(digits, seed):
  result = _probe(digits, 'cifar10.py', seed, steps=100)
  assert result['image_shape'] == (32, 32, 3)
  assert result['first_step_below'] is not None, (
      f'cifar10 seed {seed}: still above 0.9 ln 10 after 100 steps: {result["losses"]}')
