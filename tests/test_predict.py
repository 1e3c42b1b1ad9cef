"""tfl-predict: two-stage recognition and retrieval, end to end on a small synthetic world."""

import csv
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tf_landmarks import export
from tf_landmarks import files
from tf_landmarks import index_builder
from tf_landmarks import indexes
from tf_landmarks import match_pictures
from tf_landmarks import predict
from tf_landmarks import predictions
from tf_landmarks import queries
from tf_landmarks import recognizer
from tf_landmarks import submission
from tf_landmarks.local_features import ransac
from helpers import REAL_DATA, REPO, requires_real_data, trained_world

BIN = REPO / '.venv' / 'bin'


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  built = trained_world(root, backend='sift')
  export.export(export.ExportConfig(run=built['classifier'], index=built['index'],
                                    output_dir=str(root / 'export')))
  return {**built, 'root': root, 'export': str(root / 'export')}


def _predict(world, output_dir, **overrides):
  settings = dict(export=world['export'], output_dir=str(output_dir), first_stage='classifier',
                  verify_top_k=5, progress=False)
  settings.update(overrides)
  recognition = {name: settings.pop(name) for name in list(settings)
                 if name in recognizer.RecognizerSettings.__dataclass_fields__}
  return predict.predict(predict.PredictConfig(**settings),
                         recognizer.RecognizerSettings(**recognition))


@pytest.fixture(scope='module')
def predicted(world):
  output_dir = world['root'] / 'predicted'
  _predict(world, output_dir)
  return output_dir


def _rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _scores(world, output_dir):
  truth = submission.read_recognition_solution(
      os.path.join(world['world'], 'recognition_solution.csv'))
  return {name: submission.score_recognition(
      submission.read_recognition_submission(os.path.join(output_dir, f'{name}.csv'), truth),
      truth) for name in ('recognition', 'recognition_unverified')}


def test_verified_score_ranks_every_verified_answer_above_every_unverified_one():
  assert recognizer.verified_score(15, 0.5, 15) == pytest.approx(1 + 0.5 * 0.5 + 0.5 * 0.5)
  assert recognizer.verified_score(45, 1.0, 15) == pytest.approx(1 + 0.5 * 0.75 + 0.5)
  assert recognizer.verified_score(15, 0.0, 15) >= 1.0 > 0.999  # Unverified scores are at most 1.
  assert recognizer.verified_score(30, 0.2, 15) > recognizer.verified_score(20, 0.2, 15)
  assert recognizer.verified_score(20, 0.4, 15) > recognizer.verified_score(20, 0.2, 15)
  assert recognizer.verified_score(1000, 1.0, 15) < 2.0


def test_knn_scores_are_the_similarity_of_each_landmarks_nearest_image():
  scores = recognizer.knn_scores(np.array([0.9, 0.6, 0.3, -0.2, 0.5]),
                              np.array([7, 8, 7, 9, -1]))  # -1: an empty IVF slot.
  assert scores == pytest.approx({7: 0.9, 8: 0.6})
  # Far from everything is not confident, however the neighbours agree (a vote share would be 1).
  assert recognizer.knn_scores(np.array([0.3, 0.29, 0.28]), np.array([4, 4, 4])) == pytest.approx(
      {4: 0.3})
  assert recognizer.knn_scores(np.array([-0.5, 0.0]), np.array([3, 3])) == {}
  # Rounding above 1 stays a confidence.
  assert recognizer.knn_scores(np.array([1.0000002]), np.array([5])) == {5: 1.0}
  assert recognizer.fuse({7: 0.8, 8: 0.2}, {8: 0.6, 9: 0.4}) == pytest.approx(
      {7: 0.4, 8: 0.4, 9: 0.2})
  assert recognizer.ranked({5: 0.4, 3: 0.4, 9: 0.2}) == [(3, 0.4), (5, 0.4), (9, 0.2)]


def test_verification_raises_gap_and_writes_kaggle_submissions(world, predicted):
  scores = _scores(world, predicted)
  verified, unverified = scores['recognition'], scores['recognition_unverified']
  assert verified['gap'] > unverified['gap'] + 0.1, scores
  assert verified['accuracy_on_landmark_queries'] > unverified['accuracy_on_landmark_queries']
  test_ids = [row['id'] for row in _rows(os.path.join(world['world'], 'test.csv'))]
  for name in ('recognition.csv', 'recognition_unverified.csv', 'retrieval.csv'):
    assert sorted(row['id'] for row in _rows(predicted / name)) == sorted(test_ids), name
  opened = indexes.load(os.path.join(world['export'], 'index'))
  indexed = {opened.image_id(row) for row in range(opened.num_images)}
  for row in _rows(predicted / 'retrieval.csv'):
    images = row['images'].split()
    assert len(images) == min(100, opened.num_images) and set(images) <= indexed
  entries = [json.loads(line) for line in open(predicted / 'predictions.jsonl')]
  for entry in entries:
    if entry['prediction'] is None:
      continue
    verified_answer = any(candidate['inliers'] >= 15 and
                          candidate['landmark_id'] == entry['prediction'][0]
                          for candidate in entry['candidates'])
    assert (entry['prediction'][1] >= 1.0) == verified_answer
    assert all(candidate['comparisons'] <= 20 for candidate in entry['candidates'])
  meta = json.load(open(predicted / 'predict.json'))
  assert meta['finished'] and meta['counts']['queries'] == len(test_ids)
  log = open(predicted / 'predict.log').read().splitlines()
  assert len(log) == len(test_ids) and all(' ms (classify ' in line for line in log)


def _verified(inliers_of):
  """index row → a Verification with that many inliers."""
  return {row: ransac.Verification(inliers, np.ones(inliers, bool), None, None)
          for row, inliers in inliers_of.items()}


def _distinct_ids(row):
  return f'image{row}'


def test_retrieval_lists_every_verified_match_first_most_inliers_first():
  nearest = [10, 11, 12, 13, 14]
  # 12 and 14 verified in the re-ranking window, 40 (the answer's image) beyond the nearest rows;
  # 11 checked and rejected.
  inliers_of = {12: 30, 14: 50, 40: 30, 11: 3}
  assert recognizer.retrieval_order(nearest, _verified(inliers_of), 15, _distinct_ids) == [
      14, 12, 40, 10, 11, 13]
  assert recognizer.retrieval_order(nearest, {}, 15, _distinct_ids) == nearest
  assert recognizer.retrieval_order(nearest, _verified({13: 15, 10: 14}), 15, _distinct_ids) == [
      13, 10, 11, 12, 14]


def test_a_retrieval_row_never_repeats_an_image_id():
  # An index built from --singletons=duplicate records holds one image under one id in two rows.
  ids = {10: 'a', 11: 'b', 12: 'a', 13: 'c', 14: 'b'}.get
  assert recognizer.retrieval_order([10, 11, 12, 13, 14], {}, 15, ids) == [10, 11, 13]
  # A verified duplicate moves to the front, and its twin is not listed again further down.
  assert recognizer.retrieval_order([10, 11, 12, 13, 14], _verified({12: 20}), 15, ids) == [
      12, 11, 13]


def test_verification_decides_with_ransac_accept(world, tmp_path, monkeypatch):
  # The acceptance rule is ransac.accept's alone: one that accepts nothing verifies nothing,
  # where a threshold of predict's own would still verify the answers the fixture verifies.
  monkeypatch.setattr(ransac, 'accept', lambda verification, min_inliers: False)
  _predict(world, tmp_path / 'none_accepted')
  entries = [json.loads(line) for line in open(tmp_path / 'none_accepted' / 'predictions.jsonl')]
  assert entries and all(entry['prediction'] is None or entry['prediction'][1] < 1.0
                         for entry in entries)
  assert any(candidate['inliers'] >= 15 for entry in entries for candidate in entry['candidates'])


def test_retrieval_puts_the_answers_index_image_first(world, predicted):
  entries = [json.loads(line) for line in open(predicted / 'predictions.jsonl')]
  checked = 0
  for entry in entries:
    answers = [candidate['index_image'] for candidate in entry['candidates']
               if entry['prediction'] and entry['prediction'][1] >= 1.0 and
               candidate['landmark_id'] == entry['prediction'][0]]
    if answers:
      # Ahead of it, only images the re-ranking window (--rerank 20) verified.
      assert answers[0] in entry['retrieval'][:21], entry['id']
      checked += 1
  assert checked


@pytest.mark.parametrize('first_stage', ['knn', 'both'])
def test_knn_and_fused_first_stages_recognise_too(world, tmp_path, first_stage):
  _predict(world, tmp_path, first_stage=first_stage)
  scores = _scores(world, tmp_path)
  assert scores['recognition']['gap'] > scores['recognition_unverified']['gap'], scores


def test_verify_top_k_reaches_landmarks_the_classifier_did_not_propose(world, tmp_path):
  one = export.export(export.ExportConfig(run=world['classifier'], index=world['index'],
                                          output_dir=str(tmp_path / 'top1'), top_k=1))
  assert one.classifier.top_k == 1
  _predict({**world, 'export': str(tmp_path / 'top1')}, tmp_path / 'p', verify_top_k=5)
  landmarks = set(indexes.load(os.path.join(world['export'], 'index')).landmark_ids)
  for entry in map(json.loads, open(tmp_path / 'p' / 'predictions.jsonl')):
    verified = [candidate['landmark_id'] for candidate in entry['candidates']]
    assert len(verified) == len(set(verified)) == min(5, len(landmarks))
    assert all(candidate['first_stage'] == 0.0 for candidate in entry['candidates'][1:])


def test_queries_from_a_csv_and_folder_match_the_test_shards_and_bad_images_are_rows(
    world, predicted, tmp_path):
  images = tmp_path / 'images'
  shutil.copytree(os.path.join(world['world'], 'images'), images)
  (images / 'badbad0000000001.jpg').write_bytes(b'\xff\xd8\xff\xe0 this is no JPEG')
  Image.new('RGB', (8, 8)).save(images / 'tinytiny00000002.jpg')
  test_csv = tmp_path / 'test.csv'
  rows = _rows(os.path.join(world['world'], 'test.csv'))
  with open(test_csv, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'url'])
    for image_id in [row['id'] for row in rows] + ['badbad0000000001', 'tinytiny00000002',
                                                   'missing000000003']:
      writer.writerow([image_id, ''])
  output_dir = tmp_path / 'from_csv'
  result = _predict(world, output_dir, test_csv=str(test_csv), image_dir=str(images))
  assert result['counts']['unusable'] == 3
  from_csv = {row['id']: row['landmarks'] for row in _rows(output_dir / 'recognition.csv')}
  from_shards = {row['id']: row['landmarks'] for row in _rows(predicted / 'recognition.csv')}
  assert {key: from_csv[key] for key in from_shards} == from_shards
  assert from_csv['badbad0000000001'] == from_csv['missing000000003'] == ''
  statuses = {entry['id']: entry['status'] for entry in
              map(json.loads, open(output_dir / 'predictions.jsonl'))}
  assert statuses['missing000000003'] == 'missing image file'
  assert 'too small' in statuses['tinytiny00000002']
  assert statuses['badbad0000000001'] != 'ok'


def test_a_rerun_continues_an_interrupted_journal_and_gives_the_same_files(world, predicted,
                                                                           tmp_path):
  output_dir = tmp_path / 'resumed'
  shutil.copytree(predicted, output_dir)
  lines = open(predicted / 'predictions.jsonl', 'rb').read().splitlines(keepends=True)
  # Five whole lines, then half a line: a process killed while writing.
  (output_dir / 'predictions.jsonl').write_bytes(b''.join(lines[:5]) + lines[5][:20])
  assert len(predictions.Journal(str(output_dir / 'predictions.jsonl')).entries) == 5
  # A whole line that is not an entry ends the journal there too.
  (output_dir / 'predictions.jsonl').write_bytes(b''.join(lines[:5]) + b'{"id": "x"}\n' +
                                                 b''.join(lines[5:]))
  for name in ('recognition.csv', 'recognition_unverified.csv', 'retrieval.csv'):
    (output_dir / name).unlink()
  _predict(world, output_dir)
  for name in ('recognition.csv', 'recognition_unverified.csv', 'retrieval.csv'):
    assert (output_dir / name).read_bytes() == (predicted / name).read_bytes(), name
  assert len((output_dir / 'predictions.jsonl').read_bytes().splitlines()) == len(lines)


def _without_timing(journal_path):
  return [{key: value for key, value in json.loads(line).items() if key not in ('timing', 'seconds')}
          for line in open(journal_path)]


def test_the_answers_and_their_order_do_not_depend_on_the_threads(world, tmp_path):
  for threads in (1, 4):
    _predict(world, tmp_path / str(threads), threads=threads, batch_size=3)
  for name in (predictions.JOURNAL, 'recognition.csv', 'recognition_unverified.csv',
               'retrieval.csv'):
    if name == predictions.JOURNAL:
      assert _without_timing(tmp_path / '1' / name) == _without_timing(tmp_path / '4' / name)
    else:
      assert (tmp_path / '1' / name).read_bytes() == (tmp_path / '4' / name).read_bytes(), name


class _RecordingRecognizer:
  """Classifies and decides instantly, except that the first query of a batch decides last;
  records the order of the calls."""

  def __init__(self, fail_on=None):
    self.events, self.fail_on = [], fail_on
    self._lock = threading.Lock()

  def classify(self, jpegs):
    with self._lock:
      self.events.append(('classify', list(jpegs)))
    return [jpeg for jpeg in jpegs]

  def decide(self, jpeg, classified):
    if jpeg.endswith(b'first'):
      time.sleep(0.2)
    if jpeg == self.fail_on:
      raise RuntimeError(f'cannot decide {jpeg}')
    with self._lock:
      self.events.append(('decide', jpeg))
    return recognizer.Answer('ok', landmark_id=int(classified[:1]), score=0.5)


def _query(image_id, jpeg):
  return queries.Query(image_id, jpeg, 'ok' if jpeg else 'not an image')


def test_answer_batches_keeps_query_order_and_classifies_the_next_batch_meanwhile():
  fake = _RecordingRecognizer()
  batches = [[_query('a', b'1 first'), _query('b', b'2'), _query('c', None)],
             [_query('d', b'4 first'), _query('e', b'5')]]
  answered = predict.answer_batches(fake, iter(batches), threads=3)
  first = next(answered)
  # Batch 2 was classified before batch 1's answers were handed out.
  assert [event for event in fake.events if event[0] == 'classify'] == [
      ('classify', [b'1 first', b'2']), ('classify', [b'4 first', b'5'])]
  second = next(answered)
  assert next(answered, None) is None
  assert [entry['id'] for entry in first + second] == ['a', 'b', 'c', 'd', 'e']
  assert [entry['prediction'] for entry in first + second] == [
      [1, 0.5], [2, 0.5], None, [4, 0.5], [5, 0.5]]
  assert first[2]['status'] == 'not an image'


def test_an_error_answering_a_query_reaches_the_caller_and_the_threads_stop():
  fake = _RecordingRecognizer(fail_on=b'2')
  batches = [[_query('a', b'1'), _query('b', b'2')], [_query('c', b'3 first')]]
  with pytest.raises(RuntimeError, match="cannot decide b'2'"):
    list(predict.answer_batches(fake, iter(batches), threads=2))
  assert not [thread for thread in threading.enumerate() if thread.name.startswith('tfl-answer')]


def test_predict_json_gives_the_wall_time_per_query_of_the_run(world, predicted, tmp_path):
  seconds = json.load(open(predicted / 'predict.json'))['seconds_per_query']
  assert 0 < seconds['wall'] < seconds['total']
  # A rerun of a finished prediction answers nothing: no wall time per query.
  output_dir = tmp_path / 'again'
  shutil.copytree(predicted, output_dir)
  assert _predict(world, output_dir)['seconds_per_query']['wall'] is None


def test_one_writer_per_predictions_folder(world, tmp_path):
  output_dir = tmp_path / 'taken'
  output_dir.mkdir()
  with files.exclusive_writer(str(output_dir), 'tfl-predict', predict.PredictError):
    with pytest.raises(predict.PredictError, match='another tfl-predict is writing'):
      _predict(world, output_dir)
  assert not (output_dir / 'predict.json').exists()


def test_other_settings_need_overwrite(world, predicted, tmp_path):
  output_dir = tmp_path / 'changed'
  shutil.copytree(predicted, output_dir)
  with pytest.raises(predict.PredictError, match='--overwrite'):
    _predict(world, output_dir, min_inliers=30)
  _predict(world, output_dir, min_inliers=30, overwrite=True)
  assert json.load(open(output_dir / 'predict.json'))['settings']['min_inliers'] == 30


def test_ctrl_c_ends_with_one_line_and_the_same_command_finishes(world, predicted, tmp_path):
  output_dir = tmp_path / 'interrupted'
  command = [str(BIN / 'tfl-predict'), f'--export={world["export"]}',
             f'--output_dir={output_dir}', '--first_stage=classifier', '--verify_top_k=5',
             '--batch_size=1', '--noprogress']
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  journal = output_dir / 'predictions.jsonl'
  deadline = time.time() + 120
  while time.time() < deadline and not (journal.exists() and journal.read_bytes().count(b'\n')):
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == 130, stderr
  assert stderr.strip().splitlines()[-1].startswith('tfl-predict: interrupted')
  # tfl-predict has no --resume: the same command continues.
  assert stderr.strip().splitlines()[-1].endswith('rerun the same command to continue')
  assert '--resume' not in stderr
  assert 'Traceback' not in stderr
  done = journal.read_bytes().count(b'\n')
  assert done < 16  # Stopped part-way.
  finished = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert finished.returncode == 0, finished.stderr
  assert f'resuming: {done} of 16' in finished.stdout
  for name in ('recognition.csv', 'recognition_unverified.csv', 'retrieval.csv'):
    assert (output_dir / name).read_bytes() == (predicted / name).read_bytes(), name


def test_user_mistakes_are_one_line_errors(world, tmp_path):
  def run(*flags):
    return subprocess.run([str(BIN / 'tfl-predict'), *flags], capture_output=True, text=True,
                          timeout=120)
  cases = [
      ((f'--export={tmp_path}', f'--output_dir={tmp_path / "o"}'), 'not a finished export'),
      ((f'--export={world["export"]}', f'--output_dir={tmp_path / "o"}',
        f'--test_csv={tmp_path / "none.csv"}', f'--image_dir={tmp_path}'), 'none.csv'),
      ((f'--export={world["export"]}', f'--output_dir={tmp_path / "o"}',
        f'--test_csv={tmp_path / "none.csv"}'), '--image_dir'),
  ]
  for flags, expected in cases:
    result = run(*flags)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, \
        result.stderr


def test_draw_match_pictures_a_query_against_its_verified_index_image(world, predicted, tmp_path):
  entries = [json.loads(line) for line in open(predicted / 'predictions.jsonl')]
  entry = next(entry for entry in entries if entry['prediction'] and entry['prediction'][1] >= 1)
  png = tmp_path / 'match.png'
  draw = match_pictures.drawer(str(predicted), [entry['id'], 'nosuchquery00000'])
  caption = draw(entry['id'], entry['prediction'][0], str(png))
  assert caption and 'inliers' in caption
  with Image.open(png) as picture:
    assert picture.width > picture.height > 64
  assert draw('nosuchquery00000', 1, str(tmp_path / 'x.png')) is None


def test_match_pictures_read_the_queries_in_one_pass(world, predicted, monkeypatch):
  entries = [json.loads(line) for line in open(predicted / 'predictions.jsonl')]
  passes = []
  original = queries.open_queries

  def counting_reader(export, **named):
    total, read, skipped = original(export, **named)

    def counted(wanted):
      passes.append(1)
      return read(wanted)
    return total, counted, skipped
  monkeypatch.setattr(queries, 'open_queries', counting_reader)
  ids = [entry['id'] for entry in entries[:4]]
  match_pictures.drawer(str(predicted), ids)
  assert len(passes) == 1


@pytest.mark.slow
@requires_real_data
def test_real_photos_are_recognised_by_sift_verification_of_every_landmark(tmp_path):
  """The real set with a classifier that cannot know real photos: verification recognises."""
  from tf_landmarks import data  # pylint: disable=g-import-not-at-top
  from tf_landmarks import ingest  # pylint: disable=g-import-not-at-top
  from tf_landmarks import train  # pylint: disable=g-import-not-at-top
  ingest.build_records(ingest.BuildConfig(
      output_dir=str(tmp_path / 'records'), train_csv=str(REAL_DATA / 'train.csv'),
      test_csv=str(REAL_DATA / 'test.csv'), image_dir=str(REAL_DATA / 'images'),
      validation_fraction=0.1, singletons='duplicate', max_image_size=640, num_workers=2,
      progress=False))
  train.train(train.TrainConfig(records_dir=str(tmp_path / 'records'),
                                workdir=str(tmp_path / 'classifier'), backbone='tiny',
                                weights='none', head='softmax', batch_size=16, epochs=5,
                                optimizer='adam', learning_rate=0.003, progress=False),
              data.InputConfig(image_size=96))
  index_builder.build_index(index_builder.IndexConfig(
      run=str(tmp_path / 'classifier'), local_features='sift', split='train+validation',
      output_dir=str(tmp_path / 'index'), progress=False))
  export.export(export.ExportConfig(run=str(tmp_path / 'classifier'),
                                    index=str(tmp_path / 'index'),
                                    output_dir=str(tmp_path / 'export')))
  predict.predict(predict.PredictConfig(
      export=str(tmp_path / 'export'), output_dir=str(tmp_path / 'predictions'),
      test_csv=str(REAL_DATA / 'test.csv'), image_dir=str(REAL_DATA / 'images'),
      progress=False), recognizer.RecognizerSettings(verify_top_k=8))
  scores = _scores({'world': str(REAL_DATA)}, tmp_path / 'predictions')
  assert scores['recognition']['gap'] > 0.7, scores
  assert scores['recognition']['gap'] > scores['recognition_unverified']['gap'] + 0.3, scores


def test_a_recognizer_answers_one_photo_as_tfl_predict_did(world, predicted):
  """One code path: the Python API's answer to a query's bytes is tfl-predict's journal entry."""
  entries = {entry['id']: entry
             for entry in map(json.loads, open(predicted / 'predictions.jsonl'))}
  opened = recognizer.Recognizer.open(
      world['export'], recognizer.RecognizerSettings(first_stage='classifier', verify_top_k=5))
  _, read, _ = queries.open_queries(opened.export)
  compared = verified = 0
  for image_id, query in read(lambda image_id: True):
    answer = opened.answer(query.jpeg)
    entry, expected = answer.journal_entry(image_id), entries[image_id]
    assert entry['status'] == expected['status'] == 'ok'
    assert entry['prediction'][0] == expected['prediction'][0]
    assert entry['prediction'][1] == pytest.approx(expected['prediction'][1], abs=1e-4)
    assert [(c['landmark_id'], c['inliers'], c['index_image']) for c in entry['candidates']] == [
        (c['landmark_id'], c['inliers'], c['index_image']) for c in expected['candidates']]
    assert entry['retrieval'] == expected['retrieval']
    assert answer.verified == (answer.score >= 1.0)
    if answer.verified:
      verified += 1
      picture = opened.match_picture(query.jpeg, answer.landmark_id, answer.index_image)
      assert picture.index_image == answer.index_image and picture.inliers == answer.inliers
      assert picture.png.startswith(b'\x89PNG')
    compared += 1
    if compared == 6:
      break
  assert compared == 6 and verified
  bad = opened.answer(b'not an image')
  assert bad.status == 'not a readable image' and bad.landmark_id is None
