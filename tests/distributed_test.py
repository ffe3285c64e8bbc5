"""Tests for multi-process runs: local processes of fake CPU devices over 127.0.0.1.

Every process is started in its own session and killed in `finally`; every wait has a timeout.
The runs share one tiny configuration, so the single-process reference, the two-process run
(the command of docs/distributed.md) and the resumed run compare step by step.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, config_flags, read_metrics, tiny_config
from nin_jax import runtime
from nin_jax.errors import UserError

# Environment variables through which JAX (or a launcher) would detect a cluster.
_CLUSTER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'PMIX_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_',
                     'JAX_COORDINATOR', 'JAX_LOCAL_DEVICE_IDS')
_RUN_TIMEOUT = 240  # seconds for one run of the tiny net, on a busy two-core machine
_DOC = os.path.join(REPO, 'docs', 'distributed.md')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, **extra: str) -> dict[str, str]:
  """This environment without any cluster's variables, with `devices` fake CPU devices."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES)}
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             PATH=os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', ''), **extra)
  return env


def _config(data_dir):
  # Logged every step, so runs stopped and resumed anywhere compare record by record; 24 test
  # images in global batches of 20: the second is mostly padding, all of it on process 1.
  return tiny_config(data_dir, num_train_steps=60, log_every_steps=1, eval_every_steps=30,
                     checkpoint_every_steps=10, eval_batch_size=20)


def _main_command(workdir, config, *flags) -> list[str]:
  return [sys.executable, '-m', 'nin_jax.main', '--config', 'experiments/default.py',
          '--workdir', str(workdir), *config_flags(config), *flags]


def _start(cmd, env, log_path, **kwargs) -> subprocess.Popen:
  with open(log_path, 'w') as log:  # a file, not a pipe: a full pipe would stall the process
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, **kwargs)


def _kill(procs) -> None:
  for proc in procs:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)  # the session we started: the process and its children
      proc.wait(timeout=30)


def _wait(procs, timeout: float) -> list[int]:
  deadline = time.time() + timeout
  return [proc.wait(timeout=max(1.0, deadline - time.time())) for proc in procs]


def _start_processes(workdir, config, port: int, logs: list[str]) -> list[subprocess.Popen]:
  """Processes 1..N-1 first, then 0: the order of docs/distributed.md."""
  n = len(logs)
  procs = []
  for i in reversed(range(n)):
    procs.append(_start(
        _main_command(workdir, config, '--coordinator_address', f'127.0.0.1:{port}',
                      '--num_processes', str(n), '--process_id', str(i)),
        _env(devices=2), logs[i]))
  return procs[::-1]  # indexed by process id


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _without_speed(metrics):
  return [{k: v for k, v in m.items() if k != 'images_per_sec'} for m in metrics]


def _losses(workdir):
  return [m['train_loss'] for m in read_metrics(workdir) if 'train_loss' in m]


def _results(workdir):
  return json.loads(_read(os.path.join(workdir, 'results.json')))


@pytest.fixture(scope='module')
def reference(blobs_folder, tmp_path_factory):
  """One process of four devices, started without distributed flags and outside any cluster."""
  workdir = tmp_path_factory.mktemp('one_process_four_devices')
  result = subprocess.run(_main_command(workdir, _config(blobs_folder)), cwd=REPO,
                          env=_env(devices=4), capture_output=True, text=True,
                          timeout=_RUN_TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result.stderr


def _doc_block() -> str:
  match = re.search(r'<!-- local-two-process[^>]*-->\s*```sh\n(.*?)```', _read(_DOC), re.S)
  assert match, f'{_DOC}: the local two-process block is missing'
  return match.group(1)


@pytest.fixture(scope='module')
def two_processes(blobs_folder, tmp_path_factory):
  """The local block of docs/distributed.md, on the tiny config, a free port, a temp workdir."""
  workdir = tmp_path_factory.mktemp('two_processes_two_devices')
  block = _doc_block()
  replacements = {
      'experiments/chars.py': 'experiments/default.py ' + ' '.join(
          config_flags(_config(blobs_folder))),
      'runs/chars_2x2': str(workdir),
      '127.0.0.1:12355': f'127.0.0.1:{_free_port()}',
      'data/chars': blobs_folder,  # exists, so the block generates nothing
  }
  for old, new in replacements.items():
    assert old in block, f'{_DOC}: the local block no longer says {old!r}'
    block = block.replace(old, new)
  log_path = os.path.join(workdir, 'shell.log')
  shell = _start(['bash', '-c', block], _env(devices=2), log_path)
  try:
    _wait([shell], _RUN_TIMEOUT)
  finally:
    _kill([shell])
  return workdir, _read(log_path)


# --- Joining a run --------------------------------------------------------------------------------

_PROBE = '''
import json, time
import jax
from nin_jax import runtime
start = time.time()
joined = runtime.initialize_distributed()
print(json.dumps({'joined': joined, 'initialized': jax.distributed.is_initialized(),
                  'processes': jax.process_count(), 'seconds': time.time() - start}))
'''


def _probe(env) -> dict:
  result = subprocess.run([sys.executable, '-c', _PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_without_flags_or_cluster_jax_distributed_stays_uninitialized():
  probe = _probe(_env(devices=1))
  assert probe == {'joined': False, 'initialized': False, 'processes': 1,
                   'seconds': probe['seconds']}
  assert probe['seconds'] < 10  # no waiting for a coordinator that does not exist


def test_a_detected_cluster_is_joined_without_flags():
  # What `srun` sets for a one-task job step; JAX's SLURM detection reads it.
  slurm = dict(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='127.0.0.1', SLURM_NTASKS='1',
               SLURM_PROCID='0', SLURM_LOCALID='0', JAX_COORDINATOR_PORT=str(_free_port()))
  probe = _probe(_env(devices=1, **slurm))
  assert probe['joined'] and probe['initialized'] and probe['processes'] == 1


def test_distributed_flags_are_checked():
  runtime.check_distributed_flags('10.0.0.1:12355', 4, 3)
  runtime.check_distributed_flags(None, None, None)
  for args, culprit in [(('10.0.0.1', 2, 0), '--coordinator_address'),
                        (('10.0.0.1:99999', 2, 0), '--coordinator_address'),
                        (('10.0.0.1:12355', 0, 0), '--num_processes'),
                        (('10.0.0.1:12355', 2, 2), '--process_id'),
                        (('10.0.0.1:12355', 2, -1), '--process_id')]:
    with pytest.raises(UserError, match=culprit):
      runtime.check_distributed_flags(*args)
  with socket.create_server(('127.0.0.1', 0)) as busy:  # JAX 0.10 would segfault on it
    port = busy.getsockname()[1]
    with pytest.raises(UserError, match=f'port {port} is in use'):
      runtime.check_distributed_flags(f'127.0.0.1:{port}', 2, 0)
    runtime.check_distributed_flags(f'127.0.0.1:{port}', 2, 1)  # only process 0 serves on it


def test_missing_flags_outside_a_cluster_are_a_one_line_error(blobs_folder, tmp_path):
  result = subprocess.run(_main_command(tmp_path / 'run', _config(blobs_folder),
                                        '--num_processes', '2'),
                          cwd=REPO, env=_env(devices=1), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert errors == ['error: --coordinator_address, --process_id: not given, and no cluster '
                    '(TPU pod, SLURM, Open MPI) to read them from: give all of '
                    '--coordinator_address, --num_processes, --process_id']
  assert 'Traceback' not in result.stderr


# --- Training together ----------------------------------------------------------------------------

def test_single_process_run_without_flags(reference):
  workdir, log = reference
  assert 'No cluster detected' in log
  assert 'JAX process 0 of 1; 4 local devices of 4' in log
  results = _results(workdir)
  assert (results['processes'], results['devices']) == (1, 4)


def test_two_processes_train_like_one_process(two_processes, reference, blobs_folder):
  from nin_jax import input_pipeline
  workdir, log = two_processes
  assert log.count('test accuracy') == 1, log[-3000:]  # process 0 reports for the run
  assert 'Traceback' not in log and 'error:' not in log, log[-3000:]
  results, expected = _results(workdir), _results(reference[0])
  assert (results['processes'], results['devices']) == (2, 4)
  num_test = input_pipeline.create_data(_config(blobs_folder), process_index=0,
                                        process_count=1).num_test_examples
  assert results['num_test_examples'] == expected['num_test_examples'] == num_test == 24
  np.testing.assert_allclose(_losses(workdir), _losses(reference[0]), rtol=1e-4)
  assert len(_losses(workdir)) == 60
  np.testing.assert_allclose(results['test_loss'], expected['test_loss'], rtol=1e-4)
  # Only process 0 writes: one TensorBoard file, each step once in metrics.jsonl.
  assert len([f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]) == 1
  steps = [m['step'] for m in read_metrics(workdir) if 'train_loss' in m]
  assert steps == list(range(1, 61))


def _wait_for_checkpoint(workdir, step: int, procs, timeout: float) -> bool:
  path = os.path.join(workdir, 'checkpoints', str(step), '_CHECKPOINT_METADATA')
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path):
      return True
    if any(proc.poll() is not None for proc in procs):
      return False
    time.sleep(0.02)
  return False


def test_two_processes_stop_together_on_sigterm_and_resume(two_processes, blobs_folder,
                                                           tmp_path):
  config = _config(blobs_folder)
  workdir = tmp_path / 'run'
  logs = [str(tmp_path / 'process0.log'), str(tmp_path / 'process1.log')]
  procs = _start_processes(workdir, config, _free_port(), logs)
  try:
    assert _wait_for_checkpoint(workdir, 10, procs, _RUN_TIMEOUT), _read(logs[0])[-3000:]
    procs[0].send_signal(signal.SIGTERM)  # a preemption notice reaches hosts at different times
    time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    assert _wait(procs, 120) == [143, 143], _read(logs[0])[-3000:]
  finally:
    _kill(procs)
  stopped = [re.findall(r'preempted: SIGTERM: saved the checkpoint of step (\d+)', _read(log))
             for log in logs]
  assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped  # the same step on both
  assert 10 <= int(stopped[0][0]) < 60
  assert not os.path.exists(workdir / 'results.json')

  procs = _start_processes(workdir, config, _free_port(), logs)
  try:
    assert _wait(procs, _RUN_TIMEOUT) == [0, 0], _read(logs[0])[-3000:]
  finally:
    _kill(procs)
  first, other = _read(logs[0]), _read(logs[1])
  assert f'Resuming from the checkpoint of step {stopped[0][0]}' in first
  assert 'Traceback' not in first + other
  # Process 0 tells the story; process 1 keeps its info lines to itself.
  assert 'Test accuracy' in first and 'Test accuracy' not in other
  # Each step once, with the values of the uninterrupted two-process run.
  uninterrupted = two_processes[0]
  assert _without_speed(read_metrics(workdir)) == _without_speed(read_metrics(uninterrupted))
  assert _results(workdir)['test_loss'] == _results(uninterrupted)['test_loss']
