r"""How fast a net trains and infers here: images per second of the jitted steps on random data.

  python -m nin_jax.benchmark train --model nin_cifar --batch_size 128 --steps 10
  python -m nin_jax.benchmark eval --model nin_cifar --batch_size 128 --steps 10
  python -m nin_jax.benchmark train --model nin_cifar --batch_size 1024 --dtype bfloat16
  python -m nin_jax.benchmark input --config experiments/cifar10_aug.py --mock

`train` times the whole update (forward, backward, SGD with momentum 0.9, softmax cross-entropy,
dropout on), `eval` the forward pass of inference (dropout off); both after compiling and one
warm-up step, on random images that already live on the devices, so the number is the model's
alone. `train --input=host|device` feeds every step its own batch through one of training's
input paths instead (the host pipeline, or the dataset held on the devices;
nin_jax.device_input). The batch is the global batch, split over all local devices (a 1-D
'data' mesh, as in training). `input` times the input pipeline alone
(`nin_jax.input_pipeline.benchmark`).

The last line printed is one JSON object: images_per_sec and step_ms (of the median step; also
step_ms_mean), compile_seconds, gflops_per_sec (model FLOPs: 2 × multiply-accumulates × 3 for a
training step, × 1 for a forward pass; pools, ReLUs and the optimizer not counted), peak_rss_mb,
backend, device_count, mode, model, batch_size, dtype, conv_impl (resolved), image_shape, input,
steps, and malloc_tuned (see `keep_freed_memory`). Nothing here imports TensorFlow: the accelerator
machines have none. docs/benchmarks.md has the figures and benchmarks/ the comparison with PyTorch.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax
try:  # only `input` reads a config; the accelerator machines may lack ml_collections
  from ml_collections import config_flags
except ImportError:
  config_flags = None

from nin_jax import models
from nin_jax.errors import UserError

MODES = ('train', 'eval', 'input')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Inputs the zoo's nets were made for: (image_size, image_channels).
DEFAULT_INPUTS = {
    'nin_cifar': (32, 3), 'nin_cifar_caffe': (32, 3), 'nin_svhn': (32, 3),
    'nin_mnist': (28, 1), 'nin_small': (28, 1), 'nin_imagenet': (224, 3),
}


def default_input(model_name: str) -> tuple[int, int]:
  """(image_size, image_channels) the named net is made for: 32×32×3 for CIFAR/SVHN (and nets
  not listed), 28×28×1 for MNIST and the small character net, 224×224×3 for ImageNet."""
  if model_name not in models.MODELS:
    raise UserError(f'--model={model_name!r}: expected one of {sorted(models.MODELS)}')
  return DEFAULT_INPUTS.get(model_name, (32, 3))


# Packages that give JAX an accelerator; with none of them installed the backend is the CPU.
_ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                        'jax_rocm7_plugin', 'libtpu')


def keep_freed_memory() -> bool:
  """On a CPU-only Linux host, makes glibc's malloc keep and reuse the memory XLA frees.

  Why: XLA's CPU runtime allocates each step's temporaries as one block (about 1.2 GB for
  nin_cifar at batch 128), which glibc serves with a fresh mmap and gives back with munmap, so
  every step pays again for page faults and for zeroing the pages (a fifth of the CPU time in
  `perf` here; docs/benchmarks.md). With one malloc arena, no mmap and no trimming the memory is
  reused instead. The cost: the process keeps its peak memory, and fragmentation lets the heap
  grow for the first few steps (nin_cifar at batch 128: 1.7 GB, then 6.5 GB after ~8 steps).
  Must run before JAX's first computation (XLA's threads pick their arena on first use); call
  it from entry points only, never on import. Returns whether the setting was applied.
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
  m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8
  return all(mallopt(option, value) == 1 for option, value in (
      (m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1), (m_top_pad, 0)))


def peak_rss_mb() -> float:
  """The process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (2**20 if sys.platform == 'darwin' else 2**10)


def step_flops(model: models.NIN, image_size: int, image_channels: int, train: bool) -> int:
  """Model FLOPs of one image: 2 per multiply-accumulate; a training step counts the forward
  and the two halves of the backward pass (gradients of activations and of weights) alike."""
  return 2 * models.multiply_accumulates(model, image_size, image_channels) * (3 if train else 1)


def data_mesh() -> jax.sharding.Mesh:
  """All devices in one 'data' axis: the batch is split over them, parameters replicated.

  Auto axes (XLA propagates the shardings): with explicit ones every gradient contraction over
  the sharded batch would need its output sharding spelled out in the model.
  """
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def make_train_step(model: models.NIN, learning_rate: float = 0.01, momentum: float = 0.9
                    ) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
  """The optimizer and an (unjitted) training step of the benchmark.

  `train_step(params, opt_state, images, labels, rng) -> (params, opt_state, loss)`: images
  (N, H, W, C) float32, labels (N,) int32, rng a key for dropout; loss a float32 scalar.
  """
  tx = optax.sgd(learning_rate, momentum=momentum)

  def train_step(params, opt_state, images, labels, rng):
    def loss_fn(params):
      logits = model.apply({'params': params}, images, train=True, rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, train_step


def make_eval_step(model: models.NIN) -> Callable[..., jax.Array]:
  """`eval_step(params, images) -> logits (N, num_classes) float32`, dropout off."""
  return lambda params, images: model.apply({'params': params}, images, train=False)


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
  """A compiled step on device-resident random data: `run()` does one step (returns an array
  to wait for). `info` holds the fixed fields of the JSON line; `flops` one step's model FLOPs."""
  run: Callable[[], jax.Array]
  info: dict[str, Any]
  flops: int

  def timed(self, steps: int) -> list[float]:
    return _timed_runs(self.run, steps)


INPUTS = ('none', 'host', 'device')


def random_data(batch_size: int, image_shape: tuple[int, int, int], num_classes: int,
                num_images: int, seed: int):
  """An `input_pipeline.Data` of random uint8 images with the CIFAR-10 augmentation recipe
  (standardize, translate_flip by up to 4 pixels), for timing the input paths."""
  import types  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nin_jax import input_pipeline  # pylint: disable=g-import-not-at-top  # numpy only
  rng = np.random.default_rng(seed)
  config = types.SimpleNamespace(  # the fields data_from_arrays reads
      preprocess='standardize', augment='translate_flip', translate_pixels=4,
      batch_size=batch_size, eval_batch_size=batch_size, seed=seed)
  images = lambda n: rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
  labels = lambda n: rng.integers(0, num_classes, n)
  return input_pipeline.data_from_arrays(
      config, train_images=images(num_images), train_labels=labels(num_images),
      test_images=images(batch_size), test_labels=labels(batch_size),
      class_names=[str(c) for c in range(num_classes)])


def build_benchmark(mode: str, model_name: str, *, batch_size: int, dtype: str = 'float32',
                    num_classes: int = 10, image_size: int | None = None,
                    image_channels: int | None = None, conv_impl: str = 'auto', seed: int = 0,
                    input: str = 'none',  # pylint: disable=redefined-builtin
                    num_images: int = 10_000,
                    **model_overrides: Any) -> Benchmark:
  """Compiles one training step ('train') or forward pass ('eval') of the named net.

  `model_overrides` go to `models.get_model` (tests use them for tiny nets). With input='none'
  the images are normal noise, float32 NHWC, `batch_size` of them split over all devices and
  reused every step: the model's speed alone. A training step can also take each step's batch
  from an input path of training, over `num_images` random uint8 images (`random_data`):
  'host' (numpy batches transferred by `train.prefetch_to_mesh`) or 'device' (the dataset on
  the devices, gathered and augmented inside the step by `nin_jax.device_input`).
  """
  if input not in INPUTS:
    raise UserError(f'--input={input!r}: expected one of {INPUTS}')
  if input != 'none' and mode != 'train':
    raise UserError(f'--input={input}: input paths are timed with train steps only')
  if mode not in ('train', 'eval'):
    raise UserError(f'mode {mode!r}: expected train or eval')
  if dtype not in DTYPES:
    raise UserError(f'--dtype={dtype!r}: expected one of {sorted(DTYPES)}')
  default_size, default_channels = default_input(model_name)
  image_size = image_size or default_size
  image_channels = image_channels or default_channels
  mesh = data_mesh()
  if batch_size < 1 or batch_size % mesh.size:
    raise UserError(f'--batch_size={batch_size}: must be a positive multiple of the '
                    f'{mesh.size} devices')
  impl = models.resolve_conv_impl(conv_impl)
  model = models.get_model(model_name, num_classes, dtype=DTYPES[dtype], conv_impl=conv_impl,
                           **model_overrides)
  train = mode == 'train'

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  init_rng, data_rng, dropout_rng = jax.random.split(jax.random.key(seed), 3)
  images_shape = (batch_size, image_size, image_size, image_channels)
  images = jax.device_put(jax.random.normal(data_rng, images_shape, jnp.float32), batch_sharded)
  labels = jax.device_put(
      jax.random.randint(data_rng, (batch_size,), 0, num_classes, jnp.int32), batch_sharded)
  params = jax.jit(lambda rng: model.init(rng, images[:1], train=False)['params'],
                   out_shardings=replicated)(init_rng)

  if train:
    tx, train_step = make_train_step(model)
    opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
    step_fn, next_inputs = train_step, lambda: (images, labels)
    if input != 'none':
      step_fn, next_inputs = _input_path(input, train_step, mesh, batch_size, images.shape[1:],
                                         num_classes, num_images, seed)
    start = time.perf_counter()
    # Parameters and optimizer state are updated in place (donated), as in training.
    compiled = jax.jit(step_fn, donate_argnums=(0, 1)).lower(
        params, opt_state, *next_inputs(), dropout_rng).compile()
  else:
    start = time.perf_counter()
    compiled = jax.jit(make_eval_step(model)).lower(params, images).compile()
  compile_seconds = time.perf_counter() - start

  if train:
    state = {'params': params, 'opt_state': opt_state, 'rng': dropout_rng}

    def run():
      state['rng'], step_rng = jax.random.split(state['rng'])
      state['params'], state['opt_state'], loss = compiled(
          state['params'], state['opt_state'], *next_inputs(), step_rng)
      return loss
  else:
    run = functools.partial(compiled, params, images)

  info = {
      'mode': mode, 'model': model_name, 'batch_size': batch_size, 'dtype': dtype,
      'conv_impl': impl, 'image_shape': [image_size, image_size, image_channels],
      'input': input,
      'compile_seconds': round(compile_seconds, 2),
      'backend': jax.default_backend(), 'device_count': jax.device_count(),
  }
  flops = step_flops(model, image_size, image_channels, train) * batch_size
  return Benchmark(run, info, flops)


def _input_path(input, train_step, mesh, batch_size, image_shape, num_classes, num_images,
                seed):  # pylint: disable=redefined-builtin
  """(step, next_inputs) of the 'host' or 'device' input path (see build_benchmark): `step`
  takes (params, opt_state, *next_inputs(), rng), as `train_step` takes (..., images, labels,
  rng)."""
  import itertools  # pylint: disable=g-import-not-at-top
  from nin_jax import device_input  # pylint: disable=g-import-not-at-top
  from nin_jax import train  # pylint: disable=g-import-not-at-top  # no TensorFlow at import
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  data = random_data(batch_size, tuple(image_shape), num_classes, num_images, seed)
  if input == 'host':
    batches = train.prefetch_to_mesh(data.train_batches(), batch_sharded)
    return train_step, lambda: tuple(next(batches).values())  # (image, label)
  arrays = device_input.put_on_devices(data, replicated)
  make_batch, _ = device_input.batch_makers(data)

  def step(params, opt_state, draws, arrays, rng):
    batch = make_batch(arrays, draws)
    return train_step(params, opt_state, batch['image'], batch['label'], rng)

  draws = train.prefetch_to_mesh(map(data.train_draws, itertools.count()), batch_sharded)
  # The dataset is an argument, never a constant folded into the program.
  return step, lambda: (next(draws), arrays)


def summarize(bench: Benchmark, times: list[float]) -> dict[str, Any]:
  """The JSON line: `bench.info` plus the speed of the timed steps (median step)."""
  step_seconds = statistics.median(times)
  batch_size = bench.info['batch_size']
  return {
      **bench.info,
      'steps': len(times),
      'images_per_sec': round(batch_size / step_seconds, 2),
      'step_ms': round(step_seconds * 1e3, 2),
      'step_ms_mean': round(statistics.fmean(times) * 1e3, 2),
      'gflops_per_sec': round(bench.flops / step_seconds / 1e9, 2),
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
  flags.DEFINE_string('model', 'nin_cifar', 'A net of nin_jax.models.MODELS.')
  flags.DEFINE_integer('batch_size', 128, 'Global batch, split over all devices.')
  flags.DEFINE_integer('steps', 10, 'Timed steps, after compiling and one warm-up step.')
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Activations and matmuls; params stay f32.')
  flags.DEFINE_integer('num_classes', 10, 'Classes (maps of the last cccp).')
  flags.DEFINE_integer('image_size', None, 'Default: what the model is made for.')
  flags.DEFINE_integer('image_channels', None, 'Default: what the model is made for.')
  flags.DEFINE_string('conv_impl', 'auto', 'auto, xla, im2col, hybrid or fft: see nin_jax.models.')
  flags.DEFINE_enum('input', 'none', list(INPUTS), 'train: where each step\'s batch comes from: '
                    'none (one random batch already on the devices), host or device (the input '
                    'paths of training, over --num_images random images).')
  flags.DEFINE_integer('num_images', 10_000, 'train with --input=host|device: dataset size.')
  if config_flags is not None:
    config_flags.DEFINE_config_file('config', None, 'input: an experiment config file, e.g. '
                                    'experiments/cifar10_aug.py (fields overridable: --config.x=y).',
                                    lock_config=True)
  else:
    flags.DEFINE_string('config', None, 'input: needs ml_collections (pip install ml-collections).')
  flags.DEFINE_bool('mock', False, 'input: TFDS mock data instead of the real dataset.')
  flags.DEFINE_bool('keep_freed_memory', True, 'CPU: let malloc reuse freed memory (see '
                    'keep_freed_memory); --nokeep_freed_memory measures without it.')


def _input_benchmark(config, mock: bool) -> dict[str, Any]:
  # Imported here: the input pipeline needs TensorFlow, the model benchmarks must not.
  from nin_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  if config is None:
    raise UserError('input: name the experiment with --config=experiments/NAME.py')
  if config_flags is None:
    raise UserError('input: --config needs ml_collections: pip install ml-collections')
  return input_pipeline.benchmark(config, mock=mock)


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in MODES:
    raise app.UsageError(f'usage: python -m nin_jax.benchmark {{{"|".join(MODES)}}} [--flags]')
  # Before the first computation; see keep_freed_memory. The input pipeline is TensorFlow's.
  cpu_tuned = argv[1] != 'input' and FLAGS.keep_freed_memory and keep_freed_memory()
  try:
    if argv[1] == 'input':
      result = _input_benchmark(FLAGS.config, FLAGS.mock)
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
