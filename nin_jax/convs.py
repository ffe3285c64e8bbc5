"""The k×k convolution, and the variants that compute it fast on a CPU: one function, one rule.

`Conv` is the layer every `MlpConv` is built of. Its k×k convolutions run through one of
`CONV_FUNCTIONS` (XLA's, im2col, hybrid, FFT), chosen by `resolve_conv_impl` and, for 'fft',
per layer by `fft_pays`; every variant computes the same function and gradients
(tests/conv_test.py). Its 1×1 convolutions (the cccp layers) are products over channels.

Layouts: NHWC activations, HWIO kernels `(k, k, C_in, C_out)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nin_jax import settings

Initializer = Callable[..., jax.Array]


def resolve_conv_impl(impl: str) -> str:
  """The k×k convolution's implementation; all compute the same function and gradients.

  'xla': XLA's convolution throughout (cuDNN on GPU, the TPU's own; YNNPACK on CPU).
  'im2col': one matrix product over patches (`conv_im2col`), forward and backward.
  'hybrid': XLA's convolution forward and for the input gradient, matrix products for the
    kernel gradient (`conv_hybrid`).
  'fft': the convolution theorem (`conv_fft`) for the layers where it does less work than the
    direct products (`fft_pays`: stride 1, kernels of 5×5 or more over 16 or more channels),
    'hybrid' for the others. Its rounding differs from the direct convolution's by ~1e-6
    relative; nets trained with either are alike (docs/benchmarks.md: seed sweeps of both).
  'auto': 'fft' on CPU, 'xla' on accelerators. Why: on CPU the FFT does far fewer
    multiply-adds for the 5×5 layers and XLA's kernel-gradient convolution is much slower than
    a matrix product of its size; on GPU/TPU the native convolution is the fast path throughout
    (docs/benchmarks.md, "What made the CPU path fast", has the figures).
  """
  if impl not in settings.CONV_IMPLS:
    raise ValueError(f'conv_impl {impl!r}: expected one of {settings.CONV_IMPLS}')
  if impl == 'auto':
    return 'fft' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def im2col(x: jax.Array, kernel_size: int, stride: int, padding: int) -> jax.Array:
  """(N, H, W, C) -> (N, Ho, Wo, k*k*C) patches, feature order (row, col, channel).

  That order matches an HWIO kernel reshaped to (k*k*C, F), so a convolution is
  `im2col(x) @ kernel.reshape(-1, F)`. Built from k*k strided slices, whose backward pass is a
  cheap scatter-add, rather than from an identity convolution; stacked on a new axis, which XLA's
  CPU writes twice as fast as a concatenation of k*k operands.
  """
  k, s, p = kernel_size, stride, padding
  if p:
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  n, h, w, c = x.shape
  ho, wo = (h - k) // s + 1, (w - k) // s + 1
  cols = [x[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
          for i in range(k) for j in range(k)]
  return jnp.stack(cols, axis=3).reshape(n, ho, wo, k * k * c)


def conv_xla(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """XLA's convolution: x (N, H, W, C) NHWC, kernel (k, k, C, F) HWIO -> (N, Ho, Wo, F)."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _matmul_over_channels(x: jax.Array, matrix: jax.Array) -> jax.Array:
  """(N, H, W, C) @ (C, F) -> (N, H, W, F), as one 2-D product of (N·H·W, C) rows.

  Why 2-D: XLA's CPU runs the gradients of the 4-D `dot_general` at half the speed of the same
  product on a (N·H·W, C) matrix (it transposes the activations for the kernel gradient).
  """
  n, h, w, c = x.shape
  return (x.reshape(n * h * w, c) @ matrix).reshape(n, h, w, matrix.shape[-1])


def conv_im2col(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """The same convolution as one matrix product: patches (N, Ho, Wo, k*k*C) @ (k*k*C, F)."""
  k, f = kernel.shape[0], kernel.shape[-1]
  return _matmul_over_channels(im2col(x, k, stride, padding), kernel.reshape(-1, f))


def conv_shifts(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """The same convolution as k*k products over channels: Σ_ij shift_ij(x) @ kernel[i, j].

  shift_ij(x) is the zero-padded x seen from kernel tap (i, j): (N, Ho, Wo, C). The kernel
  gradient of this form is k*k products shift_ij(x)ᵀ @ dy, (C, N·Ho·Wo) @ (N·Ho·Wo, F), which
  need no patch matrix.
  """
  k, s, p = kernel.shape[0], stride, padding
  if p:
    x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  _, h, w, _ = x.shape
  ho, wo = (h - k) // s + 1, (w - k) // s + 1
  terms = [_matmul_over_channels(x[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :],
                                 kernel[i, j])
           for i in range(k) for j in range(k)]
  return functools.reduce(jnp.add, terms)


# Below this many input channels (the first layer: 1 or 3) the k*k products of `conv_shifts` are
# too thin to run fast; one product over the k*k*C columns of `conv_im2col` is then the fastest.
_FEW_CHANNELS = 16


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_hybrid(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """`conv_xla`, with its kernel gradient computed by matrix products.

  Value and input gradient: XLA's convolution (the input gradient is a convolution too).
  Kernel gradient: the transpose of `conv_shifts` (k*k products shift_ij(x)ᵀ @ dy), or with
  under `_FEW_CHANNELS` input channels that of `conv_im2col` (im2col(x)ᵀ @ dy). Each is an exact
  formula for the gradient of the same function.
  """
  return conv_xla(x, kernel, stride, padding)


def _conv_hybrid_fwd(x, kernel, stride, padding):
  return conv_xla(x, kernel, stride, padding), (x, kernel)


def _conv_hybrid_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  _, x_vjp = jax.vjp(lambda x: conv_xla(x, kernel, stride, padding), x)
  products = conv_im2col if x.shape[-1] < _FEW_CHANNELS else conv_shifts
  _, kernel_vjp = jax.vjp(lambda kernel: products(x, kernel, stride, padding), kernel)
  return x_vjp(dy)[0], kernel_vjp(dy)[0]


conv_hybrid.defvjp(_conv_hybrid_fwd, _conv_hybrid_bwd)


def conv_fft(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
  """The same convolution (stride 1) by the convolution theorem, in float32.

  With x zero-padded to P×Q, the layer is a circular cross-correlation whose first Ho×Wo outputs
  never wrap around, so y = irfft2(rfft2(x) · conj(rfft2(kernel padded to P×Q))) cropped to
  Ho×Wo, where the product is one complex (N, C) @ (C, F) product per frequency. For a 5×5
  kernel on 16×16 maps (P×Q = 20×20, 20×11 frequencies) that is 4·220 real multiply-adds per
  output pair against 25·256 directly: 7× fewer. Its gradients (autodiff through the FFTs) are
  the same construction. Agrees with `conv_xla` to ~1e-6 relative (tests/conv_test.py).
  """
  if stride != 1:
    raise ValueError(f'conv_fft computes stride-1 convolutions, not stride {stride}')
  k, p, dtype = kernel.shape[0], padding, x.dtype
  x = jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2))  # NCHW: the FFT runs on the last axes
  x = jnp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  _, _, hp, wp = x.shape
  x_hat = jnp.fft.rfft2(x)                                                       # (N, C, P, Q')
  k_hat = jnp.fft.rfft2(jnp.transpose(kernel.astype(jnp.float32), (2, 3, 0, 1)), s=(hp, wp))
  y_hat = jnp.einsum('ncpq,cfpq->nfpq', x_hat, jnp.conj(k_hat))                   # (N, F, P, Q')
  y = jnp.fft.irfft2(y_hat, s=(hp, wp))[:, :, :hp - k + 1, :wp - k + 1]
  return jnp.transpose(y, (0, 2, 3, 1)).astype(dtype)


def fft_pays(kernel_size: int, stride: int, in_channels: int) -> bool:
  """Whether 'fft' runs a layer through `conv_fft`: measured faster on CPU for stride-1 kernels
  of 5×5 or more over at least `_FEW_CHANNELS` inputs; slower for 3×3 kernels and for the
  3-channel first layer, whose direct products are small while their FFTs are as large as the
  maps (docs/benchmarks.md)."""
  return stride == 1 and kernel_size >= 5 and in_channels >= _FEW_CHANNELS


CONV_FUNCTIONS = {'xla': conv_xla, 'im2col': conv_im2col, 'hybrid': conv_hybrid,
                  'fft': conv_fft}


class Conv(nn.Module):
  """A k×k convolution with symmetric zero padding, NHWC; 1×1 ones are products over channels.

  Attributes:
    features: output channels.
    kernel_size: k.
    stride: spatial stride.
    padding: zero padding on each side.
    impl: 'auto', 'xla', 'im2col', 'hybrid' or 'fft' (same function; see `resolve_conv_impl`).
    kernel_init, bias_init: initializers; parameters are always float32.
    dtype: the dtype of the computation (float32, or bfloat16 on accelerators).

  Input (N, H, W, C_in), output (N, Ho, Wo, features) in `dtype`; parameters `kernel`
  (k, k, C_in, features) HWIO and `bias` (features,), float32.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  impl: str = 'auto'
  kernel_init: Initializer = nn.initializers.he_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, f = self.kernel_size, self.features
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], f), jnp.float32)
    bias = self.param('bias', self.bias_init, (f,), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if k == 1 and self.stride == 1 and self.padding == 0:
      y = _matmul_over_channels(x, kernel[0, 0])
    else:
      impl = resolve_conv_impl(self.impl)
      if impl == 'fft' and not fft_pays(k, self.stride, x.shape[-1]):
        impl = 'hybrid'
      y = CONV_FUNCTIONS[impl](x, kernel, self.stride, self.padding)
    return y + bias.astype(self.dtype)
