"""Training for real on CPU: the train step, the three stages on the synthetic set, strategies, resume."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_landmarks import data
from tf_landmarks import files
from tf_landmarks import records
from tf_landmarks import runs
from tf_landmarks import train
from tf_landmarks.models import heads
from tf_landmarks.splits import Singletons
from helpers import REPO
from helpers import synthetic_records as build_synthetic_records

BIN = pathlib.Path(sys.executable).parent


@pytest.fixture(scope='module')
def synthetic_records(tmp_path_factory):
  """A small synthetic world (8 landmarks) as records: enough to learn, quick to train on."""
  return build_synthetic_records(tmp_path_factory.mktemp('world'), num_landmarks=8,
                                 num_train_images=240, num_test_images=16,
                                 singletons=Singletons.DUPLICATE, num_workers=2)


def _config(records_dir, workdir, **overrides):
  settings = dict(records_dir=str(records_dir), workdir=str(workdir), backbone='tiny',
                  weights='none', head='softmax', batch_size=16, epochs=2, steps_per_epoch=6,
                  optimizer='adam', learning_rate=0.003, progress=False, log_every_steps=3)
  settings.update(overrides)
  return train.TrainConfig(**settings)


def test_train_step_lowers_the_loss_of_a_batch():
  # The importable step, run for real on one batch of a small model: it must fit the batch.
  keras.utils.set_random_seed(0)
  head = heads.build_head('softmax', 4)
  inputs = tf.random.normal([8, 3, 3, 16])
  labels = tf.constant([0, 1, 2, 3, 0, 1, 2, 3])
  head(inputs)
  optimizer = keras.optimizers.Adam(0.05)
  step = train.make_train_step(head, optimizer, lambda y, z, x: tf.nn.sparse_softmax_cross_entropy_with_logits(y, z),
                               global_batch_size=8)
  first = step(inputs, labels).numpy()
  for _ in range(30):
    last = step(inputs, labels).numpy()
  assert first[2] == 8 and last[2] == 8
  assert last[0] < first[0] / 4 and last[1] == 8  # Loss down, every example right.


def test_scratch_then_bottleneck_then_finetune_learn_well_above_chance(synthetic_records, tmp_path):
  input_config = data.InputConfig(image_size=64, augmentation=data.Augmentation.RESIZE_CROP)
  scratch = train.train(_config(synthetic_records, tmp_path / 'scratch', epochs=6,
                                steps_per_epoch=12), input_config)
  assert scratch['final']['epoch'] == 6 and scratch['weights'] == 'none'
  chance = 1 / 8
  assert scratch['best']['validation']['top1'] > 2.5 * chance, scratch['best']
  for name in ('model.keras', 'backbone.weights.h5', 'head.weights.npz', 'label_map.csv',
               'run.json'):
    assert (tmp_path / 'scratch' / name).exists(), name

  weights = str(tmp_path / 'scratch' / 'backbone.weights.h5')
  top = train.train(_config(synthetic_records, tmp_path / 'bottleneck', mode=train.Mode.BOTTLENECK,
                            weights=weights, epochs=10, steps_per_epoch=12,
                            feature_cache_dir=str(tmp_path / 'cache')),
                    data.InputConfig(image_size=64))
  assert top['weights_sha256'] == scratch_sha(weights)
  assert top['best']['validation']['top1'] > 2.5 * chance, top['best']
  cache = list((tmp_path / 'cache').glob('*/train/info.json'))
  assert len(cache) == 1  # Cached once, keyed by backbone, weights, size and head needs.
  mtime = cache[0].stat().st_mtime_ns
  train.train(_config(synthetic_records, tmp_path / 'bottleneck2', mode=train.Mode.BOTTLENECK,
                      weights=weights, epochs=1, feature_cache_dir=str(tmp_path / 'cache')),
              data.InputConfig(image_size=64))
  assert cache[0].stat().st_mtime_ns == mtime  # Reused, not recomputed.

  fine = train.train(_config(synthetic_records, tmp_path / 'finetune', mode=train.Mode.FINETUNE,
                             weights='', init_from=str(tmp_path / 'bottleneck'),
                             freeze_until='block2', epochs=2, learning_rate=0.0005), input_config)
  assert fine['weights'].endswith(os.path.join('bottleneck', 'backbone.weights.h5'))
  assert fine['best']['validation']['top1'] > 2.5 * chance, fine['best']
  reloaded = keras.saving.load_model(tmp_path / 'finetune' / 'model.keras')
  assert reloaded(tf.zeros([1, 64, 64, 3], tf.uint8)).shape == (1, 8)
  tags = set()
  for events in (tmp_path / 'scratch' / 'tensorboard').glob('events.*'):
    for event in tf.compat.v1.train.summary_iterator(str(events)):
      tags.update(value.tag for value in event.summary.value)
  assert {'train/loss', 'train/accuracy', 'train/learning_rate', 'train/images_per_second',
          'validation/top1', 'validation/top5', 'validation/gap'} <= tags


def test_bottleneck_on_efficientnet_lite0_imagenet_weights_offline(synthetic_records, tmp_path,
                                                                   monkeypatch):
  # No network: the ImageNet weights come from the package's checkpoint, converted into KERAS_HOME.
  def refuse(*args, **kwargs):
    raise OSError('network is unreachable (test)')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
  run = train.train(_config(synthetic_records, tmp_path / 'lite0', mode=train.Mode.BOTTLENECK,
                            backbone='efficientnet_lite0', weights='imagenet', epochs=8,
                            steps_per_epoch=12, feature_cache_dir=str(tmp_path / 'cache')),
                    data.InputConfig(image_size=64))
  converted = tmp_path / 'keras' / 'models' / 'efficientnet_lite0_57934424_notop.weights.h5'
  assert run['weights'] == 'imagenet'
  assert run['weights_sha256'] == scratch_sha(converted)
  assert run['weights_source_sha256'] == (
      '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db')
  written = json.loads((tmp_path / 'lite0' / 'run.json').read_text())
  assert written['weights_source_sha256'] == run['weights_source_sha256']
  # ImageNet features tell the synthetic landmarks apart with a head alone.
  assert run['best']['validation']['top1'] > 4 / 8, run['best']


def scratch_sha(path):
  import hashlib
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_clear_errors_for_a_bad_setup(synthetic_records, tmp_path):
  input_config = data.InputConfig(image_size=64)
  with pytest.raises(train.TrainError, match='--init_from=<bottleneck run>'):
    train.train(_config(synthetic_records, tmp_path / 'a', mode=train.Mode.FINETUNE,
                        weights=str(tmp_path / 'w.weights.h5')), input_config)
  with pytest.raises(train.TrainError, match='not none'):
    train.train(_config(synthetic_records, tmp_path / 'b', mode=train.Mode.BOTTLENECK,
                        weights='none'), input_config)
  train.train(_config(synthetic_records, tmp_path / 'c', epochs=1, steps_per_epoch=2),
              input_config)
  with pytest.raises(train.TrainError, match='holds a finished run'):
    train.train(_config(synthetic_records, tmp_path / 'c'), input_config)


def _files(folder):
  return {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in folder.rglob('*')
          if path.is_file()}


def test_resume_of_a_finished_run_does_nothing_and_says_so(synthetic_records, tmp_path):
  workdir = tmp_path / 'finished'
  train.train(_config(synthetic_records, workdir, epochs=1, steps_per_epoch=1),
              data.InputConfig(image_size=32))
  before = _files(workdir)
  result = subprocess.run(
      [sys.executable, '-m', 'tf_landmarks.cli.train', f'--records_dir={synthetic_records}',
       f'--workdir={workdir}', '--backbone=tiny', '--weights=none', '--head=softmax',
       '--batch_size=16', '--epochs=1', '--steps_per_epoch=1', '--optimizer=adam',
       '--learning_rate=0.003', '--image_size=32', '--noprogress', '--resume'],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == [
      f'{workdir} holds a finished run: nothing to resume, left as it is'], result.stdout
  assert _files(workdir) == before
  # Other settings are still refused: the finished run is not the one asked for.
  with pytest.raises(train.TrainError, match=r'other settings \(epochs\)'):
    train.train(_config(synthetic_records, workdir, epochs=2, steps_per_epoch=1, resume=True),
                data.InputConfig(image_size=32))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


_LOSS_SCRIPT = textwrap.dedent('''
    import json, sys
    import tensorflow as tf
    devices = int(sys.argv[1])
    if devices > 1:
      cpu = tf.config.list_physical_devices('CPU')[0]
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
    from tf_landmarks import data, train
    mode, weights = (('scratch', 'none') if len(sys.argv) < 6 else ('bottleneck', sys.argv[5]))
    config = train.TrainConfig(records_dir=sys.argv[2], workdir=sys.argv[3], backbone='tiny',
                               weights=weights, mode=mode, head='softmax', batch_size=16,
                               epochs=1, steps_per_epoch=4, optimizer='sgd', learning_rate=0.05,
                               strategy=sys.argv[4], progress=False, seed=1)
    run = train.train(config, data.InputConfig(image_size=32, augmentation='none'))
    print('RESULT', json.dumps({**run['final'], 'digest': run['trained_weights_digest']}))
''')


def _run_script(*args, env=None):
  return subprocess.run([sys.executable, '-c', _LOSS_SCRIPT, *map(str, args)], capture_output=True,
                        text=True, cwd=REPO, timeout=300, env={**os.environ, **(env or {})})


def test_mirrored_two_replicas_give_the_loss_of_one_device(synthetic_records, tmp_path):
  # The bottleneck stage (cached features, a head without BatchNorm): with BatchNorm in the model,
  # each replica would normalise its half batch by its own statistics, as in any data-parallel run.
  weights = tmp_path / 'base' / 'backbone.weights.h5'
  train.train(_config(synthetic_records, tmp_path / 'base', epochs=1, steps_per_epoch=1),
              data.InputConfig(image_size=32))
  one = _run_script(1, synthetic_records, tmp_path / 'one', 'default', weights)
  two = _run_script(2, synthetic_records, tmp_path / 'two', 'mirrored', weights)
  assert one.returncode == 0, one.stderr[-3000:]
  assert two.returncode == 0, two.stderr[-3000:]
  first = json.loads(one.stdout.split('RESULT ')[1])
  second = json.loads(two.stdout.split('RESULT ')[1])
  # Same seed and data order, the global batch split over two replicas: the same gradients.
  assert second['loss'] == pytest.approx(first['loss'], rel=2e-3)


def test_multi_worker_on_two_local_processes_ends_with_identical_weights(synthetic_records,
                                                                          tmp_path):
  ports = [_free_port(), _free_port()]
  cluster = {'worker': [f'127.0.0.1:{port}' for port in ports]}
  workers = []
  for index in range(2):
    env = {**os.environ, 'TF_CONFIG': json.dumps({'cluster': cluster,
                                                   'task': {'type': 'worker', 'index': index}})}
    workers.append(subprocess.Popen(
        [sys.executable, '-c', _LOSS_SCRIPT, '1', str(synthetic_records), str(tmp_path / 'run'),
         'multi_worker'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=env))
  outputs = [worker.communicate(timeout=300) for worker in workers]
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  results = [json.loads(stdout.split('RESULT ')[1]) for stdout, _ in outputs]
  assert results[0]['loss'] == pytest.approx(results[1]['loss'])
  assert results[0]['step'] == results[1]['step'] == 4
  assert results[0]['digest'] == results[1]['digest']  # All-reduced updates: the same weights.
  assert (tmp_path / 'run' / 'model.keras').exists()  # Written by the chief alone.


def _train_cli(records_dir, workdir, *extra):
  return [str(BIN / 'tfl-train'), '--flagfile=configs/smoke.flags', f'--records_dir={records_dir}',
          f'--workdir={workdir}', '--epochs=3', '--steps_per_epoch=8', '--checkpoint_every_steps=2',
          '--log_every_steps=2', '--image_size=32', '--seed=4', *extra]


def _wait_for_checkpoint(workdir, process, at_least=1):
  deadline = time.monotonic() + 120
  while len(list((workdir / 'checkpoints').glob('ckpt-*.index'))) < at_least:
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.05)


def _last_step(workdir):
  return tf.train.load_variable(tf.train.latest_checkpoint(str(workdir / 'checkpoints')),
                                'step/.ATTRIBUTES/VARIABLE_VALUE')


def test_killed_run_resumes_from_its_last_checkpoint(synthetic_records, tmp_path):
  # --deterministic (with dropout, whose random state must resume too): two uninterrupted runs and
  # a killed and resumed one end with the same weights.
  exact = ('--deterministic', '--dropout=0.3')
  for name in ('whole', 'again'):
    reference = subprocess.run(_train_cli(synthetic_records, tmp_path / name, *exact),
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
  workdir = tmp_path / 'killed'
  process = subprocess.Popen(_train_cli(synthetic_records, workdir, *exact), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO)
  _wait_for_checkpoint(workdir, process, at_least=2)
  process.kill()
  process.communicate()
  killed_at = _last_step(workdir)
  assert 0 < killed_at < 24
  again = subprocess.run(_train_cli(synthetic_records, workdir, *exact), capture_output=True,
                         text=True, cwd=REPO, timeout=300)
  assert again.returncode == 2 and 'pass --resume' in again.stderr
  resumed = subprocess.run(_train_cli(synthetic_records, workdir, *exact, '--resume'),
                           capture_output=True, text=True, cwd=REPO, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'step {killed_at + 2}/24' in resumed.stdout  # The step counter went on from there.
  whole = json.loads((tmp_path / 'whole' / 'run.json').read_text())
  twice = json.loads((tmp_path / 'again' / 'run.json').read_text())
  finished = json.loads((workdir / 'run.json').read_text())
  assert finished['final']['step'] == whole['final']['step'] == 24
  assert twice['trained_weights_digest'] == whole['trained_weights_digest']
  assert twice['final'] == whole['final'] and twice['best'] == whole['best']
  assert finished['trained_weights_digest'] == whole['trained_weights_digest']
  # (The epoch it was killed in reports the loss of the steps after the resume only.)
  assert finished['best']['validation'] == whole['best']['validation']


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(synthetic_records, tmp_path):
  # Warm-up to a huge rate: the first step is sane (and checkpointed), the second explodes.
  workdir = tmp_path / 'diverged'
  result = subprocess.run(_train_cli(synthetic_records, workdir, '--learning_rate=1e3',
                                     '--warmup_epochs=2', '--checkpoint_every_steps=1'),
                          capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if 'error' in line]
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert 'error: training diverged at step 2: loss ' in lines[0], lines[0]
  assert lines[0].endswith('above 2.08e+03 (1000 x ln of 8 classes); the last good checkpoint '
                           '(step 1) is kept; lower --learning_rate'), lines[0]
  run = json.loads((workdir / 'run.json').read_text())
  assert run['status'] == 'failed' and run['failure'] == lines[0].split('error: ')[1]
  assert _last_step(workdir) == 1
  latest = tf.train.latest_checkpoint(str(workdir / 'checkpoints'))
  for name, _ in tf.train.list_variables(latest):
    if name.startswith('model/'):
      assert np.isfinite(tf.train.load_variable(latest, name)).all(), name


def test_non_finite_loss_stops_the_run_at_its_first_step(synthetic_records, tmp_path):
  with pytest.raises(train.TrainingDiverged, match=r'^training diverged at step 2: loss nan; no '
                     r'checkpoint was written; lower --learning_rate$'):
    train.train(_config(synthetic_records, tmp_path / 'nan', learning_rate=1e35),
                data.InputConfig(image_size=32))
  assert json.loads((tmp_path / 'nan' / 'run.json').read_text())['status'] == 'failed'
  assert not (tmp_path / 'nan' / 'checkpoints').exists()


def test_validation_of_non_finite_outputs_counts_them_instead_of_failing():
  evaluate = train.make_evaluator(tf.distribute.get_strategy(),
                                  lambda inputs, training: inputs)  # The inputs are the logits.
  logits = tf.constant([[np.nan, 0.0, 0.0], [0.0, 5.0, 0.0], [np.inf, 0.0, 0.0]])
  scores = evaluate(tf.data.Dataset.from_tensor_slices((logits, [0, 1, 0])).batch(3))
  assert scores['non_finite'] == 2 and scores['examples'] == 3
  assert scores['top1'] == pytest.approx(1 / 3) and scores['gap'] == pytest.approx(1 / 3)


def test_batch_larger_than_the_train_split_is_refused(synthetic_records, tmp_path):
  examples = records.load(str(synthetic_records)).num_examples('train')
  with pytest.raises(train.TrainError, match=rf'^--batch_size=100000 is larger than the train '
                     rf'split of .* \({examples} examples\); lower --batch_size$'):
    train.train(_config(synthetic_records, tmp_path / 'big', batch_size=100000),
                data.InputConfig(image_size=32))


def test_missing_train_shard_is_named(synthetic_records, tmp_path):
  import shutil
  copy = tmp_path / 'records'
  shutil.copytree(synthetic_records, copy)
  shard = sorted(copy.glob('train-*-of-*'))[-1]
  shard.unlink()
  with pytest.raises(records.RecordsError, match=f'^shard {shard} is missing'):
    train.train(_config(copy, tmp_path / 'run', epochs=1, steps_per_epoch=2),
                data.InputConfig(image_size=32))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synthetic_records, tmp_path):
  workdir = tmp_path / 'preempted'
  process = subprocess.Popen(_train_cli(synthetic_records, workdir, '--checkpoint_every_steps=1000'),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  for line in process.stdout:  # Progress lines are flushed as they happen.
    if line.startswith('epoch 1 step'):
      break
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 143, stderr[-3000:]
  assert 'terminated (SIGTERM)' in stderr and 'Traceback' not in stderr
  assert _last_step(workdir) > 0  # Saved on the way out, though no checkpoint was due.


def test_warmup_then_cosine_and_step_schedules():
  cosine = train.WarmupDecay(0.1, warmup_steps=10, total_steps=110, schedule='cosine',
                             decay_steps=1, decay_factor=1)
  # Warm-up: (step + 1) / 10 of the peak; then 0.5·peak·(1 + cos(π·(step − 10)/100)).
  np.testing.assert_allclose([float(cosine(s)) for s in (0, 4, 10, 60, 110)],
                             [0.01, 0.05, 0.1, 0.05, 0.0], atol=1e-6)
  step = train.WarmupDecay(0.1, warmup_steps=0, total_steps=100, schedule='step', decay_steps=30,
                           decay_factor=0.1)
  np.testing.assert_allclose([float(step(s)) for s in (0, 29, 30, 65)], [0.1, 0.1, 0.01, 0.001],
                             rtol=1e-5)


@pytest.mark.parametrize('precision', ['mixed_float16', 'mixed_bfloat16'])
def test_mixed_precision_runs_with_a_float32_head(synthetic_records, tmp_path, precision):
  try:
    run = train.train(_config(synthetic_records, tmp_path / precision, epochs=1, steps_per_epoch=3,
                              mixed_precision=precision), data.InputConfig(image_size=32))
  finally:
    keras.mixed_precision.set_global_policy('float32')
  assert np.isfinite(run['final']['loss'])
  model = keras.saving.load_model(tmp_path / precision / 'model.keras')
  assert model.head.compute_dtype == 'float32'


def test_corrupt_train_shard_is_named(synthetic_records, tmp_path):
  import shutil
  copy = tmp_path / 'records'
  shutil.copytree(synthetic_records, copy)
  shard = sorted(copy.glob('train-*-of-*'))[0]
  data_bytes = bytearray(shard.read_bytes())
  data_bytes[40:60] = b'x' * 20
  shard.write_bytes(bytes(data_bytes))
  with pytest.raises(records.RecordsError, match=f'{shard} is corrupt or truncated'):
    train.train(_config(copy, tmp_path / 'run', epochs=1, steps_per_epoch=40),
                data.InputConfig(image_size=32))


def test_delf_stages_train_from_a_classifier_run(synthetic_records, tmp_path):
  input_config = data.InputConfig(image_size=64)
  train.train(_config(synthetic_records, tmp_path / 'classifier', epochs=2), input_config)

  def delf_run(name, init_from, **overrides):
    return train.train(_config(synthetic_records, tmp_path / name, mode=train.Mode.DELF,
                               weights='', init_from=str(tmp_path / init_from), **overrides),
                       input_config)

  descriptor = delf_run('descriptor', 'classifier', delf_stage='descriptor',
                        freeze_until='block1', epochs=1)
  assert descriptor['delf'] == {'stage': 'descriptor', 'reduced_dim': 0,
                                'local_feature_layer': 'block3_out'}
  attention = delf_run('attention', 'descriptor', delf_reduced_dim=16, epochs=2)
  assert attention['head'] is None and np.isfinite(attention['final']['loss'])
  assert attention['weights'].endswith(os.path.join('descriptor', 'backbone.weights.h5'))
  reloaded = keras.saving.load_model(tmp_path / 'attention' / 'model.keras')
  features, scores = reloaded.local_outputs(tf.zeros([1, 64, 64, 3], tf.uint8))
  assert features.shape[-1] == 16 and scores.shape[:3] == features.shape[:3]
  # An attention-stage run continues whole (same reduction) and is not undone.
  again = delf_run('attention2', 'attention', delf_reduced_dim=16, epochs=1)
  assert again['final']['loss'] < attention['final']['loss'] + 1.0
  with pytest.raises(train.TrainError, match='reduces descriptors to 16 channels'):
    delf_run('attention3', 'attention', delf_reduced_dim=0, epochs=1)
  with pytest.raises(train.TrainError, match='--init_from=<classifier run> or --weights'):
    train.train(_config(synthetic_records, tmp_path / 'bad', mode=train.Mode.DELF), input_config)


@pytest.fixture(scope='module')
def tiny_run(synthetic_records, tmp_path_factory):
  """A finished classifier run of one step: what the --init_from tests start from (copies)."""
  workdir = tmp_path_factory.mktemp('tiny') / 'run'
  train.train(_config(synthetic_records, workdir, epochs=1, steps_per_epoch=1),
              data.InputConfig(image_size=32))
  return workdir


def _finetune(records_dir, workdir, init_from, **overrides):
  return _config(records_dir, workdir, mode=train.Mode.FINETUNE, weights='',
                 init_from=str(init_from), epochs=1, steps_per_epoch=1, **overrides)


def _flip_byte(path):
  data_bytes = bytearray(path.read_bytes())
  data_bytes[len(data_bytes) // 2] ^= 0xFF
  path.write_bytes(bytes(data_bytes))


@pytest.mark.parametrize('name', ['backbone.weights.h5', 'head.weights.npz'])
def test_a_damaged_init_from_file_is_one_line_naming_it(synthetic_records, tiny_run, tmp_path,
                                                        name):
  damaged = shutil.copytree(tiny_run, tmp_path / 'damaged')
  _flip_byte(damaged / name)
  with pytest.raises(runs.RunError, match=re.escape(f'{damaged / name} is not the file the run '
                                                    'was written with (its SHA-256 differs)')):
    train.train(_finetune(synthetic_records, tmp_path / 'run', damaged),
                data.InputConfig(image_size=32))
  assert not (tmp_path / 'run').exists()


def test_a_head_is_not_reused_across_another_label_map(synthetic_records, tiny_run, tmp_path):
  other = shutil.copytree(synthetic_records, tmp_path / 'other')
  rows = records.read_label_map(str(other))  # The same classes and counts, other landmarks.
  records.write_label_map(str(other), [(label, 5000 + landmark, count)
                                       for label, landmark, count in rows])
  with pytest.raises(train.TrainError, match=f'--init_from={re.escape(str(tiny_run))} was trained '
                     f'on another label map than --records_dir={re.escape(str(other))} '
                     rf'\(the same {len(rows)} classes, other landmark ids\)'):
    train.train(_finetune(other, tmp_path / 'run', tiny_run), data.InputConfig(image_size=32))


def test_one_tfl_train_at_a_time_writes_a_workdir(synthetic_records, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with files.exclusive_writer(str(workdir), 'tfl-train', train.TrainError):
    with pytest.raises(train.TrainError, match=f'another tfl-train is writing to '
                       f'{re.escape(str(workdir))}; wait for it'):
      train.train(_config(synthetic_records, workdir, epochs=1, steps_per_epoch=1),
                  data.InputConfig(image_size=32))
  assert not (workdir / runs.CONFIG_JSON).exists()  # The holder's folder, untouched.


def test_a_failed_start_removes_only_a_workdir_it_created(synthetic_records, tiny_run, tmp_path):
  # A v1 run: its files are not checked on load, so the damaged head shows when it is read, after
  # the workdir was prepared.
  old = shutil.copytree(tiny_run, tmp_path / 'old')
  metadata = json.loads((old / runs.RUN_JSON).read_text())
  for key in ('status', 'files'):
    del metadata[key]
  (old / runs.RUN_JSON).write_text(json.dumps({**metadata, 'format': 'tf-landmarks run v1'}))
  _flip_byte(old / 'head.weights.npz')
  damaged = re.escape(f'{old / "head.weights.npz"} is damaged')
  with pytest.raises(train.TrainError, match=damaged):
    train.train(_finetune(synthetic_records, tmp_path / 'fresh', old),
                data.InputConfig(image_size=32))
  assert not (tmp_path / 'fresh').exists()
  # A folder that was there before is kept, and so is the unfinished run a --resume fails on.
  kept = tmp_path / 'kept'
  kept.mkdir()
  for resume in (False, True):
    with pytest.raises(train.TrainError, match=damaged):
      train.train(_finetune(synthetic_records, kept, old, resume=resume),
                  data.InputConfig(image_size=32))
    assert (kept / runs.CONFIG_JSON).exists()


def test_a_failed_run_is_neither_resumed_nor_used(synthetic_records, tmp_path):
  workdir = tmp_path / 'diverged'
  workdir.mkdir()
  runs.write_failed(str(workdir), {'mode': 'scratch', 'backbone': 'tiny', 'image_size': 32,
                                   'records_dir': str(synthetic_records), 'num_classes': 8},
                    'the loss became NaN at step 3')
  for resume in (False, True):
    with pytest.raises(train.TrainError, match=r'diverged holds a failed run \(the loss became NaN '
                       r'at step 3\); use another --workdir or --overwrite'):
      train.train(_config(synthetic_records, workdir, resume=resume),
                  data.InputConfig(image_size=32))
  with pytest.raises(runs.RunError, match=r'diverged is a failed run \(the loss became NaN at '
                     r'step 3\); it cannot be used as --init_from'):
    train.train(_finetune(synthetic_records, tmp_path / 'run', workdir),
                data.InputConfig(image_size=32))
  assert not (tmp_path / 'run').exists()
