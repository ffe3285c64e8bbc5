"""A run's metrics: its metrics.jsonl and TensorBoard log, and the steps a checkpoint keeps.

metrics.jsonl is appended record by record and, on resume, cut back to the restored step
(dropping any torn last line), so no step appears twice. A checkpoint's custom metadata keeps
the metrics of its steps not yet in a train record.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from nin_jax import run_files

if TYPE_CHECKING:
  import orbax.checkpoint as ocp


class MetricsLog:
  """WORKDIR/metrics.jsonl (`run_files.METRICS`) plus clu's writers (TensorBoard event files
  and the log)."""

  def __init__(self, workdir: str, resume_step: int):
    from clu import metric_writers  # clu pulls in TensorFlow for its summary writer
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, run_files.METRICS)
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer, asynchronous=False)
    if self.is_writer:
      self._truncate(resume_step)

  def _truncate(self, resume_step: int) -> None:
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a crash
          continue
        if record.get('step', 0) <= resume_step:
          kept.append(json.dumps(record))
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(''.join(line + '\n' for line in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, values: dict[str, float]) -> None:
    self.writer.write_scalars(step, values)
    if self.is_writer:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')
        f.flush()

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def unlogged_metadata(window: list[dict[str, Any]]) -> dict[str, Any]:
  """The steps' metrics not yet in a train record, for a checkpoint's custom metadata: a run
  resumed from a step between records then averages the same steps in its first record."""
  return {'unlogged_metrics': [{k: float(v) for k, v in m.items()}
                               for m in jax.device_get(window)]}


def restore_unlogged(checkpoints: ocp.CheckpointManager, step: int) -> list[dict[str, Any]]:
  """`unlogged_metadata`'s metrics (float32, as the train step returns them) from a checkpoint."""
  metadata = checkpoints.metadata(step).custom_metadata or {}
  return [{k: np.float32(v) for k, v in m.items()} for m in metadata.get('unlogged_metrics', [])]
