"""Tests of nin_jax.plot: training curves from metrics.jsonl, the paper's figure dashed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nin_jax import plot
from nin_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(root, name, experiment, steps=400, final_error=0.12, evaluate=True):
  """A run folder with config.json and metrics.jsonl as nin_jax.train writes them."""
  run_dir = os.path.join(root, name)
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump({'experiment': experiment, 'dataset': 'cifar10', 'model': 'nin_cifar'}, f)
  with open(os.path.join(run_dir, 'metrics.jsonl'), 'w') as f:
    for step in range(0, steps + 1, 20):
      f.write(json.dumps({'step': step, 'train_loss': 2.3 * np.exp(-step / 100) + 0.05,
                          'train_accuracy': 0.5, 'learning_rate': 0.05 * (1 - step / steps),
                          'images_per_sec': 900.0}) + '\n')
      if evaluate and step % 100 == 0:
        f.write(json.dumps({'step': step, 'test_loss': 1.0, 'test_accuracy': 0.5,
                            'test_error': final_error + 0.8 * np.exp(-step / 80)}) + '\n')
  return run_dir


def test_read_metrics_collects_each_series(tmp_path):
  run = write_run(tmp_path, 'r', 'cifar10', steps=200)
  with open(os.path.join(run, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 220, "train_lo')  # a run still writing its last line
  metrics = plot.read_metrics(run)
  steps, loss = metrics['train_loss']
  assert steps.tolist() == list(range(0, 201, 20))
  assert loss[0] == pytest.approx(2.35)
  assert metrics['test_error'][0].tolist() == [0, 100, 200]
  assert 'learning_rate' in metrics and 'test_accuracy' in metrics


def test_read_metrics_errors_name_the_file_and_line(tmp_path):
  run = write_run(tmp_path, 'r', 'cifar10', steps=40)
  path = os.path.join(run, 'metrics.jsonl')
  lines = open(path).read().splitlines()
  lines.insert(1, 'not json')
  open(path, 'w').write('\n'.join(lines) + '\n')
  with pytest.raises(UserError, match=r'metrics.jsonl, line 2'):
    plot.read_metrics(run)
  os.remove(path)
  with pytest.raises(UserError, match='metrics.jsonl not found'):
    plot.read_metrics(run)


def test_paper_figure_is_a_dashed_line_only_where_there_is_one(tmp_path):
  runs = [write_run(tmp_path, 'a', 'cifar10'), write_run(tmp_path, 'b', 'chars'),
          write_run(tmp_path, 'c', 'mnist', final_error=0.006)]
  fig = plot.make_figure([{'label': os.path.basename(r), 'metrics': plot.read_metrics(r),
                           'experiment': e, 'paper': p}
                          for r, e, p in zip(runs, ['cifar10', 'chars', 'mnist'],
                                             [10.41, None, 0.47])])
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == ['Training loss', 'Test error (%)', 'Learning rate']
  error_ax = fig.axes[1]
  dashed = sorted(line.get_ydata()[0] for line in error_ax.get_lines()
                  if line.get_linestyle() == '--')
  assert dashed == [0.47, 10.41]
  solid = [line for line in error_ax.get_lines() if line.get_linestyle() == '-']
  assert len(solid) == 3  # one curve per run
  assert max(solid[0].get_ydata()) == pytest.approx(92.0)  # fractions plotted as percent
  for ax in fig.axes:
    assert not any(line.get_linestyle() == '--' for line in ax.get_lines()) or ax is error_ax


def png_stats(path):
  image = np.asarray(Image.open(path).convert('RGB'))
  return image, len(np.unique(image.reshape(-1, 3), axis=0))


def test_plot_runs_writes_a_readable_png(tmp_path):
  runs = [write_run(tmp_path, 'cifar10', 'cifar10'),
          write_run(tmp_path, 'aug', 'cifar10_aug', final_error=0.09),
          write_run(tmp_path, 'fresh', 'chars', evaluate=False)]  # no evaluation yet
  out = str(tmp_path / 'curves.png')
  plot.plot_runs(runs, out)
  image, colours = png_stats(out)
  assert image.shape == (420, 1300, 3)
  assert colours > 50  # curves, text and anti-aliasing: not a blank canvas
  blue = np.array([31, 119, 180])  # matplotlib's C0, the first run's curve
  assert (np.abs(image.astype(int) - blue).sum(-1) < 30).sum() > 200


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'nin_jax.plot', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
  run = write_run(tmp_path, 'r', 'svhn', final_error=0.03)
  out = tmp_path / 'c.png'
  result = run_cli(run, '--out', str(out))
  assert result.returncode == 0, result.stderr
  assert png_stats(out)[1] > 50
  bad = tmp_path / 'empty'
  bad.mkdir()
  result = run_cli(str(bad), '--out', str(out))
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and 'metrics.jsonl' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
