"""The network's batches, made inside the jitted steps; and the device-resident input path.

Every input path hands the steps uint8 images and the augmentation draws of
`Sampler.train_draws`; `train_batch` and `eval_batch` preprocess them
(`preprocessing.normalize`) and translate/flip them (`augment.augment`) on the devices, inside
the step. One implementation for every path, and batches cross to the devices as uint8 (a
quarter of float32's bytes).

The paths differ only in where the images come from (`config.input_pipeline`; `choose_pipeline`):
'host' batches gathered from the dataset in host memory (`input_pipeline.Data`), 'stream'
batches read from files (`nin_jax.stream`), and 'device': for the datasets that fit in
accelerator memory (CIFAR-10/100: 150 MiB of uint8, MNIST: 45 MiB, SVHN with extra: 1.8 GiB)
the whole uint8 dataset on every device, and each step only its draws from the host (row
numbers, shifts, flips: a few bytes per image), gathered on the devices. The draws are the same
for every path, so all give the same batches: same shuffling, same augmentation, same
resumption, same split of every global batch over processes and devices
(tests/device_input_test.py).

  arrays = put_on_devices(data, replicated_sharding, dataset=pipeline == 'device')
  batch = train_batch(inputs, arrays, kind=..., augment=..., translate_pixels=...)  # in jit

Imports only JAX and numpy (no TensorFlow, no PIL), like the train step.
"""

from __future__ import annotations

import functools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from nin_jax import augment as augment_lib  # `augment` is the setting's name here
from nin_jax import preprocessing
from nin_jax import settings
from nin_jax.errors import UserError

# 'auto' keeps a dataset on the devices when it needs at most this share of one device's memory
# (the rest is for the model, its activations and XLA's workspace).
AUTO_MAX_MEMORY_FRACTION = 0.25


def dataset_bytes(data) -> int:
  """Bytes the device path keeps on each device: both uint8 splits, labels, statistics."""
  arrays = [data.train_images_uint8, data.train_labels, data.test_images_uint8, data.test_labels]
  arrays += list(data.preprocessor.statistics().values())
  return sum(int(a.nbytes) for a in arrays)


def device_memory_bytes() -> int | None:
  """One local device's memory, or None where the backend does not say (CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without memory_stats raise
    return None
  return int(stats['bytes_limit']) if stats and 'bytes_limit' in stats else None


def tfds_dataset_bytes(config) -> int | None:
  """What `dataset_bytes` will be for config's TFDS dataset, from its catalogued split sizes and
  the config's image shape, before anything is loaded (None for a folder dataset)."""
  examples = settings.TFDS_EXAMPLES.get(config.dataset)
  if examples is None:
    return None
  count = sum(n for split, n in examples.items()
              if split != 'extra' or config.get('svhn_extra', False))
  return count * (config.image_size ** 2 * config.image_channels + 4)  # uint8 pixels, int32 label


def check_fits_before_load(config, memory: int | None) -> None:
  """config.input_pipeline='device' with a TFDS dataset larger than one device's `memory`
  (bytes; None: unknown, as on CPU) stops before the dataset loads: the same refusal as
  `choose_pipeline`'s, which can only come after a load (of 1.9 GiB for SVHN, 190 GiB for
  ImageNet). Folder datasets are only known once listed: `choose_pipeline` checks them."""
  needed = tfds_dataset_bytes(config)
  if config.input_pipeline == 'device' and memory is not None and needed and needed > memory:
    raise UserError(
        f'config.input_pipeline=device: {config.dataset} needs {needed / 2**30:.1f} GiB on every '
        f'device, more than its {memory / 2**30:.1f} GiB; use input_pipeline=host')


def choose_pipeline(setting: str, data) -> str:
  """'host', 'device' or 'stream' for config.input_pipeline = 'auto' | 'host' | 'device' |
  'stream' ('stream' exactly when `data` is streamed: `input_pipeline.streams`).

  'auto' is 'device' on accelerators when the dataset needs at most AUTO_MAX_MEMORY_FRACTION of
  a device's memory, and 'host' on CPU (where host and device are the same memory, and the host
  path's batch assembly overlaps the step on another thread). 'device' is refused with a clear
  error when the dataset cannot fit at all.
  """
  if getattr(data, 'streamed', False):  # `input_pipeline.streams` chose it while loading
    return 'stream'
  if setting == 'host':
    return 'host'
  needed, memory = dataset_bytes(data), device_memory_bytes()
  if setting == 'device':
    if memory is not None and needed > memory:
      raise UserError(
          f'config.input_pipeline=device: the dataset needs {needed / 2**30:.1f} GiB on every '
          f'device, more than its {memory / 2**30:.1f} GiB; use input_pipeline=host')
    return 'device'
  if jax.default_backend() == 'cpu' or memory is None:
    return 'host'
  if needed > AUTO_MAX_MEMORY_FRACTION * memory:
    logging.info('input_pipeline=auto: %.1f GiB of data is more than %d%% of a device\'s '
                 '%.1f GiB; batches come from the host', needed / 2**30,
                 100 * AUTO_MAX_MEMORY_FRACTION, memory / 2**30)
    return 'host'
  return 'device'


def put_on_devices(data, sharding: jax.sharding.Sharding, *, dataset: bool) -> dict[str, Any]:
  """What the steps read besides their batch, placed with `sharding` (replicated): the
  preprocessing statistics of `data` and, with `dataset` (the device input path), its uint8
  splits and labels, from which every device gathers its rows of a batch locally, with no
  communication.

  Works with several processes: each puts the arrays on its own devices (every process holds
  the whole dataset, as in the host path).
  """
  def put(array):
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  arrays = {'statistics': data.preprocessor.statistics()}
  if dataset:
    arrays.update(train_images=data.train_images_uint8, train_labels=data.train_labels,
                  test_images=data.test_images_uint8, test_labels=data.test_labels)
  return jax.tree_util.tree_map(put, arrays)


# --- The batches, made inside the steps -----------------------------------------------------------


def _preprocessed(inputs: dict[str, jax.Array], arrays: dict[str, Any], split: str,
                  kind: str) -> tuple[jax.Array, jax.Array]:
  """(preprocessed images, labels) of a batch of `split` ('train' or 'test'): gathered from
  `arrays` for the device path's draws; uint8 images normalized, float32 ones kept (the host
  path preprocessed them at load with this same function)."""
  if 'rows' in inputs:
    rows = inputs['rows']
    images, labels = arrays[f'{split}_images'][rows], arrays[f'{split}_labels'][rows]
  else:
    images, labels = inputs['image'], inputs['label']
  if images.dtype == jnp.uint8:
    images = preprocessing.normalize(kind, images, arrays['statistics'])
  return images, labels


def train_batch(inputs: dict[str, jax.Array], arrays: dict[str, Any], *, kind: str,
                augment: str, translate_pixels: int) -> dict[str, jax.Array]:
  """The network's training batch, inside the jitted step: {'image': float32 (B, H, W, C),
  'label': int32 (B,)}, sharded as `inputs` are.

  `inputs` is a host or stream batch, {'image': uint8 (B, H, W, C), 'label', 'shifts',
  'flips'}, or the device path's draws, {'rows', 'shifts', 'flips'}, whose images and labels
  are gathered here from `arrays` (`put_on_devices`). Either way the images are preprocessed
  (`preprocessing.normalize`) and translated/flipped (`augment.augment`) by the same code. A
  host batch of float32 images was preprocessed at load by that same function (`Data`: a split
  that fits, whitened once instead of per step); the step then only augments it.
  """
  images, labels = _preprocessed(inputs, arrays, 'train', kind)
  images = augment_lib.augment(augment, images, inputs['shifts'], inputs['flips'],
                               translate_pixels)
  return {'image': images, 'label': labels}


def eval_batch(inputs: dict[str, jax.Array], arrays: dict[str, Any], *,
               kind: str) -> dict[str, jax.Array]:
  """The network's evaluation batch, as `train_batch` makes it (no augmentation), with 'mask'
  (False on the padding of the last batch, which `train.eval_step` leaves out)."""
  images, labels = _preprocessed(inputs, arrays, 'test', kind)
  return {'image': images, 'label': labels, 'mask': inputs['mask']}


def batch_makers(data) -> tuple[Any, Any]:
  """(train_batch, eval_batch) with `data`'s preprocessing and augmentation settings bound:
  each takes (inputs, arrays), inside the jitted step."""
  kind = data.preprocessor.kind
  return (functools.partial(train_batch, kind=kind, augment=data.augment,
                            translate_pixels=data.translate_pixels),
          functools.partial(eval_batch, kind=kind))
