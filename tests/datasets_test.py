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


def _photo(width, height, mode='RGB', subsampling=2, seed=0):
  """A JPEG of a smooth, photo-like picture: gradients, a disc and mild noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width] / max(width, height)
  pixels = np.stack([200 * x + 30, 150 * y + 50, 120 * (x + y) / 2 + 60], -1)
  pixels[(x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05] = (240, 40, 30)
  pixels += rng.normal(0, 6, pixels.shape)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, 'JPEG', quality=90, subsampling=subsampling)
  return buffer.getvalue()


@pytest.mark.parametrize('size, args', [
    ((256, 256), (224, 256)), ((500, 375), (224, 256)), ((1200, 900), (224, 256)),
    ((300, 200), (12, 16)), ((300, 200), (20, 0)), ((40, 30), (32, 0)), ((13, 29), (12, 16))])
@pytest.mark.parametrize('mode, subsampling', [('RGB', 2), ('RGB', 0), ('L', 0)])
def test_jpeg_decodes_alike_with_and_without_simplejpeg(monkeypatch, size, args, mode,
                                                        subsampling):
  simplejpeg = pytest.importorskip('simplejpeg')
  data = _photo(*size, mode=mode, subsampling=subsampling)
  image_size, resize_size = args
  fast_calls = []
  monkeypatch.setattr(simplejpeg, 'decode_jpeg', lambda *a, _real=simplejpeg.decode_jpeg, **k:
                      fast_calls.append(1) or _real(*a, **k))
  with datasets.strict_decoding():
    for crop in (None, (0.3, 0.8)):
      fast = datasets.decode_image(data, image_size, 3, resize_size=resize_size, crop=crop)
      with monkeypatch.context() as m:
        m.setitem(__import__('sys').modules, 'simplejpeg', None)  # import fails: PIL decodes
        pil = datasets.decode_image(data, image_size, 3, resize_size=resize_size, crop=crop)
      np.testing.assert_array_equal(fast, pil)
      assert fast.shape == (image_size, image_size, 3)
  assert len(fast_calls) == (2 if mode == 'RGB' else 0)  # grayscale JPEGs are PIL's
  cut = data[:len(data) // 2]
  with datasets.strict_decoding(), pytest.raises(Exception):
    datasets.decode_image(cut, image_size, 3, resize_size=resize_size)


def test_a_large_jpeg_decoded_at_a_draft_scale_is_the_full_decode_resized():
  data = _photo(1200, 900)  # 4.7x its target (341 x 256): decoded at 1/4, then resized
  with datasets.strict_decoding():
    drafted = datasets.decode_image(data, 224, 3, resize_size=256).astype(float)
  full = Image.open(io.BytesIO(data)).convert('RGB').resize((341, 256),
                                                             Image.Resampling.BILINEAR)
  full = np.asarray(full, float)[16:240, 58:282]  # its centre 224 crop
  assert np.abs(drafted - full).mean() < 3  # within noise: the same picture at the same size
  assert np.abs(drafted - full).mean() > 0  # ... not decoded whole
