r"""How fast a net trains and infers here: images per second of training's own jitted steps.

  python -m nin_jax.benchmark train --model nin_cifar --batch_size 128 --steps 10
  python -m nin_jax.benchmark eval --model nin_cifar --batch_size 128 --steps 10
  python -m nin_jax.benchmark train --model nin_cifar --batch_size 1024 --dtype bfloat16
  python -m nin_jax.benchmark input --config experiments/cifar10_aug.py --mock

`train` times training's update step, `eval` its evaluation step: `train.train_step` and
`train.eval_step`, bound to the optimizer of the default config (`nin_jax.default_config`: SGD
with momentum, weight decay on weights, the authors' per-layer rates, the guard that keeps the
last good parameters on a non-finite step; dropout on) and jitted over training's mesh by the
same code as training (`train.step_functions`, `parallel.jit_steps`), so its figures are
training's. Both run after compiling and one warm-up step, on random images that already live
on the devices, so the number is the model's alone. `train --input=host|device` feeds every step
its own batch through one of training's input paths instead (the host pipeline, or the dataset
held on the devices; nin_jax.device_input). The batch is the global batch, split over all
devices (a 1-D 'data' mesh). `input` times the input pipeline alone
(`input_benchmark`).

The last line printed is one JSON object: images_per_sec and step_ms (of the median step; also
step_ms_mean), compile_seconds, gflops_per_sec (model FLOPs: 2 × multiply-accumulates × 3 for a
training step, × 1 for a forward pass; pools, ReLUs and the optimizer not counted), peak_rss_mb,
backend, device_count, mode, model, batch_size, dtype, conv_impl (resolved), image_shape, input,
steps, and malloc_tuned (see `runtime.keep_freed_memory`). Nothing here imports TensorFlow, and
`train`/`eval` need no ml_collections: the accelerator machines have neither. The defaults are the
package's, so it runs from any folder. docs/benchmarks.md has the figures and benchmarks/ the
comparison with PyTorch.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import numpy as np
try:  # only `input` reads a config file; the accelerator machines may lack ml_collections
  from ml_collections import config_flags
except ImportError:
  config_flags = None

from nin_jax import architectures
from nin_jax import convs
from nin_jax import default_config
from nin_jax import models
from nin_jax import parallel
from nin_jax import runtime
from nin_jax import settings
from nin_jax import train
from nin_jax.errors import UserError

MODES = ('train', 'eval', 'input')
INPUTS = ('none', 'host', 'device')
# Inputs the zoo's nets were made for: (image_size, image_channels).
DEFAULT_INPUTS = {
    'nin_cifar': (32, 3), 'nin_cifar_caffe': (32, 3), 'nin_svhn': (32, 3),
    'nin_mnist': (28, 1), 'nin_small': (28, 1), 'nin_imagenet': (224, 3),
}
# What the benchmark changes in the default config besides the net, batch and dtype: the input
# paths time the CIFAR-10 augmentation recipe, and the schedule spans a benchmark-sized run (it
# sets the rates, not the speed).
BENCHMARK_FIELDS = dict(preprocess='standardize', augment='translate_flip', translate_pixels=4,
                        num_train_steps=100)


def default_input(model_name: str) -> tuple[int, int]:
  """(image_size, image_channels) the named net is made for: 32×32×3 for CIFAR/SVHN (and nets
  not listed), 28×28×1 for MNIST and the small character net, 224×224×3 for ImageNet."""
  if model_name not in architectures.MODELS:
    raise UserError(f'--model={model_name!r}: expected one of '
                    f'{", ".join(n for n in architectures.MODELS if not n.startswith("_"))}')
  return DEFAULT_INPUTS.get(model_name, (32, 3))


def benchmark_config(model_name: str, *, batch_size: int, dtype: str, num_classes: int,
                     image_size: int, image_channels: int, conv_impl: str, seed: int,
                     **fields: Any):
  """The config the benchmark's steps are built from: the default config with
  `BENCHMARK_FIELDS`, then `fields` (any other field, e.g. weight_decay), then the named net,
  batch (for evaluation too), dtype and input shape."""
  config = default_config.get_config()
  values = {**BENCHMARK_FIELDS, **fields, 'model': model_name, 'batch_size': batch_size,
              'eval_batch_size': batch_size, 'dtype': dtype, 'num_classes': num_classes,
              'image_size': image_size, 'image_channels': image_channels,
              'conv_impl': conv_impl, 'seed': seed}
  for key, value in values.items():
    if key not in config:
      raise UserError(f'the config has no field {key!r}; the fields are in '
                      'nin_jax/default_config.py')
    setattr(config, key, value)
  return config


def peak_rss_mb() -> float:
  """The process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2**20 if sys.platform == 'darwin' else 2**10)


def step_flops(model: models.NIN, image_size: int, image_channels: int,
               train: bool) -> int:  # pylint: disable=redefined-outer-name
  """Model FLOPs of one image: 2 per multiply-accumulate; a training step counts the forward
  and the two halves of the backward pass (gradients of activations and of weights) alike."""
  return 2 * models.multiply_accumulates(model, image_size, image_channels) * (3 if train else 1)


def _timed_runs(run: Callable[[], Any], steps: int) -> list[float]:
  """Seconds of each of `steps` calls of `run`, each waited for (so one slow step shows)."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return times


@dataclasses.dataclass
class Benchmark:
  """A compiled step on device-resident data: `run()` does one step and returns what to wait
  for (a training step: its loss). `info` holds the fixed fields of the JSON line; `flops` one
  step's model FLOPs."""
  run: Callable[[], Any]
  info: dict[str, Any]
  flops: int

  def timed(self, steps: int) -> list[float]:
    return _timed_runs(self.run, steps)


def random_data(config, image_shape: tuple[int, int, int], num_images: int):
  """An `input_pipeline.Data` of `num_images` random uint8 training images (and one batch of
  test images) with the config's preprocessing and augmentation, for timing the input paths."""
  # pylint: disable-next=g-import-not-at-top  # it imports TensorFlow only when loading TFDS
  from nin_jax import input_pipeline
  rng = np.random.default_rng(config.seed)
  images = lambda n: rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
  labels = lambda n: rng.integers(0, config.num_classes, n)
  return input_pipeline.data_from_arrays(
      config, train_images=images(num_images), train_labels=labels(num_images),
      test_images=images(config.batch_size), test_labels=labels(config.batch_size),
      class_names=[str(c) for c in range(config.num_classes)])


def build_benchmark(mode: str, model_name: str, *, batch_size: int, dtype: str = 'float32',
                    num_classes: int = 10, image_size: int | None = None,
                    image_channels: int | None = None, conv_impl: str = 'auto', seed: int = 0,
                    input: str = 'none',  # pylint: disable=redefined-builtin
                    num_images: int = 10_000, config_overrides: dict[str, Any] | None = None,
                    **model_overrides: Any) -> Benchmark:
  """Compiles training's update step ('train') or evaluation step ('eval') for the named net.

  The steps are built from `benchmark_config` (`config_overrides`: any other config field, e.g.
  weight_decay or lr_multipliers); `model_overrides` go to `models.get_model` (tests use them
  for tiny nets). With input='none' one batch of `batch_size` random uint8 images (with its
  augmentation draws) is split over all devices and reused every step: the step's speed alone,
  its preprocessing and augmentation included, as in training. A training step can also take
  each step's batch from an input path of training, over `num_images` random uint8 images
  (`random_data`): 'host' (numpy batches transferred by `parallel.prefetch_to_mesh`) or
  'device' (the dataset on the devices, gathered inside the step by `nin_jax.device_input`).
  """
  if input not in INPUTS:
    raise UserError(f'--input={input!r}: expected one of {INPUTS}')
  if input != 'none' and mode != 'train':
    raise UserError(f'--input={input}: input paths are timed with train steps only')
  if mode not in ('train', 'eval'):
    raise UserError(f'mode {mode!r}: expected train or eval')
  if dtype not in settings.DTYPES:
    raise UserError(f'--dtype={dtype!r}: expected one of {settings.DTYPES}')
  if conv_impl not in settings.CONV_IMPLS:
    raise UserError(f'--conv_impl={conv_impl!r}: expected one of {settings.CONV_IMPLS}')
  default_size, default_channels = default_input(model_name)
  image_shape = (image_size or default_size, image_size or default_size,
                 image_channels or default_channels)
  mesh = parallel.create_mesh()
  if batch_size < 1 or batch_size % mesh.size:
    raise UserError(f'--batch_size={batch_size}: must be a positive multiple of the '
                    f'{mesh.size} devices')
  impl = convs.resolve_conv_impl(conv_impl)
  config = benchmark_config(model_name, batch_size=batch_size, dtype=dtype,
                            num_classes=num_classes, image_size=image_shape[0],
                            image_channels=image_shape[2], conv_impl=conv_impl, seed=seed,
                            **(config_overrides or {}))
  model = models.model_from_config(config, **model_overrides)
  steps_per_epoch = max(1, num_images // batch_size)  # for the 'plateau' schedule only
  functions = train.step_functions(config, model, image_shape, steps_per_epoch,
                                   train.total_steps(config, steps_per_epoch))
  data = random_data(config, image_shape, num_images if input != 'none' else batch_size)
  steps = parallel.jit_steps(mesh, *functions, data, on_devices=input == 'device')
  _, batch_sharded = parallel.shardings(mesh)

  state = steps.init(jax.random.key(seed), None)
  fixed = next(data.eval_batches()) if mode == 'eval' else data.train_batch(0)
  batch = {k: jax.make_array_from_process_local_data(batch_sharded, v) for k, v in fixed.items()}
  next_inputs = lambda: batch
  if input == 'host':
    batches = parallel.prefetch_to_mesh(data.train_batches(preprocessed=True), batch_sharded)
    next_inputs = lambda: next(batches)
  elif input == 'device':  # the host sends only each batch's draws
    draws = parallel.prefetch_to_mesh(map(data.train_draws, itertools.count()), batch_sharded)
    next_inputs = lambda: next(draws)

  start = time.perf_counter()
  if mode == 'train':
    # The train state is updated in place (donated), as in training.
    compiled = steps.update.lower(state, next_inputs(), *steps.extra).compile()
    holder = {'state': state}

    def run():
      holder['state'], metrics = compiled(holder['state'], next_inputs(), *steps.extra)
      return metrics['train_loss']
  else:
    compiled = steps.evaluate.lower(state['params'], batch, *steps.extra).compile()
    run = functools.partial(compiled, state['params'], batch, *steps.extra)
  compile_seconds = time.perf_counter() - start

  info = {
      'mode': mode, 'model': model_name, 'batch_size': batch_size, 'dtype': dtype,
      'conv_impl': impl, 'image_shape': list(image_shape), 'input': input,
      'compile_seconds': significant(compile_seconds),
      'backend': jax.default_backend(), 'device_count': jax.device_count(),
  }
  flops = step_flops(model, image_shape[0], image_shape[2], mode == 'train') * batch_size
  return Benchmark(run, info, flops)


def train_losses(model_name: str, *, batch_size: int, steps: int, **kwargs: Any) -> list[float]:
  """The loss of each of `steps` benchmark training steps in turn (`kwargs`: those of
  `build_benchmark`): what a change to the config does to the timed step."""
  bench = build_benchmark('train', model_name, batch_size=batch_size, **kwargs)
  return [float(bench.run()) for _ in range(steps)]


def significant(x: float, digits: int = 4) -> float:
  """`x` to `digits` significant figures. The figures are rounded this way, not to fixed
  decimals: a 0.33 ms step of a tiny net rounded to 2 decimals is 1% off the images/s beside it."""
  return float(f'{x:.{digits}g}')


def summarize(bench: Benchmark, times: list[float]) -> dict[str, Any]:
  """The JSON line: `bench.info` plus the speed of the timed steps (median step)."""
  step_seconds = statistics.median(times)
  batch_size = bench.info['batch_size']
  return {
      **bench.info,
      'steps': len(times),
      'images_per_sec': significant(batch_size / step_seconds),
      'step_ms': significant(step_seconds * 1e3),
      'step_ms_mean': significant(statistics.fmean(times) * 1e3),
      'gflops_per_sec': significant(bench.flops / step_seconds / 1e9),
      'peak_rss_mb': round(peak_rss_mb(), 1),
  }


def run_benchmark(mode: str, model_name: str, *, batch_size: int, steps: int,
                  warmup_steps: int = 1, **kwargs: Any) -> dict[str, Any]:
  """Compiles, warms up, then times `steps` steps: the dict the CLI prints (module docstring).
  `kwargs` are those of `build_benchmark`."""
  if steps < 1 or warmup_steps < 0:
    raise UserError(f'--steps={steps}: time at least one step')
  bench = build_benchmark(mode, model_name, batch_size=batch_size, **kwargs)
  bench.timed(warmup_steps)
  return summarize(bench, bench.timed(steps))


# --- Command line ---------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so that importing this module
  beside another CLI (nin_jax.main also has --config) defines nothing twice."""
  flags.DEFINE_string('model', 'nin_cifar', 'A net of nin_jax.architectures.MODELS.')
  flags.DEFINE_integer('batch_size', 128, 'Global batch, split over all devices.')
  flags.DEFINE_integer('steps', 10, 'Timed steps, after compiling and one warm-up step.')
  flags.DEFINE_enum('dtype', 'float32', list(settings.DTYPES),
                    'Activations and matmuls; params stay f32.')
  flags.DEFINE_integer('num_classes', 10, 'Classes (maps of the last cccp).')
  flags.DEFINE_integer('image_size', None, 'Default: what the model is made for.')
  flags.DEFINE_integer('image_channels', None, 'Default: what the model is made for.')
  flags.DEFINE_string('conv_impl', 'auto', 'auto, xla, im2col, hybrid or fft: see nin_jax.convs.')
  flags.DEFINE_enum('input', 'none', list(INPUTS), 'train: where each step\'s batch comes from: '
                    'none (one random batch already on the devices), host or device (the input '
                    'paths of training, over --num_images random images).')
  flags.DEFINE_integer('num_images', 10_000, 'train with --input=host|device: dataset size.')
  if config_flags is not None:
    config_flags.DEFINE_config_file(
        'config', None, 'input: an experiment config file, e.g. experiments/cifar10_aug.py '
        '(fields overridable: --config.x=y).', lock_config=True)
  else:
    flags.DEFINE_string('config', None, 'input: needs ml_collections (pip install ml-collections).')
  flags.DEFINE_bool('mock', False, 'input: TFDS mock data instead of the real dataset.')
  flags.DEFINE_integer('num_batches', 200, 'input: batches timed (after 3 untimed ones).')
  flags.DEFINE_bool('keep_freed_memory', True, 'CPU: let malloc reuse freed memory (see '
                    'runtime.keep_freed_memory); --nokeep_freed_memory measures without it.')


def input_benchmark(config, *, mock: bool, num_batches: int = 200,
                    mock_examples: int = 10_000) -> dict[str, Any]:
  """Times the training batches alone (no model), on this host, one process: each batch as the
  host path gives it (a gather with its draws; preprocessed at load where the split fits), sent
  to the devices and made into the network's batch by training's own jitted function
  (`device_input.train_batch`: the rest of the preprocessing, and the augmentation), waited
  for. A streamed dataset's batches are timed as they reach the trainer (`_stream_benchmark`).

  Args:
    config: the experiment's config.
    mock: TFDS datasets only: random images from `tfds.testing.mock_data` instead of the
      prepared dataset (the gcn_zca statistics of the mock data are cached in a temp folder).
    num_batches: batches timed, after 3 untimed ones.
    mock_examples: size of each mock split.

  Returns:
    {'images_per_sec', 'seconds_per_batch', 'load_seconds', 'batch_size', 'num_batches',
     'num_train_examples', 'dataset', 'preprocess', 'augment', 'input_pipeline'} and, in memory,
    'preprocessed_at_load'; streamed, 'workers', 'cpu_cores_busy' (CPU seconds of the trainer
    and its workers per second), 'source' (FileSource, PackedSource or TfdsSource),
    'skipped_files', 'resize_size', 'image_size'.
  """
  if config is None:
    raise UserError('input: name the experiment with --config=experiments/NAME.py')
  # Imported here: the input pipeline needs TensorFlow, the model benchmarks must not.
  if config_flags is None:
    raise UserError('input: --config needs ml_collections: pip install ml-collections')
  import ml_collections  # pylint: disable=g-import-not-at-top
  from nin_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; the caller's is intact
  settings.validate(config)
  start = time.time()
  if mock and config.dataset in settings.TFDS_CLASSES:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    config.data_dir = os.path.join(tempfile.gettempdir(), 'nin_jax_benchmark_mock')
    os.makedirs(config.data_dir, exist_ok=True)
    with tfds.testing.mock_data(num_examples=mock_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE):
      data = input_pipeline.create_data(config, process_index=0, process_count=1)
  else:
    data = input_pipeline.create_data(config, process_index=0, process_count=1)
  load_seconds = time.time() - start
  facts = dict(load_seconds=load_seconds, batch_size=data.batch_size, num_batches=num_batches,
               num_train_examples=data.num_train_examples, dataset=config.dataset,
               preprocess=config.preprocess, augment=config.augment)
  if getattr(data, 'streamed', False):
    return _stream_benchmark(data, num_batches, facts)
  from nin_jax import device_input  # pylint: disable=g-import-not-at-top
  replicated, sharded = parallel.shardings(parallel.create_mesh())
  arrays = device_input.put_on_devices(data, replicated, dataset=False)
  make_batch = jax.jit(device_input.batch_makers(data)[0])
  batches = parallel.prefetch_to_mesh(data.train_batches(preprocessed=True), sharded)
  for _ in range(3):
    jax.block_until_ready(make_batch(next(batches), arrays))
  start = time.perf_counter()
  for _ in range(num_batches):
    jax.block_until_ready(make_batch(next(batches), arrays))
  seconds = time.perf_counter() - start
  batches.close()
  return dict(images_per_sec=num_batches * data.batch_size / seconds,
              seconds_per_batch=seconds / num_batches, input_pipeline='host',
              preprocessed_at_load=getattr(data, 'preprocesses_at_load', False), **facts)


def _stream_benchmark(data, num_batches: int, facts: dict[str, Any]) -> dict[str, Any]:
  """Times a stream's training batches as they reach the trainer: read, decoded, resized and
  cropped by its workers, uint8 in the trainer's memory. What remains (to the devices, the
  normalisation and the flips) is the train step's, on the accelerator, so it is not timed: on
  a CPU it would take the workers' cores."""
  batches = data.train_batches(0)
  try:
    for _ in range(3):  # the workers start, and fill their buffers
      next(batches)
    start = time.perf_counter()
    cpu = _cpu_seconds()
    for _ in range(num_batches):
      next(batches)
    seconds = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
  finally:
    batches.close()
  return dict(images_per_sec=num_batches * data.batch_size / seconds,
              seconds_per_batch=seconds / num_batches, input_pipeline='stream',
              workers=data.workers, cpu_cores_busy=cpu / seconds,
              source=type(data.train_source).__name__, skipped_files=len(data.skipped_files),
              resize_size=data.decoder.resize_size, image_size=data.decoder.image_size, **facts)


def _cpu_seconds() -> float:
  """CPU time (user + system) of this process and its children that have ended, and of its
  live worker processes (from /proc: Linux)."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  total = sum(os.times()[:4])
  for child in multiprocessing.active_children():
    try:
      with open(f'/proc/{child.pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError):
      pass
  return total


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f'usage: python -m nin_jax.benchmark {{{"|".join(MODES)}}} [--flags]')
  # Before the first computation; see runtime.keep_freed_memory. The input pipeline is
  # TensorFlow's.
  cpu_tuned = argv[1] != 'input' and FLAGS.keep_freed_memory and runtime.keep_freed_memory()
  try:
    if argv[1] == 'input':
      result = input_benchmark(FLAGS.config, mock=FLAGS.mock, num_batches=FLAGS.num_batches)
    else:
      result = run_benchmark(
          argv[1], FLAGS.model, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
          dtype=FLAGS.dtype, num_classes=FLAGS.num_classes, image_size=FLAGS.image_size,
          image_channels=FLAGS.image_channels, conv_impl=FLAGS.conv_impl, input=FLAGS.input,
          num_images=FLAGS.num_images)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if argv[1] != 'input':
    result['malloc_tuned'] = cpu_tuned
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
