"""Classify image files with a trained run: one line per image.

  python -m nin_jax.predict --workdir runs/chars my_a.png scans/ [--top_k 3]

Prints `PATH<TAB>CLASS_NAME<TAB>PROBABILITY` per image (folders are searched for images,
recursively, in sorted order); `--top_k K` adds the next K-1 classes as more
`<TAB>CLASS_NAME<TAB>PROBABILITY` pairs on the same line. Images are resized, converted and
normalized exactly as the run's training data were, with its own saved preprocessing.
"""

from __future__ import annotations

import sys
from typing import Sequence, TextIO

import numpy as np

from nin_jax import inference
from nin_jax.errors import UserError


def format_line(path: str, probs: np.ndarray, class_names: Sequence[str], top_k: int) -> str:
  """`path<TAB>name<TAB>prob[...]` for the top_k classes of one image, most probable first."""
  order = np.argsort(-probs, kind='stable')[:top_k]
  fields = [path]
  for label in order:
    fields += [class_names[label], f'{probs[label]:.4f}']
  return '\t'.join(fields)


def predict_files(workdir: str, paths: Sequence[str], top_k: int = 1, batch_size: int = 64,
                  out: TextIO = sys.stdout) -> int:
  """Classifies the images (files or folders) in `paths` and writes one line per image to `out`.

  Lines are written batch by batch, so a big folder streams. Returns the number of images.

  Raises:
    UserError: no paths, top_k < 1, a path that does not exist or is not an image, or a
      workdir that is not a usable run (see `inference.load_run`).
  """
  if not paths:
    raise UserError('no images given: python -m nin_jax.predict --workdir RUN_DIR IMAGE [...]')
  if top_k < 1:
    raise UserError(f'--top_k={top_k}: must be at least 1')
  if batch_size < 1:
    raise UserError(f'--batch_size={batch_size}: must be at least 1')
  files = inference.expand_image_paths(paths)  # Fail on a bad path before the slow load.
  run = inference.load_run(workdir)
  top_k = min(top_k, len(run.class_names))
  for chunk in inference.batched(files, batch_size):
    images = inference.load_images(chunk, run.image_shape, run.config.get('resize_size', 0))
    for path, probs in zip(chunk, run.predict(images, batch_size=batch_size)):
      out.write(format_line(path, probs, run.class_names, top_k) + '\n')
    out.flush()
  return len(files)


def main(argv: Sequence[str]) -> None:
  from absl import flags

  f = flags.FLAGS
  inference.quiet_logging()
  try:
    predict_files(f.workdir, argv[1:], top_k=f.top_k, batch_size=f.batch_size)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  from absl import app, flags

  # Defined here, not at import, so that importing this module next to other CLIs (the tests,
  # nin_jax.main) never collides on a flag name.
  flags.DEFINE_string('workdir', None, 'the run folder (as given to nin_jax.main --workdir)')
  flags.DEFINE_integer('top_k', 1, 'classes per image, most probable first')
  flags.DEFINE_integer('batch_size', 64, 'images per forward pass')
  flags.mark_flag_as_required('workdir')
  app.run(main)
