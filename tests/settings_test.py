"""Tests for nin_jax.settings: every field checked before anything loads, one line per mistake."""

import os
import subprocess
import sys
import time

import ml_collections
import pytest

from experiments import default
from nin_jax import augment, convs, datasets, device_input, models, preprocessing, settings
from nin_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  # Not type-safe: a config file can set a field to any type; the checks must catch it.
  config = ml_collections.ConfigDict(default.get_config().to_dict(), type_safe=False)
  config.update(overrides)
  return config


def test_the_vocabularies_are_the_modules_own():
  assert set(settings.MODELS) == set(models.MODELS)
  assert set(settings.DTYPES) == set(models.DTYPES)
  assert set(settings.PREPROCESS) == set(preprocessing.KINDS)
  assert settings.AUGMENTS is augment.AUGMENTS and settings.CONV_IMPLS is convs.CONV_IMPLS
  assert settings.INPUT_PIPELINES is device_input.INPUT_PIPELINES
  assert settings.DATASETS is datasets.DATASETS


def test_every_field_of_every_experiment_is_known_and_valid():
  import glob  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  assert set(default.get_config()) == set(settings.FIELDS)
  for path in sorted(glob.glob(os.path.join(REPO, 'experiments', '*.py'))):
    name = os.path.basename(path)[:-3]
    if name != '__init__':
      settings.validate(importlib.import_module(f'experiments.{name}').get_config())


# One of each kind of mistake: (override, the words the one line must hold).
BAD = [
    (dict(schedule='cosin'), "config.schedule='cosin' is not one of 'cosine'"),      # unknown
    (dict(model='nin_cifra'), "config.model='nin_cifra' is not one of 'nin_cifar'"),  # unknown
    (dict(batch_size='128'), 'config.batch_size=\'128\' must be an int, not str'),   # type
    (dict(progress_bar=1), 'config.progress_bar=1 must be a bool, not int'),          # type
    (dict(image_channels=True), 'config.image_channels=True is not one of 1, 3'),     # type
    (dict(learning_rate=0.0), 'config.learning_rate=0.0 must be > 0'),        # range
    (dict(momentum=1.0), 'config.momentum=1.0 must be in [0, 1)'),                    # range
    (dict(log_every_steps=0), 'config.log_every_steps=0 must be >= 1 or -1'),  # range
    (dict(step_fractions=(0.75, 0.5)), 'config.step_fractions=(0.75, 0.5) must be increasing'),
    (dict(dataset='cifar10', num_classes=100), 'config.num_classes=100 but cifar10 has 10'),
    (dict(schedule='step', warmup_fraction=0.5, step_fractions=(0.3, 0.8)),
     'config.step_fractions=(0.3, 0.8) drops the rate inside the warmup'),           # pair
    (dict(preprocess='gcn_zca', image_size=64, image_channels=3),
     'config.preprocess=\'gcn_zca\' whitens 64x64x3 images'),                        # pair
    (dict(translate_pixels=28), 'config.translate_pixels=28 must be smaller than image_size'),
    (dict(model='nin_imagenet', image_size=8, image_channels=3, translate_pixels=0),
     "config.image_size=8 with config.model='nin_imagenet': input of 8x8 pixels is too small"),
]


@pytest.mark.parametrize('overrides,message', BAD, ids=[str(o) for o, _ in BAD])
def test_each_bad_setting_is_one_line_naming_the_field(overrides, message):
  with pytest.raises(UserError) as info:
    settings.validate(_config(**overrides))
  assert message in str(info.value) and '\n' not in str(info.value)


def test_unknown_and_missing_fields_are_named():
  config = _config()
  with config.unlocked():
    config.learing_rate = 0.1
  with pytest.raises(UserError, match=r'config\.learing_rate: no such field'):
    settings.validate(config)
  config = _config()
  del config['seed']
  with pytest.raises(UserError, match=r'config\.seed is missing'):
    settings.validate(config)


def test_the_command_line_refuses_bad_settings_before_loading_anything(tmp_path):
  """Ten kinds of mistake through `nin_jax.main`, each exit status 2 and one line on stderr,
  before any data loads (data_dir does not exist) or any workdir is made."""
  cases = [
      ('--config.schedule=cosin', 'config.schedule'),
      ('--config.model=nin_cifra', 'config.model'),
      ('--config.dataset=cifar', 'config.dataset'),
      ('--config.learning_rate=-1', 'config.learning_rate'),
      ('--config.eval_batch_size=0', 'config.eval_batch_size'),
      ('--config.test_fraction=1.5', 'config.test_fraction'),
      ('--config.step_fractions=(0.9,0.5)', 'config.step_fractions'),
      ('--config.translate_pixels=40', 'config.translate_pixels'),
      ('--config.num_classes=1', 'config.num_classes'),
      ('--config.keep_checkpoints=0', 'config.keep_checkpoints'),
  ]
  workdir = tmp_path / 'run'
  for flag, field in cases:
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, '-m', 'nin_jax.main', '--config', 'experiments/mnist.py',
         '--workdir', str(workdir), f'--config.data_dir={tmp_path / "no-data"}', flag],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, JAX_PLATFORMS='cpu'))
    lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    assert result.returncode == 2 and len(lines) == 1, (flag, result.stderr[-2000:])
    assert field in lines[0] and 'no-data' not in lines[0], (flag, lines[0])
    assert 'Traceback' not in result.stderr and not workdir.exists()
    print(f'{flag}: {time.perf_counter() - start:.2f} s: {lines[0]}')
