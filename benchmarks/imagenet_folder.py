r"""Writes real images as JPEG photos in ImageNet's folder layout, for the streaming input path.

  # the real CIFAR-10 subset as 256-px photos, 20% of each class held out in val/ (the split of
  # benchmarks/recipes.py): 3,042 train + 763 val files, 10 classes
  python benchmarks/imagenet_folder.py --data ../shared/data/cifar10_real_train3805.npz \
      --out /tmp/cifar_photos
  # ... and each training photo written 17 times over: 51,714 training files, 7.8 GB decoded at
  # 224 x 224 x 3, for memory and time-to-first-step figures at scale
  python benchmarks/imagenet_folder.py --data ../shared/data/cifar10_real_train3805.npz \
      --out /tmp/cifar_photos_x17 --copies 17

Layout: OUT/train/<class>/<row>_<copy>.JPEG and OUT/val/<class>/<row>.JPEG, what
`experiments/imagenet.py` reads (`--config.data_dir=OUT --config.num_classes=10`). Each image is
upscaled (bicubic) to --size (pixels square, or WIDTHxHEIGHT) and encoded once at JPEG quality
--quality; its copies
are the same bytes under other names. Prints one JSON line: the counts, the bytes on disk and
the size of the training split decoded at 224 x 224 x 3.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipes import load_images, split  # pylint: disable=g-import-not-at-top,wrong-import-position


def encode(image: np.ndarray, size: tuple[int, int], quality: int) -> bytes:
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buffer = io.BytesIO()
  pil.resize(size, Image.Resampling.BICUBIC).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data', required=True, help="an .npz of images, a class folder, or 'digits'")
  p.add_argument('--out', required=True, help='the folder to write (must not exist)')
  p.add_argument('--size', default='256',
                 help='side of the square photos, or WIDTHxHEIGHT (e.g. 500x375)')
  p.add_argument('--quality', type=int, default=90, help='JPEG quality')
  p.add_argument('--copies', type=int, default=1, help='files per training image')
  p.add_argument('--val_fraction', type=float, default=0.2)
  args = p.parse_args(argv)
  try:
    size = tuple(int(n) for n in args.size.lower().split('x'))
    size = size * 2 if len(size) == 1 else size
    if len(size) != 2 or min(size) < 1:
      raise ValueError
  except ValueError:
    sys.exit(f'error: --size {args.size}: want a side (256) or WIDTHxHEIGHT (500x375)')
  if os.path.exists(args.out):
    sys.exit(f'error: {args.out} exists; choose a new folder')
  start = time.time()
  images, labels, class_names = load_images(args.data)
  train_rows, val_rows = split(labels, args.val_fraction)
  jobs = []
  for split_name, rows, copies in (('train', train_rows, args.copies), ('val', val_rows, 1)):
    for name in class_names:
      os.makedirs(os.path.join(args.out, split_name, name))
    for row in rows:
      folder = os.path.join(args.out, split_name, class_names[labels[row]])
      names = [f'{row:05d}_{k:03d}.JPEG' if split_name == 'train' else f'{row:05d}.JPEG'
               for k in range(copies)]
      jobs.append((row, [os.path.join(folder, n) for n in names]))

  def write(job):
    row, paths = job
    data = encode(images[row], size, args.quality)
    for path in paths:
      with open(path, 'wb') as f:
        f.write(data)
    return len(data) * len(paths)

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    written = sum(pool.map(write, jobs))
  num_train = len(train_rows) * args.copies
  print(json.dumps({
      'out': args.out, 'classes': len(class_names), 'train_files': num_train,
      'val_files': len(val_rows), 'size': list(size), 'disk_bytes': written,
      'train_decoded_bytes_at_224': num_train * 224 * 224 * 3,
      'seconds': round(time.time() - start, 1)}))


if __name__ == '__main__':
  main()
