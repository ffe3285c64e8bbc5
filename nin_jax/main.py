"""Command line: train and evaluate a NIN.

  python -m nin_jax.main --config experiments/cifar10.py --workdir runs/cifar10
  python -m nin_jax.main --config experiments/chars.py --workdir runs/chars --config.num_epochs=2

Running again on the same workdir resumes from its last checkpoint.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from nin_jax import train
from nin_jax.errors import UserError

FLAGS = flags.FLAGS

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
config_flags.DEFINE_config_file(
    'config', None, 'An experiment file (experiments/*.py); override fields with '
    '--config.FIELD=VALUE.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    # TensorFlow (TFDS's engine) must not take GPU memory from JAX.
    import tensorflow as tf
    tf.config.experimental.set_visible_devices([], 'GPU')
  except ImportError:
    pass
  logging.info('JAX process %d of %d; %d local devices of %d: %s', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.local_devices())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr)
    sys.exit(143)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
