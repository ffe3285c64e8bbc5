"""Tests for nin_jax.settings: every field checked before anything loads, one line per mistake."""

import ast
import glob
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from conftest import REPO, config_flags, tiny_config
from experiments import default
from nin_jax import settings
from nin_jax.errors import UserError


def _config(**overrides):
  # Not type-safe: a config file can set a field to any type; the checks must catch it.
  config = ml_collections.ConfigDict(default.get_config().to_dict(), type_safe=False)
  config.update(overrides)
  return config


# The names of the settings' vocabularies: each is defined in nin_jax/settings.py (the model
# names: the keys of nin_jax/architectures.py's MODELS) and imported, never restated, elsewhere.
_VOCABULARIES = ('MODELS', 'DATASETS', 'TFDS_CLASSES', 'PREPROCESS', 'AUGMENTS', 'INPUT_PIPELINES',
                 'HEADS', 'INITS', 'DTYPES', 'CONV_IMPLS', 'LR_MULTIPLIERS', 'SCHEDULES', 'KINDS',
                 'TFDS_DATASETS')


def _modules():
  for path in sorted(glob.glob(os.path.join(REPO, 'nin_jax', '*.py'))):
    with open(path) as f:
      yield os.path.basename(path)[:-3], ast.parse(f.read())


def test_each_vocabulary_is_defined_in_one_module():
  defined = {}
  for name, tree in _modules():
    for node in tree.body:  # module-level assignments
      targets = node.targets if isinstance(node, ast.Assign) else (
          [node.target] if isinstance(node, ast.AnnAssign) else [])
      for target in targets:
        if isinstance(target, ast.Name) and target.id in _VOCABULARIES:
          defined.setdefault(target.id, []).append(name)
  assert defined['MODELS'] == ['architectures']
  assert all(modules == ['settings'] for key, modules in defined.items() if key != 'MODELS'), (
      defined)


def test_the_package_has_no_import_cycle():
  """Every import of one nin_jax module by another, at the top or inside a function."""
  graph = {}
  for name, tree in _modules():
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == 'nin_jax':
        deps |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('nin_jax.'):
        deps.add(node.module.split('.')[1])
    graph[name] = deps & set(dict(_modules())) - {name}
  state = {}

  def visit(name, path):
    if state.get(name) == 'done':
      return
    assert state.get(name) != 'open', 'import cycle: ' + ' -> '.join(path + [name])
    state[name] = 'open'
    for dep in sorted(graph[name]):
      visit(dep, path + [name])
    state[name] = 'done'

  for name in graph:
    visit(name, [])
  assert graph['settings'] == {'architectures', 'errors'} and not graph['architectures']


def test_the_nets_raise_no_user_error():
  """UserError is the command line's (settings, data, run files); the nets take valid values."""
  for name, tree in _modules():
    if name in ('models', 'convs', 'architectures'):
      assert not any(isinstance(node, ast.Name) and node.id == 'UserError'
                     for node in ast.walk(tree)), name


_COUNT_VALIDATIONS = r'''
import atexit, sys
from absl import app
from nin_jax import main, settings
calls = []
validate = settings.validate
settings.validate = lambda config: calls.append(1) or validate(config)
atexit.register(lambda: print('validations:', len(calls)))
app.run(main.main, argv=['nin_jax.main', *sys.argv[1:]], flags_parser=main.parse_flags)
'''


def test_a_run_is_validated_once(blobs_folder, tmp_path):
  """`python -m nin_jax.main` checks its config once: main before JAX, and neither the trainer
  nor the input pipeline again."""
  config = tiny_config(blobs_folder, num_train_steps=2, log_every_steps=1, eval_every_steps=2,
                       checkpoint_every_steps=2)
  result = subprocess.run(
      [sys.executable, '-c', _COUNT_VALIDATIONS, '--config', 'experiments/default.py',
       '--workdir', str(tmp_path / 'run'), *config_flags(config)], cwd=REPO, capture_output=True,
      text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'validations: 1' in result.stdout, result.stdout[-2000:]
  assert (tmp_path / 'run' / 'results.json').exists()


def test_a_library_run_is_validated_where_it_starts(tmp_path):
  """train_and_evaluate checks a config nin_jax.main has not: nothing is made for a bad one."""
  from nin_jax import train  # pylint: disable=g-import-not-at-top
  config = _config(schedule='cosin')
  with pytest.raises(UserError, match=r"config\.schedule='cosin'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_every_field_of_every_experiment_is_known_and_valid():
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
