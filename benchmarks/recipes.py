r"""Does a recipe learn real images? Trains a config on real data at several seeds.

  # the README's CIFAR-10 recipe, 10 epochs, 3 seeds, through the trainer and the folder dataset:
  python benchmarks/recipes.py train --config experiments/cifar10.py \
      --data ../shared/data/cifar10_real_train3805.npz --epochs 10 --seeds 0,1,2
  # the PyTorch reference recipe on the same split and preprocessing (pip install -e '.[bench]'):
  python benchmarks/recipes.py torch --config experiments/cifar10.py \
      --data ../shared/data/cifar10_real_train3805.npz --epochs 10 --seeds 0,1,2
  # the first steps of a config as written (its whole schedule), with the health of every layer:
  python benchmarks/recipes.py probe --config experiments/mnist.py --data digits --steps 60
  # the learning curves of those runs (train and torch lines), as docs/recipes_cifar_real.png:
  python benchmarks/recipes.py plot --results runs.jsonl --png docs/recipes_cifar_real.png

`--data` is an `.npz` with `images` uint8 (N, H, W, C), `labels` and `class_names`, a
class-per-folder tree, or `digits` (scikit-learn's 1,797 real 8×8 handwritten digits). A
stratified `--val_fraction` of it (drawn with seed 0, the same for every run) is held out and is
the "test" split of every run here. Images are resized to the config's size and channels as the
folder dataset does.

- `train`: writes the split as a folder tree and runs `nin_jax.train.train_and_evaluate` with
  the config as written but for `--epochs` (num_epochs) and the folder dataset: exactly what a
  user's `python -m nin_jax.main --config ... --config.dataset=folder` runs.
- `probe`: `nin_jax.probe`: the config's own optimizer, schedule (its full length on this
  data), init and train step, for at most `--steps` steps; every `--every` steps the share of
  live ReLUs per layer, the class maps' range, the logit scale and per-layer gradient norms on a
  fixed batch. It reports the first step where the loss (mean of the last 5 steps) is below
  `--chance_fraction` x ln C.
- `torch`: jiecaoyu/pytorch-nin-cifar10's recipe, the best-known public one for this net:
  N(0, 0.05) weights, zero biases, base rate 0.1, momentum 0.9, weight decay 1e-4 on weights,
  biases x2, the last cccp x0.1 (its step decay starts at epoch 80: constant here), batch 128,
  fed our batches (same split, preprocessing and order).

One JSON line per run goes to stdout (and `--out`, appended). Nothing here needs TensorFlow for
`.npz` or digits input, so `probe` and `torch` run on a bare-JAX accelerator host; `train` uses
the trainer, which does not import TensorFlow for these inputs either (its TensorBoard events are
written without it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from nin_jax.probe import load_config, load_images, make_data, probe, resize, split


# --- The trainer, as a user runs it ---------------------------------------------------------------

def run_trainer(config, images, labels, class_names, rows_train, rows_test) -> dict[str, Any]:
  from PIL import Image
  from nin_jax import train
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, 'data')
    for part, rows in (('train', rows_train), ('test', rows_test)):
      for i in rows:
        folder = os.path.join(root, part, class_names[labels[i]])
        os.makedirs(folder, exist_ok=True)
        image = images[i][..., 0] if images.shape[-1] == 1 else images[i]
        Image.fromarray(image).save(os.path.join(folder, f'{i:05d}.png'))
    config.dataset, config.data_dir, config.generate_chars = 'folder', root, False
    workdir = os.path.join(tmp, 'run')
    start = time.time()
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
  test = [r for r in records if 'test_accuracy' in r]
  losses = [r for r in records if 'train_loss' in r]
  spe = max(1, len(rows_train) // config.batch_size)
  return {'test_accuracy': {round(r['step'] / spe, 2): r['test_accuracy'] for r in test},
          'train_loss': {r['step']: round(r['train_loss'], 4) for r in losses},
          'seconds': round(time.time() - start, 1)}


# --- The PyTorch reference ------------------------------------------------------------------------

def run_torch(config, data, epochs: int) -> dict[str, Any]:
  import jax
  import torch
  from benchmarks.compare_pytorch import torch_nin
  from nin_jax import device_input, models
  torch.manual_seed(config.seed)
  torch.set_num_threads(os.cpu_count() or 1)
  model = models.get_model(config.model, data.num_classes, dropout_rate=config.dropout_rate)
  net = torch_nin(model, data.image_shape[-1])
  convs = [m for m in net if isinstance(m, torch.nn.Conv2d)]
  for m in convs:
    torch.nn.init.normal_(m.weight, 0.0, 0.05)
    torch.nn.init.zeros_(m.bias)
  base = 0.1
  groups = []
  for i, m in enumerate(convs):
    last = i == len(convs) - 1
    groups.append({'params': [m.weight], 'lr': base * (0.1 if last else 1.0),
                   'weight_decay': 1e-4})
    groups.append({'params': [m.bias], 'lr': base * (0.1 if last else 2.0), 'weight_decay': 0.0})
  opt = torch.optim.SGD(groups, lr=base, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  spe = data.steps_per_epoch
  total = int(round(epochs * spe))
  # Our batches as the train and eval steps make them (preprocessed; translated and mirrored).
  statistics = device_input.put_on_devices(
      data, jax.sharding.SingleDeviceSharding(jax.devices()[0]), dataset=False)
  make_train, make_eval = (jax.jit(f) for f in device_input.batch_makers(data))
  made = lambda make, batch: jax.device_get(make(batch, statistics))
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  accuracy, losses = {}, {}
  start = time.time()
  for step in range(total):
    batch = made(make_train, data.train_batch(step))
    net.train()
    opt.zero_grad()
    loss = loss_fn(net(to_torch(batch['image'])), torch.from_numpy(batch['label']).long())
    loss.backward()
    opt.step()
    losses[step + 1] = round(loss.item(), 4)
    if (step + 1) % spe == 0 or step + 1 == total:
      net.eval()
      correct = count = 0
      with torch.no_grad():
        for b in map(functools.partial(made, make_eval), data.eval_batches()):
          pred = net(to_torch(b['image'])).argmax(1).numpy()
          correct += int(np.sum((pred == b['label']) & b['mask']))
          count += int(b['mask'].sum())
      accuracy[round((step + 1) / spe, 2)] = correct / count
  return {'test_accuracy': accuracy, 'train_loss': {k: v for k, v in losses.items()
                                                    if k % 10 == 0 or k == total},
          'seconds': round(time.time() - start, 1)}


# --- The learning-curve figure ----------------------------------------------------------------

def plot_curves(lines: list[dict[str, Any]], path: str, title: str) -> None:
  """Held-out accuracy per epoch of every `train` and `torch` line, one colour per recipe."""
  from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
  fig = Figure(figsize=(7, 4.2), dpi=120)
  ax = fig.add_subplot()
  colours = {}
  for line in lines:
    if line['mode'] not in ('train', 'torch'):
      continue
    label = (f"{line['config']} {' '.join(line['overrides'])}".strip()
             if line['mode'] == 'train' else 'PyTorch reference (jiecaoyu recipe)')
    colour = colours.setdefault(label, f'C{len(colours)}')
    epochs = [float(e) for e in line['test_accuracy']]
    ax.plot(epochs, [100 * a for a in line['test_accuracy'].values()], color=colour, marker='o',
            markersize=3, label=label if label not in ax.get_legend_handles_labels()[1] else None)
  ax.axhline(10, color='grey', linestyle=':', linewidth=1)
  ax.set_xlabel('epoch')
  ax.set_ylabel('held-out accuracy (%)')
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


# --- Command line ---------------------------------------------------------------------------------

def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('mode', choices=('train', 'probe', 'torch', 'plot'))
  p.add_argument('--config', help='an experiment file, e.g. experiments/cifar10.py')
  p.add_argument('--data', help="an .npz, a class-per-folder tree, or 'digits'")
  p.add_argument('--seeds', default='0', help='comma-separated config.seed values')
  p.add_argument('--epochs', type=int, default=None, help='num_epochs (train, torch)')
  p.add_argument('--steps', type=int, default=60, help='probe: steps to run at most')
  p.add_argument('--every', type=int, default=0,
                 help='probe: health every N steps (0: none, and stop once below chance)')
  p.add_argument('--chance_fraction', type=float, default=0.9)
  p.add_argument('--val_fraction', type=float, default=0.2)
  p.add_argument('--set', action='append', default=[], metavar='FIELD=JSON',
                 help='a config override, e.g. --set learning_rate=0.05 (repeatable)')
  p.add_argument('--out', default=None, help='append the JSON lines to this file')
  p.add_argument('--results', action='append', default=[],
                 help='plot: a JSON-lines file of train/torch runs (repeatable)')
  p.add_argument('--png', default='docs/recipes_cifar_real.png', help='plot: the figure to write')
  p.add_argument('--title', default='Real CIFAR-10 subset: 3,042 train / 763 held out')
  args = p.parse_args(argv)
  if args.mode == 'plot':
    lines = []
    for path in args.results:
      with open(path) as f:
        lines += [json.loads(l) for l in f if l.strip()]
    plot_curves(lines, args.png, args.title)
    return
  if not args.config or not args.data:
    p.error(f'{args.mode} needs --config and --data')

  from nin_jax import runtime
  runtime.keep_freed_memory()  # as nin_jax.main does, before JAX's first computation
  images, labels, class_names = load_images(args.data)
  rows_train, rows_test = split(labels, args.val_fraction)
  for seed in (int(s) for s in args.seeds.split(',')):
    config = load_config(args.config, seed, args.set, args.epochs)
    if args.mode == 'train':
      result = run_trainer(config, resize(images, config.image_size, config.image_channels),
                           labels, class_names, rows_train, rows_test)
    else:
      data = make_data(config, images, labels, class_names, rows_train, rows_test)
      result = (probe(config, data, args.steps, args.every, args.chance_fraction)
                if args.mode == 'probe' else run_torch(config, data, args.epochs or 10))
    line = {'mode': args.mode, 'config': os.path.relpath(args.config, ROOT),
            'data': os.path.basename(args.data), 'seed': seed, 'overrides': args.set,
            'num_train': len(rows_train), 'num_test': len(rows_test), **result}
    text = json.dumps(line)
    print(text, flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(text + '\n')


if __name__ == '__main__':
  main()
