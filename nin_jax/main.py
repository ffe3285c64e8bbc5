"""Command line: train and evaluate a NIN.

  python -m nin_jax.main --config experiments/cifar10.py --workdir runs/cifar10
  python -m nin_jax.main --config experiments/chars.py --workdir runs/chars --config.num_epochs=2

Running again on the same workdir resumes from its last checkpoint.

Several hosts (or several processes on one host) train one model together when each runs the
same command plus --coordinator_address HOST:PORT --num_processes N --process_id I; on a TPU pod
slice or under SLURM or Open MPI, JAX finds these itself and the flags can be left out. See
docs/distributed.md.
"""

import errno
import socket
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from nin_jax import benchmark
from nin_jax import train
from nin_jax.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
config_flags.DEFINE_config_file(
    'config', None, 'An experiment file (experiments/*.py); override fields with '
    '--config.FIELD=VALUE.', lock_config=True)
flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process runs: HOST:PORT of process 0, which serves '
    "the processes' rendezvous there. Leave the three distributed flags out on a TPU pod or "
    'under SLURM / Open MPI: JAX reads them from the cluster.')
flags.DEFINE_integer('num_processes', None, 'Multi-process runs: how many processes.')
flags.DEFINE_integer('process_id', None, 'Multi-process runs: this one, 0..num_processes-1; '
                     'process 0 writes the files of the run.')
flags.DEFINE_bool(
    'keep_freed_memory', True, 'CPU-only Linux hosts: let malloc keep and reuse the memory '
    'XLA frees every step (training nin_cifar: 1.2-2x faster on our 2-core host, for keeping '
    'the peak memory; nin_jax.benchmark.keep_freed_memory). --nokeep_freed_memory: off.')
flags.mark_flags_as_required(['config', 'workdir'])

_DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id')


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Before JAX's first computation (XLA's threads pick their malloc arena on first use).
  malloc_tuned = FLAGS.keep_freed_memory and benchmark.keep_freed_memory()
  try:
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  try:
    # TensorFlow (TFDS's engine) must not take GPU memory from JAX.
    import tensorflow as tf
    tf.config.experimental.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  if jax.process_index() > 0 and not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # process 0 tells the story; the others, problems
  logging.info('JAX process %d of %d; %d local devices of %d: %s%s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices(), '; malloc keeps freed memory' if malloc_tuned else '')
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(143)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a bad flag or --config override said in one line (exit 2)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f'error: {e}', file=sys.stderr)
  except (AttributeError, KeyError) as e:  # ml_collections: a --config.FIELD that does not exist
    field = str(e).strip('"\'')
    print(f'error: --config has no field {field!r}; the fields are in experiments/default.py',
          file=sys.stderr)
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    print(f'error: a --config override has the wrong type: {e}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
