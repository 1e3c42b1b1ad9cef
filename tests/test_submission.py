"""Kaggle submission and solution files: round trips, scoring through files, malformed rows, the CLI."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tf_landmarks import csv_io
from tf_landmarks import submission
from tf_landmarks import synthetic
from helpers import (OFFICIAL_SCORING, REAL_DATA, REPO, official_scoring, requires_official_scoring,
                     requires_real_data)

# Google's worked example: truth q1=B q2=C q3=A q4=C q5=D (B=2, C=3, A=1, D=4).
SOLUTION = 'id,landmarks,Usage\nq1,2,Private\nq2,3,Private\nq3,1,Public\nq4,3,Public\nq5,4,Public\n'
SUBMISSION = 'id,landmarks\nq1,2 0.91\nq2,1 0.67\nq3,1 0.33\nq4,3 0.11\nq5,\n'


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_recognition_worked_example_through_files(tmp_path):
  truth = submission.read_recognition_solution(_write(tmp_path, 'solution.csv', SOLUTION))
  predictions = submission.read_recognition_submission(
      _write(tmp_path, 'submission.csv', SUBMISSION), truth)
  scores = submission.score_recognition(predictions, truth)
  # Ranked: q1 right (P=1), q2 wrong, q3 right (P=2/3), q4 right (P=3/4); (1 + 2/3 + 3/4) / 5.
  assert scores['gap'] == pytest.approx(0.48333, abs=1e-5)
  assert scores['accuracy_on_landmark_queries'] == pytest.approx(3 / 5)
  # With q5 a non-landmark query, M = 4: (1 + 2/3 + 3/4) / 4.
  truth = submission.read_recognition_solution(
      _write(tmp_path, 'solution5.csv', SOLUTION.replace('q5,4,', 'q5,,')))
  assert submission.score_recognition(predictions, truth)['gap'] == pytest.approx(0.60417,
                                                                                  abs=1e-5)


def test_recognition_round_trip_and_atomic_write(tmp_path):
  predictions = {'a1': (17, 0.5), 'b2': None, 'c3': (4, 1e-7)}
  path = str(tmp_path / 'out.csv')
  submission.write_recognition_submission(path, predictions)
  truth = {'a1': frozenset({17}), 'b2': frozenset(), 'c3': frozenset({5})}
  assert submission.read_recognition_submission(path, truth) == predictions
  assert [p.name for p in tmp_path.iterdir()] == ['out.csv']  # No temporary file left.


@pytest.mark.parametrize('row,message', [
    ('q1,2', 'is not "<landmark_id> <confidence>"'),
    ('q1,x 0.5', 'is not "<landmark_id> <confidence>"'),
    ('q1,2 nan', 'is not "<landmark_id> <confidence>"'),
    ('q1,2 0.5 3', 'is not "<landmark_id> <confidence>"'),
    ('zz,2 0.5', 'id zz is not a query of the solution'),
    ('../x,2 0.5', "bad id '../x'"),
])
def test_malformed_recognition_rows_are_reported_with_line_numbers(tmp_path, row, message):
  truth = submission.read_recognition_solution(_write(tmp_path, 'solution.csv', SOLUTION))
  path = _write(tmp_path, 'submission.csv', f'id,landmarks\nq2,3 0.5\n{row}\n')
  with pytest.raises(submission.SubmissionError, match=f'1 bad row.*line 3: .*{message}'):
    submission.read_recognition_submission(path, truth)


@pytest.mark.parametrize('task', ['recognition', 'retrieval'])
def test_a_quote_left_open_is_one_short_error_naming_its_line(tmp_path, task):
  # The open quote on line 3 swallows the 5,000 lines after it into one field.
  column, value = ('landmarks', '1 0.5') if task == 'recognition' else ('images', 'a b')
  rows = '\n'.join(f'x{i:04d},{value}' for i in range(5000))
  path = _write(tmp_path, 'submission.csv', f'id,{column}\nq1,{value}\nq2,"{value}\n{rows}\n')
  truth = {'q1': frozenset({1}), 'q2': frozenset({1})} if task == 'recognition' else \
      {'q1': ('a',), 'q2': ('b',)}
  with pytest.raises(submission.SubmissionError) as raised:
    getattr(submission, f'read_{task}_submission')(path, truth)
  message = str(raised.value)
  assert 'line 3: a quoted field runs over several lines' in message
  assert len(message) < len(path) + 200 and '\n' not in message


def test_long_bad_values_are_shortened_in_the_message(tmp_path):
  long_id, long_value = 'q' * 5000, '1 ' * 5000
  path = _write(tmp_path, 'submission.csv', f'id,landmarks\n{long_id},1 0.5\n' + ''.join(
      f'q{i},{long_value}\n' for i in range(1, 6)))
  truth = submission.read_recognition_solution(_write(tmp_path, 'solution.csv', SOLUTION))
  with pytest.raises(submission.SubmissionError,
                     match=r"6 bad row\(s\): line 2: bad id 'q{40}'….*line 4: .*\(and 3 more\)"
                     ) as raised:
    submission.read_recognition_submission(path, truth)
  assert len(str(raised.value)) < len(path) + 400


def test_structural_errors(tmp_path):
  truth = submission.read_recognition_solution(_write(tmp_path, 'solution.csv', SOLUTION))
  with pytest.raises(csv_io.CsvError, match='missing column'):
    submission.read_recognition_submission(_write(tmp_path, 'a.csv', 'id,label\nq1,2\n'), truth)
  with pytest.raises(submission.SubmissionError, match='line 3: id q1 repeated'):
    submission.read_recognition_submission(
        _write(tmp_path, 'b.csv', 'id,landmarks\nq1,2 0.5\nq1,3 0.4\n'), truth)
  with pytest.raises(csv_io.CsvError, match='file not found'):
    submission.read_recognition_submission(str(tmp_path / 'none.csv'), truth)


def test_retrieval_map_at_100_through_files(tmp_path):
  truth = submission.read_retrieval_solution(_write(
      tmp_path, 'solution.csv', 'id,images,Usage\nq1,a b,Private\nq2,c,Public\nq3,None,Ignored\n'))
  rankings = submission.read_retrieval_submission(_write(
      tmp_path, 'submission.csv', 'id,images\nq1,a x b\nq2,y z\nq3,a\n'), truth)
  # q1: AP = (1/1 + 2/3) / 2 = 0.8333; q2: 0; q3 has no relevant image and is not averaged.
  assert submission.score_retrieval(rankings, truth)['map@100'] == pytest.approx(0.41667,
                                                                                 abs=1e-5)
  path = str(tmp_path / 'round.csv')
  submission.write_retrieval_submission(path, rankings)
  assert submission.read_retrieval_submission(path, truth) == rankings
  # A row for a test image the solution does not score is checked, then left out, as on Kaggle;
  # a file with no scored query at all is the wrong one.
  extra = _write(tmp_path, 'extra.csv', 'id,images\nq1,a b\nq9,c\n')
  assert submission.read_retrieval_submission(extra, truth) == {'q1': ('a', 'b')}
  with pytest.raises(submission.SubmissionError, match='none of its 2 queries is a query of'):
    submission.read_retrieval_submission(_write(tmp_path, 'other.csv', 'id,images\nq8,a\nq9,c\n'),
                                         truth)
  with pytest.raises(submission.SubmissionError, match="line 3: bad id '../q9'"):
    submission.read_retrieval_submission(_write(tmp_path, 'bad.csv', 'id,images\nq1,a\n../q9,c\n'),
                                         truth)
  too_many = ' '.join(f'i{i}' for i in range(101))
  with pytest.raises(submission.SubmissionError, match='101 images, at most 100'):
    submission.read_retrieval_submission(
        _write(tmp_path, 'long.csv', f'id,images\nq1,{too_many}\n'), truth)


# Kaggle's leaderboards: qa, qb Public, qc, qd Private; qe and qf Ignored, so never scored, though
# their confident predictions would move every number.
USAGE_SOLUTION = ('id,landmarks,Usage\nqa,1,Public\nqb,2,Public\nqc,3,Private\nqd,4,Private\n'
                  'qe,5,Ignored\nqf,,Ignored\n')
USAGE_SUBMISSION = 'id,landmarks\nqa,1 0.9\nqb,7 0.8\nqc,3 0.7\nqd,\nqe,5 0.95\nqf,6 0.99\n'
USAGE_RETRIEVAL_SOLUTION = 'id,images,Usage\nq1,a b,Public\nq2,c,Private\nq3,None,Ignored\n'
USAGE_RETRIEVAL_SUBMISSION = 'id,images\nq1,a x b\nq2,y c\nq3,z\n'


def test_public_and_private_are_scored_apart_and_ignored_queries_not_at_all(tmp_path):
  truth = submission.read_recognition_solution(_write(tmp_path, 's.csv', USAGE_SOLUTION))
  assert set(truth) == {'qa', 'qb', 'qc', 'qd'} and truth.ignored == {'qe', 'qf'}
  predictions = submission.read_recognition_submission(_write(tmp_path, 'p.csv', USAGE_SUBMISSION),
                                                       truth)
  assert set(predictions) == {'qa', 'qb', 'qc', 'qd'}
  scores = submission.score_recognition(predictions, truth)
  # Public: qa ✓ (1/1), qb ✗: 1 / 2. Private: qc ✓ (1/1), qd no prediction: 1 / 2. All four:
  # qa ✓, qb ✗, qc ✓ (2/3): (1 + 2/3) / 4. Scoring qe and qf too would give 0.3533.
  assert scores['gap'] == pytest.approx(5 / 12)
  assert scores['usage']['Public']['gap'] == pytest.approx(0.5)
  assert scores['usage']['Private']['gap'] == pytest.approx(0.5)
  assert scores['usage']['Private']['accuracy_on_landmark_queries'] == pytest.approx(0.5)
  relevant = submission.read_retrieval_solution(_write(tmp_path, 'r.csv', USAGE_RETRIEVAL_SOLUTION))
  rankings = submission.read_retrieval_submission(
      _write(tmp_path, 'q.csv', USAGE_RETRIEVAL_SUBMISSION), relevant)
  retrieval = submission.score_retrieval(rankings, relevant)
  # Public q1: (1/1 + 2/3) / 2; Private q2: (1/2) / 1; q3 (None, Ignored) is no query with an
  # image named 'None', which would give (5/6 + 1/2 + 0) / 3 = 0.4444.
  assert retrieval['map@100'] == pytest.approx((5 / 6 + 1 / 2) / 2)
  assert retrieval['usage']['Public']['map@100'] == pytest.approx(5 / 6)
  assert retrieval['usage']['Private']['map@100'] == pytest.approx(0.5)


def test_a_solution_without_usage_is_scored_as_one_set(tmp_path):
  truth = submission.read_recognition_solution(_write(
      tmp_path, 's.csv', 'id,landmarks\nqa,1\nqb,2\nqc,\n'))
  predictions = {'qa': (1, 0.5), 'qb': (3, 0.5), 'qc': (2, 0.9)}
  # qc (no landmark, 0.9) ✗, then the tie qa ✓ (1/2), qb ✗: (1/2) / 2.
  assert submission.score_recognition(predictions, truth) == pytest.approx({
      'gap': 0.25, 'gap_landmark_queries_only': 0.5, 'accuracy_on_landmark_queries': 0.5,
      'queries': 3, 'landmark_queries': 2, 'predictions': 3,
      'predictions_on_non_landmark_queries': 1})
  # A retrieval query without images, empty or None, is not scored when no Usage says otherwise.
  relevant = submission.read_retrieval_solution(_write(
      tmp_path, 'r.csv', 'id,images\nq1,a b\nq2,None\nq3,\n'))
  assert dict(relevant) == {'q1': ('a', 'b')} and relevant.ignored == {'q2', 'q3'}
  rankings = submission.read_retrieval_submission(
      _write(tmp_path, 'q.csv', 'id,images\nq1,b\nq2,x\n'), relevant)
  assert submission.score_retrieval(rankings, relevant) == {
      'map@100': 0.5, 'queries_with_relevant_images': 1}


@pytest.mark.parametrize('task,rows,message', [
    ('recognition', 'q1,1,public', "line 2: Usage 'public' is not Public, Private or Ignored"),
    ('recognition', 'q1,1', "line 2: Usage None is not Public"),
    ('recognition', 'q1,None,Public', "line 2: landmarks 'None' are not integers"),
    ('retrieval', 'q1,None,Public', 'line 2: a Public query without images; a query without any '
     'is Ignored'),
    ('retrieval', 'q1,,Private', 'line 2: a Private query without images'),
])
def test_solution_rows_google_would_misread_are_errors(tmp_path, task, rows, message):
  column = 'landmarks' if task == 'recognition' else 'images'
  path = _write(tmp_path, 's.csv', f'id,{column},Usage\n{rows}\nq2,7,Public\n')
  with pytest.raises(submission.SubmissionError, match=message):
    getattr(submission, f'read_{task}_solution')(path)


def test_solutions_written_in_googles_format_read_back(tmp_path):
  recognition = submission.Solution({'b': frozenset({3, 1}), 'a': frozenset()},
                                    {'a': 'Private', 'b': 'Public'}, ignored=['c'])
  submission.write_recognition_solution(str(tmp_path / 'rec.csv'), recognition)
  assert (tmp_path / 'rec.csv').read_text() == \
      'id,landmarks,Usage\na,,Private\nb,1 3,Public\nc,,Ignored\n'
  again = submission.read_recognition_solution(str(tmp_path / 'rec.csv'))
  assert again == recognition and again.usage == recognition.usage and again.ignored == {'c'}
  retrieval = submission.Solution({'b': ('x', 'y')}, {'b': 'Private'}, ignored=['a'])
  submission.write_retrieval_solution(str(tmp_path / 'ret.csv'), retrieval)
  assert (tmp_path / 'ret.csv').read_text() == 'id,images,Usage\na,None,Ignored\nb,x y,Private\n'
  again = submission.read_retrieval_solution(str(tmp_path / 'ret.csv'))
  assert again == retrieval and again.usage == retrieval.usage and again.ignored == {'a'}
  with pytest.raises(ValueError, match='needs every scored query\'s Usage'):
    submission.write_retrieval_solution(str(tmp_path / 'x.csv'), submission.Solution({'a': ('x',)}))


def _evaluate(*args):
  return subprocess.run([sys.executable, '-m', 'tf_landmarks.cli.evaluate', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_scores_and_reports_bad_files_in_one_line(tmp_path):
  solution = _write(tmp_path, 'solution.csv', SOLUTION)
  result = _evaluate(f'--recognition_submission={_write(tmp_path, "s.csv", SUBMISSION)}',
                     f'--recognition_solution={solution}',
                     f'--output_json={tmp_path / "scores.json"}')
  assert result.returncode == 0, result.stderr
  assert 'recognition: GAP 0.4833' in result.stdout
  assert json.loads((tmp_path / 'scores.json').read_text())['recognition']['gap'] == \
      pytest.approx(0.48333, abs=1e-5)
  unknown = _write(tmp_path, 'b.csv', 'id,landmarks\nq9,1 1\n')
  bad = _evaluate(f'--recognition_submission={unknown}', f'--recognition_solution={solution}')
  assert bad.returncode == 2 and 'line 2: id q9 is not a query of the solution' in bad.stderr
  assert 'Traceback' not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
  open_quote = _write(tmp_path, 'q.csv', 'id,landmarks\nq1,"2 0.5\n' + 'q2,3 0.5\n' * 20000)
  bad = _evaluate(f'--recognition_submission={open_quote}', f'--recognition_solution={solution}')
  # 20,000 lines outgrow csv's field limit (131,072 characters) before the file ends.
  assert bad.returncode == 2 and 'in the row starting at line 2 (field larger' in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1 and len(bad.stderr) < len(open_quote) + 250
  half = _evaluate(f'--recognition_solution={solution}')
  assert half.returncode == 2 and 'give both' in half.stderr


def test_cli_prints_and_writes_public_private_and_all(tmp_path):
  result = _evaluate(
      f'--recognition_submission={_write(tmp_path, "p.csv", USAGE_SUBMISSION)}',
      f'--recognition_solution={_write(tmp_path, "s.csv", USAGE_SOLUTION)}',
      f'--retrieval_submission={_write(tmp_path, "q.csv", USAGE_RETRIEVAL_SUBMISSION)}',
      f'--retrieval_solution={_write(tmp_path, "r.csv", USAGE_RETRIEVAL_SOLUTION)}',
      f'--output_json={tmp_path / "scores.json"}')
  assert result.returncode == 0, result.stderr
  for line in ('recognition: GAP 0.4167', '  Public: GAP 0.5000', '  Private: GAP 0.5000',
               '  2 Ignored queries are not scored', 'retrieval: mAP@100 0.6667',
               '  Public: mAP@100 0.8333', '  Private: mAP@100 0.5000'):
    assert f'\n{line}' in f'\n{result.stdout}', line
  scores = json.loads((tmp_path / 'scores.json').read_text())
  assert scores['recognition']['gap'] == pytest.approx(5 / 12)
  assert {board: numbers['gap'] for board, numbers in scores['recognition']['usage'].items()} == \
      pytest.approx({'Public': 0.5, 'Private': 0.5})
  assert {board: numbers['map@100'] for board, numbers in scores['retrieval']['usage'].items()} == \
      pytest.approx({'Public': 5 / 6, 'Private': 0.5})


@requires_real_data
def test_real_solutions_read_and_a_perfect_submission_scores_one(tmp_path):
  truth = submission.read_recognition_solution(str(REAL_DATA / 'recognition_solution.csv'))
  assert len(truth) == 67 and sum(1 for v in truth.values() if v) == 24
  perfect = {query: (min(landmarks), 1.0) if landmarks else None
             for query, landmarks in truth.items()}
  assert submission.score_recognition(perfect, truth)['gap'] == pytest.approx(1.0)
  relevant = submission.read_retrieval_solution(str(REAL_DATA / 'retrieval_solution.csv'))
  assert submission.score_retrieval(relevant, relevant)['map@100'] == pytest.approx(1.0)


# Per class: q6 shows landmarks 2 and 3, q5 none; q4 abstains, q7 has no row at all.
PER_CLASS_SOLUTION = 'id,landmarks\nq1,2\nq2,3\nq3,1\nq4,3\nq5,\nq6,2 3\nq7,1\n'
PER_CLASS_SUBMISSION = 'id,landmarks\nq1,2 0.9\nq2,1 0.8\nq3,1 0.7\nq4,\nq5,4 0.6\nq6,3 0.5\n'


def test_per_class_precision_recall_f1_through_files(tmp_path):
  truth = submission.read_recognition_solution(_write(tmp_path, 'solution.csv', PER_CLASS_SOLUTION))
  predictions = submission.read_recognition_submission(
      _write(tmp_path, 'submission.csv', PER_CLASS_SUBMISSION), truth)
  per_class = submission.per_class_recognition(predictions, truth)
  # Landmark 1: queries q3, q7; predicted on q2 (wrong) and q3 (right): P = 1/2, R = 1/2.
  # Landmark 2: query q1 (q6 counts under 3, the landmark predicted for it); predicted on q1: 1, 1.
  # Landmark 3: queries q2, q4, q6; predicted on q6 only: P = 1, R = 1/3, F1 = 2·(1/3)/(4/3) = 1/2.
  # Landmark 4: no query; predicted on q5, which shows no landmark: a false positive, P = 0.
  assert per_class.landmark_ids.tolist() == [1, 2, 3, 4]
  assert per_class.scores.support.tolist() == [2, 1, 3, 0]
  assert per_class.predicted.tolist() == [2, 1, 1, 1]
  assert per_class.correct.tolist() == [1, 1, 1, 0]
  np.testing.assert_allclose(per_class.scores.precision, [0.5, 1, 1, 0])
  np.testing.assert_allclose(per_class.scores.recall, [0.5, 1, 1 / 3, 0])
  np.testing.assert_allclose(per_class.scores.f1, [0.5, 1, 0.5, 0])
  # Macro means over the landmarks with queries (1, 2, 3): the never-shown 4 is left out.
  assert per_class.macro_averages() == pytest.approx({
      'classes_with_test_queries': 3, 'classes_predicted': 4, 'macro_precision': 2.5 / 3,
      'macro_recall': (0.5 + 1 + 1 / 3) / 3, 'macro_f1': 2 / 3})


def _official_script(task, predictions_path, solution_path):
  """Runs Google's compute_<task>_metrics.py; returns its stdout."""
  script = (OFFICIAL_SCORING / 'delf' / 'python' / 'datasets' / 'google_landmarks_dataset' /
            f'compute_{task}_metrics.py')
  result = subprocess.run(
      [sys.executable, str(script), f'--predictions_path={predictions_path}',
       f'--solution_path={solution_path}'], capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': str(OFFICIAL_SCORING)})
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def _printed(stdout, what):
  """{Public: value, Private: value} of a line '(Public)  <what>: 0.123456' of Google's scripts."""
  return {board: float(value) for board, value in
          re.findall(rf'\((Public|Private)\)\s+{re.escape(what)}: ([0-9.]+)', stdout)}


@requires_official_scoring
def test_googles_scripts_accept_our_files_and_tfl_evaluate_gives_their_numbers(tmp_path):
  world = tmp_path / 'world'
  synthetic.generate(str(world), synthetic.WorldSpec(
      seed=11, num_landmarks=6, num_unseen_landmarks=2, num_train_images=30, num_test_images=45,
      image_size=64))
  with open(world / 'test.csv', newline='') as f:
    test_ids = [row['id'] for row in csv.DictReader(f)]
  with open(world / 'train.csv', newline='') as f:
    train = {row['id']: int(row['landmark_id']) for row in csv.DictReader(f)}
  truth = submission.read_recognition_solution(str(world / 'recognition_solution.csv'))
  assert set(truth) == set(test_ids) and set(truth.usage.values()) == {'Public', 'Private'}
  # A prediction for every test image (some none), half of them right, confidences from three
  # values so that most are tied, in a file order that is not id order; rankings of a few train
  # images for every test image.
  rng = np.random.default_rng(0)
  landmarks = sorted(set(train.values()))
  recognition = {}
  for query in rng.permutation(test_ids).tolist():
    if rng.random() < 0.1:
      recognition[query] = None
    else:
      right = truth[query] and rng.random() < 0.5
      recognition[query] = (min(truth[query]) if right else int(rng.choice(landmarks)),
                            float(rng.choice([0.25, 0.5, 1.0])))
  rankings = {query: [str(i) for i in rng.permutation(sorted(train))[:rng.integers(0, 12)]]
              for query in test_ids}
  submission.write_recognition_submission(str(tmp_path / 'recognition.csv'), recognition)
  submission.write_retrieval_submission(str(tmp_path / 'retrieval.csv'), rankings)
  paths = {task: (str(tmp_path / f'{task}.csv'), str(world / f'{task}_solution.csv'))
           for task in ('recognition', 'retrieval')}

  # Google's scripts accept every file unchanged and print their numbers (to 6 decimals).
  printed_recognition = _official_script('recognition', *paths['recognition'])
  printed_retrieval = _official_script('retrieval', *paths['retrieval'])
  # The same numbers unrounded, by running what those scripts run.
  file_io, official = official_scoring('dataset_file_io'), official_scoring('metrics')
  expected = {}
  for task in ('recognition', 'retrieval'):
    public, private, ignored = file_io.ReadSolution(paths[task][1], task)
    predicted = file_io.ReadPredictions(paths[task][0], set(public), set(private), set(ignored),
                                        task)
    boards = {'Public': (predicted[0], public), 'Private': (predicted[1], private),
              'all': ({**predicted[0], **predicted[1]}, {**public, **private})}
    for board, (predictions, solution) in boards.items():
      if task == 'recognition':
        expected[task, board] = {
            'gap': official.GlobalAveragePrecision(predictions, solution),
            'gap_landmark_queries_only': official.GlobalAveragePrecision(
                predictions, solution, ignore_non_gt_test_images=True),
            'accuracy_on_landmark_queries': official.Top1Accuracy(predictions, solution)}
      else:
        expected[task, board] = {'map@100': official.MeanAveragePrecision(predictions, solution)}
  for board in ('Public', 'Private'):
    assert _printed(printed_recognition, 'Global Average Precision')[board] == pytest.approx(
        expected['recognition', board]['gap'], abs=1e-6)
    assert _printed(printed_retrieval, 'Mean Average Precision')[board] == pytest.approx(
        expected['retrieval', board]['map@100'], abs=1e-6)

  result = _evaluate(f'--recognition_submission={paths["recognition"][0]}',
                     f'--recognition_solution={paths["recognition"][1]}',
                     f'--retrieval_submission={paths["retrieval"][0]}',
                     f'--retrieval_solution={paths["retrieval"][1]}',
                     f'--output_json={tmp_path / "scores.json"}')
  assert result.returncode == 0, result.stderr
  ours = json.loads((tmp_path / 'scores.json').read_text())
  for (task, board), numbers in expected.items():
    scores = ours[task] if board == 'all' else ours[task]['usage'][board]
    for name, value in numbers.items():
      assert scores[name] == pytest.approx(value, abs=1e-9), (task, board, name)
