"""Where the stream reads its images: random-access sources of encoded images and their labels.

A source is a split of a dataset as a sequence of examples: `len(source)` of them, and
`source.read(row)` gives example `row` as (the image file's bytes, its label), in any order, from
any process. Three kinds:

  FileSource    a folder's files (`datasets.list_folder`): row i is file i, labelled by its folder
  PackedSource  a folder packed by `python -m nin_jax.pack` into ArrayRecord shards (`PACK_INDEX`)
  TfdsSource    a TFDS dataset prepared as ArrayRecord, read by `tfds.data_source`

Each reads a local disk or a bucket (gs://) alike: files through etils epath, ArrayRecord shards
through ArrayRecord's own reader, which opens gs:// itself. None imports TensorFlow.

The bytes are decoded by `datasets.decode_image`, whatever the source: a folder, its packed
shards and a TFDS dataset made of the same files give the same batches (tests/sources_test.py).

  listing = stream_listing(config)       # class names, and a source per split
  image_bytes, label = listing.train.read(row)
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import os
import threading
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from nin_jax import datasets
from nin_jax import run_files
from nin_jax.errors import UserError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the accelerator hosts lack it
  import ml_collections

# --- The packed format (written by nin_jax.pack) ------------------------------------------------
# OUT/PACK_INDEX, written last: the pack's class names and, per split, its shards (file name,
# records, bytes) and its examples per class. Shards hold the examples of a split in the folder
# listing's order (class by class), one msgpack map per record: {'image': the file's bytes,
# 'label': int, 'name': the file's path under the packed folder}. msgpack, not pickle: reading a
# record runs no code.
PACK_INDEX = 'nin_jax_pack.json'
PACK_FORMAT = 'nin_jax.pack/1'
SHARD_SUFFIX = '.array_record'
# Random access: no read-ahead (ArrayRecord's advice for random reads).
_READER_OPTIONS = 'readahead_buffer_size:0'
_STAT_THREADS = 16  # shards checked at once at the start (a stat is a request on a bucket)


class Source(Protocol):
  """What the stream reads: see the module docstring."""

  def __len__(self) -> int: ...
  def read(self, row: int) -> tuple[bytes, int]: ...
  def name(self, row: int) -> str: ...


@dataclasses.dataclass(frozen=True, eq=False)
class FileSource:
  """Encoded images, one file per row, labelled by the listing."""
  files: tuple[str, ...]
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.files)

  def read(self, row: int) -> tuple[bytes, int]:
    return datasets.read_bytes(self.files[row]), int(self.labels[row])

  def name(self, row: int) -> str:
    return self.files[row]


class _Readers:
  """One ArrayRecordReader per shard and thread, opened when first read; never pickled (each
  worker process opens its own)."""

  def __init__(self):
    self._local = threading.local()

  def __getstate__(self):
    return {}

  def __setstate__(self, state):
    del state
    self._local = threading.local()

  def get(self, path: str, records: int):
    readers = self._local.__dict__.setdefault('readers', {})
    reader = readers.get(path)
    if reader is None:
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      try:
        reader = array_record_module.ArrayRecordReader(path, _READER_OPTIONS)
      except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f'{path}: not a readable shard ({str(e).splitlines()[0]}); '
                        'pack the folder again') from None
      if reader.num_records() != records:
        raise UserError(f'{path}: {reader.num_records()} records where the pack wrote '
                        f'{records}: a truncated or changed shard; pack the folder again')
      readers[path] = reader
    return reader


@dataclasses.dataclass(frozen=True, eq=False)
class PackedSource:
  """A split of a packed folder: its shards, in order, as one sequence of records."""
  shards: tuple[str, ...]
  records: tuple[int, ...]  # per shard
  labels: np.ndarray
  _starts: tuple[int, ...] = dataclasses.field(init=False, repr=False)
  _readers: _Readers = dataclasses.field(init=False, repr=False, default_factory=_Readers)

  def __post_init__(self):
    object.__setattr__(self, '_starts', tuple(np.cumsum((0,) + self.records)[:-1].tolist()))

  def __len__(self) -> int:
    return int(sum(self.records))

  def _locate(self, row: int) -> tuple[int, int]:
    shard = bisect.bisect_right(self._starts, row) - 1
    return shard, row - self._starts[shard]

  def _record(self, row: int) -> dict[str, Any]:
    import msgpack  # pylint: disable=g-import-not-at-top
    shard, position = self._locate(row)
    reader = self._readers.get(self.shards[shard], self.records[shard])
    return msgpack.unpackb(reader.read([position])[0], raw=False)

  def read(self, row: int) -> tuple[bytes, int]:
    record = self._record(row)
    return record['image'], int(record['label'])

  def name(self, row: int) -> str:
    """'SHARD record K (the packed file's path)'."""
    shard, position = self._locate(row)
    try:
      packed = f' ({self._record(row)["name"]})'
    except Exception:  # pylint: disable=broad-except  # only naming it: the read says what failed
      packed = ''
    return f'{self.shards[shard]} record {position}{packed}'


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsSource:
  """A split of a TFDS dataset prepared as ArrayRecord, its images left encoded."""
  dataset: str
  split: str
  data_source: Any = dataclasses.field(repr=False)  # tfds.data_source(...)

  def __len__(self) -> int:
    return len(self.data_source)

  def read(self, row: int) -> tuple[bytes, int]:
    example = self.data_source[row]
    return example['image'], int(example['label'])

  def name(self, row: int) -> str:
    return f'{self.dataset} {self.split} example {row}'


@dataclasses.dataclass(frozen=True, eq=False)
class StreamListing:
  """A dataset as the stream reads it, before any image is decoded.

  Attributes:
    root: where it is (config.data_dir, or TFDS's folder).
    description: what it is, for the logs: 'ROOT', 'ROOT (packed)' or 'cifar10 (TFDS)'.
    class_names: label i is class_names[i].
    train, test: the splits.
    test_split: where the test split comes from ('val/', 'held out', 'test', ...).
    cache_dir: where fitted preprocessing statistics are kept.
    transpose: the images are stored transposed (TFDS's EMNIST).
  """
  root: str
  description: str
  class_names: list[str]
  train: Source
  test: Source
  test_split: str
  cache_dir: str
  transpose: bool = False


def is_packed(root: str) -> bool:
  """Whether `root` is a packed folder (`python -m nin_jax.pack`) rather than an image folder.

  Raises:
    UserError: `root` holds shards but no index: a pack that did not finish.
  """
  root_path = run_files.path(root)
  if (root_path / PACK_INDEX).exists():
    return True
  if root_path.is_dir() and any(p.name.endswith(SHARD_SUFFIX) for p in root_path.iterdir()):
    raise UserError(f'{root} holds {SHARD_SUFFIX} shards but no {PACK_INDEX}: a pack that did '
                    'not finish; run the same `python -m nin_jax.pack SRC OUT` again to finish it')
  return False


def read_pack_index(root: str) -> dict[str, Any]:
  """The index of a packed folder, checked for its format."""
  path = os.path.join(root, PACK_INDEX)
  try:
    index = run_files.read_json(path)
  except ValueError as e:
    raise UserError(f'{path}: not a pack index ({e}); pack the folder again') from None
  if not isinstance(index, dict) or index.get('format') != PACK_FORMAT:
    raise UserError(f'{path}: not a {PACK_FORMAT} index; pack the folder again with this '
                    'version of nin_jax')
  return index


def _check_shards(paths: list[str], sizes: list[int]) -> None:
  """Every shard is there with the size the pack wrote (a cut download or copy is not)."""
  def problem(path, size):
    try:
      actual = run_files.path(path).stat().length
    except FileNotFoundError:
      return f'{path}: missing; copy it again, or pack the folder again'
    if actual != size:
      return (f'{path}: {actual} bytes where the pack wrote {size}: a truncated or changed '
              'shard; copy it again, or pack the folder again')
    return None
  with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:
    problems = [p for p in pool.map(problem, paths, sizes) if p]
  if problems:
    more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
    raise UserError(problems[0] + more)


def packed_listing(root: str) -> StreamListing:
  """A packed folder's splits, its shards checked against its index."""
  index = read_pack_index(root)
  class_names = list(index['class_names'])
  splits = {}
  for split in ('train', 'test'):
    entry = index['splits'][split]
    paths = [os.path.join(root, shard['file']) for shard in entry['shards']]
    _check_shards(paths, [shard['bytes'] for shard in entry['shards']])
    labels = np.repeat(np.arange(len(class_names), dtype=np.int32), entry['class_counts'])
    splits[split] = PackedSource(tuple(paths), tuple(s['records'] for s in entry['shards']),
                                 labels)
    if len(splits[split]) != len(labels):
      raise UserError(f'{os.path.join(root, PACK_INDEX)}: its {split} shards hold '
                      f'{len(splits[split])} records and its class counts {len(labels)}; '
                      'pack the folder again')
  return StreamListing(root=root, description=f'{root} (packed)', class_names=class_names,
                       train=splits['train'], test=splits['test'],
                       test_split=index['test_split'],
                       cache_dir=os.path.join(root, datasets.CACHE_FOLDER))


def folder_listing(listing: datasets.FolderListing) -> StreamListing:
  """A listed image folder's splits."""
  return StreamListing(
      root=listing.root, description=listing.root, class_names=list(listing.class_names),
      train=FileSource(tuple(listing.train_files), listing.train_labels),
      test=FileSource(tuple(listing.test_files), listing.test_labels),
      test_split=listing.test_split,
      cache_dir=os.path.join(listing.root, datasets.CACHE_FOLDER))


def tfds_listing(config: ml_collections.ConfigDict) -> StreamListing:
  """A TFDS dataset's splits, read from its ArrayRecord files by `tfds.data_source`.

  Raises:
    UserError: the dataset is not prepared, or prepared as TFRecord only (with the command that
      converts it).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # no TensorFlow
  name = config.dataset
  root, builder = datasets.tfds_builder(config)
  splits = {}
  for key, split in zip(('train', 'test'), datasets.tfds_splits(config)):
    try:
      source = builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})
    except NotImplementedError:  # not prepared, or prepared as TFRecord
      if not builder.is_prepared():
        raise UserError(datasets.tfds_not_prepared(name, root)) from None
      raise UserError(
          f'{name} in {builder.data_dir} is prepared as TFRecord files, and streaming reads '
          'ArrayRecord: convert it once with `tfds convert_format --dataset_version_dir='
          f'{builder.data_dir} --out_file_format=array_record` (or prepare it with '
          "file_format='array_record'), or use input_pipeline=auto to read it into memory"
          ) from None
    except (AssertionError, ValueError, FileNotFoundError):  # not prepared
      raise UserError(datasets.tfds_not_prepared(name, root)) from None
    splits[key] = TfdsSource(name, split, source)
  return StreamListing(
      root=root, description=f'{name} (TFDS, {root})',
      class_names=datasets.tfds_class_names(config, builder.info.features['label']),
      train=splits['train'], test=splits['test'], test_split=datasets.tfds_splits(config)[1],
      cache_dir=os.path.join(root, datasets.CACHE_FOLDER),
      transpose=name == 'emnist/byclass')


def stream_listing(config: ml_collections.ConfigDict,
                   listing: datasets.FolderListing | None = None) -> StreamListing:
  """config's dataset as the stream reads it: a packed folder, an image folder (`listing`, if
  already listed) or a TFDS dataset."""
  if config.dataset != 'folder':
    return tfds_listing(config)
  if listing is None and is_packed(config.data_dir):
    return packed_listing(config.data_dir)
  return folder_listing(listing or datasets.list_folder(config))
