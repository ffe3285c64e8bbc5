"""Tests of nin_jax.report: the Markdown table of our runs beside the paper's figures."""

import json
import os
import subprocess
import sys

import pytest

from nin_jax import report
from nin_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_run(root, name, experiment, test_error=0.1123, **results):
  """A finished run folder as nin_jax.train leaves it (config.json + results.json)."""
  run_dir = os.path.join(root, name)
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, 'config.json'), 'w') as f:
    json.dump({'experiment': experiment, 'dataset': 'cifar10', 'model': 'nin_cifar',
               'num_classes': 10, 'step_fractions': [0.5, 0.75]}, f)
  data = {'experiment': experiment, 'dataset': 'cifar10', 'model': 'nin_cifar', 'step': 117000,
          'epochs': 300.0, 'test_loss': 0.4, 'test_accuracy': 1 - test_error,
          'test_error': test_error, 'num_test_examples': 10000,
          'train_images_per_sec': 12345.6, 'wall_seconds': 6000.0}
  data.update(results)
  with open(os.path.join(run_dir, 'results.json'), 'w') as f:
    json.dump(data, f)
  return run_dir


def table_rows(table):
  """{run name: {column: cell}} from the Markdown table."""
  lines = [l for l in table.splitlines() if l.startswith('|')]
  header = [c.strip() for c in lines[0].strip('|').split('|')]
  rows = {}
  for line in lines[2:]:
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert len(cells) == len(header), line
    rows[cells[0]] = dict(zip(header, cells))
  return rows


def test_paper_table_holds_the_papers_figures():
  # Lin, Chen & Yan 2014, Tables 1-5, and the Caffe Model Zoo ImageNet NIN (100 - 59.36).
  assert report.PAPER_TEST_ERROR == {
      'cifar10': 10.41, 'cifar10_aug': 8.81, 'cifar10_nodropout': 14.51, 'cifar10_fc': 11.59,
      'cifar10_fc_dropout': 10.88, 'cifar100': 35.68, 'svhn': 2.35, 'mnist': 0.47,
      'imagenet': 40.64}
  for name in ('chars', 'emnist_byclass', 'default'):
    assert name not in report.PAPER_TEST_ERROR


def test_rows_match_paper_figures_by_experiment(tmp_path):
  runs = [write_run(tmp_path, 'a', 'cifar10', test_error=0.1123),
          write_run(tmp_path, 'b', 'mnist', test_error=0.0041),
          write_run(tmp_path, 'c', 'chars', test_error=0.0312),
          write_run(tmp_path, 'd', 'my_own_experiment', test_error=0.5)]
  rows = table_rows(report.make_table(runs))
  assert list(rows) == ['a', 'b', 'c', 'd']  # one row per run, in the order given
  assert rows['a']['experiment'] == 'cifar10'
  assert (rows['a']['test error (%)'], rows['a']['paper (%)'], rows['a']['difference']) == (
      '11.23', '10.41', '+0.82')
  assert (rows['b']['test error (%)'], rows['b']['paper (%)'], rows['b']['difference']) == (
      '0.41', '0.47', '-0.06')
  for name in ('c', 'd'):  # no paper figure: a dash, and no difference
    assert rows[name]['paper (%)'] == '-'
    assert rows[name]['difference'] == '-'
  assert rows['c']['test error (%)'] == '3.12'
  assert rows['a']['steps'] == '117,000'
  assert rows['a']['epochs'] == '300'
  assert rows['a']['wall time'] == '1h 40m'
  assert rows['a']['images/s'] == '12,346'
  assert (rows['a']['dataset'], rows['a']['model']) == ('cifar10', 'nin_cifar')


def test_missing_numbers_show_a_dash(tmp_path):
  run = write_run(tmp_path, 'r', 'cifar10')
  with open(os.path.join(run, 'results.json'), 'w') as f:
    json.dump({'experiment': 'cifar10', 'test_accuracy': 0.9}, f)  # error from accuracy
  row = table_rows(report.make_table([run]))['r']
  assert row['test error (%)'] == '10.00'
  assert row['difference'] == '-0.41'
  assert row['wall time'] == row['images/s'] == row['steps'] == '-'
  assert row['dataset'] == 'cifar10'  # from config.json when results.json lacks it


@pytest.mark.parametrize('seconds, text', [(42.4, '42s'), (725, '12m 05s'), (6000, '1h 40m'),
                                           (None, '-')])
def test_format_duration(seconds, text):
  assert report.format_duration(seconds) == text


def test_run_without_results_is_a_user_error(tmp_path):
  run = write_run(tmp_path, 'r', 'cifar10')
  os.remove(os.path.join(run, 'results.json'))
  with pytest.raises(UserError, match='results.json'):
    report.make_table([run])
  with pytest.raises(UserError, match='does not exist'):
    report.make_table([str(tmp_path / 'nowhere')])
  with open(os.path.join(run, 'results.json'), 'w') as f:
    f.write('{"test_error": 0.1')  # cut short
  with pytest.raises(UserError, match='results.json'):
    report.make_table([run])


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'nin_jax.report', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_cli_writes_the_table(tmp_path):
  runs = [write_run(tmp_path, 'a', 'cifar10_aug', test_error=0.0899),
          write_run(tmp_path, 'b', 'svhn', test_error=0.0240)]
  out = tmp_path / 'table.md'
  result = run_cli(*runs, '--out', str(out))
  assert result.returncode == 0, result.stderr
  assert out.read_text() == result.stdout
  rows = table_rows(result.stdout)
  assert rows['a']['difference'] == '+0.18'
  assert rows['b']['paper (%)'] == '2.35'
  assert 'Lin, Chen & Yan' in result.stdout  # the figures' source


def test_cli_error_is_one_line_and_exit_2(tmp_path):
  run = tmp_path / 'unfinished'
  run.mkdir()
  result = run_cli(str(run))
  assert result.returncode == 2
  assert result.stderr.startswith('error: ')
  assert 'results.json' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
