"""The student's dataset, made again: 62 classes of captcha-style characters, 28x28 grayscale.

The student's notes that started this project trained a Keras NIN on a folder of characters
drawn with the `captcha` package's `ImageCaptcha`, one folder per class. This module writes
such a folder, reproducibly:

  python -m nin_jax.make_chars --out data/chars --per_class 300 --seed 0

Layout: `OUT/<class>/<index>.png`, 28x28 PNGs in mode 'L' (dark ink on a light background).
Classes and their folders, in `CLASSES` order, which is also the sorted order of the folder names
(Python's `sorted`, by code point) and the order of EMNIST "byclass":

  digits     '0'..'9'   folders '0'..'9'
  uppercase  'A'..'Z'   folders 'A_upper'..'Z_upper'
  lowercase  'a'..'z'   folders 'a'..'z'

Uppercase folders carry a suffix because 'a' and 'A' are the same folder on case-insensitive
file systems (macOS, Windows).

How one character is drawn. `ImageCaptcha._draw_character` crops each glyph to its ink and warps
it to fill a fixed box, so 'o' comes out as large as 'O'; and it draws its randomness from
`secrets`, so it cannot be seeded. We keep its ingredients (its font, DroidSansMono; a random
rotation; a random four-corner "warp"; a light background and a darker random ink; its noise
dots and noise arc; its final SMOOTH filter) but draw every character at one font size (within
+-5%) on a fixed canvas with a fixed baseline, at twice the output size, then halve it. So
lowercase letters stay visibly smaller than capitals and descenders hang below the baseline:
the only cue that tells o/O, s/S, x/X, ... apart. The distortions are milder than the captcha's
(rotation +-12 degrees instead of +-30, corner warp up to 6% instead of 20%) so that the 62
classes stay learnable from one 28x28 character.

Determinism: each image has its own random stream, seeded by (seed, class index, image index),
so the same seed writes byte-identical files whatever the number of worker processes (with the
same Pillow, FreeType and zlib: a different font rasterizer may move an edge pixel).
Atomicity: images are written into a hidden temporary folder next to OUT, renamed to OUT only
when all are written; an interrupted run leaves no OUT behind, so it is never taken for a
complete one.
"""

from collections.abc import Sequence
import contextlib
import functools
import multiprocessing
import numbers
import os
import pathlib
import shutil
import string
import sys
import tempfile
import time

from absl import app
from absl import flags
import captcha.image
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFilter
from PIL import ImageFont

from nin_jax.errors import UserError

# The characters, in class order: digits, uppercase, lowercase (code point order, as EMNIST).
CHARACTERS: tuple[str, ...] = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)


def folder_name(char: str) -> str:
  """The class folder of `char`: 'A' -> 'A_upper'; digits and lowercase letters are themselves."""
  return f'{char}_upper' if char.isupper() else char


def character(class_name: str) -> str:
  """The character that class folder `class_name` holds: 'A_upper' -> 'A', 'a' -> 'a'."""
  return class_name.removesuffix('_upper')


# The class names (folder names), in class order; sorted(CLASSES) == list(CLASSES).
CLASSES: tuple[str, ...] = tuple(folder_name(c) for c in CHARACTERS)

# The captcha package's one font.
FONT_PATH = captcha.image.DEFAULT_FONTS[0]

# --- How one character varies. Lengths are in output pixels for a 28x28 image; they scale with
# image_size. DroidSansMono, em 22 px: capitals ~15.7 px tall, x-height ~11.8 px, ascender to
# descender 22 px, leaving 3 px above and below at 28.
_EM = 22.0                       # font size (em) at 28 px
_EM_JITTER = 0.05                # font size varies by up to +-5%
_SHIFT = 1.5                     # glyph position varies by up to +-1.5 px in x and in y
_ROTATE_DEGREES = 12.0           # uniform in +-12 degrees (the captcha: +-30)
_WARP = 0.06                     # each canvas corner moves up to 6% of the side (captcha: 20%)
_BOLD_PROBABILITY = 0.3          # ink thickened by one render pixel (half an output pixel)
_BACKGROUND = (238, 255)         # background gray level (the captcha's random_color(238, 255))
_INK = (10, 160)                 # ink gray level (the captcha's 10..200, capped for contrast)
_NOISE_DOTS = 10                 # 3-px dots at render scale: the captcha's density per area
_NOISE_ARC_PROBABILITY = 0.5     # the captcha's thin arc, on half of the images
_RENDER_SCALE = 2                # draw at 2x then halve: smooth, antialiased strokes


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
  return ImageFont.truetype(FONT_PATH, size)


@functools.lru_cache(maxsize=None)
def _ink_top_bottom(size: int) -> tuple[int, int]:
  """Highest and lowest ink of all CHARACTERS relative to the baseline ('l' to 'j'), in pixels."""
  _, top, _, bottom = _font(size).getbbox(''.join(CHARACTERS), anchor='ls')
  return top, bottom


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
  return float(rng.uniform(low, high))


def _warp_quad(rng: np.random.Generator, side: int) -> tuple[float, ...]:
  """Source corners (upper-left, lower-left, lower-right, upper-right) for Image.transform QUAD.

  Each corner of the canvas moves independently by up to _WARP * side: a mild perspective-like
  distortion, as the captcha's warp, that keeps the glyph's size within a few percent.
  """
  d = _WARP * side
  jitter = rng.uniform(-d, d, size=8)
  corners = (0, 0, 0, side, side, side, side, 0)
  return tuple(float(c + j) for c, j in zip(corners, jitter))


def _draw_noise_arc(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int,
                    ink: int, width: int) -> None:
  """The captcha's `create_noise_curve`: an arc from ~0 to ~180 degrees across the image."""
  w = h = side
  x1 = int(rng.integers(0, w // 5 + 1))
  x2 = int(rng.integers(0, w - w // 5 + 1)) + w // 5
  y1 = int(rng.integers(0, h - 2 * (h // 5) + 1)) + h // 5
  y2 = int(rng.integers(0, h - y1 - h // 5 + 1)) + y1
  start = int(rng.integers(0, 21))
  end = int(rng.integers(160, 201))
  draw.arc((x1, y1, x2, y2), start, end, fill=ink, width=width)


def _draw_noise_dots(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int, ink: int,
                     number: int) -> None:
  """The captcha's `create_noise_dots`: short 3-px-wide diagonal strokes in the ink color."""
  for x, y in rng.integers(0, side + 1, size=(number, 2)):
    draw.line(((int(x), int(y)), (int(x) - 1, int(y) - 1)), fill=ink, width=3)


def render_char(char: str, rng: np.random.Generator, image_size: int = 28) -> Image.Image:
  """Draws one character, captcha style, keeping its size and baseline on the canvas.

  Args:
    char: one character of CHARACTERS.
    rng: the image's own random stream; the same stream state gives the same pixels.
    image_size: side of the square output in pixels.

  Returns:
    An image_size x image_size PIL image in mode 'L' (uint8, dark ink on a light background).
  """
  scale = _RENDER_SCALE * image_size / 28.0
  side = _RENDER_SCALE * image_size
  em = _EM * scale * (1.0 + _uniform(rng, -_EM_JITTER, _EM_JITTER))
  size = max(1, round(em))
  font = _font(size)
  top, bottom = _ink_top_bottom(size)

  # The glyph's coverage on a blank canvas: horizontally centered; vertically, the span from the
  # tallest ascender to the deepest descender of all 62 characters is centered, so every
  # character of one font size sits on one baseline.
  mask = Image.new('L', (side, side), 0)
  x = side / 2 + _uniform(rng, -_SHIFT, _SHIFT) * scale
  baseline = (side - top - bottom) / 2 + _uniform(rng, -_SHIFT, _SHIFT) * scale
  stroke = 1 if rng.random() < _BOLD_PROBABILITY else 0
  ImageDraw.Draw(mask).text((x, baseline), char, fill=255, font=font, anchor='ms',
                            stroke_width=stroke, stroke_fill=255)

  # The captcha's distortions, on the whole canvas rather than the cropped glyph.
  mask = mask.rotate(_uniform(rng, -_ROTATE_DEGREES, _ROTATE_DEGREES), Image.Resampling.BILINEAR)
  mask = mask.transform((side, side), Image.Transform.QUAD, _warp_quad(rng, side),
                        Image.Resampling.BILINEAR)

  background = int(rng.integers(_BACKGROUND[0], _BACKGROUND[1] + 1))
  ink = int(rng.integers(_INK[0], _INK[1] + 1))
  image = Image.new('L', (side, side), background)
  image.paste(ink, (0, 0, side, side), mask)
  draw = ImageDraw.Draw(image)
  _draw_noise_dots(draw, rng, side, ink, round(_NOISE_DOTS * (image_size / 28.0) ** 2))
  if rng.random() < _NOISE_ARC_PROBABILITY:
    _draw_noise_arc(draw, rng, side, ink, width=max(1, round(scale)))
  image = image.filter(ImageFilter.SMOOTH)
  return image.reduce(_RENDER_SCALE)


def _image_rng(seed: int, class_index: int, index: int) -> np.random.Generator:
  """The random stream of one image; independent of every other image and of the worker."""
  return np.random.default_rng([seed, class_index, index])


def _write_class(args: tuple[str, int, int, int, int]) -> int:
  """Writes the images of one class into folder/<class>/; returns how many. Runs in workers."""
  folder, class_index, per_class, seed, image_size = args
  char = CHARACTERS[class_index]
  class_dir = os.path.join(folder, CLASSES[class_index])
  os.makedirs(class_dir)
  width = len(str(per_class - 1))
  for index in range(per_class):
    image = render_char(char, _image_rng(seed, class_index, index), image_size)
    image.save(os.path.join(class_dir, f'{index:0{width}d}.png'), format='PNG')
  return per_class


def _available_cpus() -> int:
  """CPUs this process may run on (a container or taskset may allow fewer than the machine's)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _check_args(out: pathlib.Path, per_class: int, seed: int, image_size: int,
                workers: int | None) -> None:
  if not isinstance(per_class, numbers.Integral) or per_class < 1:
    raise UserError(f'per_class must be a positive integer (images per class), got {per_class!r}')
  if not isinstance(seed, numbers.Integral) or seed < 0:
    raise UserError(f'seed must be a non-negative integer, got {seed!r}')
  if not isinstance(image_size, numbers.Integral) or image_size < 8:
    raise UserError(f'image_size must be an integer of at least 8 pixels, got {image_size!r}')
  if workers is not None and (not isinstance(workers, numbers.Integral) or workers < 1):
    raise UserError(f'workers must be a positive integer or None (all CPUs), got {workers!r}')
  if out.exists() and not out.is_dir():
    raise UserError(f'{out} exists and is not a folder: choose another output folder')
  if out.is_dir() and any(out.iterdir()):
    raise UserError(f'{out} already exists and is not empty: delete it or choose another folder')


def make_chars(out_dir: str | os.PathLike[str], per_class: int, seed: int = 0,
               image_size: int = 28, workers: int | None = None) -> None:
  """Writes per_class images of each of the 62 CLASSES to out_dir/<class>/<index>.png.

  Args:
    out_dir: the folder to create; it must not exist, or be empty. Its parent is created.
    per_class: images per class (>= 1).
    seed: the same seed writes byte-identical files.
    image_size: side of the square grayscale images, in pixels.
    workers: processes to draw with; None: one per CPU (at most 62). 1 draws in this process.

  Raises:
    UserError: a bad argument, or out_dir is a file or a non-empty folder.
  """
  out = pathlib.Path(out_dir)
  _check_args(out, per_class, seed, image_size, workers)
  workers = min(workers or _available_cpus(), len(CLASSES))
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling, so the final rename stays on one file system and is atomic.
    tmp = tempfile.mkdtemp(prefix=f'.{out.name}.partial-', dir=out.parent)
  except OSError as e:
    raise UserError(f'cannot create {out}: {e.strerror or e}; choose another folder') from e
  try:
    tasks = [(tmp, i, per_class, seed, image_size) for i in range(len(CLASSES))]
    if workers == 1:
      for task in tasks:
        _write_class(task)
    else:
      # 'spawn', not 'fork': the caller may be a multithreaded JAX/TensorFlow process.
      with multiprocessing.get_context('spawn').Pool(workers) as pool:
        for _ in pool.imap_unordered(_write_class, tasks):
          pass
    if out.is_dir():
      # Empty (checked above); os.replace cannot replace a folder on every system. Another
      # process may have just renamed its finished folder into place: then keep that one.
      with contextlib.suppress(OSError):
        out.rmdir()
    try:
      os.replace(tmp, out)
    except OSError:
      # Another process (e.g. another host of the same run) finished first. Its folder is
      # complete, as it was renamed into place, so it is as good as ours.
      if not (out.is_dir() and any(out.iterdir())):
        raise
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# --- Command line -------------------------------------------------------------------------------


def _define_flags() -> None:
  """Defined only when run as a script: importers (the trainer) keep their own flag namespace."""
  flags.DEFINE_string('out', None, 'Folder to create, e.g. data/chars.')
  flags.DEFINE_integer('per_class', 300, 'Images per class.')
  flags.DEFINE_integer('seed', 0, 'Random seed; the same seed writes identical files.')
  flags.DEFINE_integer('image_size', 28, 'Side of the square images, in pixels.')
  flags.DEFINE_integer('workers', None, 'Processes to draw with; default one per CPU.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  args = flags.FLAGS
  try:
    if not args.out:
      raise UserError('--out is required: the folder to write the characters to')
    start = time.perf_counter()
    make_chars(args.out, args.per_class, args.seed, args.image_size, args.workers)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {len(CLASSES)} x {args.per_class} images to {args.out} '
        f'in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
