"""The nets of the paper, and the small NIN of the student notes that started this project,
as data.

`MODELS` maps a model name (config.model) to the fields of its `nin_jax.models.NIN`: the
authors' layer widths, kernels, strides, paddings, pools and dropout, exactly. Plain Python and
no JAX, so that `nin_jax.settings` checks a model name, and whether a net accepts an image size,
before JAX loads; `nin_jax.models` builds the nets from it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def pooled_size(size: int) -> int:
  """Output size of the authors' 3×3 stride-2 pools: ceil-style, 32→16→8, 28→14→7."""
  return max(1, math.ceil((size - 3) / 2) + 1)


# `None` in `widths` stands for the number of classes (the last cccp of a GAP net). `paper_stds`
# are the authors' Gaussian init stds per layer (docs/references.md): cuda-convnet
# uses 0.05 for every CIFAR-10 weight, and its CIFAR-100 definition changes conv1 to 0.001 and
# cccp1/2 to 0.01 (applied below when num_classes == 100). The SVHN and MNIST definitions are
# "coming soon" in the authors' folder and ImageNet's Caffe init is not in our sources: those get
# 0.05 too; every paper config uses init='data' (docs/recipes.md).

_CIFAR = dict(kernel_sizes=(5, 5, 3), strides=(1, 1, 1), paddings=(2, 2, 1),
              widths=((192, 160, 96), (192, 192, 192), (192, 192, None)),
              pools=('max', 'max'), dropout_after=(True, True))

MODELS: dict[str, dict[str, Any]] = {
    # The authors' cuda-convnet CIFAR-10/100 net: 966,986 parameters with 10 classes.
    'nin_cifar': _CIFAR,
    # The Caffe Model Zoo "NIN CIFAR10": identical but for an average second pool.
    'nin_cifar_caffe': dict(_CIFAR, pools=('max', 'avg')),
    'nin_svhn': dict(kernel_sizes=(5, 5, 5), strides=(1, 1, 1), paddings=(2, 2, 2),
                     widths=((128, 96, 64), (320, 256, 128), (384, 256, None)),
                     pools=('max', 'max'), dropout_after=(True, True)),
    'nin_mnist': dict(kernel_sizes=(5, 5, 5), strides=(1, 1, 1), paddings=(2, 2, 2),
                      widths=((96, 64, 48), (128, 96, 48), (128, 96, None)),
                      pools=('max', 'max'), dropout_after=(True, True)),
    # The Caffe Model Zoo ImageNet NIN, 224×224: 54→27→13→6 maps, then a 6×6 average = GAP.
    'nin_imagenet': dict(kernel_sizes=(11, 5, 3, 3), strides=(4, 1, 1, 1), paddings=(0, 2, 1, 1),
                         widths=((96, 96, 96), (256, 256, 256), (384, 384, 384),
                                 (1024, 1024, None)),
                         pools=('max', 'max', 'max'), dropout_after=(False, False, True)),
    # The second Keras model of the student's notes and d2l.ai's NiN: the ImageNet shape (four
    # mlpconvs, three pools, dropout only before the last block) sized for 28×28 grayscale and a
    # laptop: 28→14→7→3 maps, 5×5 then 3×3 kernels at stride 1 (an 11×11/4 first layer would
    # leave nothing of 28 pixels), widths 32/64/128 so a CPU trains the 62 characters in minutes
    # (about 21M multiply-accumulates per image). Two changes from both, so that it trains at every seed
    # and with few classes (docs/benchmarks.md, "Sturdy recipes", has the runs):
    # - their last block has C maps in all three layers; here, as in the authors' nets (CIFAR
    #   192-192-C, ImageNet 1024-1024-1000), only the last cccp has C: with few classes a
    #   C-wide hidden layer can lose every live ReLU, and the net ends at chance.
    # - no ReLU on the class maps (`final_activation=False`), a reported fix for nets stuck at
    #   chance (docs/references.md): a class whose map is below zero at every position gets no
    #   gradient and is never predicted again, which small maps (2×2 for 16×16 digits) make
    #   common. The authors' nets keep theirs.
    'nin_small': dict(kernel_sizes=(5, 5, 3, 3), strides=(1, 1, 1, 1), paddings=(2, 2, 1, 1),
                      widths=((32, 32, 32), (64, 64, 64), (128, 128, 128), (128, 128, None)),
                      pools=('max', 'max', 'max'), dropout_after=(False, False, True),
                      final_activation=False),
}


def paper_stds(name: str, widths: Sequence[Sequence[int]], num_classes: int) -> list[list[float]]:
  stds = [[0.05] * len(w) for w in widths]
  if name in ('nin_cifar', 'nin_cifar_caffe') and num_classes == 100:
    stds[0] = [0.001, 0.01, 0.01]
  return stds


def too_small(kernel_sizes: Sequence[int], strides: Sequence[int], paddings: Sequence[int],
              image_size: int) -> str | None:
  """Why a net with these blocks cannot take image_size² images (a block whose k×k kernel is
  larger than its padded input), or None when it can."""
  sizes = [image_size]
  for b, (k, s, p) in enumerate(zip(kernel_sizes, strides, paddings, strict=True)):
    if sizes[-1] + 2 * p < k:
      return (f'input of {image_size}x{image_size} pixels is too small for this model: block '
              f'{b + 1} gets {sizes[-1]}x{sizes[-1]} maps but has a {k}x{k} kernel; use a larger '
              'image_size or a model made for small images (e.g. nin_small)')
    size = (sizes[-1] + 2 * p - k) // s + 1
    sizes.append(pooled_size(size))
  return None


def model_too_small(name: str, image_size: int) -> str | None:
  """`too_small` for the net `name` of `MODELS`."""
  spec = MODELS[name]
  return too_small(spec['kernel_sizes'], spec['strides'], spec['paddings'], image_size)
