"""What stops a run early, each with its cause and fix: a step that is not finite, a dead net,
SIGTERM (preemption); and the warning for a loss still at chance.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from typing import Iterator

from absl import logging
import jax

from nin_jax.errors import UserError


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the current step was saved."""


class Diverged(UserError):
  """The loss or a gradient stopped being finite; the last good checkpoint is kept."""


class DeadNet(UserError):
  """Every gradient has been exactly zero for `DeadNetGuard.patience` steps."""


def check_finite(state, checkpoints, learning_rate: float) -> None:
  """Raises `Diverged` once the train step has recorded a step that was not finite."""
  bad = int(state['nonfinite_step'])
  if bad >= 0:
    raise Diverged(
        f'the loss or a gradient is not finite at step {bad + 1}; stopped. The last '
        f'good checkpoint (step {checkpoints.latest_step()}) is kept. Lower '
        f'learning_rate (now {learning_rate}) or check the data.')


class DeadNetGuard:
  """Stops a run whose net is dead: every gradient exactly zero, step after step.

  NIN's known failure ("stuck at chance", docs/references.md): when every class map is at or
  below zero under the final ReLU, every logit is 0, the loss is ln C and no gradient reaches
  any weight, so the net can never learn again. `update` is called every step with the step's
  device metrics; every `every` steps it reads those of the steps dispatched `every` steps
  earlier (already computed, so the devices are not stalled) and raises `DeadNet` once
  `patience` steps in a row had a zero gradient: within about 40 steps of the death.
  """

  def __init__(self, num_classes: int, every: int = 10, patience: int = 20):
    self.num_classes, self.every, self.patience = num_classes, every, patience
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.zero_steps = 0

  def update(self, step: int, metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, {k: metrics[k] for k in ('train_loss', 'grad_norm')}))
    if step % self.every or len(self.pending) <= self.every:
      return
    ready, self.pending = self.pending[:-self.every], self.pending[-self.every:]
    for s, m in jax.device_get(ready):
      self.zero_steps = self.zero_steps + 1 if m['grad_norm'] == 0 else 0
      if self.zero_steps >= self.patience:
        raise DeadNet(
            f'the net is dead: every gradient has been exactly zero for {self.zero_steps} '
            f'steps (to step {s}), loss {float(m["train_loss"]):.4f} (ln {self.num_classes} = '
            f'{math.log(self.num_classes):.4f}). Every class map is at or below zero under the '
            'final ReLU, so every logit is 0 and nothing can learn again; stopped. Start it '
            "alive with init='data', which starts every class map well above zero, or use a "
            'lower learning_rate or a longer warmup_fraction (docs/recipes.md)')


def warn_if_at_chance(train_loss: float, num_classes: int, step: int) -> bool:
  """The known NIN failure: loss frozen at ln C (often a dead final ReLU before the GAP)."""
  chance = math.log(num_classes)
  if abs(train_loss - chance) < 0.02 * chance:
    logging.warning(
        'Training loss %.4f at step %d is still ln(%d) = %.4f: the net predicts chance. Likely '
        'causes: a dead final ReLU before global average pooling (all class maps zero), a '
        'learning rate too high for this init (try a lower learning_rate or warmup), or an init '
        "too small to move (init='paper'; try init='data').", train_loss, step, num_classes,
        chance)
    return True
  return False


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
  """Sets the yielded event on SIGTERM (preemption) instead of dying mid-step.

  Single-process only: with several processes each would stop at a different step and hang in
  a collective save, so there JAX's preemption service decides, through Orbax's
  `reached_preemption`, one step for all.
  """
  event = threading.Event()
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield event
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: event.set())
  try:
    yield event
  finally:
    signal.signal(signal.SIGTERM, previous)
