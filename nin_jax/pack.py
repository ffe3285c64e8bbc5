r"""Packs an image folder into ArrayRecord shards that the stream reads as it reads the folder.

  python -m nin_jax.pack data/imagenet data/imagenet_packed
  python -m nin_jax.main --config experiments/imagenet.py --workdir runs/imagenet \
      --config.data_dir=data/imagenet_packed

A folder of a million small files is slow to list and to open, above all on a bucket (a request
per file). Packed, it is a few hundred shards of about 100 MB and one index: the run lists
nothing, and opens each shard once per worker. ROOT may be in any of the folder dataset's
layouts (`datasets.list_folder`: ROOT/<class>/..., ROOT/train/ + ROOT/test/ or ROOT/val/); OUT,
like ROOT, may be a local folder or a bucket (gs://).

What is written (`nin_jax.sources` reads it):
  OUT/train-00000-of-00012.array_record ...  the training files, in the listing's order (class
                                              by class), `--records_per_shard` to a shard
  OUT/test-00000-of-00001.array_record ...   the test split (test/, val/ or the held-out share)
  OUT/nin_jax_pack.json                       the index, written last: class names, and per
                                              split its shards (records, bytes) and class counts
Each record is a msgpack map {'image': the file's bytes, unchanged; 'label'; 'name': its path
under ROOT}: no pickle, so reading a pack runs no code. The files are not decoded here, so a
packed folder gives the folder's batches exactly, and a file that is not a readable image is
skipped when the run meets it, as in the folder.

A killed pack leaves nothing that reads as a complete dataset: a shard takes its name only when
complete (written under a temporary name and renamed; on a bucket, uploaded whole), and the
index comes last. Run the same command again and it resumes, packing only the shards that are
missing (`nin_jax_pack_plan.json` records which files each shard holds, so a changed folder is
refused rather than mixed in).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import sys
import tempfile
import time
import types
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np

from nin_jax import datasets
from nin_jax import run_files
from nin_jax import sources
from nin_jax.errors import UserError

PLAN = 'nin_jax_pack_plan.json'  # the shards of an unfinished pack: see the module docstring
RECORDS_PER_SHARD = 1024  # ImageNet: 1,252 training shards of about 110 MB
_WRITER_OPTIONS = 'group_size:1,uncompressed'  # random access; JPEG bytes do not compress
_READ_THREADS = 8  # files read at once while packing a shard (bucket reads wait on the network)


def _shard_name(split: str, index: int, count: int) -> str:
  return f'{split}-{index:05d}-of-{count:05d}{sources.SHARD_SUFFIX}'


def plan(listing: datasets.FolderListing, records_per_shard: int) -> dict[str, Any]:
  """Which files go to which shard: the listing's order, cut every records_per_shard files."""
  root = run_files.path(listing.root)
  splits = {}
  for split, files, labels in (('train', listing.train_files, listing.train_labels),
                               ('test', listing.test_files, listing.test_labels)):
    count = -(-len(files) // records_per_shard)
    shards = []
    for i in range(count):
      rows = slice(i * records_per_shard, (i + 1) * records_per_shard)
      names = [os.fspath(run_files.path(f).relative_to(root)) for f in files[rows]]
      shards.append({'file': _shard_name(split, i, count), 'records': len(names),
                     'files_sha1': hashlib.sha1('\n'.join(names).encode()).hexdigest()})
    splits[split] = {'shards': shards, 'class_counts': np.bincount(
        labels, minlength=len(listing.class_names)).tolist()}
  return {'format': sources.PACK_FORMAT, 'class_names': list(listing.class_names),
          'test_split': listing.test_split, 'splits': splits}


def _write_shard(out: str, shard: dict[str, Any], files: Sequence[str], labels: np.ndarray,
                 root: str, on_file) -> int:
  """Packs `files` into OUT/shard['file'], whole or not at all; returns its size in bytes."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import msgpack  # pylint: disable=g-import-not-at-top
  target = run_files.path(out) / shard['file']
  local = run_files.is_local(out)
  if local:
    tmp = os.fspath(run_files.temporary_name(target))
  else:  # written here, then uploaded
    with tempfile.NamedTemporaryFile(suffix=sources.SHARD_SUFFIX, delete=False) as f:
      tmp = f.name
  root_path = run_files.path(root)

  def read(path):
    try:
      return datasets.read_bytes(path)
    except FileNotFoundError:
      raise UserError(f'{path}: no such file (the folder changed while it was packed); '
                      'run the pack again') from None

  try:
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
      for path, label, data in zip(files, labels.tolist(), pool.map(read, files)):
        writer.write(msgpack.packb({
            'image': data, 'label': label,
            'name': os.fspath(run_files.path(path).relative_to(root_path))}))
        on_file()
    writer.close()
    size = os.path.getsize(tmp)
    if local:
      os.replace(tmp, target)
    else:  # an upload appears whole when it completes
      target.write_bytes(run_files.path(tmp).read_bytes())
    return size
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def pack(root: str, out: str, *, records_per_shard: int = RECORDS_PER_SHARD,
         test_fraction: float = 0.1, workers: int = 4, progress: bool = True) -> dict[str, Any]:
  """Packs the image folder `root` into `out` (see the module docstring); returns the index.

  Raises:
    UserError: a bad folder (as the folder dataset says it), `out` already holding another
      dataset or another folder's unfinished pack, or a file that vanished while packing.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  if records_per_shard < 1:
    raise UserError(f'--records_per_shard={records_per_shard}: must be at least 1')
  listing = datasets.list_folder(types.SimpleNamespace(data_dir=root,
                                                       test_fraction=test_fraction))
  wanted = plan(listing, records_per_shard)
  out_path = run_files.path(out)
  index_path, plan_path = out_path / sources.PACK_INDEX, out_path / PLAN
  if index_path.exists():
    index = sources.read_pack_index(out)
    if _strip(index) != _strip(wanted):
      raise UserError(f'{out} is already a packed folder, of other files; choose another OUT')
    return index  # packed already
  if plan_path.exists():
    if run_files.read_json(plan_path) != wanted:
      raise UserError(f'{out} holds an unfinished pack of other files (or of {root} as it was '
                      f'before it changed); delete {out} or choose another OUT')
    for leftover in out_path.iterdir():  # a shard being written when the pack was killed
      if leftover.name.endswith('.tmp'):
        leftover.unlink()
  elif out_path.exists() and any(out_path.iterdir()):
    raise UserError(f'{out} exists and is not empty; choose a new folder for the pack')
  out_path.mkdir(parents=True, exist_ok=True)
  run_files.write_json_atomic(plan_path, wanted)

  jobs = []  # the shards to write: those that exist are complete
  for split, files, labels in (('train', listing.train_files, listing.train_labels),
                               ('test', listing.test_files, listing.test_labels)):
    for i, shard in enumerate(wanted['splits'][split]['shards']):
      rows = slice(i * records_per_shard, (i + 1) * records_per_shard)  # as `plan` cut them
      if not (out_path / shard['file']).exists():
        jobs.append((shard, files[rows], labels[rows]))
  total = len(listing.train_files) + len(listing.test_files)
  done = total - sum(len(files) for _, files, _ in jobs)
  with tqdm(total=total, initial=done, unit='file', desc=f'packing {root}', disable=not progress,
            file=sys.stderr, smoothing=0.05) as bar:
    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
      futures = [pool.submit(_write_shard, out, shard, files, labels, root,
                             lambda: bar.update(1)) for shard, files, labels in jobs]
      for future in futures:
        future.result()

  index = dict(wanted, splits={}, source=os.fspath(root))
  for split, entry in wanted['splits'].items():
    shards = [dict(s, bytes=(out_path / s['file']).stat().length) for s in entry['shards']]
    index['splits'][split] = {'shards': shards, 'class_counts': entry['class_counts']}
  run_files.write_json_atomic(index_path, index)
  plan_path.unlink()
  return index


def _strip(index: dict[str, Any]) -> Any:
  """What identifies a pack's content: its classes, test split and the files of each shard."""
  return (index['class_names'], index['test_split'],
          {split: ([(s['file'], s['records'], s['files_sha1']) for s in entry['shards']],
                   entry['class_counts'])
           for split, entry in index['splits'].items()})


# --- Command line -------------------------------------------------------------------------------


def _define_flags() -> None:
  flags.DEFINE_integer('records_per_shard', RECORDS_PER_SHARD, 'Files per shard.')
  flags.DEFINE_float('test_fraction', 0.1, 'ROOT/<class>/ layout: the held-out share of each '
                     'class (as config.test_fraction).')
  flags.DEFINE_integer('workers', 4, 'Shards packed at once.')


def main(argv: Sequence[str]) -> None:
  if len(argv) != 3:
    raise app.UsageError('usage: python -m nin_jax.pack ROOT OUT [--records_per_shard=N]')
  root, out = argv[1], argv[2]
  start = time.perf_counter()
  try:
    index = pack(root, out, records_per_shard=flags.FLAGS.records_per_shard,
                 test_fraction=flags.FLAGS.test_fraction, workers=flags.FLAGS.workers)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  counts = {split: sum(s['records'] for s in entry['shards'])
            for split, entry in index['splits'].items()}
  shards = sum(len(entry['shards']) for entry in index['splits'].values())
  print(f'packed {counts["train"]} train and {counts["test"]} test ({index["test_split"]}) '
        f'files of {len(index["class_names"])} classes into {shards} shards in {out} '
        f'in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
