"""Image preprocessing: reading image files, and the paper's per-dataset normalizations.

numpy at import, PIL when reading files (no TensorFlow): the prediction tools import this module
to convert a new image exactly as the training images were converted, and they should start in a
second; the benchmark's input paths import it on accelerator hosts that have no PIL.

Four kinds of preprocessing (`config.preprocess`), each a fitted `Preprocessor`:

  'none'         x / 255.
  'standardize'  (x / 255 - mean) / std, per channel, mean and std of the training split.
  'gcn_zca'      global contrast normalization, then ZCA whitening fitted on the training split:
                 the maxout recipe that NIN used for CIFAR-10/100 (Goodfellow et al. 2013,
                 pylearn2 `scripts/papers/maxout` + `make_cifar10_gcn_whitened.py`).
  'lcn'          global contrast normalization, then LeCun's local contrast normalization per
                 channel: the maxout recipe for SVHN (pylearn2 `svhn_preprocessing.py`). Nothing
                 is fitted: every image is normalized on its own.

Every kind works image by image once fitted, so preprocessing a batch gives the same numbers as
preprocessing the whole split and then taking the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

from nin_jax.errors import UserError

KINDS = ('standardize', 'gcn_zca', 'lcn', 'none')

# --- Constants and where they come from --------------------------------------------------------
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
MAX_ZCA_FEATURES = 4096
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


# --- Reading image files -----------------------------------------------------------------------


def _to_8bit(image: Image.Image) -> Image.Image:
  """Maps 16-bit and float modes to 8-bit 'L' (PIL's own convert would clip them at 255)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.mode.startswith('I;16'):
    array = np.asarray(image, dtype=np.float32) / 257.0  # 65535 -> 255
  elif image.mode == 'I':
    array = np.asarray(image, dtype=np.float32)
    if array.max(initial=0) > 255:
      array = array / 257.0
  elif image.mode == 'F':
    array = np.asarray(image, dtype=np.float32)
  else:
    return image
  return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode='L')


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
  """Converts any PIL mode to 'L' (channels=1) or 'RGB' (channels=3).

  Transparent images are composited over white, so a dark glyph drawn on a transparent
  background stays a dark glyph (dropping the alpha channel would turn the background into
  whatever colour the transparent pixels happen to hold, often black).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _to_8bit(image)
  if image.mode == 'P':
    image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
  elif image.mode in ('L', 'RGB') and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return image.convert('L' if channels == 1 else 'RGB')


@contextlib.contextmanager
def strict_decoding():
  """Makes PIL fail on truncated files while inside (and restores the setting after).

  Some libraries (TFDS's image utilities among them) set PIL's process-wide
  `ImageFile.LOAD_TRUNCATED_IMAGES = True`, which silently fills the missing part of a cut file
  with black; a training set must not take such a file for a good one. Callers that read files
  in several threads enter this once around all of them, so the threads never race on it.
  """
  from PIL import ImageFile  # pylint: disable=g-import-not-at-top
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    yield
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


def load_image(path: str | os.PathLike, image_size: int, channels: int) -> np.ndarray:
  """Reads one image file as the network sees it, for training and prediction alike.

  Any size and mode PIL reads (PNG, JPEG, BMP, GIF first frame, 16-bit, palette, alpha) is
  converted to `channels` (1: luma 'L', ITU-R 601; 3: RGB) and resized to a square
  `image_size` x `image_size` with PIL's antialiased bilinear filter. The aspect ratio is not
  kept (as Keras' `image_dataset_from_directory`): the seed's images are square already.

  Args:
    path: the image file.
    image_size: output height and width.
    channels: 1 or 3.

  Returns:
    uint8 array of shape (image_size, image_size, channels).

  Raises:
    UserError: naming the file, when it is not an image PIL can decode (corrupt, truncated,
      not an image at all).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if channels not in (1, 3):
    raise UserError(f'image_channels={channels}: must be 1 (grayscale) or 3 (RGB)')
  try:
    with strict_decoding(), Image.open(path) as image:
      image.load()  # decode now: a truncated file fails here, not later
      image = _to_channels(image, channels)
      if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
      array = np.asarray(image, dtype=np.uint8)
  except FileNotFoundError:
    raise UserError(f'{path}: no such file') from None
  except Exception as e:  # PIL raises many types on bad data (OSError, SyntaxError, struct.error…)
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f'{path}: not a readable image ({reason}); replace or delete it') from None
  return array.reshape(image_size, image_size, channels)


# --- The normalizations, as pure functions ------------------------------------------------------


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

  def __call__(self, images_uint8: np.ndarray) -> np.ndarray:
    """(N, H, W, C) uint8 -> float32 (N, H, W, C); image by image, so batches are consistent."""
    images = np.asarray(images_uint8)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.image_shape):
      raise ValueError(f'expected images of shape (N, {", ".join(map(str, self.image_shape))}),'
                       f' got {images.shape}')
    if len(images) <= _CHUNK:  # a batch: no second copy
      return np.ascontiguousarray(self._apply(images), dtype=np.float32)
    out = np.empty(images.shape, np.float32)
    for start in range(0, len(images), _CHUNK):
      chunk = images[start:start + _CHUNK]
      out[start:start + len(chunk)] = self._apply(chunk)
    return out

  def _apply(self, images: np.ndarray) -> np.ndarray:
    # In-place arithmetic: one new array per call, not one per operation.
    if self.kind == 'none':
      x = images.astype(np.float32)
      x *= np.float32(1 / 255)
      return x
    if self.kind == 'standardize':  # (x / 255 - mean) / std as one multiply and one subtract
      x = images.astype(np.float32)
      width = images.shape[2]
      rows = x.reshape(-1, x.shape[2] * x.shape[3])  # a per-channel vector tiled over a row
      rows *= np.tile((1.0 / (255.0 * self.std)).astype(np.float32), width)  # broadcasts fast
      rows -= np.tile((self.mean / self.std).astype(np.float32), width)
      return x
    if self.kind == 'gcn_zca':
      x = global_contrast_normalize(images, CIFAR_GCN_SCALE)
      x -= self.mean
      return (x @ self.whitening).reshape(images.shape)
    if self.kind == 'lcn':
      x = global_contrast_normalize(images, LCN_GCN_SCALE).reshape(images.shape)
      return local_contrast_normalize(x)
    raise ValueError(f'unknown preprocessing kind {self.kind!r}')

  def save(self, path: str | os.PathLike) -> None:
    """Writes an .npz (no pickles) that `Preprocessor.load` reads back."""
    arrays = {'kind': np.array(self.kind), 'image_shape': np.array(self.image_shape, np.int64)}
    for name in ('mean', 'std', 'whitening'):
      value = getattr(self, name)
      if value is not None:
        arrays[name] = value
    tmp = f'{os.fspath(path)}.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half file behind

  @classmethod
  def load(cls, path: str | os.PathLike) -> Preprocessor:
    """Reads a file written by `save`; UserError naming the file if it is missing or broken."""
    try:
      with np.load(path, allow_pickle=False) as f:
        kind = str(f['kind'])
        image_shape = tuple(int(v) for v in f['image_shape'])
        arrays = {name: f[name] for name in ('mean', 'std', 'whitening') if name in f.files}
    except FileNotFoundError:
      raise UserError(f'{path}: no such preprocessing file (it is written by training, '
                      'as WORKDIR/preprocessing.npz)') from None
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
  if kind in ('none', 'lcn'):
    return Preprocessor(kind, image_shape)
  if kind == 'standardize':
    channels = image_shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    for start in range(0, len(images), _CHUNK):  # chunks: EMNIST has 700k images
      chunk = images[start:start + _CHUNK].reshape(-1, channels).astype(np.float64) / 255.0
      total += chunk.sum(axis=0)
      total_sq += np.square(chunk).sum(axis=0)
    count = len(images) * image_shape[0] * image_shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    std[std < STANDARDIZE_MIN_STD] = 1.0
    return Preprocessor(kind, image_shape, mean=mean.astype(np.float32),
                        std=std.astype(np.float32))
  # gcn_zca
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
  return Preprocessor(kind, image_shape, mean=mean, whitening=whitening)
