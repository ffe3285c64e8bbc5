"""Every experiment config as written, on every device layout: the same losses as one device.

The matrix: each config of experiments/ runs two steps end to end (TFDS's mock data for
the TFDS datasets; the generated characters for the folder configs; for imagenet, a streamed
folder of 1000 classes) on 1, 2, 4 and 8 fake CPU
devices in one process and on 2 processes x 4 devices, with nothing changed but the step count
(and the log interval, so that both steps' losses are written), and gives the first layout's
training and test losses to rtol 1e-4.

The full matrix is 13 configs x 4 layouts beside one device: 52 min on two cores, beyond CI:

  NIN_JAX_MATRIX=full python -m pytest tests/matrix_test.py

CI runs `SLICE`: every layout once, and every kind of input (GCN + ZCA, LCN with SVHN's two
training splits, augmentation, no preprocessing) at least once. The full run's table is in
docs/distributed.md ("Every config on every layout").
"""

import functools
import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, read_metrics

CONFIGS = sorted(os.path.basename(p)[:-3]
                 for p in glob.glob(os.path.join(REPO, 'experiments', '*.py'))
                 if not p.endswith('__init__.py'))
FOLDER_CONFIGS = ('chars', 'default')  # the generated characters, not TFDS
LAYOUTS = [(1, 2), (1, 4), (1, 8), (2, 4)]  # (processes, devices per process), beside (1, 1)
SLICE = {('mnist', (2, 4)), ('cifar10_aug', (1, 4)), ('svhn', (1, 2)), ('mnist', (1, 8))}
FULL = os.environ.get('NIN_JAX_MATRIX') == 'full'
_TIMEOUT = 1200  # seconds for one run: imagenet's 224x224 batches on a busy two-core machine

# One process of a run: the config as written, two steps, under TFDS's mock data.
_RUN = r"""
import importlib, sys
from absl import logging
import tensorflow_datasets as tfds
from nin_jax import runtime, train
logging.set_verbosity('info')
name, workdir, data_dir, coordinator, processes, process_id = sys.argv[1:]
if coordinator:
  runtime.initialize_distributed(coordinator, int(processes), int(process_id))
config = importlib.import_module('experiments.' + name).get_config()
config.num_train_steps, config.log_every_steps, config.progress_bar = 2, 1, False
if data_dir:
  config.data_dir = data_dir
with tfds.testing.mock_data(num_examples=256, policy=tfds.testing.MockPolicy.USE_CODE):
  train.train_and_evaluate(config, workdir)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@functools.cache
def _imagenet_folder(root: str) -> str:
  """ROOT/train/<class>/ + ROOT/val/<class>/, 1000 classes of one 64x80 JPEG each."""
  from PIL import Image
  folder = os.path.join(root, 'imagenet')
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for c in range(1000):
      os.makedirs(os.path.join(folder, split, f'n{c:08d}'))
      Image.fromarray(rng.integers(0, 256, (64, 80, 3), np.uint8)).save(
          os.path.join(folder, split, f'n{c:08d}', '0.JPEG'))
  return folder


@functools.cache
def _run(name: str, layout: tuple[int, int], root: str) -> dict:
  """Runs `name` on `layout`; its losses, its config.json and process 0's log."""
  processes, devices = layout
  workdir = os.path.join(root, f'{name}_{processes}x{devices}')
  data_dir = os.path.join(root, 'chars') if name in FOLDER_CONFIGS else ''
  if name == 'imagenet':  # its 1000 classes as a streamed folder of small photos
    data_dir = _imagenet_folder(root)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             TFDS_DATA_DIR=os.path.join(root, 'tfds'))  # the statistics cache goes there
  coordinator = f'127.0.0.1:{_free_port()}' if processes > 1 else ''
  logs = [os.path.join(root, f'{name}_{processes}x{devices}.{i}.log') for i in range(processes)]
  procs, start = [], time.time()
  try:
    for i in reversed(range(processes)):
      with open(logs[i], 'w') as log:
        procs.append(subprocess.Popen(
            [sys.executable, '-c', _RUN, name, workdir, data_dir, coordinator, str(processes),
             str(i)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True))
    codes = [proc.wait(timeout=_TIMEOUT) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
  log = open(logs[0]).read()
  assert codes == [0] * processes, log[-3000:]
  metrics = read_metrics(workdir)
  return {'train': [m['train_loss'] for m in metrics if 'train_loss' in m],
          'test': [m['test_loss'] for m in metrics if 'test_loss' in m],
          'config': json.load(open(os.path.join(workdir, 'config.json'))),
          'log': log, 'seconds': time.time() - start}


@pytest.fixture(scope='session')
def matrix_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp('matrix'))


def _cases():
  cases = []
  for name in CONFIGS:
    for layout in LAYOUTS:
      marks = () if FULL or (name, layout) in SLICE else pytest.mark.skip(
          reason='the full matrix: NIN_JAX_MATRIX=full')
      cases.append(pytest.param(name, layout, marks=marks, id=f'{name}-{layout[0]}x{layout[1]}'))
  return cases


@pytest.mark.parametrize('name,layout', _cases())
def test_a_config_as_written_gives_one_devices_losses_on_every_layout(name, layout, matrix_root):
  one = _run(name, (1, 1), matrix_root)
  other = _run(name, layout, matrix_root)
  processes, devices = layout
  assert len(one['train']) == 2 and len(one['test']) == 1, one['log'][-3000:]
  np.testing.assert_allclose(other['train'], one['train'], rtol=1e-4)
  np.testing.assert_allclose(other['test'], one['test'], rtol=1e-4)
  # The global batch is the config's; the evaluation batch rounded up to the devices, if needed.
  written = one['config']
  multiple = np.lcm(processes * devices, processes)
  assert other['config']['batch_size'] == written['batch_size']
  assert other['config']['eval_batch_size'] == -(-written['eval_batch_size'] // multiple) * multiple
  over = f'over {processes * devices} devices in {processes} processes'
  assert over in other['log'], other['log'][-3000:]
  if os.environ.get('NIN_JAX_MATRIX_TABLE'):  # the figures of docs/distributed.md's table
    worst = max(abs(a / b - 1) for a, b in zip(other['train'] + other['test'],
                                                one['train'] + one['test']))
    with open(os.environ['NIN_JAX_MATRIX_TABLE'], 'a') as f:
      f.write(json.dumps({'config': name, 'layout': f'{processes}x{devices}',
                          'losses': one['train'] + one['test'], 'worst_rel_diff': worst,
                          'seconds': [one['seconds'], other['seconds']]}) + '\n')
