"""Per-example losses on hand-computed worked examples, plus shapes and gradients."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_landmarks.models import losses

# p = softmax(ln 3, 0) = (0.75, 0.25).
LOGITS = np.array([[math.log(3.0), 0.0]], np.float32)


def test_cross_entropy_worked_example_int_and_soft_labels_agree():
  # −ln 0.75 = 0.287682.
  assert float(losses.cross_entropy([0], LOGITS)[0]) == pytest.approx(0.287682, rel=1e-5)
  assert float(losses.cross_entropy([[1.0, 0.0]], LOGITS)[0]) == pytest.approx(0.287682, rel=1e-5)
  # ε = 0.2 over 2 classes: targets (0.9, 0.1): −0.9·ln 0.75 − 0.1·ln 0.25 = 0.258914 + 0.138629.
  smoothed = 0.397543
  assert float(losses.cross_entropy([0], LOGITS, 0.2)[0]) == pytest.approx(smoothed, rel=1e-5)
  assert float(losses.cross_entropy([[1.0, 0.0]], LOGITS, 0.2)[0]) == pytest.approx(smoothed,
                                                                                     rel=1e-5)
  # A MixUp label (0.5, 0.5): −0.5·ln 0.75 − 0.5·ln 0.25 = 0.143841 + 0.693147.
  assert float(losses.cross_entropy([[0.5, 0.5]], LOGITS)[0]) == pytest.approx(0.836988, rel=1e-5)


def test_cross_entropy_is_per_example_and_checks_smoothing():
  logits = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
  assert losses.cross_entropy([0, 1, 3], logits, 0.1).shape == (3,)
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.cross_entropy([0], LOGITS, 1.0)
  with pytest.raises(ValueError, match='class ids'):
    losses.cross_entropy(np.zeros((1, 2, 1)), LOGITS)


def test_ldam_margins_worked_example():
  # n^(−1/4) for n = 16, 81, 1: 1/2, 1/3, 1. K = 0.5 / 1, so Δ = 0.25, 0.16667, 0.5.
  np.testing.assert_allclose(losses.ldam_margins([16, 81, 1]), [0.25, 1 / 6, 0.5], rtol=1e-6)
  with pytest.raises(ValueError, match='1 of 3 classes have none'):
    losses.ldam_margins([16, 0, 1])


def test_ldam_loss_worked_example():
  margins = losses.ldam_margins([16, 81, 1])
  logits = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 1.0]], np.float32)
  # Example 1, class 0: (1 − 0.25, 0.5, 0)·2 = (1.5, 1, 0); CE = ln(e^1.5 + e + 1) − 1.5
  #   = ln(4.48169 + 2.71828 + 1) − 1.5 = 2.104131 − 1.5 = 0.604131.
  # Example 2, class 2: (0, 0, 1 − 0.5)·2 = (0, 0, 1); CE = ln(2 + e) − 1 = 0.551445.
  values = losses.ldam_loss([0, 2], logits, margins, scale=2.0)
  np.testing.assert_allclose(values, [0.604131, 0.551445], rtol=1e-5)
  # Class weights multiply each example's loss by its class's weight.
  weighted = losses.ldam_loss([0, 2], logits, margins, scale=2.0, class_weights=[1.0, 2.0, 3.0])
  np.testing.assert_allclose(weighted, [0.604131, 3 * 0.551445], rtol=1e-5)
  # One-hot labels give the same as class ids.
  np.testing.assert_allclose(losses.ldam_loss(np.eye(3)[[0, 2]], logits, margins, scale=2.0),
                             values, rtol=1e-6)


def test_drw_class_weights_worked_example():
  # β = 0.9: effective numbers (1 − 0.9^n) / 0.1 = 1 (n = 1) and 1.9 (n = 2); weights 1 and 1/1.9,
  # normalised to mean 1: × 2 / (1 + 0.526316) → 1.310345 and 0.689655.
  np.testing.assert_allclose(losses.drw_class_weights([1, 2], beta=0.9), [1.310345, 0.689655],
                             rtol=1e-5)
  np.testing.assert_allclose(losses.drw_class_weights([5, 500], beta=0.0), [1.0, 1.0])
  with pytest.raises(ValueError, match='beta'):
    losses.drw_class_weights([1, 2], beta=1.0)


# Five 2-D points: classes 0 and 1 at the corners of a 3×4 rectangle, class 2 alone.
#   P0 (0, 0) c0   P1 (3, 0) c0   P2 (0, 4) c1   P3 (3, 4) c1   P4 (0, −1) c2
# Distances: d01 = 3, d02 = 4, d03 = 5, d04 = 1, d12 = 5, d13 = 4, d14 = √10 = 3.16228,
#            d23 = 3, d24 = 5, d34 = √34 = 5.83095.
RECTANGLE = np.array([[0, 0], [3, 0], [0, 4], [3, 4], [0, -1]], np.float32)
RECTANGLE_LABELS = np.array([0, 0, 1, 1, 2], np.int32)


def test_triplet_batch_hard_worked_example():
  # Margin 0.5. Hardest positive / negative: P0 3 / 1 → 2.5; P1 3 / √10 → 0.33772;
  # P2 3 / 4 → 0 (−0.5); P3 3 / 4 → 0; P4 has no positive → 0.
  values = losses.triplet_loss(RECTANGLE_LABELS, RECTANGLE, margin=0.5)
  np.testing.assert_allclose(values, [2.5, 3.5 - math.sqrt(10), 0, 0, 0], atol=1e-5)
  # Squared distances: P0 9 − 1 + 0.5 = 8.5; P1 9 − 10 + 0.5 < 0; P2, P3 9 − 16 + 0.5 < 0.
  values = losses.triplet_loss(RECTANGLE_LABELS, RECTANGLE, margin=0.5, distance='squared')
  np.testing.assert_allclose(values, [8.5, 0, 0, 0, 0], atol=1e-4)


def test_triplet_semi_hard_worked_example():
  # Margin 0.5. The closest negative farther than the positive (d = 3 for every anchor):
  # P0: negatives 4, 5, 1 → 4: 3 − 4 + 0.5 < 0 → 0 (batch-hard took the closer 1: 2.5).
  # P1: negatives 5, 4, √10 → √10: 0.33772. P2: 4, 5, 5 → 4: 0. P3: 5, 4, √34 → 4: 0. P4: 0.
  values = losses.triplet_loss(RECTANGLE_LABELS, RECTANGLE, margin=0.5, mining='semi_hard')
  np.testing.assert_allclose(values, [0, 3.5 - math.sqrt(10), 0, 0, 0], atol=1e-5)


def test_triplet_semi_hard_falls_back_to_the_farthest_negative_and_averages_positives():
  # On a line: x0 = 0, x1 = 1, x2 = 3 (class 0), x3 = 2 (class 1). Margin 0.5.
  # x0: positives 1 (x1), 3 (x2); negative 2. For d = 1 the negative 2 is farther: 1 − 2 + 0.5 < 0;
  #     for d = 3 none is, so the farthest (2): 3 − 2 + 0.5 = 1.5. Mean over positives 0.75.
  # x1: positives 1, 2; negative 1 (not strictly farther than 1): 0.5 and 1.5 → 1.0.
  # x2: positives 3, 2; negative 1: 2.5 and 1.5 → 2.0. x3: no positive → 0.
  points = np.array([[0, 0], [1, 0], [3, 0], [2, 0]], np.float32)
  labels = np.array([0, 0, 0, 1], np.int32)
  values = losses.triplet_loss(labels, points, margin=0.5, mining='semi_hard')
  np.testing.assert_allclose(values, [0.75, 1.0, 2.0, 0.0], atol=1e-5)
  # Batch-hard on the same points: x0 3 − 2 + 0.5, x1 2 − 1 + 0.5, x2 3 − 1 + 0.5.
  values = losses.triplet_loss(labels, points, margin=0.5)
  np.testing.assert_allclose(values, [1.5, 1.5, 2.5, 0.0], atol=1e-5)


def test_triplet_cosine_distance_worked_example():
  # (1, 0) c0, (0, 2) c0, (1, 1) c1. Cosine distances: d01 = 1 − 0 = 1, d02 = d12 = 1 − 1/√2.
  # Margin 0.2: 1 − (1 − 1/√2) + 0.2 = 0.90711 for both class-0 anchors; (1, 1) has no positive.
  points = np.array([[1, 0], [0, 2], [1, 1]], np.float32)
  values = losses.triplet_loss([0, 0, 1], points, margin=0.2, distance='cosine')
  np.testing.assert_allclose(values, [0.907107, 0.907107, 0.0], atol=1e-5)


def _semi_hard_by_brute_force(labels, points, margin):
  distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
  result = np.zeros(len(labels))
  for anchor in range(len(labels)):
    positives = [p for p in range(len(labels)) if p != anchor and labels[p] == labels[anchor]]
    negatives = distances[anchor, labels != labels[anchor]]
    if not positives or not negatives.size:
      continue
    pair_losses = []
    for positive in positives:
      farther = negatives[negatives > distances[anchor, positive]]
      chosen = farther.min() if farther.size else negatives.max()
      pair_losses.append(max(distances[anchor, positive] - chosen + margin, 0.0))
    result[anchor] = np.mean(pair_losses)
  return result


def test_triplet_semi_hard_matches_brute_force_on_random_points():
  rng = np.random.default_rng(3)
  points = rng.normal(size=(16, 3)).astype(np.float32)
  labels = rng.integers(0, 4, size=16).astype(np.int32)
  np.testing.assert_allclose(losses.triplet_loss(labels, points, margin=0.3, mining='semi_hard'),
                             _semi_hard_by_brute_force(labels, points, 0.3), atol=1e-5)


def test_triplet_rejects_unknown_modes():
  with pytest.raises(ValueError, match='batch_hard, semi_hard'):
    losses.triplet_loss([0, 1], RECTANGLE[:2], mining='hardest')
  with pytest.raises(ValueError, match='euclidean, squared, cosine'):
    losses.triplet_loss([0, 1], RECTANGLE[:2], distance='manhattan')


INPUTS = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
INPUTS[1] = INPUTS[0]  # A duplicate: zero distance must not give NaN gradients.
INPUT_LABELS = np.array([0, 0, 1, 1, 2, 2], np.int32)

LOSS_CASES = {
    'cross_entropy': lambda logits: losses.cross_entropy(INPUT_LABELS, logits, 0.1),
    'cross_entropy_soft': lambda logits: losses.cross_entropy(np.eye(3)[INPUT_LABELS] * 0.7 + 0.1,
                                                              logits),
    'ldam': lambda logits: losses.ldam_loss(INPUT_LABELS, logits, losses.ldam_margins([9, 3, 1]),
                                            class_weights=losses.drw_class_weights([9, 3, 1])),
    **{f'triplet_{mining}_{distance}': (
        lambda embeddings, mining=mining, distance=distance: losses.triplet_loss(
            INPUT_LABELS, embeddings, margin=2.0, mining=mining, distance=distance))
       for mining in losses.MINING_MODES for distance in losses.DISTANCES},
}


@pytest.mark.parametrize('case', LOSS_CASES)
def test_loss_shapes_and_gradients_reach_every_trainable_weight(case):
  # Moving every embedding by one vector changes no distance, so triplet cases get no bias.
  layer = keras.layers.Dense(3, use_bias=not case.startswith('triplet'))
  with tf.GradientTape() as tape:
    values = LOSS_CASES[case](layer(INPUTS))
    total = tf.reduce_sum(values)
  assert values.shape == (6,) and values.dtype == tf.float32
  assert np.all(np.isfinite(values)) and float(total) > 0
  for variable, gradient in zip(layer.trainable_variables,
                                tape.gradient(total, layer.trainable_variables)):
    assert gradient is not None, variable.path
    assert np.all(np.isfinite(gradient)) and np.any(gradient != 0), variable.path
