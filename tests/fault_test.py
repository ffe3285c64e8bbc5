"""Fault injection: a run killed at any point resumes to the uninterrupted result.

One workdir is stopped five times — four SIGKILLs at points found by watching the run's files
(right after startup; between checkpoints; in the middle of an asynchronous Orbax save; between
checkpoints again) and one SIGTERM — and then finished. Its metrics.jsonl and results.json must
equal those of an uninterrupted run of the same config, and after every kill each file of the run
must be whole.

So that a kill lands exactly at the state that was observed, the run is first frozen with
SIGSTOP and its files are checked again while it cannot change them: only then is it killed
with SIGKILL (else let go with SIGCONT, and the watch goes on). The kill is as sudden as ever,
but the test knows where it hit, and cannot drift into killing at some other time.
"""

import json
import os
import re
import signal
import threading
import time

import pytest

from conftest import run_main, tiny_config

pytestmark = pytest.mark.skipif(not os.path.isdir('/proc/self/task'),
                                reason='watches processes through /proc (Linux)')

# 12 saves to hit; every other one falls between two train records (each the mean of the 2
# steps since the last), as does a SIGTERM at an odd step: the resumed run must still average
# the same steps.
_CONFIG = dict(num_train_steps=60, log_every_steps=2, eval_every_steps=10,
               checkpoint_every_steps=5)
_TIMEOUT = 180  # seconds for one run of the tiny net, or one wait for a kill point
_TMP = '.orbax-checkpoint-tmp'  # Orbax saves STEP into STEP.orbax-checkpoint-tmp, then renames it


class _Run:
  """A training process whose output is read on a thread (a full pipe would stall it)."""

  def __init__(self, workdir, config):
    self.proc = run_main(workdir, config, wait=False)
    self.lines = []
    self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                   daemon=True)
    self.thread.start()

  def wait(self, timeout=_TIMEOUT) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    finally:
      self.close()

  def close(self) -> None:
    self.proc.kill()  # no-op once it has exited
    self.proc.wait()
    self.thread.join(timeout=10)

  @property
  def output(self) -> str:
    return ''.join(self.lines)


def _checkpoints(workdir):
  """(committed steps, steps being saved) in WORKDIR/checkpoints."""
  path = os.path.join(workdir, 'checkpoints')
  names = os.listdir(path) if os.path.isdir(path) else []
  done = sorted(int(n) for n in names if n.isdigit())
  saving = sorted(int(n.split('.')[0]) for n in names if _TMP in n)
  return done, saving


def _logged_steps(workdir):
  """The train steps in metrics.jsonl, read while the run may be writing (a torn line skipped)."""
  steps, path = [], os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return steps
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if 'train_loss' in record:
        steps.append(record['step'])
  return steps


def _check_files(workdir):
  """After a stop: metrics.jsonl is whole lines of JSON, each record once and none skipped; no
  results.json. Returns the last logged step (0: none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  text = open(path).read() if os.path.exists(path) else ''
  assert not text or text.endswith('\n'), f'torn last line: {text[-200:]!r}'
  records = [json.loads(line) for line in text.splitlines()]
  train = [r['step'] for r in records if 'train_loss' in r]
  evals = [r['step'] for r in records if 'test_loss' in r]
  last = train[-1] if train else 0
  assert train == list(range(2, last + 1, 2)), train
  expected = list(range(10, last + 1, 10))  # the last one: unless stopped just before it
  assert evals == expected or (evals == expected[:-1] and expected[-1] == last), evals
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  return last


def _freeze(pid):
  """SIGSTOP, returning once every thread of the process is stopped (or it is gone)."""
  os.kill(pid, signal.SIGSTOP)
  deadline = time.time() + 10
  while time.time() < deadline:
    states = []
    for task in os.listdir(f'/proc/{pid}/task'):
      try:
        with open(f'/proc/{pid}/task/{task}/stat') as f:
          states.append(f.read().rsplit(')', 1)[1].split()[0])
      except FileNotFoundError:  # a thread that just ended
        pass
    if all(state in 'tTZX' for state in states):
      return
    time.sleep(0.001)
  raise AssertionError(f'process {pid} did not stop')


def _kill_when(run, condition):
  """SIGKILLs `run` at the first moment `condition()` holds; returns what it returned then.

  The condition is tested on the live run, then again on the frozen one: only a state seen
  while the run could not change it is killed in.
  """
  deadline = time.time() + _TIMEOUT
  while time.time() < deadline:
    assert run.proc.poll() is None, 'the run ended before the kill point:\n' + run.output[-3000:]
    if condition():
      _freeze(run.proc.pid)
      hit = condition()
      if hit:
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL, run.output[-3000:]
        return hit
      os.kill(run.proc.pid, signal.SIGCONT)
    time.sleep(0.003)
  raise AssertionError('the kill point never came:\n' + run.output[-3000:])


def _resumed_from(run):
  found = re.findall(r'Resuming from the checkpoint of step (\d+) in', run.output)
  return int(found[0]) if found else 0


def _without_timing(path):
  """The file's bytes with the one measured field, images_per_sec, blanked."""
  with open(path) as f:
    return re.sub(r'"images_per_sec": [^,}]+', '"images_per_sec": _', f.read())


def test_killed_run_resumes_to_the_uninterrupted_result(blobs_folder, tmp_path):
  config = tiny_config(blobs_folder, **_CONFIG)
  straight, broken = str(tmp_path / 'straight'), str(tmp_path / 'broken')
  checkpoints = os.path.join(broken, 'checkpoints')
  reference = _Run(straight, config)  # trains beside the first interrupted runs
  run = None
  try:
    # 1. Right after startup: the checkpoint manager exists, nothing is saved yet.
    run = _Run(broken, config)
    assert _kill_when(run, lambda: os.path.isdir(checkpoints) and _checkpoints(broken) == ([], []))
    assert _check_files(broken) == 0

    # 2. A fresh start (there is nothing to resume), killed between two checkpoints: steps
    #    past the last checkpoint are logged and no save is in flight. The last checkpoint is
    #    of an odd step, between two records.
    run = _Run(broken, config)

    def between_checkpoints(resumed, first, odd=False):
      done, saving = _checkpoints(broken)
      steps = _logged_steps(broken)
      if saving or not steps or not done or done[-1] <= resumed or steps[-1] < first:
        return None
      return steps[-1] > done[-1] and (done[-1] % 2 or not odd) and (done[-1], steps[-1])

    kept, logged = _kill_when(run, lambda: between_checkpoints(0, 12, odd=True))
    assert _resumed_from(run) == 0, run.output[-3000:]
    assert _check_files(broken) == logged > kept

    # 3. Resumed there, killed while Orbax writes a checkpoint: its temporary directory is
    #    still there after the kill, so the kill really landed inside the save.
    run = _Run(broken, config)

    def during_save():
      done, saving = _checkpoints(broken)
      return done and saving and saving[-1] > kept and (done[-1], saving[-1])

    committed, torn = _kill_when(run, during_save)
    assert _resumed_from(run) == kept, run.output[-3000:]
    assert any(n.startswith(f'{torn}{_TMP}') for n in os.listdir(checkpoints)), (
        os.listdir(checkpoints))
    assert str(torn) not in os.listdir(checkpoints)
    _check_files(broken)

    # 4. Resumed from the last committed checkpoint (the torn one is dropped), killed between
    #    checkpoints again, after this run has saved one of its own.
    run = _Run(broken, config)
    kept, logged = _kill_when(run, lambda: between_checkpoints(committed, committed + 3))
    assert _resumed_from(run) == committed, run.output[-3000:]
    assert _check_files(broken) == logged > kept

    # 5. Resumed, then SIGTERM once this run has saved a checkpoint (a SIGTERM before the
    #    train loop, with nothing to save, ends the process the default way): a graceful stop
    #    saves the step it reached and exits 143.
    run = _Run(broken, config)
    deadline = time.time() + _TIMEOUT
    while max(_checkpoints(broken)[0], default=0) <= kept:
      assert run.proc.poll() is None and time.time() < deadline, run.output[-3000:]
      time.sleep(0.003)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 143, run.output[-3000:]
    assert _resumed_from(run) == kept, run.output[-3000:]
    saved = int(re.findall(r'preempted: SIGTERM: saved the checkpoint of step (\d+)',
                           run.output)[0])
    done, saving = _checkpoints(broken)
    assert done[-1] == saved and not saving
    assert _check_files(broken) == saved - saved % 2  # every record up to the saved step

    # 6. Resumed there, to the end.
    run = _Run(broken, config)
    assert run.wait() == 0, run.output[-3000:]
    assert _resumed_from(run) == saved, run.output[-3000:]
    assert reference.wait() == 0, reference.output[-3000:]
  finally:
    for process in (reference, run):
      if process is not None:
        process.close()
  assert not [n for n in os.listdir(checkpoints) if _TMP in n]  # Orbax removed the torn save

  # Record by record, byte for byte, but for the measured images_per_sec.
  metrics = [_without_timing(os.path.join(d, 'metrics.jsonl')) for d in (straight, broken)]
  assert metrics[1] == metrics[0]
  assert len(metrics[0].splitlines()) == 30 + 6
  results = [json.load(open(os.path.join(d, 'results.json'))) for d in (straight, broken)]
  for key in ('step', 'test_loss', 'test_accuracy', 'test_error', 'num_test_examples'):
    assert results[1][key] == results[0][key], key
