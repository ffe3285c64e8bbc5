"""Every input path gives the train step the same batches, made in the step; the device-resident
path trains as the host path does."""

import functools
import json
import os

import jax
import numpy as np
import pytest

from conftest import read_metrics, reference_shift, run_main, tiny_config
from experiments import default
from nin_jax import augment as augment_lib
from nin_jax import device_input
from nin_jax import input_pipeline
from nin_jax import settings
from nin_jax import train
from nin_jax.errors import UserError


def random_data(preprocess, augment, *, size=8, channels=3, translate_pixels=2, **config_overrides):
  """A Data of random uint8 images: 37 train (batches of 8 wrap around the epochs), 13 test
  (eval batches of 6: the last one padded)."""
  rng = np.random.default_rng(0)
  config = default.get_config()
  config.preprocess, config.augment, config.translate_pixels = preprocess, augment, translate_pixels
  config.batch_size, config.eval_batch_size, config.seed = 8, 6, 3
  for key, value in config_overrides.items():
    config[key] = value
  shape = (size, size, channels)
  return input_pipeline.data_from_arrays(
      config, train_images=rng.integers(0, 256, (37, *shape), dtype=np.uint8),
      train_labels=rng.integers(0, 4, 37), class_names=list('abcd'),
      test_images=rng.integers(0, 256, (13, *shape), dtype=np.uint8),
      test_labels=rng.integers(0, 4, 13), process_index=0, process_count=1)


@functools.lru_cache(maxsize=None)
def jitted(kind, augment, translate_pixels):
  return (jax.jit(functools.partial(device_input.train_batch, kind=kind, augment=augment,
                                    translate_pixels=translate_pixels)),
          jax.jit(functools.partial(device_input.eval_batch, kind=kind)))


@pytest.mark.parametrize('augment', settings.AUGMENTS)
@pytest.mark.parametrize('preprocess', settings.PREPROCESS)
def test_device_batches_are_the_host_batches(preprocess, augment):
  """Both paths' inputs make the same network batch in the step: the drawn rows, preprocessed,
  moved and mirrored as drawn (checked pixel by pixel against the reference shift)."""
  data = random_data(preprocess, augment)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  on_devices = device_input.put_on_devices(data, sharding, dataset=True)
  statistics = device_input.put_on_devices(data, sharding, dataset=False)
  train_fn, eval_fn = jitted(preprocess, augment, data.translate_pixels)
  for step in range(10):  # two epochs and more of 4 steps
    draws = data.train_draws(step)
    host = data.train_batch(step)
    np.testing.assert_array_equal(host['image'], data.train_images_uint8[draws['rows']])
    from_host = jax.device_get(train_fn(host, statistics))
    from_device = jax.device_get(train_fn(draws, on_devices))
    np.testing.assert_array_equal(from_device['image'], from_host['image'], f'step {step}')
    np.testing.assert_array_equal(from_device['label'], host['label'])
    np.testing.assert_array_equal(host['label'], data.train_labels[draws['rows']])
    plain = data.preprocessor(host['image'])
    scale = max(1.0, float(np.abs(plain).max()))
    for i, (shift, flip) in enumerate(zip(draws['shifts'], draws['flips'])):
      expected = reference_shift(plain[i], *shift)
      expected = expected[:, ::-1] if flip else expected
      np.testing.assert_allclose(from_host['image'][i] / scale, expected / scale, atol=2e-5,
                                 err_msg=f'step {step}, image {i}')
  for host, draws in zip(data.eval_batches(), data.eval_draws(), strict=True):
    from_host = jax.device_get(eval_fn(host, statistics))
    from_device = jax.device_get(eval_fn(draws, on_devices))
    np.testing.assert_array_equal(from_device['mask'], host['mask'])
    mask = host['mask']
    np.testing.assert_array_equal(from_device['label'][mask], host['label'][mask])
    np.testing.assert_array_equal(from_device['image'][mask], from_host['image'][mask])


def test_the_augmentation_really_moves_and_mirrors_the_images():
  """Guards the test above: with translate_flip, batches differ from the plain images."""
  data = random_data('none', 'translate_flip')
  draws = data.train_draws(0)
  assert draws['flips'].any() and (draws['shifts'] != 0).any()
  plain = data.preprocessor(data.train_images(draws['rows']))
  moved = jax.device_get(augment_lib.translate_and_flip(
      plain, draws['shifts'], draws['flips'], data.translate_pixels))
  changed = [not np.array_equal(a, b) for a, b in zip(moved, plain)]
  expected = (draws['shifts'] != 0).any(axis=1) | draws['flips']
  np.testing.assert_array_equal(changed, expected)


def test_auto_keeps_cpu_runs_on_the_host_and_fits_accelerators(monkeypatch):
  data = random_data('gcn_zca', 'none')
  assert device_input.choose_pipeline('auto', data) == (
      'host' if jax.default_backend() == 'cpu' else 'device')
  assert device_input.choose_pipeline('host', data) == 'host'
  assert device_input.choose_pipeline('device', data) == 'device'
  needed = device_input.dataset_bytes(data)
  assert needed == 50 * 8 * 8 * 3 + 50 * 4 + (192 + 192 * 192) * 4  # images, labels, ZCA
  # An accelerator with room for the data, then one without.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(device_input, 'device_memory_bytes', lambda: 4 * needed)
  assert device_input.choose_pipeline('auto', data) == 'device'
  monkeypatch.setattr(device_input, 'device_memory_bytes', lambda: 4 * needed - 1)
  assert device_input.choose_pipeline('auto', data) == 'host'
  monkeypatch.setattr(device_input, 'device_memory_bytes', lambda: needed - 1)
  with pytest.raises(UserError, match='input_pipeline=host'):
    device_input.choose_pipeline('device', data)


def test_a_device_pipeline_too_big_for_the_device_stops_before_the_data_loads():
  import importlib  # pylint: disable=g-import-not-at-top
  svhn = importlib.import_module('experiments.svhn').get_config()
  svhn.input_pipeline = 'device'
  # SVHN's train + extra + test splits at 32x32x3, a uint8 image and an int32 label each.
  assert device_input.tfds_dataset_bytes(svhn) == (73_257 + 531_131 + 26_032) * (3072 + 4)
  with pytest.raises(UserError, match=r'svhn_cropped needs 1\.8 GiB on every device, more than '
                     r'its 1\.0 GiB; use input_pipeline=host'):
    device_input.check_fits_before_load(svhn, 2**30)
  svhn.svhn_extra = False  # train + test: 194 MB, fits
  device_input.check_fits_before_load(svhn, 2**30)
  svhn.svhn_extra, svhn.input_pipeline = True, 'auto'  # auto falls back to the host, later
  device_input.check_fits_before_load(svhn, 2**30)
  svhn.input_pipeline = 'device'
  device_input.check_fits_before_load(svhn, None)  # CPU: device memory is host memory, unknown
  folder = importlib.import_module('experiments.chars').get_config()
  folder.input_pipeline = 'device'
  assert device_input.tfds_dataset_bytes(folder) is None  # known only once listed
  device_input.check_fits_before_load(folder, 1)


@pytest.mark.parametrize('devices', [1, 8])
def test_device_path_trains_like_the_host_path(blobs_folder, tmp_path, devices):
  """Whole runs (CLI, 8 fake devices too): same losses, same test result, the path recorded."""
  results = {}
  for pipeline in ('host', 'device'):
    workdir = tmp_path / pipeline
    config = tiny_config(blobs_folder, augment='translate_flip', input_pipeline=pipeline)
    proc = run_main(workdir, config, devices=devices)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(workdir, 'results.json')) as f:
      results[pipeline] = json.load(f)
    assert results[pipeline]['input_pipeline'] == pipeline
    results[pipeline]['metrics'] = read_metrics(workdir)
  host, device = results['host'], results['device']
  losses = lambda r: [m['train_loss'] for m in r['metrics'] if 'train_loss' in m]
  assert len(losses(host)) == 6
  np.testing.assert_allclose(losses(device), losses(host), rtol=1e-4)
  assert device['num_test_examples'] == host['num_test_examples'] == 24
  np.testing.assert_allclose(device['test_loss'], host['test_loss'], rtol=1e-4)


def test_unknown_input_pipeline_is_refused_before_loading(tmp_path):
  config = tiny_config(str(tmp_path / 'nothing-here'), input_pipeline='gpu')
  with pytest.raises(UserError, match='input_pipeline'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
