"""The run files' path layer (`nin_jax.run_files`) and the TensorBoard events it carries."""

import os

import numpy as np

from nin_jax import metrics_log
from nin_jax import run_files


def test_urls_are_not_local_paths():
  assert run_files.is_local('runs/x') and run_files.is_local('/tmp/x')
  assert not run_files.is_local('gs://bucket/runs/x')
  assert run_files.absolute('gs://bucket/runs/x') == 'gs://bucket/runs/x'
  assert run_files.absolute('runs/x') == os.path.abspath('runs/x')


def test_walk_lists_what_os_walk_lists(tmp_path):
  for name in ('a/1.png', 'a/b/2.png', 'c/3.png'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b'x')
  ours = sorted(os.path.join(os.fspath(root), n)
                for root, _, names in run_files.walk(tmp_path) for n in names)
  theirs = sorted(os.path.join(root, n) for root, _, names in os.walk(tmp_path) for n in names)
  assert ours == theirs and len(ours) == 3


def test_atomic_and_append_files_leave_no_temporaries(tmp_path):
  run_files.write_json_atomic(tmp_path / 'a.json', {'x': [1, 2]})
  assert run_files.read_json(tmp_path / 'a.json') == {'x': [1, 2]}
  log = run_files.AppendFile(tmp_path / 'log.txt', b'kept\n')
  log.write(b'one\n')
  log.flush()
  assert (tmp_path / 'log.txt').read_bytes() == b'kept\none\n'  # readable after each flush
  log.write(b'two\n')
  log.close()
  assert (tmp_path / 'log.txt').read_bytes() == b'kept\none\ntwo\n'
  assert sorted(os.listdir(tmp_path)) == ['a.json', 'log.txt']


def test_tensorboard_reads_the_event_files(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  log = metrics_log.MetricsLog(str(tmp_path), resume_step=0)
  written = {4: 1.5, 8: 0.25, 12: 0.1}
  for step, loss in written.items():
    log.write(step, {'train_loss': loss, 'learning_rate': 0.01})
  log.close()
  [events] = [n for n in os.listdir(tmp_path) if n.startswith(run_files.EVENTS_PREFIX)]
  accumulator = event_accumulator.EventAccumulator(str(tmp_path / events))
  accumulator.Reload()
  assert sorted(accumulator.Tags()['scalars']) == ['learning_rate', 'train_loss']
  read = {e.step: e.value for e in accumulator.Scalars('train_loss')}
  assert read == {step: float(np.float32(v)) for step, v in written.items()}
  lines = (tmp_path / run_files.METRICS).read_text().splitlines()
  assert [int(line.split('"step": ')[1].split(',')[0].rstrip('}')) for line in lines] == [4, 8, 12]
