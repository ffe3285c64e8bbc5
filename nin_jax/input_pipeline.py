"""Input pipeline: a dataset in host memory (`nin_jax.datasets`), and its batches as numpy arrays.

A split whose preprocessed float32 copy fits in `PREPROCESS_AT_LOAD_MAX_BYTES` is preprocessed
whole, once, when the host first draws a batch of it (ZCA is a 3072x3072 product per image: too
slow to redo per batch on two cores; the device-resident path never draws host batches, so it
never pays for this); a larger split (SVHN train + extra, EMNIST) stays uint8 and each batch is
preprocessed when it is drawn, which gives the same numbers because every preprocessing works
image by image. Augmentation (`nin_jax.augment`) is a numpy slice copy per image, fused with the
gather of the batch.

Batches are pure functions of (config.seed, step) (`Sampler`): a resumed run sees exactly the
batches that the uninterrupted run would have seen, and the global batch does not depend on the
number of processes (each process takes its own rows of it). Every process holds the whole
dataset; only the batches are split. A folder too large for that (or whose training images are
random crops) is streamed instead (`streams`, `nin_jax.stream`): the same batches, from files
read while the net trains.

  data = create_data(config)
  for step, batch in zip(range(start, end), data.train_batches(start)):
    ...  # batch['image'] float32 (B/P, H, W, C), batch['label'] int32 (B/P,)
  for batch in data.eval_batches():
    ...  # plus batch['mask'], False on the padding of the last batch
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import hashlib
import itertools
import math
import os
import threading
import time
from typing import TYPE_CHECKING

from absl import logging
import jax
import numpy as np

from nin_jax import augment
from nin_jax import datasets
from nin_jax import device_input
from nin_jax import preprocessing
from nin_jax import run_files
from nin_jax import settings
from nin_jax.errors import UserError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the accelerator hosts lack it
  import ml_collections

# A split whose preprocessed float32 copy is at most this big is preprocessed whole, once;
# bigger ones are preprocessed per batch (CIFAR-10 train: 0.6 GiB; SVHN train + extra: 7.4 GiB).
PREPROCESS_AT_LOAD_MAX_BYTES = 2 * 2**30
# Separate random streams, so shuffling and augmentation never share numbers.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


# --- The batches --------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True, eq=False)
class Sampler:
  """Which rows, in which order, with which augmentation draws, make every batch of a process.

  Numbers only (no images), so the stream's workers get their own copy; `Data` (in memory) and
  `stream.StreamData` are Samplers that also turn the draws into images.

  Attributes:
    num_train_examples, num_test_examples: split sizes.
    batch_size: the global training batch, over all processes.
    eval_batch_size: the global evaluation batch.
    seed: config.seed; shuffling and augmentation are drawn from (seed, step).
    augment: a setting of `nin_jax.augment`.
    translate_pixels: largest random shift of the translate augmentations.
    process_index, process_count: which share of every global batch this process yields.
  """
  num_train_examples: int
  num_test_examples: int
  batch_size: int
  eval_batch_size: int
  seed: int = 0
  augment: str = 'none'
  translate_pixels: int = 0
  process_index: int = 0
  process_count: int = 1
  _permutation_cache: tuple[int, np.ndarray] | None = dataclasses.field(
      init=False, repr=False, default=None)

  def __post_init__(self):
    for name in ('batch_size', 'eval_batch_size'):
      value = getattr(self, name)
      if value < 1 or value % self.process_count:
        raise UserError(f'config.{name}={value}: must be a positive multiple of the number of '
                        f'processes ({self.process_count})')
    augment.moves(self.augment)  # UserError for an unknown setting
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process {self.process_index} of {self.process_count}')

  def sampler(self) -> Sampler:
    """A plain Sampler with this one's numbers (what a stream worker needs)."""
    return Sampler(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Sampler)
                      if f.init})

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_train_examples // self.batch_size)

  @property
  def num_eval_batches(self) -> int:
    """Batches per pass of `eval_batches` (the last one padded)."""
    return math.ceil(self.num_test_examples / self.eval_batch_size)

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    if self._permutation_cache is None or self._permutation_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
      self._permutation_cache = (epoch, rng.permutation(self.num_train_examples))
    return self._permutation_cache[1]

  def train_draws(self, step: int) -> dict[str, np.ndarray]:
    """What this process's share of the training batch of `step` is made of: a pure function.

    Epoch e = step // steps_per_epoch is a permutation of the training split drawn from
    (seed, e); global batch i of the epoch is rows [i*B, (i+1)*B) of it (wrapping around when
    the split is smaller than one batch); process p takes rows [p*B/P, (p+1)*B/P) of that.
    The augmentation of the whole global batch is drawn from (seed, step) before it is split.

    Returns:
      {'rows': int32 (B/P,) indices into the training split, 'shifts': int32 (B/P, 2) the
      (dy, dx) of each image's translation (zero unless augment translates), 'flips': bool
      (B/P,) which images are mirrored (zero unless augment flips)}, and with
      augment='crop_flip' 'crops': float64 (B/P, 2), where each crop sits
      (`augment.draw_crops`). `train_batch` turns them into images on the host;
      `nin_jax.device_input` on the devices; `nin_jax.stream` in its workers.
    """
    b = self.batch_size
    epoch, i = divmod(step, self.steps_per_epoch)
    positions = (i * b + np.arange(b)) % self.num_train_examples
    rows = self._epoch_permutation(epoch)[positions]
    rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step])
    shifts, flips = augment.draw(rng, self.augment, b, self.translate_pixels)
    crops = augment.draw_crops(rng, self.augment, b)
    share = slice(self.process_index * b // self.process_count,
                  (self.process_index + 1) * b // self.process_count)
    draws = {'rows': rows[share].astype(np.int32), 'shifts': shifts[share].astype(np.int32),
             'flips': flips[share]}
    if crops is not None:
      draws['crops'] = crops[share]
    return draws

  def eval_draw(self, j: int) -> dict[str, np.ndarray]:
    """The rows of evaluation batch j: {'rows': int32 (E/P,), 'mask': bool (E/P,)}; padding
    rows point at row 0 and are masked."""
    share = self.eval_batch_size // self.process_count
    indices = j * self.eval_batch_size + self.process_index * share + np.arange(share)
    mask = indices < self.num_test_examples
    return {'rows': np.where(mask, indices, 0).astype(np.int32), 'mask': mask}

  def eval_draws(self) -> Iterator[dict[str, np.ndarray]]:
    """`eval_draw` of every batch of `eval_batches`, in order."""
    return map(self.eval_draw, range(self.num_eval_batches))


def augment_batch(images: np.ndarray, draws: dict[str, np.ndarray],
                  augment_setting: str) -> np.ndarray:
  """The translations and flips of `draws` applied to preprocessed float32 images (the same
  array back where the setting moves nothing)."""
  if not any(augment.moves(augment_setting)):
    return images
  return augment.translate_and_flip(images, draws['shifts'], draws['flips'])


@dataclasses.dataclass(kw_only=True, eq=False)  # arrays inside: compare fields explicitly
class Data(Sampler):
  """One dataset in memory, and the batches of one process.

  Attributes (beyond `Sampler`'s):
    num_classes: number of classes.
    class_names: sorted folder names, or TFDS label names (EMNIST: 0-9, A-Z, a-z).
    image_shape: (H, W, C) after conversion.
    preprocessor: the preprocessing fitted on the training split (save it with the run).
    train_images_uint8, test_images_uint8: uint8 (N, H, W, C), the raw images (for a
      device-resident input path; preprocess them with `preprocessor`).
    train_labels, test_labels: int32 (N,).
    skipped_files: the files left out as unreadable (config.skip_bad_files).
  """
  num_classes: int
  class_names: list[str]
  image_shape: tuple[int, int, int]
  preprocessor: preprocessing.Preprocessor
  train_images_uint8: np.ndarray = dataclasses.field(repr=False)
  train_labels: np.ndarray = dataclasses.field(repr=False)
  test_images_uint8: np.ndarray = dataclasses.field(repr=False)
  test_labels: np.ndarray = dataclasses.field(repr=False)
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  streamed = False  # the input path's name in results: see `stream.StreamData`
  _inputs: dict[str, np.ndarray | None] = dataclasses.field(init=False, repr=False)
  _whole: dict[str, bool] = dataclasses.field(init=False, repr=False)
  _inputs_lock: threading.Lock = dataclasses.field(init=False, repr=False,
                                                   default_factory=threading.Lock)

  def __post_init__(self):
    super().__post_init__()
    if not 0 <= self.translate_pixels < min(self.image_shape[:2]):
      raise UserError(f'config.translate_pixels={self.translate_pixels}: must be smaller than '
                      f'the images ({self.image_shape[0]}x{self.image_shape[1]})')
    self._inputs = {'train': None, 'test': None}
    self._whole = {split: bool(len(images)) and images.size * 4 <= PREPROCESS_AT_LOAD_MAX_BYTES
                   for split, images in (('train', self.train_images_uint8),
                                         ('test', self.test_images_uint8))}

  @property
  def preprocessed_at_load(self) -> bool:
    """False when the training split is preprocessed batch by batch (large datasets)."""
    return self._whole['train']

  def train_images(self, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), H, W, C) training images, not preprocessed."""
    return self.train_images_uint8[rows]

  def test_images(self, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), H, W, C) test images, not preprocessed."""
    return self.test_images_uint8[rows]

  def _preprocessed_split(self, split: str) -> np.ndarray | None:
    """The whole split preprocessed (computed on first use, then kept), or None for a split
    preprocessed batch by batch. The train and eval prefetch threads may ask at once."""
    if not self._whole[split]:
      return None
    with self._inputs_lock:
      if self._inputs[split] is None:
        images = self.train_images_uint8 if split == 'train' else self.test_images_uint8
        self._inputs[split] = self.preprocessor(images)
      return self._inputs[split]

  def preprocessed_images(self, split: str, indices: np.ndarray | None = None) -> np.ndarray:
    """float32 (len(indices), H, W, C) preprocessed (not augmented) images of 'train'/'test'."""
    images = self.train_images_uint8 if split == 'train' else self.test_images_uint8
    if indices is None:
      indices = np.arange(len(images))
    inputs = self._preprocessed_split(split)
    return inputs[indices] if inputs is not None else self.preprocessor(images[indices])

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's share of the global training batch of `step` (see `train_draws`)."""
    draws = self.train_draws(step)
    rows = draws['rows']
    labels = self.train_labels[rows]
    inputs = self._preprocessed_split('train')
    if inputs is not None and any(augment.moves(self.augment)):  # gather and augment in one pass
      images = augment.translate_and_flip(inputs, draws['shifts'], draws['flips'], rows)
    else:
      images = augment_batch(self.preprocessed_images('train', rows), draws, self.augment)
    return {'image': images, 'label': labels}

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Infinite; item k is `train_batch(start_step + k)`."""
    for step in itertools.count(start_step):
      yield self.train_batch(step)

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the test split: every example exactly once over all processes.

    Global batches of eval_batch_size in order; the last is padded with zero images whose
    'mask' is False. Process p yields rows [p*E/P, (p+1)*E/P) of each global batch.
    """
    for draws in self.eval_draws():
      rows, mask = draws['rows'], draws['mask']
      images = self.preprocessed_images('test', rows)
      images[~mask] = 0.0
      labels = np.where(mask, self.test_labels[rows], 0).astype(np.int32)
      yield {'image': images, 'label': labels, 'mask': mask}


# --- Building a Data ----------------------------------------------------------------------------


def _fingerprint(images: np.ndarray) -> str:
  """A short content hash, so a cache fitted on other images (or mock data) is never reused."""
  digest = hashlib.blake2b(digest_size=8)
  digest.update(repr(images.shape).encode())
  digest.update(np.ascontiguousarray(images).data)
  return digest.hexdigest()


def fit_or_load_preprocessor(kind: str, train_images: np.ndarray, cache_dir: str | None,
                              dataset: str) -> preprocessing.Preprocessor:
  """Fits `kind` on the training split; gcn_zca statistics are cached in `cache_dir`.

  Only gcn_zca is cached: its eigendecomposition takes tens of seconds for CIFAR, the others
  take well under a second to fit.
  """
  if kind != 'gcn_zca' or not cache_dir:
    return preprocessing.fit_preprocessor(kind, train_images)
  shape = 'x'.join(str(s) for s in train_images.shape[1:])
  name = f'{dataset.replace("/", "_")}_{kind}_{shape}_{_fingerprint(train_images)}.npz'
  path = os.path.join(cache_dir, name)
  if run_files.path(path).exists():
    try:
      cached = preprocessing.Preprocessor.load(path)
      if cached.kind == kind and cached.image_shape == tuple(train_images.shape[1:]):
        logging.info('Preprocessing statistics from %s', path)
        return cached
    except UserError as e:
      logging.warning('Refitting: %s', e)
  start = time.time()
  fitted = preprocessing.fit_preprocessor(kind, train_images)
  logging.info('Fitted %s on %d images in %.1f s', kind, len(train_images), time.time() - start)
  try:
    run_files.path(cache_dir).mkdir(parents=True, exist_ok=True)
    # Several processes may fit at once (the hosts of a pod): on a local or shared disk the
    # first file written is the one every one of them uses; on a bucket the last one stays
    # (`Preprocessor.save`).
    fitted.save(path, replace=False)
    return preprocessing.Preprocessor.load(path)
  except (OSError, UserError) as e:  # a read-only dataset folder only costs the refit next time
    logging.warning('Could not cache the %s statistics in %s: %s', kind, path, e)
  return fitted


def data_from_arrays(config: ml_collections.ConfigDict, *, train_images: np.ndarray,
                     train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray,
                     class_names: list[str], process_index: int | None = None,
                     process_count: int | None = None, cache_dir: str | None = None,
                     dataset: str = 'arrays') -> Data:
  """A Data from images already in memory (also handy for tests and tiny synthetic runs).

  Args:
    config: reads preprocess, augment, translate_pixels, batch_size, eval_batch_size, seed.
    train_images, test_images: uint8 (N, H, W, C).
    train_labels, test_labels: int (N,), in [0, len(class_names)).
    class_names: one name per class.
    process_index, process_count: None: jax.process_index() / jax.process_count().
    cache_dir: where gcn_zca statistics are cached (None: never).
    dataset: names the cache file.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  train_images = np.asarray(train_images, np.uint8)
  test_images = np.asarray(test_images, np.uint8)
  train_labels = np.asarray(train_labels, np.int32)
  test_labels = np.asarray(test_labels, np.int32)
  if not len(train_images):
    raise UserError(f'{dataset}: the training split is empty')
  for labels in (train_labels, test_labels):
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
      raise UserError(f'{dataset}: labels outside [0, {len(class_names)})')
  preprocessor = fit_or_load_preprocessor(config.preprocess, train_images, cache_dir, dataset)
  return Data(
      num_classes=len(class_names), class_names=list(class_names),
      image_shape=tuple(int(s) for s in train_images.shape[1:]),
      num_train_examples=len(train_images), num_test_examples=len(test_images),
      preprocessor=preprocessor, batch_size=int(config.batch_size),
      eval_batch_size=int(config.eval_batch_size), train_images_uint8=train_images,
      train_labels=train_labels, test_images_uint8=test_images, test_labels=test_labels,
      seed=int(config.seed) % 2**63, augment=config.augment,
      translate_pixels=int(config.translate_pixels), process_index=process_index,
      process_count=process_count)


def host_memory_bytes() -> int:
  """This host's memory, or its container's limit where that is lower (cgroup v2)."""
  memory = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  try:
    with open('/sys/fs/cgroup/memory.max') as f:
      limit = f.read().strip()
    if limit.isdigit():
      memory = min(memory, int(limit))
  except OSError:
    pass
  return memory


def streams(config: ml_collections.ConfigDict, listing: datasets.FolderListing) -> bool:
  """Whether a folder is streamed (`nin_jax.stream`) rather than decoded into memory.

  input_pipeline='stream' always; 'auto' when its decoded training images would take more than
  stream_memory_fraction of the host's memory (estimated from the file count and image size,
  before any is decoded), or when augment='crop_flip' needs the files' full images; logged.
  """
  if config.input_pipeline != 'auto':
    return config.input_pipeline == 'stream'
  needed = len(listing.train_files) * config.image_size ** 2 * config.image_channels
  memory = host_memory_bytes()
  limit = config.stream_memory_fraction * memory
  crops = augment.crops(config.augment)
  chosen = needed > limit or crops
  logging.info('input_pipeline=auto: %s: the decoded training images (%d at %dx%dx%d, %.2f GiB) '
               '%s %.0f%% of this host\'s %.1f GiB of memory%s: %s', listing.root,
               len(listing.train_files), config.image_size, config.image_size,
               config.image_channels, needed / 2**30, 'exceed' if needed > limit else 'fit in',
               100 * config.stream_memory_fraction, memory / 2**30,
               '; augment=crop_flip crops each image where it is decoded' if crops else '',
               'streaming them' if chosen else 'decoding them into memory')
  return chosen


def create_data(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                process_count: int | None = None) -> Data:
  """Loads config.dataset, fits the preprocessing, and returns this process's batches.

  A folder that `streams` gives a `stream.StreamData`, which has the same interface.

  Args:
    config: see experiments/default.py (Data section and batch sizes).
    process_index, process_count: None: jax.process_index() / jax.process_count().

  Raises:
    UserError: a bad setting, a dataset that is not prepared, a bad image folder or file, or
      config.num_classes that disagrees with the data. Nothing is downloaded, ever.
  """
  settings.validate(config, check_model=False)
  start = time.time()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  listing = datasets.list_folder(config) if config.dataset == 'folder' else None
  if listing is not None:
    _check_num_classes(config, listing.class_names)
    if streams(config, listing):
      from nin_jax import stream  # pylint: disable=g-import-not-at-top  # it imports this module
      return stream.create_stream_data(config, listing, process_index=process_index,
                                       process_count=process_count)
  arrays, class_names, cache_dir, skipped = datasets.load(config, listing)
  _check_num_classes(config, class_names)
  data = data_from_arrays(config, **arrays, class_names=class_names,
                          process_index=process_index, process_count=process_count,
                          cache_dir=cache_dir, dataset=config.dataset)
  data.skipped_files = skipped
  logging.info('%s: %d train, %d test images of %s, %d classes, %s, ready in %.1f s',
               config.dataset, data.num_train_examples, data.num_test_examples,
               data.image_shape, data.num_classes, config.preprocess, time.time() - start)
  return data


def _check_num_classes(config: ml_collections.ConfigDict, class_names: list[str]) -> None:
  if len(class_names) != config.num_classes:
    raise UserError(f'config.num_classes={config.num_classes} but {config.dataset} '
                    f'({config.data_dir or "TFDS default folder"}) has {len(class_names)} '
                    f'classes; set --config.num_classes={len(class_names)}')
