"""Loading a finished run for inference: the one place that reads a run folder's model.

A run folder (written by `nin_jax.train`; its files are named in `nin_jax.run_files`) holds
`config.json`, `class_names.json`, `preprocessing.npz` and `checkpoints/` (an Orbax
`CheckpointManager` folder, one step per subfolder, each a single item `{'step', 'params',
'opt_state', 'nonfinite_step'}`). `load_run` gives a
`Run`: the model, its latest parameters, the run's own preprocessing and class names, and jitted
`predict`/`forward` functions. Used by `nin_jax.predict` and `nin_jax.visualize`.

  run = inference.load_run('runs/chars')
  probs = run.predict(images_uint8)          # (N, H, W, C) uint8 -> (N, num_classes) float32
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nin_jax import datasets, models, preprocessing, run_files, settings
from nin_jax.errors import UserError

# What `expand_image_paths` picks up inside folders (what Pillow reads; case-insensitive).
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm',
                    '.pgm', '.pbm')


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained model ready for inference.

  Attributes:
    workdir: the run folder.
    config: the run's config (`config.json`).
    model: the Flax module, `models.model_from_config(config)`.
    params: its parameters at `step`, numpy arrays on the host.
    class_names: one name per label, index = label.
    preprocessor: the run's fitted preprocessing, (N, H, W, C) uint8 -> float32.
    step: the training step of the restored checkpoint.
  """
  workdir: str
  config: ml_collections.ConfigDict
  model: Any
  params: Any
  class_names: list[str]
  preprocessor: Any
  step: int

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params}

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images the model takes."""
    c = self.config
    return (int(c.image_size), int(c.image_size), int(c.image_channels))

  def forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Preprocessed images (N, H, W, C) float32 -> (probabilities (N, num_classes) float32,
    class confidence maps (N, h, w, C_last) float32, or None when the model sows none)."""
    probs, maps = _forward(self.model, self.variables, jnp.asarray(images, jnp.float32))
    return np.asarray(probs), (None if maps is None else np.asarray(maps, np.float32))

  def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Raw images (N, H, W, C) uint8 -> class probabilities (N, num_classes) float32.

    Runs the run's own preprocessing, then the model in batches of at most `batch_size`; a
    short batch is padded to the next power of two so that few shapes get compiled.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(f'expected images of shape (N, {self.image_shape}), got {images.shape}')
    out = []
    for start in range(0, len(images), batch_size):
      chunk = self.preprocessor(images[start:start + batch_size])
      n = len(chunk)
      padded = min(batch_size, 1 << (n - 1).bit_length())
      chunk = np.concatenate([chunk, np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(_probabilities(self.model, self.variables, jnp.asarray(chunk)))[:n])
    if not out:
      return np.zeros((0, len(self.class_names)), np.float32)
    return np.concatenate(out)


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model, variables, images):
  return jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, images):
  logits, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  return jax.nn.softmax(logits, axis=-1), _find_sown(state.get('intermediates', {}), 'class_maps')


def _find_sown(tree: Any, name: str) -> Any:
  """The first value sown under `name` anywhere in an intermediates tree, or None."""
  if not isinstance(tree, dict):
    return None
  if name in tree:
    return tree[name][0]
  for value in tree.values():
    found = _find_sown(value, name)
    if found is not None:
      return found
  return None


# --- Loading ------------------------------------------------------------------------------------

def _read_json(path: str, what: str) -> Any:
  if not run_files.path(path).is_file():
    raise UserError(f'{path} not found: {what}')
  try:
    return run_files.read_json(path)
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not readable JSON ({e}); is the run folder damaged?') from None


def _tuples(value: Any) -> Any:
  """JSON has no tuples: turn the lists of config.json back into the config's tuples."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's `config.json` as a ConfigDict (lists back to tuples)."""
  path = os.path.join(workdir, run_files.CONFIG)
  data = _read_json(path, f'{workdir} is not a run folder (train writes config.json first)')
  if not isinstance(data, dict):
    raise UserError(f'{path} holds {type(data).__name__}, not a config object')
  return ml_collections.ConfigDict(_tuples(data))


def restore_latest_params(checkpoint_dir: str) -> tuple[int, Any]:
  """(step, params) of the latest checkpoint in `checkpoint_dir`, params as numpy arrays.

  Only the params are read (not the optimizer state), each leaf as a host numpy array whatever
  devices or sharding the run saved it with: so a run trained on GPUs or TPUs loads on a laptop.
  """
  import orbax.checkpoint as ocp  # Heavy; only the commands that restore pay for it.

  if not run_files.path(checkpoint_dir).is_dir():
    raise UserError(f'{checkpoint_dir} not found: the run has saved no checkpoint yet '
                    '(train writes one every checkpoint_every_steps steps and at the end)')
  # Train saves with StandardSave, whose files are PyTree checkpoints; naming the handler lets
  # a fresh manager read the item's metadata (without one it knows no handler yet).
  mngr = ocp.CheckpointManager(run_files.absolute(checkpoint_dir),
                               item_handlers=ocp.PyTreeCheckpointHandler())
  try:
    step = mngr.latest_step()
    if step is None:
      raise UserError(f'{checkpoint_dir} holds no finished checkpoint: let the run save one '
                      '(checkpoint_every_steps) or wait for it to end')
    metadata = mngr.item_metadata(step)
    tree = getattr(metadata, 'tree', metadata)
    if not isinstance(tree, dict) or 'params' not in tree:
      raise UserError(f'{checkpoint_dir}/{step} has no params: not a checkpoint written by '
                      'nin_jax.train')
    # A target of host arrays, shaped from the metadata: partial_restore reads only its keys.
    item = {'params': jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree['params'])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  finally:
    mngr.close()
  return int(step), restored['params']


def load_run(workdir: str) -> Run:
  """Everything needed to run the model of a finished (or checkpointed) run folder.

  Raises:
    UserError: the folder is missing, or lacks config.json, class_names.json,
      preprocessing.npz or a checkpoint, or these disagree with each other.
  """
  if not run_files.path(workdir).is_dir():
    raise UserError(f'run folder {workdir} does not exist: pass the --workdir of a training run')
  config = load_config(workdir)
  try:
    settings.check_once(config)
  except UserError as e:
    raise UserError(f'{os.path.join(workdir, run_files.CONFIG)}: {e}') from None
  names_path = os.path.join(workdir, run_files.CLASS_NAMES)
  class_names = _read_json(names_path, 'the run folder lacks its class names; rerun training '
                           'or copy the file from the original run')
  if not isinstance(class_names, list):
    raise UserError(f'{names_path} holds {type(class_names).__name__}, not a list of names')
  if len(class_names) != config.num_classes:
    raise UserError(f'{names_path} lists {len(class_names)} class names but config.json has '
                    f'num_classes={config.num_classes}: was one of them edited?')
  pre_path = os.path.join(workdir, run_files.PREPROCESSING)
  if not run_files.path(pre_path).is_file():
    raise UserError(f'{pre_path} not found: the run folder lacks its fitted preprocessing; '
                    'rerun training or copy the file from the original run')
  preprocessor = preprocessing.Preprocessor.load(pre_path)
  step, params = restore_latest_params(os.path.join(workdir, run_files.CHECKPOINTS))
  model = models.model_from_config(config)
  _check_params(model, params, config, workdir)
  return Run(workdir=workdir, config=config, model=model, params=params,
             class_names=[str(n) for n in class_names], preprocessor=preprocessor, step=step)


def _check_params(model, params, config, workdir: str) -> None:
  """A clear error, not a shape error deep inside Flax, when the checkpoint and config differ."""
  c = config
  dummy = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.image_channels), jnp.float32)
  expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)

  def shapes(tree):
    return {jax.tree_util.keystr(k): tuple(np.shape(a))
            for k, a in jax.tree_util.tree_leaves_with_path(tree)}

  if shapes(expected['params']) != shapes(params):
    raise UserError(f'{workdir}/checkpoints does not match {workdir}/config.json (model '
                    f'{c.model!r}, num_classes {c.num_classes}): was config.json edited?')


# --- Image files ---------------------------------------------------------------------------------

def expand_image_paths(paths: Sequence[str]) -> list[str]:
  """Files as given, folders replaced by the image files inside them (recursively, sorted).

  Raises:
    UserError: a path does not exist, or a folder holds no image file.
  """
  files = []
  for path in paths:
    if run_files.path(path).is_dir():
      found = sorted(
          os.fspath(root / name)
          for root, _, names in run_files.walk(path) for name in names
          if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.'))
      if not found:
        raise UserError(f'folder {path} holds no image files ({", ".join(IMAGE_EXTENSIONS)})')
      files.extend(found)
    elif run_files.path(path).is_file():
      files.append(path)
    else:
      raise UserError(f'image {path} not found')
  return files


def load_images(paths: Sequence[str], image_shape: tuple[int, int, int],
                resize_size: int = 0) -> np.ndarray:
  """Image files -> (N, H, W, C) uint8, resized and converted as evaluation did (the run's
  config.resize_size > 0: the shorter side to it, then the centre crop).

  Raises:
    UserError: naming the first file that is not a readable image.
  """
  h, _, c = image_shape
  images = [datasets.load_image(p, h, c, resize_size=resize_size) for p in paths]
  return np.stack(images) if images else np.zeros((0,) + tuple(image_shape), np.uint8)


def quiet_logging() -> None:
  """For the command-line tools: absl's INFO lines (Orbax logs each restore) off stderr, unless
  the user asked for them with --verbosity. Warnings and errors still show."""
  from absl import flags, logging

  if 'verbosity' not in flags.FLAGS or not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]
