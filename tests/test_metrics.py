"""The challenge metrics on hand-computed worked examples."""

import numpy as np
import pytest

from tf_landmarks import metrics
from helpers import official_scoring, requires_official_scoring

# Google's GAP example: 5 queries, q5 without a prediction.
TRUTH = {'q1': 'B', 'q2': 'C', 'q3': 'A', 'q4': 'C', 'q5': 'D'}
PREDICTIONS = {'q1': ('B', 0.91), 'q2': ('A', 0.67), 'q3': ('A', 0.33), 'q4': ('C', 0.11),
               'q5': None}


def test_gap_google_worked_example():
  # Ranked: B .91 right (P=1/1), A .67 wrong, A .33 right (P=2/3), C .11 right (P=3/4).
  # (1 + 2/3 + 3/4) / M=5 = 2.41667 / 5.
  assert metrics.gap(PREDICTIONS, TRUTH) == pytest.approx(0.483333, abs=1e-6)


def test_gap_divides_by_landmark_queries_only():
  # q5 shows no landmark: the same sum over M=4 queries. 2.41667 / 4.
  truth = {**TRUTH, 'q5': None}
  assert metrics.gap(PREDICTIONS, truth) == pytest.approx(0.604167, abs=1e-6)
  assert metrics.gap({k: v for k, v in PREDICTIONS.items() if k != 'q5'}, truth) == (
      pytest.approx(0.604167, abs=1e-6))


def test_gap_prediction_on_a_non_landmark_query_counts_as_wrong_unless_told_to_ignore_it():
  truth = {**TRUTH, 'q5': None}
  predictions = {**PREDICTIONS, 'q5': ('D', 0.5)}
  # Ranked: B .91 ✓ (1/1), A .67 ✗, D .50 ✗ (q5 is a distractor), A .33 ✓ (2/4), C .11 ✓ (3/5).
  # (1 + 0.5 + 0.6) / 4 = 0.525.
  assert metrics.gap(predictions, truth) == pytest.approx(0.525)
  # Ignored: the ranking of the previous test, 0.604167.
  assert metrics.gap(predictions, truth, count_non_landmark_predictions=False) == (
      pytest.approx(0.604167, abs=1e-6))


def test_gap_ranks_equal_confidences_by_query_id_then_label_not_by_file_order():
  # Both at 0.5: the wrong qb comes first in the file, but qa (right) ranks first as on Kaggle:
  # (1/1) / 2 = 0.5, where file order would give (1/2) / 2 = 0.25.
  truth = {'qa': 'A', 'qb': 'B'}
  assert metrics.gap({'qb': ('C', 0.5), 'qa': ('A', 0.5)}, truth) == pytest.approx(0.5)
  assert metrics.gap({'qa': ('A', 0.5), 'qb': ('C', 0.5)}, truth) == pytest.approx(0.5)


@requires_official_scoring
@pytest.mark.parametrize('seed', range(5))
def test_gap_with_ties_equals_googles_global_average_precision(seed):
  official = official_scoring('metrics')
  rng = np.random.default_rng(seed)
  queries = [f'{i:016x}' for i in rng.permutation(200)]  # File order is not id order.
  truth = {q: [] if rng.random() < 0.3 else [int(rng.integers(5))] for q in queries}
  # Three confidence levels, so nearly every prediction is tied with many others.
  predictions = {q: (int(rng.integers(5)), float(rng.choice([0.25, 0.5, 1.0])))
                 for q in queries if rng.random() < 0.9}
  as_google = {q: {'class': label, 'score': score} for q, (label, score) in predictions.items()}
  for ignore_non_landmark in (False, True):
    expected = official.GlobalAveragePrecision(as_google, truth,
                                               ignore_non_gt_test_images=ignore_non_landmark)
    assert metrics.gap(predictions, truth, count_non_landmark_predictions=not ignore_non_landmark
                       ) == pytest.approx(expected, abs=1e-12)


def test_gap_accepts_several_landmarks_per_query():
  # q2 shows A and C, so "A .67" becomes right: (1 + 2/2 + 3/3 + 4/4) / 5 = 0.8.
  truth = {**TRUTH, 'q2': {'A', 'C'}}
  assert metrics.gap(PREDICTIONS, truth) == pytest.approx(0.8)


@pytest.mark.parametrize('predictions,message', [
    ({'q9': ('A', 0.5)}, 'not in the ground truth'),
    ({'q1': ('A', float('nan'))}, 'not finite'),
    ({'q1': ('A', 'high')}, 'not a number'),
    ({'q1': 'A 0.5'}, r'not a \(label, confidence\) pair'),
])
def test_gap_rejects_bad_predictions_with_a_clear_message(predictions, message):
  with pytest.raises(ValueError, match=message):
    metrics.gap(predictions, TRUTH)


def test_gap_without_landmark_queries_is_undefined():
  with pytest.raises(ValueError, match='undefined'):
    metrics.gap({}, {'q1': None, 'q2': set()})


def test_map_at_k_worked_example():
  truth = {'q1': {'a', 'b'}, 'q2': {'c', 'd', 'e', 'f'}, 'q3': None, 'q4': 'g'}
  predictions = {'q1': ['a', 'x', 'b', 'y'], 'q2': ['x', 'c', 'y', 'd'], 'q3': ['a']}
  # k=3. q1: hits at ranks 1 and 3, (1/1 + 2/3) / min(2, 3) = 0.83333.
  # q2: hit at rank 2 only ('d' is rank 4 > k), (1/2) / min(4, 3) = 0.16667.
  # q3 has no relevant images: not averaged. q4: no predictions, 0.
  # mAP@3 = (0.83333 + 0.16667 + 0) / 3 = 0.33333.
  assert metrics.mean_average_precision_at_k(predictions, truth, k=3) == pytest.approx(1 / 3)
  # k=100: q2 also gets 'd' at rank 4: (1/2 + 2/4) / min(4, 100) = 0.25. (0.83333 + 0.25) / 3.
  assert metrics.mean_average_precision_at_k(predictions, truth) == pytest.approx(
      (5 / 6 + 0.25) / 3)


def test_map_at_k_a_repeated_image_is_relevant_once():
  # ['a', 'a', 'b'] for {a, b}: rank 2 is a repeat, so (1/1 + 2/3) / 2, not (1 + 1 + 1) / 2.
  score = metrics.mean_average_precision_at_k({'q': ['a', 'a', 'b']}, {'q': ['a', 'b']})
  assert score == pytest.approx(5 / 6)


def test_map_at_k_rejects_bad_input():
  with pytest.raises(ValueError, match='k must be'):
    metrics.mean_average_precision_at_k({}, {'q': 'a'}, k=0)
  with pytest.raises(ValueError, match='not in the ground truth'):
    metrics.mean_average_precision_at_k({'other': ['a']}, {'q': 'a'})
  with pytest.raises(ValueError, match='undefined'):
    metrics.mean_average_precision_at_k({}, {'q': None})


def test_top_k_accuracy_worked_example_with_ties():
  scores = np.array([[0.1, 0.5, 0.4],    # true 0: 2 classes score higher.
                     [0.3, 0.3, 0.4],    # true 0: 1 higher (class 1 ties, does not count).
                     [0.9, 0.05, 0.05],  # true 1: 1 higher.
                     [0.2, 0.7, 0.1]])   # true 1: 0 higher.
  labels = [0, 0, 1, 1]
  # Hit when fewer than k classes score strictly higher: k=1 → 1/4, k=2 → 3/4, k=3 → 4/4.
  assert metrics.top_k_accuracy(labels, scores, 1) == 0.25
  assert metrics.top_k_accuracy(labels, scores, 2) == 0.75
  assert metrics.top_k_accuracy(labels, scores, 3) == 1.0


@pytest.mark.parametrize('labels,scores,k,message', [
    ([0, 3], np.zeros((2, 3)), 1, 'must be in'),
    ([0], np.zeros((2, 3)), 1, 'need labels'),
    ([0.0, 1.0], np.zeros((2, 3)), 1, 'integers'),
    ([0, 1], np.zeros((2, 3)), 0, 'k must be'),
])
def test_top_k_accuracy_rejects_bad_input(labels, scores, k, message):
  with pytest.raises(ValueError, match=message):
    metrics.top_k_accuracy(labels, scores, k)


def test_per_class_precision_recall_f1_worked_example():
  true = [0, 0, 1, 2, -1, 1]  # -1: a non-landmark example.
  predicted = [0, 1, 1, -1, 1, 1]  # -1: no prediction.
  scores = metrics.per_class_precision_recall_f1(true, predicted)
  # Class 0: predicted once, right once → P=1; 1 of its 2 examples found → R=0.5;
  #   F1 = 2·1·0.5 / 1.5 = 0.66667.
  # Class 1: predicted 4 times (examples 1, 2, 4, 5), right twice → P=0.5; both its examples
  #   found → R=1; F1 = 2·0.5·1 / 1.5 = 0.66667. The prediction on the non-landmark is a miss.
  # Class 2: never predicted → P=0; its example abstained → R=0; F1=0.
  np.testing.assert_allclose(scores.precision, [1.0, 0.5, 0.0])
  np.testing.assert_allclose(scores.recall, [0.5, 1.0, 0.0])
  np.testing.assert_allclose(scores.f1, [2 / 3, 2 / 3, 0.0])
  np.testing.assert_array_equal(scores.support, [2, 2, 1])


def test_per_class_precision_recall_f1_counts_unseen_classes_and_checks_range():
  scores = metrics.per_class_precision_recall_f1([0], [0], num_classes=3)
  np.testing.assert_allclose(scores.f1, [1.0, 0.0, 0.0])
  with pytest.raises(ValueError, match='out of range'):
    metrics.per_class_precision_recall_f1([0, 5], [0, 0], num_classes=3)
  with pytest.raises(ValueError, match='one length'):
    metrics.per_class_precision_recall_f1([0, 1], [0])
