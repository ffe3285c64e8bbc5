"""Shared test helpers: small image folders, a reference image shift, and a runner for the
training CLI."""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The test-only nets (tests/site/tiny_nets.py): here, and in every process the tests start.
SITE = os.path.join(REPO, 'tests', 'site')
sys.path.insert(0, SITE)
import tiny_nets  # pylint: disable=g-import-not-at-top,wrong-import-position
tiny_nets.register()
os.environ['PYTHONPATH'] = os.pathsep.join(
    [SITE, *filter(None, [os.environ.get('PYTHONPATH')])])

# Compiled programs are cached across the test processes (subprocess runs compile the same nets).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(REPO, '.pytest_cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


def write_folder(root, images, labels, class_names):
  """images (N, H, W) uint8 -> root/<class>/<i>.png."""
  for name in class_names:
    os.makedirs(os.path.join(root, name), exist_ok=True)
  for i, (image, label) in enumerate(zip(images, labels)):
    Image.fromarray(image).save(os.path.join(root, class_names[label], f'{i:05d}.png'))
  return str(root)


def write_photos(root, per_class=(10, 3), classes=('cat', 'dog', 'owl'), seed=0):
  """ROOT/train/<class>/*.JPEG + ROOT/val/<class>/*.JPEG of random sizes (12-30 px a side)."""
  rng = np.random.default_rng(seed)
  for split, count in zip(('train', 'val'), per_class):
    for label, name in enumerate(classes):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(count):
        h, w = rng.integers(12, 31, 2)
        pixels = rng.integers(0, 256, (h, w, 3), np.uint8) // (label + 1)
        Image.fromarray(pixels).save(os.path.join(root, split, name, f'{i:03d}.JPEG'))
  return str(root)


@pytest.fixture(scope='session')
def digits_folder(tmp_path_factory):
  """scikit-learn's 1,797 8×8 digits as a class-per-folder tree of PNGs."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = (digits.images * (255 / 16)).round().astype(np.uint8)
  return write_folder(tmp_path_factory.mktemp('digits'), images, digits.target,
                      [str(d) for d in range(10)])


@pytest.fixture(scope='session')
def blobs_folder(tmp_path_factory):
  """240 easy 12×12 images of 3 shapes at random places: a horizontal bar, a vertical bar, a
  dot (translation-invariant classes, as global average pooling needs)."""
  rng = np.random.default_rng(0)
  labels = np.arange(240) % 3
  images = rng.integers(0, 60, (240, 12, 12), dtype=np.uint8)
  for i, label in enumerate(labels):
    r, c = rng.integers(1, 7, 2)
    h, w = [(2, 5), (5, 2), (2, 2)][label]
    images[i, r:r + h, c:c + w] = 250
  return write_folder(tmp_path_factory.mktemp('blobs'), images, labels,
                      ['horizontal', 'vertical', 'dot'])


def reference_shift(image, dy, dx):
  """out[y, x] = image[y - dy, x - dx], 0 outside: one pixel at a time, to check faster code."""
  h, w = image.shape[:2]
  out = np.zeros_like(image)
  for y, x in itertools.product(range(h), range(w)):
    if 0 <= y - dy < h and 0 <= x - dx < w:
      out[y, x] = image[y - dy, x - dx]
  return out


def tiny_config(data_dir, **overrides):
  """A folder-dataset run of the tiny test net that takes seconds."""
  from experiments import default
  config = default.get_config()
  config.experiment = 'tiny'
  config.data_dir = data_dir
  config.generate_chars = False
  config.model = '_nin_tiny'
  config.num_classes = 3
  config.image_size = 12
  config.image_channels = 1
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_train_steps = 24
  config.learning_rate = 0.1
  config.log_every_steps = 4
  config.eval_every_steps = 12
  config.checkpoint_every_steps = 6
  config.progress_bar = False
  for key, value in overrides.items():
    config[key] = value
  return config


def config_flags(config):
  """--config.KEY=VALUE flags that turn experiments/default.py into `config`."""
  from experiments import default
  base = default.get_config()
  flags = []
  for key, value in config.items():
    if base[key] != value:
      flags.append(f'--config.{key}={value}')
  return flags


def run_main(workdir, config, *, devices=1, extra_env=None, timeout=300, wait=True):
  """Runs `python -m nin_jax.main` on experiments/default.py with `config`'s fields."""
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', **(extra_env or {}))
  cmd = [sys.executable, '-m', 'nin_jax.main', '--config', 'experiments/default.py',
         '--workdir', str(workdir), *config_flags(config)]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]
