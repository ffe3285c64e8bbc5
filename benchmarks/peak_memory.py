r"""Peak memory of a training run and all its processes, and the time to its first step.

  python benchmarks/peak_memory.py --workdir /tmp/run_x17 -- \
      python -m nin_jax.main --config experiments/imagenet.py --workdir /tmp/run_x17 \
      --config.data_dir=/tmp/cifar_photos_x17 --config.num_classes=10 \
      --config.num_train_steps=5 --config.log_every_steps=1

Runs the command after `--` and samples, every --every seconds, the proportional set size (PSS,
/proc/PID/smaps_rollup) of it and of every process under it (the stream's workers): PSS counts
a page shared by k processes as 1/k in each, so the sum over the tree is the memory the run
really holds. The first step is the moment WORKDIR/metrics.jsonl first holds a training record
(log every step to time it). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def descendants(pid: int) -> list[int]:
  """pid and every process under it."""
  found, todo = [], [pid]
  while todo:
    p = todo.pop()
    found.append(p)
    try:
      for task in os.listdir(f'/proc/{p}/task'):
        with open(f'/proc/{p}/task/{task}/children') as f:
          todo += [int(c) for c in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
      pass
  return found


def pss_bytes(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/smaps_rollup') as f:
      for line in f:
        if line.startswith('Pss:'):
          return int(line.split()[1]) * 1024
  except (FileNotFoundError, ProcessLookupError, PermissionError):
    pass
  return 0


def first_step_done(workdir: str) -> bool:
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return any('train_loss' in line for line in f)
  except FileNotFoundError:
    return False


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if '--' not in argv:
    sys.exit('usage: peak_memory.py --workdir WORKDIR [--every S] -- COMMAND ...')
  cut = argv.index('--')
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True, help="the run's --workdir")
  p.add_argument('--every', type=float, default=0.2, help='seconds between samples')
  p.add_argument('--log', default=None, help="write the run's output here (default: discard)")
  p.add_argument('--trace', default=None, help='write each sample here: seconds, total GiB')
  args = p.parse_args(argv[:cut])
  command = argv[cut + 1:]
  log = open(args.log, 'w') if args.log else subprocess.DEVNULL
  start = time.time()
  proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
  peak = {'total': 0, 'trainer': 0, 'others': 0, 'processes': 0, 'at': 0.0}
  first_step = None
  trace = open(args.trace, 'w') if args.trace else None
  while proc.poll() is None:
    pids = descendants(proc.pid)
    sizes = {pid: pss_bytes(pid) for pid in pids}
    trainer = max(sizes, key=sizes.get)  # the launcher may be a thin parent (e.g. a shell)
    total = sum(sizes.values())
    if trace:
      trace.write(f'{time.time() - start:.1f} {total / 2**30:.3f} {len(pids)}\n')
    if total > peak['total']:
      peak = {'total': total, 'trainer': sizes[trainer], 'others': total - sizes[trainer],
              'processes': len(pids), 'at': time.time() - start}
    if first_step is None and first_step_done(args.workdir):
      first_step = time.time() - start
    time.sleep(args.every)
  gib = lambda b: round(b / 2**30, 3)
  print(json.dumps({
      'returncode': proc.returncode, 'seconds': round(time.time() - start, 1),
      'first_step_seconds': None if first_step is None else round(first_step, 1),
      'peak_pss_gib': gib(peak['total']), 'trainer_pss_gib_at_peak': gib(peak['trainer']),
      'other_processes_pss_gib_at_peak': gib(peak['others']),
      'processes_at_peak': peak['processes'], 'peak_at_seconds': round(peak['at'], 1),
      'command': ' '.join(command)}))


if __name__ == '__main__':
  main()
