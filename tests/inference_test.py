"""Tests of loading a finished run (nin_jax.inference) and of its two users, predict and visualize.

The run folder is built here exactly as nin_jax.train leaves it: config.json, class_names.json,
preprocessing.npz and an Orbax checkpoint of {'step', 'params', 'opt_state', 'rng'}.
"""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from experiments import default
from nin_jax import inference, models, predict, preprocessing, visualize
from nin_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ['seven', 'x', 'circle']
STEP = 7


def make_run(workdir, head='gap'):
  """A run folder of the small NIN for 28x28 grayscale images and 3 classes, randomly
  initialised, with its checkpoint at step STEP. Returns the params it saved."""
  config = default.get_config()
  config.experiment = 'tiny'
  config.num_classes = len(CLASS_NAMES)
  config.head = head
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json())
  with open(os.path.join(workdir, 'class_names.json'), 'w') as f:
    json.dump(CLASS_NAMES, f)
  rng = np.random.default_rng(0)
  train_images = rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
  preprocessing.fit_preprocessor('standardize', train_images).save(
      os.path.join(workdir, 'preprocessing.npz'))
  model = models.model_from_config(config)
  # He-normal weights and small random biases drawn with numpy from the model's shapes: the
  # same as model.init without compiling it (seconds saved on a busy CPU).
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False))['params']
  params = jax.tree.map(
      lambda s: (rng.normal(size=s.shape) * (np.sqrt(2 / np.prod(s.shape[:-1]))
                                             if len(s.shape) > 1 else 0.01)).astype(s.dtype),
      shapes)
  state = {'step': np.asarray(STEP, np.int32), 'params': params,
           'opt_state': jax.tree.map(np.zeros_like, params),
           'rng': np.array([0, 1], np.uint32)}
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')))
  mngr.save(STEP, args=ocp.args.StandardSave(state))
  mngr.wait_until_finished()
  mngr.close()
  return params


def write_images(folder):
  """Three images in other sizes and modes than the run's, a non-image, and a subfolder."""
  os.makedirs(os.path.join(folder, 'more'))
  rng = np.random.default_rng(1)
  paths = [os.path.join(folder, 'a.png'), os.path.join(folder, 'b.jpg'),
           os.path.join(folder, 'more', 'c.png')]
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[0])
  Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(paths[1])
  Image.fromarray(rng.integers(0, 256, (64, 32), dtype=np.uint8)).save(paths[2])
  with open(os.path.join(folder, 'notes.txt'), 'w') as f:
    f.write('not an image')
  return paths


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('run')
  workdir = str(root / 'tiny')
  params = make_run(workdir)
  paths = write_images(str(root / 'images'))
  return workdir, params, paths


def test_load_run_restores_the_checkpoint(run_dir):
  workdir, params, _ = run_dir
  run = inference.load_run(workdir)
  assert run.step == STEP
  assert run.class_names == CLASS_NAMES
  assert run.image_shape == (28, 28, 1)
  assert run.config.model == 'nin_small'
  assert run.preprocessor.kind == 'standardize'
  saved = jax.tree_util.tree_leaves_with_path(params)
  restored = jax.tree_util.tree_leaves_with_path(run.params)
  assert [p for p, _ in saved] == [p for p, _ in restored]
  for (_, a), (_, b) in zip(saved, restored):
    assert isinstance(b, np.ndarray)  # host arrays, whatever device saved them
    np.testing.assert_array_equal(np.asarray(a), b)


def test_predict_uses_the_runs_preprocessing(run_dir):
  workdir, _, _ = run_dir
  run = inference.load_run(workdir)
  images = np.random.default_rng(2).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  probs = run.predict(images, batch_size=2)  # a batch of 2, then one of 1
  assert probs.shape == (3, 3) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
  expected, maps = run.forward(run.preprocessor(images))
  np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
  raw, _ = run.forward(images / 255.0)
  assert not np.allclose(probs, raw, atol=1e-4)  # the standardization matters
  assert maps.shape == (3, 3, 3, 3)  # 28 -> 14 -> 7 -> 3 maps, one per class
  logits = maps.mean(axis=(1, 2))  # global average pooling
  np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), probs,
                             rtol=1e-4, atol=1e-6)
  assert probs.std() > 1e-3  # a live net, not uniform output


def damaged_copy(run_dir, tmp_path, remove=None, edit_config=None):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(run_dir[0], workdir)
  if remove:
    target = os.path.join(workdir, remove)
    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
  if edit_config:
    path = os.path.join(workdir, 'config.json')
    config = json.load(open(path))
    config.update(edit_config)
    json.dump(config, open(path, 'w'))
  return workdir


@pytest.mark.parametrize('remove, message', [
    ('checkpoints', 'no checkpoint'),
    ('config.json', 'config.json'),
    ('class_names.json', 'class_names.json'),
    ('preprocessing.npz', 'preprocessing.npz'),
])
def test_load_run_errors_name_what_is_missing(run_dir, tmp_path, remove, message):
  workdir = damaged_copy(run_dir, tmp_path, remove=remove)
  with pytest.raises(UserError, match=message):
    inference.load_run(workdir)


def test_load_run_errors_for_a_missing_or_mismatched_run(run_dir, tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    inference.load_run(str(tmp_path / 'nowhere'))
  empty = damaged_copy(run_dir, tmp_path, remove='checkpoints')
  os.makedirs(os.path.join(empty, 'checkpoints'))
  with pytest.raises(UserError, match='no finished checkpoint'):
    inference.load_run(empty)
  shutil.rmtree(empty)
  edited = damaged_copy(run_dir, tmp_path, edit_config={'model': 'nin_mnist'})
  with pytest.raises(UserError, match='does not match'):
    inference.load_run(edited)


def test_expand_image_paths(run_dir, tmp_path):
  _, _, paths = run_dir
  folder = os.path.dirname(paths[0])
  # Folders: image files only, recursively, sorted; files as given.
  assert inference.expand_image_paths([folder, paths[1]]) == sorted(paths) + [paths[1]]
  with pytest.raises(UserError, match='not found'):
    inference.expand_image_paths([os.path.join(folder, 'missing.png')])
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='no image files'):
    inference.expand_image_paths([str(tmp_path / 'empty')])


LINE = re.compile(r'^(?P<path>[^\t]+)\t(?P<name>seven|x|circle)\t(?P<prob>[01]\.\d{4})$')


def test_predict_prints_one_line_per_image(run_dir):
  workdir, _, paths = run_dir
  out = io.StringIO()
  # Batches of 2 stream: one of 2 images, then one of 1 (shapes already compiled above).
  count = predict.predict_files(workdir, [os.path.dirname(paths[0])], batch_size=2, out=out)
  lines = out.getvalue().splitlines()
  assert count == len(lines) == 3
  for line, path in zip(lines, sorted(paths)):
    match = LINE.match(line)
    assert match, line
    assert match['path'] == path
    assert 1 / 3 <= float(match['prob']) <= 1  # the top class of three
  out = io.StringIO()
  predict.predict_files(workdir, [paths[0]], top_k=3, out=out)
  fields = out.getvalue().rstrip('\n').split('\t')
  assert len(fields) == 7 and fields[0] == paths[0]
  assert sorted(fields[1::2]) == sorted(CLASS_NAMES)
  probs = [float(p) for p in fields[2::2]]
  assert probs == sorted(probs, reverse=True)
  assert sum(probs) == pytest.approx(1.0, abs=2e-4)
  assert out.getvalue().startswith(lines[0] + '\t')  # top_k only adds classes after the first


def test_predict_errors(run_dir, tmp_path):
  workdir, _, paths = run_dir
  folder = os.path.dirname(paths[0])
  with pytest.raises(UserError, match='missing.png not found'):
    predict.predict_files(workdir, [os.path.join(folder, 'missing.png')], out=io.StringIO())
  with pytest.raises(UserError, match='notes.txt: not a readable image'):
    predict.predict_files(workdir, [os.path.join(folder, 'notes.txt')], out=io.StringIO())
  with pytest.raises(UserError, match='top_k'):
    predict.predict_files(workdir, paths, top_k=0, out=io.StringIO())
  unfinished = damaged_copy(run_dir, tmp_path, remove='checkpoints')
  with pytest.raises(UserError, match='no checkpoint'):
    predict.predict_files(unfinished, paths, out=io.StringIO())


def run_cli(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_predict_cli(run_dir):
  workdir, _, paths = run_dir
  result = run_cli('nin_jax.predict', '--workdir', workdir, '--top_k', '2', *paths)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [l.split('\t')[0] for l in lines] == paths
  assert all(len(l.split('\t')) == 5 for l in lines)
  notes = os.path.join(os.path.dirname(paths[0]), 'notes.txt')
  result = run_cli('nin_jax.predict', '--workdir', workdir, paths[0], notes)
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and 'notes.txt' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def png(path):
  return np.asarray(Image.open(path).convert('RGB'))


def test_visualize_writes_the_class_maps(run_dir, tmp_path):
  workdir, _, paths = run_dir
  out = str(tmp_path / 'maps.png')
  visualize.visualize(workdir, out, [os.path.dirname(paths[0])], num_images=3, top_classes=3)
  image = png(out)
  # 3 rows of 4 panels (input + 3 maps) of 1.7 inches at 100 dpi, plus a title.
  assert 600 <= image.shape[1] <= 760 and 600 <= image.shape[0] <= 760, image.shape
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not blank
  assert image.std() > 20


def test_visualize_without_images_shows_the_test_split(run_dir, tmp_path):
  data_dir = tmp_path / 'data'
  rng = np.random.default_rng(3)
  for name in CLASS_NAMES:  # a class-per-folder dataset, 4 images a class, half held out
    (data_dir / name).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
          data_dir / name / f'{i}.png')
  workdir = damaged_copy(run_dir, tmp_path, edit_config={
      'dataset': 'folder', 'data_dir': str(data_dir), 'generate_chars': False,
      'test_fraction': 0.5, 'batch_size': 4, 'eval_batch_size': 4})
  config = inference.load_config(workdir)
  images, labels = visualize.sample_test_images(config, 3)
  assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
  assert set(labels.tolist()) <= {0, 1, 2}
  out = str(tmp_path / 'maps.png')
  visualize.visualize(workdir, out, num_images=3, top_classes=2)
  image = png(out)
  assert 450 <= image.shape[1] <= 560 and 600 <= image.shape[0] <= 760, image.shape
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_visualize_errors(run_dir, tmp_path):
  workdir, _, paths = run_dir
  out = str(tmp_path / 'maps.png')
  with pytest.raises(UserError, match='notes.txt'):
    visualize.visualize(workdir, out, [os.path.join(os.path.dirname(paths[0]), 'notes.txt')])
  with pytest.raises(UserError, match="head='fc'"):
    visualize.visualize(damaged_copy(run_dir, tmp_path, edit_config={'head': 'fc'}), out, paths)
  result = run_cli('nin_jax.visualize', '--workdir', str(tmp_path / 'nowhere'), '--out', out,
                   '--images', paths[0])
  assert result.returncode == 2
  assert result.stderr.startswith('error: ') and 'nowhere' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not os.path.exists(out)
