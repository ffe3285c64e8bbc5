"""The files of a run folder (WORKDIR): what `nin_jax.train` writes, and inference, plot and
report read.

Only process 0 writes them. Each whole file is written to a temporary name and renamed
(`write_json_atomic`), so a crash never leaves one half-written; `METRICS` is appended line by
line instead (`nin_jax.metrics_log.MetricsLog`). Standard library only: the readers need no JAX.
"""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG = 'config.json'               # every field of the run's config, as JSON
CLASS_NAMES = 'class_names.json'     # the class names in label order (a JSON list)
PREPROCESSING = 'preprocessing.npz'  # the preprocessing fitted on the training split
CHECKPOINTS = 'checkpoints'          # Orbax CheckpointManager folder: one subfolder per step
METRICS = 'metrics.jsonl'            # one JSON object per record: 'step' and train or test metrics
RESULTS = 'results.json'             # written when training ends: test metrics, speed, run facts
# TensorBoard's event files (events.out.tfevents.*, clu's writer) lie in the run folder itself.


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as indented JSON to a temporary file, then renames it to `path`."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
