"""The stream's sources (nin_jax/sources.py, nin_jax/pack.py): a folder, its packed shards and a
TFDS dataset prepared as ArrayRecord from the same files give the same batches; a killed pack
reads as no dataset and resumes; a truncated shard is one line naming it; TFDS's mock data
streams through `experiments/imagenet.py`."""

import contextlib
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from conftest import REPO
from experiments import default
from experiments import imagenet
from nin_jax import input_pipeline
from nin_jax import pack
from nin_jax import sources
from nin_jax.errors import UserError

# CIFAR-10's label names are sorted, so a folder of these classes labels as TFDS's cifar10 does.
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                 'truck')


def write_cifar_folder(root, per_class=(3, 1), seed=0):
  """ROOT/train/<class>/*.png + ROOT/test/<class>/*.png: random 32x32 RGB images."""
  rng = np.random.default_rng(seed)
  for split, count in zip(('train', 'test'), per_class):
    for label, name in enumerate(CIFAR_CLASSES):
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        pixels = (rng.integers(0, 256, (32, 32, 3)) * (label + 1) // 10).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, split, name, f'{i:03d}.png'))
  return str(root)


def prepare_tfds_cifar10(folder, data_dir, file_format='array_record'):
  """TFDS's cifar10 (its features, from its own code) prepared in data_dir from the folder's
  files, in the folder listing's order (shuffling off): what `tfds.builder('cifar10')` reads."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=g-import-not-at-top

  class FromFolder(cifar.Cifar10, skip_registration=True):
    name = 'cifar10'

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, disable_shuffling=True, features=(
          tfds.features.FeaturesDict({
              'id': tfds.features.Text(), 'image': tfds.features.Image(shape=(32, 32, 3)),
              'label': tfds.features.ClassLabel(names=CIFAR_CLASSES)})))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in ('train', 'test')}

    def _generate_examples(self, split):  # pylint: disable=arguments-differ
      for label, name in enumerate(CIFAR_CLASSES):
        for file in sorted(os.listdir(os.path.join(folder, split, name))):
          path = os.path.join(folder, split, name, file)
          yield f'{split}_{name}_{file}', {'id': f'{name}/{file}', 'image': path, 'label': label}

  FromFolder(data_dir=data_dir, file_format=file_format).download_and_prepare()
  return str(data_dir)


def _config(dataset, data_dir, **overrides):
  config = default.get_config()
  config.dataset = dataset
  config.data_dir = data_dir
  config.generate_chars = False
  config.num_classes = 10
  config.image_size = 32
  config.image_channels = 3
  config.batch_size = 8
  config.eval_batch_size = 8
  config.preprocess = 'standardize'
  config.augment = 'translate_flip'
  config.input_pipeline = 'stream'
  config.stream_workers = 0
  for key, value in overrides.items():
    config[key] = value
  return config


def _batches(data, steps=3):
  with contextlib.closing(data.train_batches(0)) as batches:
    train = [next(batches) for _ in range(steps)]
  return train, list(data.eval_batches())


def _assert_same_batches(a, b):
  for batch_a, batch_b in zip(a[0] + a[1], b[0] + b[1], strict=True):
    assert batch_a.keys() == batch_b.keys()
    for key in batch_a:
      np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


@pytest.fixture(scope='module')
def cifar_folder(tmp_path_factory):
  return write_cifar_folder(tmp_path_factory.mktemp('cifar_folder'))


@pytest.fixture(scope='module')
def packed_and_tfds(cifar_folder, tmp_path_factory):
  """The folder packed (5 shards of 7 training files, one short) and as TFDS's cifar10."""
  root = tmp_path_factory.mktemp('sources')
  packed = str(root / 'packed')
  pack.pack(cifar_folder, packed, records_per_shard=7, progress=False)
  return packed, prepare_tfds_cifar10(cifar_folder, root / 'tfds')


def test_folder_packed_shards_and_tfds_array_record_give_the_same_batches(cifar_folder,
                                                                          packed_and_tfds):
  packed, tfds_dir = packed_and_tfds
  folder = input_pipeline.create_data(_config('folder', cifar_folder), process_index=0,
                                      process_count=1)
  expected = _batches(folder)
  assert expected[0][0]['label'].tolist() != [0] * 8  # the batches are shuffled
  for config in (_config('folder', packed), _config('folder', packed, stream_workers=1),
                 _config('cifar10', tfds_dir)):
    data = input_pipeline.create_data(config, process_index=0, process_count=1)
    assert data.class_names == list(CIFAR_CLASSES)
    assert (data.num_train_examples, data.num_test_examples) == (30, 10)
    _assert_same_batches(_batches(data), expected)


_WITHOUT_TENSORFLOW = """
import sys
sys.path.insert(0, 'tests')
from sources_test import _batches, _config
from nin_jax import input_pipeline
for dataset, data_dir in (('folder', sys.argv[1]), ('cifar10', sys.argv[2])):
  data = input_pipeline.create_data(_config(dataset, data_dir, stream_workers=1),
                                    process_index=0, process_count=1)
  _batches(data, steps=2)
assert 'tensorflow' not in sys.modules, 'the stream imported TensorFlow'
print('streamed without TensorFlow')
"""


def test_packed_shards_and_tfds_stream_without_importing_tensorflow(packed_and_tfds):
  done = subprocess.run([sys.executable, '-c', _WITHOUT_TENSORFLOW, *packed_and_tfds], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == 'streamed without TensorFlow'


def test_pack_index_and_records(cifar_folder, tmp_path):
  out = str(tmp_path / 'packed')
  index = pack.pack(cifar_folder, out, records_per_shard=16, progress=False)
  assert index['class_names'] == list(CIFAR_CLASSES)
  assert index['test_split'] == 'test/'
  assert index['splits']['train']['class_counts'] == [3] * 10
  assert [s['records'] for s in index['splits']['train']['shards']] == [16, 14]
  listing = sources.packed_listing(out)
  data, label = listing.train.read(4)  # the listing's order: class by class, sorted
  with open(os.path.join(cifar_folder, 'train', 'automobile', '001.png'), 'rb') as f:
    assert data == f.read()
  assert label == 1
  assert listing.train.name(4).endswith('record 4 (train/automobile/001.png)')
  assert pack.pack(cifar_folder, out, records_per_shard=16, progress=False) == index  # done already
  with pytest.raises(UserError, match='already a packed folder, of other files'):
    pack.pack(cifar_folder, out, records_per_shard=8, progress=False)
  with pytest.raises(UserError, match='exists and is not empty'):
    pack.pack(cifar_folder, cifar_folder, progress=False)


def test_a_killed_pack_is_no_dataset_and_resumes(cifar_folder, tmp_path, monkeypatch):
  out = str(tmp_path / 'packed')
  written = []
  real_write = pack._write_shard  # pylint: disable=protected-access

  def write_then_die(out, shard, *args):
    if written:
      raise KeyboardInterrupt  # killed while packing the second shard
    written.append(shard['file'])
    return real_write(out, shard, *args)

  monkeypatch.setattr(pack, '_write_shard', write_then_die)
  with pytest.raises(KeyboardInterrupt):
    pack.pack(cifar_folder, out, records_per_shard=10, workers=1, progress=False)
  monkeypatch.undo()
  with open(os.path.join(out, 'train-00001-of-00003.array_record.123.abc.tmp'), 'wb') as f:
    f.write(b'half a shard')  # what kill -9 leaves of the shard being written
  assert sorted(os.listdir(out)) == [pack.PLAN, 'train-00000-of-00003.array_record',
                                     'train-00001-of-00003.array_record.123.abc.tmp']
  config = _config('folder', out)
  with pytest.raises(UserError, match=f'holds .array_record shards but no {sources.PACK_INDEX}'):
    input_pipeline.create_data(config, process_index=0, process_count=1)
  with pytest.raises(UserError, match='unfinished pack of other files'):
    pack.pack(cifar_folder, out, records_per_shard=7, progress=False)
  pack.pack(cifar_folder, out, records_per_shard=10, progress=False)  # resumes
  assert sorted(os.listdir(out)) == [sources.PACK_INDEX, 'test-00000-of-00001.array_record'] + [
      f'train-0000{i}-of-00003.array_record' for i in range(3)]
  folder = input_pipeline.create_data(_config('folder', cifar_folder), process_index=0,
                                      process_count=1)
  resumed = input_pipeline.create_data(config, process_index=0, process_count=1)
  _assert_same_batches(_batches(resumed, steps=2), _batches(folder, steps=2))


def test_a_truncated_shard_is_one_line_naming_it(cifar_folder, tmp_path):
  out = str(tmp_path / 'packed')
  pack.pack(cifar_folder, out, records_per_shard=10, progress=False)
  shard = os.path.join(out, 'train-00001-of-00003.array_record')
  size = os.path.getsize(shard)
  os.truncate(shard, size // 2)
  config = _config('folder', out)
  with pytest.raises(UserError) as error:
    input_pipeline.create_data(config, process_index=0, process_count=1)
  message = str(error.value)
  assert message == (f'{shard}: {size // 2} bytes where the pack wrote {size}: a truncated or '
                     'changed shard; copy it again, or pack the folder again')
  with open(shard, 'r+b') as f:  # the right size, the wrong content: named when it is opened
    f.truncate(size)
    f.seek(0)
    f.write(b'\0' * size)
  with pytest.raises(UserError, match=f'^{shard}: '):
    input_pipeline.create_data(config, process_index=0, process_count=1)
  config.input_pipeline = 'host'
  with pytest.raises(UserError, match='packed folders are streamed'):
    input_pipeline.create_data(config, process_index=0, process_count=1)


def test_pack_command_line(cifar_folder, tmp_path):
  out = str(tmp_path / 'packed')
  command = [sys.executable, '-m', 'nin_jax.pack', cifar_folder, out, '--records_per_shard=20']
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith(f'packed 30 train and 10 test (test/) files of 10 classes into '
                                f'3 shards in {out} in ')
  assert '100%' in done.stderr  # the progress bar
  done = subprocess.run(command[:3] + [str(tmp_path / 'nothing'), out + '2'], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      f"error: config.data_dir={str(tmp_path / 'nothing')!r} is not a folder; point it at the "
      'image folder (ROOT/<class>/<images>)']


# --- TFDS --------------------------------------------------------------------------------------


def test_a_tfds_dataset_as_tfrecord_says_how_to_convert_it(cifar_folder, tmp_path):
  tfds_dir = prepare_tfds_cifar10(cifar_folder, tmp_path / 'tfds', file_format='tfrecord')
  with pytest.raises(UserError) as error:
    input_pipeline.create_data(_config('cifar10', tfds_dir), process_index=0, process_count=1)
  assert '\n' not in str(error.value)
  assert 'is prepared as TFRecord files, and streaming reads ArrayRecord: convert it once with ' \
      '`tfds convert_format --dataset_version_dir=' in str(error.value)
  # input_pipeline=auto reads it into memory, as before
  data = input_pipeline.create_data(_config('cifar10', tfds_dir, input_pipeline='auto'),
                                    process_index=0, process_count=1)
  assert not data.streamed and data.num_train_examples == 30


def test_a_tfds_dataset_not_prepared_says_how_to_prepare_it(tmp_path):
  with pytest.raises(UserError, match=r'^TFDS dataset cifar10 is not prepared in .* and runs '
                     'never download; prepare it once with internet'):
    input_pipeline.create_data(_config('cifar10', str(tmp_path)), process_index=0,
                               process_count=1)


def test_tfds_mock_data_streams_through_the_imagenet_config(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config()
  config.dataset = 'imagenet2012'
  config.data_dir = str(tmp_path)  # the preprocessing's statistics are cached here
  config.input_pipeline = 'auto'  # ImageNet does not fit: it streams
  config.stream_workers = 0
  config.batch_size = config.eval_batch_size = 4
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    data = input_pipeline.create_data(config, process_index=0, process_count=1)
    assert data.streamed and (data.num_train_examples, data.num_classes) == (6, 1000)
    with contextlib.closing(data.train_batches(0)) as batches:
      batch = next(batches)
    evaluated = list(data.eval_batches())
  assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.uint8
  assert batch['image'].std() > 10  # decoded photos, not the black of unreadable ones
  assert ((0 <= batch['label']) & (batch['label'] < 1000)).all()
  assert sum(b['mask'].sum() for b in evaluated) == 6
  assert not data.skipped_files
