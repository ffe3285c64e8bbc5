"""Augmentation: random translation, crops and horizontal flip.

config.augment is 'none', 'translate' (shift each image by up to config.translate_pixels in y
and in x, zero fill), 'translate_flip' (and mirror half of them left-right) or 'crop_flip' (a
random image_size window of each image resized to config.resize_size, the ImageNet nets' crops,
cut where the image is decoded: `datasets.decode_image`; and mirror half of them). `moves` and
`crops` are the one place that reads the setting. The draws of a batch are numbers drawn on the
host (`draw`, `draw_crops`, from `Sampler.train_draws`); `augment` applies the translations and
flips in jnp, inside the jitted train step, whichever path brought the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nin_jax import settings


def moves(augment: str) -> tuple[bool, bool]:
  """(translates, flips): what the augment setting does to a preprocessed training image."""
  if augment not in settings.AUGMENTS:
    raise ValueError(f'augment {augment!r}: expected one of {settings.AUGMENTS}')
  return augment in ('translate', 'translate_flip'), augment in ('translate_flip', 'crop_flip')


def crops(augment: str) -> bool:
  """Whether training images are random crops (decided where they are decoded)."""
  moves(augment)  # ValueError for an unknown setting
  return augment == 'crop_flip'


def draw(rng: np.random.Generator, augment: str, batch_size: int,
         translate_pixels: int) -> tuple[np.ndarray, np.ndarray]:
  """(shifts int (B, 2) the (dy, dx) of each image, flips bool (B,)); zero where `augment`
  does not translate or flip. Both are always drawn, so the stream is the same for every
  setting."""
  t = translate_pixels
  shifts = rng.integers(-t, t + 1, size=(batch_size, 2))
  flips = rng.random(batch_size) < 0.5
  translates, mirrors = moves(augment)
  if not translates:
    shifts = np.zeros_like(shifts)
  if not mirrors:
    flips = np.zeros_like(flips)
  return shifts, flips


def draw_crops(rng: np.random.Generator, augment: str, batch_size: int) -> np.ndarray | None:
  """float64 (B, 2): where each crop sits, as (u, v) in [0, 1)^2 of the free range in y and x
  (`datasets.decode_image`); None where `augment` does not crop. Drawn after `draw`, from the
  same generator, so adding crops changed no other setting's draws."""
  return rng.random((batch_size, 2)) if crops(augment) else None


def translate_and_flip(images: jax.Array, shifts: jax.Array, flips: jax.Array | None,
                       max_shift: int) -> jax.Array:
  """Shifts each image by whole pixels (zero fill), then mirrors some of them left-right.

  out[i, y, x] = images[i, y - dy_i, x - dx_i] (0 outside), mirrored in x where flips[i]. Zero is
  the training mean after 'standardize' and 'gcn_zca', so the filled border looks like an
  average pixel, not like a black frame. Each image is mirrored first and then shifted by -dx
  (the same thing), as a window of the zero-padded image at a per-image offset.

  Args:
    images: float32 (B, H, W, C), already preprocessed.
    shifts: int (B, 2), (dy, dx) with |dy|, |dx| <= max_shift.
    flips: bool (B,), mirror these images; None: none is mirrored.
    max_shift: the largest shift; 0: none is shifted. Either way the step makes no pass over
      the batch for what is not done.

  Returns:
    float32 (B, H, W, C).
  """
  _, h, w, c = images.shape
  dy, dx = shifts[:, 0], shifts[:, 1]
  if flips is not None:
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    dx = jnp.where(flips, -dx, dx)
  if max_shift == 0:
    return images
  t = max_shift
  padded = jnp.pad(images, ((0, 0), (t, t), (t, t), (0, 0)))
  window = lambda image, dy, dx: jax.lax.dynamic_slice(image, (t - dy, t - dx, 0), (h, w, c))
  return jax.vmap(window)(padded, dy, dx)


def augment(setting: str, images: jax.Array, shifts: jax.Array, flips: jax.Array,
            translate_pixels: int) -> jax.Array:
  """config.augment's translation and flips of a preprocessed batch, float32 (B, H, W, C), with
  the draws of `Sampler.train_draws`: inside the jitted train step, for every input path."""
  translates, mirrors = moves(setting)
  return translate_and_flip(images, shifts, flips if mirrors else None,
                            translate_pixels if translates else 0)
