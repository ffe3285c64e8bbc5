"""A run's metrics: its metrics.jsonl and TensorBoard log, and the steps a checkpoint keeps.

metrics.jsonl is appended record by record and, on resume, cut back to the restored step
(dropping any torn last line), so no step appears twice. A checkpoint's custom metadata keeps
the metrics of its steps not yet in a train record.

The TensorBoard events are written here, with TensorBoard's own record format and protos,
rather than by clu's SummaryWriter: that one writes through TensorFlow's file system, which a
bare-JAX host lacks and which cannot be pointed at anything but the real gs:// (so a bucket
workdir could not be tested offline). These go through `run_files` like every other run file.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from absl import logging
import jax
import numpy as np

from nin_jax import run_files

if TYPE_CHECKING:
  import orbax.checkpoint as ocp


class EventFile:
  """A TensorBoard event file of scalars (what `tensorboard --logdir WORKDIR` reads)."""

  def __init__(self, workdir: str):
    from tensorboard.compat.proto import event_pb2, summary_pb2  # protobuf only, no TensorFlow
    from tensorboard.summary.writer import record_writer
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    # A new file per (re)start, named as TensorFlow names them; TensorBoard reads them in order.
    name = (f'{run_files.EVENTS_PREFIX}{int(time.time())}.{socket.gethostname()}.'
            f'{os.getpid()}.v2')
    self._file = run_files.AppendFile(os.path.join(workdir, name))
    self._records = record_writer.RecordWriter(self._file)
    self._write(self._event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._file.flush()

  def write_scalars(self, step: int, values: dict[str, float]) -> None:
    summary = self._summary_pb2.Summary(value=[
        self._summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def close(self) -> None:
    self._file.close()


class MetricsLog:
  """WORKDIR/metrics.jsonl (`run_files.METRICS`), the TensorBoard events and the log. Only
  process 0 writes files; every process logs."""

  def __init__(self, workdir: str, resume_step: int):
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, run_files.METRICS)
    self.events = self.metrics = None
    if self.is_writer:
      self.metrics = run_files.AppendFile(self.path, self._kept(resume_step))
      self.events = EventFile(workdir)

  def _kept(self, resume_step: int) -> bytes:
    """The records of metrics.jsonl up to `resume_step` (a torn last line dropped)."""
    path = run_files.path(self.path)
    if not path.exists():
      return b''
    kept = []
    for line in path.read_text().splitlines():
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a torn last line from a crash
        continue
      if record.get('step', 0) <= resume_step:
        kept.append(json.dumps(record) + '\n')
    return ''.join(kept).encode()

  def write(self, step: int, values: dict[str, float]) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' for k, v in values.items()))
    if self.is_writer:
      self.events.write_scalars(step, values)
      self.metrics.write((json.dumps({'step': step, **values}) + '\n').encode())
      self.metrics.flush()

  def close(self) -> None:
    if self.is_writer:
      self.events.close()
      self.metrics.close()


def unlogged_metadata(window: list[dict[str, Any]]) -> dict[str, Any]:
  """The steps' metrics not yet in a train record, for a checkpoint's custom metadata: a run
  resumed from a step between records then averages the same steps in its first record."""
  return {'unlogged_metrics': [{k: float(v) for k, v in m.items()}
                               for m in jax.device_get(window)]}


def restore_unlogged(checkpoints: ocp.CheckpointManager, step: int) -> list[dict[str, Any]]:
  """`unlogged_metadata`'s metrics (float32, as the train step returns them) from a checkpoint."""
  metadata = checkpoints.metadata(step).custom_metadata or {}
  return [{k: np.float32(v) for k, v in m.items()} for m in metadata.get('unlogged_metrics', [])]
