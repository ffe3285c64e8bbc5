"""Training and evaluation of a NIN: one trainer that reads top to bottom.

`train_and_evaluate(config, workdir)` is the Flax examples' contract. Data parallelism is
`jax.jit` over a 1-D device mesh of every device of every process (`nin_jax.parallel`):
parameters replicated, the global batch sharded on the 'data' axis. Beside it: the run folder's
files (`run_files`), its metrics log (`metrics_log`), what stops a run early (`guards`).

Nothing here imports TensorFlow at module level: the train step runs on a bare JAX install (the
input pipeline, which uses TFDS, is imported when a run starts).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from nin_jax import device_input
from nin_jax import guards
from nin_jax import metrics_log
from nin_jax import models
from nin_jax import parallel
from nin_jax import run_files
from nin_jax import runtime
from nin_jax import settings
from nin_jax.errors import UserError

if TYPE_CHECKING:  # configs are ml_collections.ConfigDicts; the accelerator hosts lack it
  import ml_collections

# {'step': int32 scalar, 'params': ..., 'opt_state': ..., 'nonfinite_step': int32}
State = dict[str, Any]


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
  multiplier), through momentum; with config.clip_gradients > 0 the gradient is first scaled
  down to that global L2 norm where it is larger (Caffe's `clip_gradients`). With 'plateau',
  optax's reduce_on_plateau scales the update by 0.1 when the training error, averaged over an
  epoch, stops improving (`update(..., value=error)`).
  """
  parts = [optax.clip_by_global_norm(config.clip_gradients)] if config.clip_gradients > 0 else []
  parts.append(
      optax.add_decayed_weights(config.weight_decay, mask=models.weight_decay_mask(params)))
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
  return data.preprocessor(data.train_images(rows))


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


def step_functions(config: ml_collections.ConfigDict, model: models.NIN,
                   image_shape: tuple[int, int, int], steps_per_epoch: int, num_steps: int
                   ) -> tuple[Callable[..., State], Callable[..., Any], Callable[..., Any]]:
  """The run's `create_train_state`, `train_step` and `eval_step`, bound to its model,
  optimizer and schedule; unjitted (`parallel.jit_steps` jits them, here and in the benchmark)."""
  learning_rate_fn = create_learning_rate_fn(config, num_steps)
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
  )['params']
  tx = create_optimizer(config, abstract_params, learning_rate_fn, steps_per_epoch, num_steps)
  init_fn = functools.partial(create_train_state, model=model, tx=tx, image_shape=image_shape)
  step_fn = functools.partial(train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                              seed=config.seed)
  return init_fn, step_fn, functools.partial(eval_step, model=model)


# --- Data --------------------------------------------------------------------------------------

def prepare_data(config: ml_collections.ConfigDict):
  """The run's data; generates the student's characters first when the quickstart asks for them."""
  from nin_jax import input_pipeline  # TFDS and TensorFlow: imported only to run
  if (config.dataset == 'folder' and config.get('generate_chars', False)
      and config.data_dir and not run_files.path(config.data_dir).exists()):
    from nin_jax import make_chars
    logging.info('Writing the generated characters (%d per class) to %s', config.chars_per_class,
                 config.data_dir)
    make_chars.make_chars(config.data_dir, config.chars_per_class, seed=config.seed,
                          image_size=config.image_size)
  return input_pipeline.create_data(config)


# --- The trainer ---------------------------------------------------------------------------------

def evaluate(eval_fn: Callable, params, batches: Iterator[dict[str, np.ndarray]],
             sharding) -> dict[str, float]:
  """Test metrics over one pass of `batches` (host batches, or the device path's draws)."""
  sums = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  # Closed here, not left to the garbage collector: a prefetch thread still inside XLA or
  # TensorFlow when the interpreter exits aborts the process (exit -6 instead of the error's 2).
  with contextlib.closing(parallel.prefetch_to_mesh(batches, sharding)) as prefetched:
    for batch in prefetched:
      out = jax.device_get(eval_fn(params, batch))
      for k in sums:
        sums[k] += float(out[k])
  n = max(sums['count'], 1.0)
  accuracy = sums['correct'] / n
  return {'test_loss': sums['loss_sum'] / n, 'test_accuracy': accuracy,
          'test_error': 1.0 - accuracy, 'num_test_examples': int(sums['count'])}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> State:
  """Trains (or resumes training) in `workdir` and evaluates; returns the final train state.

  Writes the files of `nin_jax.run_files` in WORKDIR: checkpoints (Orbax), metrics.jsonl,
  TensorBoard events, config.json, class_names.json, preprocessing.npz and, at the end,
  results.json.
  """
  start_time = time.time()
  # --- Check the run: once each, before anything loads ---
  settings.check_once(config)  # nin_jax.main has checked its config already: nothing repeated
  parallel.check_batch_size(config.batch_size)
  device_input.check_fits_before_load(config, device_input.device_memory_bytes())
  runtime.hide_accelerators_from_tensorflow(config, workdir)
  config = config.copy_and_resolve_references()  # the caller's config stays as it was
  config.eval_batch_size = parallel.eval_batch_size(config.eval_batch_size)
  is_writer = jax.process_index() == 0
  run_files.path(workdir).mkdir(parents=True, exist_ok=True)

  # --- Input pipeline ---
  data = prepare_data(config)
  steps_per_epoch = data.steps_per_epoch
  num_steps = total_steps(config, steps_per_epoch)
  log_every = every_steps(config.log_every_steps, steps_per_epoch)
  eval_every = every_steps(config.eval_every_steps, steps_per_epoch)
  checkpoint_every = every_steps(config.checkpoint_every_steps, steps_per_epoch)

  # --- Model and optimizer ---
  model = models.model_from_config(config)
  functions = step_functions(config, model, data.image_shape, steps_per_epoch, num_steps)

  # --- Set up mesh ---
  mesh = parallel.create_mesh()
  replicated, data_sharding = parallel.shardings(mesh)
  # The host sends uint8 batches and their augmentation draws, or (device path) the draws
  # alone; the step makes the network's batch of them (nin_jax.device_input).
  pipeline = device_input.choose_pipeline(config.input_pipeline, data)
  if pipeline == 'stream' and runtime.stop_keeping_freed_memory():
    logging.info('Streaming: malloc gives freed memory back again (--keep_freed_memory is for '
                 'runs whose data is in memory)')
  steps = parallel.jit_steps(mesh, *functions, data, on_devices=pipeline == 'device')
  init_fn, update_fn, eval_fn = steps.init, steps.train, steps.eval
  if pipeline == 'device':
    train_inputs = lambda start: map(data.train_draws, itertools.count(start))
    eval_inputs = data.eval_draws
  else:
    # A split that fits is preprocessed once, at its first batch (`Data.preprocesses_at_load`).
    train_inputs = functools.partial(data.train_batches, preprocessed=True)
    eval_inputs = functools.partial(data.eval_batches, preprocessed=True)
  logging.info('Input pipeline: %s', pipeline)

  # --- Load checkpoint ---
  checkpoints = ocp.CheckpointManager(
      run_files.absolute(os.path.join(workdir, run_files.CHECKPOINTS)),
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
    run_files.write_json_atomic(os.path.join(workdir, run_files.CONFIG),
                                json.loads(config.to_json_best_effort()))
    run_files.write_json_atomic(os.path.join(workdir, run_files.CLASS_NAMES),
                                list(data.class_names))
    data.preprocessor.save(os.path.join(workdir, run_files.PREPROCESSING))

  num_params = models.count_params(state['params'])
  logging.info('%s: %d parameters, %d classes, %d train / %d test images, %d steps '
               '(%d per epoch), global batch %d over %d devices in %d processes', config.model,
               num_params, data.num_classes, data.num_train_examples, data.num_test_examples,
               num_steps, steps_per_epoch, config.batch_size, jax.device_count(),
               jax.process_count())

  # --- Train loop ---
  log = metrics_log.MetricsLog(workdir, start_step)
  progress = None
  if is_writer and config.progress_bar:
    from tqdm import tqdm
    progress = tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                    desc='train')
  chance_checked = False
  dead_guard = guards.DeadNetGuard(data.num_classes)
  window: list[dict[str, jax.Array]] = []
  # The steps before start_step that its checkpoint kept, not yet in a train record.
  unlogged = metrics_log.restore_unlogged(checkpoints, start_step) if start_step else []
  window_start = time.time()
  train_seconds, train_images = 0.0, 0
  eval_metrics = None
  step = start_step
  try:
    # Closed on the way out (see evaluate): a run stopped by a guard must exit with its code.
    with guards.sigterm_flag() as preempted, contextlib.closing(
        parallel.prefetch_to_mesh(train_inputs(start_step), data_sharding)) as batches:
      for step in range(start_step + 1, num_steps + 1):
        state, metrics = update_fn(state, next(batches))
        window.append(metrics)
        dead_guard.update(step, metrics)
        if progress is not None:
          progress.update(1)

        if step % log_every == 0 or step == num_steps:
          guards.check_finite(state, checkpoints, config.learning_rate)
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
            guards.warn_if_at_chance(summary['train_loss'], data.num_classes, step)
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
                           custom_metadata=metrics_log.unlogged_metadata(unlogged + window))

        if preempted.is_set() or checkpoints.reached_preemption(step):  # all processes agree
          if checkpoints.latest_step() != step:
            checkpoints.save(step, args=ocp.args.StandardSave(state), force=True,
                             custom_metadata=metrics_log.unlogged_metadata(unlogged + window))
          checkpoints.wait_until_finished()
          raise guards.Preempted(f'SIGTERM: saved the checkpoint of step {step} in {workdir}; '
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
      # Files left out as unreadable: at load (skip_bad_files), or met by the stream so far.
      'skipped_files': len(data.skipped_files),
      'skipped_file_errors': data.skipped_files[:100],
  }
  if data.skipped_files:
    logging.warning('%d unreadable file(s) skipped (results.json lists them)',
                    len(data.skipped_files))
  if is_writer:
    run_files.write_json_atomic(os.path.join(workdir, run_files.RESULTS), results)
  logging.info('Test accuracy %.4f (error %.2f%%) on %d images after %d steps',
               eval_metrics['test_accuracy'], 100 * eval_metrics['test_error'],
               eval_metrics['num_test_examples'], step)
  if is_writer:
    print(f"test accuracy {eval_metrics['test_accuracy']:.4f} "
          f"(error {100 * eval_metrics['test_error']:.2f}%) on "
          f"{eval_metrics['num_test_examples']} test images, step {step}", flush=True)
  return state
