"""Training curves of one or more runs, overlaid: loss, test error and learning rate per step.

  python -m nin_jax.plot runs/cifar10 runs/cifar10_aug --out curves.png

Reads each run's `metrics.jsonl` (one JSON object per line; training lines carry `train_loss` and
`learning_rate`, evaluation lines `test_error` as a fraction) and works on runs still training.
The paper's test error for the run's experiment (`nin_jax.report.PAPER_TEST_ERROR`) is drawn as a
dashed line in the run's colour.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure  # No pyplot: no global state, no GUI backend (Agg).

from nin_jax import run_files
from nin_jax.errors import UserError
from nin_jax.report import PAPER_TEST_ERROR

# (metrics.jsonl key, panel title, scale from the stored value to the plotted one)
PANELS = (('train_loss', 'Training loss', 1.0),
          ('test_error', 'Test error (%)', 100.0),
          ('learning_rate', 'Learning rate', 1.0))


def read_metrics(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every numeric series of `run_dir/metrics.jsonl`: key -> (steps, values), in file order.

  A truncated last line (a run still writing) is ignored; any other bad line is an error.

  Raises:
    UserError: the folder or its metrics.jsonl is missing, or a line is not JSON.
  """
  if not run_files.path(run_dir).is_dir():
    raise UserError(f'run folder {run_dir} does not exist')
  path = os.path.join(run_dir, run_files.METRICS)
  if not run_files.path(path).is_file():
    raise UserError(f'{path} not found: {run_dir} is not a run folder, or its training has '
                    'not logged yet')
  lines = run_files.path(path).read_text().split('\n')
  series: dict[str, tuple[list[float], list[float]]] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      if number == len(lines):  # No newline yet: the writer is mid-line.
        continue
      raise UserError(f'{path}, line {number}: not JSON ({line[:60]!r})') from None
    if not isinstance(record, dict) or not isinstance(record.get('step'), (int, float)):
      raise UserError(f'{path}, line {number}: expected an object with a "step"')
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
        steps, values = series.setdefault(key, ([], []))
        steps.append(record['step'])
        values.append(value)
  return {k: (np.asarray(s, np.float64), np.asarray(v, np.float64)) for k, (s, v) in series.items()}


def read_experiment(run_dir: str) -> str | None:
  """The run's `experiment` (the key of the paper table), from config.json or results.json."""
  for name in (run_files.CONFIG, run_files.RESULTS):
    try:
      experiment = run_files.read_json(os.path.join(run_dir, name)).get('experiment')
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(experiment, str):
      return experiment
  return None


def run_labels(run_dirs: Sequence[str]) -> list[str]:
  """Short legend names: the folder name, or its last two parts where folder names repeat."""
  names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  if len(set(names)) == len(names):
    return names
  return [os.path.join(*os.path.normpath(os.path.abspath(d)).split(os.sep)[-2:]) for d in run_dirs]


def make_figure(runs: Sequence[dict[str, Any]]) -> Figure:
  """One row of three panels (PANELS), one colour per run.

  Args:
    runs: one dict per run with 'label' (legend text), 'metrics' (as from `read_metrics`),
      'experiment' (name or None) and 'paper' (the paper's test error in percent, or None).
  """
  fig = Figure(figsize=(13, 4.2), dpi=100, layout='constrained')
  axes = fig.subplots(1, len(PANELS))
  colors = [f'C{i % 10}' for i in range(len(runs))]
  handles: dict[str, Any] = {}  # label -> its first line, for the one shared legend
  paper_lines: list[Any] = []
  for ax, (key, title, scale) in zip(axes, PANELS):
    ax.set_title(title, fontsize=11)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    plotted = []
    for run, color in zip(runs, colors):
      if key not in run['metrics']:
        continue
      steps, values = run['metrics'][key]
      marker = 'o' if len(steps) < 30 else None  # Few evaluations: show where they are.
      line, = ax.plot(steps, values * scale, color=color, marker=marker, markersize=3,
                      linewidth=1.5, label=run['label'])
      handles.setdefault(run['label'], line)
      plotted.append(values * scale)
    if key == 'test_error':
      paper_lines = _draw_paper_lines(ax, runs, colors)
    if not plotted:
      ax.text(0.5, 0.5, f'no {key} logged yet', transform=ax.transAxes, ha='center',
              va='center', color='gray')
      continue
    values = np.concatenate(plotted)
    if key != 'learning_rate' and values.min() > 0 and values.max() / values.min() > 8:
      # Losses and errors fall by decades: a linear axis flattens the end that matters (and
      # the paper's 10.41 vs 8.81). Plain numbers on the ticks, not powers of ten.
      ax.set_yscale('log')
      ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f'{v:g}'))
      ax.yaxis.set_minor_formatter(ticker.FuncFormatter(
          lambda v, _: f'{v:g}' if str(f'{v:g}')[0] in '25' else ''))
    else:
      ax.set_ylim(bottom=0)
    if key == 'learning_rate':
      ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
  for ax in axes:
    ax.ticklabel_format(axis='x', style='sci', scilimits=(-4, 5))
  legend = list(handles.values()) + paper_lines
  if legend:
    fig.legend(handles=legend, loc='outside lower center',
               ncol=len(legend) if len(legend) <= 6 else 4,
               frameon=False, fontsize=9)
  return fig


def _draw_paper_lines(ax, runs: Sequence[dict[str, Any]], colors: Sequence[str]) -> list[Any]:
  """The paper's figure as a dashed line, once per distinct figure, in its first run's colour.

  Returns the lines, labelled for the legend (labels beside the lines would collide when two
  figures are close, e.g. 10.41 and 8.81).
  """
  drawn, lines = set(), []
  for run, color in zip(runs, colors):
    paper = run['paper']
    if paper is None or paper in drawn:
      continue
    drawn.add(paper)
    lines.append(ax.axhline(paper, color=color, linestyle='--', linewidth=1.2,
                            label=f'paper, {run["experiment"]}: {paper:.2f}%'))
  return lines


def plot_runs(run_dirs: Sequence[str], out: str) -> None:
  """Reads the runs' metrics and writes the figure to `out` (PNG, or any format by extension)."""
  if not run_dirs:
    raise UserError('no run folders given: python -m nin_jax.plot RUN_DIR [...] --out curves.png')
  runs = []
  for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
    experiment = read_experiment(run_dir)
    metrics = read_metrics(run_dir)
    if experiment is not None and experiment != label:
      label = f'{label} ({experiment})'
    runs.append({'label': label, 'metrics': metrics, 'experiment': experiment,
                 'paper': PAPER_TEST_ERROR.get(experiment)})
  fig = make_figure(runs)
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise UserError(f'--out {out}: folder {folder} does not exist')
  fig.savefig(out)


def main(argv: Sequence[str]) -> None:
  from absl import flags

  try:
    plot_runs(argv[1:], flags.FLAGS.out)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(flags.FLAGS.out)


if __name__ == '__main__':
  from absl import app, flags

  # Defined here, not at import, so that importing this module next to other CLIs never
  # collides on a flag name.
  flags.DEFINE_string('out', 'curves.png', 'where to write the figure (PNG)')
  app.run(main)
