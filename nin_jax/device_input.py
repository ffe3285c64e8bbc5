"""The device-resident input path: the whole uint8 dataset on every device.

For the datasets that fit in accelerator memory (CIFAR-10/100: 150 MiB of uint8, MNIST: 45 MiB,
SVHN with extra: 1.8 GiB) the host sends each step only what its batch is made of: the row
numbers and augmentation draws of `Data.train_draws(step)`, a few bytes per image. Gathering the
rows, preprocessing them (the jnp twins in `nin_jax.preprocessing`) and translating/flipping
them (`nin_jax.augment`) all run on the devices, inside the jitted step. The draws are the host
pipeline's, so both paths give the same batches (to float rounding of the preprocessing): same
shuffling, same augmentation, same resumption, same split of every global batch over processes
and devices (tests/device_input_test.py).

Selected by `config.input_pipeline` ('auto', 'host', 'device'; `choose_pipeline`).

  arrays = put_on_devices(data, replicated_sharding)
  batch = train_batch(arrays, draws, kind=..., augment=..., translate_pixels=...)  # in jit

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

INPUT_PIPELINES = settings.INPUT_PIPELINES
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
  if setting not in INPUT_PIPELINES:
    raise UserError(f'config.input_pipeline={setting!r} is not one of '
                    f'{", ".join(INPUT_PIPELINES)}')
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


def put_on_devices(data, sharding: jax.sharding.Sharding) -> dict[str, Any]:
  """The uint8 splits, labels and preprocessing statistics of `data`, placed with `sharding`
  (replicated: every device gathers its rows of a batch locally, with no communication).

  Works with several processes: each puts the arrays on its own devices (every process holds
  the whole dataset, as in the host path).
  """
  def put(array):
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  arrays = {
      'train_images': data.train_images_uint8, 'train_labels': data.train_labels,
      'test_images': data.test_images_uint8, 'test_labels': data.test_labels,
      'statistics': data.preprocessor.statistics(),
  }
  return jax.tree_util.tree_map(put, arrays)


# --- The batches --------------------------------------------------------------------------------


def train_batch(arrays: dict[str, Any], draws: dict[str, jax.Array], *, kind: str,
                augment: str, translate_pixels: int) -> dict[str, jax.Array]:
  """The training batch of `draws` (from `Data.train_draws`), gathered on the devices:
  {'image': float32 (B, H, W, C), 'label': int32 (B,)}, sharded as `draws` are."""
  rows = draws['rows']
  images = preprocessing.normalization(kind).jnp(arrays['train_images'][rows],
                                                 arrays['statistics'])
  images = augment_lib.augment_jnp(augment, images, draws['shifts'], draws['flips'],
                                   translate_pixels)
  return {'image': images, 'label': arrays['train_labels'][rows]}


def batch_makers(data) -> tuple[Any, Any]:
  """(train_batch, eval_batch) with `data`'s preprocessing and augmentation settings bound:
  each takes (arrays, draws), inside the jitted step."""
  kind = data.preprocessor.kind
  return (functools.partial(train_batch, kind=kind, augment=data.augment,
                            translate_pixels=data.translate_pixels),
          functools.partial(eval_batch, kind=kind))


def eval_batch(arrays: dict[str, Any], draws: dict[str, jax.Array], *,
               kind: str) -> dict[str, jax.Array]:
  """The evaluation batch of `draws` (from `Data.eval_draws`): images, labels and 'mask', with
  zero images and labels on the padding, as `Data.eval_batches` gives them."""
  rows, mask = draws['rows'], draws['mask']
  images = preprocessing.normalization(kind).jnp(arrays['test_images'][rows],
                                                 arrays['statistics'])
  return {'image': jnp.where(mask[:, None, None, None], images, 0.0),
          'label': jnp.where(mask, arrays['test_labels'][rows], 0), 'mask': mask}
