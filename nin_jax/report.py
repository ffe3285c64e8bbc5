"""Our results beside the paper's: a Markdown table, one row per finished run.

  python -m nin_jax.report runs/cifar10 runs/cifar10_aug [--out table.md]

Reads only each run's `results.json` (written when training ends) and `config.json`. The paper's
figures live in `PAPER_TEST_ERROR`, keyed by the config's `experiment` name; runs of experiments
the paper did not run show a dash there.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Sequence

from nin_jax import run_files
from nin_jax.errors import UserError

# Test error (%) of the paper's NIN for each of our experiments, keyed by `config.experiment`.
# Source: Lin, Chen & Yan, "Network In Network", ICLR 2014 (arXiv 1312.4400v3), Tables 1-5;
# ImageNet: the Caffe Model Zoo "NIN ImageNet" model, top-1 accuracy 59.36%.
PAPER_TEST_ERROR: dict[str, float] = {
    'cifar10': 10.41,             # Table 1: dropout, no augmentation
    'cifar10_aug': 8.81,          # Table 1: dropout + translation and horizontal flips
    'cifar10_nodropout': 14.51,   # Section 4.2, the dropout study: no dropout
    'cifar10_fc': 11.59,          # Table 5: mlpconv + fully connected
    'cifar10_fc_dropout': 10.88,  # Table 5: mlpconv + fully connected + dropout
    'cifar100': 35.68,            # Table 2
    'svhn': 2.35,                 # Table 3
    'mnist': 0.47,                # Table 4
    'imagenet': 40.64,            # Caffe Model Zoo: 100 - 59.36 top-1
}
PAPER_SOURCE = ('Paper: Lin, Chen & Yan, "Network In Network", ICLR 2014, Tables 1-5; '
                'ImageNet: Caffe Model Zoo NIN, top-1 59.36%.')

COLUMNS = ('run', 'experiment', 'dataset', 'model', 'steps', 'epochs', 'test error (%)',
           'paper (%)', 'difference', 'wall time', 'images/s')
DASH = '-'


def read_run(run_dir: str) -> dict[str, Any]:
  """A run's `results.json` with `config.json` underneath (results win where both have a key).

  Raises:
    UserError: the folder is missing, or has no (readable) results.json.
  """
  if not run_files.path(run_dir).is_dir():
    raise UserError(f'run folder {run_dir} does not exist')
  results_path = os.path.join(run_dir, run_files.RESULTS)
  if not run_files.path(results_path).is_file():
    raise UserError(f'{results_path} not found: the run has not finished (training writes it '
                    f'at the end), or {run_dir} is not a run folder')
  merged = {}
  for path in (os.path.join(run_dir, run_files.CONFIG), results_path):
    if path != results_path and not run_files.path(path).is_file():
      continue  # results.json alone has every number the table needs.
    try:
      data = run_files.read_json(path)
    except (OSError, ValueError) as e:
      raise UserError(f'{path} is not readable JSON ({e})') from None
    if not isinstance(data, dict):
      raise UserError(f'{path} holds {type(data).__name__}, not a JSON object')
    merged.update(data)
  return merged


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return None
  return float(value)


def test_error_percent(run: dict[str, Any]) -> float | None:
  """Our test error in percent (results hold fractions), or None if the run has none."""
  error = _number(run.get('test_error'))
  if error is None and _number(run.get('test_accuracy')) is not None:
    error = 1.0 - float(run['test_accuracy'])
  return None if error is None else 100.0 * error


def format_duration(seconds: float | None) -> str:
  """42 -> '42s', 725 -> '12m 05s', 6000 -> '1h 40m'."""
  if seconds is None or seconds < 0:
    return DASH
  seconds = round(seconds)
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m {seconds % 60:02d}s'
  return f'{seconds // 3600}h {seconds % 3600 // 60:02d}m'


def _cell(value: Any) -> str:
  text = DASH if value is None or value == '' else str(value)
  return text.replace('|', '\\|').replace('\n', ' ')


def table_row(run_dir: str, run: dict[str, Any]) -> list[str]:
  """The row of one run, as strings in the order of `COLUMNS`."""
  experiment = run.get('experiment')
  ours = test_error_percent(run)
  paper = PAPER_TEST_ERROR.get(experiment) if isinstance(experiment, str) else None
  step, epochs = _number(run.get('step')), _number(run.get('epochs'))
  speed, wall = _number(run.get('train_images_per_sec')), _number(run.get('wall_seconds'))
  return [
      _cell(os.path.basename(os.path.normpath(run_dir))),
      _cell(experiment),
      _cell(run.get('dataset')),
      _cell(run.get('model')),
      DASH if step is None else f'{int(step):,}',
      DASH if epochs is None else f'{epochs:.1f}'.removesuffix('.0'),
      DASH if ours is None else f'{ours:.2f}',
      DASH if paper is None else f'{paper:.2f}',
      DASH if ours is None or paper is None else f'{ours - paper:+.2f}',
      format_duration(wall),
      DASH if speed is None else f'{speed:,.0f}',
  ]


def make_table(run_dirs: Sequence[str]) -> str:
  """The Markdown table of `run_dirs`, in the order given, with the paper's source below it."""
  if not run_dirs:
    raise UserError('no run folders given: python -m nin_jax.report RUN_DIR [RUN_DIR ...]')
  rows = [table_row(d, read_run(d)) for d in run_dirs]
  right = {'steps', 'epochs', 'test error (%)', 'paper (%)', 'difference', 'wall time',
           'images/s'}
  lines = ['| ' + ' | '.join(COLUMNS) + ' |',
           '|' + '|'.join('---:' if c in right else '---' for c in COLUMNS) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n\n' + PAPER_SOURCE + ' Difference: ours - paper, in points.\n'


def main(argv: Sequence[str]) -> None:
  from absl import flags

  try:
    table = make_table(argv[1:])
    if flags.FLAGS.out:
      with open(flags.FLAGS.out, 'w') as f:
        f.write(table)
    sys.stdout.write(table)
  except (UserError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from absl import app, flags

  # Defined here, not at import, so that importing this module next to other CLIs (tests, the
  # lead's main) never collides on a flag name.
  flags.DEFINE_string('out', None, 'also write the table to this Markdown file')
  app.run(main)
