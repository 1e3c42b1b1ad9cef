"""The predictions folder: its typed load, the journal, and writing its files last file last."""

import json

import pytest

from tf_landmarks import predictions


def test_load_finds_the_files_and_checks_the_format(tmp_path):
  (tmp_path / 'predict.json').write_text(json.dumps(
      {'format': predictions.FORMAT, 'records_dir': 'records/x', 'finished': False,
       'settings': {'first_stage': 'knn'}}))
  (tmp_path / 'recognition.csv').write_text('id,landmarks\n')
  with pytest.raises(predictions.PredictionsError, match='unfinished prediction run'):
    predictions.load(str(tmp_path))
  (tmp_path / 'predict.json').write_text(json.dumps(
      {'format': predictions.FORMAT, 'records_dir': 'records/x', 'finished': True,
       'settings': {'first_stage': 'knn'}}))
  folder = predictions.load(str(tmp_path))
  assert folder.records_dir == 'records/x' and folder.first_stage == 'knn'
  assert folder.recognition == str(tmp_path / 'recognition.csv')
  assert folder.unverified_recognition is None and folder.retrieval is None
  assert folder.export is None and folder.queries is None
  (tmp_path / 'predict.json').write_text(json.dumps({'format': 'something else'}))
  with pytest.raises(predictions.PredictionsError, match="format 'something else'"):
    predictions.load(str(tmp_path))
  with pytest.raises(predictions.PredictionsError, match='not a predictions folder'):
    predictions.load(str(tmp_path / 'missing'))


def _entry(image_id, prediction, retrieval):
  return {'id': image_id, 'status': 'ok', 'prediction': prediction, 'unverified': prediction,
          'candidates': [], 'retrieval': retrieval, 'seconds': 0.1, 'timing': {}}


def test_start_then_finish_writes_the_submissions_before_marking_the_folder_finished(tmp_path):
  folder = str(tmp_path)
  predictions.start(folder, {'export': 'exports/x', 'records_dir': 'records/x',
                             'settings': {'first_stage': 'classifier'}, 'queries': {}})
  with pytest.raises(predictions.PredictionsError, match='unfinished'):
    predictions.load(folder)
  journal = predictions.Journal(str(tmp_path / predictions.JOURNAL))
  for entry in (_entry('qb', [7, 0.5], ['i2', 'i1']), _entry('qa', None, ['i1'])):
    journal.append(entry)
  journal.close()
  entries = predictions.Journal(str(tmp_path / predictions.JOURNAL)).entries
  meta = predictions.finish(folder, {'export': 'exports/x', 'records_dir': 'records/x',
                                     'settings': {'first_stage': 'classifier'}, 'queries': {}},
                            [entries['qb'], entries['qa']], with_retrieval=True)
  assert meta['finished'] and meta['submissions']['retrieval'] == predictions.RETRIEVAL_CSV
  loaded = predictions.load(folder)
  assert loaded.export == 'exports/x' and loaded.entries().keys() == {'qa', 'qb'}
  assert (tmp_path / 'recognition.csv').read_text() == 'id,landmarks\nqb,7 0.5\nqa,\n'
  assert (tmp_path / 'retrieval.csv').read_text() == 'id,images\nqb,i2 i1\nqa,i1\n'


def test_read_started_refuses_a_journal_without_predict_json(tmp_path):
  assert predictions.read_started(str(tmp_path)) is None
  (tmp_path / predictions.JOURNAL).write_text('')
  with pytest.raises(predictions.PredictionsError, match='without predict.json'):
    predictions.read_started(str(tmp_path))
  predictions.clear(str(tmp_path))
  assert not list(tmp_path.iterdir())
