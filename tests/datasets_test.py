"""Tests for nin_jax.datasets: reading image files (the datasets themselves are loaded through
`input_pipeline.create_data` in tests/input_pipeline_test.py)."""

import io

import numpy as np
from PIL import Image
import pytest

from nin_jax import datasets
from nin_jax.errors import UserError


def _save(path, image, **kwargs):
  image.save(path, **kwargs)
  return path


# --- load_image ---------------------------------------------------------------------------------


@pytest.mark.parametrize('mode, fmt, size, color, expected_gray', [
    ('L', 'PNG', (28, 28), 77, 77),
    ('RGB', 'BMP', (40, 13), (200, 100, 50), 124),  # ITU-R 601 luma, 0.299/0.587/0.114
    ('RGB', 'PNG', (5, 9), (0, 255, 0), 150),
    ('1', 'PNG', (30, 30), 1, 255),
    ('CMYK', 'JPEG', (64, 64), (0, 0, 0, 0), 255),  # no ink: white
])
def test_load_image_any_mode_and_size(tmp_path, mode, fmt, size, color, expected_gray):
  path = _save(tmp_path / f'x.{fmt.lower()}', Image.new(mode, size, color), format=fmt)
  gray = datasets.load_image(path, 28, 1)
  rgb = datasets.load_image(path, 16, 3)
  assert gray.shape == (28, 28, 1) and gray.dtype == np.uint8
  assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
  tolerance = 3 if fmt == 'JPEG' else 1
  np.testing.assert_allclose(gray, expected_gray, atol=tolerance)


def test_load_image_transparency_is_composited_over_white(tmp_path):
  # A black glyph on a fully transparent black background (what many editors write).
  image = Image.new('RGBA', (10, 10), (0, 0, 0, 0))
  image.putpixel((4, 5), (0, 0, 0, 255))
  rgba = datasets.load_image(_save(tmp_path / 'a.png', image), 10, 1)
  assert rgba[5, 4, 0] == 0
  assert rgba[0, 0, 0] == 255
  # The same through a palette GIF with a transparent index.
  palette = Image.new('P', (10, 10), 0)
  palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
  palette.putpixel((4, 5), 1)
  gif = datasets.load_image(_save(tmp_path / 'p.gif', palette, transparency=0), 10, 3)
  np.testing.assert_array_equal(gif[0, 0], [255, 255, 255])
  np.testing.assert_array_equal(gif[5, 4], [10, 20, 30])


def test_load_image_16_bit_is_scaled_not_clipped(tmp_path):
  array = np.array([[0, 32896, 65535, 65535]], np.uint16).repeat(4, axis=0)
  path = _save(tmp_path / 'deep.png', Image.fromarray(array))
  image = datasets.load_image(path, 4, 1)[..., 0]
  np.testing.assert_array_equal(image[0], [0, 128, 255, 255])


def test_load_image_downscale_keeps_content(tmp_path):
  array = np.zeros((64, 64), np.uint8)
  array[:, 32:] = 255  # left half black, right half white
  image = datasets.load_image(_save(tmp_path / 'h.png', Image.fromarray(array)), 8, 1)
  np.testing.assert_array_equal(image[:, :3, 0], 0)
  np.testing.assert_array_equal(image[:, 5:, 0], 255)


def _truncated_png(path):
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(
      buffer, format='PNG')
  path.write_bytes(buffer.getvalue()[:200])
  return path


@pytest.mark.parametrize('make', [
    lambda p: _truncated_png(p / 'cut.png'),
    lambda p: (p / 'notes.png').write_text('not an image') and p / 'notes.png',
    lambda p: (p / 'noise.jpg').write_bytes(bytes(range(256)) * 4) and p / 'noise.jpg',
    lambda p: p / 'missing.png',
])
def test_load_image_bad_file_names_the_file(tmp_path, make):
  path = make(tmp_path)
  with pytest.raises(UserError, match=str(path.name)):
    datasets.load_image(path, 8, 1)
