"""The test suite's own nets, added to `nin_jax.architectures.MODELS` for the tests only.

`register()` runs in the pytest processes (tests/conftest.py) and, through sitecustomize.py
beside this file, in every Python process the tests start: conftest.py puts this folder on
PYTHONPATH, so that a training run, a prediction or a benchmark started as a command can name
these nets too. The package's table holds only the nets of the paper and the small NIN.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY_NETS = {
    # A two-block NIN that compiles and trains in seconds on a CPU.
    '_nin_tiny': dict(kernel_sizes=(3, 3), strides=(1, 1), paddings=(1, 1),
                      widths=((16, 16), (32, None)), pools=('max',), dropout_after=(True,)),
}


def register() -> None:
  """Adds TINY_NETS to the package of this checkout (not another one installed)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from nin_jax import architectures  # pylint: disable=g-import-not-at-top
  for name, spec in TINY_NETS.items():
    architectures.MODELS.setdefault(name, spec)
