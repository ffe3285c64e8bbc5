r"""The stream's training images per second beside tf.data's, on the same cores, in one run.

  python benchmarks/imagenet_folder.py --data ../shared/data/cifar10_real_train3805.npz \
      --out /tmp/cifar_photos
  python -m nin_jax.pack /tmp/cifar_photos /tmp/cifar_packed
  python benchmarks/input_speed.py --folder /tmp/cifar_photos --packed /tmp/cifar_packed \
      --workers 1,2 --rounds 3 --out /tmp/input_speed.jsonl

Each round runs, for each worker count, one process per pipeline, one after the other:
- `python -m nin_jax.benchmark input --config experiments/imagenet.py` on the folder and on its
  packed shards (`--config.input_pipeline=stream --config.stream_workers=N`): read, decode,
  resize to 256 on the shorter side, random 224 crop, in N worker processes; timed as the
  batches reach the trainer; and on the folder with N threads in the trainer instead
  (`--config.stream_workers=0 --config.stream_threads=N`);
- `benchmarks/tfdata_input.py --workers N`: tf.data doing the same work on the same files
  (decode, resize, random crop, and the flip our stream leaves to the train step), all of its
  parallelism N threads, with libjpeg's accurate DCT as PIL decodes (`INTEGER_ACCURATE`) and
  with TensorFlow's default, the fast one (`INTEGER_FAST`).
Rounds interleave the pipelines so that a busy moment of a shared machine falls on all of them.
Prints each run's JSON line (to --out too) and then a table of each pipeline's median images/s
per worker count, with the CPU cores it kept busy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def num_classes(data_dir: str) -> int:
  """The classes of an ImageNet-layout folder (its train/ folders), or of a packed one."""
  index = os.path.join(data_dir, 'nin_jax_pack.json')
  if os.path.exists(index):
    with open(index) as f:
      return len(json.load(f)['class_names'])
  train = os.path.join(data_dir, 'train')
  if not os.path.isdir(train):
    sys.exit(f'error: {train}: no such folder (expected an ImageNet-layout folder)')
  return sum(os.path.isdir(os.path.join(train, n)) and not n.startswith('.')
             for n in os.listdir(train))


def ours(data_dir: str, workers: int, num_batches: int, threads: bool = False) -> list[str]:
  """`benchmark input` with `workers` processes, or as many threads in the trainer."""
  count = ['--config.stream_workers=0', f'--config.stream_threads={workers}'] if threads else [
      f'--config.stream_workers={workers}']
  return [sys.executable, '-m', 'nin_jax.benchmark', 'input',
          '--config', os.path.join(REPO, 'experiments', 'imagenet.py'),
          '--config.dataset=folder', f'--config.data_dir={data_dir}',
          '--config.input_pipeline=stream', *count,
          f'--num_batches={num_batches}', f'--config.num_classes={num_classes(data_dir)}']


def tfdata(data_dir: str, workers: int, num_batches: int, dct_method: str) -> list[str]:
  return [sys.executable, os.path.join(REPO, 'benchmarks', 'tfdata_input.py'),
          '--data_dir', data_dir, '--workers', str(workers), '--num_batches', str(num_batches),
          '--dct_method', dct_method]


def run(name: str, command: list[str], workers: int) -> dict:
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  if done.returncode:
    sys.exit(f'error: {name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}')
  result = json.loads(done.stdout.strip().splitlines()[-1])
  return dict(result, pipeline=name, workers=result.get('workers') or workers)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--folder', required=True, help='an ImageNet-layout folder of JPEGs')
  p.add_argument('--packed', help='the same folder packed (python -m nin_jax.pack)')
  p.add_argument('--workers', default='1,2', help='worker counts, a comma list')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--num_batches', type=int, default=200, help='batches of 64 timed per run')
  p.add_argument('--out', help='a file to write every run\'s JSON line to')
  args = p.parse_args(argv)
  counts = [int(w) for w in args.workers.split(',')]
  pipelines = [('stream, folder', lambda w: ours(args.folder, w, args.num_batches))]
  if args.packed:
    pipelines.append(('stream, packed', lambda w: ours(args.packed, w, args.num_batches)))
  pipelines.append(('stream, folder, threads',
                    lambda w: ours(args.folder, w, args.num_batches, threads=True)))
  pipelines += [(f'tf.data, {dct}', lambda w, dct=dct: tfdata(args.folder, w, args.num_batches,
                                                              dct))
                for dct in ('INTEGER_ACCURATE', 'INTEGER_FAST')]
  results = []
  out = open(args.out, 'w') if args.out else None
  for _ in range(args.rounds):
    for workers in counts:
      for name, command in pipelines:
        result = run(name, command(workers), workers)
        results.append(result)
        line = json.dumps(result)
        print(line, flush=True)
        if out:
          out.write(line + '\n')
          out.flush()
  print(f'\n| pipeline | {" | ".join(f"{w} worker(s): images/s (cores busy)" for w in counts)} |')
  print(f'|---|{"---|" * len(counts)}')
  for name, _ in pipelines:
    cells = []
    for workers in counts:
      runs = [r for r in results if r['pipeline'] == name and r['workers'] == workers]
      cells.append(f'{statistics.median(r["images_per_sec"] for r in runs):.0f} '
                   f'({statistics.median(r["cpu_cores_busy"] for r in runs):.2f})')
    print(f'| {name} | {" | ".join(cells)} |')


if __name__ == '__main__':
  main()
