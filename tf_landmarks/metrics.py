"""Evaluation metrics of the Google Landmarks challenges, in plain numpy/python (no TensorFlow).

- `gap`: Global Average Precision (micro-AP) of the recognition challenge.
- `mean_average_precision_at_k`: mAP@100 of the retrieval challenge.
- `top_k_accuracy` and `per_class_precision_recall_f1`: classifier diagnostics on label arrays.

Query and image ids are any hashable values (the Kaggle files use hex strings). Landmark labels are
any hashable values too, compared with `==`; a ground truth may name several landmarks per query
(the Kaggle solution files allow it), and a prediction is correct if its label is one of them.
"""

import dataclasses
import math
from typing import Collection, Hashable, Mapping, Optional, Sequence, Union

import numpy as np

Prediction = Optional[tuple[Hashable, float]]
# One label, a collection of labels, or None / empty for a query showing no landmark.
Truth = Union[None, Hashable, Collection[Hashable]]


def _label_set(truth: Truth) -> frozenset:
  """The landmark labels of one ground-truth entry (empty for a non-landmark query)."""
  if truth is None:
    return frozenset()
  # Strings and bytes are single labels even though they are collections of characters.
  if isinstance(truth, (set, frozenset, list, tuple)):
    return frozenset(truth)
  return frozenset({truth})


def _check_known_ids(kind: str, predicted_ids, truth: Mapping) -> None:
  unknown = [query_id for query_id in predicted_ids if query_id not in truth]
  if unknown:
    raise ValueError(f'{len(unknown)} {kind} ids are not in the ground truth, e.g. {unknown[0]!r}')


def gap(predictions: Mapping[Hashable, Prediction], truth: Mapping[Hashable, Truth], *,
        count_non_landmark_predictions: bool = True) -> float:
  """Global Average Precision of the Google Landmark Recognition challenge.

  All predictions, at most one (label, confidence) per query, are ranked by confidence, highest
  first; GAP = (1/M) Σ_i P(i)·rel(i), where P(i) is the precision of the first i predictions,
  rel(i) is 1 if prediction i names a landmark of its query, and M is the number of queries whose
  ground truth has a landmark. A query without a prediction lowers GAP only through M. Equal
  confidences are ranked by query id, then label, ascending: Kaggle's convention, which Google's
  scoring code follows, so that a tie scores the same whatever the order of the file.

  Args:
    predictions: query id → (label, confidence), or None for no prediction. Ids missing here are
      queries without a prediction.
    truth: query id → landmark label, collection of labels, or None / empty for a query that shows
      no landmark. Every query of the test set must be here.
    count_non_landmark_predictions: if True (the Kaggle 2019+ rule), a prediction on a
      non-landmark query stays in the ranking as a wrong answer, so confident guesses on
      distractors cost precision; if False such predictions are dropped before ranking.

  Returns:
    GAP in [0, 1].

  Raises:
    ValueError: a predicted id is not in `truth`, a confidence is not a finite number, a prediction
      is not a (label, confidence) pair, or no query of `truth` has a landmark (GAP is undefined).
    TypeError: query ids, or labels, that cannot be ordered among themselves (the tie order).
  """
  return gap_ranking(predictions, truth,
                     count_non_landmark_predictions=count_non_landmark_predictions).gap


@dataclasses.dataclass(frozen=True)
class GapRanking:
  """The ranking GAP is computed from, as a precision–recall curve.

  Attributes:
    precision: float [N], precision of the first i + 1 ranked predictions.
    recall: float [N], correct predictions among them over the landmark queries.
    is_correct: bool [N], whether ranked prediction i names a landmark of its query.
    num_landmark_queries: M, the queries whose ground truth has a landmark.
  """
  precision: np.ndarray
  recall: np.ndarray
  is_correct: np.ndarray
  num_landmark_queries: int

  @property
  def gap(self) -> float:
    """Σ precision at the correct predictions / M: the area under the steps of the curve."""
    return float(self.precision[self.is_correct].sum() / self.num_landmark_queries)


def gap_ranking(predictions: Mapping[Hashable, Prediction], truth: Mapping[Hashable, Truth], *,
                count_non_landmark_predictions: bool = True) -> GapRanking:
  """The predictions ranked as `gap` ranks them, with precision and recall at each rank.

  Arguments and errors as `gap`, whose value is the ranking's `gap`.
  """
  _check_known_ids('predicted query', predictions, truth)
  num_landmark_queries = sum(1 for labels in truth.values() if _label_set(labels))
  if num_landmark_queries == 0:
    raise ValueError('no query of the ground truth shows a landmark, so GAP is undefined')
  ranked = []  # (confidence, query id, label, is_correct)
  for query_id, prediction in predictions.items():
    if prediction is None:
      continue
    if not isinstance(prediction, (tuple, list)) or len(prediction) != 2:
      raise ValueError(f'the prediction for {query_id!r} is not a (label, confidence) pair: '
                       f'{prediction!r}')
    label, confidence = prediction
    confidence = _finite_float(confidence, f'the confidence for {query_id!r}')
    relevant = _label_set(truth[query_id])
    if not relevant and not count_non_landmark_predictions:
      continue
    ranked.append((confidence, query_id, label, label in relevant))
  ranked.sort(key=lambda entry: (-entry[0], entry[1], entry[2]))
  is_correct = np.array([entry[3] for entry in ranked], bool)
  correct_so_far = np.cumsum(is_correct, dtype=np.float64)
  return GapRanking(precision=correct_so_far / np.arange(1, len(ranked) + 1),
                    recall=correct_so_far / num_landmark_queries, is_correct=is_correct,
                    num_landmark_queries=num_landmark_queries)


def _finite_float(value, what: str) -> float:
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{what} is not a number: {value!r}') from None
  if not math.isfinite(number):
    raise ValueError(f'{what} is not finite: {value!r}')
  return number


def mean_average_precision_at_k(predictions: Mapping[Hashable, Sequence[Hashable]],
                                truth: Mapping[Hashable, Truth], k: int = 100) -> float:
  """Mean Average Precision @k of the Google Landmark Retrieval challenge.

  Per query q: AP@k = (1/min(m_q, k)) Σ_{i≤k} P(i)·rel(i), with m_q the number of index images
  relevant to q, P(i) the precision of the first i retrieved images and rel(i) = 1 if image i is
  relevant. An image retrieved again later in the same list is not relevant the second time, so
  repeats cannot push AP above 1. The mean runs over the queries of `truth` that have relevant
  images; a query without predictions scores 0, queries without relevant images are ignored.

  Args:
    predictions: query id → index image ids, best first (only the first k are read).
    truth: query id → relevant index image id(s), or None / empty.
    k: the cut-off (100 in the challenge).

  Returns:
    mAP@k in [0, 1].

  Raises:
    ValueError: k < 1, a predicted query is not in `truth`, or no query has relevant images.
  """
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  _check_known_ids('predicted query', predictions, truth)
  scored_queries = 0
  total = 0.0
  for query_id, relevant_ids in truth.items():
    relevant = _label_set(relevant_ids)
    if not relevant:
      continue
    scored_queries += 1
    seen = set()
    hits = 0
    precision_sum = 0.0
    for rank, image_id in enumerate(list(predictions.get(query_id, ()))[:k], start=1):
      if image_id in relevant and image_id not in seen:
        hits += 1
        precision_sum += hits / rank
      seen.add(image_id)
    total += precision_sum / min(len(relevant), k)
  if scored_queries == 0:
    raise ValueError('no query of the ground truth has relevant index images, so mAP is undefined')
  return total / scored_queries


def top_k_accuracy(labels: Sequence[int], scores: np.ndarray, k: int) -> float:
  """The fraction of examples whose true class is among the k highest scores.

  A class tied with the k-th score counts as inside the top k, as in `tf.math.in_top_k`: the true
  class is a hit when fewer than k classes score strictly higher.

  Args:
    labels: int [N], true class indices in [0, C).
    scores: float [N, C] (logits or probabilities; only the order matters).
    k: how many of the best classes count, >= 1.

  Returns:
    Accuracy in [0, 1].

  Raises:
    ValueError: shapes disagree, a label is out of range, N is 0, or k < 1.
  """
  labels = np.asarray(labels)
  scores = np.asarray(scores, dtype=np.float64)
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  if scores.ndim != 2 or labels.shape != (scores.shape[0],):
    raise ValueError(f'need labels [N] and scores [N, C], got {labels.shape} and {scores.shape}')
  if labels.size == 0:
    raise ValueError('top-k accuracy of zero examples is undefined')
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integers, got dtype {labels.dtype}')
  if labels.min() < 0 or labels.max() >= scores.shape[1]:
    raise ValueError(f'labels must be in [0, {scores.shape[1]}), got [{labels.min()}, '
                     f'{labels.max()}]')
  true_scores = scores[np.arange(len(labels)), labels]
  classes_scoring_higher = (scores > true_scores[:, None]).sum(axis=1)
  return float(np.mean(classes_scoring_higher < k))


@dataclasses.dataclass(frozen=True)
class PerClassScores:
  """Per-class precision, recall, F1 and support (float arrays [C]; support is int [C]).

  A class that was never predicted has precision 0; a class absent from the truth has recall 0;
  F1 is 0 when precision + recall is 0 (no division by zero anywhere).
  """
  precision: np.ndarray
  recall: np.ndarray
  f1: np.ndarray
  support: np.ndarray


def per_class_precision_recall_f1(true_labels: Sequence[int], predicted_labels: Sequence[int],
                                  num_classes: Optional[int] = None) -> PerClassScores:
  """Precision, recall and F1 of every class, from one predicted class per example.

  A negative value means "none": a negative true label marks a non-landmark example (a prediction
  on it is a false positive of the predicted class), a negative prediction an abstention (a false
  negative of the true class, charged to no class's precision).

  Args:
    true_labels: int [N], class indices or < 0 for no landmark.
    predicted_labels: int [N], class indices or < 0 for no prediction.
    num_classes: C; defaults to 1 + the largest label seen.

  Returns:
    PerClassScores with arrays of length C.

  Raises:
    ValueError: the arrays differ in length, are not integers, or a label is >= num_classes.
  """
  true_labels = np.asarray(true_labels)
  predicted_labels = np.asarray(predicted_labels)
  if true_labels.ndim != 1 or true_labels.shape != predicted_labels.shape:
    raise ValueError(f'need two int arrays [N] of one length, got {true_labels.shape} and '
                     f'{predicted_labels.shape}')
  for name, array in (('true', true_labels), ('predicted', predicted_labels)):
    if array.size and not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f'{name} labels must be integers, got dtype {array.dtype}')
  largest = max([-1, *true_labels.tolist(), *predicted_labels.tolist()])
  if num_classes is None:
    num_classes = largest + 1
  elif largest >= num_classes:
    raise ValueError(f'label {largest} is out of range for num_classes={num_classes}')
  # bincount over `labels + 1` puts every "none" (< 0 → clipped to -1) in bin 0, then drops it.
  def count(labels):
    return np.bincount(np.maximum(labels, -1) + 1, minlength=num_classes + 1)[1:]
  correct = predicted_labels[(predicted_labels == true_labels) & (true_labels >= 0)]
  true_positives = count(correct).astype(np.float64)
  predicted = count(predicted_labels)
  support = count(true_labels)
  precision = np.divide(true_positives, predicted, out=np.zeros(num_classes), where=predicted > 0)
  recall = np.divide(true_positives, support, out=np.zeros(num_classes), where=support > 0)
  both = precision + recall
  f1 = np.divide(2 * precision * recall, both, out=np.zeros(num_classes), where=both > 0)
  return PerClassScores(precision=precision, recall=recall, f1=f1, support=support)
