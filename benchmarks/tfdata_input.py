r"""The tf.data reference for the streaming input path: training images per second per worker.

  pip install tensorflow-cpu
  python benchmarks/tfdata_input.py --data_dir /tmp/cifar_photos --workers 1,2
  python benchmarks/tfdata_input.py --data_dir /tmp/cifar_photos_x17 --workers 1 --workers 4 \
      --batch_size 64 --num_batches 200

A plain tf.data pipeline doing the work of one ImageNet training image, the same as
`nin_jax.stream` does with `--config.resize_size`: the files of DATA_DIR/train/<class>/ (sorted;
label = index of the class among the sorted class folders), shuffled with a fixed seed and
repeated; per file `tf.io.read_file`, `tf.io.decode_jpeg(channels=3)`, the shorter side resized
to --resize_size with the aspect ratio kept (bilinear, antialiased, rounded back to uint8; skipped
where the shorter side is already --resize_size, as `datasets.decode_image` skips it), a random
--image_size square crop and a random left-right flip; then batches (drop_remainder) and
prefetch, read as numpy arrays.

Each worker count N runs in its own process, since TensorFlow's thread pools can be sized only
once per process. All of its parallelism is N: `num_parallel_calls=N` for the map, a private
tf.data thread pool of N threads, intra-op parallelism 1, inter-op threads N. After --warmup
batches, --num_batches batches are timed. Prints one JSON line per worker count: images per
second, the same per worker, and `cpu_cores_busy`, the process's CPU time (user + system) over
the timed wall time, to check that the pipeline kept to N cores.

Only JPEG files (.jpg, .jpeg, any case) are read: `decode_jpeg` decodes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

JPEG_EXTENSIONS = ('.jpg', '.jpeg')


def list_files(data_dir: str) -> tuple[list[str], list[int], list[str]]:
  """The JPEG files under data_dir/train/<class>/, class by class, each class's files sorted.

  Returns:
    paths, labels (index into class_names) and class_names (the sorted class folders).
  """
  train = os.path.join(data_dir, 'train')
  if not os.path.isdir(data_dir):
    sys.exit(f'error: --data_dir {data_dir}: no such folder')
  if not os.path.isdir(train):
    sys.exit(f'error: {train}: no such folder (expected DATA_DIR/train/<class>/*.JPEG)')
  class_names = sorted(n for n in os.listdir(train)
                       if not n.startswith('.') and os.path.isdir(os.path.join(train, n)))
  paths, labels = [], []
  for label, name in enumerate(class_names):
    for parent, folders, names in os.walk(os.path.join(train, name)):
      folders[:] = sorted(f for f in folders if not f.startswith('.'))
      for n in sorted(names):
        if not n.startswith('.') and n.lower().endswith(JPEG_EXTENSIONS):
          paths.append(os.path.join(parent, n))
          labels.append(label)
  if not paths:
    sys.exit(f'error: {train}: no JPEG images in class folders (expected {train}/<class>/*.JPEG)')
  return paths, labels, class_names


def build_dataset(tf, paths: list[str], labels: list[int], workers: int, batch_size: int,
                  resize_size: int, image_size: int, dct_method: str = '', seed: int = 0):
  """The training pipeline, all of its parallelism limited to `workers` threads."""

  def load(path, label):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method=dct_method)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    scale = resize_size / tf.cast(tf.minimum(h, w), tf.float64)
    new_h = tf.maximum(image_size, tf.cast(tf.round(tf.cast(h, tf.float64) * scale), tf.int32))
    new_w = tf.maximum(image_size, tf.cast(tf.round(tf.cast(w, tf.float64) * scale), tf.int32))

    def resize():
      resized = tf.image.resize(image, tf.stack([new_h, new_w]), method='bilinear',
                                antialias=True)
      return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)

    image = tf.cond(tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w)),
                    lambda: image, resize)
    image = tf.image.random_crop(image, (image_size, image_size, 3))
    image = tf.image.random_flip_left_right(image)
    return image, label

  ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths), tf.constant(labels, tf.int32)))
  ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.map(load, num_parallel_calls=workers, deterministic=False)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(2)
  options = tf.data.Options()
  options.threading.private_threadpool_size = workers
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False  # no thread counts or buffer sizes but the ones above
  return ds.with_options(options)


def run_one(args, workers: int) -> dict:
  """Times the pipeline with `workers` threads in this process (TensorFlow imported here)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.threading.set_inter_op_parallelism_threads(workers)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.random.set_seed(0)
  paths, labels, _ = list_files(args.data_dir)
  ds = build_dataset(tf, paths, labels, workers, args.batch_size, args.resize_size,
                     args.image_size, args.dct_method)
  batches = ds.as_numpy_iterator()
  for _ in range(args.warmup):
    next(batches)
  cpu0, start = os.times(), time.perf_counter()
  for _ in range(args.num_batches):
    images, _ = next(batches)
  seconds, cpu1 = time.perf_counter() - start, os.times()
  assert images.shape == (args.batch_size, args.image_size, args.image_size, 3), images.shape
  cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
  rate = args.batch_size * args.num_batches / seconds
  return {
      'pipeline': 'tf.data', 'workers': workers, 'images_per_sec': round(rate, 1),
      'images_per_sec_per_worker': round(rate / workers, 1),
      'cpu_cores_busy': round(cpu / seconds, 2), 'seconds': round(seconds, 2),
      'batch_size': args.batch_size, 'num_batches': args.num_batches, 'warmup': args.warmup,
      'resize_size': args.resize_size, 'image_size': args.image_size,
      'decoder': f'tf.io.decode_jpeg(dct_method={args.dct_method!r})',
      'data_dir': args.data_dir, 'num_files': len(paths),
      'tensorflow': tf.__version__,
  }


def parse_workers(values: list[str]) -> list[int]:
  counts = []
  for value in values:
    for part in value.split(','):
      if part.strip():
        if not part.strip().isdigit() or int(part) < 1:
          sys.exit(f'error: --workers {value}: want positive integers, e.g. 1,2')
        counts.append(int(part))
  return counts


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--data_dir', required=True, help='ImageNet-layout folder; train/ is read')
  p.add_argument('--workers', action='append', default=None,
                 help='worker counts, repeatable or a comma list (default 1)')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--resize_size', type=int, default=256, help='shorter side before the crop')
  p.add_argument('--image_size', type=int, default=224, help='side of the random crop')
  p.add_argument('--num_batches', type=int, default=200, help='batches timed')
  p.add_argument('--warmup', type=int, default=3, help='batches read before timing')
  p.add_argument('--dct_method', default='INTEGER_ACCURATE',
                 choices=['INTEGER_ACCURATE', 'INTEGER_FAST', ''],
                 help="decode_jpeg's IDCT: INTEGER_ACCURATE is libjpeg's accurate one, as PIL "
                 "decodes; '' is TensorFlow's default, INTEGER_FAST")
  p.add_argument('--one', type=int, help=argparse.SUPPRESS)  # internal: one count, this process
  args = p.parse_args(argv)
  if args.resize_size < args.image_size:
    sys.exit(f'error: --resize_size {args.resize_size} < --image_size {args.image_size}')
  if args.one is not None:
    print(json.dumps(run_one(args, args.one)), flush=True)
    return
  list_files(args.data_dir)  # the errors here, once, before any worker process starts
  common = ['--data_dir', args.data_dir, '--batch_size', str(args.batch_size),
            '--resize_size', str(args.resize_size), '--image_size', str(args.image_size),
            '--num_batches', str(args.num_batches), '--warmup', str(args.warmup),
            '--dct_method', args.dct_method]
  for workers in parse_workers(args.workers or ['1']):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *common,
                           '--one', str(workers)], stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
      sys.exit(f'error: the tf.data run with {workers} workers failed (exit {proc.returncode})')
    print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == '__main__':
  main()
