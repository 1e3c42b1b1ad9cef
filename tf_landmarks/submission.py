"""Kaggle submission and solution files of the Google Landmark challenges: read, check, write, score.

Recognition: the solution is `id,landmarks[,Usage]` (space-separated landmark ids; empty for a query
without a landmark); a submission is `id,landmarks` with one `"<landmark_id> <confidence>"` or
nothing. Retrieval: the solution is `id,images[,Usage]` (the relevant index images); a submission is
`id,images` with up to 100 index image ids, best first. Submissions are untrusted input: every
malformed row is reported with its line number, and nothing is scored until the file is clean
(unreadable files and missing columns raise `csv_io.CsvError`, like the builder's CSVs).
Besides the challenge scores, `per_class_recognition` gives each landmark's precision, recall and F1.
`open_predictions_folder` finds the submissions in the output folder of the prediction command.
"""

import dataclasses
import math
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import metrics

RETRIEVAL_DEPTH = 100
# The message is one line: a few problems, each with its value shortened, show what is wrong.
_SHOWN_PROBLEMS = 3
# The prediction command's output folder (tf_landmarks/predict.py writes it, this module reads it).
PREDICTIONS_FORMAT = 'tf-landmarks predictions v1'
PREDICTIONS_JSON = 'predict.json'
RECOGNITION_CSV = 'recognition.csv'
UNVERIFIED_RECOGNITION_CSV = 'recognition_unverified.csv'
RETRIEVAL_CSV = 'retrieval.csv'

Prediction = Optional[Tuple[int, float]]


class SubmissionError(errors.UserError):
  """A submission or solution file cannot be scored; the message lists the problems."""


def _raise_if(problems: List[str], path: str) -> None:
  if problems:
    more = f' (and {len(problems) - _SHOWN_PROBLEMS} more)' if len(problems) > _SHOWN_PROBLEMS else ''
    raise SubmissionError(f'{path}: {len(problems)} bad row(s): '
                          f'{"; ".join(problems[:_SHOWN_PROBLEMS])}{more}')


def _runs_over_lines(line: int, row: dict, problems: List[str]) -> bool:
  """True (and a problem noted) if a field of the row holds a line break: no id, landmark or
  confidence does, so it is a quote left open, which swallows the lines after it."""
  fields = [value for value in row.values() if isinstance(value, str)] + (row.get(None) or [])
  if any('\n' in field or '\r' in field for field in fields):
    problems.append(f'line {line}: a quoted field runs over several lines (a quote left open?)')
    return True
  return False


def _query_id(line: int, row: dict, seen: set, problems: List[str],
              known: Optional[Mapping]) -> Optional[str]:
  query_id = (row.get('id') or '').strip()
  if not csv_io.is_safe_image_id(query_id):
    problems.append(f'line {line}: bad id {csv_io.quoted(query_id)}')
  elif query_id in seen:
    problems.append(f'line {line}: id {query_id} repeated')
  elif known is not None and query_id not in known:
    problems.append(f'line {line}: id {query_id} is not a query of the solution')
  else:
    seen.add(query_id)
    return query_id
  return None


def read_recognition_solution(path: str) -> Dict[str, FrozenSet[int]]:
  """Query id → its landmark ids (empty for a query that shows no landmark)."""
  solution, problems, seen = {}, [], set()
  for line, row in csv_io.open_rows(path, ('id', 'landmarks')):
    if _runs_over_lines(line, row, problems):
      continue
    query_id = _query_id(line, row, seen, problems, None)
    try:
      landmarks = frozenset(int(value) for value in (row.get('landmarks') or '').split())
    except ValueError:
      problems.append(f'line {line}: landmarks {csv_io.quoted(row.get("landmarks"))} are not '
                      'integers')
      continue
    if query_id is not None:
      solution[query_id] = landmarks
  _raise_if(problems, path)
  if not solution:
    raise SubmissionError(f'{path}: no queries')
  return solution


def read_recognition_submission(path: str, solution: Mapping[str, FrozenSet[int]]
                                ) -> Dict[str, Prediction]:
  """Query id → (landmark id, confidence) or None; every id must be a query of `solution`."""
  predictions, problems, seen = {}, [], set()
  for line, row in csv_io.open_rows(path, ('id', 'landmarks')):
    if _runs_over_lines(line, row, problems):
      continue
    query_id = _query_id(line, row, seen, problems, solution)
    value = (row.get('landmarks') or '').split()
    if not value:
      prediction = None
    else:
      try:
        landmark, confidence = int(value[0]), float(value[1])
        if len(value) != 2 or not math.isfinite(confidence):
          raise ValueError
        prediction = (landmark, confidence)
      except (ValueError, IndexError):
        problems.append(f'line {line}: landmarks {csv_io.quoted(row.get("landmarks"))} is not '
                        '"<landmark_id> <confidence>"')
        continue
    if query_id is not None:
      predictions[query_id] = prediction
  _raise_if(problems, path)
  return predictions


def write_recognition_submission(path: str, predictions: Mapping[str, Prediction]) -> None:
  """Writes `id,landmarks` rows (`"<landmark_id> <confidence>"` or empty), complete or not at all."""
  files.write_csv_atomically(path, ['id', 'landmarks'], (
      (query_id, '' if prediction is None else f'{prediction[0]} {prediction[1]:.6g}')
      for query_id, prediction in predictions.items()))


def read_retrieval_solution(path: str) -> Dict[str, Tuple[str, ...]]:
  """Query id → its relevant index image ids (queries without any are kept, with none)."""
  solution, problems, seen = {}, [], set()
  for line, row in csv_io.open_rows(path, ('id', 'images')):
    if _runs_over_lines(line, row, problems):
      continue
    query_id = _query_id(line, row, seen, problems, None)
    if query_id is not None:
      solution[query_id] = tuple((row.get('images') or '').split())
  _raise_if(problems, path)
  if not solution:
    raise SubmissionError(f'{path}: no queries')
  return solution


def read_retrieval_submission(path: str, solution: Mapping[str, Sequence[str]]
                              ) -> Dict[str, Tuple[str, ...]]:
  """Query id → up to 100 index image ids, best first, for the queries of `solution`.

  A submission has a row for every test image, but retrieval solutions list only the queries that
  are scored (those with relevant index images, in the Kaggle files and ours), so rows for other
  queries are checked like the rest and then left out, as Kaggle does.

  Raises:
    SubmissionError: a malformed or repeated row, or no row for any query of `solution` (the wrong
      solution file, most likely).
  """
  rankings, problems, seen, other_queries = {}, [], set(), 0
  for line, row in csv_io.open_rows(path, ('id', 'images')):
    if _runs_over_lines(line, row, problems):
      continue
    query_id = _query_id(line, row, seen, problems, None)
    images = tuple((row.get('images') or '').split())
    if len(images) > RETRIEVAL_DEPTH:
      problems.append(f'line {line}: {len(images)} images, at most {RETRIEVAL_DEPTH} are scored')
    elif not all(csv_io.is_safe_image_id(image) for image in images):
      problems.append(f'line {line}: an image id is not a valid id')
    elif query_id in solution:
      rankings[query_id] = images
    elif query_id is not None:
      other_queries += 1
  _raise_if(problems, path)
  if other_queries and not rankings:
    raise SubmissionError(f'{path}: none of its {other_queries} queries is a query of the '
                          'retrieval solution; is it the solution of another test set?')
  return rankings


def write_retrieval_submission(path: str, rankings: Mapping[str, Sequence[str]]) -> None:
  """Writes `id,images` rows (space-separated, best first), complete or not at all."""
  files.write_csv_atomically(path, ['id', 'images'], (
      (query_id, ' '.join(images[:RETRIEVAL_DEPTH])) for query_id, images in rankings.items()))


def recognition_ranking(predictions: Mapping[str, Prediction],
                        solution: Mapping[str, FrozenSet[int]], *,
                        count_non_landmark_predictions: bool = True) -> metrics.GapRanking:
  """The predictions ranked as GAP ranks them (`metrics.gap_ranking`), with precision and recall
  at each rank: the GAP is its `.gap`, the precision–recall curve its arrays.

  Raises:
    SubmissionError: the solution has no landmark query (GAP and recall are undefined).
  """
  if not any(solution.values()):
    raise SubmissionError('the solution has no landmark query; GAP is undefined')
  return metrics.gap_ranking(
      predictions, {query: set(landmarks) or None for query, landmarks in solution.items()},
      count_non_landmark_predictions=count_non_landmark_predictions)


def score_recognition(predictions: Mapping[str, Prediction],
                      solution: Mapping[str, FrozenSet[int]]) -> Dict[str, float]:
  """GAP as Kaggle scores it (predictions on non-landmark queries count as wrong), GAP over
  landmark queries only, accuracy of the predictions on landmark queries, and counts."""
  landmark_queries = [query for query, landmarks in solution.items() if landmarks]
  correct = sum(1 for query in landmark_queries
                if predictions.get(query) and predictions[query][0] in solution[query])
  return {
      'gap': recognition_ranking(predictions, solution).gap,
      'gap_landmark_queries_only': recognition_ranking(
          predictions, solution, count_non_landmark_predictions=False).gap,
      'accuracy_on_landmark_queries': correct / len(landmark_queries),
      'queries': len(solution), 'landmark_queries': len(landmark_queries),
      'predictions': sum(1 for prediction in predictions.values() if prediction is not None),
      'predictions_on_non_landmark_queries': sum(
          1 for query, prediction in predictions.items()
          if prediction is not None and not solution[query]),
  }


def scored_landmark(landmarks: FrozenSet[int], prediction: Prediction) -> Optional[int]:
  """The one landmark a query counts under in per-class tables: the predicted one if it is among
  the query's landmarks, else the smallest of them; None for a query that shows no landmark."""
  if not landmarks:
    return None
  if prediction is not None and prediction[0] in landmarks:
    return prediction[0]
  return min(landmarks)


@dataclasses.dataclass(frozen=True)
class PerClassRecognition:
  """Per-landmark scores of a recognition submission (arrays [C], in `landmark_ids` order).

  Attributes:
    landmark_ids: int64 [C], every landmark of the solution or of a prediction, ascending.
    scores: precision, recall, F1 and support (test queries of the landmark).
    predicted: int64 [C], predictions naming the landmark.
    correct: int64 [C], of those, the ones on a query showing it.
  """
  landmark_ids: np.ndarray
  scores: metrics.PerClassScores
  predicted: np.ndarray
  correct: np.ndarray

  def macro_averages(self) -> Dict[str, float]:
    """Unweighted means of precision, recall and F1 over the landmarks with test queries (the
    landmarks only ever predicted would otherwise pull every mean towards 0)."""
    present = self.scores.support > 0
    return {'classes_with_test_queries': int(present.sum()),
            'classes_predicted': int((self.predicted > 0).sum()),
            **{f'macro_{name}': float(getattr(self.scores, name)[present].mean())
               if present.any() else 0.0 for name in ('precision', 'recall', 'f1')}}


def per_class_recognition(predictions: Mapping[str, Prediction],
                          solution: Mapping[str, FrozenSet[int]]) -> PerClassRecognition:
  """Precision, recall and F1 of every landmark, counting every prediction whatever its confidence.

  A prediction on a query without a landmark is a false positive of the predicted landmark; a query
  without a prediction is a false negative of its landmark only. A query showing several landmarks
  counts under one (`scored_landmark`), so the supports add up to the landmark queries.

  Args:
    predictions: query id → (landmark id, confidence) or None, ids all in `solution`.
    solution: query id → its landmark ids (empty for no landmark).
  """
  def true_landmark(query):
    return scored_landmark(solution[query], predictions.get(query))

  def predicted_landmark(query):
    prediction = predictions.get(query)
    return None if prediction is None else prediction[0]

  queries = list(solution)
  landmarks = sorted(({true_landmark(q) for q in queries} | {predicted_landmark(q) for q in queries})
                     - {None})
  index = {landmark: i for i, landmark in enumerate(landmarks)}
  true_labels = np.array([index.get(true_landmark(q), -1) for q in queries], np.int64)
  predicted_labels = np.array([index.get(predicted_landmark(q), -1) for q in queries], np.int64)
  scores = metrics.per_class_precision_recall_f1(true_labels, predicted_labels, len(landmarks))
  made = predicted_labels >= 0
  correct = made & (predicted_labels == true_labels)
  return PerClassRecognition(
      landmark_ids=np.array(landmarks, np.int64), scores=scores,
      predicted=np.bincount(predicted_labels[made], minlength=len(landmarks)),
      correct=np.bincount(predicted_labels[correct], minlength=len(landmarks)))


def score_retrieval(rankings: Mapping[str, Sequence[str]],
                    solution: Mapping[str, Sequence[str]]) -> Dict[str, float]:
  """mAP@100 over the queries with relevant images, as the Kaggle retrieval challenge scores it."""
  truth = {query: set(images) or None for query, images in solution.items()}
  return {'map@100': metrics.mean_average_precision_at_k(rankings, truth, RETRIEVAL_DEPTH),
          'queries_with_relevant_images': sum(1 for images in solution.values() if images)}


@dataclasses.dataclass(frozen=True)
class PredictionsFolder:
  """The submissions in the prediction command's output folder (None: the file is absent).

  Attributes:
    path: the folder.
    records_dir: the records folder of the index it predicted against, from predict.json.
    recognition: `recognition.csv`, the verified recognition submission.
    unverified_recognition: `recognition_unverified.csv`, the same queries before local-feature
      verification (first stage only).
    retrieval: `retrieval.csv`.
    first_stage: what proposed the landmarks (classifier, knn or both), from predict.json.
  """
  path: str
  records_dir: Optional[str]
  recognition: Optional[str]
  unverified_recognition: Optional[str]
  retrieval: Optional[str]
  first_stage: Optional[str] = None


def open_predictions_folder(path: str) -> PredictionsFolder:
  """Checks predict.json of a prediction folder and finds its submission files.

  Raises:
    SubmissionError: no predict.json, one of another format, or an unfinished run.
  """
  manifest_path = files.join(path, PREDICTIONS_JSON)
  if not tf.io.gfile.exists(manifest_path):
    raise SubmissionError(f'{path} is not a predictions folder (no {PREDICTIONS_JSON})')
  manifest = files.read_versioned_json(manifest_path, PREDICTIONS_FORMAT, 'a predictions folder',
                                       'rerun the prediction command', SubmissionError)

  def present(name: str) -> Optional[str]:
    candidate = files.join(path, name)
    return candidate if tf.io.gfile.exists(candidate) else None

  if manifest.get('finished') is not True:
    raise SubmissionError(f'{path} holds an unfinished prediction run; rerun the same tfl-predict '
                          'command to finish it')
  records_dir = manifest.get('records_dir')
  first_stage = (manifest.get('settings') or {}).get('first_stage')
  return PredictionsFolder(
      first_stage=first_stage if isinstance(first_stage, str) else None,
      path=path, records_dir=records_dir if isinstance(records_dir, str) and records_dir else None,
      recognition=present(RECOGNITION_CSV),
      unverified_recognition=present(UNVERIFIED_RECOGNITION_CSV),
      retrieval=present(RETRIEVAL_CSV))
