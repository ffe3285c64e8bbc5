"""The streaming input path (nin_jax/stream.py): the in-memory path's batches from files read as
it trains, the ImageNet folder layout, its crops, bad files, resumption and several processes."""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from conftest import REPO, config_flags, read_metrics, run_main, tiny_config, write_photos
from experiments import default
from nin_jax import datasets
from nin_jax import device_input
from nin_jax import input_pipeline
from nin_jax import sampler
from nin_jax import settings
from nin_jax import stream
from nin_jax.errors import UserError


def _config(root, **overrides):
  config = default.get_config()
  config.data_dir = root
  config.generate_chars = False
  config.num_classes = 3
  config.image_size = 12
  config.image_channels = 3
  config.batch_size = 8
  config.eval_batch_size = 8
  config.augment = 'translate_flip'
  for key, value in overrides.items():
    config[key] = value
  return config


def _create(config, process_index=0, process_count=1):
  return input_pipeline.create_data(config, process_index=process_index,
                                    process_count=process_count)


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  return write_photos(tmp_path_factory.mktemp('photos'))


# --- The same batches as in memory --------------------------------------------------------------


@pytest.mark.parametrize('workers', [0, 2])
@pytest.mark.parametrize('resize_size', [0, 16])
def test_stream_gives_the_in_memory_batches(photos, workers, resize_size):
  """Same rows, same draws, equal images: over an epoch's end (30 images, batch 8), for both
  processes of two, from steps 0 and 5 (a resumed stream starts where it is asked)."""
  for process_index in (0, 1):
    config = _config(photos, resize_size=resize_size)
    memory = _create(_config(photos, resize_size=resize_size, input_pipeline='host'),
                     process_index, 2)
    streamed = _create(_config(photos, resize_size=resize_size, input_pipeline='stream',
                               stream_workers=workers), process_index, 2)
    assert not memory.streamed and streamed.streamed and streamed.workers == workers
    assert streamed.num_train_examples == memory.num_train_examples == 30
    np.testing.assert_array_equal(streamed.preprocessor.statistics()['mean'],
                                  memory.preprocessor.statistics()['mean'])
    for start in (0, 5):
      with contextlib.closing(streamed.train_batches(start)) as batches:
        for step, batch in zip(range(start, start + 5), batches):
          expected = memory.train_batch(step)
          assert set(batch) == set(expected) == {'image', 'label', 'shifts', 'flips'}
          for key in expected:
            np.testing.assert_array_equal(batch[key], expected[key])
    for got, expected in zip(streamed.eval_batches(), memory.eval_batches(), strict=True):
      for key in ('image', 'label', 'mask'):
        np.testing.assert_array_equal(got[key], expected[key])
    assert config.input_pipeline == 'auto'


def test_train_val_layout_and_its_messages(tmp_path, photos):
  data = _create(_config(photos, input_pipeline='host'))
  assert data.class_names == ['cat', 'dog', 'owl']
  assert (data.num_train_examples, data.num_test_examples) == (30, 9)
  np.testing.assert_array_equal(data.test_labels, np.repeat([0, 1, 2], 3))
  lone = write_photos(tmp_path / 'lone', per_class=(2, 1))
  os.rename(os.path.join(lone, 'train'), os.path.join(lone, 'training'))
  with pytest.raises(UserError, match=r'val/ folder but no train/ folder'):
    _create(_config(lone))
  os.rename(os.path.join(lone, 'training'), os.path.join(lone, 'train'))
  os.rename(os.path.join(lone, 'val'), os.path.join(lone, 'valid'))
  with pytest.raises(UserError, match=r'train/ folder but no test/ or val/ folder'):
    _create(_config(lone))


# --- Crops ---------------------------------------------------------------------------------------


def _encode(pixels, fmt='PNG'):
  import io
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


def test_decode_resizes_the_shorter_side_and_crops_where_drawn():
  # 20 x 40 (h x w) of column numbers: resize_size=10 makes it 10 x 20, crops are 10 x 10.
  columns = np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1))
  data = _encode(columns)
  decode = lambda crop: datasets.decode_image(data, 10, 1, resize_size=10, crop=crop)[..., 0]
  centre, left, right = decode(None), decode((0.0, 0.0)), decode((0.99, 0.99))
  assert centre.shape == (10, 10)
  full = datasets.decode_image(data, 10, 1)[..., 0]  # resize_size=0: squashed, not cropped
  span = lambda image: int(image[0, -1]) - int(image[0, 0])
  assert span(full) > 1.8 * span(centre)  # 40 columns in 10 pixels, against 20 in 10
  assert left[0, 0] <= 6 and right[0, -1] >= 228  # the windows reach both ends
  assert left[0, 0] < centre[0, 0] < right[0, 0]  # the window moves right with v
  np.testing.assert_array_equal(decode((0.5, 0.5)), centre)  # (free + 1) * 0.5 = free // 2 + 0.5
  # Offsets cover the free range (10 columns: 11 places) evenly.
  firsts = {decode((0.0, v))[0, 0] for v in np.linspace(0, 0.999, 50)}
  assert len(firsts) == 11


def test_crop_flip_crops_every_batch_differently_and_needs_the_stream(photos):
  config = _config(photos, resize_size=20, image_size=12, augment='crop_flip')
  data = _create(config)
  assert data.streamed  # 'auto' streams: crops need the whole image
  draws = data.train_draws(3)
  assert draws['crops'].shape == (8, 2) and draws['flips'].any() and not draws['shifts'].any()
  with contextlib.closing(data.train_batches(3)) as batches:
    batch = next(batches)
  images, _, _, _ = stream.read_rows(data.train_source, data.decoder, draws['rows'],
                                     draws['crops'])
  centred, _, _, _ = stream.read_rows(data.train_source, data.decoder, draws['rows'])
  assert (images != centred).any()
  np.testing.assert_array_equal(batch['image'], images)  # the crops, uint8
  np.testing.assert_array_equal(batch['flips'], draws['flips'])
  # The train step preprocesses and mirrors them.
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  made = jax.jit(device_input.batch_makers(data)[0])(
      batch, device_input.put_on_devices(data, sharding, dataset=False))
  expected = data.preprocessor(images)
  expected[draws['flips']] = expected[draws['flips']][:, :, ::-1]
  np.testing.assert_allclose(jax.device_get(made['image']), expected, atol=1e-5)
  for key, value in (('input_pipeline', 'host'), ('resize_size', 0)):
    with pytest.raises(UserError, match=f'config.{key if value else "augment"}'):
      settings.validate(_config(photos, **{'resize_size': 20, 'augment': 'crop_flip', key: value}))


def test_auto_streams_a_folder_larger_than_its_share_of_memory(photos, monkeypatch, caplog):
  monkeypatch.setattr(input_pipeline, 'host_memory_bytes', lambda: 100_000)
  with caplog.at_level(logging.INFO):
    assert _create(_config(photos, stream_memory_fraction=0.1)).streamed  # 12,960 B > 10,000
    assert not _create(_config(photos, stream_memory_fraction=0.2)).streamed
  lines = [r.getMessage() for r in caplog.records if 'input_pipeline=auto' in r.getMessage()]
  assert 'exceed 10%' in lines[0] and 'fit in 20%' in lines[1], lines
  assert '30 at 12x12x3' in lines[0]


# --- Bad files -----------------------------------------------------------------------------------


def test_bad_files_are_skipped_counted_and_replaced_in_their_batch(tmp_path, caplog):
  root = write_photos(tmp_path / 'bad')
  good = open(os.path.join(root, 'train', 'dog', '001.JPEG'), 'rb').read()
  with open(os.path.join(root, 'train', 'dog', '000.JPEG'), 'wb') as f:
    f.write(good[:len(good) // 2])  # truncated
  with open(os.path.join(root, 'val', 'owl', '000.JPEG'), 'w') as f:
    f.write('not an image')
  config = _config(root, input_pipeline='stream', stream_workers=0, augment='none')
  with caplog.at_level(logging.WARNING):
    data = _create(config)  # the preprocessing's fit meets the truncated file
    bad_row = data.train_source.files.index(os.path.join(root, 'train', 'dog', '000.JPEG'))
    step = next(s for s in range(20) if bad_row in data.train_draws(s)['rows'])
    with contextlib.closing(data.train_batches(step)) as batches:
      batch = next(batches)
    evaluated = list(data.eval_batches())
  rows = data.train_draws(step)['rows']
  i = list(rows).index(bad_row)
  readable = [j for j in range(len(rows)) if rows[j] != bad_row]
  j = next((k for k in readable if k > i), readable[0])  # the batch's next readable image
  np.testing.assert_array_equal(batch['image'][i], batch['image'][j])
  assert batch['label'][i] == data.train_source.labels[rows[j]]
  assert sum(b['mask'].sum() for b in evaluated) == 8  # 9 test images, one unreadable
  assert [line.split(':')[0] for line in data.skipped_files] == [
      os.path.join(root, 'train', 'dog', '000.JPEG'), os.path.join(root, 'val', 'owl', '000.JPEG')]
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert sum('000.JPEG' in w for w in warnings) == 2  # each file once, however often it is met


def test_an_error_in_a_worker_is_one_line_naming_the_file(tmp_path):
  root = write_photos(tmp_path / 'gone', per_class=(3, 1))
  data = _create(_config(root, input_pipeline='stream', stream_workers=2, batch_size=4))
  for path in data.train_source.files:  # every training image gone after the start
    os.remove(path)
  with pytest.raises(UserError, match=r'step 0: not one of the 4 images .*JPEG: no such file'):
    with contextlib.closing(data.train_batches(0)) as batches:
      next(batches)


# --- Runs ----------------------------------------------------------------------------------------


def _children(pid):
  found = []
  for task in os.listdir(f'/proc/{pid}/task'):
    with contextlib.suppress(FileNotFoundError):
      found += [int(c) for c in open(f'/proc/{pid}/task/{task}/children').read().split()]
  return found


def _stream_run_config(root, **overrides):
  settings = dict(image_size=12, image_channels=3, resize_size=16, augment='crop_flip',
                  stream_workers=2, batch_size=8, eval_batch_size=8)
  return tiny_config(root, **{**settings, **overrides})


def test_a_streamed_run_killed_with_sigkill_resumes_bit_exact(tmp_path):
  """Under `python -m nin_jax.main` (absl's flags, two workers): killed between checkpoints,
  its workers end with it; resumed, it ends with the uninterrupted run's records."""
  root = write_photos(tmp_path / 'photos')
  config = _stream_run_config(root)
  straight = run_main(tmp_path / 'straight', config)
  assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
  assert 'leaked' not in straight.stderr, straight.stderr[-2000:]
  broken = tmp_path / 'broken'
  proc = run_main(broken, config, wait=False)
  try:
    deadline = time.time() + 240
    while not os.path.isdir(broken / 'checkpoints' / '12') and time.time() < deadline:
      assert proc.poll() is None, proc.stdout.read()[-3000:]
      time.sleep(0.05)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    proc.kill()
  assert len(workers) >= 2  # the stream's (and multiprocessing's resource tracker)
  deadline = time.time() + 20
  while any(os.path.exists(f'/proc/{w}') for w in workers) and time.time() < deadline:
    time.sleep(0.1)
  alive = [w for w in workers if os.path.exists(f'/proc/{w}')
           and open(f'/proc/{w}/stat').read().split()[2] != 'Z']
  assert not alive, 'workers outlived their trainer'
  resumed = run_main(broken, config)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from the checkpoint of step 12' in resumed.stderr
  drop = lambda records: [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in records]
  assert drop(read_metrics(broken)) == drop(read_metrics(tmp_path / 'straight'))
  results = [json.load(open(tmp_path / d / 'results.json')) for d in ('straight', 'broken')]
  assert results[0]['input_pipeline'] == results[1]['input_pipeline'] == 'stream'
  assert results[0]['test_loss'] == results[1]['test_loss']
  assert results[0]['skipped_files'] == 0


# One process of a two-process run: `python -m nin_jax.main`, with every file it opens under
# the data folder written down (an audit hook sees each open() of this process; the stream reads
# on its threads here, stream_workers=0) and a preprocessing fit on 6 training images.
_AUDITED = r'''
import json, runpy, sys
opened, root, out = [], sys.argv[1], sys.argv[2]
def hook(event, args):
  if event == 'open' and isinstance(args[0], str) and args[0].startswith(root):
    opened.append(args[0])
sys.addaudithook(hook)
from nin_jax import stream
stream.FIT_IMAGES = 6
sys.argv = ['nin_jax.main', *sys.argv[3:]]
try:
  runpy.run_module('nin_jax.main', run_name='__main__')
finally:
  json.dump(opened, open(out, 'w'))
'''


def test_two_processes_each_read_only_their_own_rows(tmp_path):
  import socket
  root = write_photos(tmp_path / 'photos', per_class=(40, 4))  # 15 steps an epoch
  config = _stream_run_config(root, stream_workers=0, num_train_steps=8,
                              checkpoint_every_steps=8, eval_every_steps=8)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]

  def command(workdir, out, *flags):
    return [sys.executable, '-c', _AUDITED, root, str(out), '--config', 'experiments/default.py',
            '--workdir', str(workdir), *config_flags(config), *flags]

  procs = [subprocess.Popen(command(tmp_path / 'two', tmp_path / f'opened{i}.json',
                                    f'--coordinator_address=127.0.0.1:{port}',
                                    '--num_processes=2', f'--process_id={i}'),
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in (1, 0)]
  one = subprocess.run(command(tmp_path / 'one', tmp_path / 'opened_one.json'), cwd=REPO,
                       env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=4'),
                       capture_output=True, text=True, timeout=300)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[1][-3000:]
  assert one.returncode == 0, one.stderr[-3000:]

  listing = datasets.list_folder(_config(root))
  files = listing.train_files + listing.test_files
  fit_rows = np.random.default_rng([0, stream._FIT_STREAM]).choice(  # pylint: disable=protected-access
      len(listing.train_files), 6, replace=False)
  fit = {listing.train_files[r] for r in fit_rows}  # read by both processes
  for process_index, opened_file in ((0, 'opened0.json'), (1, 'opened1.json')):
    draws = sampler.Sampler(
        num_train_examples=len(listing.train_files), num_test_examples=len(listing.test_files),
        batch_size=8, eval_batch_size=8, augment='crop_flip', process_index=process_index,
        process_count=2)
    rows = lambda steps: {listing.train_files[r] for step in steps
                          for r in draws.train_draws(step)['rows']}
    evaluated = {listing.test_files[r] for d in draws.eval_draws() for r in d['rows'][d['mask']]}
    opened = set(json.load(open(tmp_path / opened_file)))
    assert opened <= set(files)
    # Every row of its 8 steps, and beyond them only its rows of the steps read ahead: this
    # process's half of the first epoch (15 steps), never the other's.
    assert opened >= rows(range(8)) | evaluated | fit
    assert opened <= rows(range(15)) | evaluated | fit, sorted(opened - rows(range(15)) - fit)
  losses = lambda workdir: [r['train_loss'] for r in read_metrics(workdir) if 'train_loss' in r]
  np.testing.assert_allclose(losses(tmp_path / 'two'), losses(tmp_path / 'one'), rtol=1e-4)
