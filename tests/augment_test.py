"""Tests for nin_jax.augment: translation and flip in numpy, and its jnp twin."""

import jax
import numpy as np
import pytest

from conftest import reference_shift
from nin_jax import augment
from nin_jax.errors import UserError


def test_translate_and_flip_matches_reference():
  images = np.random.default_rng(0).random((4, 5, 7, 2)).astype(np.float32)
  shifts = np.array([[0, 0], [2, -1], [-2, 2], [1, 0]])
  flips = np.array([False, True, False, True])
  out = augment.translate_and_flip(images, shifts, flips)
  for i in range(4):
    expected = reference_shift(images[i], *shifts[i])
    np.testing.assert_array_equal(out[i], expected[:, ::-1] if flips[i] else expected)
  rows = np.array([3, 3, 0])
  gathered = augment.translate_and_flip(images, shifts[:3], flips[:3], rows)
  np.testing.assert_array_equal(gathered, augment.translate_and_flip(
      images[rows], shifts[:3], flips[:3]))


def test_translate_and_flip_by_hand():
  image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  down_left = augment.translate_and_flip_jnp(image, np.array([[1, -1]]), np.array([False]), 2)
  expected = np.zeros((4, 4), np.float32)
  expected[1:, :3] = image[0, :3, 1:, 0]  # out[y, x] = in[y - 1, x + 1]
  np.testing.assert_array_equal(down_left[0, :, :, 0], expected)
  mirrored = augment.translate_and_flip_jnp(image, np.array([[0, 0]]), np.array([True]), 1)
  np.testing.assert_array_equal(mirrored[0, :, :, 0], image[0, :, ::-1, 0])


@pytest.mark.parametrize('setting', augment.AUGMENTS)
@pytest.mark.parametrize('translate_pixels', [0, 2])
def test_the_jnp_twin_moves_pixels_as_numpy_does(setting, translate_pixels):
  images = np.random.default_rng(1).random((16, 6, 5, 3)).astype(np.float32)
  shifts, flips = augment.draw(np.random.default_rng(2), setting, 16, translate_pixels)
  host = augment.translate_and_flip(images, shifts, flips)
  device = jax.jit(augment.augment_jnp, static_argnums=(0, 4))(
      setting, images, shifts, flips, translate_pixels)
  np.testing.assert_array_equal(jax.device_get(device), host)


def test_draws_follow_the_setting():
  draws = {s: augment.draw(np.random.default_rng(3), s, 64, 2) for s in augment.AUGMENTS}
  assert not draws['none'][0].any() and not draws['none'][1].any()
  assert draws['translate'][0].any() and not draws['translate'][1].any()
  np.testing.assert_array_equal(draws['translate_flip'][0], draws['translate'][0])
  assert draws['translate_flip'][1].any()
  with pytest.raises(UserError, match='config.augment'):
    augment.moves('flip')
