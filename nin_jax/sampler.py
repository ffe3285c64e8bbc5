"""Which images, in which order, with which augmentation, make every batch of a run.

Batches are pure functions of (config.seed, step): a resumed run sees exactly the batches that
the uninterrupted run would have seen, and the global batch does not depend on the number of
processes (each process takes its own rows of it). `Sampler` holds only these numbers; the
input paths (`input_pipeline.Data` in memory, `stream.StreamData` from files) are Samplers that
also turn them into images.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import math

import numpy as np

from nin_jax import augment

# Separate random streams, so shuffling and augmentation never share numbers.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


@dataclasses.dataclass(kw_only=True, eq=False)
class Sampler:
  """Which rows, in which order, with which augmentation draws, make every batch of a process.

  Numbers only (no images), so the stream's workers get their own copy; `Data` (in memory) and
  `stream.StreamData` are Samplers that also turn the draws into images.

  Attributes:
    num_train_examples, num_test_examples: split sizes.
    batch_size: the global training batch, over all processes.
    eval_batch_size: the global evaluation batch.
    seed: config.seed; shuffling and augmentation are drawn from (seed, step).
    augment: a setting of `nin_jax.augment`.
    translate_pixels: largest random shift of the translate augmentations.
    process_index, process_count: which share of every global batch this process yields.
  """
  num_train_examples: int
  num_test_examples: int
  batch_size: int
  eval_batch_size: int
  seed: int = 0
  augment: str = 'none'
  translate_pixels: int = 0
  process_index: int = 0
  process_count: int = 1
  _permutation_cache: tuple[int, np.ndarray] | None = dataclasses.field(
      init=False, repr=False, default=None)

  def __post_init__(self):
    for name in ('batch_size', 'eval_batch_size'):
      value = getattr(self, name)
      if value < 1 or value % self.process_count:  # parallel.check_batch_size says it first
        raise ValueError(f'{name}={value}: must be a positive multiple of the number of '
                         f'processes ({self.process_count})')
    augment.moves(self.augment)  # ValueError for an unknown setting
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process {self.process_index} of {self.process_count}')

  def sampler(self) -> Sampler:
    """A plain Sampler with this one's numbers (what a stream worker needs)."""
    return Sampler(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Sampler)
                      if f.init})

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_train_examples // self.batch_size)

  @property
  def num_eval_batches(self) -> int:
    """Batches per pass of `eval_batches` (the last one padded)."""
    return math.ceil(self.num_test_examples / self.eval_batch_size)

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    if self._permutation_cache is None or self._permutation_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
      self._permutation_cache = (epoch, rng.permutation(self.num_train_examples))
    return self._permutation_cache[1]

  def train_draws(self, step: int) -> dict[str, np.ndarray]:
    """What this process's share of the training batch of `step` is made of: a pure function.

    Epoch e = step // steps_per_epoch is a permutation of the training split drawn from
    (seed, e); global batch i of the epoch is rows [i*B, (i+1)*B) of it (wrapping around when
    the split is smaller than one batch); process p takes rows [p*B/P, (p+1)*B/P) of that.
    The augmentation of the whole global batch is drawn from (seed, step) before it is split.

    Returns:
      {'rows': int32 (B/P,) indices into the training split, 'shifts': int32 (B/P, 2) the
      (dy, dx) of each image's translation (zero unless augment translates), 'flips': bool
      (B/P,) which images are mirrored (zero unless augment flips)}, and with
      augment='crop_flip' 'crops': float64 (B/P, 2), where each crop sits
      (`augment.draw_crops`). `train_batch` turns them into images on the host;
      `nin_jax.device_input` on the devices; `nin_jax.stream` in its workers.
    """
    b = self.batch_size
    epoch, i = divmod(step, self.steps_per_epoch)
    positions = (i * b + np.arange(b)) % self.num_train_examples
    rows = self._epoch_permutation(epoch)[positions]
    rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step])
    shifts, flips = augment.draw(rng, self.augment, b, self.translate_pixels)
    crops = augment.draw_crops(rng, self.augment, b)
    share = slice(self.process_index * b // self.process_count,
                  (self.process_index + 1) * b // self.process_count)
    draws = {'rows': rows[share].astype(np.int32), 'shifts': shifts[share].astype(np.int32),
             'flips': flips[share]}
    if crops is not None:
      draws['crops'] = crops[share]
    return draws

  def eval_draw(self, j: int) -> dict[str, np.ndarray]:
    """The rows of evaluation batch j: {'rows': int32 (E/P,), 'mask': bool (E/P,)}; padding
    rows point at row 0 and are masked."""
    share = self.eval_batch_size // self.process_count
    indices = j * self.eval_batch_size + self.process_index * share + np.arange(share)
    mask = indices < self.num_test_examples
    return {'rows': np.where(mask, indices, 0).astype(np.int32), 'mask': mask}

  def eval_draws(self) -> Iterator[dict[str, np.ndarray]]:
    """`eval_draw` of every batch of `eval_batches`, in order."""
    return map(self.eval_draw, range(self.num_eval_batches))
