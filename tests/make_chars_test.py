"""Tests for nin_jax.make_chars: the student's 62 generated character classes."""

import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from nin_jax import make_chars
from nin_jax.errors import UserError

_REPO = pathlib.Path(__file__).resolve().parents[1]


def _files(root: pathlib.Path) -> dict[str, bytes]:
  """Relative path -> bytes of every file under root."""
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'nin_jax.make_chars', *args], cwd=_REPO,
                        capture_output=True, text=True, timeout=120)


def test_classes_are_62_distinct_sorted_folders():
  assert len(make_chars.CLASSES) == 62
  assert list(make_chars.CLASSES) == sorted(make_chars.CLASSES)
  # Distinct on case-insensitive file systems too.
  assert len({c.casefold() for c in make_chars.CLASSES}) == 62
  chars = [make_chars.character(c) for c in make_chars.CLASSES]
  assert ''.join(chars) == ('0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ'
                            'abcdefghijklmnopqrstuvwxyz')
  assert tuple(chars) == make_chars.CHARACTERS
  assert make_chars.folder_name('X') == 'X_upper' and make_chars.folder_name('x') == 'x'


def test_writes_every_class_as_28x28_grayscale_png(tmp_path):
  out = tmp_path / 'chars'
  make_chars.make_chars(out, per_class=3, seed=0, workers=1)
  assert sorted(os.listdir(out)) == list(make_chars.CLASSES)
  for name in make_chars.CLASSES:
    files = sorted(os.listdir(out / name))
    assert files == ['0.png', '1.png', '2.png']
    for f in files:
      with Image.open(out / name / f) as image:
        assert image.format == 'PNG'
        assert image.mode == 'L'
        assert image.size == (28, 28)
        pixels = np.asarray(image)
      # Dark ink on a light background: some contrast in every image.
      assert pixels.max() >= 200 and pixels.min() <= 170
  # Nothing left beside it: the temporary folder was renamed into place.
  assert os.listdir(tmp_path) == ['chars']


def test_image_size_and_zero_padded_names(tmp_path):
  make_chars.make_chars(tmp_path / 'c', per_class=11, image_size=32, workers=1)
  assert sorted(os.listdir(tmp_path / 'c' / 'q'))[:2] == ['00.png', '01.png']
  with Image.open(tmp_path / 'c' / 'Q_upper' / '10.png') as image:
    assert image.size == (32, 32) and image.mode == 'L'


def test_same_seed_same_bytes_whatever_the_workers_other_seed_differs(tmp_path):
  make_chars.make_chars(tmp_path / 'a', per_class=2, seed=7, workers=1)
  make_chars.make_chars(tmp_path / 'b', per_class=2, seed=7, workers=2)
  make_chars.make_chars(tmp_path / 'c', per_class=2, seed=8, workers=1)
  a, b, c = (_files(tmp_path / d) for d in 'abc')
  assert len(a) == 62 * 2
  assert a == b
  assert a.keys() == c.keys()
  assert sum(a[k] != c[k] for k in a) == len(a)


def _ink_rows(image: Image.Image) -> np.ndarray:
  """Indices of the rows holding ink: pixels darker than halfway between background and ink."""
  x = np.asarray(image, np.float32)
  return np.flatnonzero((x < (x.max() + x.min()) / 2).any(axis=1))


def test_lowercase_letters_stay_smaller_than_capitals(monkeypatch):
  # Without the noise, the ink is the glyph alone. Cropping each glyph to fill the frame (as
  # ImageCaptcha does) would make these ratios ~1 and the case pairs inseparable.
  monkeypatch.setattr(make_chars, '_NOISE_DOTS', 0)
  monkeypatch.setattr(make_chars, '_NOISE_ARC_PROBABILITY', 0.0)

  def mean_extent(char):
    tops, bottoms = [], []
    for i in range(8):
      rows = _ink_rows(make_chars.render_char(char, np.random.default_rng([3, i])))
      tops.append(rows[0])
      bottoms.append(rows[-1])
    return np.mean(tops), np.mean(bottoms)

  for lower in 'oxsvwz':
    top, bottom = mean_extent(lower)
    cap_top, cap_bottom = mean_extent(lower.upper())
    assert (cap_bottom - cap_top) > 1.2 * (bottom - top), lower
    assert abs(cap_bottom - bottom) < 1.5, lower  # one baseline
  # Descenders hang below it.
  assert mean_extent('p')[1] > mean_extent('o')[1] + 3


@pytest.mark.parametrize('kwargs, culprit', [
    (dict(per_class=0), 'per_class'),
    (dict(per_class=-3), 'per_class'),
    (dict(per_class=1, seed=-1), 'seed'),
    (dict(per_class=1, workers=0), 'workers'),
    (dict(per_class=1, image_size=2), 'image_size'),
])
def test_bad_arguments_raise_user_error(tmp_path, kwargs, culprit):
  with pytest.raises(UserError, match=culprit):
    make_chars.make_chars(tmp_path / 'chars', **kwargs)
  assert not (tmp_path / 'chars').exists()


def test_out_must_not_be_a_file_or_a_non_empty_folder(tmp_path):
  a_file = tmp_path / 'file.png'
  a_file.write_bytes(b'x')
  with pytest.raises(UserError, match='not a folder'):
    make_chars.make_chars(a_file, per_class=1)
  full = tmp_path / 'full'
  full.mkdir()
  (full / 'keep.txt').write_text('mine')
  with pytest.raises(UserError, match='not empty'):
    make_chars.make_chars(full, per_class=1)
  assert os.listdir(full) == ['keep.txt']
  with pytest.raises(UserError, match='cannot create'):
    make_chars.make_chars(a_file / 'chars', per_class=1)
  # An empty folder is taken over.
  empty = tmp_path / 'empty'
  empty.mkdir()
  make_chars.make_chars(empty, per_class=1, workers=1)
  assert sorted(os.listdir(empty)) == list(make_chars.CLASSES)


def test_output_appears_only_when_complete(tmp_path, monkeypatch):
  out = tmp_path / 'chars'
  seen_out = []
  render = make_chars.render_char

  def failing_render(*args, **kwargs):
    # A killed run gets no chance to clean up: out must not exist while images are written.
    seen_out.append(out.exists())
    if len(seen_out) > 20:
      raise KeyboardInterrupt
    return render(*args, **kwargs)

  monkeypatch.setattr(make_chars, 'render_char', failing_render)
  with pytest.raises(KeyboardInterrupt):
    make_chars.make_chars(out, per_class=5, workers=1)
  assert seen_out == [False] * 21
  assert os.listdir(tmp_path) == []  # an interrupt also removes the temporary sibling


def test_cli_writes_the_folder(tmp_path):
  out = tmp_path / 'chars'
  result = _run_cli(f'--out={out}', '--per_class=1', '--seed=3', '--workers=1')
  assert result.returncode == 0, result.stderr
  assert sorted(os.listdir(out)) == list(make_chars.CLASSES)
  assert all(os.listdir(out / c) == ['0.png'] for c in make_chars.CLASSES)
  # The API with the same seed writes the same bytes.
  make_chars.make_chars(tmp_path / 'api', per_class=1, seed=3, workers=1)
  assert _files(out) == _files(tmp_path / 'api')


def test_cli_bad_arguments_print_one_line_and_exit_2(tmp_path):
  a_file = tmp_path / 'taken'
  a_file.write_text('')
  for args, culprit in [((f'--out={tmp_path / "c"}', '--per_class=0'), 'per_class'),
                        ((f'--out={a_file}',), str(a_file)),
                        (('--per_class=1',), '--out')]:
    result = _run_cli(*args)
    assert result.returncode == 2, (args, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and culprit in lines[0], lines
    assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'c').exists()
