"""Network In Network (Lin, Chen & Yan, ICLR 2014) in Flax Linen.

The two ideas of the paper, each in one place:

* `MlpConv`: a k×k convolution followed by a small MLP shared over positions, written as 1×1
  convolutions (the paper's "cascaded cross channel parametric pooling", *cccp*), ReLU after each.
* Global average pooling (`NIN`, head 'gap'): the last mlpconv outputs one map per class and the
  spatial mean of each map is that class's logit. The maps are the class confidence maps of the
  paper's Figure 4; they are sown as `intermediates/class_maps`.

`get_model(name, num_classes)` builds the authors' nets exactly (layer widths, kernels, pools,
dropout, ReLU after the last cccp) and the small NIN of the student's notes (made sturdier in
two places), whose layers are data in `nin_jax.architectures.MODELS`. `lr_multipliers` and
`weight_decay_mask` hold the authors' per-layer optimizer settings as data.

Layouts: images NHWC float32; conv kernels HWIO `(k, k, C_in, C_out)` for every layer, the 1×1
cccp layers included (their kernels are `(1, 1, C_in, C_out)`), biases `(C_out,)`. The
convolution layer and its fast CPU variants are in `nin_jax.convs`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nin_jax import architectures
from nin_jax.architectures import MODELS, pooled_size
from nin_jax import settings
from nin_jax.convs import Conv, Initializer


class MlpConv(nn.Module):
  """One mlpconv layer: a k×k convolution, then 1×1 "cccp" convolutions, ReLU after each.

  Attributes:
    widths: output channels of the k×k conv then of each cccp, e.g. (192, 160, 96).
    kernel_size, stride, padding: of the k×k convolution (the cccps are 1×1, stride 1).
    final_activation: ReLU after the last layer too (the authors' nets: yes).
    kernel_inits: one initializer per layer (default He normal); biases start at zero.
    conv_impl, dtype: see `nin_jax.convs.Conv`.

  Parameters are named `conv`, `cccp1`, `cccp2`, ... . Input (N, H, W, C_in), output
  (N, Ho, Wo, widths[-1]).
  """
  widths: Sequence[int]
  kernel_size: int
  stride: int = 1
  padding: int = 0
  final_activation: bool = True
  kernel_inits: Sequence[Initializer] | None = None
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inits = self.kernel_inits or [nn.initializers.he_normal()] * len(self.widths)
    for i, (width, init) in enumerate(zip(self.widths, inits, strict=True)):
      first = i == 0
      x = Conv(width,
               kernel_size=self.kernel_size if first else 1,
               stride=self.stride if first else 1,
               padding=self.padding if first else 0,
               impl=self.conv_impl, kernel_init=init, dtype=self.dtype,
               name='conv' if first else f'cccp{i}')(x)
      if i < len(self.widths) - 1 or self.final_activation:
        x = nn.relu(x)
    return x


def pool(x: jax.Array, kind: str) -> jax.Array:
  """3×3 stride-2 max or average pooling with cuda-convnet/Caffe's ceil-style output size.

  The windows that hang over the bottom/right edge are padded; max ignores the padding and
  average divides by the number of real pixels in the window (padding excluded), as Caffe does.
  """
  pads = [(0, max(0, 2 * (pooled_size(n) - 1) + 3 - n)) for n in x.shape[1:3]]
  if kind == 'max':
    return nn.max_pool(x, (3, 3), (2, 2), pads)
  if kind == 'avg':
    return nn.avg_pool(x, (3, 3), (2, 2), pads, count_include_pad=False)
  raise ValueError(f'pool kind {kind!r}: expected max or avg')


class NIN(nn.Module):
  """A Network In Network: mlpconv blocks, pools and dropout between them, then a classifier.

  Attributes:
    num_classes: C.
    widths: per block, the widths of its layers; for the 'gap' head the last one must be C.
    kernel_sizes, strides, paddings: per block, of its k×k convolution.
    pools: between consecutive blocks, 'max' or 'avg' (3×3, stride 2, ceil-style).
    dropout_after: between consecutive blocks, whether dropout follows the pool.
    dropout_rate: the paper's 0.5.
    head: 'gap' (global average pooling of the last block's C maps: the paper), 'fc'
      (flatten the last block's maps, one fully connected layer) or 'fc_dropout' (dropout before
      that layer): the Table 5 ablation.
    final_activation: ReLU after the last cccp (the authors' nets: yes).
    kernel_inits: per block, per layer initializers (None: He normal).
    conv_impl, dtype: see `nin_jax.convs.Conv`. Logits are float32 whatever the dtype.
  """
  num_classes: int
  widths: Sequence[Sequence[int]]
  kernel_sizes: Sequence[int]
  strides: Sequence[int]
  paddings: Sequence[int]
  pools: Sequence[str]
  dropout_after: Sequence[bool]
  dropout_rate: float = 0.5
  head: str = 'gap'
  final_activation: bool = True
  kernel_inits: Sequence[Sequence[Initializer]] | None = None
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    """images: (N, H, W, C_in) float32 -> logits (N, num_classes) float32.

    Dropout is active only when `train` is True (rng collection 'dropout').
    """
    problem = architectures.too_small(self.kernel_sizes, self.strides, self.paddings,
                                      min(images.shape[1:3]))
    if problem:
      raise ValueError(problem)
    x = images.astype(self.dtype)
    num_blocks = len(self.widths)
    for b in range(num_blocks):
      k, s, p = self.kernel_sizes[b], self.strides[b], self.paddings[b]
      x = MlpConv(self.widths[b], kernel_size=k, stride=s, padding=p,
                  final_activation=self.final_activation or b < num_blocks - 1,
                  kernel_inits=self.kernel_inits[b] if self.kernel_inits else None,
                  conv_impl=self.conv_impl, dtype=self.dtype, name=f'mlpconv{b + 1}')(x)
      if b < num_blocks - 1:
        x = pool(x, self.pools[b])
        if self.dropout_after[b]:
          x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    if self.head == 'gap':
      if x.shape[-1] != self.num_classes:
        raise ValueError(f'the gap head needs {self.num_classes} maps, got {x.shape[-1]}')
      self.sow('intermediates', 'class_maps', x)
      logits = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    elif self.head in ('fc', 'fc_dropout'):
      x = x.reshape(x.shape[0], -1)
      if self.head == 'fc_dropout':
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc',
                        kernel_init=nn.initializers.he_normal())(x).astype(jnp.float32)
    else:
      raise ValueError(f'head {self.head!r}: expected one of {settings.HEADS}')
    return logits


def get_model(name: str, num_classes: int, *, init: str = 'he', head: str = 'gap',
              **overrides: Any) -> NIN:
  """A net of `architectures.MODELS` for `num_classes` classes.

  Args:
    name: a key of `architectures.MODELS`.
    num_classes: C; the last cccp of a GAP net gets C maps.
    init: 'he' (He normal weights), 'paper' (the authors' Gaussian stds) or 'data' (He normal
      weights that the trainer then rescales on a batch of training images: `init_from_data`).
    head: 'gap', 'fc' or 'fc_dropout'. With the fc heads, the last cccp keeps the width of the
      layer before it (192 for CIFAR) instead of C: our reading of the paper's Table 5.
    **overrides: any other `NIN` field (e.g. widths for a tiny test net, dropout_rate, dtype,
      conv_impl, final_activation).
  """
  if name not in MODELS:
    raise ValueError(f'model {name!r}: expected one of {sorted(MODELS)}')
  if init not in settings.INITS:
    raise ValueError(f'init {init!r}: expected one of {settings.INITS}')
  if num_classes < 2:
    raise ValueError(f'num_classes={num_classes}: a classifier needs at least 2 classes')
  spec = {**MODELS[name], **overrides}
  widths = []
  for block in spec['widths']:
    row = []
    for w in block:
      if w is None:
        w = num_classes if head == 'gap' else (row[-1] if row else widths[-1][-1])
      row.append(int(w))
    widths.append(tuple(row))
  spec['widths'] = tuple(widths)
  if init == 'paper' and 'kernel_inits' not in overrides:
    spec['kernel_inits'] = tuple(
        tuple(nn.initializers.normal(stddev=s) for s in row)
        for row in architectures.paper_stds(name, widths, num_classes))
  for key in ('kernel_sizes', 'strides', 'paddings', 'pools', 'dropout_after'):
    spec[key] = tuple(spec[key])
  return NIN(num_classes=num_classes, head=head, **spec)


def init_from_data(model: NIN, params, images: jax.Array, *, class_map_std: float = 0.1,
                   class_map_mean: float = 3.0) -> Any:
  """Data-dependent init (Krähenbühl et al. 2016; LSUV, Mishkin & Matas 2016, is its per-layer
  form): fresh `params` rescaled so that every layer starts alive and centred on real `images`.

  Layer by layer, from the input up, each output channel's kernel and bias are set so that its
  pre-activation has mean 0 and standard deviation 1 over `images` (the batch and every
  position): half of every channel's ReLUs live, as batch normalization would have them at its
  start, but with nothing added to the net. Per channel, not per layer: a layer-wide scale (LSUV)
  leaves each channel's offset where the random kernel put it; on real CIFAR images that net was
  still at 2.29-2.32 after 60 steps, where this one leaves 0.9 ln 10 in 74 to over 110 steps at
  lr 0.05 (docs/recipes.md). One forward pass per layer, once per run: a layer's statistics
  depend on the layers below it, already set.

  For a 'gap' head with the ReLU on its class maps (the authors' nets), the class-map layer is
  set instead to `class_map_std` within each map and each map's mean to `class_map_mean`: far
  above zero, every class at the same logit. Why: with He init each class map starts at its own
  offset, some below zero everywhere. Those get no gradient, the others are pushed down toward
  them, and the net ends at the ReLU's zero: every logit 0, loss ln C, no gradient. Unit-scale
  maps, even started 3 stds up, were driven below zero within 30 steps on real CIFAR images (or
  diverged); maps at 0.1 stayed alive (docs/recipes.md has the figures). The fc heads' logits
  are set to `class_map_std` too, around 0: every class at the same logit.

  Args:
    model: the net; its dropout is off for these passes.
    params: its parameters from `model.init`.
    images: float32 (N, H, W, C), preprocessed training images (a batch is enough).
    class_map_std: the class maps' spread within each map.
    class_map_mean: where every class map starts (its mean).

  Returns:
    params of the same structure: every kernel scaled and every bias set per output channel.
  """
  layers = layer_paths(params)
  class_maps = layers[-1] if model.head == 'gap' and model.final_activation else None
  images = images.astype(jnp.float32)
  new = jax.tree_util.tree_map(lambda x: x, params)
  for path in layers:
    _, captured = model.apply({'params': new}, images, train=False,
                              capture_intermediates=True, mutable=['intermediates'])
    out, tree = captured['intermediates'], new
    for name in path:
      out, tree = out[name], tree[name]
    pre_activation = out['__call__'][0].astype(jnp.float32)
    axes = tuple(range(pre_activation.ndim - 1))
    mean = jnp.mean(pre_activation, axis=axes)
    std = jnp.maximum(jnp.std(pre_activation, axis=axes), 1e-12)
    target_std, target_mean = (class_map_std, class_map_mean) if path == class_maps else (1., 0.)
    if path == ('fc',):  # the fc heads' logits: every class at the same logit, as for the maps
      target_std = class_map_std
    tree['kernel'] = tree['kernel'] * (target_std / std)
    tree['bias'] = (tree['bias'] - mean) * (target_std / std) + target_mean
  return new


def model_from_config(config, **overrides: Any) -> NIN:
  """The model a run's config asks for (fields model, num_classes, init, head, dropout_rate,
  dtype, conv_impl); `overrides` replace any of those or other `NIN` fields (the benchmark's
  tiny test nets)."""
  fields = dict(init=config.init, head=config.head, dropout_rate=config.dropout_rate,
                dtype=jnp.dtype(config.dtype), conv_impl=config.conv_impl)
  return get_model(config.model, config.num_classes, **{**fields, **overrides})


def multiply_accumulates(model: NIN, image_size: int, image_channels: int = 3) -> int:
  """Multiply-accumulates of one forward pass on one image_size² image with image_channels
  channels: convolutions and the fc head; pools, ReLUs and the global average not counted."""
  size, c_in, macs = image_size, image_channels, 0
  for b, block in enumerate(model.widths):
    k, s, p = model.kernel_sizes[b], model.strides[b], model.paddings[b]
    size = (size + 2 * p - k) // s + 1
    for i, width in enumerate(block):
      macs += size * size * (k * k if i == 0 else 1) * c_in * width
      c_in = width
    if b < len(model.widths) - 1:
      size = pooled_size(size)
  if model.head != 'gap':
    macs += size * size * c_in * model.num_classes
  return macs


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


# --- The authors' per-layer optimizer settings, as data ------------------------------------------

def layer_paths(params) -> list[tuple[str, ...]]:
  """Every conv layer of a NIN's params, input first: ('mlpconv1', 'conv'), ('mlpconv1',
  'cccp1'), …, then ('fc',) for the fc heads."""
  blocks = sorted((k for k in params if k.startswith('mlpconv')), key=lambda k: int(k[7:]))
  paths = [(b, l) for b in blocks
           for l in sorted(params[b], key=lambda k: -1 if k == 'conv' else int(k[4:]))]
  return paths + ([('fc',)] if 'fc' in params else [])


def _last_cccp(params) -> tuple[str, str] | None:
  cccps = [p for p in layer_paths(params) if p[-1].startswith('cccp')]
  return cccps[-1] if cccps else None


def lr_multipliers(params) -> Any:
  """Per-leaf learning-rate multipliers, the authors' rule (docs/references.md):

  weights ×1, biases ×2, and the last cccp (both its weights and bias) ×0.1 (Caffe's
  `blobs_lr 0.1 0.1` on cccp6). A pytree of Python floats with the structure of `params`.

  The fc heads (Table 5's ablation, whose solver the authors did not publish): the fc layer,
  their classifier, gets the classifier's ×0.1 too, divided by the positions it flattens (64
  for CIFAR's 8×8 maps). A dense layer over P positions' features moves its logits about P
  times as far per SGD step as the same features averaged by global average pooling; at the
  base rate the fc nets diverged within 4 steps on real CIFAR images (loss 9.4, 1546, 15965,
  4e8), at 1/64 they oscillated (2.42, 3.97, 2.90, 4.56), at 0.1/64 they descend smoothly
  (docs/recipes.md).
  """
  last = _last_cccp(params)
  fc_scale = 1.0
  if 'fc' in params and last is not None:  # the Table 5 ablation's head
    positions = params['fc']['kernel'].shape[0] // params[last[0]][last[1]]['kernel'].shape[-1]
    fc_scale = 0.1 / positions

  def rule(path, _):
    names = tuple(getattr(k, 'key', str(k)) for k in path)
    if last is not None and names[:2] == last:
      return 0.1
    base = 2.0 if names[-1] == 'bias' else 1.0
    return base * fc_scale if names[0] == 'fc' else base

  return jax.tree_util.tree_map_with_path(rule, params)


def weight_decay_mask(params) -> Any:
  """True for weights (kernels), False for biases: no weight decay on biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', '') == 'kernel', params)
