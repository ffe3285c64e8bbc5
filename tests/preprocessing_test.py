"""Tests for nin_jax.preprocessing: the paper's normalizations against references written out
independently."""

import numpy as np
import pytest
from scipy import signal

from nin_jax import preprocessing
from nin_jax import settings
from nin_jax.errors import UserError


# --- The normalizations -------------------------------------------------------------------------


def _images(n, shape=(4, 4, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_global_contrast_normalize_mean_zero_norm_55():
  images = _images(20)
  images[0] = 7  # a constant image must not be blown up
  x = preprocessing.global_contrast_normalize(images, 55.0)
  assert x.shape == (20, 48) and x.dtype == np.float32
  np.testing.assert_allclose(x.mean(axis=1), 0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(x[1:], axis=1), 55.0, rtol=1e-5)
  np.testing.assert_array_equal(x[0], 0)


def _reference_zca(train, test):
  """The maxout recipe (docs/references.md) in float64, written out independently."""
  def gcn(images):
    x = images.reshape(len(images), -1).astype(np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) / 55.0)
  x = gcn(train)
  mean = x.mean(axis=0)
  centered = x - mean
  eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / len(x))
  whitening = eigenvectors @ np.diag(1.0 / np.sqrt(eigenvalues.clip(0) + 0.1)) @ eigenvectors.T
  return centered @ whitening, (gcn(test) - mean) @ whitening


def test_gcn_zca_matches_the_maxout_recipe_and_whitens():
  train, test = _images(3000, seed=1), _images(50, seed=2)
  preprocessor = preprocessing.fit_preprocessor('gcn_zca', train)
  out_train, out_test = preprocessor(train), preprocessor(test)
  assert out_train.shape == train.shape and out_train.dtype == np.float32
  ref_train, ref_test = _reference_zca(train, test)
  np.testing.assert_allclose(out_train.reshape(len(train), -1), ref_train, atol=2e-3)
  # The test split is transformed with the training statistics, not its own.
  np.testing.assert_allclose(out_test.reshape(len(test), -1), ref_test, atol=2e-3)
  refit = preprocessing.fit_preprocessor('gcn_zca', test)(test)
  assert np.abs(refit - out_test).max() > 0.1
  # Random pixels after GCN: every eigenvalue is ~55^2/48 = 63 >> 0.1, except the constant
  # direction that GCN removed, so the whitened covariance is the identity on its complement.
  x = out_train.reshape(len(train), -1).astype(np.float64)
  covariance = np.cov(x, rowvar=False, bias=True)
  d = x.shape[1]
  np.testing.assert_allclose(covariance, np.eye(d) - np.ones((d, d)) / d, atol=0.01)


def test_zca_whitening_damps_small_eigenvalues_by_the_filter_bias():
  # Features with a known spectrum: variance lambda_i along a random orthonormal basis.
  rng = np.random.default_rng(6)
  eigenvalues = np.array([100.0, 10.0, 1.0, 0.1, 0.01])
  basis, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  z = rng.normal(size=(20000, 5))
  z = (z - z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False, bias=True)).T)
  features = 3.0 + (z * np.sqrt(eigenvalues)) @ basis.T
  mean, whitening = preprocessing.zca_whitening(features)
  np.testing.assert_allclose(mean, 3.0, atol=1e-4)
  whitened = (features - mean) @ whitening
  variances = np.var(whitened @ basis, axis=0)
  np.testing.assert_allclose(variances, eigenvalues / (eigenvalues + 0.1), rtol=1e-3)
  np.testing.assert_allclose(whitening, whitening.T, atol=1e-6)  # ZCA, not PCA: symmetric


def test_gcn_zca_refuses_huge_images():
  with pytest.raises(ValueError, match='gcn_zca'):  # settings.validate refuses the config first
    preprocessing.fit_preprocessor('gcn_zca', np.zeros((2, 40, 40, 3), np.uint8))


def _reference_lcn(images):
  """pylearn2's lecun_lcn, one image and channel at a time, with a 2-D 7x7 Gaussian."""
  offsets = np.arange(7) - 3
  kernel = np.exp(-(offsets[:, None]**2 + offsets[None, :]**2) / (2 * 2.0**2))
  kernel /= kernel.sum()
  x = images.reshape(len(images), -1).astype(np.float64)
  x = x - x.mean(axis=1, keepdims=True)
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).reshape(images.shape)
  out = np.empty_like(x)
  for i in range(len(x)):
    for c in range(x.shape[-1]):
      channel = x[i, :, :, c]
      local_mean = signal.correlate2d(channel, kernel, mode='same')
      local_norm = np.sqrt(signal.correlate2d(channel**2, kernel, mode='same'))
      divisor = np.maximum(np.maximum(local_norm.mean(), local_norm), 1e-4)
      out[i, :, :, c] = (channel - local_mean) / divisor
  return out


def test_lcn_matches_pylearn2_lecun_lcn():
  images = _images(5, shape=(12, 10, 3), seed=3)
  preprocessor = preprocessing.fit_preprocessor('lcn', images)
  out = preprocessor(images)
  assert out.shape == images.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, _reference_lcn(images), atol=1e-4)
  assert np.array_equal(preprocessor(np.full((1, 12, 10, 3), 9, np.uint8)), np.zeros(
      (1, 12, 10, 3)))


def test_standardize_and_none():
  train = _images(500, shape=(6, 6, 3), seed=4)
  train[..., 2] //= 4  # channels with different statistics
  preprocessor = preprocessing.fit_preprocessor('standardize', train)
  x = train.astype(np.float64) / 255
  np.testing.assert_allclose(preprocessor.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(preprocessor.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
  out = preprocessor(train)
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-4)
  constant = preprocessing.fit_preprocessor('standardize', np.zeros((3, 2, 2, 1), np.uint8))
  assert np.isfinite(constant(np.zeros((1, 2, 2, 1), np.uint8))).all()
  none = preprocessing.fit_preprocessor('none', train)
  np.testing.assert_allclose(none(train), train / 255.0, rtol=1e-6)


@pytest.mark.parametrize('kind', settings.PREPROCESS)
def test_batches_equal_the_whole_split_and_save_load(tmp_path, monkeypatch, kind):
  images = _images(11, shape=(8, 8, 3), seed=5)
  preprocessor = preprocessing.fit_preprocessor(kind, images)
  whole = preprocessor(images)
  monkeypatch.setattr(preprocessing, '_CHUNK', 3)  # chunk boundaries inside the split
  # Equal up to float32 rounding (BLAS blocks a matrix product by its size).
  np.testing.assert_allclose(preprocessor(images), whole, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(preprocessor(images[4:9]), whole[4:9], rtol=1e-4, atol=1e-4)
  preprocessor.save(tmp_path / 'p.npz')
  loaded = preprocessing.Preprocessor.load(tmp_path / 'p.npz')
  assert loaded.kind == kind and loaded.image_shape == (8, 8, 3)
  np.testing.assert_array_equal(loaded(images), preprocessor(images))


def test_load_errors_name_the_file(tmp_path):
  with pytest.raises(UserError, match='missing.npz'):
    preprocessing.Preprocessor.load(tmp_path / 'missing.npz')
  (tmp_path / 'junk.npz').write_text('junk')
  with pytest.raises(UserError, match='junk.npz'):
    preprocessing.Preprocessor.load(tmp_path / 'junk.npz')


def test_unknown_kind_is_a_programming_error():
  with pytest.raises(ValueError, match='whiten'):  # settings.validate refuses the config first
    preprocessing.fit_preprocessor('whiten', _images(2))
