"""Tests for nin_jax.augment: the draws, and the translation and flip of the train step."""

import jax
import numpy as np
import pytest

from conftest import reference_shift
from nin_jax import augment
from nin_jax import settings


def test_translate_and_flip_matches_reference():
  images = np.random.default_rng(0).random((4, 5, 7, 2)).astype(np.float32)
  shifts = np.array([[0, 0], [2, -1], [-2, 2], [1, 0]])
  flips = np.array([False, True, False, True])
  out = jax.device_get(augment.translate_and_flip(images, shifts, flips, 2))
  for i in range(4):
    expected = reference_shift(images[i], *shifts[i])
    np.testing.assert_array_equal(out[i], expected[:, ::-1] if flips[i] else expected)


def test_translate_and_flip_by_hand():
  image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  down_left = augment.translate_and_flip(image, np.array([[1, -1]]), np.array([False]), 2)
  expected = np.zeros((4, 4), np.float32)
  expected[1:, :3] = image[0, :3, 1:, 0]  # out[y, x] = in[y - 1, x + 1]
  np.testing.assert_array_equal(down_left[0, :, :, 0], expected)
  mirrored = augment.translate_and_flip(image, np.array([[0, 0]]), np.array([True]), 1)
  np.testing.assert_array_equal(mirrored[0, :, :, 0], image[0, :, ::-1, 0])


@pytest.mark.parametrize('setting', settings.AUGMENTS)
@pytest.mark.parametrize('translate_pixels', [0, 2])
def test_each_setting_moves_the_pixels_it_draws(setting, translate_pixels):
  """`augment`, jitted as in the train step, against the pixel-by-pixel reference."""
  images = np.random.default_rng(1).random((16, 6, 5, 3)).astype(np.float32)
  shifts, flips = augment.draw(np.random.default_rng(2), setting, 16, translate_pixels)
  out = jax.device_get(jax.jit(augment.augment, static_argnums=(0, 4))(
      setting, images, shifts, flips, translate_pixels))
  for i in range(16):
    expected = reference_shift(images[i], *shifts[i])
    np.testing.assert_array_equal(out[i], expected[:, ::-1] if flips[i] else expected)


def test_draws_follow_the_setting():
  draws = {s: augment.draw(np.random.default_rng(3), s, 64, 2) for s in settings.AUGMENTS}
  assert not draws['none'][0].any() and not draws['none'][1].any()
  assert draws['translate'][0].any() and not draws['translate'][1].any()
  np.testing.assert_array_equal(draws['translate_flip'][0], draws['translate'][0])
  assert draws['translate_flip'][1].any()
  with pytest.raises(ValueError, match='augment'):  # settings.validate refuses it first
    augment.moves('flip')
