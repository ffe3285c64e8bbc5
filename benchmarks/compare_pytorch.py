r"""The authors' net in PyTorch and in nin_jax, timed side by side on this machine.

  pip install -e '.[bench]'    # torch (CPU build)
  python benchmarks/compare_pytorch.py --model nin_cifar --batch_size 128 --rounds 5
  python benchmarks/compare_pytorch.py --modes eval --jax_impls xla,im2col --threads 2

Each framework runs in its own worker process (compiled or warmed up once), and the workers take
turns — round 1: JAX, PyTorch; round 2: JAX, PyTorch; ... — so a machine shared with other work
slows both alike; the ratios are what to read. Same batch size, same random data, same thread
count (`--threads`: PyTorch's intra-op threads; XLA's CPU client uses one thread per core, so
the workers are also pinned to that many cores where the OS allows it). Training is the whole
step (forward, softmax cross-entropy, backward, and the update of training's recipe on both
sides: SGD with momentum, weight decay on weights, the authors' per-layer rates; dropout 0.5 on);
eval is the forward pass, dropout off.

Before timing, `--check` (on by default) copies one set of weights into both nets and asserts
that they compute the same logits and the same gradients: the PyTorch net here is an
independent implementation of the same function (`torch_nin`), ceil-mode pools included.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


# --- The PyTorch net ------------------------------------------------------------------------------

def torch_nin(model, in_channels: int) -> 'torch.nn.Module':
  """The `nin_jax.models.NIN` `model` (a GAP net) as a PyTorch module on NCHW images with
  `in_channels` channels.

  Layer for layer: per block a k×k conv and 1×1 cccp convs, ReLU after each (and after the last
  cccp when `model.final_activation`), then 3×3/2 max or average pools in ceil mode (average
  excluding the padding) and dropout between blocks, then the global average of the class maps.
  """
  from torch import nn  # pylint: disable=g-import-not-at-top

  if model.head != 'gap':
    raise ValueError(f'torch_nin builds the gap head only, not {model.head!r}')
  layers, c_in = [], in_channels
  for b, widths in enumerate(model.widths):
    k, s, p = model.kernel_sizes[b], model.strides[b], model.paddings[b]
    last_block = b == len(model.widths) - 1
    for i, width in enumerate(widths):
      layers.append(nn.Conv2d(c_in, width, k, s, p) if i == 0 else nn.Conv2d(c_in, width, 1))
      c_in = width
      if i < len(widths) - 1 or model.final_activation or not last_block:
        layers.append(nn.ReLU())
    if not last_block:
      pool = nn.MaxPool2d if model.pools[b] == 'max' else (
          lambda *a, **kw: nn.AvgPool2d(*a, count_include_pad=False, **kw))
      layers.append(pool(3, 2, ceil_mode=True))
      if model.dropout_after[b]:
        layers.append(nn.Dropout(model.dropout_rate))
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  return nn.Sequential(*layers)


def copy_params(net, params) -> None:
  """Flax params (HWIO kernels (k, k, C_in, C_out), biases (C_out,)) into `net`'s convs
  (OIHW weights), in order: mlpconv1/conv, cccp1, cccp2, mlpconv2/conv, ..."""
  import torch  # pylint: disable=g-import-not-at-top

  convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
  blocks = sorted(params, key=lambda name: int(name.removeprefix('mlpconv')))
  flax_layers = [params[b][name] for b in blocks
                 for name in sorted(params[b], key=lambda n: (n != 'conv', n))]
  if len(convs) != len(flax_layers):
    raise ValueError(f'{len(convs)} torch convs but {len(flax_layers)} flax layers')
  with torch.no_grad():
    for conv, layer in zip(convs, flax_layers):
      kernel = np.asarray(layer['kernel'], np.float32).transpose(3, 2, 0, 1)
      if tuple(conv.weight.shape) != kernel.shape:
        raise ValueError(f'shape {tuple(conv.weight.shape)} != {kernel.shape}')
      conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
      conv.bias.copy_(torch.from_numpy(np.array(layer['bias'], np.float32)))


def check_same_function(model_name: str = 'nin_cifar', num_classes: int = 10,
                        batch_size: int = 4, image_size: int | None = None,
                        image_channels: int | None = None, conv_impl: str = 'auto',
                        **overrides: Any) -> dict[str, float]:
  """Copies one init of the JAX net into the PyTorch net; returns the largest differences of
  their logits and of the loss gradients (relative to each tensor's largest entry), dropout off.
  Raises AssertionError above 1e-4 (logits) and 1e-3 (gradients)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from nin_jax import benchmark, models  # pylint: disable=g-import-not-at-top

  size, channels = benchmark.default_input(model_name)
  size, channels = image_size or size, image_channels or channels
  model = models.get_model(model_name, num_classes, conv_impl=conv_impl, **overrides)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch_size, size, size, channels)).astype(np.float32)
  labels = rng.integers(0, num_classes, batch_size)
  params = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.asarray(images[:1]))['params']

  def loss_fn(params):
    logits = model.apply({'params': params}, jnp.asarray(images), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  net = torch_nin(model, channels)
  copy_params(net, params)
  net.eval()
  t_logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  torch.nn.functional.cross_entropy(t_logits, torch.from_numpy(labels)).backward()

  def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))

  diffs = {'logits': rel(logits, t_logits.detach().numpy())}
  convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
  blocks = sorted(grads, key=lambda name: int(name.removeprefix('mlpconv')))
  flax_layers = [(f'{b}/{name}', grads[b][name]) for b in blocks
                 for name in sorted(grads[b], key=lambda n: (n != 'conv', n))]
  for conv, (name, g) in zip(convs, flax_layers, strict=True):
    diffs[f'{name}/kernel'] = rel(np.asarray(g['kernel']).transpose(3, 2, 0, 1),
                                  conv.weight.grad.numpy())
    diffs[f'{name}/bias'] = rel(g['bias'], conv.bias.grad.numpy())
  worst_grad = max(v for k, v in diffs.items() if k != 'logits')
  assert diffs['logits'] < 1e-4, f'logits differ: {diffs}'
  assert worst_grad < 1e-3, f'gradients differ: {diffs}'
  return diffs


# --- Workers: one process per framework, stepping on command --------------------------------------

def authors_param_groups(net, config) -> list[dict[str, Any]]:
  """`net`'s parameters in SGD groups with training's recipe: the config's rate, momentum and
  weight decay, and the authors' per-layer rule of `models.lr_multipliers` and
  `models.weight_decay_mask` (biases x2 without decay, the last cccp x0.1)."""
  import torch  # pylint: disable=g-import-not-at-top

  convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
  groups = []
  for conv in convs:
    weight_scale, bias_scale = (0.1, 0.1) if conv is convs[-1] else (1.0, 2.0)
    for param, scale, decay in ((conv.weight, weight_scale, config.weight_decay),
                                (conv.bias, bias_scale, 0.0)):
      groups.append(dict(params=[param], lr=scale * config.learning_rate, weight_decay=decay,
                         momentum=config.momentum))
  return groups


def _torch_worker(args) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from nin_jax import benchmark, default_config, models, runtime

  if args.torch_malloc == 'tuned':  # the same process setting as our entry points
    runtime.keep_freed_memory()
  torch.set_num_threads(args.threads)
  size, channels = benchmark.default_input(args.model)
  model = models.get_model(args.model, args.num_classes)
  net = torch_nin(model, channels)
  if args.channels_last:
    net = net.to(memory_format=torch.channels_last)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(
      rng.normal(size=(args.batch_size, channels, size, size)).astype(np.float32))
  if args.channels_last:
    images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.from_numpy(rng.integers(0, args.num_classes, args.batch_size))
  net(images[:1])
  opt = torch.optim.SGD(authors_param_groups(net, default_config.get_config()), lr=0.0)

  def train_step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    opt.step()

  def eval_step():
    with torch.inference_mode():
      net(images)

  if args.mode == 'train':
    net.train()
    step = train_step
  else:
    net.eval()
    step = eval_step
  start = time.perf_counter()
  step()
  info = {'framework': f'torch {torch.__version__}', 'malloc': args.torch_malloc,
          'warmup_seconds': time.perf_counter() - start, 'threads': torch.get_num_threads()}

  def timed(n):
    times = []
    for _ in range(n):
      start = time.perf_counter()
      step()
      times.append(time.perf_counter() - start)
    return times

  _serve(info, timed)


def _jax_worker(args) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from nin_jax import benchmark, runtime  # pylint: disable=g-import-not-at-top

  tuned = runtime.keep_freed_memory()  # as `python -m nin_jax.benchmark` does
  bench = benchmark.build_benchmark(args.mode, args.model, batch_size=args.batch_size,
                                    num_classes=args.num_classes, conv_impl=args.jax_impl)
  start = time.perf_counter()
  bench.timed(1)
  info = {**bench.info, 'framework': f'jax {jax.__version__}', 'malloc_tuned': tuned,
          'warmup_seconds': time.perf_counter() - start}
  _serve(info, bench.timed)


def _serve(info: dict[str, Any], timed) -> None:
  """Prints `info` as JSON, then for each line 'N' on stdin runs N steps and prints their
  seconds, and the CPU seconds the whole process used for them (all its threads)."""
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    if not line.strip():
      break
    cpu = time.process_time()
    times = timed(int(line))
    print(json.dumps({'seconds': times, 'cpu_seconds': time.process_time() - cpu}), flush=True)


class Worker:
  """A worker process; `steps(n)` has it run n steps and returns their seconds."""

  def __init__(self, label: str, args: list[str], env: dict[str, str]):
    self.label = label
    self.cpu_per_step: list[float] = []
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env, cwd=ROOT)
    self.times: list[float] = []
    self.info: dict[str, Any] = {}

  def ready(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.label} worker died (exit {self.proc.wait()})')
    self.info = json.loads(line)
    return self.info

  def steps(self, n: int) -> list[float]:
    self.proc.stdin.write(f'{n}\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.label} worker died (exit {self.proc.wait()})')
    reply = json.loads(line)
    self.times += reply['seconds']
    self.cpu_per_step.append(reply['cpu_seconds'] / n)
    return reply['seconds']

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def machine_info(threads: int) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  cpu = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return {'cpu': cpu, 'cores': os.cpu_count(), 'threads': threads,
          'python': platform.python_version(), 'jax': jax.__version__, 'torch': torch.__version__}


def compare(args) -> dict[str, Any]:
  """Starts one worker per JAX conv impl and one for PyTorch, then alternates them."""
  load_at_start = [round(x, 2) for x in os.getloadavg()]
  env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=ROOT)
  common = ['--mode', args.mode, '--model', args.model, '--batch_size', str(args.batch_size),
            '--num_classes', str(args.num_classes), '--threads', str(args.threads)]
  workers = [Worker(f'jax {impl}', ['--worker', 'jax', '--jax_impl', impl, *common], env)
             for impl in args.jax_impls.split(',')]
  torch_args = ['--worker', 'torch', *common] + (['--channels_last'] if args.channels_last else [])
  workers.append(Worker('torch', torch_args + ['--torch_malloc', 'default'], env))
  if args.torch_tuned:
    workers.append(Worker('torch tuned', torch_args + ['--torch_malloc', 'tuned'], env))
  try:
    for w in workers:  # one at a time: compiling competes for the cores too
      info = w.ready()
      print(f'# {w.label}: ready ({json.dumps(info)})', file=sys.stderr, flush=True)
    for r in range(args.rounds):
      for w in workers:
        times = w.steps(args.steps_per_round)
        print(f'# round {r + 1} {w.label}: {[round(t, 3) for t in times]} s', file=sys.stderr,
              flush=True)
  finally:
    for w in workers:
      w.close()
  torch_w = next(w for w in workers if w.label == 'torch')
  result = {'mode': args.mode, 'model': args.model, 'batch_size': args.batch_size,
            'rounds': args.rounds, 'steps_per_round': args.steps_per_round,
            **machine_info(args.threads), 'load_average_at_start': load_at_start,
            'images_per_sec': {}, 'ratio_vs_torch': {}, 'cpu_seconds_per_step': {}}
  torch_step = statistics.median(torch_w.times)
  for w in workers:
    step = statistics.median(w.times)
    result['images_per_sec'][w.label] = round(args.batch_size / step, 2)
    result['ratio_vs_torch'][w.label] = round(torch_step / step, 3)
    result['cpu_seconds_per_step'][w.label] = round(statistics.median(w.cpu_per_step), 3)
  # Per round ratios show whether the median ratio is stable under the machine's load.
  per_round = []
  n = args.steps_per_round
  for r in range(args.rounds):
    t = statistics.median(torch_w.times[r * n:(r + 1) * n])
    per_round.append({w.label: round(t / statistics.median(w.times[r * n:(r + 1) * n]), 3)
                      for w in workers if w is not torch_w})
  result['ratio_per_round'] = per_round
  result['load_average_at_end'] = [round(x, 2) for x in os.getloadavg()]
  return result


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='nin_cifar')
  p.add_argument('--num_classes', type=int, default=10)
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--modes', default='train,eval', help='comma-separated: train, eval')
  p.add_argument('--jax_impls', default='auto', help='comma-separated conv_impl values of ours')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--steps_per_round', type=int, default=2)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--channels_last', action='store_true', help='PyTorch in NHWC memory format')
  p.add_argument('--torch_tuned', action='store_true',
                 help='also time PyTorch with the malloc setting of our entry points '
                      '(nin_jax.runtime.keep_freed_memory)')
  p.add_argument('--torch_malloc', choices=('default', 'tuned'), default='default',
                 help=argparse.SUPPRESS)
  p.add_argument('--check', action=argparse.BooleanOptionalAction, default=True,
                 help='first assert that both nets compute the same function')
  p.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  p.add_argument('--mode', help=argparse.SUPPRESS)
  p.add_argument('--jax_impl', help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    try:  # the same cores for both frameworks
      os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    except (AttributeError, OSError):
      pass
    (_jax_worker if args.worker == 'jax' else _torch_worker)(args)
    return
  if args.check:
    diffs = check_same_function(args.model, args.num_classes, batch_size=2)
    print(f'# same function: logits rel. diff {diffs["logits"]:.1e}, gradients rel. diff '
          f'<= {max(v for k, v in diffs.items() if k != "logits"):.1e}', flush=True)
  for mode in args.modes.split(','):
    args.mode = mode
    result = compare(args)
    for label, ips in result['images_per_sec'].items():
      ratio = result['ratio_vs_torch'][label]
      cpu_seconds = result['cpu_seconds_per_step'][label]
      print(f'{mode:5s} {label:12s} {ips:8.2f} images/s  {ratio:5.2f}x torch  '
            f'{cpu_seconds:7.3f} CPU s/step', flush=True)
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
