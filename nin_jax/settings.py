"""What each field of a run's config may hold, checked in one place before anything loads.

`validate(config)` checks every field that `nin_jax.default_config` defines (and refuses fields
it does not): its type, its allowed values or range, and the combinations that cannot work (a TFDS
dataset with another number of classes, whitening too large to fit, a step schedule that drops
inside its warmup, a folder dataset without a folder, an image too small for the model).
A bad setting is one `UserError` line that names the field and what it may be. A run is checked
once, where it starts: `nin_jax.main` calls `validate` before JAX loads, and a library caller's
`train.train_and_evaluate` calls `check_once`, which repeats nothing for a config already
checked. Past that boundary the library takes the settings as valid; the only checks left are
those that need the data (a folder's classes) or the devices (the batch over the device count,
a device's memory), made once each where the run learns them.

The vocabularies of the settings live here, and the modules that act on them import them (the
model names are the keys of `nin_jax.architectures.MODELS`). This module and that one import
nothing beyond the standard library, so a typo costs a fraction of a second, not a JAX or
TensorFlow start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import numbers
from typing import Any

from nin_jax import architectures
from nin_jax.errors import UserError

# --- The vocabularies ---------------------------------------------------------------------------
# TFDS datasets this pipeline reads, with their number of classes.
TFDS_CLASSES = {'cifar10': 10, 'cifar100': 100, 'svhn_cropped': 10, 'mnist': 10,
                'emnist/byclass': 62, 'imagenet2012': 1000}
DATASETS = ('folder', *TFDS_CLASSES)
# Their examples per split (TFDS's catalog), so that a run knows its data's size before loading it.
TFDS_EXAMPLES = {'cifar10': {'train': 50_000, 'test': 10_000},
                 'cifar100': {'train': 50_000, 'test': 10_000},
                 'svhn_cropped': {'train': 73_257, 'extra': 531_131, 'test': 26_032},
                 'mnist': {'train': 60_000, 'test': 10_000},
                 'emnist/byclass': {'train': 697_932, 'test': 116_323},
                 'imagenet2012': {'train': 1_281_167, 'validation': 50_000}}
PREPROCESS = ('standardize', 'gcn_zca', 'lcn', 'none')
MAX_ZCA_FEATURES = 4096       # gcn_zca: values per image (its whitening matrix is that squared)
AUGMENTS = ('none', 'translate', 'translate_flip', 'crop_flip')
INPUT_PIPELINES = ('auto', 'host', 'device', 'stream')
HEADS = ('gap', 'fc', 'fc_dropout')
INITS = ('he', 'paper', 'data')
DTYPES = ('float32', 'bfloat16')
CONV_IMPLS = ('auto', 'xla', 'im2col', 'hybrid', 'fft')
LR_MULTIPLIERS = ('paper', 'none')
SCHEDULES = ('cosine', 'step', 'plateau', 'constant')


# --- One rule per field ---------------------------------------------------------------------------

def _choice(*allowed: Any) -> Callable[[Any], str | None]:
  def check(value):
    if not any(type(value) is type(a) and value == a for a in allowed):  # True is not 1
      return f'is not one of {", ".join(map(repr, allowed))}'
  return check


def _model(value) -> str | None:
  """A name of `architectures.MODELS`, read when checked (a test may add a net of its own)."""
  if not isinstance(value, str) or value not in architectures.MODELS:
    shown = ', '.join(repr(name) for name in architectures.MODELS if not name.startswith('_'))
    return f'is not one of {shown}'


def _typed(kind: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False,
           also: tuple[Any, ...] = ()) -> Callable[[Any], str | None]:
  """A bool, str, int or float (ints count as floats) within [low, high] (ends open if asked),
  or one of the special values `also` (e.g. -1 for 'once per epoch')."""
  types = {'bool': (bool,), 'str': (str,), 'int': (numbers.Integral,),
           'float': (numbers.Real,)}[kind]

  def check(value):
    if isinstance(value, bool) != (kind == 'bool') or not isinstance(value, types):
      return f'must be a{"n" if kind == "int" else ""} {kind}, not {type(value).__name__}'
    if value in also:
      return None
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
      if high is None:
        span = f'{">" if low_open else ">="} {low}'
      else:
        span = f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
      return f'must be {span}' + (f' or {", ".join(map(str, also))}' if also else '')
  return check


def _fractions(value) -> str | None:
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
      isinstance(f, numbers.Real) and not isinstance(f, bool) for f in value):
    return 'must be a tuple of numbers'
  if not all(0 < f < 1 for f in value) or list(value) != sorted(set(value)):
    return 'must be increasing fractions of the run, each in (0, 1)'


_EVERY = dict(low=1, also=(-1,))  # a bookkeeping interval in steps; -1: once per epoch

FIELDS: dict[str, Callable[[Any], str | None]] = {
    'experiment': _typed('str'),
    # Data
    'dataset': _choice(*DATASETS),
    'data_dir': _typed('str'),
    'generate_chars': _typed('bool'),
    'chars_per_class': _typed('int', 1),
    'test_fraction': _typed('float', 0, 1, low_open=True, high_open=True),
    'skip_bad_files': _typed('bool'),
    'svhn_extra': _typed('bool'),
    'image_size': _typed('int', 1, 4096),
    'resize_size': _typed('int', 0, 8192),
    'image_channels': _choice(1, 3),
    'num_classes': _typed('int', 2),
    'preprocess': _choice(*PREPROCESS),
    'augment': _choice(*AUGMENTS),
    'translate_pixels': _typed('int', 0),
    'input_pipeline': _choice(*INPUT_PIPELINES),
    'stream_workers': _typed('int', 0, 256, also=(-1,)),
    'stream_threads': _typed('int', 1, 256),
    'stream_memory_fraction': _typed('float', 0, 1, low_open=True),
    # Model
    'model': _model,
    'head': _choice(*HEADS),
    'dropout_rate': _typed('float', 0, 1, high_open=True),
    'init': _choice(*INITS),
    'dtype': _choice(*DTYPES),
    'conv_impl': _choice(*CONV_IMPLS),
    # Optimization
    'batch_size': _typed('int', 1),
    'eval_batch_size': _typed('int', 1),
    'num_epochs': _typed('float', 0, low_open=True),
    'num_train_steps': _typed('int', 1, also=(-1,)),
    'learning_rate': _typed('float', 0, low_open=True),
    'momentum': _typed('float', 0, 1, high_open=True),
    'weight_decay': _typed('float', 0),
    'clip_gradients': _typed('float', 0),
    'lr_multipliers': _choice(*LR_MULTIPLIERS),
    'schedule': _choice(*SCHEDULES),
    'step_fractions': _fractions,
    'warmup_fraction': _typed('float', 0, 1, high_open=True),
    'plateau_drops': _typed('int', 0),
    'plateau_patience_fraction': _typed('float', 0, 1, low_open=True),
    'plateau_min_delta': _typed('float', 0),
    # Bookkeeping
    'seed': _typed('int', 0),
    'log_every_steps': _typed('int', **_EVERY),
    'eval_every_steps': _typed('int', **_EVERY),
    'checkpoint_every_steps': _typed('int', **_EVERY),
    'keep_checkpoints': _typed('int', 1),
    'progress_bar': _typed('bool'),
}


def validate(config) -> None:
  """Raises UserError (one line: the field, its value, what it may be) for the first bad setting.

  Plain Python: it runs before JAX or any data loads. A config that passes is remembered (by
  its values), so that `check_once` does not check it again.

  Args:
    config: a run's config (a ConfigDict or any mapping with attribute access).
  """
  keys = set(config.keys())
  unknown = sorted(keys - set(FIELDS))
  if unknown:
    raise UserError(f'config.{unknown[0]}: no such field; the fields are those of '
                    'nin_jax/default_config.py')
  missing = [key for key in FIELDS if key not in keys]
  if missing:
    raise UserError(f'config.{missing[0]} is missing; start the config from '
                    'nin_jax.default_config.get_config()')
  for key, check in FIELDS.items():
    problem = check(config[key])
    if problem:
      raise UserError(f'config.{key}={config[key]!r} {problem}')
  _check_combinations(config)
  _checked.add(_values(config))


def check_once(config) -> None:
  """`validate`, unless a config with the same values has passed it in this process: what a
  library entry point (`train.train_and_evaluate`) calls, so that a run started by
  `nin_jax.main`, which validated first, is checked once."""
  if _values(config) not in _checked:
    validate(config)


# The values of every config that passed `validate` in this process.
_checked: set[str] = set()


def _values(config) -> str:
  return repr(sorted((key, config[key]) for key in config.keys()))


def _check_combinations(config) -> None:
  """The settings that cannot work together, each field being valid on its own."""

  def bad(key: str, why: str) -> UserError:
    return UserError(f'config.{key}={config[key]!r} {why}')

  classes = TFDS_CLASSES.get(config.dataset)
  if classes is not None and config.num_classes != classes:
    raise bad('num_classes', f'but {config.dataset} has {classes} classes; set '
              f'--config.num_classes={classes}')
  if config.translate_pixels >= config.image_size:
    raise bad('translate_pixels', f'must be smaller than image_size={config.image_size}')
  values = config.image_size ** 2 * config.image_channels
  if config.preprocess == 'gcn_zca' and values > MAX_ZCA_FEATURES:
    raise bad('preprocess', f'whitens {config.image_size}x{config.image_size}x'
              f'{config.image_channels} images ({values} values) with a {values}x{values} '
              f'matrix; use at most {MAX_ZCA_FEATURES} values per image (e.g. image_size=32 '
              'with 3 channels) or preprocess=standardize')
  if config.schedule == 'step' and config.step_fractions and (
      config.step_fractions[0] <= config.warmup_fraction):
    raise bad('step_fractions', f'drops the rate inside the warmup (warmup_fraction='
              f'{config.warmup_fraction}); each drop must come after it')
  if (config.resize_size and config.dataset != 'folder'
      and config.input_pipeline in ('host', 'device')):
    raise bad('resize_size', f'needs the stream with a TFDS dataset ({config.dataset} is read '
              f'into memory at image_size with input_pipeline={config.input_pipeline}): use '
              'input_pipeline=stream (or auto)')
  if config.resize_size and config.resize_size < config.image_size:
    raise bad('resize_size', f'must be 0 or at least image_size={config.image_size} (the '
              'crops are image_size wide)')
  if config.augment == 'crop_flip' and not config.resize_size:
    raise bad('augment', 'crops image_size windows from images resized to resize_size: set '
              'resize_size (e.g. 256 for 224 crops)')
  if config.augment == 'crop_flip' and config.input_pipeline in ('host', 'device'):
    raise bad('input_pipeline', 'holds images at image_size, so augment=\'crop_flip\' has '
              'nothing to crop from: use input_pipeline=stream (or auto)')
  if config.dataset == 'folder' and not config.data_dir:
    raise bad('data_dir', 'is empty; point it at the image folder (one subfolder per class)')
  problem = architectures.model_too_small(config.model, config.image_size)
  if problem:
    raise UserError(f'config.image_size={config.image_size} with config.model={config.model!r}: '
                    f'{problem}')
