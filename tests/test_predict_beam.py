"""tfl-predict --runner=beam: the local run's submissions byte for byte, retried bundles, errors.

Runners: the FnApiRunner in memory (what `--runner=DirectRunner` runs; one process), with
`--direct_num_workers=2 --direct_running_mode=multi_processing` for worker processes, and the
BundleBasedDirectRunner, Beam's local runner that retries a failed bundle, for the retry test.
"""

import csv
import importlib.util
import json
import os
import shutil
import sys

import pytest

import tf_landmarks
from tf_landmarks import export
from tf_landmarks import predict
from tf_landmarks import predictions
from tf_landmarks import queries
from tf_landmarks import recognizer
from tf_landmarks import records
from helpers import synthetic_records, trained_world

requires_beam = pytest.mark.skipif(
    importlib.util.find_spec('apache_beam') is None,
    reason="apache_beam is not installed (pip install 'tf-landmarks[beam]')")

SUBMISSIONS = ('recognition.csv', 'recognition_unverified.csv', 'retrieval.csv')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict_beam')
  built = trained_world(root, backend='sift')
  export.export(export.ExportConfig(run=built['classifier'], index=built['index'],
                                    output_dir=str(root / 'export')))
  return {**built, 'root': root, 'export': str(root / 'export')}


def _predict(world, output_dir, **overrides):
  # Batches of 5: the 16 test queries make 4 work units.
  settings = dict(export=world['export'], output_dir=str(output_dir), first_stage='classifier',
                  verify_top_k=5, batch_size=5, progress=False)
  settings.update(overrides)
  recognition = {name: settings.pop(name) for name in list(settings)
                 if name in recognizer.RecognizerSettings.__dataclass_fields__}
  return predict.predict(predict.PredictConfig(**settings),
                         recognizer.RecognizerSettings(**recognition))


@pytest.fixture(scope='module')
def local(world):
  output_dir = world['root'] / 'local'
  _predict(world, output_dir)
  return output_dir


def _journal(output_dir):
  """The journal's lines, without their timing (the one thing that differs between runs)."""
  lines = [json.loads(line) for line in open(output_dir / predictions.JOURNAL)]
  return [{key: value for key, value in entry.items() if key not in ('seconds', 'timing')}
          for entry in lines]


def _assert_same_predictions(local_dir, beam_dir):
  for name in SUBMISSIONS:
    assert (beam_dir / name).read_bytes() == (local_dir / name).read_bytes(), name
  assert _journal(beam_dir) == _journal(local_dir)
  assert predictions.load(str(beam_dir)).recognition
  assert not (beam_dir / '.beam').exists()  # predict_beam.WORK, removed once read.


@requires_beam
def test_beam_gives_the_local_submissions_byte_for_byte(world, local, tmp_path):
  result = _predict(world, tmp_path / 'beam', runner='beam')
  _assert_same_predictions(local, tmp_path / 'beam')
  assert result['counts']['queries'] == 16
  assert len((tmp_path / 'beam' / predictions.LOG).read_text().splitlines()) == 16


@requires_beam
def test_beam_continues_an_interrupted_journal_as_the_local_run_does(world, local, tmp_path):
  # Compared with the local run resumed from the same journal: the classifier's scores depend (in
  # their last bits) on which queries share a batch, and the resumed batches start at query 7.
  lines = open(local / predictions.JOURNAL, 'rb').read().splitlines(keepends=True)
  for runner in ('local', 'beam'):
    output_dir = tmp_path / runner
    shutil.copytree(local, output_dir)
    (output_dir / predictions.JOURNAL).write_bytes(b''.join(lines[:7]))
    for name in SUBMISSIONS:
      (output_dir / name).unlink()
    _predict(world, output_dir, runner=runner)
  _assert_same_predictions(tmp_path / 'local', tmp_path / 'beam')
  assert _journal(tmp_path / 'beam')[:7] == _journal(local)[:7]


@requires_beam
def test_queries_from_a_csv_with_bad_images_give_the_local_submissions(world, tmp_path):
  images = tmp_path / 'images'
  shutil.copytree(os.path.join(world['world'], 'images'), images)
  (images / 'badbad0000000001.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is no JPEG')
  test_csv = tmp_path / 'test.csv'
  with open(os.path.join(world['world'], 'test.csv'), newline='') as f:
    ids = [row['id'] for row in csv.DictReader(f)]
  test_csv.write_text('id,url\n' + ''.join(f'{image_id},\n' for image_id in
                                           ids[:6] + ['badbad0000000001', 'missing000000003'] +
                                           ids[6:]))
  for runner in ('local', 'beam'):
    _predict(world, tmp_path / runner, runner=runner, test_csv=str(test_csv),
             image_dir=str(images))
  _assert_same_predictions(tmp_path / 'local', tmp_path / 'beam')
  statuses = {entry['id']: entry['status'] for entry in _journal(tmp_path / 'beam')}
  assert statuses['missing000000003'] == 'missing image file'


@requires_beam
def test_a_retried_bundle_neither_drops_nor_duplicates_a_query(world, local, tmp_path,
                                                             monkeypatch):
  """BundleBasedDirectRunner retries failed bundles: fail the first attempt of some work units."""
  markers = tmp_path / 'attempted'
  markers.mkdir()
  real_answer_batch = predict.answer_batch
  ids = [entry['id'] for entry in _journal(local)]

  def flaky_answer_batch(recognizer_, batch):
    entries = real_answer_batch(recognizer_, batch)  # Answered, then the worker is lost.
    first = batch[0].image_id
    if first in (ids[0], ids[10]) and not (markers / first).exists():
      (markers / first).touch()
      raise RuntimeError(f'worker lost while answering {first} (first attempt)')
    return entries

  monkeypatch.setattr(predict, 'answer_batch', flaky_answer_batch)
  _predict(world, tmp_path / 'beam', runner='beam',
           beam_pipeline_options=['--runner=BundleBasedDirectRunner'])
  assert sorted(path.name for path in markers.iterdir()) == sorted([ids[0], ids[10]])
  _assert_same_predictions(local, tmp_path / 'beam')
  assert len(open(tmp_path / 'beam' / predictions.JOURNAL).readlines()) == 16


@requires_beam
def test_a_failed_pipeline_is_one_line_and_the_same_command_finishes(world, local, tmp_path,
                                                                     monkeypatch):
  """The FnApiRunner (DirectRunner) does not retry: the run stops; rerunning it finishes it."""
  def failing(recognizer_, batch):
    raise RuntimeError('worker lost')
  monkeypatch.setattr(predict, 'answer_batch', failing)
  with pytest.raises(predict.PredictError,
                     match=r'^the Beam pipeline failed: .*worker lost.*rerun the same command$'):
    _predict(world, tmp_path / 'beam', runner='beam')
  assert not (tmp_path / 'beam' / 'recognition.csv').exists()
  monkeypatch.undo()
  _predict(world, tmp_path / 'beam', runner='beam')
  _assert_same_predictions(local, tmp_path / 'beam')


@requires_beam
def test_two_worker_processes_give_the_local_submissions(world, local, tmp_path):
  _predict(world, tmp_path / 'beam', runner='beam', beam_pipeline_options=[
      '--runner=DirectRunner', '--direct_num_workers=2', '--direct_running_mode=multi_processing'])
  _assert_same_predictions(local, tmp_path / 'beam')


def test_runner_beam_without_apache_beam_is_a_one_line_error(world, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'apache_beam', None)  # Makes `import apache_beam` fail.
  # As if never imported: `from tf_landmarks import predict_beam` finds the package attribute
  # first.
  monkeypatch.delitem(sys.modules, 'tf_landmarks.predict_beam', raising=False)
  monkeypatch.delattr(tf_landmarks, 'predict_beam', raising=False)
  with pytest.raises(predict.PredictError, match=(
      r"^--runner=beam needs Apache Beam: pip install 'tf-landmarks\[beam\]'$")):
    _predict(world, tmp_path / 'beam', runner='beam')
  with pytest.raises(predict.PredictError, match='only used with --runner=beam'):
    _predict(world, tmp_path / 'beam', beam_pipeline_options=['--runner=DirectRunner'])
  assert not (tmp_path / 'beam').exists()


@requires_beam
def test_bad_pipeline_options_are_a_one_line_error(world, tmp_path):
  with pytest.raises(predict.PredictError, match='--beam_pipeline_options: Beam rejects'):
    _predict(world, tmp_path / 'beam', runner='beam',
             beam_pipeline_options=['--direct_num_workers=two'])


def test_the_query_reader_starts_at_a_position_past_whole_test_shards(tmp_path):
  records_dir = synthetic_records(tmp_path, 3, 12, num_test_images=11, examples_per_shard=3,
                                  test_csv=str(tmp_path / 'world' / 'test.csv'))
  assert len(records.load(str(records_dir)).files('test')) > 2
  total, read, _ = queries._record_queries(str(records_dir))
  everything = [image_id for image_id, _ in read(lambda image_id: True)]
  assert len(everything) == total == 11
  for start in (0, 2, 3, 7, 10, 11):
    assert [image_id for image_id, _ in read(lambda image_id: True, start)] == everything[start:]
