"""What a run sets up before JAX runs anything: the malloc setting, the processes, and
TensorFlow kept off the GPUs.

Both CLIs (`nin_jax.main`, `nin_jax.benchmark`) call the first two first, in this order: the
malloc setting must come before JAX's first computation, and `jax.distributed` before anything
touches a device. `train.train_and_evaluate` hides the GPUs from TensorFlow before its data
loads. Nothing is done on import, and TensorFlow is imported only by
`hide_accelerators_from_tensorflow`, for a run that uses it.
"""

from __future__ import annotations

import ctypes
import errno
import importlib.util
import os
import socket
import sys

from absl import logging
import jax

from nin_jax.errors import UserError

# Packages that give JAX an accelerator; with none of them installed the backend is the CPU.
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8  # glibc's mallopt
_keeping_freed_memory = False


def keep_freed_memory() -> bool:
  """On a CPU-only Linux host, makes glibc's malloc keep and reuse the memory XLA frees.

  Why: XLA's CPU runtime allocates each step's temporaries as one large block, which glibc
  serves with a fresh mmap and gives back with munmap, so every step pays again for page faults
  and for zeroing the pages. With one malloc arena, no mmap and no trimming the memory is reused
  instead; the cost is that the process keeps its peak memory, and fragmentation lets the heap
  grow for the first few steps (docs/benchmarks.md, "Memory reuse: malloc and XLA's freed
  buffers", has the figures). Must run before JAX's first computation (XLA's threads pick their
  arena on first use); call it from entry points only, never on import. Returns whether the
  setting was applied.
  """
  if sys.platform != 'linux':
    return False
  platforms = os.environ.get('JAX_PLATFORMS', '')
  cpu_only = (platforms.split(',')[0] == 'cpu' if platforms else
              not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS))
  if not cpu_only:
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):  # not glibc (e.g. musl)
    return False
  global _keeping_freed_memory
  _keeping_freed_memory = all(mallopt(option, value) == 1 for option, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 0)))
  return _keeping_freed_memory


def stop_keeping_freed_memory() -> bool:
  """Undoes `keep_freed_memory` for the rest of the run (glibc's mmap and trimming again); a
  no-op where it was not applied. Returns whether it was.

  For a streamed run: its data is beyond memory, and its trainer's must stay bounded. A heap
  that never returns memory grows with fragmentation, most where evaluation's temporaries
  interleave with training's: `experiments/imagenet.py` on one CPU grew to 4.0 GiB after a few
  steps and 5.6 GiB after its first evaluation with it, and stayed at 2.6 GiB without
  (docs/streaming.md).
  """
  global _keeping_freed_memory
  if not _keeping_freed_memory:
    return False
  mallopt = ctypes.CDLL('libc.so.6').mallopt
  # glibc's defaults: 65536 mmaps at most, 128 KiB trim threshold (its dynamic threshold stays off)
  mallopt(_M_MMAP_MAX, 65536)
  mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
  _keeping_freed_memory = False
  return True


# --- Several processes ---------------------------------------------------------------------------

_DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id')


def uses_tensorflow(config, workdir: str) -> bool:
  """Whether a run may load TensorFlow: for a TFDS dataset, or a path on a bucket. A local
  folder's run never does, and so saves the 0.5 GB that TensorFlow's import takes."""
  return config.dataset != 'folder' or any('://' in path for path in (workdir, config.data_dir))


def hide_accelerators_from_tensorflow(config, workdir: str) -> None:
  """Keeps TensorFlow (TFDS's engine; etils' for bucket paths) off the GPUs, whose memory is
  JAX's: before anything of a run that `uses_tensorflow` imports it. A run that does not is
  left without TensorFlow."""
  if not uses_tensorflow(config, workdir):
    return
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  tf.config.experimental.set_visible_devices([], 'GPU')


def check_distributed_flags(coordinator_address: str | None, num_processes: int | None,
                            process_id: int | None) -> None:
  """Raises UserError for settings that JAX would reject with a traceback or a crash."""
  if coordinator_address is not None:
    host, _, port = coordinator_address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise UserError(f'--coordinator_address={coordinator_address!r}: expected HOST:PORT of '
                      'process 0, e.g. 10.0.0.1:12355')
    if process_id == 0:  # process 0 serves on the port; JAX 0.10 segfaults if it is taken
      try:
        socket.create_server(('', int(port)), family=socket.AF_INET6,
                             dualstack_ipv6=socket.has_dualstack_ipv6()).close()
      except OSError as e:
        if e.errno == errno.EADDRINUSE:
          raise UserError(f'--coordinator_address={coordinator_address}: port {port} is in '
                          'use on this host; give every process another free port') from e
  if num_processes is not None and num_processes < 1:
    raise UserError(f'--num_processes={num_processes}: must be at least 1')
  if process_id is not None and (
      process_id < 0 or (num_processes is not None and process_id >= num_processes)):
    raise UserError(f'--process_id={process_id}: must be in 0..{(num_processes or 1) - 1} '
                    '(0..num_processes-1)')


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Joins a multi-process run; returns whether `jax.distributed` was initialized.

  Must run before anything touches a JAX device. A setting left out (all three, usually) is
  read by JAX from the cluster it detects: a Cloud TPU pod slice, a SLURM job step, Open MPI.
  With none given and no cluster detected, JAX raises ValueError before it contacts anything
  or starts any service, and the run is a plain single-process one.

  On CPU, the processes' collectives (the gradient all-reduce) go through gloo over TCP,
  JAX's default; it is set here should a user or a later default have turned it off.
  """
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
           'process_id': process_id}
  given = {k: v for k, v in given.items() if v is not None}
  check_distributed_flags(coordinator_address, num_processes, process_id)
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**given)
  except ValueError as e:  # a setting neither given nor found in a cluster environment
    if not given:
      logging.info('No cluster detected (%s): a single-process run.', e)
      return False
    missing = ', '.join(f'--{k}' for k in _DISTRIBUTED_FLAGS if k not in given)
    raise UserError(f'{missing}: not given, and no cluster (TPU pod, SLURM, Open MPI) to read '
                    f'them from: give all of --{", --".join(_DISTRIBUTED_FLAGS)}') from e
  return True
