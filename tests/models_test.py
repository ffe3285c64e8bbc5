"""Tests for nin_jax.models: the zoo is exactly the authors' nets."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nin_jax import architectures
from nin_jax import models

# name -> (num_classes, image_size, channels)
AUTHORS_NETS = {
    'nin_cifar': (10, 32, 3),
    'nin_cifar_caffe': (10, 32, 3),
    'nin_svhn': (10, 32, 3),
    'nin_mnist': (10, 28, 1),
    'nin_imagenet': (1000, 224, 3),
}


def conv_params(k, c_in, c_out):
  return k * k * c_in * c_out + c_out


@functools.lru_cache(maxsize=None)
def init_params(name, num_classes, size, channels, init='he', head='gap'):
  model = models.get_model(name, num_classes, init=init, head=head)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, size, size, channels)))
  return model, variables['params']


def abstract_params(name, num_classes, size, channels, **kw):
  model = models.get_model(name, num_classes, **kw)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, channels)), train=False))
  return model, shapes['params']


# --- Parameter counts, written out layer by layer ------------------------------------------------

EXPECTED_PARAMS = {
    ('nin_cifar', 10, 32, 3): (
        conv_params(5, 3, 192) + conv_params(1, 192, 160) + conv_params(1, 160, 96)
        + conv_params(5, 96, 192) + conv_params(1, 192, 192) + conv_params(1, 192, 192)
        + conv_params(3, 192, 192) + conv_params(1, 192, 192) + conv_params(1, 192, 10)),
    ('nin_cifar', 100, 32, 3): (
        conv_params(5, 3, 192) + conv_params(1, 192, 160) + conv_params(1, 160, 96)
        + conv_params(5, 96, 192) + conv_params(1, 192, 192) + conv_params(1, 192, 192)
        + conv_params(3, 192, 192) + conv_params(1, 192, 192) + conv_params(1, 192, 100)),
    ('nin_svhn', 10, 32, 3): (
        conv_params(5, 3, 128) + conv_params(1, 128, 96) + conv_params(1, 96, 64)
        + conv_params(5, 64, 320) + conv_params(1, 320, 256) + conv_params(1, 256, 128)
        + conv_params(5, 128, 384) + conv_params(1, 384, 256) + conv_params(1, 256, 10)),
    ('nin_mnist', 10, 28, 1): (
        conv_params(5, 1, 96) + conv_params(1, 96, 64) + conv_params(1, 64, 48)
        + conv_params(5, 48, 128) + conv_params(1, 128, 96) + conv_params(1, 96, 48)
        + conv_params(5, 48, 128) + conv_params(1, 128, 96) + conv_params(1, 96, 10)),
    ('nin_imagenet', 1000, 224, 3): (
        conv_params(11, 3, 96) + 2 * conv_params(1, 96, 96)
        + conv_params(5, 96, 256) + 2 * conv_params(1, 256, 256)
        + conv_params(3, 256, 384) + 2 * conv_params(1, 384, 384)
        + conv_params(3, 384, 1024) + conv_params(1, 1024, 1024) + conv_params(1, 1024, 1000)),
    ('nin_small', 62, 28, 1): (
        conv_params(5, 1, 32) + 2 * conv_params(1, 32, 32)
        + conv_params(5, 32, 64) + 2 * conv_params(1, 64, 64)
        + conv_params(3, 64, 128) + 2 * conv_params(1, 128, 128)
        + conv_params(3, 128, 128) + conv_params(1, 128, 128) + conv_params(1, 128, 62)),
}


def test_every_registry_entry_has_a_written_out_count():
  names = {key[0] for key in EXPECTED_PARAMS} | {'nin_cifar_caffe'}
  assert names == {name for name in models.MODELS if not name.startswith('_')}


@pytest.mark.parametrize('key', sorted(EXPECTED_PARAMS), ids=lambda k: f'{k[0]}-{k[1]}')
def test_parameter_counts(key):
  _, params = abstract_params(*key)
  assert models.count_params(params) == EXPECTED_PARAMS[key]


def test_cifar_net_is_the_papers_size():
  _, params = abstract_params('nin_cifar', 10, 32, 3)
  assert models.count_params(params) == 966_986
  _, caffe = abstract_params('nin_cifar_caffe', 10, 32, 3)
  assert models.count_params(caffe) == 966_986
  # About 222M multiply-accumulates per 32×32 image (docs/references.md).
  assert round(models.multiply_accumulates(models.get_model('nin_cifar', 10), 32, 3) / 1e6) == 222


def test_multiply_accumulates_by_hand():
  model = models.get_model('nin_cifar', 10)
  expected = (32 * 32 * (25 * 3 * 192 + 192 * 160 + 160 * 96)
              + 16 * 16 * (25 * 96 * 192 + 192 * 192 * 2)
              + 8 * 8 * (9 * 192 * 192 + 192 * 192 + 192 * 10))
  assert models.multiply_accumulates(model, 32, 3) == expected


# --- Shapes: pools, heads, GAP ------------------------------------------------------------------

@pytest.mark.parametrize('size,expected', [(32, 16), (16, 8), (28, 14), (14, 7), (54, 27),
                                           (27, 13), (13, 6), (7, 3)])
def test_pooled_sizes_are_ceil_style(size, expected):
  assert models.pooled_size(size) == expected
  for kind in ('max', 'avg'):
    out = models.pool(jnp.zeros((1, size, size, 2)), kind)
    assert out.shape == (1, expected, expected, 2)


def test_avg_pool_excludes_padding_and_max_ignores_it():
  x = jnp.ones((1, 4, 4, 1))  # 4 -> 2: the second window hangs one pixel over the edge
  np.testing.assert_allclose(models.pool(x, 'avg'), 1.0)
  np.testing.assert_allclose(models.pool(-x, 'max'), -1.0)


def test_block_maps_sizes_of_the_authors_nets():
  def map_sizes(name, classes, size, channels):
    model = models.get_model(name, classes)
    _, state = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, size, size, channels)),
                                       train=False, capture_intermediates=True))
    inter = state['intermediates']
    return [inter[f'mlpconv{b + 1}']['__call__'][0].shape[1] for b in range(len(model.widths))]

  assert map_sizes('nin_cifar', 10, 32, 3) == [32, 16, 8]
  assert map_sizes('nin_mnist', 10, 28, 1) == [28, 14, 7]
  assert map_sizes('nin_imagenet', 1000, 224, 3) == [54, 27, 13, 6]
  assert map_sizes('nin_small', 62, 28, 1) == [28, 14, 7, 3]


def test_gap_logits_are_the_spatial_means_of_the_class_maps():
  model = models.get_model('nin_small', 5)
  x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
  params = model.init(jax.random.key(0), x, train=False)['params']
  logits, state = jax.jit(functools.partial(model.apply, train=False, mutable=['intermediates']))(
      {'params': params}, x)
  maps = state['intermediates']['class_maps'][0]
  assert maps.shape == (3, 3, 3, 5)
  assert float(jnp.abs(maps).max()) > 0
  np.testing.assert_allclose(logits, maps.mean(axis=(1, 2)), rtol=1e-6)


def test_class_maps_pass_a_relu_in_the_authors_nets_only():
  """The authors' nets end in a ReLU (cccp6 + relu6); nin_small's class maps are linear, so no
  class can die (models.py: a class map below zero everywhere has no gradient)."""
  def class_maps(name, size, channels):
    model = models.get_model(name, 10)
    x = jax.random.normal(jax.random.key(1), (4, size, size, channels))
    params = model.init(jax.random.key(0), x, train=False)['params']
    _, state = model.apply({'params': params}, x, train=False, mutable=['intermediates'])
    return state['intermediates']['class_maps'][0]

  assert float(class_maps('nin_cifar', 32, 3).min()) == 0.0
  assert all(models.get_model(name, 10).final_activation for name in AUTHORS_NETS)
  assert float(class_maps('nin_small', 28, 1).min()) < 0.0


@pytest.mark.parametrize('head', ['fc', 'fc_dropout'])
def test_fc_heads(head):
  model, params = abstract_params('nin_cifar', 10, 32, 3, head=head)
  assert params['fc']['kernel'].shape == (8 * 8 * 192, 10)
  assert params['mlpconv3']['cccp2']['kernel'].shape == (1, 1, 192, 192)
  out = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((4, 32, 32, 3)), train=False)[0])
  assert out.shape == (4, 10) and out.dtype == jnp.float32


def test_dropout_only_in_training():
  model = models.get_model('nin_small', 4)
  x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
  params = model.init(jax.random.key(0), x, train=False)['params']
  evaluate = jax.jit(functools.partial(model.apply, train=False))
  train = jax.jit(lambda p, key, m=model: m.apply(p, x, train=True, rngs={'dropout': key}))
  a = evaluate({'params': params}, x)
  np.testing.assert_array_equal(a, evaluate({'params': params}, x))  # no rng: deterministic
  t1 = train({'params': params}, jax.random.key(1))
  t2 = train({'params': params}, jax.random.key(2))
  assert not np.allclose(t1, t2)
  assert not np.allclose(t1, a)
  no_drop = models.get_model('nin_small', 4, dropout_rate=0.0)
  np.testing.assert_allclose(
      jax.jit(lambda p: no_drop.apply(p, x, train=True, rngs={'dropout': jax.random.key(1)}))(
          {'params': params}), a, rtol=1e-5)


def test_bfloat16_keeps_float32_params_and_logits():
  model = models.get_model('nin_small', 4, dtype=jnp.bfloat16)
  x = jnp.ones((1, 28, 28, 1))
  variables, logits = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), x, train=False)[::-1])
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  assert logits.dtype == jnp.float32


# --- Initialization -----------------------------------------------------------------------------

def test_paper_init_has_the_authors_stds():
  _, params = init_params('nin_cifar', 10, 32, 3, init='paper')
  for block, layer in [('mlpconv1', 'conv'), ('mlpconv2', 'conv'), ('mlpconv2', 'cccp1'),
                       ('mlpconv3', 'conv')]:
    kernel = np.asarray(params[block][layer]['kernel'])
    assert kernel.size > 10_000
    assert abs(kernel.std() - 0.05) < 0.002, (block, layer)
    assert abs(kernel.mean()) < 0.002
  assert all(not np.any(np.asarray(params[b][l]['bias']))
             for b in params for l in params[b])


def test_paper_init_cifar100_exceptions():
  _, params = init_params('nin_cifar', 100, 32, 3, init='paper')
  stds = {l: float(np.asarray(params['mlpconv1'][l]['kernel']).std())
          for l in ('conv', 'cccp1', 'cccp2')}
  assert abs(stds['conv'] - 0.001) < 0.0001
  assert abs(stds['cccp1'] - 0.01) < 0.0005
  assert abs(stds['cccp2'] - 0.01) < 0.0005
  assert abs(float(np.asarray(params['mlpconv2']['conv']['kernel']).std()) - 0.05) < 0.002


def test_he_init_std():
  _, params = init_params('nin_cifar', 10, 32, 3, init='he')
  kernel = np.asarray(params['mlpconv2']['conv']['kernel'])  # fan-in 5*5*96
  assert abs(kernel.std() - math.sqrt(2 / (25 * 96))) < 0.002


# --- Never dead, learns from the first steps ----------------------------------------------------

def _overfit(model, x, y, steps, learning_rate):
  """Full-batch SGD, momentum 0.9, with the authors' per-layer rate multipliers."""
  params = model.init(jax.random.key(0), x[:1], train=False)['params']
  multipliers = models.lr_multipliers(params)
  tx = optax.chain(
      optax.stateless(lambda u, _: jax.tree_util.tree_map(lambda a, m: a * m, u, multipliers)),
      optax.sgd(learning_rate, momentum=0.9))
  opt_state = tx.init(params)

  def loss_fn(p):
    logits = model.apply({'params': p}, x, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, o):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss, grads

  losses = []
  for i in range(steps):
    params, opt_state, loss, grads = step(params, opt_state)
    if i == 0:
      first_grads = grads
    losses.append(float(loss))
  return losses, first_grads


def _digits(n=100):
  """scikit-learn's real 8×8 digits, ×3 and padded to 28×28, standardized."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  x = np.kron(digits.images[:n], np.ones((3, 3)))[..., None]
  x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  return jnp.asarray((x - x.mean()) / x.std(), jnp.float32), jnp.asarray(digits.target[:n])


@pytest.mark.parametrize('name', ['nin_small', 'nin_mnist'])
def test_he_init_starts_alive_and_learns_from_the_first_steps(name):
  model = models.get_model(name, 10, init='he', dropout_rate=0.0)
  losses, grads = _overfit(model, *_digits(), steps=40, learning_rate=0.003)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):  # every layer gets a gradient
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  assert np.isfinite(losses).all()
  assert min(losses[-5:]) < math.log(10) - 0.1, losses  # below chance within 40 steps


def test_paper_init_is_alive_but_sits_near_chance_at_first():
  """Why the authors' literal recipe (experiments/authors_cifar10.py) is slow: their 0.05 stds
  give logits of about 1e-3, so the loss stays within 1e-2 of ln C for the first steps (the
  'stuck at chance' of many re-implementations), although no unit is dead and every layer gets a
  gradient."""
  model = models.get_model('nin_mnist', 10, init='paper', dropout_rate=0.0)
  losses, grads = _overfit(model, *_digits(), steps=25, learning_rate=0.1)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  assert max(abs(l - math.log(10)) for l in losses) < 1e-2, losses
  assert losses[-1] < losses[0]  # moving, slowly


def test_paper_init_cifar_net_is_not_dead_at_the_start():
  model, params = init_params('nin_cifar', 10, 32, 3, init='paper')
  x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))  # whitened data: about unit variance
  logits, state = jax.jit(functools.partial(model.apply, train=False, mutable=['intermediates']))(
      {'params': params}, x)
  maps = state['intermediates']['class_maps'][0]
  assert float((maps > 0).mean()) > 0.2  # the final ReLU is not dead
  assert float(logits.std(axis=0).mean()) > 1e-5  # logits depend on the image


# --- Against an independent implementation ------------------------------------------------------

def _np_conv(x, kernel, bias, stride, pad):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = kernel.shape[0]
  win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
  # win: (N, Ho, Wo, C, k, k)
  return np.einsum('nhwcij,ijcf->nhwf', win, kernel, optimize=True) + bias


def _np_pool(x, kind):
  n, h, w, c = x.shape
  ho, wo = math.ceil((h - 3) / 2) + 1, math.ceil((w - 3) / 2) + 1
  out = np.zeros((n, ho, wo, c), x.dtype)
  for i in range(ho):
    for j in range(wo):
      win = x[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]  # clipped at the edge, as Caffe
      out[:, i, j] = win.max(axis=(1, 2)) if kind == 'max' else win.mean(axis=(1, 2))
  return out


def reference_forward(spec, params, x):
  """The NIN forward pass in float64 numpy, written from the authors' definitions
  (docs/references.md), not from models.py."""
  x = x.astype(np.float64)
  blocks = len(spec['widths'])
  for b in range(blocks):
    p = params[f'mlpconv{b + 1}']
    layers = ['conv'] + [f'cccp{i}' for i in range(1, len(spec['widths'][b]))]
    for i, name in enumerate(layers):
      kernel, bias = (np.asarray(p[name][t], np.float64) for t in ('kernel', 'bias'))
      x = _np_conv(x, kernel, bias, spec['strides'][b] if i == 0 else 1,
                   spec['paddings'][b] if i == 0 else 0)
      class_maps = b == blocks - 1 and i == len(layers) - 1
      if not class_maps or spec.get('final_activation', True):
        x = np.maximum(x, 0)
    if b < blocks - 1:
      x = _np_pool(x, spec['pools'][b])
  return x.mean(axis=(1, 2))


@pytest.mark.parametrize('name', sorted(AUTHORS_NETS) + ['nin_small'])
def test_same_logits_as_an_independent_implementation(name):
  classes, size, channels = AUTHORS_NETS.get(name, (62, 28, 1))
  model, params = init_params(name, classes, size, channels)
  # Non-zero biases, so that the test sees them too.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.01 if path[-1].key == 'bias' else p, params)
  batch = 1 if name == 'nin_imagenet' else 2
  x = np.asarray(jax.random.normal(jax.random.key(5), (batch, size, size, channels)))
  ours = np.asarray(jax.jit(functools.partial(model.apply, train=False))({'params': params}, x))
  ref = reference_forward(models.MODELS[name], params, x)
  assert ours.shape == (batch, classes)
  rel = np.abs(ours - ref).max() / np.abs(ref).max()
  assert rel < 1e-4, rel


# --- Optimizer settings as data -----------------------------------------------------------------

def test_lr_multipliers_and_decay_mask_cover_every_leaf():
  for key in EXPECTED_PARAMS:
    _, params = abstract_params(*key)
    mults = models.lr_multipliers(params)
    mask = models.weight_decay_mask(params)
    assert jax.tree_util.tree_structure(mults) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mults)}
    last_block = f"mlpconv{len(models.MODELS[key[0]]['widths'])}"
    for path, value in flat.items():
      if f"['{last_block}']['cccp2']" in path:
        assert value == 0.1, path
      elif path.endswith("['bias']"):
        assert value == 2.0, path
      else:
        assert value == 1.0, path
    for path, decay in jax.tree_util.tree_leaves_with_path(mask):
      assert decay == (path[-1].key == 'kernel')


def test_fc_head_multipliers():
  _, params = abstract_params('nin_cifar', 10, 32, 3, head='fc')
  mults = models.lr_multipliers(params)
  # The fc layer, the classifier, flattens 8x8 positions of 192 maps: x0.1 / 64.
  assert mults['fc'] == {'kernel': 0.1 / 64, 'bias': 0.2 / 64}
  assert mults['mlpconv3']['cccp2'] == {'kernel': 0.1, 'bias': 0.1}
  assert mults['mlpconv1']['conv'] == {'kernel': 1.0, 'bias': 2.0}


# --- Bad settings --------------------------------------------------------------------------------

def test_bad_arguments_are_programming_errors():
  """settings.validate refuses each as a config; the library raises ValueError."""
  with pytest.raises(ValueError, match='nin_cifar'):
    models.get_model('nin_cifarr', 10)
  with pytest.raises(ValueError, match='init'):
    models.get_model('nin_cifar', 10, init='xavier')
  with pytest.raises(ValueError, match='head'):
    jax.eval_shape(lambda: models.get_model('nin_cifar', 10, head='mlp').init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  with pytest.raises(ValueError, match='num_classes'):
    models.get_model('nin_cifar', 1)
  model = models.get_model('nin_imagenet', 1000)
  with pytest.raises(ValueError, match='too small'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
  # The same rule, before JAX: what settings.validate reports.
  assert 'too small' in architectures.model_too_small('nin_imagenet', 8)
  assert architectures.model_too_small('nin_imagenet', 224) is None


# --- The data-dependent init (init='data') ------------------------------------------------------

def _pre_activations(model, params, x):
  _, state = model.apply({'params': params}, x, train=False, capture_intermediates=True,
                         mutable=['intermediates'])
  state = state['intermediates']
  return {f'{b}/{l}': np.asarray(state[b][l]['__call__'][0])
          for b in params if b.startswith('mlpconv') for l in params[b]}


@pytest.mark.parametrize('name,size,channels', [('nin_mnist', 28, 1), ('_nin_tiny', 12, 3)])
def test_data_init_gives_unit_channels_and_live_level_class_maps(name, size, channels):
  x, _ = _digits(64)
  x = jnp.tile(x[:, 8:8 + size, 8:8 + size], (1, 1, 1, channels)) * 0.3 + 0.2
  model = models.get_model(name, 10, init='data')
  params = model.init(jax.random.key(0), x[:1], train=False)['params']
  fitted = jax.jit(functools.partial(models.init_from_data, model))(params, x)
  before, after = _pre_activations(model, params, x), _pre_activations(model, fitted, x)
  last = '/'.join(models._last_cccp(params))
  for layer, values in after.items():
    if layer != last:  # every hidden channel centred at unit std, all layers at once
      np.testing.assert_allclose(values.mean(axis=(0, 1, 2)), 0.0, atol=1e-3, err_msg=layer)
      np.testing.assert_allclose(values.std(axis=(0, 1, 2)), 1.0, rtol=1e-3, err_msg=layer)
    block, name = layer.split('/')
    ratio = np.asarray(fitted[block][name]['kernel'] / params[block][name]['kernel'])
    assert (ratio > 0).all()  # each channel's filter kept, only scaled
    flat = ratio.reshape(-1, ratio.shape[-1])
    np.testing.assert_allclose(flat, np.broadcast_to(flat[:1], flat.shape), rtol=1e-4)
  maps = after[last]
  np.testing.assert_allclose(maps.mean(axis=(0, 1, 2)), 3.0, atol=1e-3)  # level, well above 0
  np.testing.assert_allclose(maps.std(axis=(0, 1, 2)), 0.1, rtol=1e-3)
  assert (maps > 0).all()  # every class map alive everywhere
  assert np.asarray(before[last].mean(axis=(0, 1, 2))).std() > 0.1  # He's offsets differ by class
