"""Tests for nin_jax.input_pipeline: TFDS (mocked), image folders, batches, bad input."""

import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import reference_shift
from experiments import default
from nin_jax import datasets
from nin_jax import device_input
from nin_jax import input_pipeline
from nin_jax import preprocessing
from nin_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  config = default.get_config()
  config.update(overrides)
  return config


# --- Images that carry their own id, so batches can be checked example by example -------------


def _id_image(i, shape=(8, 8, 1)):
  """uint8 image whose first two pixels spell i; the rest is noise seeded by i."""
  image = np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
  image[0, 0, 0], image[0, 1, 0] = i % 256, i // 256
  return image


def _ids(images_uint8):
  return images_uint8[:, 0, 0, 0].astype(int) + 256 * images_uint8[:, 0, 1, 0].astype(int)


def _network_batch(data, batch):
  """The batch the train (or, with a 'mask', eval) step makes of an input batch: training's
  own jitted function, on one device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  arrays = device_input.put_on_devices(data, sharding, dataset=False)
  make_train, make_eval = device_input.batch_makers(data)
  return jax.device_get(jax.jit(make_eval if 'mask' in batch else make_train)(batch, arrays))


def _arrays_data(num_train=50, num_test=13, process_index=0, process_count=1, **overrides):
  config = _config(**{'preprocess': 'none', 'augment': 'none', 'batch_size': 8,
                      'eval_batch_size': 8, **overrides})
  train = np.stack([_id_image(i, (6, 6, 1)) for i in range(num_train)])
  test = np.stack([_id_image(1000 + i, (6, 6, 1)) for i in range(num_test)])
  return input_pipeline.data_from_arrays(
      config, train_images=train, train_labels=np.arange(num_train) % 3, test_images=test,
      test_labels=np.arange(num_test) % 3, class_names=['a', 'b', 'c'],
      process_index=process_index, process_count=process_count)


def _write_class_folders(root, counts, start=0, size=8):
  """ROOT/<class>/<k>.png for each class; returns {class: [ids]}."""
  ids, next_id = {}, start
  for name, count in counts.items():
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    ids[name] = list(range(next_id, next_id + count))
    for i in ids[name]:
      Image.fromarray(_id_image(i, (size, size, 1))[..., 0]).save(folder / f'{i:05d}.png')
    next_id += count
  return ids


def _folder_config(root, **overrides):
  return _config(**{'dataset': 'folder', 'data_dir': str(root), 'image_size': 8,
                    'image_channels': 1, 'preprocess': 'none', 'augment': 'none',
                    'batch_size': 4, 'eval_batch_size': 4, **overrides})


def _create(config, **kwargs):
  return input_pipeline.create_data(config, process_index=0, process_count=1, **kwargs)


# --- Training batches ---------------------------------------------------------------------------


def test_train_batches_are_a_function_of_seed_and_step():
  data = _arrays_data(preprocess='standardize', augment='translate_flip')
  run = list(itertools.islice(data.train_batches(), 14))  # crosses two epoch boundaries
  for k in (0, 5, 6, 13):
    resumed = next(_arrays_data(preprocess='standardize',
                                augment='translate_flip').train_batches(start_step=k))
    np.testing.assert_array_equal(resumed['image'], run[k]['image'])
    np.testing.assert_array_equal(resumed['label'], run[k]['label'])
  other_seed = next(_arrays_data(preprocess='standardize', augment='translate_flip',
                                 seed=1).train_batches())
  assert not np.array_equal(other_seed['image'], run[0]['image'])
  assert run[0]['image'].shape == (8, 6, 6, 1) and run[0]['image'].dtype == np.uint8
  assert run[0]['label'].shape == (8,) and run[0]['label'].dtype == np.int32
  for k in (0, 13):  # the augmentation is drawn from (seed, step) too
    resumed = next(_arrays_data(preprocess='standardize',
                                augment='translate_flip').train_batches(start_step=k))
    np.testing.assert_array_equal(resumed['shifts'], run[k]['shifts'])
    np.testing.assert_array_equal(resumed['flips'], run[k]['flips'])
  assert run[0]['shifts'].any() and run[0]['flips'].any()


def test_each_epoch_is_a_permutation():
  data = _arrays_data()
  assert data.steps_per_epoch == 6  # 50 // 8
  epochs = [np.concatenate([_ids(data.train_batch(e * 6 + i)['image'])
                            for i in range(6)]) for e in range(2)]
  for ids in epochs:
    assert len(set(ids)) == 48 and set(ids) <= set(range(50))
  assert not np.array_equal(epochs[0], epochs[1])
  labels = data.train_batch(3)['label']
  np.testing.assert_array_equal(labels, _ids(data.train_batch(3)['image']) % 3)


def test_global_batch_does_not_depend_on_process_count():
  kwargs = dict(preprocess='standardize', augment='translate_flip', translate_pixels=2)
  whole = _arrays_data(**kwargs)
  halves = [_arrays_data(process_index=p, process_count=2, **kwargs) for p in (0, 1)]
  for step in (0, 7):
    parts = [h.train_batch(step) for h in halves]
    assert parts[0]['image'].shape == (4, 6, 6, 1)
    for key in ('image', 'label', 'shifts', 'flips'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]),
                                    whole.train_batch(step)[key])


def test_split_smaller_than_one_batch():
  data = _arrays_data(num_train=5)
  assert data.steps_per_epoch == 1
  ids = _ids(data.train_batch(0)['image'])
  assert len(ids) == 8 and set(ids) == set(range(5))


@pytest.mark.parametrize('augment, may_flip', [('translate', False), ('translate_flip', True)])
def test_augment_modes(augment, may_flip):
  data = _arrays_data(augment=augment, translate_pixels=2, batch_size=48)
  unmoved = _arrays_data(batch_size=48)
  plain = _network_batch(unmoved, unmoved.train_batch(0))['image']
  augmented = _network_batch(data, data.train_batch(0))['image']
  shifts = list(itertools.product(range(-2, 3), repeat=2))
  flipped = shifted = 0
  for a, p in zip(augmented, plain):
    candidates = {(dy, dx, f) for dy, dx in shifts for f in (False, True)
                  if np.array_equal(a, reference_shift(p, dy, dx)[:, ::-1] if f
                                    else reference_shift(p, dy, dx))}
    assert candidates, 'an augmented image is no shift (or mirror) of its source'
    flipped += all(f for _, _, f in candidates)
    shifted += all((dy, dx) != (0, 0) for dy, dx, _ in candidates)
  assert shifted > 20
  assert (flipped > 10) if may_flip else (flipped == 0)


@pytest.mark.parametrize('preprocess', ['standardize', 'gcn_zca'])
def test_host_batches_preprocessed_at_load_make_the_same_network_batches(preprocess):
  """The host path's float32 batches (the split preprocessed once by the steps' own function)
  and uint8 ones (preprocessed in the step) give the step the same batch; too large a split
  stays uint8."""
  data = _arrays_data(preprocess=preprocess, augment='translate_flip', translate_pixels=2)
  assert data.preprocesses_at_load
  for step in (0, 7):
    at_load = data.train_batch(step, preprocessed=True)
    assert at_load['image'].dtype == np.float32
    in_step = data.train_batch(step)
    assert in_step['image'].dtype == np.uint8
    np.testing.assert_allclose(_network_batch(data, at_load)['image'],
                               _network_batch(data, in_step)['image'], rtol=1e-4, atol=1e-4)
  for at_load, in_step in zip(data.eval_batches(preprocessed=True), data.eval_batches(),
                              strict=True):
    mask = in_step['mask']
    assert not at_load['image'][~mask].any()
    np.testing.assert_allclose(_network_batch(data, at_load)['image'][mask],
                               _network_batch(data, in_step)['image'][mask], rtol=1e-4,
                               atol=1e-4)


def test_a_split_too_large_to_preprocess_at_load_stays_uint8(monkeypatch):
  monkeypatch.setattr(input_pipeline, 'PREPROCESS_AT_LOAD_MAX_BYTES', 0)
  data = _arrays_data(preprocess='standardize')
  assert not data.preprocesses_at_load
  assert data.train_batch(0, preprocessed=True)['image'].dtype == np.uint8


# --- Evaluation batches -------------------------------------------------------------------------


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_sees_every_example_once(process_count):
  seen, padded = [], 0
  for p in range(process_count):
    data = _arrays_data(process_index=p, process_count=process_count)
    assert data.num_eval_batches == 2  # 13 examples, batches of 8
    batches = list(data.eval_batches())
    assert len(batches) == 2
    for batch in batches:
      assert batch['image'].shape == (8 // process_count, 6, 6, 1)
      assert batch['mask'].dtype == bool and batch['label'].dtype == np.int32
      seen.extend(_ids(batch['image'][batch['mask']]))
      np.testing.assert_array_equal(batch['label'][batch['mask']],
                                    (_ids(batch['image'][batch['mask']]) - 1000) % 3)
      assert not batch['image'][~batch['mask']].any()
      padded += int((~batch['mask']).sum())
  assert sorted(seen) == list(range(1000, 1013))
  assert padded == 3


# --- Preprocessing statistics -------------------------------------------------------------------


def test_gcn_zca_is_fitted_on_train_cached_and_reused(tmp_path, monkeypatch):
  config = _config(preprocess='gcn_zca', augment='none', batch_size=8, eval_batch_size=8)
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
  test = rng.integers(0, 128, (20, 4, 4, 3), dtype=np.uint8)

  def build(train_images):
    return input_pipeline.data_from_arrays(
        config, train_images=train_images, train_labels=np.zeros(len(train_images)),
        test_images=test, test_labels=np.zeros(20), class_names=['a', 'b'], process_index=0,
        process_count=1, cache_dir=str(tmp_path / 'cache'), dataset='toy/set')

  data = build(train)
  cached = os.listdir(tmp_path / 'cache')
  assert len(cached) == 1 and cached[0].startswith('toy_set_gcn_zca_4x4x3_')
  reference = preprocessing.fit_preprocessor('gcn_zca', train)
  eval_images = _network_batch(data, next(data.eval_batches()))['image']
  np.testing.assert_allclose(eval_images, reference(test[:8]), atol=1e-4)
  own = preprocessing.fit_preprocessor('gcn_zca', test)(test[:8])
  assert np.abs(own - eval_images).max() > 0.1  # not the test split's own statistics

  def no_refit(*args):
    raise AssertionError('refitted although the statistics are cached')
  monkeypatch.setattr(preprocessing, 'fit_preprocessor', no_refit)
  again = build(train)
  np.testing.assert_array_equal(again.preprocessor.whitening, data.preprocessor.whitening)
  with pytest.raises(AssertionError, match='refitted'):  # other images: the cache is not used
    build(train[:-1])


# --- TFDS (mocked: nothing is downloaded) -------------------------------------------------------

_TFDS_CASES = {
    # dataset: (config overrides, expected image shape, class count, a few class names)
    # (CIFAR's label names come from the prepared files; mocked, TFDS numbers them.)
    'cifar10': (dict(image_size=8, image_channels=3, preprocess='gcn_zca',
                     augment='translate_flip'), (8, 8, 3), 10, {0: '0', 9: '9'}),
    'cifar100': (dict(image_size=32, image_channels=1, preprocess='standardize'), (32, 32, 1),
                 100, {99: '99'}),
    'svhn_cropped': (dict(image_size=32, image_channels=3, preprocess='lcn'), (32, 32, 3), 10,
                     {0: '0', 9: '9'}),
    'mnist': (dict(image_size=28, image_channels=1, preprocess='none'), (28, 28, 1), 10,
              {3: '3'}),
    'emnist/byclass': (dict(image_size=28, image_channels=1, preprocess='standardize'),
                       (28, 28, 1), 62, {0: '0', 10: 'A', 35: 'Z', 36: 'a', 61: 'z'}),
}


@pytest.mark.parametrize('dataset', sorted(_TFDS_CASES))
def test_tfds_datasets(tmp_path, dataset):
  overrides, shape, num_classes, names = _TFDS_CASES[dataset]
  config = _config(dataset=dataset, data_dir=str(tmp_path), num_classes=num_classes,
                   batch_size=8, eval_batch_size=16, augment='translate')
  config.update(overrides)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    data = _create(config)
  assert data.image_shape == shape and data.num_classes == num_classes
  assert all(data.class_names[i] == name for i, name in names.items())
  assert data.num_train_examples == 24 and data.num_test_examples == 24
  assert data.train_images_uint8.shape == (24, *shape)
  assert data.train_images_uint8.dtype == np.uint8
  batch = data.train_batch(0)
  assert batch['image'].shape == (8, *shape) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and 0 <= batch['label'].min()
  assert batch['label'].max() < num_classes
  batches = list(data.eval_batches())
  assert [b['image'].shape for b in batches] == [(16, *shape)] * 2
  assert sum(b['mask'].sum() for b in batches) == 24
  inputs = data.preprocessor(data.train_images_uint8)
  assert np.isfinite(inputs).all()
  kind = config.preprocess
  if kind == 'none':
    assert inputs.min() >= 0 and inputs.max() <= 1 and inputs.max() > 0.9
  elif kind == 'standardize':
    np.testing.assert_allclose(inputs.mean(axis=(0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(inputs.std(axis=(0, 1, 2)), 1, atol=1e-3)
  elif kind == 'gcn_zca':
    np.testing.assert_allclose(inputs.mean(axis=0), 0, atol=1e-3)
    assert inputs.std() > 0.1
  elif kind == 'lcn':
    assert 0.05 < inputs.std() < 5 and np.abs(inputs).max() < 50


def _fixed_tfds(images, labels, seen_splits=None):
  """An as_dataset_fn for tfds.testing.mock_data that serves these exact examples."""
  def as_dataset(self, split, *args, **kwargs):
    del self, args, kwargs
    if seen_splits is not None:
      seen_splits.append(split)
    return tf.data.Dataset.from_tensor_slices(
        {'image': images, 'label': labels.astype(np.int64),
         'id': np.array(['x'] * len(labels))})
  return as_dataset


def test_emnist_is_transposed_to_upright():
  image = np.zeros((1, 28, 28, 1), np.uint8)
  image[0, 2, 20] = 255  # TFDS row 2, column 20
  config = _config(dataset='emnist/byclass', data_dir='', num_classes=62, batch_size=2,
                   eval_batch_size=2)
  with tfds.testing.mock_data(as_dataset_fn=_fixed_tfds(image, np.array([5])),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    data = _create(config)
  upright = data.train_images_uint8[0, :, :, 0]
  assert upright[20, 2] == 255 and upright.sum() == 255


@pytest.mark.parametrize('extra, expected', [(True, 'train+extra'), (False, 'train')])
def test_svhn_extra(extra, expected):
  seen = []
  images = np.zeros((4, 32, 32, 3), np.uint8)
  config = _config(dataset='svhn_cropped', data_dir='', num_classes=10, image_size=32,
                   image_channels=3, preprocess='none', svhn_extra=extra, batch_size=2,
                   eval_batch_size=2)
  with tfds.testing.mock_data(as_dataset_fn=_fixed_tfds(images, np.arange(4), seen),
                              policy=tfds.testing.MockPolicy.USE_CODE):
    _create(config)
  assert seen == [expected, 'test']


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
  config = _config(dataset='cifar10', data_dir=str(tmp_path), num_classes=10, image_size=32,
                   image_channels=3)
  start = time.time()
  with pytest.raises(UserError, match=r"download_and_prepare\(\)") as error:
    _create(config)
  assert time.time() - start < 20  # no network attempt
  message = str(error.value)
  assert 'cifar10' in message and str(tmp_path) in message and '\n' not in message


def test_tfds_data_dir_missing(tmp_path):
  config = _config(dataset='mnist', data_dir=str(tmp_path / 'nope'), num_classes=10)
  with pytest.raises(UserError, match='nope'):
    _create(config)


def test_tfds_num_classes_mismatch(tmp_path):
  config = _config(dataset='mnist', data_dir=str(tmp_path), num_classes=62)
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(UserError, match='config.num_classes=62.*10'):
      _create(config)


# --- The folder dataset -------------------------------------------------------------------------


def test_folder_held_out_split_is_stratified_disjoint_and_deterministic(tmp_path):
  ids = _write_class_folders(tmp_path, {'b': 10, 'a': 20, 'c': 7})
  config = _folder_config(tmp_path, num_classes=3, test_fraction=0.2)
  data = _create(config)
  assert data.class_names == ['a', 'b', 'c']
  train_ids, test_ids = _ids(data.train_images_uint8), _ids(data.test_images_uint8)
  assert not set(train_ids) & set(test_ids)
  assert sorted([*train_ids, *test_ids]) == list(range(37))
  for label, name in enumerate(data.class_names):
    expected_test = {'a': 4, 'b': 2, 'c': 1}[name]
    assert set(test_ids[data.test_labels == label]) <= set(ids[name])
    assert set(train_ids[data.train_labels == label]) <= set(ids[name])
    assert (data.test_labels == label).sum() == expected_test
  again = _create(config)
  np.testing.assert_array_equal(again.test_images_uint8, data.test_images_uint8)
  np.testing.assert_array_equal(again.train_images_uint8, data.train_images_uint8)


def test_folder_train_test_layout_mixed_formats_sizes_and_modes(tmp_path):
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name in ('cat', 'dog'):
      folder = tmp_path / split / name
      folder.mkdir(parents=True)
      Image.fromarray(rng.integers(0, 256, (28, 28), np.uint8)).save(folder / 'gray.png')
      Image.fromarray(rng.integers(0, 256, (30, 41, 3), np.uint8)).save(folder / 'rgb.jpg')
      Image.new('RGB', (5, 5), (10, 200, 30)).save(folder / 'small.bmp')
      Image.new('P', (16, 16), 3).save(folder / 'palette.gif')
      Image.new('RGBA', (20, 12), (0, 0, 0, 0)).save(folder / 'alpha.png')
      Image.fromarray(np.full((9, 9), 40000, np.uint16)).save(folder / 'deep.png')
  (tmp_path / 'test' / 'dog' / 'extra.png').write_bytes(
      (tmp_path / 'train' / 'dog' / 'gray.png').read_bytes())
  config = _folder_config(tmp_path, num_classes=2, image_size=12, image_channels=3)
  data = _create(config)
  assert data.class_names == ['cat', 'dog']
  assert data.train_images_uint8.shape == (12, 12, 12, 3)
  assert data.test_images_uint8.shape == (13, 12, 12, 3)
  np.testing.assert_array_equal(data.test_labels, [0] * 6 + [1] * 7)
  alpha = data.train_images_uint8[0]  # files sorted: alpha.png first
  assert (alpha == 255).all()  # transparent -> white
  batch = next(data.eval_batches())
  assert batch['image'].shape == (4, 12, 12, 3)


def test_folder_ignores_hidden_and_system_files(tmp_path):
  _write_class_folders(tmp_path, {'x': 3, 'y': 3})
  for junk in ('.DS_Store', 'x/.DS_Store', 'x/._00000.png', 'y/Thumbs.db', 'desktop.ini'):
    (tmp_path / junk).write_bytes(b'\x00junk')
  (tmp_path / '.hidden_class').mkdir()
  (tmp_path / 'y' / '.git').mkdir()
  (tmp_path / 'y' / '.git' / 'HEAD').write_text('ref')
  data = _create(_folder_config(tmp_path, num_classes=2))
  assert data.class_names == ['x', 'y']
  assert data.num_train_examples + data.num_test_examples == 6


def test_folder_bad_file_stops_or_is_skipped(tmp_path, caplog):
  _write_class_folders(tmp_path, {'x': 4, 'y': 4})
  (tmp_path / 'x' / 'zz_notes.txt').write_text('hello')
  _write_class_folders(tmp_path / 'big', {'y': 1}, size=64)  # big enough to cut its pixels
  good = (tmp_path / 'big' / 'y' / '00000.png').read_bytes()
  (tmp_path / 'y' / 'zz_cut.png').write_bytes(good[:len(good) // 2])
  shutil.rmtree(tmp_path / 'big')
  with pytest.raises(UserError, match=r'zz_notes\.txt.*1 more.*skip_bad_files'):
    _create(_folder_config(tmp_path, num_classes=2))
  with caplog.at_level(logging.WARNING):
    data = _create(_folder_config(tmp_path, num_classes=2, skip_bad_files=True))
  assert data.num_train_examples + data.num_test_examples == 8
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert sum('zz_notes.txt' in w for w in warnings) == 1
  assert sum('zz_cut.png' in w for w in warnings) == 1


@pytest.mark.parametrize('setup, pattern', [
    (lambda root: (root / 'y').mkdir(), r'y: empty class folder'),
    (lambda root: ((root / 'y').mkdir(), (root / 'y' / '.DS_Store').write_text('-')),
     r'y: empty class folder'),
    (lambda root: None, r'found 1 class folder'),
    (lambda root: (root / 'train').mkdir(), r'train/ folder but no test/'),
])
def test_folder_bad_layouts(tmp_path, setup, pattern):
  _write_class_folders(tmp_path, {'x': 3})
  setup(tmp_path)
  with pytest.raises(UserError, match=pattern):
    _create(_folder_config(tmp_path, num_classes=2))


def test_folder_test_class_unknown_to_train(tmp_path):
  _write_class_folders(tmp_path / 'train', {'a': 2, 'b': 2})
  _write_class_folders(tmp_path / 'test', {'a': 1, 'q': 1}, start=10)
  with pytest.raises(UserError, match=r'test/q: class not in'):
    _create(_folder_config(tmp_path, num_classes=2))


def test_folder_missing_root_and_num_classes(tmp_path):
  with pytest.raises(UserError, match='no_such_folder'):
    _create(_folder_config(tmp_path / 'no_such_folder', num_classes=2))
  _write_class_folders(tmp_path, {'a': 2, 'b': 2, 'c': 2})
  with pytest.raises(UserError, match=r'config.num_classes=62 .* has 3 classes'):
    _create(_folder_config(tmp_path, num_classes=62))


def test_batch_size_must_split_over_processes(tmp_path):
  _write_class_folders(tmp_path, {'a': 2, 'b': 2})
  # A programming error here: a run's parallel.check_batch_size refuses the setting first.
  with pytest.raises(ValueError, match='batch_size=5'):
    input_pipeline.create_data(_folder_config(tmp_path, num_classes=2, batch_size=5),
                               process_index=0, process_count=2)


def test_imagenet_loads_when_small_and_stops_clearly_when_too_big(tmp_path, monkeypatch):
  config = _config(dataset='imagenet2012', num_classes=1000, data_dir=str(tmp_path),
                   image_size=16, image_channels=3, batch_size=4, eval_batch_size=4)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    data = _create(config)
    assert data.num_train_examples == 6 and data.image_shape == (16, 16, 3)
    monkeypatch.setattr(datasets, 'IN_MEMORY_MAX_BYTES', 1000)
    with pytest.raises(UserError, match='does not fit this in-memory pipeline'):
      _create(config)


_FIT_AT_ONCE = r'''
import hashlib, sys, time
import numpy as np
from nin_jax import preprocessing
cache_dir, start_at, index = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
fit = preprocessing.fit_preprocessor
def fit_differently(kind, images):  # as hosts may: the same recipe, other float roundings
  fitted = fit(kind, images)
  fitted.whitening = fitted.whitening * (1 + 1e-6 * index)
  return fitted
preprocessing.fit_preprocessor = fit_differently
images = np.random.default_rng(0).integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
time.sleep(max(0.0, start_at - time.time()))
got = preprocessing.fit_or_load_preprocessor('gcn_zca', images, cache_dir, 'shared')
print(hashlib.sha256(np.ascontiguousarray(got.whitening).tobytes()).hexdigest())
'''


def test_processes_sharing_the_statistics_cache_agree_and_never_see_a_torn_file(tmp_path):
  """Four processes fit the same gcn_zca statistics into one cache at the same moment (the
  hosts of a pod on one bucket): all end with the statistics of the one file left there."""
  cache_dir = tmp_path / 'cache'
  start_at = time.time() + 8  # after every process has imported JAX
  procs = [subprocess.Popen([sys.executable, '-c', _FIT_AT_ONCE, str(cache_dir), str(start_at),
                             str(i)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
           for i in range(4)]
  outputs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-1500:] for _, err in outputs]
  digests = {out.strip().splitlines()[-1] for out, _ in outputs}
  files = os.listdir(cache_dir)
  assert len(files) == 1 and files[0].endswith('.npz'), files  # no temporary file left behind
  cached = preprocessing.Preprocessor.load(cache_dir / files[0])
  assert digests == {hashlib.sha256(np.ascontiguousarray(cached.whitening).tobytes()).hexdigest()}
