"""Kaggle submission and solution files: round trips, scoring through files, malformed rows, the CLI."""

import json
import subprocess
import sys

import pytest

from tf_landmarks import csv_io
from tf_landmarks import submission
from helpers import REAL_DATA, REPO, requires_real_data

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
      tmp_path, 'solution.csv', 'id,images,Usage\nq1,a b,Private\nq2,c,Public\nq3,,Public\n'))
  rankings = submission.read_retrieval_submission(_write(
      tmp_path, 'submission.csv', 'id,images\nq1,a x b\nq2,y z\nq3,a\n'), truth)
  # q1: AP = (1/1 + 2/3) / 2 = 0.8333; q2: 0; q3 has no relevant image and is not averaged.
  assert submission.score_retrieval(rankings, truth)['map@100'] == pytest.approx(0.41667,
                                                                                 abs=1e-5)
  path = str(tmp_path / 'round.csv')
  submission.write_retrieval_submission(path, rankings)
  assert submission.read_retrieval_submission(path, truth) == rankings
  too_many = ' '.join(f'i{i}' for i in range(101))
  with pytest.raises(submission.SubmissionError, match='101 images, at most 100'):
    submission.read_retrieval_submission(
        _write(tmp_path, 'long.csv', f'id,images\nq1,{too_many}\n'), truth)


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
  half = _evaluate(f'--recognition_solution={solution}')
  assert half.returncode == 2 and 'give both' in half.stderr


@requires_real_data
def test_real_solutions_read_and_a_perfect_submission_scores_one(tmp_path):
  truth = submission.read_recognition_solution(str(REAL_DATA / 'recognition_solution.csv'))
  assert len(truth) == 67 and sum(1 for v in truth.values() if v) == 24
  perfect = {query: (min(landmarks), 1.0) if landmarks else None
             for query, landmarks in truth.items()}
  assert submission.score_recognition(perfect, truth)['gap'] == pytest.approx(1.0)
  relevant = submission.read_retrieval_solution(str(REAL_DATA / 'retrieval_solution.csv'))
  assert submission.score_retrieval(relevant, relevant)['map@100'] == pytest.approx(1.0)
