"""Data parallelism: the 1-D device mesh, its shardings, batches sent to it, steps jitted on it.

Every device of every process is on one 'data' axis: parameters replicated, the global batch
sharded on 'data', XLA inserting the gradient all-reduce. (That is what `jax.pmap` has become:
since JAX 0.8 it is a thin wrapper over `jit` + `shard_map`, in maintenance mode.) Training
(`nin_jax.train`) and the benchmark (`nin_jax.benchmark`) jit their steps here, the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import threading
from typing import Any, Callable, Iterator

from absl import logging
import jax
import numpy as np

from nin_jax import device_input
from nin_jax.errors import UserError


def create_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, process by process.

  The order matters: process p's local batch is rows [p·B/P, (p+1)·B/P) of the global batch, and
  `make_array_from_process_local_data` places it on p's devices in this order.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices), ('data',))


def batch_multiple() -> int:
  """What every global batch must divide by: the devices, and the processes that feed them."""
  return math.lcm(jax.device_count(), jax.process_count())


def check_batch_size(batch_size: int) -> None:
  """The training batch is part of the recipe: one that does not split evenly over the devices
  stops the run with the nearest sizes that do, rather than being changed behind its back."""
  multiple = batch_multiple()
  if batch_size % multiple:
    below, above = batch_size // multiple * multiple, -(-batch_size // multiple) * multiple
    nearest = f'{below} or {above}' if below else f'{above}'
    over = f'the {jax.device_count()} devices'
    if jax.process_count() > 1:
      over += f' of {jax.process_count()} processes'
    raise UserError(f'config.batch_size={batch_size} does not split over {over}; use {nearest}')


def eval_batch_size(requested: int) -> int:
  """`requested` rounded up to a multiple of `batch_multiple()`; evaluation pads and masks its
  last batch, so the size changes the speed, never the result."""
  multiple = batch_multiple()
  rounded = -(-requested // multiple) * multiple
  if rounded != requested:
    logging.info('eval_batch_size %d rounded up to %d, a multiple of the %d devices',
                 requested, rounded, jax.device_count())
  return rounded


def prefetch_to_mesh(batches: Iterator[dict[str, np.ndarray]], sharding: jax.sharding.Sharding,
                     size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Process-local numpy batches -> global sharded arrays, `size` batches ahead, on a thread.

  The host prepares and transfers the next batches while the devices run the current step.
  """
  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def produce():
    try:
      for batch in batches:
        if stop.is_set():
          return
        q.put(to_global(batch))
    except BaseException as e:  # handed to the consumer, which raises it
      q.put(e)
    finally:  # a generator's own clean-up (the stream's workers) runs now, not at exit
      close = getattr(batches, 'close', None)
      if close is not None:
        close()
    q.put(done)

  thread = threading.Thread(target=produce, daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    while thread.is_alive():  # unblock a producer waiting on a full queue
      with contextlib.suppress(queue.Empty):
        q.get_nowait()
      thread.join(timeout=0.05)


def shardings(mesh: jax.sharding.Mesh) -> tuple[jax.sharding.NamedSharding,
                                                 jax.sharding.NamedSharding]:
  """(replicated, batch-sharded): parameters and state on every device; batches split on 'data'."""
  return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')))


@dataclasses.dataclass(frozen=True)
class Steps:
  """A run's init, update and eval functions jitted over its mesh.

  `init(rng, init_images) -> state`, replicated. `update(state, inputs, *extra) -> (state,
  metrics)`, the state donated; `evaluate(params, inputs, *extra) -> sums`. `inputs` are the
  input path's batches (uint8 images and their draws) or, on the device input path, the draws
  alone; the step makes the network's batch of them (`nin_jax.device_input`) from the arrays in
  `extra` (the preprocessing statistics, and the dataset on the device path): arguments, never
  constants folded into the program.
  """
  init: Callable[..., Any]
  update: Any   # jitted: .lower(...) works, for the benchmark's compile time
  evaluate: Any
  extra: tuple[Any, ...] = ()

  def train(self, state, inputs):
    return self.update(state, inputs, *self.extra)

  def eval(self, params, inputs):
    return self.evaluate(params, inputs, *self.extra)


def jit_steps(mesh: jax.sharding.Mesh, init_fn: Callable[..., Any], step_fn: Callable[..., Any],
              eval_step_fn: Callable[..., Any], data, *, on_devices: bool = False) -> Steps:
  """`init_fn`, `step_fn(state, batch)` and `eval_step_fn(params, batch)` jitted over `mesh`,
  each step taking its batch as the input paths give it and making the network's batch first.

  Args:
    mesh: the run's mesh.
    init_fn, step_fn, eval_step_fn: `train.step_functions`.
    data: the run's `input_pipeline.Data` (or `stream.StreamData`): its preprocessing and
      augmentation settings, and its statistics.
    on_devices: the device input path: `data`'s arrays are put on every device and each step
      takes the batch's draws.
  """
  replicated, sharded = shardings(mesh)
  init = jax.jit(init_fn, out_shardings=replicated)
  arrays = device_input.put_on_devices(data, replicated, dataset=on_devices)
  make_train_batch, make_eval_batch = device_input.batch_makers(data)
  update = jax.jit(
      lambda state, inputs, arrays: step_fn(state, make_train_batch(inputs, arrays)),
      in_shardings=(replicated, sharded, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate = jax.jit(
      lambda params, inputs, arrays: eval_step_fn(params, make_eval_batch(inputs, arrays)),
      in_shardings=(replicated, sharded, replicated), out_shardings=replicated)
  return Steps(init, update, evaluate, (arrays,))
