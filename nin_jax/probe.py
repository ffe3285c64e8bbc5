"""The first steps of a recipe on real images, with every layer's health.

`probe(config, data, steps, ...)` runs an experiment config as written (its init, optimizer,
schedule over its full length on this data, and training's own jitted steps:
`train.step_functions`, `parallel.jit_steps`) for at most `steps` steps, and reports the first
step where the loss (mean of the last 5 steps) falls below a fraction of ln C: whether a recipe
leaves chance on real data. Every `every` steps it records, on one fixed batch, the share of
live ReLUs per layer, the class maps' range, the logit scale and per-layer gradient norms.

The data helpers turn real images (an .npz, a class-per-folder tree, or scikit-learn's 1,797
8x8 handwritten digits) into a held-out split and the `input_pipeline.Data` of a config.
benchmarks/recipes.py is the command line over these (and the whole trainer, and a PyTorch
reference); tests/recipes_test.py holds the recipes to them on the digits.

  images, labels, names = load_images('digits')
  rows_train, rows_test = split(labels, 0.2)
  config = load_config('experiments/mnist.py', seed=0)
  result = probe(config, make_data(config, images, labels, names, rows_train, rows_test), 50)
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax import device_input
from nin_jax import models
from nin_jax import parallel
from nin_jax import train


# --- Data ---------------------------------------------------------------------------------------

def load_images(source: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(uint8 (N, H, W, C) images, int32 labels, class names) of an npz, a folder or 'digits'."""
  if source == 'digits':
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)[..., None]
    return images, digits.target.astype(np.int32), [str(d) for d in range(10)]
  if source.endswith('.npz'):
    with np.load(source) as f:
      images = f['images']
      if images.ndim == 3:
        images = images[..., None]
      return (images.astype(np.uint8), f['labels'].astype(np.int32),
              [str(c) for c in f['class_names']])
  from nin_jax import datasets  # pylint: disable=g-import-not-at-top  # PIL
  classes = sorted(c for c in os.listdir(source) if not c.startswith('.'))
  images, labels = [], []
  for label, name in enumerate(classes):
    for file in sorted(os.listdir(os.path.join(source, name))):
      images.append(datasets.load_image(os.path.join(source, name, file), 32, 3))
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int32), classes


def resize(images: np.ndarray, size: int, channels: int) -> np.ndarray:
  """As the folder dataset converts: luma or RGB by repetition, bilinear resize."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if images.shape[1:] == (size, size, channels):
    return images
  out = []
  for image in images:
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = pil.convert('L' if channels == 1 else 'RGB')
    if pil.size != (size, size):
      pil = pil.resize((size, size), Image.Resampling.BILINEAR)
    out.append(np.asarray(pil).reshape(size, size, channels))
  return np.stack(out)


def split(labels: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train rows, held-out rows), drawn with seed 0 whatever the run's seed."""
  rng = np.random.default_rng(0)
  train, held_out = [], []
  for c in np.unique(labels):
    rows = rng.permutation(np.flatnonzero(labels == c))
    n = int(round(val_fraction * len(rows)))
    held_out.append(rows[:n])
    train.append(rows[n:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


def load_config(path: str, seed: int, overrides: tuple[str, ...] = (),
                epochs: int | None = None):
  """The config of the experiment file `path` with `seed`, `overrides` ('FIELD=JSON' strings)
  and, if given, `epochs`; the progress bar off."""
  spec = importlib.util.spec_from_file_location('experiment_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, text = item.split('=', 1)
    try:
      value = json.loads(text)
    except json.JSONDecodeError:  # a bare string: --set init=data
      value = text
    config[key] = tuple(value) if isinstance(config[key], (tuple, list)) else type(config[key])(
        value)
  config.seed = seed
  if epochs is not None:
    config.num_epochs = epochs
  config.progress_bar = False
  return config


def make_data(config, images, labels, class_names, rows_train, rows_test):
  """The Data a run of `config` trains on; class names padded to config.num_classes (CIFAR-100
  or EMNIST-shaped nets on 10-class data)."""
  from nin_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  images = resize(images, config.image_size, config.image_channels)
  names = list(class_names) + [f'unused_{i}' for i in range(len(class_names),
                                                            config.num_classes)]
  return input_pipeline.data_from_arrays(
      config, train_images=images[rows_train], train_labels=labels[rows_train],
      test_images=images[rows_test], test_labels=labels[rows_test], class_names=names)


# --- The first steps, with every layer's health ---------------------------------------------------

def make_health_fn(model):
  """fn(params, images, labels) -> per-layer live ReLU share and gradient norm, the class
  maps' range and the logit scale, on one batch with dropout off."""
  def health(params, images, labels):
    def loss_fn(p):
      logits, captured = model.apply({'params': p}, images, train=False,
                                     capture_intermediates=True, mutable=['intermediates'])
      return train.cross_entropy(logits, labels).mean(), (logits, captured['intermediates'])
    (loss, (logits, captured)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    live, grad_norms, paths = [], [], models.layer_paths(params)
    for path in paths:
      out, g = captured, grads
      for name in path:
        out, g = out[name], g[name]
      live.append(jnp.mean(out['__call__'][0] > 0))
      grad_norms.append(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(g))))
    maps = (captured[paths[-1][0]][paths[-1][1]]['__call__'][0] if model.head == 'gap'
            else logits[:, None, None, :])
    alive_classes = jnp.mean(jnp.any(maps > 0, axis=(0, 1, 2)))
    return {'loss': loss, 'live_relu': jnp.stack(live), 'grad_norm': jnp.stack(grad_norms),
            'class_map_min': jnp.min(maps), 'class_map_max': jnp.max(maps),
            'classes_alive': alive_classes, 'logit_std': jnp.std(logits),
            'logit_mean': jnp.mean(logits)}
  return jax.jit(health)


def probe(config, data, steps: int, every: int = 0,
          chance_fraction: float = 0.9) -> dict[str, Any]:
  """Runs the first `steps` steps of `config` on `data` (see the module docstring).

  Returns:
    {'steps_run', 'first_step_below' (None if the loss stayed above the threshold),
     'threshold', 'num_steps_of_config', 'losses', 'grad_norms', 'layers', 'health',
     'seconds'}. With every=0 it stops at the first step below the threshold.
  """
  spe = data.steps_per_epoch
  num_steps = train.total_steps(config, spe)
  model = models.model_from_config(config)
  functions = train.step_functions(config, model, data.image_shape, spe, num_steps)
  steps_fn = parallel.jit_steps(parallel.create_mesh(), *functions, data)
  state = steps_fn.init(jax.random.key(config.seed), train.init_images(config, data))
  health_fn = make_health_fn(model)
  make_batch = jax.jit(device_input.batch_makers(data)[0])
  fixed = make_batch(data.train_batch(0), *steps_fn.extra)
  threshold = chance_fraction * math.log(data.num_classes)
  losses, grad_norms, health, below = [], [], [], None
  start = time.time()
  for step in range(steps):
    if every and step % every == 0:
      h = jax.device_get(health_fn(state['params'], fixed['image'], fixed['label']))
      health.append({'step': step, **{k: np.round(np.asarray(v), 4).tolist()
                                      for k, v in h.items()}})
    state, metrics = steps_fn.train(state, data.train_batch(step))
    losses.append(float(metrics['train_loss']))
    grad_norms.append(float(metrics['grad_norm']))
    if below is None and len(losses) >= 5 and np.mean(losses[-5:]) < threshold:
      below = step + 1
      if not every:
        break
  return {'steps_run': len(losses), 'first_step_below': below, 'threshold': round(threshold, 4),
          'num_steps_of_config': num_steps, 'losses': [round(x, 4) for x in losses],
          'grad_norms': [round(x, 4) for x in grad_norms],
          'layers': ['/'.join(p) for p in models.layer_paths(state['params'])], 'health': health,
          'seconds': round(time.time() - start, 1)}
