"""Tests for nin_jax.benchmark (the CLI and its JSON line) and the PyTorch twin of the net."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO as ROOT, SITE
from nin_jax import benchmark, convs, default_config, models
from nin_jax.errors import UserError

JSON_KEYS = {'images_per_sec', 'step_ms', 'gflops_per_sec', 'compile_seconds', 'peak_rss_mb',
             'backend', 'device_count', 'model', 'batch_size', 'dtype', 'conv_impl'}
TINY = dict(widths=((8, 8, 8), (8, 8, 8), (8, 8, None)))  # nin_cifar's shape, 8 maps wide


@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_run_benchmark_reports_every_field(mode):
  result = benchmark.run_benchmark(mode, 'nin_cifar', batch_size=4, steps=2, num_classes=10,
                                   image_size=12, **TINY)
  assert JSON_KEYS <= set(result)
  assert result['mode'] == mode and result['model'] == 'nin_cifar'
  assert result['batch_size'] == 4 and result['dtype'] == 'float32'
  assert result['conv_impl'] == convs.resolve_conv_impl('auto')
  assert result['backend'] == jax.default_backend()
  assert result['device_count'] == jax.device_count()
  assert result['image_shape'] == [12, 12, 3]
  for key in ('images_per_sec', 'step_ms', 'gflops_per_sec', 'compile_seconds', 'peak_rss_mb'):
    assert result[key] > 0, key
  assert result['images_per_sec'] == pytest.approx(4 / (result['step_ms'] / 1e3), rel=0.01)
  model = models.get_model('nin_cifar', 10, **TINY)
  flops = benchmark.step_flops(model, 12, 3, train=mode == 'train') * 4
  assert result['gflops_per_sec'] == pytest.approx(
      flops / (result['step_ms'] / 1e3) / 1e9, rel=0.01)
  json.dumps(result)  # one JSON line


def test_summary_figures_agree_for_a_sub_millisecond_step():
  # A 0.3336 ms step: rounded to 2 decimals (0.33 ms) it was 1% off the images/s beside it.
  bench = benchmark.Benchmark(run=lambda: None, info={'batch_size': 4}, flops=10**6)
  result = benchmark.summarize(bench, [0.0003336, 0.0003336, 0.0004])
  assert result['step_ms'] == pytest.approx(0.3336, rel=1e-4)
  assert result['images_per_sec'] == pytest.approx(4 / 0.0003336, rel=1e-3)
  assert result['gflops_per_sec'] == pytest.approx(1e6 / 0.0003336 / 1e9, rel=1e-3)
  assert result['step_ms_mean'] == pytest.approx((0.3336 * 2 + 0.4) / 3, rel=1e-3)
  assert benchmark.significant(0.004321) == 0.004321 and benchmark.significant(12345.6) == 12350


def test_train_step_learns():
  """The timed step is a real SGD step: repeated on one batch, the loss goes down."""
  bench = benchmark.build_benchmark('train', 'nin_cifar', batch_size=8, image_size=12,
                                    dropout_rate=0.0, **TINY)
  losses = [float(bench.run()) for _ in range(15)]
  assert losses[-1] < losses[0] - 0.05, losses


def test_the_timed_step_is_built_from_the_training_config():
  """A change to the config's optimizer (weight decay, per-layer rates) changes the timed
  step's losses: the benchmark times `train.train_step` with the config's optimizer."""
  def losses(**config_overrides):
    return benchmark.train_losses('nin_cifar', batch_size=8, steps=5, image_size=12,
                                  dropout_rate=0.0, config_overrides=config_overrides, **TINY)

  default = losses()
  assert default_config.get_config().weight_decay == 5e-4  # what `default` ran with
  for changed in (losses(weight_decay=0.05), losses(lr_multipliers='none')):
    assert changed[0] == default[0]  # the same net and batch before the first update
    assert abs(changed[-1] - default[-1]) > 1e-3, (changed, default)
  with pytest.raises(UserError, match="no field 'weight_decy'"):
    losses(weight_decy=0.0)


def test_host_and_device_input_paths_feed_the_same_new_batch_every_step():
  def losses(input, steps=4):  # pylint: disable=redefined-builtin
    bench = benchmark.build_benchmark('train', 'nin_cifar', batch_size=8, image_size=12,
                                      dropout_rate=0.0, input=input, num_images=64, **TINY)
    assert bench.info['input'] == input
    return [float(bench.run()) for _ in range(steps)]

  host, device, fixed = losses('host'), losses('device'), losses('none')
  assert all(map(math.isfinite, host)), host
  np.testing.assert_allclose(device, host, rtol=1e-4)  # the same batches, step after step
  assert not np.allclose(host, fixed, rtol=1e-2)        # not one batch over and over
  with pytest.raises(UserError, match='--input'):
    benchmark.build_benchmark('eval', 'nin_cifar', batch_size=8, image_size=12, input='device',
                              **TINY)


def test_bfloat16_runs_and_keeps_float32_logits():
  result = benchmark.run_benchmark('eval', 'nin_cifar', batch_size=2, steps=1, dtype='bfloat16',
                                   image_size=12, **TINY)
  assert result['dtype'] == 'bfloat16' and result['images_per_sec'] > 0
  model = models.get_model('nin_cifar', 10, dtype=jax.numpy.bfloat16, **TINY)
  images = jax.numpy.zeros((2, 12, 12, 3))
  params = model.init(jax.random.key(0), images, train=False)
  assert model.apply(params, images, train=False).dtype == jax.numpy.float32


def test_flops_are_two_per_multiply_accumulate_three_passes_for_training():
  model = models.get_model('nin_cifar', 10)
  macs = models.multiply_accumulates(model, 32, 3)
  assert 221e6 < macs < 223e6  # the paper's "about 222M"
  assert benchmark.step_flops(model, 32, 3, train=False) == 2 * macs
  assert benchmark.step_flops(model, 32, 3, train=True) == 6 * macs


def test_default_inputs_follow_the_model():
  assert benchmark.default_input('nin_cifar') == (32, 3)
  assert benchmark.default_input('nin_svhn') == (32, 3)
  assert benchmark.default_input('nin_mnist') == (28, 1)
  assert benchmark.default_input('nin_small') == (28, 1)
  assert benchmark.default_input('nin_imagenet') == (224, 3)
  assert {name for name in models.MODELS if not name.startswith('_')} <= set(
      benchmark.DEFAULT_INPUTS)
  with pytest.raises(UserError, match='--model'):
    benchmark.default_input('resnet50')


def test_bad_settings_are_user_errors():
  with pytest.raises(UserError, match='--dtype'):
    benchmark.run_benchmark('train', 'nin_small', batch_size=2, steps=1, dtype='float16')
  with pytest.raises(UserError, match='--steps'):
    benchmark.run_benchmark('train', 'nin_small', batch_size=2, steps=0)
  with pytest.raises(UserError, match='conv_impl'):
    benchmark.run_benchmark('eval', 'nin_small', batch_size=2, steps=1, conv_impl='fast')


def run_cli(*args, devices=1, timeout=240, hide=(), cwd=ROOT):
  """Runs `python -m nin_jax.benchmark ARGS` in a fresh process that reports, after the CLI
  exits, whether PIL and TensorFlow were imported (the accelerator machines have neither).
  The modules in `hide` cannot be imported there (as if not installed)."""
  code = ('import runpy, sys\n'
          f'sys.modules.update(dict.fromkeys({list(hide)!r}))\n'
          f'sys.argv = ["nin_jax.benchmark", *{list(args)!r}]\n'
          'try:\n'
          '  runpy.run_module("nin_jax.benchmark", run_name="__main__", alter_sys=True)\n'
          'except SystemExit as e:\n'
          '  code = e.code\n'
          'else:\n'
          '  code = 0\n'
          'print("PIL_IMPORTED", "PIL" in sys.modules, flush=True)\n'
          'print("TENSORFLOW_IMPORTED", "tensorflow" in sys.modules, flush=True)\n'
          'sys.exit(code)\n')
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([SITE, ROOT]))
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        cwd=cwd, timeout=timeout)


def test_cli_prints_one_json_line_last_without_tensorflow_on_two_devices():
  # eval: compiles in seconds; the training step's dict is checked in-process above.
  proc = run_cli('eval', '--model', 'nin_small', '--batch_size', '4', '--steps', '1',
                 '--image_size', '8', devices=2)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-2:] == ['PIL_IMPORTED False', 'TENSORFLOW_IMPORTED False']
  result = json.loads(lines[-3])
  assert JSON_KEYS <= set(result)
  assert result['device_count'] == 2 and result['backend'] == 'cpu'
  assert result['image_shape'] == [8, 8, 1] and result['model'] == 'nin_small'
  assert result['images_per_sec'] > 0
  assert isinstance(result['malloc_tuned'], bool)


def test_cli_device_input_path_on_two_devices_needs_neither_pil_nor_tensorflow(tmp_path):
  # Nor ml_collections (the default config is then a dict, as on the accelerators), nor the
  # repository's folder: it runs from any other.
  proc = run_cli('train', '--model', '_nin_tiny', '--batch_size', '4', '--steps', '2',
                 '--image_size', '8', '--input', 'device', '--num_images', '32', devices=2,
                 hide=('ml_collections',), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[-2:] == ['PIL_IMPORTED False', 'TENSORFLOW_IMPORTED False']
  result = json.loads(lines[-3])
  assert result['input'] == 'device' and result['device_count'] == 2
  assert result['images_per_sec'] > 0


def test_cli_user_errors_are_one_line_exit_2():
  proc = run_cli('eval', '--model', 'nin_small', '--batch_size', '3', '--steps', '1', devices=2)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: --batch_size=3: must be a positive multiple of the 2 devices')
  assert 'Traceback' not in proc.stderr
  proc = run_cli('input')
  assert proc.returncode == 2
  assert 'error: input: name the experiment with --config' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_input_benchmark_times_the_pipeline_on_mock_data():
  from experiments import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.update(dict(dataset='mnist', data_dir='', num_classes=10, preprocess='standardize',
                     augment='translate', batch_size=16))
  result = benchmark.input_benchmark(config, mock=True, num_batches=5, mock_examples=64)
  assert result['images_per_sec'] > 0 and result['batch_size'] == 16
  assert result['num_train_examples'] == 64 and config.data_dir == ''


def test_input_benchmark_times_a_stream_as_its_batches_reach_the_trainer(tmp_path):
  from conftest import write_photos  # pylint: disable=g-import-not-at-top
  from experiments import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config()
  config.update(dict(data_dir=write_photos(tmp_path / 'photos', per_class=(6, 2)),
                     num_classes=3, image_size=16, resize_size=20, batch_size=4,
                     input_pipeline='stream', stream_workers=1))
  result = benchmark.input_benchmark(config, mock=False, num_batches=4)
  assert result['images_per_sec'] > 0 and result['input_pipeline'] == 'stream'
  assert (result['workers'], result['source'], result['num_train_examples']) == (
      1, 'FileSource', 18)
  assert result['cpu_cores_busy'] >= 0
  assert (result['resize_size'], result['image_size'], result['skipped_files']) == (20, 16, 0)


def test_pytorch_twin_computes_the_same_function():
  """benchmarks/compare_pytorch.py's independent PyTorch net: same logits, same gradients."""
  pytest.importorskip('torch')
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import compare_pytorch  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  for name, overrides in (('nin_cifar', TINY), ('nin_cifar_caffe', TINY)):
    # 13 pixels: the ceil-style pools' last windows hang over the edge (13 -> 7 -> 4).
    diffs = compare_pytorch.check_same_function(name, 10, batch_size=3, image_size=13,
                                                **overrides)
    assert len(diffs) == 1 + 2 * 9
    assert max(diffs.values()) < 1e-4, diffs
  # Its optimizer has training's per-layer rule, parameter for parameter.
  model = models.get_model('nin_cifar', 10, **TINY)
  params = model.init(jax.random.key(0), np.zeros((1, 13, 13, 3), np.float32),
                      train=False)['params']
  net = compare_pytorch.torch_nin(model, 3)
  config = default_config.get_config()
  groups = compare_pytorch.authors_param_groups(net, config)
  flat = lambda tree: jax.tree.leaves(  # pylint: disable=g-long-lambda
      [[tree[b][n][k] for n in sorted(tree[b], key=lambda n: (n != 'conv', n))
        for k in ('kernel', 'bias')]
       for b in sorted(tree, key=lambda b: int(b.removeprefix('mlpconv')))])
  expected_lr = [config.learning_rate * m for m in flat(models.lr_multipliers(params))]
  expected_decay = [config.weight_decay * m for m in flat(models.weight_decay_mask(params))]
  assert [g['lr'] for g in groups] == pytest.approx(expected_lr)
  assert [g['weight_decay'] for g in groups] == pytest.approx(expected_decay)
