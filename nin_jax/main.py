"""Command line: train and evaluate a NIN.

  python -m nin_jax.main --config experiments/cifar10.py --workdir runs/cifar10
  python -m nin_jax.main --config experiments/chars.py --workdir runs/chars --config.num_epochs=2

Running again on the same workdir resumes from its last checkpoint.

Several hosts (or several processes on one host) train one model together when each runs the
same command plus --coordinator_address HOST:PORT --num_processes N --process_id I; on a TPU pod
slice or under SLURM or Open MPI, JAX finds these itself and the flags can be left out. See
docs/distributed.md.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from nin_jax import settings
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
    'XLA frees every step (faster steps, for keeping the peak memory; '
    'nin_jax.runtime.keep_freed_memory; undone for a streamed run, whose memory must stay '
    'bounded). --nokeep_freed_memory: off.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:  # every setting, before JAX, TensorFlow or any data has loaded
    settings.validate(FLAGS.config)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  # pylint: disable=g-import-not-at-top
  import jax
  from nin_jax import guards
  from nin_jax import runtime
  from nin_jax import train
  # pylint: enable=g-import-not-at-top
  # Before JAX's first computation (XLA's threads pick their malloc arena on first use).
  malloc_tuned = FLAGS.keep_freed_memory and runtime.keep_freed_memory()
  try:
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if jax.process_index() > 0 and not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # process 0 tells the story; the others, problems
  logging.info('JAX process %d of %d; %d local devices of %d: %s%s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices(), '; malloc keeps freed memory' if malloc_tuned else '')
  try:  # checks the batch against the devices, then hides the GPUs from TensorFlow, then loads
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except guards.Preempted as e:
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
    print(f'error: --config has no field {field!r}; the fields are in nin_jax/default_config.py',
          file=sys.stderr)
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    print(f'error: a --config override has the wrong type: {e}', file=sys.stderr)
  sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
