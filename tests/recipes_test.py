"""The paper's recipes learn real images: scikit-learn's 1,797 handwritten digits.

Mock data proves the mechanics only: the CIFAR recipe once passed every test here and trained a
dead net on real CIFAR images (issue #13, docs/recipes.md). These run each authors' net shape,
with its experiment config as written (its init, rates, schedule and preprocessing), on real
digits and require it to leave chance within its first 50 steps, at 3 seeds. He init at the old
rates stays at ln 10 there: these fail on the recipe that failed.
"""

import math
import os

import pytest

from benchmarks import recipes
from conftest import REPO


@pytest.fixture(scope='module')
def digits():
  images, labels, class_names = recipes.load_images('digits')
  rows_train, rows_test = recipes.split(labels, 0.2)
  return images, labels, class_names, rows_train, rows_test


# nin_mnist at 28x28 (MNIST's shape). Not yet here: the CIFAR-shaped net on 3-channel digits,
# which does not leave chance within 50 steps yet (issue #13 is open; docs/recipes.md).
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_mnist_recipe_leaves_chance_on_real_digits_within_50_steps(digits, seed):
  images, labels, class_names, rows_train, rows_test = digits
  config = recipes.load_config(os.path.join(REPO, 'experiments', 'mnist.py'), seed, [], None)
  data = recipes.make_data(config, images, labels, class_names, rows_train, rows_test)
  result = recipes.probe(config, data, steps=50, every=0, chance_fraction=0.9)
  assert result['threshold'] == pytest.approx(0.9 * math.log(10), abs=1e-4)
  assert result['first_step_below'] is not None, (
      f'mnist seed {seed}: still above 0.9 ln 10 after 50 steps: {result["losses"]}')
