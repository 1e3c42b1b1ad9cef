"""Training losses, each returning PER-EXAMPLE losses [B] in float32.

The training loop runs under `strategy.run` and averages over the GLOBAL batch (sum of per-example
losses / global batch size), so nothing here reduces over the batch.

Labels are either class ids, int [B], or class distributions, float [B, C] (one-hot, smoothed or
mixed by MixUp); the rank tells which. Logits and embeddings are cast to float32 first, so the
losses are safe under a mixed_float16 policy.

- `cross_entropy`: softmax cross-entropy with optional label smoothing.
- LDAM-DRW (Cao et al. 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
  Loss"): `ldam_margins`, `ldam_loss`, and `drw_class_weights` for the deferred re-weighting phase.
- `triplet_loss`: online triplet mining inside the batch (batch-hard or semi-hard).
"""

from typing import Sequence, Union

import numpy as np
import tensorflow as tf

MINING_MODES = ('batch_hard', 'semi_hard')
DISTANCES = ('euclidean', 'squared', 'cosine')


def label_distribution(labels: tf.Tensor, num_classes: Union[int, tf.Tensor]) -> tf.Tensor:
  """Class ids int [B] → one-hot float32 [B, C]; distributions [B, C] → float32 as they are.

  Args:
    labels: class ids int [B] or distributions float [B, C].
    num_classes: C (a scalar tensor is fine), the one-hot depth for class ids.

  Returns:
    float32 [B, C].

  Raises:
    ValueError: the labels are neither rank 1 nor rank 2.
  """
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank == 1:
    return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)
  if labels.shape.rank == 2:
    return tf.cast(labels, tf.float32)
  raise ValueError(f'labels must be class ids [B] or distributions [B, C], got shape '
                   f'{labels.shape}')


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float = 0.0) -> tf.Tensor:
  """Softmax cross-entropy per example.

  Args:
    labels: class ids int [B] or distributions float [B, C].
    logits: [B, C].
    label_smoothing: ε in [0, 1): the target becomes (1 − ε)·y + ε/C.

  Returns:
    float32 [B].
  """
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
  logits = tf.cast(logits, tf.float32)
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank == 1:
    # Class ids: skip the [B, C] one-hot. With ε/C on every class the smoothed loss is
    # (1 − ε)·(−log p_y) + ε·mean_c(−log p_c), and −log p_c = logsumexp(z) − z_c.
    hard = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int32), logits)
    if label_smoothing == 0.0:
      return hard
    uniform = tf.reduce_logsumexp(logits, axis=-1) - tf.reduce_mean(logits, axis=-1)
    return (1.0 - label_smoothing) * hard + label_smoothing * uniform
  targets = label_distribution(labels, tf.shape(logits)[-1])
  if label_smoothing:
    targets = (1.0 - label_smoothing) * targets + label_smoothing / tf.cast(
        tf.shape(logits)[-1], tf.float32)
  return tf.nn.softmax_cross_entropy_with_logits(targets, logits)


def _positive_counts(class_counts: Sequence[int], what: str) -> np.ndarray:
  counts = np.asarray(class_counts, dtype=np.float64)
  if counts.ndim != 1 or counts.size == 0:
    raise ValueError(f'{what} needs a non-empty list of per-class counts, got shape {counts.shape}')
  empty = int(np.sum(counts <= 0))
  if empty:
    raise ValueError(f'{what} needs every class to have training examples; {empty} of '
                     f'{counts.size} classes have none')
  return counts


def ldam_margins(class_counts: Sequence[int], max_margin: float = 0.5) -> np.ndarray:
  """LDAM's per-class margins Δ_j = K / n_j^(1/4), K chosen so the rarest class gets max_margin.

  Args:
    class_counts: training examples per class, all > 0.
    max_margin: the margin of the rarest class.

  Returns:
    float32 [C].
  """
  counts = _positive_counts(class_counts, 'ldam_margins')
  inverse_fourth_roots = counts ** -0.25
  return (inverse_fourth_roots * (max_margin / inverse_fourth_roots.max())).astype(np.float32)


def ldam_loss(labels: tf.Tensor, logits: tf.Tensor, margins, scale: float = 30.0,
              class_weights=None) -> tf.Tensor:
  """LDAM loss: cross-entropy of scale·(z − Δ_y on the true class).

  LDAM assumes cosine-like logits in [−1, 1] (normalised features and weights), hence the scale.
  With a distribution y the margin is subtracted in proportion, z − y·Δ, which is the same for
  one-hot labels and spreads it over MixUp's two classes.

  Args:
    labels: class ids int [B] or distributions float [B, C].
    logits: [B, C].
    margins: [C], from `ldam_margins`.
    scale: s, multiplies the margin-adjusted logits.
    class_weights: optional [C] (e.g. `drw_class_weights` in the re-weighting phase); each example
      is weighted by its class's weight (the label-weighted mean for distributions).

  Returns:
    float32 [B].
  """
  logits = tf.cast(logits, tf.float32)
  targets = label_distribution(labels, tf.shape(logits)[-1])
  margins = tf.cast(tf.convert_to_tensor(margins), tf.float32)
  losses = tf.nn.softmax_cross_entropy_with_logits(targets, scale * (logits - targets * margins))
  if class_weights is None:
    return losses
  class_weights = tf.cast(tf.convert_to_tensor(class_weights), tf.float32)
  return losses * tf.linalg.matvec(targets, class_weights)


def drw_class_weights(class_counts: Sequence[int], beta: float = 0.9999) -> np.ndarray:
  """Class-balanced weights from the "effective number" (1 − β^n) / (1 − β) of each class.

  Weight ∝ 1 / effective number, normalised to mean 1 over classes so the loss keeps its scale.
  LDAM-DRW uses them only after a given epoch (deferred re-weighting): early epochs learn features
  from the natural distribution, later ones re-balance the classifier.

  Args:
    class_counts: training examples per class, all > 0.
    beta: in [0, 1); 0 gives equal weights, → 1 gives inverse-frequency weights.

  Returns:
    float32 [C].
  """
  if not 0.0 <= beta < 1.0:
    raise ValueError(f'beta must be in [0, 1), got {beta}')
  counts = _positive_counts(class_counts, 'drw_class_weights')
  weights = (1.0 - beta) / (1.0 - np.power(beta, counts))
  return (weights * (counts.size / weights.sum())).astype(np.float32)


def _pairwise_distances(embeddings: tf.Tensor, distance: str) -> tf.Tensor:
  """[B, E] → [B, B] distances, with finite gradients even between identical points."""
  if distance == 'cosine':
    normalised = tf.math.l2_normalize(embeddings, axis=-1)
    return 1.0 - tf.matmul(normalised, normalised, transpose_b=True)
  norms = tf.reduce_sum(tf.square(embeddings), axis=-1)
  squared = norms[:, None] - 2.0 * tf.matmul(embeddings, embeddings, transpose_b=True) + norms[None]
  squared = tf.maximum(squared, 0.0)
  if distance == 'squared':
    return squared
  # sqrt'(0) is infinite: take the root of 1e-16 at zeros and zero the result, so the diagonal and
  # duplicate points give a zero gradient instead of NaN.
  zeros = tf.cast(tf.equal(squared, 0.0), tf.float32)
  return tf.sqrt(squared + zeros * 1e-16) * (1.0 - zeros)


def triplet_loss(labels: tf.Tensor, embeddings: tf.Tensor, margin: float = 0.2,
                 mining: str = 'batch_hard', distance: str = 'euclidean') -> tf.Tensor:
  """Triplet loss with online mining in the batch, one loss per anchor.

  - batch_hard (Hermans et al. 2017): max(0, d(a, hardest positive) − d(a, hardest negative) + m).
  - semi_hard (FaceNet): for every positive p of the anchor, the closest negative farther than p
    (or, if none is, the farthest negative); the anchor's loss is the mean over its positives of
    max(0, d(a, p) − d(a, n) + m).
  An anchor without a positive (a class seen once in the batch) or without a negative gives 0.
  Semi-hard mining sorts each anchor's negative distances and binary-searches them, so memory stays
  O(B²) instead of the O(B³) of comparing every (anchor, positive, negative) triple.

  Args:
    labels: class ids int [B].
    embeddings: [B, E].
    margin: m.
    mining: one of MINING_MODES.
    distance: 'euclidean', 'squared' (squared euclidean) or 'cosine' (1 − cosine similarity).

  Returns:
    float32 [B].
  """
  if mining not in MINING_MODES:
    raise ValueError(f'unknown mining {mining!r}; choose one of {", ".join(MINING_MODES)}')
  if distance not in DISTANCES:
    raise ValueError(f'unknown distance {distance!r}; choose one of {", ".join(DISTANCES)}')
  labels = tf.convert_to_tensor(labels)
  if labels.shape.rank != 1:
    raise ValueError(f'triplet_loss needs class ids [B], got labels of shape {labels.shape}')
  distances = _pairwise_distances(tf.cast(embeddings, tf.float32), distance)
  same_class = tf.equal(labels[:, None], labels[None, :])
  not_self = tf.logical_not(tf.eye(tf.shape(labels)[0], dtype=tf.bool))
  positive = tf.logical_and(same_class, not_self)
  negative = tf.logical_not(same_class)
  has_positive = tf.reduce_any(positive, axis=1)
  has_negative = tf.reduce_any(negative, axis=1)
  valid = tf.logical_and(has_positive, has_negative)
  # Masked-out entries are pushed beyond every real distance (finite, so no inf·0 in gradients).
  beyond = tf.stop_gradient(tf.reduce_max(distances)) + 1.0
  negative_distances = tf.where(negative, distances, beyond)

  if mining == 'batch_hard':
    hardest_positive = tf.reduce_max(tf.where(positive, distances, 0.0), axis=1)
    hardest_negative = tf.reduce_min(negative_distances, axis=1)
    losses = tf.nn.relu(hardest_positive - hardest_negative + margin)
    return tf.where(valid, losses, 0.0)

  # semi_hard: per anchor, negatives sorted ascending (masked ones at the end, at `beyond`).
  sorted_negatives = tf.sort(negative_distances, axis=1)
  num_negatives = tf.reduce_sum(tf.cast(negative, tf.int32), axis=1)
  # First negative strictly farther than each positive: index into the anchor's sorted row.
  first_farther = tf.searchsorted(sorted_negatives, distances, side='right')
  has_farther = first_farther < num_negatives[:, None]
  farthest = tf.gather(sorted_negatives, tf.maximum(num_negatives - 1, 0), batch_dims=1)
  semi_hard_negative = tf.where(
      has_farther,
      tf.gather(sorted_negatives, tf.minimum(first_farther, tf.shape(labels)[0] - 1), batch_dims=1),
      farthest[:, None])
  pair_losses = tf.where(positive, tf.nn.relu(distances - semi_hard_negative + margin), 0.0)
  num_positives = tf.reduce_sum(tf.cast(positive, tf.float32), axis=1)
  losses = tf.reduce_sum(pair_losses, axis=1) / tf.maximum(num_positives, 1.0)
  return tf.where(valid, losses, 0.0)
