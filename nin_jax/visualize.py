"""The class confidence maps of the last mlpconv block, as in the paper's Figure 4.

  python -m nin_jax.visualize --workdir runs/cifar10 --out maps.png
  python -m nin_jax.visualize --workdir runs/chars --out maps.png --images a.png b.png

With global average pooling the last mlpconv outputs one map per class and each logit is the
mean of its map, so the maps show *where* the net sees each class. For a few test images (or the
given image files) the figure shows each input beside the maps of its top classes, titled with
the class name and probability; the maps of one row share one colour scale, so their brightness
can be compared. Restores the run's latest checkpoint.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure  # No pyplot: no global state, no GUI backend (Agg).

from nin_jax import inference
from nin_jax import run_files
from nin_jax.errors import UserError

PANEL_INCHES = 1.7     # side of one image or map panel
MAX_NAME_CHARS = 16    # longer class or file names are shortened with an ellipsis


def _short(text: str, limit: int = MAX_NAME_CHARS) -> str:
  return text if len(text) <= limit else text[:limit - 1] + '…'


def for_display(images: np.ndarray) -> np.ndarray:
  """(N, H, W, C) uint8 or preprocessed float -> float in [0, 1], each image stretched alone.

  Preprocessed images (standardized, whitened) have no fixed range; stretching each one to
  [0, 1] shows what the net sees.
  """
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  images = images.astype(np.float32)
  low = images.min(axis=(1, 2, 3), keepdims=True)
  high = images.max(axis=(1, 2, 3), keepdims=True)
  return (images - low) / np.maximum(high - low, 1e-8)


def make_figure(images: np.ndarray, probs: np.ndarray, maps: np.ndarray,
                class_names: Sequence[str], *, top_classes: int = 3,
                captions: Sequence[str] | None = None, title: str | None = None) -> Figure:
  """One row per image: the input, then the maps of its `top_classes` most probable classes.

  Args:
    images: (N, H, W, C) inputs, uint8 or float (see `for_display`), C = 1 or 3.
    probs: (N, num_classes) class probabilities.
    maps: (N, h, w, num_classes) class confidence maps (the last mlpconv's output).
    class_names: num_classes names.
    top_classes: maps shown per image.
    captions: optional titles of the inputs (file name, true class); default 'input'.
    title: optional figure title.
  """
  n, num_classes = probs.shape
  if maps.shape[0] != n or maps.shape[-1] != num_classes:
    raise ValueError(f'maps {maps.shape} do not match probabilities {probs.shape}')
  top_classes = min(top_classes, num_classes)
  images = for_display(images)
  cols = 1 + top_classes
  fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * 1.25 * n + (0.4 if title else 0)),
               dpi=100, layout='constrained')
  axes = np.asarray(fig.subplots(n, cols, squeeze=False))
  for i in range(n):
    image = images[i]
    ax = axes[i, 0]
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray', vmin=0, vmax=1)
    ax.set_title(captions[i] if captions is not None else 'input', fontsize=9)
    top = np.argsort(-probs[i], kind='stable')[:top_classes]
    row = maps[i][..., top]
    vmin, vmax = min(0.0, float(row.min())), max(float(row.max()), 1e-6)
    for j, label in enumerate(top):
      ax = axes[i, 1 + j]
      ax.imshow(maps[i][..., label], cmap='viridis', vmin=vmin, vmax=vmax,
                interpolation='nearest')
      ax.set_title(f'{_short(class_names[label])}\n{probs[i, label]:.1%}', fontsize=9,
                   fontweight='bold' if j == 0 else 'normal')
  for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def sample_test_images(config, count: int) -> tuple[np.ndarray, np.ndarray]:
  """`count` images spread evenly over the run's test split (so a class-per-folder split, which
  is sorted by class, shows several classes): uint8 (n, H, W, C) and int labels (n,).

  Loads the dataset through `nin_jax.input_pipeline` (and so TensorFlow for TFDS datasets, which
  is why it is imported here and not at the top).
  """
  from nin_jax import input_pipeline

  try:
    data = input_pipeline.create_data(config, process_index=0, process_count=1)
  except UserError as e:  # e.g. data_dir is relative to where training ran
    raise UserError(f'the test images of this run: {e} (or show your own with --images)') from None
  if not data.num_test_examples:
    raise UserError(f'the test split of dataset {config.dataset!r} is empty: pass --images')
  picks = np.unique(np.linspace(0, data.num_test_examples - 1, count).round().astype(int))
  return data.test_examples(picks)


def visualize(workdir: str, out: str, image_paths: Sequence[str] = (), num_images: int = 4,
              top_classes: int = 3) -> None:
  """Writes the Figure 4 style maps of a run to `out` (PNG).

  Images come from `image_paths` (files or folders, the first `num_images`) or, when none are
  given, from the run's test split.

  Raises:
    UserError: bad counts, a missing or unreadable image, a run without class maps (the fc
      heads have none), or an unusable workdir.
  """
  if num_images < 1 or top_classes < 1:
    raise UserError(f'--num_images={num_images}, --top_classes={top_classes}: both must be >= 1')
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise UserError(f'--out {out}: folder {folder} does not exist')
  files = inference.expand_image_paths(image_paths)[:num_images] if image_paths else []
  if not run_files.path(workdir).is_dir():
    raise UserError(f'run folder {workdir} does not exist: pass the --workdir of a training run')
  head = inference.load_config(workdir).get('head', 'gap')
  if head != 'gap':
    raise UserError(f"{workdir} was trained with head={head!r}: only the paper's 'gap' head "
                    "makes the last mlpconv's maps class confidence maps")
  run = inference.load_run(workdir)
  if files:
    shown = inference.load_images(files, run.image_shape, run.config.get('resize_size', 0))
    captions = [_short(os.path.basename(p), 22) for p in files]
  else:
    shown, labels = sample_test_images(run.config, num_images)
    captions = [f'true: {_short(run.class_names[int(l)])}' for l in labels]
  probs, maps = run.forward(run.preprocessor(shown))
  if maps is None or maps.shape[-1] != len(run.class_names):
    raise UserError(f'the model of {workdir} sows no class_maps with one map per class')
  title = f'{os.path.basename(os.path.normpath(workdir))}, step {run.step}: class maps'
  fig = make_figure(shown, probs, maps, run.class_names, top_classes=top_classes,
                    captions=captions, title=title)
  fig.savefig(out)


def main(argv: Sequence[str]) -> None:
  from absl import flags

  f = flags.FLAGS
  inference.quiet_logging()
  # `--images a.png b.png` leaves b.png as a positional argument: take those as images too.
  images = list(f.images or ()) + list(argv[1:])
  try:
    visualize(f.workdir, f.out, images, num_images=f.num_images,
              top_classes=f.top_classes)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f.out)


if __name__ == '__main__':
  from absl import app, flags

  # Defined here, not at import, so that importing this module next to other CLIs (the tests,
  # nin_jax.main) never collides on a flag name.
  flags.DEFINE_string('workdir', None, 'the run folder (as given to nin_jax.main --workdir)')
  flags.DEFINE_string('out', 'maps.png', 'where to write the figure (PNG)')
  flags.DEFINE_list('images', None, 'image files or folders (comma-separated, or spaced after '
                    "the flag); default: the first test images of the run's dataset")
  flags.DEFINE_integer('num_images', 4, 'images (rows) to show')
  flags.DEFINE_integer('top_classes', 3, 'class maps per image, most probable first')
  flags.mark_flag_as_required('workdir')
  app.run(main)
