"""The streaming input path: a folder of any size, read and decoded while the net trains (Grain).

The in-memory path (`input_pipeline.Data`) decodes every image before step 1; this one reads a
source (`nin_jax.sources`: a folder's files, the shards of a packed folder, or a TFDS dataset
prepared as ArrayRecord) and keeps only how to reach its examples. Its batches are the same
pure functions of (seed, step), `Sampler.train_draws`, turned into images in two stages:

  step --[workers: Grain MapDataset]--> this process's rows and crops of the batch, their files
       read, decoded, resized and cropped: uint8 (B/P, S, S, C)
       --[the train step, on the devices]--> preprocessed float32, translated and mirrored

What varies per image and costs the most (reading, decoding, resizing, cropping) runs on uint8
in `stream_workers` processes; what follows (normalization, shifts and flips) is every input
path's own code, inside the jitted step (`nin_jax.device_input`). Element k of the stream is the batch of step start + k whatever the worker
count, so a resumed run starts its stream at the checkpoint's step and saves no iterator state;
a folder that fits in memory gives the in-memory path's batches exactly (tests/stream_test.py).
With several processes each reads only its own rows of each global batch.

A source is anything random-access that yields encoded images and their labels
(`sources.Source`); the decoding is `datasets.decode_image`, the in-memory path's.

Bad files: a file that cannot be read or decoded (truncated, not an image, deleted) is never
fatal. In a training batch it is replaced by the next readable image of the same batch (with
its label), in an evaluation batch it is masked out; each such file is logged once and counted
in results.json (`skipped_files`). Only a batch with no readable image at all stops the run.

  data = create_stream_data(config, sources.stream_listing(config))
  for batch in data.train_batches(start_step): ...  # as input_pipeline.Data's
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import functools
import multiprocessing
import os
import threading
import time
from typing import TYPE_CHECKING

from absl import logging
import numpy as np

from nin_jax import datasets
from nin_jax import preprocessing
from nin_jax import sampler
from nin_jax import sources
from nin_jax.errors import UserError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the accelerator hosts lack it
  import ml_collections

# The preprocessing is fitted on at most this many training images (centre crops), drawn with
# the run's seed, and on at most FIT_MAX_BYTES of them decoded (445 ImageNet crops of 224 x 224:
# per-channel statistics need no more); a folder within both is fitted on all of it, as in memory.
FIT_IMAGES = 2048
FIT_MAX_BYTES = 64 * 2**20
# Most worker processes 'auto' (stream_workers=-1) starts; it starts one per core but one.
MAX_AUTO_WORKERS = 16
# Batches each worker prepares ahead of the one being trained on.
WORKER_BUFFER = 2
# Arrays from the workers at least this large come through shared memory (the images), smaller
# ones (labels, draws) pickled with their batch.
SHARED_MEMORY_MIN_BYTES = 2**16
_FIT_STREAM = 3  # a random stream of its own (sampler uses 0 and 1, train.init_images 2)


# --- In the workers: rows to uint8 images ------------------------------------------------------

_in_worker = False  # set in each worker process (`_worker_init`)
_MADV_POPULATE_WRITE = 23  # Linux's madvise advice; Python's mmap module names it from 3.14


def _new_images(count: int, shape: tuple[int, int, int]) -> np.ndarray:
  """A zeroed uint8 (count, *shape) batch of images; in a worker, in shared memory.

  A worker decodes straight into the block the trainer reads the batch from (Grain passes a
  SharedMemoryArray on by its name), so no batch is copied between decoding and the devices:
  a batch of 64 224-px images is 9.6 MB, copied twice per batch otherwise (into a block, and
  out of it in the trainer).
  """
  if _in_worker and count:
    images = _shared_array_type()((count, *shape), np.uint8)  # zeroed, as a new file is
    _unsent[images.shm.name] = images.shm
    try:  # its pages, allocated in one call rather than one fault each (Linux 5.14+)
      images.shm._mmap.madvise(_MADV_POPULATE_WRITE)  # pylint: disable=protected-access
    except (AttributeError, OSError, ValueError):
      pass
    return images
  return _zeros(count, shape)


def _zeros(count: int, shape: tuple[int, int, int]) -> np.ndarray:
  return np.zeros((count, *shape), np.uint8)


# A worker's blocks that Grain has not yet passed on: a worker stopped with batches in its
# buffers unlinks theirs as it exits (`_unlink_unsent`), as Grain does for the blocks it makes.
_unsent = {}


@functools.cache
def _shared_array_type():
  """Grain's SharedMemoryArray, noting when Grain passes one on (by its metadata)."""
  from grain import multiprocessing as grain_mp  # pylint: disable=g-import-not-at-top

  class SharedImages(grain_mp.SharedMemoryArray):

    @property
    def metadata(self):
      _unsent.pop(self.shm.name, None)
      return super().metadata

  return SharedImages


def _unlink_unsent() -> None:
  for shm in list(_unsent.values()):
    try:
      shm.unlink()
    except FileNotFoundError:
      pass
  _unsent.clear()


@dataclasses.dataclass(frozen=True)
class Decoder:
  """`datasets.decode_image` with a run's sizes bound (and TFDS's EMNIST transposed back)."""
  image_size: int
  channels: int
  resize_size: int = 0
  transpose: bool = False

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)


def read_rows(source: sources.Source, decoder: Decoder, rows: np.ndarray,
              crops: np.ndarray | None = None, *, shared: bool = False
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
  """Decodes `rows` of `source`, cropped at `crops` ((n, 2) in [0, 1); None: centred), into
  shared memory in a worker if `shared` (`_new_images`).

  Returns:
    (uint8 (n, S, S, C), zero where unreadable; int32 (n,) their labels, 0 where unreadable;
    bool (n,) which rows were readable; one line per unreadable example, naming it).

  Raises:
    UserError: a source that cannot be read at all (a truncated shard), naming it.
  """
  images = (_new_images if shared else _zeros)(len(rows), decoder.shape)
  labels = np.zeros(len(rows), np.int32)
  readable = np.zeros(len(rows), bool)
  bad = []
  with datasets.strict_decoding():
    for i, row in enumerate(rows.tolist()):
      try:
        data, labels[i] = source.read(row)
        image = datasets.decode_image(
            data, decoder.image_size, decoder.channels, resize_size=decoder.resize_size,
            crop=None if crops is None else tuple(crops[i]))
        images[i] = image.transpose(1, 0, 2) if decoder.transpose else image
        readable[i] = True
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad data
        bad.append(datasets.bad_image_message(source.name(row), e))
  return images, labels, readable, bad


@dataclasses.dataclass(frozen=True, eq=False)
class _SplitBatches:
  """What a worker needs to make one split's batches: pickled to each worker once."""
  sampler: sampler.Sampler
  source: sources.Source
  decoder: Decoder


class TrainBatch(_SplitBatches):
  """step -> this process's share of that step's training batch, uint8, before preprocessing.

  {'image': uint8 (B/P, S, S, C), 'label': int32 (B/P,), 'shifts', 'flips' (the draws the
  train step applies after preprocessing), 'skipped': the unreadable files' lines}.
  """

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    draws = self.sampler.train_draws(step)
    rows = draws['rows']
    images, labels, readable, bad = read_rows(self.source, self.decoder, rows,
                                              draws.get('crops'), shared=True)
    if not readable.any():
      raise UserError(f'step {step}: not one of the {len(rows)} images of this batch is '
                      f'readable ({bad[0]}); is the folder still there?')
    if not readable.all():  # each bad image gives way to the batch's next readable one
      good = np.flatnonzero(readable)
      for i in np.flatnonzero(~readable):
        j = good[np.searchsorted(good, i) % len(good)]
        images[i], labels[i] = images[j], labels[j]
    return {'image': images, 'label': labels, 'shifts': draws['shifts'],
            'flips': draws['flips'], 'skipped': np.array(bad, dtype=str)}


class EvalBatch(_SplitBatches):
  """j -> this process's share of evaluation batch j, uint8, unreadable images masked out."""

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    draws = self.sampler.eval_draw(j)
    mask = draws['mask'].copy()
    images = _new_images(len(mask), self.decoder.shape)
    labels = np.zeros(len(mask), np.int32)
    images[mask], labels[mask], readable, bad = read_rows(self.source, self.decoder,
                                                          draws['rows'][mask])
    mask[np.flatnonzero(mask)[~readable]] = False
    labels[~mask] = 0
    return {'image': images, 'label': labels, 'mask': mask, 'skipped': np.array(bad, dtype=str)}


def _worker_init(worker_index: int, worker_count: int) -> None:
  """Runs first in each worker.

  A worker decodes on the CPU and must never take an accelerator (a worker that initialised
  one held ~500 MB of GPU memory in Grain's issues 820 and 1199). And it ends with its trainer:
  Grain's workers outlive a trainer killed with SIGKILL (they wait on its queue forever), so a
  thread here waits for the parent's end and exits then.
  """
  del worker_index, worker_count
  global _in_worker
  _in_worker = True
  from multiprocessing import util  # pylint: disable=g-import-not-at-top
  util.Finalize(None, _unlink_unsent, exitpriority=10)  # at the worker's exit
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax  # pylint: disable=g-import-not-at-top  # Grain imports it; no backend has started
  jax.config.update('jax_platforms', 'cpu')
  parent = multiprocessing.parent_process()
  if parent is not None:
    def exit_with_parent():
      parent.join()  # returns when the parent process has ended, however it ended
      os._exit(1)  # pylint: disable=protected-access
    threading.Thread(target=exit_with_parent, daemon=True).start()


def worker_count(setting: int) -> int:
  """config.stream_workers, with -1 (auto) as one worker per core but one (at least one)."""
  if setting >= 0:
    return setting
  return max(1, min(len(os.sched_getaffinity(0)) - 1, MAX_AUTO_WORKERS))


def _owned(array: np.ndarray) -> np.ndarray:
  """A worker's array as the trainer's own, not copied: a shared-memory block's name is
  released now (Grain would release it from a thread, later, and may not before the trainer
  exits); the block stays mapped until the array is freed, and then goes."""
  shm = getattr(array, 'shm', None)
  if shm is None:
    return array
  array._unlink_on_del = False  # pylint: disable=protected-access  # released here, once
  shm.unlink()
  return array


def stream(dataset, workers: int, threads: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Iterates a Grain MapDataset with `workers` processes (0: `threads` threads in this process,
  the decoders releasing the GIL), in order, and stops its workers when the loop ends, however
  it ends."""
  import grain  # pylint: disable=g-import-not-at-top  # only runs that stream pay its import
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # a library caller: Grain reads its absl flags (defaults here)
    flags.FLAGS.mark_as_parsed()
  if workers:
    iterable = grain.experimental.WithOptionsIterDataset(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)),
        grain.experimental.DatasetOptions(min_shm_size=SHARED_MEMORY_MIN_BYTES)).mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers,
                                         per_worker_buffer_size=WORKER_BUFFER),
            worker_init_fn=_worker_init)
  else:
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=threads))
  iterator = iter(iterable)
  try:
    for element in iterator:
      yield {key: _owned(value) for key, value in element.items()}
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()


# --- In the trainer: the streamed Data --------------------------------------------------------


@dataclasses.dataclass(kw_only=True, eq=False)
class StreamData(sampler.Sampler):
  """A dataset's batches, streamed: the interface of `input_pipeline.Data` without its arrays.

  Attributes (beyond `Sampler`'s):
    num_classes, class_names, image_shape, preprocessor: as `Data`'s.
    train_source, test_source: the examples of each split (`nin_jax.sources`).
    decoder: the run's image sizes.
    workers: worker processes (0: decoded on `threads` threads of the trainer).
    skipped_files: the unreadable files met so far (each once), in the order met.
  """
  num_classes: int
  class_names: list[str]
  image_shape: tuple[int, int, int]
  preprocessor: preprocessing.Preprocessor
  train_source: sources.Source = dataclasses.field(repr=False)
  test_source: sources.Source = dataclasses.field(repr=False)
  decoder: Decoder
  workers: int = 0
  threads: int = 2
  skipped_files: list[str] = dataclasses.field(default_factory=list)
  streamed = True
  _skipped_lock: threading.Lock = dataclasses.field(init=False, repr=False,
                                                    default_factory=threading.Lock)
  _skipped_seen: set[str] = dataclasses.field(init=False, repr=False, default_factory=set)

  def _note_skipped(self, lines) -> None:
    with self._skipped_lock:
      for line in lines:
        if line not in self._skipped_seen:
          self._skipped_seen.add(line)
          self.skipped_files.append(line)
          logging.warning('Skipping %s (%d unreadable file(s) so far)', line,
                          len(self.skipped_files))

  def _examples(self, source: sources.Source, rows: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    images, labels, _, bad = read_rows(source, self.decoder, np.asarray(rows))
    self._note_skipped(bad)
    return images, labels

  def train_images(self, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), S, S, C) centre crops of training images (black where unreadable)."""
    return self._examples(self.train_source, rows)[0]

  def test_images(self, rows: np.ndarray) -> np.ndarray:
    """uint8 (len(rows), S, S, C) test images as evaluated (black where unreadable)."""
    return self._examples(self.test_source, rows)[0]

  def test_examples(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`test_images(rows)` and their int32 labels (0 where unreadable)."""
    return self._examples(self.test_source, rows)

  def train_batches(self, start_step: int = 0, *,
                    preprocessed: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Infinite; item k is the training batch of step start_step + k, as `Data.train_batch`
    (uint8 whatever `preprocessed` asks: a stream is preprocessed in the step)."""
    del preprocessed
    import grain  # pylint: disable=g-import-not-at-top
    steps = grain.MapDataset.range(start_step, 2**62)
    batches = steps.map(TrainBatch(self.sampler(), self.train_source, self.decoder))
    for batch in stream(batches, self.workers, self.threads):
      self._note_skipped(batch.pop('skipped').tolist())
      yield batch

  def eval_batches(self, *, preprocessed: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the test split, as `Data.eval_batches` (unreadable images masked out;
    uint8 whatever `preprocessed` asks)."""
    del preprocessed
    import grain  # pylint: disable=g-import-not-at-top
    batches = grain.MapDataset.range(self.num_eval_batches).map(
        EvalBatch(self.sampler(), self.test_source, self.decoder))
    for batch in stream(batches, self.workers, self.threads):
      self._note_skipped(batch.pop('skipped').tolist())
      yield batch


def decoded_bytes(config: ml_collections.ConfigDict, num_images: int) -> int:
  """What `num_images` training images take decoded in memory, as uint8 at image_size."""
  return num_images * config.image_size ** 2 * config.image_channels


def create_stream_data(config: ml_collections.ConfigDict, listing: sources.StreamListing, *,
                       process_index: int, process_count: int) -> StreamData:
  """The streamed batches of a dataset; fits the preprocessing on a sample of it."""
  start = time.time()
  decoder = Decoder(config.image_size, config.image_channels, config.resize_size,
                    listing.transpose)
  fit_images, skipped = _read_for_fit(listing.train, decoder, config.seed)
  preprocessor = preprocessing.fit_or_load_preprocessor(
      config.preprocess, fit_images, listing.cache_dir, config.dataset)
  data = StreamData(
      num_classes=len(listing.class_names), class_names=list(listing.class_names),
      image_shape=decoder.shape, preprocessor=preprocessor,
      num_train_examples=len(listing.train), num_test_examples=len(listing.test),
      batch_size=int(config.batch_size), eval_batch_size=int(config.eval_batch_size),
      seed=int(config.seed) % 2**63, augment=config.augment,
      translate_pixels=int(config.translate_pixels), process_index=process_index,
      process_count=process_count, train_source=listing.train, test_source=listing.test,
      decoder=decoder, workers=worker_count(config.stream_workers),
      threads=int(config.stream_threads))
  data._note_skipped(skipped)  # pylint: disable=protected-access
  logging.info('%s: streaming %d train, %d test (%s) images, %d classes, with %d worker '
               'process(es); %s fitted on %d of them; ready in %.1f s', listing.description,
               data.num_train_examples, data.num_test_examples, listing.test_split,
               data.num_classes, data.workers, config.preprocess, len(fit_images),
               time.time() - start)
  return data


def _read_for_fit(source: sources.Source, decoder: Decoder, seed: int
                  ) -> tuple[np.ndarray, list[str]]:
  """The readable centre crops of a sample of the training images (see FIT_IMAGES; all of a
  small folder, in order, as the in-memory path fits on), decoded on a few threads; and the
  unreadable files' lines."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  rows = np.arange(len(source))
  count = min(FIT_IMAGES, max(1, FIT_MAX_BYTES // int(np.prod(decoder.shape))))
  if len(rows) > count:
    rows = np.sort(np.random.default_rng([seed, _FIT_STREAM]).choice(
        len(rows), count, replace=False))
  chunks = np.array_split(rows, max(1, len(rows) // 64))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda chunk: read_rows(source, decoder, chunk), chunks))
  images = np.concatenate([images[readable] for images, _, readable, _ in results])
  if not len(images):
    raise UserError(f'{source.name(0)}: not one of the {len(rows)} training images read to fit '
                    'the preprocessing is readable')
  return images, [line for *_, bad in results for line in bad]
