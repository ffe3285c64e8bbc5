"""The files of a run folder (WORKDIR): what `nin_jax.train` writes, and inference, plot and
report read; and the one path abstraction every file of a run goes through.

Paths are etils `epath` paths, so a workdir, a data_dir or a predict input may be local or on
a bucket (`gs://`, `s3://`; epath uses TensorFlow's gfile for them where TensorFlow is
installed, else fsspec's gcsfs / s3fs). Orbax writes the checkpoints' arrays itself (through
tensorstore), to the same places.

Only process 0 writes the run files. Each whole file appears whole or not at all
(`write_bytes_atomic`: locally a temporary name renamed, on a bucket one upload), so a crash
never leaves one half-written; `METRICS` and the TensorBoard events grow record by record instead
(`AppendFile`). No JAX: the readers need none. tests/storage_test.py runs, kills and resumes a
run whose workdir and data are on a gs:// bucket served offline by fake-gcs-server.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

from etils import epath

CONFIG = 'config.json'               # every field of the run's config, as JSON
CLASS_NAMES = 'class_names.json'     # the class names in label order (a JSON list)
PREPROCESSING = 'preprocessing.npz'  # the preprocessing fitted on the training split
CHECKPOINTS = 'checkpoints'          # Orbax CheckpointManager folder: one subfolder per step
METRICS = 'metrics.jsonl'            # one JSON object per record: 'step' and train or test metrics
RESULTS = 'results.json'             # written when training ends: test metrics, speed, run facts
EVENTS_PREFIX = 'events.out.tfevents.'  # TensorBoard's event files, in the run folder itself

_URL = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an epath.Path: a local path or a URL such as gs://bucket/folder."""
  return epath.Path(p)


def is_local(p: str | os.PathLike) -> bool:
  """Whether `p` is on this machine's file system (not a gs://, s3://, ... URL)."""
  return not _URL.match(os.fspath(p))


def absolute(p: str | os.PathLike) -> str:
  """`p` made absolute where it is local (Orbax wants absolute paths); URLs as they are."""
  return os.path.abspath(p) if is_local(p) else os.fspath(p)


def walk(top: str | os.PathLike):
  """`epath.Path.walk`, whose folders keep their URL scheme (fsspec's walk drops it)."""
  top = path(top)
  scheme = _URL.match(os.fspath(top))
  for root, folders, files in top.walk():
    root = os.fspath(root)
    if scheme and not _URL.match(root):
      root = scheme.group(0) + root.lstrip('/')
    yield path(root), folders, files


def temporary_name(p: str | os.PathLike) -> epath.Path:
  """A name beside `p` that no other process or thread picks: where `p` is written first."""
  p = path(p)
  return p.with_name(f'{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')


def write_bytes_atomic(p: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `p` so that readers see all of it or none (the old file, or nothing).

  Locally: under a temporary name, synced, then renamed. On a bucket an upload is atomic
  already (the object appears whole when it completes), so `p` is written directly: a
  temporary object and a rename would be an upload, a copy and a delete, and a kill between
  them would leave the temporary behind.
  """
  p = path(p)
  if not is_local(p):
    p.write_bytes(data)
    return
  tmp = temporary_name(p)
  with tmp.open('wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(p)


def write_json_atomic(p: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented JSON to `p`, whole or not at all (`write_bytes_atomic`)."""
  write_bytes_atomic(p, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def read_json(p: str | os.PathLike) -> Any:
  return json.loads(path(p).read_text())


class AppendFile:
  """A file that grows by records: metrics.jsonl, TensorBoard's events.

  A local file is appended to and flushed record by record. An object store has no append (gcsfs
  silently overwrites), so there the file's bytes are kept and the whole object is rewritten at
  each `flush`: a reader sees the file as of a flush, never part of a record. Both are small
  (a record per log step).
  """

  def __init__(self, p: str | os.PathLike, initial: bytes = b''):
    """Starts `p` as `initial` (the kept part of a resumed run's file, or b'')."""
    self.path = path(p)
    self._local = is_local(p)
    self._content = bytearray(initial)
    write_bytes_atomic(self.path, initial)
    self._file = open(self.path, 'ab') if self._local else None
    self._dirty = False

  def write(self, data: bytes) -> None:
    if self._local:
      self._file.write(data)
    else:
      self._content += data
    self._dirty = True

  def flush(self) -> None:
    if not self._dirty:
      return
    if self._local:
      self._file.flush()
    else:
      write_bytes_atomic(self.path, bytes(self._content))
    self._dirty = False

  def close(self) -> None:
    self.flush()
    if self._file is not None:
      self._file.close()
      self._file = None
