"""The paper's per-dataset normalizations, in numpy for the host and in jnp for the devices.

Four kinds of preprocessing (`config.preprocess`), each a fitted `Preprocessor`:

  'none'         x / 255.
  'standardize'  (x / 255 - mean) / std, per channel, mean and std of the training split.
  'gcn_zca'      global contrast normalization, then ZCA whitening fitted on the training split:
                 the maxout recipe that NIN used for CIFAR-10/100 (Goodfellow et al. 2013,
                 pylearn2 `scripts/papers/maxout` + `make_cifar10_gcn_whitened.py`).
  'lcn'          global contrast normalization, then LeCun's local contrast normalization per
                 channel: the maxout recipe for SVHN (pylearn2 `svhn_preprocessing.py`). Nothing
                 is fitted: every image is normalized on its own.

`normalization(kind)` is the one place that reads the kind: its fit, its numpy code (the host
input path) and its jnp twin (the device input path, inside the jitted step). Each twin does the
numpy code's operations in the same order, so both paths give the same batches to float rounding
(tests/device_input_test.py). Every kind works image by image once fitted, so preprocessing a
batch gives the same numbers as preprocessing the whole split and then taking the batch.

numpy and JAX only (no TensorFlow, no PIL): the prediction tools and the train step import it.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import io
import os

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax import run_files
from nin_jax import settings
from nin_jax.errors import UserError

# --- Constants and where they come from ---------------------------------------------------------
# pylearn2 `datasets/cifar10.py`, `CIFAR10(gcn=55.)`: every image (as one vector) has its mean
# subtracted and is scaled to L2 norm 55, with no bias inside the square root.
CIFAR_GCN_SCALE = 55.0
# pylearn2 `expr/preprocessing.py`, `global_contrast_normalize(min_divisor=1e-8)`: images whose
# norm is below this (constant images) are left unscaled instead of blown up.
GCN_MIN_DIVISOR = 1e-8
# pylearn2 `datasets/preprocessing.py`, `ZCA(filter_bias=0.1)`: added to every eigenvalue
# before the inverse square root, so near-null directions are damped instead of amplified.
ZCA_FILTER_BIAS = 0.1
# The whitening matrix is features x features: 3072 (32x32x3) is 36 MiB in float32 and its
# eigendecomposition takes tens of seconds on two cores; much larger images are not sensible.
MAX_ZCA_FEATURES = settings.MAX_ZCA_FEATURES
# pylearn2 `svhn_preprocessing.py` (maxout SVHN): `GlobalContrastNormalization()` with its
# defaults (scale 1, no bias) and then `LeCunLCN((32, 32))` with its defaults: a 7x7 Gaussian
# window of sigma 2 (`gaussian_filter`), divisor floor 1e-4, applied to every channel.
LCN_GCN_SCALE = 1.0
LCN_KERNEL_SIZE = 7
LCN_SIGMA = 2.0
LCN_THRESHOLD = 1e-4
# A constant channel in the training split (e.g. a blank border) has std 0; divide by 1 instead.
STANDARDIZE_MIN_STD = 1e-6
# Images per chunk when preprocessing a whole split: bounds the float32 temporaries
# (4096 x 3072 x 4 bytes = 48 MiB) without slowing the matrix products.
_CHUNK = 4096
# ... and values per chunk where the fit computes in float64: 4096 CIFAR images, 83 ImageNet
# crops of 224 x 224 x 3 (100 MB; a chunk of 4096 of those took 4.9 GB, twice).
_CHUNK_VALUES = _CHUNK * 32 * 32 * 3

# The largest matrix products of the jnp twins (ZCA: 3072x3072) in full float32, as on the
# host: accelerators otherwise run float32 products in TF32/bfloat16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


# --- The normalizations, numpy and jnp side by side ---------------------------------------------


def global_contrast_normalize(images: np.ndarray, scale: float) -> np.ndarray:
  """Per-image mean subtracted, then scaled to L2 norm `scale` (pylearn2, no sqrt bias).

  Args:
    images: (N, ...) any numeric dtype; each image is one vector.
    scale: the target L2 norm of every image (55 for the maxout CIFAR data).

  Returns:
    float32 (N, D) with D the number of values per image.
  """
  x = images.reshape(len(images), -1).astype(np.float32)
  x -= x.mean(axis=1, keepdims=True)
  norms = np.sqrt(np.square(x).sum(axis=1, keepdims=True)) / scale
  norms[norms < GCN_MIN_DIVISOR] = 1.0
  x /= norms
  return x


def _global_contrast_normalize_jnp(images: jax.Array, scale: float) -> jax.Array:
  x = images.reshape(images.shape[0], -1).astype(jnp.float32)
  x = x - jnp.mean(x, axis=1, keepdims=True)
  norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True)) / scale
  norms = jnp.where(norms < GCN_MIN_DIVISOR, 1.0, norms)
  return x / norms


def _gaussian_kernel_1d(size: int = LCN_KERNEL_SIZE, sigma: float = LCN_SIGMA) -> np.ndarray:
  """pylearn2's `gaussian_filter` is an outer product of this with itself (both sum to 1)."""
  offsets = np.arange(size, dtype=np.float64) - size // 2
  kernel = np.exp(-offsets**2 / (2.0 * sigma**2))
  return (kernel / kernel.sum()).astype(np.float32)


def _band_matrix(n: int, kernel: np.ndarray) -> np.ndarray:
  """(n, n) matrix M with (M @ v)[i] = sum_j kernel[j] v[i + j - r], zero outside v."""
  r = len(kernel) // 2
  return sum(k * np.eye(n, k=j - r, dtype=np.float32) for j, k in enumerate(kernel))


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Separable 'same' correlation of (N, H, W, C) with zero padding (theano's 'full' + crop).

  Two matrix products with banded matrices (one per axis): BLAS does in one call what a
  loop over the taps would do in 2 x 7 passes with temporaries.
  """
  n, h, w, c = x.shape
  y = np.matmul(_band_matrix(h, kernel), x.reshape(n, h, w * c)).reshape(n, h, w, c)
  y = np.matmul(_band_matrix(w, kernel), y.transpose(0, 2, 1, 3).reshape(n, w, h * c))
  return y.reshape(n, w, h, c).transpose(0, 2, 1, 3)


def _blur_jnp(x: jax.Array) -> jax.Array:
  kernel = _gaussian_kernel_1d()
  _, h, w, _ = x.shape
  band_h = jnp.asarray(_band_matrix(h, kernel))
  band_w = jnp.asarray(_band_matrix(w, kernel))
  y = jnp.einsum('ij,njwc->niwc', band_h, x, precision=_PRECISION)
  return jnp.einsum('kw,niwc->nikc', band_w, y, precision=_PRECISION)


def local_contrast_normalize(images: np.ndarray) -> np.ndarray:
  """LeCun's local contrast normalization, per channel, as pylearn2's `lecun_lcn`.

  Subtracts the Gaussian-weighted local mean, then divides by the local norm wherever it is
  larger than the image's mean local norm (so flat regions are not amplified). As in pylearn2,
  the local norm is taken of the input, not of the centred input.

  Args:
    images: float (N, H, W, C).

  Returns:
    float32 (N, H, W, C).
  """
  x = images.astype(np.float32, copy=False)
  kernel = _gaussian_kernel_1d()
  centered = np.subtract(x, _blur(x, kernel))
  local_norm = _blur(np.square(x), kernel)
  np.maximum(local_norm, 0.0, out=local_norm)  # rounding can dip below zero
  np.sqrt(local_norm, out=local_norm)
  np.maximum(local_norm, local_norm.mean(axis=(1, 2), keepdims=True), out=local_norm)
  np.maximum(local_norm, LCN_THRESHOLD, out=local_norm)
  centered /= local_norm
  return centered


def _local_contrast_normalize_jnp(x: jax.Array) -> jax.Array:
  centered = x - _blur_jnp(x)
  local_norm = jnp.sqrt(jnp.maximum(_blur_jnp(jnp.square(x)), 0.0))
  local_norm = jnp.maximum(local_norm, jnp.mean(local_norm, axis=(1, 2), keepdims=True))
  return centered / jnp.maximum(local_norm, LCN_THRESHOLD)


def zca_whitening(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Fits ZCA as pylearn2's `ZCA(filter_bias=0.1)`: W = E diag(1/sqrt(lambda + 0.1)) E^T.

  Args:
    features: (N, D) float, e.g. the global-contrast-normalized training images.

  Returns:
    (mean, whitening): float32 (D,) per-feature mean and float32 (D, D) symmetric matrix;
    whitened = (x - mean) @ whitening.
  """
  chunks = (features[start:start + _CHUNK] for start in range(0, len(features), _CHUNK))
  return _zca_from_chunks(chunks, features.shape[1])


def _zca_from_chunks(chunks, num_features: int) -> tuple[np.ndarray, np.ndarray]:
  """`zca_whitening` over an iterable of (n_i, D) chunks, so no (N, D) copy is ever held."""
  count = 0
  total = np.zeros(num_features, np.float64)
  gram = np.zeros((num_features, num_features), np.float64)
  for chunk in chunks:  # X^T X in float32 products (fast), summed in float64 (accurate)
    chunk = np.asarray(chunk, dtype=np.float32)
    count += len(chunk)
    total += chunk.sum(axis=0, dtype=np.float64)
    gram += chunk.T @ chunk
  mean = total / count
  covariance = gram / count - np.outer(mean, mean)  # = (X - mean)^T (X - mean) / n
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  eigenvalues = np.maximum(eigenvalues, 0.0)  # rounding can make null directions slightly < 0
  whitening = (eigenvectors / np.sqrt(eigenvalues + ZCA_FILTER_BIAS)) @ eigenvectors.T
  return mean.astype(np.float32), whitening.astype(np.float32)


# --- The four kinds: fit, numpy, jnp ------------------------------------------------------------
# fit: uint8 (N, H, W, C) training split -> statistics {name: array}; numpy and jnp: uint8
# (N, H, W, C) and those statistics -> float32 (N, H, W, C). In-place arithmetic in numpy: one
# new array per call, not one per operation.


def _fit_nothing(images: np.ndarray) -> dict[str, np.ndarray]:
  del images  # every image is normalized on its own
  return {}


def _none(images: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
  del stats
  x = images.astype(np.float32)
  x *= np.float32(1 / 255)
  return x


def _none_jnp(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  del stats
  return images.astype(jnp.float32) * jnp.float32(1 / 255)


def _fit_standardize(images: np.ndarray) -> dict[str, np.ndarray]:
  channels = images.shape[-1]
  total = np.zeros(channels, np.float64)
  total_sq = np.zeros(channels, np.float64)
  step = min(_CHUNK, max(1, _CHUNK_VALUES // images[0].size))
  for start in range(0, len(images), step):  # chunks: EMNIST has 700k images
    chunk = images[start:start + step].reshape(-1, channels).astype(np.float64) / 255.0
    total += chunk.sum(axis=0)
    total_sq += np.square(chunk).sum(axis=0)
  count = len(images) * images.shape[1] * images.shape[2]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  std[std < STANDARDIZE_MIN_STD] = 1.0
  return {'mean': mean.astype(np.float32), 'std': std.astype(np.float32)}


def _standardize(images: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
  # (x / 255 - mean) / std as one multiply and one subtract
  std, mean = stats['std'], stats['mean']
  x = images.astype(np.float32)
  width = images.shape[2]
  rows = x.reshape(-1, x.shape[2] * x.shape[3])  # a per-channel vector tiled over a row
  rows *= np.tile((1.0 / (255.0 * std)).astype(np.float32), width)  # broadcasts fast
  rows -= np.tile((mean / std).astype(np.float32), width)
  return x


def _standardize_jnp(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  std, mean = stats['std'], stats['mean']
  return images.astype(jnp.float32) * (1.0 / (255.0 * std)) - mean / std


def _fit_gcn_zca(images: np.ndarray) -> dict[str, np.ndarray]:
  image_shape = images.shape[1:]
  num_features = int(np.prod(image_shape))
  if num_features > MAX_ZCA_FEATURES:
    raise UserError(
        f'config.preprocess=gcn_zca on {"x".join(map(str, image_shape))} images '
        f'({num_features} values) needs a {num_features}x{num_features} whitening matrix; '
        f'use at most {MAX_ZCA_FEATURES} values per image (e.g. image_size=32 with 3 channels) '
        'or preprocess=standardize')
  chunks = (global_contrast_normalize(images[start:start + _CHUNK], CIFAR_GCN_SCALE)
            for start in range(0, len(images), _CHUNK))
  mean, whitening = _zca_from_chunks(chunks, num_features)
  return {'mean': mean, 'whitening': whitening}


def _gcn_zca(images: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
  x = global_contrast_normalize(images, CIFAR_GCN_SCALE)
  x -= stats['mean']
  return (x @ stats['whitening']).reshape(images.shape)


def _gcn_zca_jnp(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  x = _global_contrast_normalize_jnp(images, CIFAR_GCN_SCALE) - stats['mean']
  return jnp.matmul(x, stats['whitening'], precision=_PRECISION).reshape(images.shape)


def _lcn(images: np.ndarray, stats: dict[str, np.ndarray]) -> np.ndarray:
  del stats
  x = global_contrast_normalize(images, LCN_GCN_SCALE).reshape(images.shape)
  return local_contrast_normalize(x)


def _lcn_jnp(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  del stats
  x = _global_contrast_normalize_jnp(images, LCN_GCN_SCALE).reshape(images.shape)
  return _local_contrast_normalize_jnp(x)


@dataclasses.dataclass(frozen=True)
class Normalization:
  """One kind of preprocessing: how it is fitted, and its numpy and jnp implementations."""
  fit: Callable[[np.ndarray], dict[str, np.ndarray]]
  numpy: Callable[[np.ndarray, dict[str, np.ndarray]], np.ndarray]
  jnp: Callable[[jax.Array, dict[str, jax.Array]], jax.Array]


_NORMALIZATIONS = {
    'standardize': Normalization(_fit_standardize, _standardize, _standardize_jnp),
    'gcn_zca': Normalization(_fit_gcn_zca, _gcn_zca, _gcn_zca_jnp),
    'lcn': Normalization(_fit_nothing, _lcn, _lcn_jnp),
    'none': Normalization(_fit_nothing, _none, _none_jnp),
}
KINDS = tuple(_NORMALIZATIONS)


def normalization(kind: str) -> Normalization:
  """The fit and the numpy and jnp code of the preprocessing `kind`."""
  if kind not in _NORMALIZATIONS:
    raise ValueError(f'unknown preprocessing kind {kind!r}')
  return _NORMALIZATIONS[kind]


# --- The fitted preprocessing of one run --------------------------------------------------------


@dataclasses.dataclass(eq=False)  # arrays inside: compare fields explicitly
class Preprocessor:
  """The fitted preprocessing of one run: uint8 images in, network inputs out.

  Attributes:
    kind: 'standardize' | 'gcn_zca' | 'lcn' | 'none'.
    image_shape: (H, W, C) of the images it was fitted on (and accepts).
    mean: standardize: float32 (C,) per-channel mean of x/255; gcn_zca: float32 (D,)
      per-feature mean of the contrast-normalized training images; otherwise None.
    std: standardize: float32 (C,) per-channel standard deviation of x/255; otherwise None.
    whitening: gcn_zca: float32 (D, D) ZCA matrix, D = H*W*C; otherwise None.
  """
  kind: str
  image_shape: tuple[int, int, int]
  mean: np.ndarray | None = None
  std: np.ndarray | None = None
  whitening: np.ndarray | None = dataclasses.field(default=None, repr=False)

  def statistics(self) -> dict[str, np.ndarray]:
    """The fitted arrays (mean, std, whitening: those it has), as `normalization` takes them."""
    return {name: getattr(self, name) for name in ('mean', 'std', 'whitening')
            if getattr(self, name) is not None}

  def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> float32 (N, H, W, C); image by image, so batches are consistent."""
    images = np.asarray(images_uint8)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f'expected images of shape (N, {", ".join(map(str, self.image_shape))}),'
                       f' got {images.shape}')
    apply, stats = normalization(self.kind).numpy, self.statistics()
    if len(images) <= _CHUNK:  # a batch: no second copy
      return np.ascontiguousarray(apply(images, stats), dtype=np.float32)
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), _CHUNK):
      chunk = images[start:start + _CHUNK]
      out[start:start + len(chunk)] = apply(chunk, stats)
    return out

  def save(self, path: str | os.PathLike, *, replace: bool = True) -> None:
    """Writes an .npz (no pickles) that `Preprocessor.load` reads back; `path` may be local
    or a URL (`nin_jax.run_files`).

    The file appears whole or not at all (written under a name of this process's own, then
    renamed), so a reader never sees half of it. `replace=False` keeps a file already at `path`
    (the first writer wins): processes sharing a local cache then all read the same statistics.
    A bucket has no such atomic publish (nor hard links): there the last writer wins, and each
    reader sees one whole file.
    """
    arrays = {'kind': np.array(self.kind), 'image_shape': np.array(self.image_shape, np.int64),
              **self.statistics()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    if replace or not run_files.is_local(path):
      run_files.write_bytes_atomic(path, buffer.getvalue())
      return
    tmp = os.fspath(run_files.temporary_name(path))
    with open(tmp, 'wb') as f:
      f.write(buffer.getvalue())
    try:
      os.link(tmp, path)  # atomic, and fails if `path` exists
    except FileExistsError:
      pass
    except OSError:  # a filesystem without hard links: last writer wins instead
      os.replace(tmp, path)
      return
    os.remove(tmp)

  @classmethod
  def load(cls, path: str | os.PathLike) -> Preprocessor:
    """Reads a file written by `save`; UserError naming the file if it is missing or broken."""
    try:
      data = run_files.path(path).read_bytes()
    except FileNotFoundError:
      raise UserError(f'{path}: no such preprocessing file (it is written by training, '
                      'as WORKDIR/preprocessing.npz)') from None
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as f:
        kind = str(f['kind'])
        image_shape = tuple(int(v) for v in f['image_shape'])
        arrays = {name: f[name] for name in ('mean', 'std', 'whitening') if name in f.files}
    except Exception as e:
      raise UserError(f'{path}: not a preprocessing file ({e}); retrain or restore it') from None
    if kind not in KINDS or len(image_shape) != 3:
      raise UserError(f'{path}: not a preprocessing file (kind {kind!r}, '
                      f'image shape {image_shape})')
    return cls(kind=kind, image_shape=image_shape, **arrays)


def fit_preprocessor(kind: str, train_images_uint8: np.ndarray) -> Preprocessor:
  """Fits the preprocessing `kind` on the training split.

  Args:
    kind: 'standardize' | 'gcn_zca' | 'lcn' | 'none' (config.preprocess).
    train_images_uint8: (N, H, W, C) uint8, the training split only: the test split reuses
      these statistics, as in maxout and NIN.

  Returns:
    The fitted Preprocessor.

  Raises:
    UserError: for an unknown kind, or gcn_zca on images with more than MAX_ZCA_FEATURES values.
  """
  if kind not in KINDS:
    raise UserError(f'config.preprocess={kind!r} is not one of {", ".join(KINDS)}')
  images = np.asarray(train_images_uint8)
  if images.ndim != 4 or not len(images):
    raise ValueError(f'expected a non-empty (N, H, W, C) training split, got {images.shape}')
  image_shape = tuple(int(s) for s in images.shape[1:])
  return Preprocessor(kind, image_shape, **normalization(kind).fit(images))
