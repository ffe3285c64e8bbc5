"""The paper's per-dataset normalizations: fitted on the training split, applied in jnp.

Four kinds of preprocessing (`config.preprocess`), each a fitted `Preprocessor`:

  'none'         x / 255.
  'standardize'  (x / 255 - mean) / std, per channel, mean and std of the training split.
  'gcn_zca'      global contrast normalization, then ZCA whitening fitted on the training split:
                 the maxout recipe that NIN used for CIFAR-10/100 (Goodfellow et al. 2013,
                 pylearn2 `scripts/papers/maxout` + `make_cifar10_gcn_whitened.py`).
  'lcn'          global contrast normalization, then LeCun's local contrast normalization per
                 channel: the maxout recipe for SVHN (pylearn2 `svhn_preprocessing.py`). Nothing
                 is fitted: every image is normalized on its own.

Each kind is fitted once per run, in numpy (float64 sums; ZCA's eigendecomposition), and
applied by one jnp function, `normalize(kind, images, statistics)`: inside the jitted train and
eval steps of every input path (`nin_jax.device_input`: the batches travel as uint8), and jitted
on its own by `Preprocessor.__call__` for the data-dependent init and for prediction. Every kind
works image by image once fitted, so a batch gets the same numbers as the whole split would.

numpy and JAX only (no TensorFlow, no PIL): the prediction tools and the train step import it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import time

from absl import logging
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
# pylearn2 `svhn_preprocessing.py` (maxout SVHN): `GlobalContrastNormalization()` with its
# defaults (scale 1, no bias) and then `LeCunLCN((32, 32))` with its defaults: a 7x7 Gaussian
# window of sigma 2 (`gaussian_filter`), divisor floor 1e-4, applied to every channel.
LCN_GCN_SCALE = 1.0
LCN_KERNEL_SIZE = 7
LCN_SIGMA = 2.0
LCN_THRESHOLD = 1e-4
# A constant channel in the training split (e.g. a blank border) has std 0; divide by 1 instead.
STANDARDIZE_MIN_STD = 1e-6
# Images per chunk when fitting on, or preprocessing, many images at once: bounds the float32
# temporaries (4096 x 3072 x 4 bytes = 48 MiB) without slowing the matrix products.
_CHUNK = 4096
# ... and values per chunk where the fit computes in float64: 4096 CIFAR images, 83 ImageNet
# crops of 224 x 224 x 3 (100 MB; a chunk of 4096 of those took 4.9 GB, twice).
_CHUNK_VALUES = _CHUNK * 32 * 32 * 3

# The normalizations' matrix products (ZCA: 3072x3072) in full float32 on every backend:
# accelerators otherwise run float32 products in TF32/bfloat16 passes.
_PRECISION = jax.lax.Precision.HIGHEST


# --- The normalizations: jnp, for every input path -----------------------------------------------
# Each takes uint8 (or float) images and returns float32: inside the jitted train and eval steps
# for every input path (`nin_jax.device_input`), and jitted on its own (`Preprocessor.__call__`)
# for the data-dependent init and for prediction. The fits below use the same functions.


def global_contrast_normalize(images: jax.Array, scale: float) -> jax.Array:
  """Per-image mean subtracted, then scaled to L2 norm `scale` (pylearn2, no sqrt bias).

  Args:
    images: (N, ...) any numeric dtype; each image is one vector.
    scale: the target L2 norm of every image (55 for the maxout CIFAR data).

  Returns:
    float32 (N, D) with D the number of values per image; images whose norm is below
    GCN_MIN_DIVISOR (constant images) are centred, not scaled.
  """
  x = jnp.reshape(images, (images.shape[0], -1)).astype(jnp.float32)
  x = x - jnp.mean(x, axis=1, keepdims=True)
  norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True)) / scale
  return x / jnp.where(norms < GCN_MIN_DIVISOR, 1.0, norms)


def _gaussian_kernel_1d(size: int = LCN_KERNEL_SIZE, sigma: float = LCN_SIGMA) -> np.ndarray:
  """pylearn2's `gaussian_filter` is an outer product of this with itself (both sum to 1)."""
  offsets = np.arange(size, dtype=np.float64) - size // 2
  kernel = np.exp(-offsets**2 / (2.0 * sigma**2))
  return (kernel / kernel.sum()).astype(np.float32)


def _band_matrix(n: int, kernel: np.ndarray) -> np.ndarray:
  """(n, n) matrix M with (M @ v)[i] = sum_j kernel[j] v[i + j - r], zero outside v."""
  r = len(kernel) // 2
  return sum(k * np.eye(n, k=j - r, dtype=np.float32) for j, k in enumerate(kernel))


def _blur(x: jax.Array) -> jax.Array:
  """Separable 'same' Gaussian correlation of (N, H, W, C), zero padding (theano's 'full' +
  crop): two products with banded matrices, one per axis, in one pass each over the images."""
  kernel = _gaussian_kernel_1d()
  _, h, w, _ = x.shape
  y = jnp.einsum('ij,njwc->niwc', _band_matrix(h, kernel), x, precision=_PRECISION)
  return jnp.einsum('kw,niwc->nikc', _band_matrix(w, kernel), y, precision=_PRECISION)


def local_contrast_normalize(images: jax.Array) -> jax.Array:
  """LeCun's local contrast normalization, per channel, as pylearn2's `lecun_lcn`.

  Subtracts the Gaussian-weighted local mean, then divides by the local norm wherever it is
  larger than the image's mean local norm (so flat regions are not amplified). As in pylearn2,
  the local norm is taken of the input, not of the centred input.

  Args:
    images: float (N, H, W, C).

  Returns:
    float32 (N, H, W, C).
  """
  x = images.astype(jnp.float32)
  centered = x - _blur(x)
  local_norm = jnp.sqrt(jnp.maximum(_blur(jnp.square(x)), 0.0))  # rounding can dip below 0
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
  """`zca_whitening` over an iterable of (n_i, D) chunks, so no (N, D) copy is ever held.

  A fit, once per run, in numpy float64: the statistics, not an operation on images.
  """
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


# --- The four kinds: fit (numpy, once) and apply (jnp) -----------------------------------------
# fit: uint8 (N, H, W, C) training split -> statistics {name: array}; apply: uint8 (N, H, W, C)
# and those statistics -> float32 (N, H, W, C).


def _fit_nothing(images: np.ndarray) -> dict[str, np.ndarray]:
  del images  # every image is normalized on its own
  return {}


def _none(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
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


def _standardize(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  # (x / 255 - mean) / std as one multiply and one subtract
  std, mean = stats['std'], stats['mean']
  return images.astype(jnp.float32) * (1.0 / (255.0 * std)) - mean / std


def _fit_gcn_zca(images: np.ndarray) -> dict[str, np.ndarray]:
  image_shape = images.shape[1:]
  num_features = int(np.prod(image_shape))
  if num_features > settings.MAX_ZCA_FEATURES:  # settings.validate refuses such configs
    raise ValueError(f'gcn_zca on {"x".join(map(str, image_shape))} images: {num_features} '
                     f'values per image, more than {settings.MAX_ZCA_FEATURES}')
  gcn = jax.jit(global_contrast_normalize, static_argnums=1)
  chunks = (gcn(images[start:start + _CHUNK], CIFAR_GCN_SCALE)
            for start in range(0, len(images), _CHUNK))
  mean, whitening = _zca_from_chunks(chunks, num_features)
  return {'mean': mean, 'whitening': whitening}


def _gcn_zca(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  x = global_contrast_normalize(images, CIFAR_GCN_SCALE) - stats['mean']
  return jnp.matmul(x, stats['whitening'], precision=_PRECISION).reshape(images.shape)


def _lcn(images: jax.Array, stats: dict[str, jax.Array]) -> jax.Array:
  del stats
  x = global_contrast_normalize(images, LCN_GCN_SCALE).reshape(images.shape)
  return local_contrast_normalize(x)


_FITS = {'standardize': _fit_standardize, 'gcn_zca': _fit_gcn_zca, 'lcn': _fit_nothing,
         'none': _fit_nothing}
_APPLY = {'standardize': _standardize, 'gcn_zca': _gcn_zca, 'lcn': _lcn, 'none': _none}


def normalize(kind: str, images: jax.Array, statistics: dict[str, jax.Array]) -> jax.Array:
  """The preprocessing `kind` (config.preprocess) of uint8 (N, H, W, C) images with its fitted
  `statistics` (`Preprocessor.statistics`): float32 (N, H, W, C). Image by image, so a batch
  gets the same numbers as the whole split would. Traceable: the steps call it under jit."""
  if kind not in _APPLY:
    raise ValueError(f'unknown preprocessing kind {kind!r}')
  return _APPLY[kind](images, statistics)


_normalize_jitted = jax.jit(normalize, static_argnums=0)


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
    stats = self.statistics()
    return np.concatenate([
        np.asarray(_normalize_jitted(self.kind, images[start:start + _CHUNK], stats))
        for start in range(0, len(images), _CHUNK)] or [np.zeros(images.shape, np.float32)])

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
    if kind not in settings.PREPROCESS or len(image_shape) != 3:
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
    ValueError: for an unknown kind, or gcn_zca on images with more than
      settings.MAX_ZCA_FEATURES values (both refused by `settings.validate`).
  """
  images = np.asarray(train_images_uint8)
  if images.ndim != 4 or not len(images):
    raise ValueError(f'expected a non-empty (N, H, W, C) training split, got {images.shape}')
  image_shape = tuple(int(s) for s in images.shape[1:])
  if kind not in _FITS:
    raise ValueError(f'unknown preprocessing kind {kind!r}')
  return Preprocessor(kind, image_shape, **_FITS[kind](images))


def _fingerprint(images: np.ndarray) -> str:
  """A short content hash, so a cache fitted on other images (or mock data) is never reused."""
  digest = hashlib.blake2b(digest_size=8)
  digest.update(repr(images.shape).encode())
  digest.update(np.ascontiguousarray(images).data)
  return digest.hexdigest()


def fit_or_load_preprocessor(kind: str, train_images: np.ndarray, cache_dir: str | None,
                              dataset: str) -> Preprocessor:
  """Fits `kind` on the training split; gcn_zca statistics are cached in `cache_dir`.

  Only gcn_zca is cached: its eigendecomposition takes tens of seconds for CIFAR, the others
  take well under a second to fit.
  """
  if kind != 'gcn_zca' or not cache_dir:
    return fit_preprocessor(kind, train_images)
  shape = 'x'.join(str(s) for s in train_images.shape[1:])
  name = f'{dataset.replace("/", "_")}_{kind}_{shape}_{_fingerprint(train_images)}.npz'
  path = os.path.join(cache_dir, name)
  if run_files.path(path).exists():
    try:
      cached = Preprocessor.load(path)
      if cached.kind == kind and cached.image_shape == tuple(train_images.shape[1:]):
        logging.info('Preprocessing statistics from %s', path)
        return cached
    except UserError as e:
      logging.warning('Refitting: %s', e)
  start = time.time()
  fitted = fit_preprocessor(kind, train_images)
  logging.info('Fitted %s on %d images in %.1f s', kind, len(train_images), time.time() - start)
  try:
    run_files.path(cache_dir).mkdir(parents=True, exist_ok=True)
    # Several processes may fit at once (the hosts of a pod): on a local or shared disk the
    # first file written is the one every one of them uses; on a bucket the last one stays
    # (`Preprocessor.save`).
    fitted.save(path, replace=False)
    return Preprocessor.load(path)
  except (OSError, UserError) as e:  # a read-only dataset folder only costs the refit next time
    logging.warning('Could not cache the %s statistics in %s: %s', kind, path, e)
  return fitted
