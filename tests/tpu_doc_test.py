"""Runs the commands of docs/tpu.md that can run on this machine, as the page writes them.

Each block is taken from the page by its `<!-- NAME: tests/tpu_doc_test.py runs this block -->`
mark (and the job script from docs/distributed.md), so the page and this test cannot drift
apart. What this machine lacks has a stand-in: `gcloud ... tpu-vm ssh` and `srun` are one small
script on PATH that starts the hosts (or tasks) as local processes of 4 fake CPU devices each,
with the variables of a SLURM step from which JAX reads the process count, index and
coordinator; a `gs://$BUCKET` path is a local folder; CIFAR-10's download is a small fake archive
of the real format in TFDS's download folder. Every process is started in its own session and
killed in `finally`; every wait has a timeout.
"""

import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tarfile

import numpy as np

from conftest import REPO, read_metrics

_DOC = os.path.join(REPO, 'docs', 'tpu.md')
_DISTRIBUTED_DOC = os.path.join(REPO, 'docs', 'distributed.md')
# Environment variables through which JAX (or a launcher) would detect a cluster.
_CLUSTER_PREFIXES = ('SLURM_', 'OMPI_', 'PMI_', 'PMIX_', 'TPU_', 'MEGASCALE_', 'KUBERNETES_',
                     'JAX_COORDINATOR', 'JAX_LOCAL_DEVICE_IDS')
_HOSTS, _DEVICES = 2, 4       # 8 devices in all: the config's batch of 128 splits, 500 does not
_TIMEOUT = 300                # seconds for one command of the page, on a busy two-core machine
# Appended to the training command only: two steps of the tiny test net. The rest of
# experiments/cifar10.py runs as written (batch 128, eval batch 500, GCN + ZCA, the data init).
_TEST_FLAGS = ('--config.num_train_steps=2 --config.progress_bar=False '
               '--config.model=_nin_tiny --config.image_size=12')
_CIFAR10_CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse',
                    'ship', 'truck']
_NUM_TRAIN, _NUM_TEST = 250, 40


# --- The page -----------------------------------------------------------------------------------

def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _block(name: str) -> str:
  match = re.search(rf'<!-- {name}: tests/tpu_doc_test.py runs this block -->\s*```sh\n(.*?)```',
                    _read(_DOC), re.S)
  assert match, f'{_DOC}: the block marked {name} is missing'
  return match.group(1)


def _replace(block: str, replacements: dict[str, str], name: str) -> str:
  for old, new in replacements.items():
    assert old in block, f'{_DOC}: block {name} no longer says {old!r}'
    block = block.replace(old, new)
  return block


# --- Stand-ins ----------------------------------------------------------------------------------

_STAND_IN = r'''#!{python}
"""Stand-in for `gcloud compute tpus tpu-vm ssh TPU --zone=Z --worker=W --command=CMD` and for
`srun COMMAND...`: the hosts (tasks) are local processes, logged to $STAND_IN_LOGS/<i>.log."""
import os, shlex, subprocess, sys

tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
hosts = int(os.environ['STAND_IN_HOSTS'])
extra = shlex.split(os.environ.get('STAND_IN_EXTRA_FLAGS', ''))
if tool == 'gcloud':
  if args[:4] != ['compute', 'tpus', 'tpu-vm', 'ssh'] or len(args) < 5:
    sys.exit(f'stand-in gcloud: not a tpu-vm ssh command: {{args}}')
  flags = dict(a[2:].split('=', 1) for a in args[5:] if a.startswith('--') and '=' in a)
  if len(flags) != len(args) - 5 or set(flags) - {{'zone', 'worker', 'command'}}:
    sys.exit(f'stand-in gcloud: unexpected arguments {{args[5:]}}')
  ids = range(hosts) if flags.get('worker', '0') == 'all' else [int(flags['worker'])]
  commands = [['bash', '-c', ' '.join([flags['command'], *map(shlex.quote, extra)])]] * len(ids)
  cwd = os.environ['HOME']  # where ssh lands
  cluster = len(ids) > 1
elif tool == 'srun':
  ids, commands, cwd, cluster = range(hosts), [args + extra] * hosts, os.getcwd(), True
else:
  sys.exit(f'stand-in: unknown tool {{tool}}')
procs = []
for i, command in zip(ids, commands):
  env = dict(os.environ)
  if cluster:  # what srun sets; on a pod slice JAX reads the same from the TPU metadata
    env.update(SLURM_JOB_ID='4242', SLURM_STEP_NODELIST='127.0.0.1', SLURM_NTASKS=str(hosts),
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID='0')
  with open(os.path.join(os.environ['STAND_IN_LOGS'], f'{{i}}.log'), 'w') as log:
    procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
codes = [proc.wait() for proc in procs]
sys.exit(next((code for code in codes if code), 0))
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _stand_ins(root) -> str:
  """ROOT/bin, with the stand-in `gcloud` and `srun`."""
  bin_dir = os.path.join(root, 'bin')
  os.makedirs(bin_dir, exist_ok=True)
  for tool in ('gcloud', 'srun'):
    path = os.path.join(bin_dir, tool)
    with open(path, 'w') as f:
      f.write(_STAND_IN.format(python=sys.executable))
    os.chmod(path, 0o755)
  return bin_dir


def _tpu_home(root) -> str:
  """A host's home after step 2 of the page: ~/nin_jax, a clone with its .venv/bin/python."""
  home = os.path.join(root, 'home')
  clone = os.path.join(home, 'nin_jax')
  os.makedirs(os.path.join(clone, '.venv', 'bin'))
  for name in ('nin_jax', 'experiments'):
    os.symlink(os.path.join(REPO, name), os.path.join(clone, name))
  python = os.path.join(clone, '.venv', 'bin', 'python')
  with open(python, 'w') as f:
    f.write(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  os.chmod(python, 0o755)
  return home


def _env(root, home) -> dict[str, str]:
  """This environment without any cluster's variables, the stand-ins first on PATH."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(_CLUSTER_PREFIXES) and k != 'TFDS_DATA_DIR'}
  env.update(
      PATH=os.pathsep.join([_stand_ins(root), os.path.dirname(sys.executable),
                            env.get('PATH', '')]),
      HOME=str(home), JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={_DEVICES}',
      STAND_IN_HOSTS=str(_HOSTS), TPU_NAME='nin-pod', ZONE='us-west4-a', BUCKET='unused')
  return env


def _run(script: str, env, cwd, logs, timeout=_TIMEOUT, **extra_env: str
         ) -> tuple[int, list[str]]:
  """Runs a shell script in its own session; returns its status and the hosts' logs (or its
  own output, where it started no host)."""
  os.makedirs(logs, exist_ok=True)
  env = dict(env, STAND_IN_LOGS=str(logs), **extra_env)
  with open(os.path.join(logs, 'shell.log'), 'w') as log:
    proc = subprocess.Popen(['bash', '-c', script], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
  try:
    code = proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)  # the session we started: the shell and every host
      proc.wait(timeout=30)
  hosts = sorted(n for n in os.listdir(logs) if n != 'shell.log')
  outputs = [_read(os.path.join(logs, n)) for n in hosts]
  shell = _read(os.path.join(logs, 'shell.log'))
  return code, [shell + out for out in outputs] or [shell]


# --- CIFAR-10's download ------------------------------------------------------------------------

def _serve_cifar10_download(data_dir: str) -> None:
  """Puts a small CIFAR-10 archive of the real format where TFDS looks for a finished download
  (DATA_DIR/downloads/<name>, with its .INFO file), so download_and_prepare uses it."""
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core.download import resource  # pylint: disable=g-import-not-at-top
  tsv = os.path.join(os.path.dirname(tensorflow_datasets.__file__), 'url_checksums',
                     'cifar10.txt')
  url, size, checksum, filename = _read(tsv).split()
  path = os.path.join(data_dir, 'downloads', resource.get_dl_fname(url, checksum))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(0)

  def batch(n):  # cuda-convnet's binary format: a label byte, then 32x32x3 planar pixels
    labels = (np.arange(n) % 10).astype(np.uint8)[:, None]
    return np.concatenate([labels, rng.integers(0, 256, (n, 3072), np.uint8)], 1).tobytes()

  files = {f'data_batch_{i}.bin': batch(_NUM_TRAIN // 5) for i in range(1, 6)}
  files['test_batch.bin'] = batch(_NUM_TEST)
  files['batches.meta.txt'] = ''.join(f'{name}\n' for name in _CIFAR10_CLASSES).encode()
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  with open(path + '.INFO', 'w') as f:
    json.dump({'urls': [url], 'dataset_names': ['cifar10'], 'original_fname': filename,
               'url_info': {'size': int(size), 'checksum': checksum, 'filename': filename}}, f)


def _prepare(script: str, env, cwd, logs, data_dir: str, name: str) -> None:
  _serve_cifar10_download(data_dir)
  code, outputs = _run(script, env, cwd, logs)
  hint = ('' if 'importlib_resources' not in outputs[0] else
          '\nTFDS needs importlib_resources to prepare a dataset and does not declare it: the '
          "page's install line installs it; this environment lacks it (pyproject.toml should "
          'list it)')
  assert code == 0, f'{name}: {outputs[0][-3000:]}{hint}'
  info = json.loads(_read(os.path.join(data_dir, 'cifar10', '3.0.2', 'dataset_info.json')))
  lengths = {s['name']: sum(map(int, s['shardLengths'])) for s in info['splits']}
  assert lengths == {'train': _NUM_TRAIN, 'test': _NUM_TEST}, lengths


# --- The checks ---------------------------------------------------------------------------------

def _results(workdir):
  return json.loads(_read(os.path.join(workdir, 'results.json')))


def _check_run(workdir, outputs, name: str) -> dict:
  """What a finished run of the page's command on 2 hosts x 4 devices must have left."""
  assert len(outputs) == _HOSTS, outputs
  first, other = outputs
  for out in outputs:
    assert 'Traceback' not in out, f'{name}: {out[-3000:]}'
    assert not re.search('^error:', out, re.M), f'{name}: {out[-3000:]}'
  assert 'JAX process 0 of 2; 4 local devices of 8' in first, first[-3000:]
  assert 'No cluster detected' not in first + other  # joined without the three flags
  final = re.compile(r'^test accuracy \d', re.M)  # the run's last line, printed by host 0 alone
  assert len(final.findall(first)) == 1 and not final.search(other), first[-3000:]
  results = _results(workdir)
  assert (results['processes'], results['devices']) == (2, 8), results
  assert (results['experiment'], results['dataset'], results['step']) == ('cifar10', 'cifar10', 2)
  assert results['num_test_examples'] == _NUM_TEST  # padding masked: each image counted once
  return results


def test_a_batch_that_does_not_split_over_the_slice_is_one_error_line(tmp_path):
  match = re.search(r'<!-- tpu-check-batch[^>]*-->\s*```sh\n(.*?)```\s*```text\n(.*?)```',
                    _read(_DOC), re.S)
  assert match, f'{_DOC}: the tpu-check-batch block and its output are missing'
  workdir = tmp_path / 'check'
  script = _replace(match.group(1), {'/tmp/nin_check': str(workdir)}, 'tpu-check-batch')
  code, (out,) = _run(script, _env(tmp_path, tmp_path), REPO, tmp_path / 'logs', timeout=120)
  assert code == 2, out[-3000:]
  assert [line for line in out.splitlines() if line.startswith('error:')] == [
      match.group(2).strip()], out[-3000:]
  assert 'Traceback' not in out
  assert not workdir.exists()  # stopped before anything was written


def test_the_tpu_pod_recipe_prepares_runs_resumes_and_reports(tmp_path):
  home, bucket = _tpu_home(tmp_path), tmp_path / 'bucket'
  data_dir, workdir = bucket / 'tensorflow_datasets', bucket / 'runs' / 'cifar10'
  env = _env(tmp_path, home)
  on_bucket = {'gs://$BUCKET': str(bucket)}

  # Step 3: one host prepares the data onto the bucket.
  _prepare(_replace(_block('tpu-prepare'), on_bucket, 'tpu-prepare'), env, REPO,
           tmp_path / 'prepare', str(data_dir), 'tpu-prepare')

  # Step 5: the one command, on every host.
  run = _replace(_block('tpu-run'), on_bucket, 'tpu-run')
  code, outputs = _run(run, env, REPO, tmp_path / 'run', STAND_IN_EXTRA_FLAGS=_TEST_FLAGS,
                       JAX_COORDINATOR_PORT=str(_free_port()))
  assert code == 0, outputs[0][-3000:]
  results = _check_run(workdir, outputs, 'tpu-run')
  config = json.loads(_read(workdir / 'config.json'))
  assert (config['batch_size'], config['eval_batch_size']) == (128, 504)  # 500, rounded up
  assert (config['preprocess'], config['init']) == ('gcn_zca', 'data')
  assert config['data_dir'] == str(data_dir)
  assert 'eval_batch_size 500 rounded up to 504' in outputs[0]
  assert json.loads(_read(workdir / 'class_names.json')) == _CIFAR10_CLASSES
  names = os.listdir(workdir)
  for name in ('preprocessing.npz', 'metrics.jsonl', 'results.json', 'checkpoints'):
    assert name in names, names
  assert len([n for n in names if n.startswith('events.out.tfevents.')]) == 1, names
  assert os.listdir(workdir / 'checkpoints') == ['2']
  assert len(os.listdir(data_dir / '.nin_jax_cache')) == 1  # both hosts use the first file
  metrics = read_metrics(workdir)
  assert [m['step'] for m in metrics if 'train_loss' in m] == [2]  # logged at the last step

  # Step 6: the same command again resumes from the last checkpoint.
  code, outputs = _run(run, env, REPO, tmp_path / 'rerun', STAND_IN_EXTRA_FLAGS=_TEST_FLAGS,
                       JAX_COORDINATOR_PORT=str(_free_port()))
  assert code == 0, outputs[0][-3000:]
  assert f'Resuming from the checkpoint of step 2 in {workdir}' in outputs[0], outputs[0][-3000:]
  resumed = _check_run(workdir, outputs, 'tpu-run, again')
  assert resumed['test_loss'] == results['test_loss']
  assert [m for m in read_metrics(workdir) if 'train_loss' in m] == [
      m for m in metrics if 'train_loss' in m]  # no step trained twice

  # The report reads the run where it lies.
  report = _replace(_block('tpu-report'), on_bucket, 'tpu-report')
  code, (out,) = _run(report, env, REPO, tmp_path / 'report', timeout=120)
  assert code == 0, out[-3000:]
  assert re.search(r'^\| cifar10 \| cifar10 \| cifar10 \| _nin_tiny \| 2 \|', out, re.M), out


def _job_script() -> str:
  match = re.search(r'```sh\n(#!/bin/bash\n#SBATCH.*?)```', _read(_DISTRIBUTED_DOC), re.S)
  assert match, f'{_DISTRIBUTED_DOC}: the SLURM job script is missing'
  script = match.group(1)
  assert re.search(r'^srun python -m nin_jax\.main ', script, re.M), script
  return script


def test_the_slurm_recipe_prepares_and_runs_the_job_script(tmp_path):
  home = tmp_path / 'home'
  home.mkdir()
  env = _env(tmp_path, home)
  _prepare(_block('slurm-prepare'), env, REPO, tmp_path / 'prepare',
           str(home / 'tensorflow_datasets'), 'slurm-prepare')

  # sbatch would run the script on the job's first node, in the folder it was submitted from.
  script = tmp_path / 'nin_2x8.sbatch'
  script.write_text(_job_script())
  code, outputs = _run(f'bash {shlex.quote(str(script))}', env, tmp_path, tmp_path / 'job',
                       SLURM_SUBMIT_DIR=REPO, STAND_IN_EXTRA_FLAGS=_TEST_FLAGS,
                       JAX_COORDINATOR_PORT=str(_free_port()))
  assert code == 0, outputs[0][-3000:]
  _check_run(home / 'runs' / 'cifar10_2x8', outputs, 'the job script')
