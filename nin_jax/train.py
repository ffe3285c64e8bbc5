"""Training and evaluation of a NIN: one trainer that reads top to bottom.

`train_and_evaluate(config, workdir)` is the Flax examples' contract. Data parallelism is
`jax.jit` over a 1-D device mesh of every device of every process: parameters replicated, the
global batch sharded on the 'data' axis, XLA inserting the gradient all-reduce. (That is what
`jax.pmap` has become: since JAX 0.8 it is a thin wrapper over `jit` + `shard_map`, in
maintenance mode.)

Nothing here imports TensorFlow at module level: the train step runs on a bare JAX install (the
input pipeline, which uses TFDS, is imported when a run starts).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import queue
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from nin_jax import device_input
from nin_jax import models
from nin_jax.errors import UserError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the accelerator hosts lack it
  import ml_collections

SCHEDULES = ('cosine', 'step', 'plateau', 'constant')
State = dict[str, Any]  # {'step': int32 scalar, 'params': ..., 'opt_state': ..., 'nonfinite_step': int32}


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of the current step was saved."""


class Diverged(UserError):
  """The loss or a gradient stopped being finite; the last good checkpoint is kept."""


class DeadNet(UserError):
  """Every gradient has been exactly zero for `DeadNetGuard.patience` steps."""


# --- Durations -----------------------------------------------------------------------------------
# One vocabulary: the run is `num_train_steps` long (or num_epochs of the training set), and every
# other duration of the recipe is a fraction of it, so --config.num_epochs=N shortens all of it.

def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def every_steps(value: int, steps_per_epoch: int) -> int:
  """A bookkeeping interval: -1 means once per epoch."""
  return steps_per_epoch if value <= 0 else int(value)


# --- Optimizer -----------------------------------------------------------------------------------

def create_learning_rate_fn(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The base learning rate per step: linear warmup over warmup_fraction of the run, then
  'cosine' decay to 0, 'step' (×0.1 at each of step_fractions) or constant ('constant', and
  'plateau', whose drops `create_optimizer` adds)."""
  if config.schedule not in SCHEDULES:
    raise UserError(f'schedule={config.schedule!r}: expected one of {SCHEDULES}')
  lr = config.learning_rate
  warmup = int(config.warmup_fraction * num_steps)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))
  if config.schedule == 'step':
    main = optax.piecewise_constant_schedule(
        lr, {int(f * num_steps) - warmup: 0.1 for f in config.step_fractions})
  else:
    main = optax.constant_schedule(lr)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def create_optimizer(config: ml_collections.ConfigDict, params, learning_rate_fn: optax.Schedule,
                     steps_per_epoch: int, num_steps: int) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum, L2 weight decay on weights only, the authors' per-layer rates.

  Caffe's update, which the authors used: (gradient + decay·weight) × (base rate × layer
  multiplier), through momentum. With 'plateau', optax's reduce_on_plateau scales the update by
  0.1 when the training error, averaged over an epoch, stops improving (`update(..., value=error)`).
  """
  if config.lr_multipliers not in ('paper', 'none'):
    raise UserError(f"lr_multipliers={config.lr_multipliers!r}: expected 'paper' or 'none'")
  parts = [optax.add_decayed_weights(config.weight_decay, mask=models.weight_decay_mask(params))]
  if config.lr_multipliers == 'paper':
    multipliers = models.lr_multipliers(params)
    parts.append(optax.stateless(
        lambda updates, _: jax.tree_util.tree_map(lambda u, m: u * m, updates, multipliers)))
  parts.append(optax.sgd(learning_rate_fn, momentum=config.momentum))
  if config.schedule == 'plateau':
    patience = max(1, int(round(config.plateau_patience_fraction * num_steps / steps_per_epoch)))
    parts.append(optax.contrib.reduce_on_plateau(
        factor=0.1, patience=patience, rtol=0.0, atol=config.plateau_min_delta,
        accumulation_size=steps_per_epoch, min_scale=0.1 ** config.plateau_drops))
  return optax.chain(*parts)


def plateau_scale(opt_state) -> jax.Array:
  """The reduce_on_plateau factor in an optimizer state (1.0 without one)."""
  for leaf in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.ReduceLROnPlateauState)):
    if isinstance(leaf, optax.contrib.ReduceLROnPlateauState):
      return leaf.scale
  return jnp.ones((), jnp.float32)


# --- Train state ---------------------------------------------------------------------------------

def create_train_state(rng: jax.Array, init_images: jax.Array | None, *, model: models.NIN,
                       tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int]) -> State:
  """Fresh parameters and optimizer state. With `init_images` (float32 (N, H, W, C),
  preprocessed training images: `init_images`) the data-dependent init `models.init_from_data`
  rescales the parameters (config.init='data')."""
  params = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)['params']
  if init_images is not None:
    params = models.init_from_data(model, params, init_images)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'nonfinite_step': jnp.full((), -1, jnp.int32)}


def init_images(config: ml_collections.ConfigDict, data) -> np.ndarray | None:
  """The preprocessed training images that config.init='data' fits the init on (None for the
  other inits): one batch drawn with the run's seed, the same on every process."""
  if config.init != 'data':
    return None
  n = min(config.batch_size, data.num_train_examples)
  rows = np.sort(np.random.default_rng([config.seed, 2]).choice(  # 2: not the data's streams
      data.num_train_examples, n, replace=False))
  # Image by image, as every preprocessing is: the device path never preprocesses a whole split.
  return data.preprocessor(data.train_images_uint8[rows])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# --- Update step ---------------------------------------------------------------------------------

def train_step(state: State, batch: dict[str, jax.Array], *, model: models.NIN,
               tx: optax.GradientTransformationExtraArgs, learning_rate_fn: optax.Schedule,
               seed: int) -> tuple[State, dict[str, jax.Array]]:
  """One SGD step on a global batch {'image': (B, H, W, C) float32, 'label': (B,) int32}.

  Dropout's key is a function of (seed, step) alone, so a resumed run and an uninterrupted one
  draw the same masks. A step whose loss or gradients are not finite changes nothing and records
  its number in `nonfinite_step`; the parameters stay the last good ones.
  """
  step = state['step']
  dropout_rng = jax.random.fold_in(jax.random.key(seed), step)

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=True,
                         rngs={'dropout': dropout_rng})
    return cross_entropy(logits, batch['label']).mean(), logits

  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'], value=1.0 - accuracy)
  params = optax.apply_updates(state['params'], updates)

  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state['nonfinite_step'] < 0)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = {
      'step': step + 1,
      'params': keep(params, state['params']),
      'opt_state': keep(opt_state, state['opt_state']),
      'nonfinite_step': jnp.where(finite | (state['nonfinite_step'] >= 0),
                                  state['nonfinite_step'], step),
  }
  metrics = {'train_loss': loss, 'train_accuracy': accuracy, 'grad_norm': grad_norm,
             'learning_rate': learning_rate_fn(step) * plateau_scale(state['opt_state'])}
  return new_state, metrics


def eval_step(params, batch: dict[str, jax.Array], *, model: models.NIN) -> dict[str, jax.Array]:
  """Sums over the real (mask=True) examples of a padded global batch."""
  logits = model.apply({'params': params}, batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return {'loss_sum': jnp.sum(cross_entropy(logits, batch['label']) * mask),
          'correct': jnp.sum(correct * mask), 'count': jnp.sum(mask)}


# --- Devices -------------------------------------------------------------------------------------

def create_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over every device of every process, process by process.

  The order matters: process p's local batch is rows [p·B/P, (p+1)·B/P) of the global batch, and
  `make_array_from_process_local_data` places it on p's devices in this order.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return jax.sharding.Mesh(np.array(devices), ('data',))


def check_batch_size(batch_size: int, name: str) -> None:
  devices, processes = jax.device_count(), jax.process_count()
  if batch_size % devices:
    raise UserError(f'{name}={batch_size} does not divide by the {devices} devices; use a '
                    f'multiple of {devices} (e.g. {devices * max(1, round(batch_size / devices))})')
  if batch_size % processes:
    raise UserError(f'{name}={batch_size} does not divide by the {processes} processes')


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


# --- Files of a run ------------------------------------------------------------------------------
# Only process 0 writes them. Each whole file is written to a temporary name and renamed, so a
# crash never leaves one half-written; metrics.jsonl is appended line by line and, on resume,
# cut back to the restored step (dropping any torn last line), so no step appears twice. A
# checkpoint's custom metadata keeps the metrics of its steps not yet in a train record.

def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricsLog:
  """WORKDIR/metrics.jsonl plus clu's writers (TensorBoard event files and the log)."""

  def __init__(self, workdir: str, resume_step: int):
    from clu import metric_writers  # clu pulls in TensorFlow for its summary writer
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer, asynchronous=False)
    if self.is_writer:
      self._truncate(resume_step)

  def _truncate(self, resume_step: int) -> None:
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a torn last line from a crash
          continue
        if record.get('step', 0) <= resume_step:
          kept.append(json.dumps(record))
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(''.join(line + '\n' for line in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, values: dict[str, float]) -> None:
    self.writer.write_scalars(step, values)
    if self.is_writer:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **values}) + '\n')
        f.flush()

  def close(self) -> None:
    self.writer.flush()
    self.writer.close()


def unlogged_metadata(window: list[dict[str, Any]]) -> dict[str, Any]:
  """The steps' metrics not yet in a train record, for a checkpoint's custom metadata: a run
  resumed from a step between records then averages the same steps in its first record."""
  return {'unlogged_metrics': [{k: float(v) for k, v in m.items()}
                               for m in jax.device_get(window)]}


def restore_unlogged(checkpoints: ocp.CheckpointManager, step: int) -> list[dict[str, Any]]:
  """`unlogged_metadata`'s metrics (float32, as the train step returns them) from a checkpoint."""
  metadata = checkpoints.metadata(step).custom_metadata or {}
  return [{k: np.float32(v) for k, v in m.items()} for m in metadata.get('unlogged_metrics', [])]


def prepare_data(config: ml_collections.ConfigDict):
  """The run's data; generates the seed's characters first when the quickstart asks for them."""
  from nin_jax import input_pipeline  # TFDS and TensorFlow: imported only to run
  if (config.dataset == 'folder' and config.get('generate_chars', False)
      and config.data_dir and not os.path.exists(config.data_dir)):
    from nin_jax import make_chars
    logging.info('Writing the seed characters (%d per class) to %s', config.chars_per_class,
                 config.data_dir)
    make_chars.make_chars(config.data_dir, config.chars_per_class, seed=config.seed,
                          image_size=config.image_size)
  return input_pipeline.create_data(config)


# --- The trainer ---------------------------------------------------------------------------------

def evaluate(eval_fn: Callable, params, batches: Iterator[dict[str, np.ndarray]],
             sharding) -> dict[str, float]:
  """Test metrics over one pass of `batches` (host batches, or the device path's draws)."""
  sums = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  for batch in prefetch_to_mesh(batches, sharding):
    out = jax.device_get(eval_fn(params, batch))
    for k in sums:
      sums[k] += float(out[k])
  n = max(sums['count'], 1.0)
  accuracy = sums['correct'] / n
  return {'test_loss': sums['loss_sum'] / n, 'test_accuracy': accuracy,
          'test_error': 1.0 - accuracy, 'num_test_examples': int(sums['count'])}


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
  """Trains (or resumes training) in `workdir` and evaluates; returns the final train state.

  Writes WORKDIR/checkpoints (Orbax), metrics.jsonl, TensorBoard events, config.json,
  class_names.json, preprocessing.npz and, at the end, results.json.
  """
  start_time = time.time()
  is_writer = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  # --- Input pipeline ---
  check_batch_size(config.batch_size, 'batch_size')
  check_batch_size(config.eval_batch_size, 'eval_batch_size')
  data = prepare_data(config)
  steps_per_epoch = data.steps_per_epoch
  num_steps = total_steps(config, steps_per_epoch)
  log_every = every_steps(config.log_every_steps, steps_per_epoch)
  eval_every = every_steps(config.eval_every_steps, steps_per_epoch)
  checkpoint_every = every_steps(config.checkpoint_every_steps, steps_per_epoch)

  # --- Model and optimizer ---
  model = models.model_from_config(config)
  learning_rate_fn = create_learning_rate_fn(config, num_steps)
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *data.image_shape)), train=False)
  )['params']
  tx = create_optimizer(config, abstract_params, learning_rate_fn, steps_per_epoch, num_steps)

  # --- Set up mesh ---
  mesh = create_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  init_fn = jax.jit(functools.partial(create_train_state, model=model, tx=tx,
                                      image_shape=data.image_shape), out_shardings=replicated)
  step_fn = functools.partial(train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                              seed=config.seed)
  eval_step_fn = functools.partial(eval_step, model=model)
  # The host sends either whole batches, or (device path) only their draws: the rows and
  # augmentation of each image, turned into the same batch on the devices inside the step.
  pipeline = device_input.choose_pipeline(config.input_pipeline, data)
  if pipeline == 'device':
    arrays = device_input.put_on_devices(data, replicated)
    make_train_batch, make_eval_batch = device_input.batch_makers(data)
    device_update = jax.jit(
        lambda state, draws, arrays: step_fn(state, make_train_batch(arrays, draws)),
        in_shardings=(replicated, data_sharding, replicated),
        out_shardings=(replicated, replicated), donate_argnums=0)
    device_eval = jax.jit(
        lambda params, draws, arrays: eval_step_fn(params, make_eval_batch(arrays, draws)),
        in_shardings=(replicated, data_sharding, replicated), out_shardings=replicated)
    update_fn = lambda state, draws: device_update(state, draws, arrays)
    eval_fn = lambda params, draws: device_eval(params, draws, arrays)
    train_inputs = lambda start: map(data.train_draws, itertools.count(start))
    eval_inputs = data.eval_draws
  else:
    update_fn = jax.jit(step_fn, in_shardings=(replicated, data_sharding),
                        out_shardings=(replicated, replicated), donate_argnums=0)
    eval_fn = jax.jit(eval_step_fn, in_shardings=(replicated, data_sharding),
                      out_shardings=replicated)
    train_inputs, eval_inputs = data.train_batches, data.eval_batches
  logging.info('Input pipeline: %s', pipeline)

  # --- Load checkpoint ---
  checkpoints = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True))
  init_batch = init_images(config, data)
  if init_batch is not None:  # every process has the same images: a replicated global array
    init_batch = jax.make_array_from_process_local_data(replicated, init_batch)
  abstract_state = jax.eval_shape(init_fn, jax.random.key(config.seed), init_batch)
  start_step = checkpoints.latest_step()
  if start_step is None:
    state = init_fn(jax.random.key(config.seed), init_batch)
    start_step = 0
  else:
    logging.info('Resuming from the checkpoint of step %d in %s', start_step, workdir)
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_state)
    try:
      state = checkpoints.restore(start_step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError) as e:  # Orbax: the stored shapes or tree differ from the model's
      raise UserError(
          f'{workdir} holds a checkpoint of step {start_step} that does not fit this run\'s model '
          f'({config.model}, {config.num_classes} classes; {type(e).__name__}: {e}). Use a new '
          f'--workdir, or the settings in its config.json') from e
  if start_step > num_steps:
    raise UserError(f'{workdir} holds a checkpoint of step {start_step}, past this run\'s '
                    f'{num_steps} steps: use a new --workdir or a longer run')
  # Written once the workdir's checkpoint (if any) is known to fit, so that a refused resume
  # leaves the config.json of the run that made it.
  if is_writer:
    write_json_atomic(os.path.join(workdir, 'config.json'),
                      json.loads(config.to_json_best_effort()))
    write_json_atomic(os.path.join(workdir, 'class_names.json'), list(data.class_names))
    data.preprocessor.save(os.path.join(workdir, 'preprocessing.npz'))

  num_params = models.count_params(state['params'])
  logging.info('%s: %d parameters, %d classes, %d train / %d test images, %d steps '
               '(%d per epoch), global batch %d over %d devices in %d processes', config.model,
               num_params, data.num_classes, data.num_train_examples, data.num_test_examples,
               num_steps, steps_per_epoch, config.batch_size, jax.device_count(),
               jax.process_count())

  # --- Train loop ---
  log = MetricsLog(workdir, start_step)
  progress = None
  if is_writer and config.progress_bar:
    from tqdm import tqdm
    progress = tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                    desc='train')
  chance_checked = False
  dead_guard = DeadNetGuard(data.num_classes)
  window: list[dict[str, jax.Array]] = []
  unlogged = restore_unlogged(checkpoints, start_step) if start_step else []  # steps before it
  window_start = time.time()
  train_seconds, train_images = 0.0, 0
  eval_metrics = None
  step = start_step
  try:
    with sigterm_flag() as preempted:
      batches = prefetch_to_mesh(train_inputs(start_step), data_sharding)
      for step in range(start_step + 1, num_steps + 1):
        state, metrics = update_fn(state, next(batches))
        window.append(metrics)
        dead_guard.update(step, metrics)
        if progress is not None:
          progress.update(1)

        if step % log_every == 0 or step == num_steps:
          bad = int(state['nonfinite_step'])
          if bad >= 0:
            raise Diverged(
                f'the loss or a gradient is not finite at step {bad + 1}; stopped. The last '
                f'good checkpoint (step {checkpoints.latest_step()}) is kept. Lower '
                f'learning_rate (now {config.learning_rate}) or check the data.')
          fetched = unlogged + jax.device_get(window)
          elapsed = time.time() - window_start
          summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
          summary['learning_rate'] = float(fetched[-1]['learning_rate'])
          summary['images_per_sec'] = len(window) * config.batch_size / max(elapsed, 1e-9)
          train_seconds += elapsed
          train_images += len(window) * config.batch_size
          log.write(step, summary)
          if progress is not None:
            progress.set_postfix(loss=f"{summary['train_loss']:.3f}",
                                 acc=f"{summary['train_accuracy']:.3f}")
          if not chance_checked and step >= min(300, num_steps // 2):
            chance_checked = True
            warn_if_at_chance(summary['train_loss'], data.num_classes, step)
          window, unlogged = [], []
          window_start = time.time()

        if step % eval_every == 0 or step == num_steps:
          eval_metrics = evaluate(eval_fn, state['params'], eval_inputs(), data_sharding)
          log.write(step, {k: v for k, v in eval_metrics.items() if k != 'num_test_examples'})
          if progress is not None:
            progress.write(f"step {step}: test accuracy {eval_metrics['test_accuracy']:.4f}")
          window_start = time.time()

        if step % checkpoint_every == 0 or step == num_steps:
          checkpoints.save(step, args=ocp.args.StandardSave(state),
                           custom_metadata=unlogged_metadata(unlogged + window))

        if preempted.is_set() or checkpoints.reached_preemption(step):  # all processes agree
          if checkpoints.latest_step() != step:
            checkpoints.save(step, args=ocp.args.StandardSave(state), force=True,
                             custom_metadata=unlogged_metadata(unlogged + window))
          checkpoints.wait_until_finished()
          raise Preempted(f'SIGTERM: saved the checkpoint of step {step} in {workdir}; '
                          'run the same command again to resume')
  finally:
    if progress is not None:
      progress.close()
    checkpoints.wait_until_finished()
    log.close()

  if eval_metrics is None:  # resumed a finished run
    eval_metrics = evaluate(eval_fn, state['params'], eval_inputs(), data_sharding)
  results = {
      'experiment': config.get('experiment', ''), 'dataset': config.dataset,
      'model': config.model, 'step': int(step), 'epochs': step / steps_per_epoch,
      **eval_metrics,
      'train_images_per_sec': train_images / train_seconds if train_seconds else None,
      'wall_seconds': time.time() - start_time, 'num_params': num_params,
      'devices': jax.device_count(), 'processes': jax.process_count(),
      'input_pipeline': pipeline,
  }
  if is_writer:
    write_json_atomic(os.path.join(workdir, 'results.json'), results)
  logging.info('Test accuracy %.4f (error %.2f%%) on %d images after %d steps',
               eval_metrics['test_accuracy'], 100 * eval_metrics['test_error'],
               eval_metrics['num_test_examples'], step)
  if is_writer:
    print(f"test accuracy {eval_metrics['test_accuracy']:.4f} "
          f"(error {100 * eval_metrics['test_error']:.2f}%) on "
          f"{eval_metrics['num_test_examples']} test images, step {step}", flush=True)
  return state


class DeadNetGuard:
  """Stops a run whose net is dead: every gradient exactly zero, step after step.

  NIN's known failure (nin-reference.md, "stuck at chance"): when every class map is at or
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
