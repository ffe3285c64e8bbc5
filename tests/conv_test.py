"""nin_jax.convs: the k×k convolution's implementations compute one function: values and gradients.

Reference: `jax.lax.conv_general_dilated` in float64-free float32, the same numbers PyTorch's
Conv2d gives (benchmarks/compare_pytorch.py checks that end to end).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nin_jax import convs, models

IMPLS = ('xla', 'im2col', 'hybrid', 'fft')


def reference_conv(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding)] * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)


def random_case(c_in, k, size=9, c_out=5, batch=2):
  kx, kw, kr = jax.random.split(jax.random.key(c_in * 100 + k), 3)
  x = jax.random.normal(kx, (batch, size, size, c_in))
  kernel = jax.random.normal(kw, (k, k, c_in, c_out)) / np.sqrt(k * k * c_in)
  return x, kernel, kr


def value_loss_and_grads(conv, c_in, k, stride, padding):
  """conv's output, and a loss weighing every output differently with its gradients, so every
  gradient entry is checked. Jitted as one program."""
  x, kernel, r = random_case(c_in, k)

  @jax.jit
  def run(x, kernel):
    def loss(x, kernel):
      y = conv(x, kernel, stride, padding)
      return jnp.sum(jnp.tanh(y) * jax.random.normal(r, y.shape)), y
    (loss, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, kernel)
    return y, loss, grads

  return run(x, kernel)


@functools.lru_cache(maxsize=None)
def reference(c_in, k, stride, padding):
  return value_loss_and_grads(reference_conv, c_in, k, stride, padding)


# C_in 3 takes conv_hybrid's im2col kernel gradient, 20 its shifted products (_FEW_CHANNELS = 16).
CASES = [  # (c_in, k, stride, padding)
    (3, 5, 1, 2), (20, 5, 1, 2), (3, 3, 2, 0), (20, 3, 2, 1), (17, 2, 1, 0), (3, 6, 4, 1),
]


@pytest.mark.parametrize('impl,c_in,k,stride,padding', [
    (impl, *case) for impl in IMPLS for case in CASES
    if impl != 'fft' or case[2] == 1])  # conv_fft computes stride-1 convolutions only
def test_value_and_gradients_match_lax_conv(impl, c_in, k, stride, padding):
  y, loss, (dx, dk) = value_loss_and_grads(convs.CONV_FUNCTIONS[impl], c_in, k, stride, padding)
  y_ref, loss_ref, (dx_ref, dk_ref) = reference(c_in, k, stride, padding)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dk, dk_ref, rtol=1e-4, atol=1e-5)


def test_im2col_feature_order_is_row_col_channel():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  patches = convs.im2col(x, kernel_size=3, stride=1, padding=1)
  assert patches.shape == (2, 4, 4, 27)
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  # The patch at output (1, 2) is the 3×3 window whose top-left corner is padded (1, 2).
  np.testing.assert_array_equal(patches[1, 1, 2], padded[1, 1:4, 2:5, :].reshape(-1))
  # Zero padding shows at the corner.
  np.testing.assert_array_equal(patches[0, 0, 0, :3], 0.0)


def test_im2col_with_stride_matches_window_starts():
  x = jax.random.normal(jax.random.key(1), (1, 7, 7, 2))
  patches = convs.im2col(x, kernel_size=3, stride=2, padding=0)
  assert patches.shape == (1, 3, 3, 18)
  np.testing.assert_array_equal(patches[0, 2, 1], np.asarray(x)[0, 4:7, 2:5, :].reshape(-1))


def test_fft_conv_refuses_strides():
  x, kernel, _ = random_case(20, 3)
  with pytest.raises(ValueError, match='stride-1'):
    convs.conv_fft(x, kernel, 2, 1)


def test_fft_is_used_only_where_it_pays():
  assert convs.fft_pays(5, 1, 96)          # the CIFAR net's conv2
  assert not convs.fft_pays(5, 1, 3)       # its conv1: 3 input channels
  assert not convs.fft_pays(3, 1, 192)     # its conv3: 3×3
  assert not convs.fft_pays(11, 4, 96)     # strided (ImageNet's conv1)

  def ffts(c_in):
    module = convs.Conv(6, 5, padding=2, impl='fft')
    x = jnp.ones((1, 8, 8, c_in))
    params = module.init(jax.random.key(0), x)
    return jax.jit(module.apply).lower(params, x).compile().as_text().count(' fft(')

  assert ffts(16) == 3   # rfft of x, of the kernel, irfft of the product
  assert ffts(3) == 0    # falls back to conv_hybrid


def test_resolve_conv_impl():
  assert convs.resolve_conv_impl('auto') == (
      'fft' if jax.default_backend() == 'cpu' else 'xla')
  for impl in IMPLS:
    assert convs.resolve_conv_impl(impl) == impl
  with pytest.raises(ValueError, match='conv_impl'):  # settings.validate refuses it first
    convs.resolve_conv_impl('cudnn')


@functools.lru_cache(maxsize=None)
def conv_module_grads(impl, dtype, k=5, stride=1, padding=2, c_in=16, features=6):
  module = convs.Conv(features, k, stride=stride, padding=padding, impl=impl, dtype=dtype)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, c_in))
  params = module.init(jax.random.key(3), x)['params']
  y, vjp = jax.vjp(lambda p, x: module.apply({'params': p}, x), params, x)
  grads = vjp(jnp.ones_like(y))
  return params, y, grads


@pytest.mark.parametrize('impl', ('auto',) + IMPLS)
def test_conv_module_params_and_outputs(impl):
  params, y, (dparams, dx) = conv_module_grads(impl, jnp.float32)
  assert params['kernel'].shape == (5, 5, 16, 6) and params['kernel'].dtype == jnp.float32
  assert params['bias'].shape == (6,) and params['bias'].dtype == jnp.float32
  assert y.shape == (2, 8, 8, 6) and y.dtype == jnp.float32
  _, y_ref, (dparams_ref, dx_ref) = conv_module_grads('xla', jnp.float32)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  for name in ('kernel', 'bias'):
    np.testing.assert_allclose(dparams[name], dparams_ref[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('impl', IMPLS)
def test_conv_module_bfloat16_computes_in_bf16_keeps_f32_params(impl):
  params, y, (dparams, _) = conv_module_grads(impl, jnp.bfloat16)
  assert params['kernel'].dtype == jnp.float32
  assert y.dtype == jnp.bfloat16
  assert dparams['kernel'].dtype == jnp.float32
  _, y32, _ = conv_module_grads(impl, jnp.float32)
  np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=0.05, atol=0.05)


def test_one_by_one_conv_is_a_product_over_channels():
  module = convs.Conv(3, 1)
  x = jax.random.normal(jax.random.key(4), (2, 3, 3, 5))
  params = module.init(jax.random.key(5), x)['params']
  y = module.apply({'params': params}, x)
  expected = np.einsum('nhwc,cf->nhwf', x, params['kernel'][0, 0]) + params['bias']
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def tiny_nin_grads(impl):
  """A small NIN of the CIFAR shape (3 blocks, 5-5-3 kernels, max pools, dropout); conv2 has 16
  input channels, so 'fft' computes it with `conv_fft`."""
  model = models.get_model('nin_cifar', 4, conv_impl=impl,
                           widths=((12, 8, 16), (16, 8, 8), (8, 8, None)))
  images = jax.random.normal(jax.random.key(6), (3, 12, 12, 3))
  labels = jnp.array([0, 1, 3])
  params = model.init(jax.random.key(7), images, train=False)['params']

  def loss(params):
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': jax.random.key(8)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('impl', ['hybrid', 'fft'])
def test_whole_net_trains_the_same_with_the_cpu_variants(impl):
  # im2col is checked layer by layer above; a whole net of it only costs compile time.
  loss, grads = tiny_nin_grads(impl)
  loss_ref, grads_ref = tiny_nin_grads('xla')
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  flat, flat_ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_ref)
  assert len(flat) == len(flat_ref) == 18
  for (path, g), g_ref in zip(flat, flat_ref):
    scale = float(jnp.max(jnp.abs(g_ref)))
    assert scale > 0, f'{jax.tree_util.keystr(path)}: zero gradient, the test checks nothing'
    np.testing.assert_allclose(g / scale, g_ref / scale, atol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def test_hybrid_first_layer_needs_no_input_gradient():
  """The first layer's input gradient (of the images) is never computed: XLA drops it."""
  x, kernel, _ = random_case(3, 5)
  grad = jax.jit(jax.grad(lambda k: jnp.sum(convs.conv_hybrid(x, k, 1, 2) ** 2)))
  hlo = grad.lower(kernel).compile().as_text()
  # Only the forward convolution remains; its input-gradient twin (a second one) is gone.
  assert hlo.count('convolution(') == 1
