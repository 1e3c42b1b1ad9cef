"""Kaggle submission and solution files of the Google Landmark challenges: read, check, write, score.

Solutions are in the format of Google's scoring code (GLDv2's `dataset_file_io.py`), which lists
every test image with its `Usage`: Public and Private queries are scored apart (Kaggle's two
leaderboards), Ignored ones not at all. Recognition: `id,landmarks,Usage` (space-separated landmark
ids; empty for a query without a landmark, which is scored: a prediction on it is wrong).
Retrieval: `id,images,Usage` (the relevant index images; `None` for a query without any, which is
Ignored). A solution without the Usage column is read too, all its queries as one set (a retrieval
query without images then is not scored). A recognition submission is `id,landmarks` with one
`"<landmark_id> <confidence>"` or nothing; a retrieval submission `id,images` with up to 100 index
image ids, best first. Submissions are untrusted input: every malformed row is reported with its
line number, and nothing is scored until the file is clean (unreadable files and missing columns
raise `csv_io.CsvError`, like the builder's CSVs). Scores are of all scored queries, and of the
Public and Private ones apart (`"usage"`). Besides the challenge scores, `per_class_recognition`
gives each landmark's precision, recall and F1. The prediction command's output folder, which holds
such submissions, is `tf_landmarks/predictions.py`'s.
"""

import dataclasses
import math
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple)

import numpy as np

from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import metrics

RETRIEVAL_DEPTH = 100
# The message is one line: a few problems, each with its value shortened, show what is wrong.
_SHOWN_PROBLEMS = 3

# Kaggle's leaderboards, in the order they are shown, and the Usage of a test image not scored.
PUBLIC, PRIVATE, IGNORED = 'Public', 'Private', 'Ignored'
LEADERBOARDS = (PUBLIC, PRIVATE)
# What GLDv2's retrieval solution lists as the images of a query without relevant ones.
NO_IMAGES = 'None'

Prediction = Optional[Tuple[int, float]]


class SubmissionError(errors.UserError):
  """A submission or solution file cannot be scored; the message lists the problems."""


class Solution(Mapping):
  """A solution: query id → the truth of each scored query, and each one's Usage.

  As a mapping it holds the queries that are scored, so that it can be given wherever a plain
  query → truth mapping is (a plain dict is a solution without Usage).

  Attributes:
    usage: query id → Public or Private for every scored query; empty for a solution without a
      Usage column.
    ignored: the test images listed but not scored (Usage Ignored; retrieval queries without
      relevant images in a solution without Usage).
  """

  def __init__(self, truth: Mapping[str, Any], usage: Optional[Mapping[str, str]] = None,
               ignored: Iterable[str] = ()):
    self._truth = dict(truth)
    self.usage = dict(usage or {})
    self.ignored = frozenset(ignored)
    if self.usage and (set(self.usage) != set(self._truth)
                       or not set(self.usage.values()) <= set(LEADERBOARDS)):
      raise ValueError('usage must give every scored query Public or Private')
    if not self.ignored.isdisjoint(self._truth):
      raise ValueError('a query is both scored and ignored')

  def __getitem__(self, query_id: str) -> Any:
    return self._truth[query_id]

  def __iter__(self) -> Iterator[str]:
    return iter(self._truth)

  def __len__(self) -> int:
    return len(self._truth)

  def leaderboards(self) -> Dict[str, Dict[str, Any]]:
    """Public and Private (those present, in that order) → query id → truth of their queries."""
    return {board: {query: truth for query, truth in self._truth.items()
                    if self.usage[query] == board}
            for board in LEADERBOARDS if board in self.usage.values()}


def _ignored(solution: Mapping) -> FrozenSet[str]:
  return solution.ignored if isinstance(solution, Solution) else frozenset()


def _by_leaderboard(solution: Mapping, score: Callable[[Mapping], Dict[str, Any]],
                    scorable: Callable[[Mapping], bool]) -> Dict[str, Any]:
  """{'usage': {Public/Private: score(its queries)}} for a solution with Usage, else {}.

  A leaderboard without a `scorable` query (no landmark, no relevant image) has no score, so it is
  left out; Google's scoring code divides by zero there.
  """
  if not isinstance(solution, Solution):
    return {}
  boards = {board: score(queries) for board, queries in solution.leaderboards().items()
            if scorable(queries)}
  return {'usage': boards} if boards else {}


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


def _read_solution(path: str, column: str, parse: Callable[[str], Any],
                   needs_truth: bool) -> Solution:
  """Reads `id,<column>[,Usage]`; `parse` turns a scored row's column into its truth or raises
  ValueError with the problem. With `needs_truth`, a row with an empty truth is a query that is
  not scored: an error for a Public or Private row (Google's code would score it as a query that
  nothing answers), ignored in a solution without Usage."""
  truth, usage, ignored, problems, seen = {}, {}, set(), [], set()
  for line, row in csv_io.open_rows(path, ('id', column)):
    if _runs_over_lines(line, row, problems):
      continue
    query_id = _query_id(line, row, seen, problems, None)
    board = row.get('Usage') if 'Usage' in row else None
    if 'Usage' in row and board not in (*LEADERBOARDS, IGNORED):
      problems.append(f'line {line}: Usage {csv_io.quoted(board)} is not Public, Private or '
                      'Ignored')
      continue
    if board == IGNORED:
      # Not read further, as in Google's code: GLDv2 writes None there.
      if query_id is not None:
        ignored.add(query_id)
      continue
    try:
      value = parse(row.get(column) or '')
    except ValueError as error:
      problems.append(f'line {line}: {error}')
      continue
    if needs_truth and not value and board is not None:
      problems.append(f'line {line}: a {board} query without {column}; a query without any is '
                      'Ignored')
    elif query_id is None:
      continue
    elif needs_truth and not value:
      ignored.add(query_id)
    else:
      truth[query_id] = value
      if board is not None:
        usage[query_id] = board
  _raise_if(problems, path)
  if not truth:
    raise SubmissionError(f'{path}: no scored queries')
  return Solution(truth, usage, ignored)


def _landmark_ids(value: str) -> FrozenSet[int]:
  try:
    return frozenset(int(landmark) for landmark in value.split())
  except ValueError:
    raise ValueError(f'landmarks {csv_io.quoted(value)} are not integers') from None


def read_recognition_solution(path: str) -> Solution:
  """Query id → its landmark ids (empty for a query that shows no landmark), with Usage."""
  return _read_solution(path, 'landmarks', _landmark_ids, needs_truth=False)


def read_recognition_submission(path: str, solution: Mapping[str, FrozenSet[int]]
                                ) -> Dict[str, Prediction]:
  """Query id → (landmark id, confidence) or None for the scored queries of `solution`.

  Every id must be a test image of the solution; rows for its ignored ones are checked like the
  rest and then left out, as Google's scoring code does.
  """
  predictions, problems, seen = {}, [], set()
  ignored = _ignored(solution)
  known = set(solution) | ignored
  for line, row in csv_io.open_rows(path, ('id', 'landmarks')):
    if _runs_over_lines(line, row, problems):
      continue
    query_id = _query_id(line, row, seen, problems, known)
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
    if query_id is not None and query_id not in ignored:
      predictions[query_id] = prediction
  _raise_if(problems, path)
  return predictions


def write_recognition_submission(path: str, predictions: Mapping[str, Prediction]) -> None:
  """Writes `id,landmarks` rows (`"<landmark_id> <confidence>"` or empty), complete or not at all."""
  files.write_csv_atomically(path, ['id', 'landmarks'], (
      (query_id, '' if prediction is None else f'{prediction[0]} {prediction[1]:.6g}')
      for query_id, prediction in predictions.items()))


def _image_ids(value: str) -> Tuple[str, ...]:
  images = tuple(value.split())
  return () if images == (NO_IMAGES,) else images


def read_retrieval_solution(path: str) -> Solution:
  """Query id → its relevant index image ids for the scored queries, with Usage.

  A Public or Private query without relevant images (empty or `None`) is an error: Google's code
  would score it as a query that no image answers. Mark it Ignored, as GLDv2 does.
  """
  return _read_solution(path, 'images', _image_ids, needs_truth=True)


def _write_solution(path: str, column: str, solution: Solution, show: Callable[[Any], str],
                    not_scored: str) -> None:
  if not solution.usage:
    raise ValueError('the solution format of Google\'s scoring code needs every scored query\'s '
                     'Usage')
  rows = [(query, show(truth), solution.usage[query]) for query, truth in solution.items()]
  rows += [(query, not_scored, IGNORED) for query in solution.ignored]
  files.write_csv_atomically(path, ['id', column, 'Usage'], sorted(rows))


def write_recognition_solution(path: str, solution: Solution) -> None:
  """Writes `id,landmarks,Usage` as Google's scoring code reads it: every test image in id order,
  landmark ids ascending (none for a query without a landmark), the ignored ones Ignored.

  Raises:
    ValueError: the solution has no Usage.
  """
  _write_solution(path, 'landmarks', solution,
                  lambda landmarks: ' '.join(str(landmark) for landmark in sorted(landmarks)), '')


def write_retrieval_solution(path: str, solution: Solution) -> None:
  """Writes `id,images,Usage` as GLDv2's retrieval solution is: every test image in id order, the
  ignored ones (queries without relevant images) with images `None` and Usage Ignored, which
  Google's scoring code needs to accept a submission's rows for them.

  Raises:
    ValueError: the solution has no Usage.
  """
  _write_solution(path, 'images', solution, ' '.join, NO_IMAGES)


def read_retrieval_submission(path: str, solution: Mapping[str, Sequence[str]]
                              ) -> Dict[str, Tuple[str, ...]]:
  """Query id → up to 100 index image ids, best first, for the scored queries of `solution`.

  A submission has a row for every test image. GLDv2's retrieval solution lists them all (those not
  scored as Ignored), but older ones list only the scored queries, so rows for ignored queries and
  for queries the solution does not list are checked like the rest and then left out.

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
                      solution: Mapping[str, FrozenSet[int]]) -> Dict[str, Any]:
  """GAP as Kaggle scores it (predictions on non-landmark queries count as wrong), GAP over
  landmark queries only, accuracy of the predictions on landmark queries, and counts, over all the
  scored queries; for a `Solution` with Usage, the same again for the Public and the Private
  queries apart under "usage" (a leaderboard without landmark queries is left out)."""
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
      **_by_leaderboard(solution, lambda queries: score_recognition(
          {query: predictions[query] for query in queries if query in predictions}, queries),
                        scorable=lambda queries: any(queries.values())),
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
                    solution: Mapping[str, Sequence[str]]) -> Dict[str, Any]:
  """mAP@100 over the queries with relevant images, as the Kaggle retrieval challenge scores it;
  for a `Solution` with Usage, also for the Public and the Private queries apart under "usage"."""
  truth = {query: set(images) or None for query, images in solution.items()}
  return {'map@100': metrics.mean_average_precision_at_k(rankings, truth, RETRIEVAL_DEPTH),
          'queries_with_relevant_images': sum(1 for images in solution.values() if images),
          **_by_leaderboard(solution, lambda queries: score_retrieval(
              {query: rankings[query] for query in queries if query in rankings}, queries),
                            scorable=lambda queries: any(queries.values()))}
