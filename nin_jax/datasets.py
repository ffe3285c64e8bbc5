"""Datasets: the TFDS datasets of the paper and class-per-folder images, decoded to uint8 arrays.

Every dataset is decoded once, whole, into host memory as uint8 (CIFAR-10: 150 MiB; SVHN train +
extra: 1.8 GiB; EMNIST byclass: 550 MiB); `nin_jax.input_pipeline` makes the batches of it.
Nothing is downloaded, ever: a TFDS dataset must be prepared beforehand.

TensorFlow and TFDS are imported only inside `_load_tfds`, PIL only when image files are read:
the models, the train step and the prediction tools import this module without them.

  arrays, class_names, cache_dir = load(config)  # arrays: train/test images (uint8), labels
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import os
import string
import threading
from typing import TYPE_CHECKING

from absl import logging
import numpy as np

from nin_jax import run_files
from nin_jax.errors import UserError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the accelerator hosts lack it
  import ml_collections

# The decoded uint8 images of a split must fit in half of this machine's memory: ImageNet at
# 224x224 (193 GB) stops with a clear message while loading instead of running out of memory.
IN_MEMORY_MAX_BYTES = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2
# Fitted gcn_zca statistics are cached here, under the data's root (a hidden folder, so the
# folder dataset does not take it for a class).
CACHE_FOLDER = '.nin_jax_cache'
# Operating-system litter that is never an image and never an error.
_IGNORED_NAMES = frozenset({'thumbs.db', 'desktop.ini', '__macosx'})
_IMAGE_READ_THREADS = 4
# The folders a ROOT/train/ layout evaluates on, in order of preference.
_EVAL_FOLDERS = ('test', 'val')


def load(config: ml_collections.ConfigDict, listing: FolderListing | None = None
         ) -> tuple[dict[str, np.ndarray], list[str], str, list[str]]:
  """Decodes both splits of config.dataset (a folder's files as `listing` lists them, if given).

  Returns:
    ({'train_images', 'test_images': uint8 (N, H, W, C), 'train_labels', 'test_labels': int32
    (N,)}, the class names, the folder for cached preprocessing statistics, one line per file
    left out as unreadable (config.skip_bad_files)).
  """
  if config.dataset == 'folder':
    arrays, class_names, skipped = _load_folder(config, listing or list_folder(config))
    return arrays, class_names, os.path.join(config.data_dir, CACHE_FOLDER), skipped
  arrays, class_names, root = _load_tfds(config)
  return arrays, class_names, os.path.join(root, CACHE_FOLDER), []


# --- TFDS ---------------------------------------------------------------------------------------


def tfds_splits(config: ml_collections.ConfigDict) -> tuple[str, str]:
  if config.dataset == 'svhn_cropped' and config.svhn_extra:
    # All of train + extra; the paper held 6,000 of them out to validate (docs/references.md).
    return 'train+extra', 'test'
  if config.dataset == 'imagenet2012':
    return 'train', 'validation'  # ImageNet's test labels are not public
  return 'train', 'test'


def tfds_class_names(config: ml_collections.ConfigDict, label_feature) -> list[str]:
  if config.dataset == 'emnist/byclass':
    # TFDS names the 62 byclass labels '0'..'61'; they are the digits, then A-Z, then a-z.
    return list(string.digits + string.ascii_uppercase + string.ascii_lowercase)
  return list(label_feature.names)


def tfds_not_prepared(name: str, root: str) -> str:
  """The line that says a TFDS dataset is not prepared, and how to prepare it."""
  return (f'TFDS dataset {name} is not prepared in {root} and runs never download; prepare it '
          f'once with internet: python -c "import tensorflow_datasets as tfds; '
          f"tfds.builder('{name}', data_dir='{root}').download_and_prepare()\" "
          f'(or copy a prepared {name}/ folder into {root}, or set --config.data_dir)')


def tfds_builder(config: ml_collections.ConfigDict):
  """(the folder holding config's TFDS dataset, its builder), for the in-memory path and the
  stream alike.

  Raises:
    UserError: config.data_dir is set and does not exist.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # no TensorFlow
  if config.data_dir and not _is_dir(config.data_dir):
    raise UserError(f'config.data_dir={config.data_dir!r} does not exist; point it at the '
                    f'folder holding the prepared {config.dataset} (or use \'\' for '
                    f'{tfds.core.constants.DATA_DIR})')
  return (config.data_dir or tfds.core.constants.DATA_DIR,
          tfds.builder(config.dataset, data_dir=config.data_dir or None))


def _load_tfds(config: ml_collections.ConfigDict):
  """Decodes both splits of a prepared TFDS dataset into uint8 arrays; never downloads."""
  # Imported here: the folder path and the prediction tools should not pay TF's start-up.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = config.dataset
  root, builder = tfds_builder(config)
  features = builder.info.features
  native = tuple(features['image'].shape)
  if name == 'emnist/byclass':
    native = (native[1], native[0], native[2])
  size, channels = config.image_size, config.image_channels
  target = (size, size, channels)
  if native != target:
    logging.warning('%s images are %s; converting them to %s (config.image_size, '
                    'config.image_channels)', name, native, target)

  def convert(example):
    image = example['image']
    if name == 'emnist/byclass':
      image = tf.transpose(image, [1, 0, 2])  # TFDS stores EMNIST transposed, as the source
    if native[2] == 3 and channels == 1:
      image = tf.image.rgb_to_grayscale(image)
    elif native[2] == 1 and channels == 3:
      image = tf.image.grayscale_to_rgb(image)
    if native[:2] != (size, size):
      image = tf.image.resize(image, (size, size), antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image, example['label']

  def load(split):
    try:
      dataset = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError:  # TFDS's "could not find data in ...": not prepared
      raise UserError(tfds_not_prepared(name, root)) from None
    dataset = dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE).batch(8192)
    images, labels, size_bytes = [], [], 0
    try:
      for image_batch, label_batch in tfds.as_numpy(dataset):
        images.append(image_batch)
        labels.append(label_batch)
        size_bytes += image_batch.nbytes
        if size_bytes > IN_MEMORY_MAX_BYTES:
          raise UserError(
              f'{name} {split} does not fit this in-memory pipeline: more than '
              f'{IN_MEMORY_MAX_BYTES / 2**30:.1f} GiB of uint8 images at {size}x{size} (half of '
              'this machine\'s memory); stream it instead: --config.input_pipeline=stream '
              '(docs/streaming.md)')
    except tf.errors.OpError as e:
      raise UserError(f'TFDS dataset {name} in {root} is incomplete or corrupt '
                      f'({e.message.splitlines()[0]}); delete {builder.data_dir} and prepare it '
                      'again') from None
    return (np.concatenate(images) if images else np.zeros((0, *target), np.uint8),
            np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32))

  train_split, test_split = tfds_splits(config)
  train_images, train_labels = load(train_split)
  test_images, test_labels = load(test_split)
  arrays = dict(train_images=train_images, train_labels=train_labels,
                test_images=test_images, test_labels=test_labels)
  return arrays, tfds_class_names(config, features['label']), root

# --- Image files --------------------------------------------------------------------------------


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
  if image.mode == ('L' if channels == 1 else 'RGB') and 'transparency' not in image.info:
    return image  # most photos: nothing to convert
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


_strict_lock = threading.Lock()
_strict_users = 0
_strict_saved = False


@contextlib.contextmanager
def strict_decoding():
  """Makes PIL fail on truncated files while inside (and restores the setting after).

  Some libraries (TFDS's image utilities among them) set PIL's process-wide
  `ImageFile.LOAD_TRUNCATED_IMAGES = True`, which silently fills the missing part of a cut file
  with black; a training set must not take such a file for a good one. Threads may enter it at
  once (the stream decodes on several): the first one in saves the setting, the last one out
  restores it.
  """
  from PIL import ImageFile  # pylint: disable=g-import-not-at-top
  global _strict_users, _strict_saved
  with _strict_lock:
    if not _strict_users:
      _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
    _strict_users += 1
    ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    yield
  finally:
    with _strict_lock:
      _strict_users -= 1
      if not _strict_users:
        ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved


def decode_image(data: bytes, image_size: int, channels: int, *, resize_size: int = 0,
                 crop: tuple[float, float] | None = None) -> np.ndarray:
  """One encoded image as the network sees it, for training and prediction alike.

  Any format and mode PIL reads (PNG, JPEG, BMP, GIF first frame, 16-bit, palette, alpha) is
  converted to `channels` (1: luma 'L', ITU-R 601; 3: RGB), then resized with PIL's antialiased
  bilinear filter:
  - resize_size=0: the whole image to a square `image_size` x `image_size`; the aspect ratio is
    not kept (as Keras' `image_dataset_from_directory`; the student's images are square).
  - resize_size>0: the shorter side to `resize_size`, aspect kept (as the Caffe ImageNet nets
    were trained), then an `image_size` x `image_size` window: centred (crop=None), or at
    (u, v) in [0, 1)^2 of the free range in y and x (a random crop: `Sampler.train_draws`).
  A JPEG at least twice the size it is resized to is first decoded at 1/2, 1/4 or 1/8 of its
  size (`_draft_scale`); colour JPEGs are decoded by simplejpeg where it is installed, to the
  pixels PIL gives (`_decode_jpeg_fast`).

  Call it inside `strict_decoding()`, or a truncated file may decode with a black part.

  Returns:
    uint8 array of shape (image_size, image_size, channels).

  Raises:
    ValueError (and whatever else PIL raises on bad data: OSError, SyntaxError, …) for data
    that is not a decodable image; `load_image` turns them into one line naming the file.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if channels not in (1, 3):
    raise ValueError(f'channels={channels}: must be 1 or 3')
  pixels = _decode_jpeg_fast(data, image_size, resize_size) if channels == 3 else None
  if pixels is None:
    with Image.open(io.BytesIO(data)) as image:
      size = _resized_size(image.size, image_size, resize_size)
      if image.format == 'JPEG':
        image.draft(None, size)  # see _draft_scale
      image.load()  # decode now: a truncated file fails here, not later
      image = _to_channels(image, channels)
  else:
    image = None
    size = _resized_size(pixels.shape[1::-1], image_size, resize_size)
    if pixels.shape[1::-1] != size:
      image = Image.fromarray(pixels)
  if image is not None:
    if image.size != size:
      image = image.resize(size, Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8).reshape(size[1], size[0], channels)
  if resize_size:  # the image_size window: centred, or where drawn
    free_x, free_y = size[0] - image_size, size[1] - image_size
    if crop is None:
      top, left = free_y // 2, free_x // 2
    else:
      top, left = min(int(crop[0] * (free_y + 1)), free_y), min(int(crop[1] * (free_x + 1)), free_x)
    pixels = pixels[top:top + image_size, left:left + image_size]
  return pixels


def _resized_size(size: tuple[int, int], image_size: int, resize_size: int) -> tuple[int, int]:
  """(width, height) an image of `size` is resized to before its crop: see decode_image."""
  if not resize_size:
    return (image_size, image_size)
  w, h = size
  scale = resize_size / min(w, h)
  return (max(image_size, round(w * scale)), max(image_size, round(h * scale)))


def _draft_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
  """1, 2, 4 or 8: the JPEG of `size` is decoded at 1/scale of it, in the DCT domain, when it is
  at least twice the `target` it is resized to (PIL's draft mode; never below `target`), as
  PIL's `JpegImageFile.draft` picks it. ImageNet's larger photos decode several times faster;
  a photo within twice its target is decoded whole."""
  scale = min(size[0] // target[0], size[1] // target[1])
  return next((s for s in (8, 4, 2) if scale >= s), 1)


def _decode_jpeg_fast(data: bytes, image_size: int, resize_size: int) -> np.ndarray | None:
  """An RGB JPEG (YCbCr, as photos are) decoded by simplejpeg, at `_draft_scale`; None for
  anything else (or without simplejpeg), which PIL decodes.

  Why not PIL alone: simplejpeg decodes with the same libjpeg-turbo settings (the accurate
  integer IDCT, fancy upsampling) to the same pixels, at PIL's draft scales too, straight into a
  numpy array: a 256-px photo in 0.15 ms where PIL takes 0.25 ms to decode and hand over its
  pixels (docs/streaming.md). A truncated file raises ValueError, as PIL does under
  `strict_decoding`.
  """
  try:
    import simplejpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError:  # not a JPEG, or not one it reads: PIL decides
    return None
  if colorspace != 'YCbCr':  # grayscale, CMYK, Adobe RGB JPEGs: PIL's conversions
    return None
  scale = _draft_scale((width, height), _resized_size((width, height), image_size, resize_size))
  return simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=False, fastupsample=False,
                                min_height=-(-height // scale), min_width=-(-width // scale),
                                strict=True)


def read_bytes(path: str | os.PathLike) -> bytes:
  """A whole file: one request each on a bucket (a streamed read there stalls PIL's threads).
  A local file is read with `open`, in half the time epath takes (10 us against 20 us)."""
  if run_files.is_local(path):
    with open(path, 'rb') as f:
      return f.read()
  return run_files.path(path).read_bytes()


def bad_image_message(path: str | os.PathLike, error: Exception) -> str:
  """One line naming a file that is missing or not a decodable image."""
  if isinstance(error, FileNotFoundError):
    return f'{path}: no such file'
  reason = str(error).splitlines()[0] if str(error) else type(error).__name__
  return f'{path}: not a readable image ({reason}); replace or delete it'


def load_image(path: str | os.PathLike, image_size: int, channels: int, *,
               resize_size: int = 0) -> np.ndarray:
  """Reads one image file as `decode_image` (the centre crop where resize_size > 0).

  Raises:
    UserError: naming the file, when it is missing or not an image PIL can decode (corrupt,
      truncated, not an image at all).
  """
  if channels not in (1, 3):
    raise UserError(f'image_channels={channels}: must be 1 (grayscale) or 3 (RGB)')
  try:
    with strict_decoding():
      return decode_image(read_bytes(path), image_size, channels, resize_size=resize_size)
  except Exception as e:  # PIL raises many types on bad data (OSError, SyntaxError, struct.error…)
    raise UserError(bad_image_message(path, e)) from None


# --- The folder dataset -------------------------------------------------------------------------


def _is_dir(folder: str) -> bool:
  return run_files.path(folder).is_dir()


def _ignored(name: str) -> bool:
  return name.startswith('.') or name.lower() in _IGNORED_NAMES


def _visible_entries(folder: str) -> list[str]:
  return sorted(p.name for p in run_files.path(folder).iterdir() if not _ignored(p.name))


def _image_files(class_folder: str) -> list[str]:
  """Every visible file under a class folder (sub-folders included), sorted."""
  files = []
  for parent, folders, names in run_files.walk(class_folder):
    folders[:] = sorted(f for f in folders if not _ignored(f))
    files.extend(os.fspath(parent / n) for n in sorted(names) if not _ignored(n))
  return files


def _class_folders(parent: str, root: str) -> list[str]:
  """The sorted class folders of `parent`; loose files there are ignored with a warning."""
  entries = _visible_entries(parent)
  classes = [e for e in entries if _is_dir(os.path.join(parent, e))]
  loose = [e for e in entries if e not in classes]
  if loose:
    logging.warning('%s: ignoring %d file(s) outside the class folders (e.g. %s)', parent,
                    len(loose), loose[0])
  if len(classes) < 2:
    raise UserError(f'{parent}: found {len(classes)} class folder(s), need at least 2 '
                    f'(layout: {root}/<class>/<images> or {root}/train/<class>/ + '
                    f'{root}/test/<class>/)')
  return classes


@dataclasses.dataclass(frozen=True, eq=False)
class FolderListing:
  """The image files of a folder dataset, in the order of its rows, before any is decoded.

  Attributes:
    root: config.data_dir.
    class_names: the sorted class folders; label i is class_names[i].
    train_files, test_files: paths, class by class, each class's files sorted.
    train_labels, test_labels: int32 (N,), one per file.
    test_split: where the test files come from: 'test/', 'val/' or 'held out'.
  """
  root: str
  class_names: list[str]
  train_files: list[str]
  train_labels: np.ndarray
  test_files: list[str]
  test_labels: np.ndarray
  test_split: str


def list_folder(config: ml_collections.ConfigDict) -> FolderListing:
  """Lists config.data_dir in one of its three layouts, reading no image.

  ROOT/<class>/… (a stratified share of each class held out: `_held_out`), ROOT/train/<class>/…
  + ROOT/test/<class>/…, or ROOT/train/<class>/… + ROOT/val/<class>/… (ImageNet's layout, as
  torchvision's ImageFolder reads it). Files may sit in sub-folders of a class folder.
  """
  root = config.data_dir
  if not root:
    raise UserError("config.data_dir is empty; point it at the image folder "
                    "(ROOT/<class>/<images>)")
  if not _is_dir(root):
    raise UserError(f'config.data_dir={root!r} is not a folder; point it at the image folder '
                    '(ROOT/<class>/<images>)')
  entries = {e for e in _visible_entries(root) if _is_dir(os.path.join(root, e))}
  test_name = next((name for name in _EVAL_FOLDERS if name in entries), None)
  if 'train' in entries and test_name is None:
    raise UserError(f'{root} has a train/ folder but no test/ or val/ folder: add '
                    f'{os.path.join(root, "test")}/<class>/ images, or put the class folders '
                    f'directly in {root}')
  if 'train' not in entries and test_name is not None:
    raise UserError(f'{root} has a {test_name}/ folder but no train/ folder: add '
                    f'{os.path.join(root, "train")}/<class>/ images, or put the class folders '
                    f'directly in {root}')
  if test_name is None:
    class_names = _class_folders(root, root)
    train_files, test_files, train_labels, test_labels = [], [], [], []
    for label, name in enumerate(class_names):
      folder = os.path.join(root, name)
      files = _image_files(folder)
      if not files:
        raise UserError(f'{folder}: empty class folder; add images or remove the folder')
      held_out = _held_out([os.fspath(run_files.path(f).relative_to(folder)) for f in files],
                           config.test_fraction)
      train_files += [f for f, out in zip(files, held_out) if not out]
      test_files += [f for f, out in zip(files, held_out) if out]
      train_labels += [label] * int((~held_out).sum())
      test_labels += [label] * int(held_out.sum())
    test_split = 'held out'
  else:
    others = sorted(entries - {'train', test_name})
    if others:
      logging.warning('%s: using train/ and %s/, ignoring %s', root, test_name, ', '.join(others))
    train_root, test_root = os.path.join(root, 'train'), os.path.join(root, test_name)
    class_names = _class_folders(train_root, root)
    test_classes = [c for c in _visible_entries(test_root) if _is_dir(os.path.join(test_root, c))]
    unknown = [c for c in test_classes if c not in class_names]
    if unknown:
      raise UserError(f'{os.path.join(test_root, unknown[0])}: class not in {train_root}; '
                      f'{test_name} classes must also be training classes')

    def files_of(parent, names):
      files, labels = [], []
      for name in names:
        folder = os.path.join(parent, name)
        found = _image_files(folder)
        if not found:
          raise UserError(f'{folder}: empty class folder; add images or remove the folder')
        files += found
        labels += [class_names.index(name)] * len(found)
      return files, labels

    train_files, train_labels = files_of(train_root, class_names)
    test_files, test_labels = files_of(test_root, sorted(test_classes))
    test_split = f'{test_name}/'
  if not test_files:
    raise UserError(f'{root}: the test split is empty; add test images (a class needs at '
                    'least 2 images for a held-out share)')
  return FolderListing(root=root, class_names=class_names, train_files=train_files,
                       train_labels=np.asarray(train_labels, np.int32), test_files=test_files,
                       test_labels=np.asarray(test_labels, np.int32), test_split=test_split)


def _read_images(files: list[str], config: ml_collections.ConfigDict
                 ) -> tuple[list[np.ndarray | None], list[str]]:
  """Decodes the files (None for a bad one when skip_bad_files, else UserError), and one line
  per bad file."""
  def read(path):
    try:
      return load_image(path, config.image_size, config.image_channels,
                        resize_size=config.resize_size), None
    except UserError as e:
      return None, str(e)

  # PIL releases the GIL while it decodes, so a few threads overlap the file reads and decoding.
  with strict_decoding(), concurrent.futures.ThreadPoolExecutor(
      _IMAGE_READ_THREADS) as pool:
    results = list(pool.map(read, files))
  errors = [error for _, error in results if error is not None]
  if errors and not config.skip_bad_files:
    more = f' (and {len(errors) - 1} more bad file(s))' if len(errors) > 1 else ''
    raise UserError(f'{errors[0]}{more}; --config.skip_bad_files=True skips bad files')
  for error in errors:
    logging.warning('Skipping %s', error)
  return [image for image, _ in results], errors


def _held_out(names: list[str], fraction: float) -> np.ndarray:
  """bool mask: the stratified, deterministic test share of one class.

  The files are ordered by a hash of their name, and the first round(n * fraction) (at least
  one, and never all) are held out: the same split on every machine and every run, and adding
  a file moves no other file between the splits.
  """
  n = len(names)
  num_test = min(max(1, round(n * fraction)), n - 1) if n >= 2 else 0
  order = sorted(range(n), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())
  mask = np.zeros(n, bool)
  mask[order[:num_test]] = True
  return mask


def _load_folder(config: ml_collections.ConfigDict, listing: FolderListing):
  """Decodes every file of `listing` into memory.

  All files are decoded before a bad one stops the run, so one message counts every bad file;
  with skip_bad_files they are left out (a class left with no readable training image stops).
  """
  images, skipped = _read_images(listing.train_files + listing.test_files, config)
  n = len(listing.train_files)
  shape = (0, config.image_size, config.image_size, config.image_channels)
  arrays = {}
  for split, files, labels, decoded in (('train', listing.train_files, listing.train_labels,
                                         images[:n]),
                                        ('test', listing.test_files, listing.test_labels,
                                         images[n:])):
    kept = [i for i, image in enumerate(decoded) if image is not None]
    arrays[f'{split}_images'] = (np.stack([decoded[i] for i in kept]) if kept
                                 else np.zeros(shape, np.uint8))
    arrays[f'{split}_labels'] = labels[kept]
  counts = np.bincount(arrays['train_labels'], minlength=len(listing.class_names))
  if not counts.all():
    name = listing.class_names[int(np.argmin(counts))]
    raise UserError(f'{listing.root}: class {name!r} has no readable training image')
  if not len(arrays['test_labels']):
    raise UserError(f'{listing.root}: no readable test image')
  return arrays, listing.class_names, skipped
