"""Input pipeline: a dataset in host memory (`nin_jax.datasets`), and its batches as numpy arrays.

Each batch is gathered from the dataset: {'image', 'label': int32} and the augmentation draws
of its step (`sampler.Sampler`). The train and eval steps preprocess and augment it on the
devices (`nin_jax.device_input`), the same code for every input path, so the host's work per
batch is one gather. The images are uint8, or for the trainer's host path (`preprocessed=True`)
float32: a split that fits is preprocessed once, at its first batch, by the steps' own jitted
function, so that ZCA (a 3072x3072 product per image) is not redone every step: see
PREPROCESS_AT_LOAD_MAX_BYTES.

Batches are pure functions of (config.seed, step): a resumed run sees exactly the batches that
the uninterrupted run would have seen, and the global batch does not depend on the number of
processes (each process takes its own rows of it). Every process holds the whole dataset; only
the batches are split. A folder too large for that (or whose training images are random crops)
is streamed instead (`streams`, `nin_jax.stream`): the same batches, from files read while the
net trains.

  data = create_data(config)
  for step, batch in zip(range(start, end), data.train_batches(start)):
    ...  # batch['image'] uint8 (B/P, H, W, C), 'label' int32 (B/P,), 'shifts', 'flips'
  for batch in data.eval_batches():
    ...  # 'image', 'label' and 'mask', False on the padding of the last batch
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import itertools
import os
import threading
import time
from typing import TYPE_CHECKING

from absl import logging
import jax
import numpy as np

from nin_jax import augment
from nin_jax import datasets
from nin_jax import preprocessing
from nin_jax import sampler
from nin_jax import settings
from nin_jax import sources
from nin_jax.errors import UserError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the accelerator hosts lack it
  import ml_collections

# The host path preprocesses a split whose float32 copy is at most this big once, when it draws
# its first batch (CIFAR-10 train: 0.6 GiB; SVHN train + extra, 7.4 GiB, stays uint8), with the
# steps' own jitted `preprocessing.normalize`. Why: GCN + ZCA is a 3072x3072 product per image,
# 19 ms per batch of 128 on two CPU cores; made in the step, the host path's batches came at
# 3,748 images/s (`nin_jax.benchmark input`, experiments/cifar10_aug.py), whitened once at
# 20,779 images/s.
PREPROCESS_AT_LOAD_MAX_BYTES = 2 * 2**30

# --- The batches --------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True, eq=False)  # arrays inside: compare fields explicitly
class Data(sampler.Sampler):
  """One dataset in memory, and the batches of one process.

  Attributes (beyond `Sampler`'s):
    num_classes: number of classes.
    class_names: sorted folder names, or TFDS label names (EMNIST: 0-9, A-Z, a-z).
    image_shape: (H, W, C) after conversion.
    preprocessor: the preprocessing fitted on the training split (save it with the run).
    train_images_uint8, test_images_uint8: uint8 (N, H, W, C), the images.
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
  _preprocessed: dict[str, np.ndarray] = dataclasses.field(init=False, repr=False,
                                                           default_factory=dict)
  _preprocessed_lock: threading.Lock = dataclasses.field(init=False, repr=False,
                                                         default_factory=threading.Lock)

  def __post_init__(self):
    super().__post_init__()
    if not 0 <= self.translate_pixels < min(self.image_shape[:2]):  # settings.validate's rule
      raise ValueError(f'translate_pixels={self.translate_pixels}: must be smaller than the '
                       f'images ({self.image_shape[0]}x{self.image_shape[1]})')

  @property
  def preprocesses_at_load(self) -> bool:
    """Whether `preprocessed=True` batches are preprocessed (float32): the training split's
    float32 copy fits in PREPROCESS_AT_LOAD_MAX_BYTES."""
    return self.train_images_uint8.size * 4 <= PREPROCESS_AT_LOAD_MAX_BYTES

  def _split(self, split: str, preprocessed: bool) -> np.ndarray:
    """The uint8 split, or with `preprocessed` (and `preprocesses_at_load`) the whole split
    preprocessed once, on first use, by `Preprocessor.__call__`: the steps' own jitted
    `preprocessing.normalize`. The train and eval prefetch threads may ask at once."""
    images = self.train_images_uint8 if split == 'train' else self.test_images_uint8
    if not (preprocessed and self.preprocesses_at_load):
      return images
    with self._preprocessed_lock:
      if split not in self._preprocessed:
        self._preprocessed[split] = self.preprocessor(images)
      return self._preprocessed[split]

  def train_images(self, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), H, W, C) training images, not preprocessed."""
    return self.train_images_uint8[rows]

  def test_images(self, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), H, W, C) test images, not preprocessed."""
    return self.test_images_uint8[rows]

  def test_examples(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`test_images(rows)` and their int32 labels."""
    return self.test_images(rows), self.test_labels[rows]

  def train_batch(self, step: int, *, preprocessed: bool = False) -> dict[str, np.ndarray]:
    """This process's share of the global training batch of `step` (see `train_draws`):
    {'image': uint8 (B/P, H, W, C), 'label': int32 (B/P,), 'shifts', 'flips'}; the step
    preprocesses (uint8 images only) and augments it (`device_input.train_batch`). With
    `preprocessed` the images are float32, preprocessed at load, where the split allows
    (`preprocesses_at_load`): the host path's batches."""
    draws = self.train_draws(step)
    rows = draws['rows']
    return {'image': self._split('train', preprocessed)[rows], 'label': self.train_labels[rows],
            'shifts': draws['shifts'], 'flips': draws['flips']}

  def train_batches(self, start_step: int = 0, *,
                    preprocessed: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Infinite; item k is `train_batch(start_step + k, preprocessed=preprocessed)`."""
    for step in itertools.count(start_step):
      yield self.train_batch(step, preprocessed=preprocessed)

  def eval_batches(self, *, preprocessed: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the test split: every example exactly once over all processes.

    Global batches of eval_batch_size in order; the last is padded with zero images whose
    'mask' is False. Process p yields rows [p*E/P, (p+1)*E/P) of each global batch:
    {'image': uint8 (float32 with `preprocessed`, as `train_batch`), 'label': int32,
    'mask': bool}.
    """
    for draws in self.eval_draws():
      rows, mask = draws['rows'], draws['mask']
      images = self._split('test', preprocessed)[rows]
      images[~mask] = 0
      labels = np.where(mask, self.test_labels[rows], 0).astype(np.int32)
      yield {'image': images, 'label': labels, 'mask': mask}


# --- Building a Data ----------------------------------------------------------------------------


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
  preprocessor = preprocessing.fit_or_load_preprocessor(config.preprocess, train_images, cache_dir, dataset)
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


def _train_examples(config: ml_collections.ConfigDict,
                    listing: datasets.FolderListing | None) -> int:
  """The training images of a listed folder, or of a TFDS dataset as catalogued."""
  if listing is not None:
    return len(listing.train_files)
  examples = settings.TFDS_EXAMPLES[config.dataset]
  return sum(examples[split] for split in datasets.tfds_splits(config)[0].split('+'))


def streams(config: ml_collections.ConfigDict, listing: datasets.FolderListing | None) -> bool:
  """Whether a dataset is streamed (`nin_jax.stream`) rather than decoded into memory: a listed
  folder (`listing`), or config's TFDS dataset (listing=None).

  input_pipeline='stream' always; 'auto' when its decoded training images would take more than
  stream_memory_fraction of the host's memory (estimated from the file count, or TFDS's
  catalogue, and the image size, before any is decoded), when augment='crop_flip' needs the
  files' full images, or when a TFDS dataset is resized (resize_size); logged.
  """
  if config.input_pipeline != 'auto':
    return config.input_pipeline == 'stream'
  count = _train_examples(config, listing)
  needed = count * config.image_size ** 2 * config.image_channels
  memory = host_memory_bytes()
  limit = config.stream_memory_fraction * memory
  crops = augment.crops(config.augment)
  resizes = listing is None and bool(config.resize_size)  # TFDS in memory is read at image_size
  chosen = needed > limit or crops or resizes
  logging.info('input_pipeline=auto: %s: the decoded training images (%d at %dx%dx%d, %.2f GiB) '
               '%s %.0f%% of this host\'s %.1f GiB of memory%s: %s',
               listing.root if listing else config.dataset, count, config.image_size,
               config.image_size, config.image_channels, needed / 2**30,
               'exceed' if needed > limit else 'fit in', 100 * config.stream_memory_fraction,
               memory / 2**30, ''.join(
                   ['; augment=crop_flip crops each image where it is decoded'] * crops
                   + ['; resize_size: only the stream resizes a TFDS dataset'] * resizes),
               'streaming them' if chosen else 'decoding them into memory')
  return chosen


def create_data(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                process_count: int | None = None) -> Data:
  """Loads config.dataset, fits the preprocessing, and returns this process's batches.

  A dataset that `streams` (and a packed folder, always) gives a `stream.StreamData`, which
  has the same interface.

  Args:
    config: see nin_jax/default_config.py (Data section and batch sizes), already checked
      (`settings.validate`).
    process_index, process_count: None: jax.process_index() / jax.process_count().

  Raises:
    UserError: a dataset that is not prepared, a bad image folder or file, or
      config.num_classes that disagrees with the data. Nothing is downloaded, ever.
  """
  start = time.time()
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  listing = None
  if config.dataset == 'folder':
    if sources.is_packed(config.data_dir):
      if config.input_pipeline in ('host', 'device'):
        raise UserError(f'config.input_pipeline={config.input_pipeline!r}: {config.data_dir} is '
                        'packed (nin_jax.pack), and packed folders are streamed: use '
                        'input_pipeline=auto or stream')
      return _stream(config, sources.packed_listing(config.data_dir), process_index,
                     process_count)
    listing = datasets.list_folder(config)
    _check_num_classes(config, listing.class_names)
  if streams(config, listing):
    return _stream(config, sources.stream_listing(config, listing), process_index,
                   process_count)
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


def _stream(config: ml_collections.ConfigDict, listing: sources.StreamListing,
            process_index: int, process_count: int):
  from nin_jax import stream  # pylint: disable=g-import-not-at-top  # it imports this module
  _check_num_classes(config, listing.class_names)
  return stream.create_stream_data(config, listing, process_index=process_index,
                                   process_count=process_count)


def _check_num_classes(config: ml_collections.ConfigDict, class_names: list[str]) -> None:
  if len(class_names) != config.num_classes:
    raise UserError(f'config.num_classes={config.num_classes} but {config.dataset} '
                    f'({config.data_dir or "TFDS default folder"}) has {len(class_names)} '
                    f'classes; set --config.num_classes={len(class_names)}')
