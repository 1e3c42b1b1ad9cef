"""Classification heads: the backbone's spatial feature map [B, H, W, D] → float32 logits [B, C].

Every head is a Keras layer called as `head(features, labels=None, training=False)`. It does its own
pooling, so heads with other pooling (GeM, bilinear) share one backbone interface. It computes in
float32 whatever the global mixed-precision policy: with 15k–200k classes, float16 logits lose the
small differences between classes and overflow in exp().

`needs_spatial` says whether the head reads the map itself; when False it only needs the global
average over positions, so the bottleneck cache stores [B, D] and the head also accepts [B, D].
`embed(features)` gives the L2-normalised global descriptor [B, E] used for retrieval.

Heads: `softmax` (average pooling + dense, the baseline), `gem` (GeM pooling + embedding + BN +
dense), `arcface` (GeM embedding, cosine logits with an additive angular margin, optional
sub-centres and per-class dynamic margins), `hadamard` (a fixed ±1 Hadamard projection, only
1 + C trainable parameters), `bilinear` (B-CNN pooling).
"""

import inspect
import math
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_landmarks.models import losses

_HEAD_DTYPE = 'float32'
_serializable = keras.saving.register_keras_serializable(package='tf_landmarks')


def _average_pool(features: tf.Tensor) -> tf.Tensor:
  """[B, H, W, D] → [B, D] mean over positions; [B, D] (already pooled) passes through."""
  if features.shape.rank == 4:
    return tf.reduce_mean(features, axis=[1, 2])
  return features


class _Head(keras.layers.Layer):
  """Shared checks, float32 policy and config of the heads."""

  needs_spatial = True

  def __init__(self, num_classes: int, **kwargs):
    # A float32 policy makes Keras cast floating inputs to float32 on call and keeps the weights
    # float32 under a global mixed policy.
    kwargs.setdefault('dtype', _HEAD_DTYPE)
    super().__init__(**kwargs)
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
      raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
    self.num_classes = int(num_classes)

  def _check_input_shape(self, input_shape) -> int:
    """Returns D after checking the rank: 4, or 2 for heads that do not need the spatial map."""
    rank = len(input_shape)
    allowed = (4,) if self.needs_spatial else (4, 2)
    if rank not in allowed:
      expected = '[B, H, W, D]' if self.needs_spatial else '[B, H, W, D] or pooled [B, D]'
      raise ValueError(f'{type(self).__name__} needs features {expected}, got shape '
                       f'{tuple(input_shape)}')
    if input_shape[-1] is None:
      raise ValueError(f'{type(self).__name__} needs a known feature depth D, got shape '
                       f'{tuple(input_shape)}')
    return int(input_shape[-1])

  def _float32_features(self, features) -> tf.Tensor:
    """Checks and casts for `embed`, which bypasses Keras's casting; builds on first use."""
    features = tf.cast(features, tf.float32)
    self._check_input_shape(features.shape)
    if not self.built:
      self.build(features.shape)
    return features

  def get_config(self):
    return {**super().get_config(), 'num_classes': self.num_classes}


@_serializable
class GeMPooling(keras.layers.Layer):
  """Generalised-mean pooling over positions: (mean_hw max(x, eps)^p)^(1/p), p learnable.

  p = 1 is average pooling, p → ∞ max pooling; p = 3 is the usual start for landmark retrieval.

  Args:
    p: the initial exponent.
    eps: features are clamped to at least eps (x^p needs x > 0).
    trainable_p: learn p with the rest of the head.
  """

  def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable_p: bool = True, **kwargs):
    kwargs.setdefault('dtype', _HEAD_DTYPE)
    super().__init__(**kwargs)
    self.initial_p = float(p)
    self.eps = float(eps)
    self.trainable_p = bool(trainable_p)

  def build(self, input_shape):
    self.p = self.add_weight(name='p', shape=(), trainable=self.trainable_p,
                             initializer=keras.initializers.Constant(self.initial_p))

  def call(self, features):
    features = tf.maximum(tf.cast(features, tf.float32), self.eps)
    # Dividing by the per-channel maximum first leaves the result unchanged (GeM is homogeneous)
    # but keeps x^p from overflowing float32 if p is learned large.
    peak = tf.stop_gradient(tf.reduce_max(features, axis=[1, 2], keepdims=True))
    powered_mean = tf.reduce_mean(tf.pow(features / peak, self.p), axis=[1, 2])
    return tf.pow(powered_mean, 1.0 / self.p) * peak[:, 0, 0, :]

  def get_config(self):
    return {**super().get_config(), 'p': self.initial_p, 'eps': self.eps,
            'trainable_p': self.trainable_p}


@_serializable
class GeMEmbedding(keras.layers.Layer):
  """GeM pooling → dropout → dense embedding (no bias: BN follows) → batch normalisation.

  Args:
    embedding_dim: E, the descriptor size.
    p, trainable_p: of GeMPooling.
    dropout: rate on the pooled features in training.
  """

  def __init__(self, embedding_dim: int = 512, p: float = 3.0, trainable_p: bool = True,
               dropout: float = 0.0, **kwargs):
    kwargs.setdefault('dtype', _HEAD_DTYPE)
    super().__init__(**kwargs)
    self.embedding_dim = int(embedding_dim)
    self.initial_p = float(p)
    self.trainable_p = bool(trainable_p)
    self.dropout_rate = float(dropout)
    self.pooling = GeMPooling(p, trainable_p=trainable_p, name='gem')
    self.dropout = keras.layers.Dropout(dropout, dtype=_HEAD_DTYPE)
    self.projection = keras.layers.Dense(embedding_dim, use_bias=False, dtype=_HEAD_DTYPE,
                                         name='projection')
    self.batch_norm = keras.layers.BatchNormalization(dtype=_HEAD_DTYPE, name='batch_norm')

  def build(self, input_shape):
    self.pooling.build(input_shape)
    self.projection.build((None, input_shape[-1]))
    self.batch_norm.build((None, self.embedding_dim))

  def call(self, features, training=False):
    pooled = self.dropout(self.pooling(features), training=training)
    return self.batch_norm(self.projection(pooled), training=training)

  def get_config(self):
    return {**super().get_config(), 'embedding_dim': self.embedding_dim, 'p': self.initial_p,
            'trainable_p': self.trainable_p, 'dropout': self.dropout_rate}


@_serializable
class SoftmaxHead(_Head):
  """Global average pooling → optional dropout → dense logits (the baseline).

  Args:
    num_classes: C.
    dropout: rate on the pooled features in training.
  """

  needs_spatial = False

  def __init__(self, num_classes: int, dropout: float = 0.0, **kwargs):
    super().__init__(num_classes, **kwargs)
    self.dropout_rate = float(dropout)
    self.dropout = keras.layers.Dropout(dropout, dtype=_HEAD_DTYPE)
    self.classifier = keras.layers.Dense(num_classes, dtype=_HEAD_DTYPE, name='classifier')

  def build(self, input_shape):
    self.classifier.build((None, self._check_input_shape(input_shape)))

  def call(self, features, labels=None, training=False):
    """Logits [B, C] from features [B, H, W, D] or [B, D]; `labels` are not used."""
    pooled = _average_pool(tf.cast(features, tf.float32))
    return self.classifier(self.dropout(pooled, training=training))

  def embed(self, features):
    """The L2-normalised average-pooled features [B, D]."""
    return tf.math.l2_normalize(_average_pool(self._float32_features(features)), axis=-1)

  def get_config(self):
    return {**super().get_config(), 'dropout': self.dropout_rate}


@_serializable
class GeMHead(_Head):
  """GeM pooling (learnable p) → dense embedding + BN → dense logits.

  Args:
    num_classes: C.
    embedding_dim, p, trainable_p, dropout: of GeMEmbedding.
  """

  def __init__(self, num_classes: int, embedding_dim: int = 512, p: float = 3.0,
               trainable_p: bool = True, dropout: float = 0.0, **kwargs):
    super().__init__(num_classes, **kwargs)
    self.embedding = GeMEmbedding(embedding_dim, p, trainable_p, dropout, name='embedding')
    self.classifier = keras.layers.Dense(num_classes, dtype=_HEAD_DTYPE, name='classifier')

  def build(self, input_shape):
    self._check_input_shape(input_shape)
    self.embedding.build(input_shape)
    self.classifier.build((None, self.embedding.embedding_dim))

  def call(self, features, labels=None, training=False):
    """Logits [B, C] from features [B, H, W, D]; `labels` are not used."""
    return self.classifier(self.embedding(features, training=training))

  def embed(self, features):
    """The L2-normalised embedding [B, embedding_dim] (BN in inference mode)."""
    features = self._float32_features(features)
    return tf.math.l2_normalize(self.embedding(features, training=False), axis=-1)

  def get_config(self):
    embedding = self.embedding.get_config()
    return {**super().get_config(),
            **{key: embedding[key] for key in ('embedding_dim', 'p', 'trainable_p', 'dropout')}}


def dynamic_margins(class_counts: Sequence[int], a: float = 0.45, b: float = 0.05,
                    exponent: float = 0.25) -> np.ndarray:
  """Per-class ArcFace margins m_c = a·n_c^(−exponent) + b: rare classes get larger margins.

  The Google Landmarks 2020 winners used this for the long tail; with the defaults the margins run
  from b (very frequent classes) to a + b = 0.5 (classes with one image).

  Args:
    class_counts: training examples per class, all > 0.
    a, b, exponent: the formula's constants.

  Returns:
    float32 [C].

  Raises:
    ValueError: a class has no examples or the list is empty.
  """
  counts = np.asarray(class_counts, dtype=np.float64)
  if counts.ndim != 1 or counts.size == 0 or np.any(counts <= 0):
    raise ValueError('dynamic margins need a positive training-example count for every class')
  return (a * counts ** -exponent + b).astype(np.float32)


def additive_angular_margin(cosines: tf.Tensor, targets: tf.Tensor, margins: tf.Tensor,
                            easy_margin: bool = False) -> tf.Tensor:
  """ArcFace's margin: cos θ → cos(θ + m_c) on the target classes, in proportion to `targets`.

  Where θ + m would pass π, cos(θ + m) would rise again and reward a worse angle, so for
  θ > π − m the linear penalty cos θ − m·sin m is used instead; with `easy_margin`, no margin is
  applied where cos θ ≤ 0.

  Args:
    cosines: float32 [B, C].
    targets: float32 [B, C] label distributions (one-hot for class ids).
    margins: float32 [C] (or a scalar), in radians.
    easy_margin: see above.

  Returns:
    float32 [B, C].
  """
  # sqrt'(0) is infinite: keep 1 − cos² away from 0 so cos θ = ±1 gives a finite gradient.
  sines = tf.sqrt(tf.maximum(1.0 - tf.square(cosines), 1e-7))
  with_margin = cosines * tf.cos(margins) - sines * tf.sin(margins)
  if easy_margin:
    with_margin = tf.where(cosines > 0.0, with_margin, cosines)
  else:
    with_margin = tf.where(cosines > tf.cos(math.pi - margins), with_margin,
                           cosines - margins * tf.sin(margins))
  return cosines + targets * (with_margin - cosines)


@_serializable
class ArcFaceHead(_Head):
  """GeM embedding → cosine logits with an additive angular margin (ArcFace), scaled by s.

  logits_c = s·cos θ_c, where θ_c is the angle between the L2-normalised embedding and class c's
  L2-normalised weight (with k sub-centres: the closest of the class's k weights, so a class with
  several looks, or noisy images, need not squeeze into one direction). In training, with labels,
  the true class gets cos(θ_y + m_y) instead (`additive_angular_margin`). Without labels, or with
  training=False, there is no margin.

  With soft labels (MixUp), the margin is applied to each class in proportion to its label weight,
  which is exact for one-hot labels.

  Args:
    num_classes: C.
    embedding_dim, p, trainable_p, dropout: of GeMEmbedding.
    scale: s; cosines are in [−1, 1], so s sets how peaked the softmax can get.
    margin: m in radians, the same for every class.
    subcenters: k weight vectors per class.
    easy_margin: no margin where cos θ ≤ 0 instead of the linear penalty past π − m.
    dynamic_margin: per-class margins `dynamic_margins(class_counts, margin_a, margin_b,
      margin_exponent)` instead of `margin`.
    margin_a, margin_b, margin_exponent: the constants of the dynamic margins.
    class_counts: training examples per class; needed with dynamic_margin.
  """

  def __init__(self, num_classes: int, embedding_dim: int = 512, p: float = 3.0,
               trainable_p: bool = True, dropout: float = 0.0, scale: float = 30.0,
               margin: float = 0.3, subcenters: int = 1, easy_margin: bool = False,
               dynamic_margin: bool = False, margin_a: float = 0.45, margin_b: float = 0.05,
               margin_exponent: float = 0.25, class_counts: Optional[Sequence[int]] = None,
               **kwargs):
    super().__init__(num_classes, **kwargs)
    if subcenters < 1:
      raise ValueError(f'subcenters must be >= 1, got {subcenters}')
    if scale <= 0:
      raise ValueError(f'scale must be > 0, got {scale}')
    self.embedding = GeMEmbedding(embedding_dim, p, trainable_p, dropout, name='embedding')
    self.scale = float(scale)
    self.margin = float(margin)
    self.subcenters = int(subcenters)
    self.easy_margin = bool(easy_margin)
    self.dynamic_margin = bool(dynamic_margin)
    self.margin_a, self.margin_b = float(margin_a), float(margin_b)
    self.margin_exponent = float(margin_exponent)
    if dynamic_margin:
      if class_counts is None:
        raise ValueError('arcface with dynamic_margin needs class_counts')
      if len(class_counts) != num_classes:
        raise ValueError(f'class_counts has {len(class_counts)} entries for {num_classes} classes')
      self._initial_margins = dynamic_margins(class_counts, margin_a, margin_b, margin_exponent)
    else:
      self._initial_margins = np.full([num_classes], margin, np.float32)

  def build(self, input_shape):
    self._check_input_shape(input_shape)
    self.embedding.build(input_shape)
    self.class_centres = self.add_weight(
        name='class_centres', shape=(self.embedding.embedding_dim,
                                     self.num_classes * self.subcenters),
        initializer='glorot_uniform')
    # A weight, not a constant: saved with the model, so a restored head needs no class counts.
    self.class_margins = self.add_weight(
        name='class_margins', shape=(self.num_classes,), trainable=False,
        initializer=keras.initializers.Constant(self._initial_margins))

  def _cosines(self, features, training):
    embeddings = tf.math.l2_normalize(self.embedding(features, training=training), axis=-1)
    centres = tf.math.l2_normalize(self.class_centres, axis=0)
    cosines = tf.matmul(embeddings, centres)
    if self.subcenters == 1:
      return cosines
    # Columns are class-major (c·k + j), so this reshape groups each class's sub-centres.
    cosines = tf.reshape(cosines, [-1, self.num_classes, self.subcenters])
    return tf.reduce_max(cosines, axis=-1)

  def call(self, features, labels=None, training=False):
    """Logits [B, C]; the margin is applied only when training with labels (int [B] or [B, C])."""
    cosines = self._cosines(features, training)
    if labels is None or not training:
      return self.scale * cosines
    targets = losses.label_distribution(labels, self.num_classes)
    return self.scale * additive_angular_margin(cosines, targets, self.class_margins,
                                                self.easy_margin)

  def embed(self, features):
    """The L2-normalised embedding [B, embedding_dim] (BN in inference mode)."""
    features = self._float32_features(features)
    return tf.math.l2_normalize(self.embedding(features, training=False), axis=-1)

  def get_config(self):
    embedding = self.embedding.get_config()
    return {**super().get_config(),
            **{key: embedding[key] for key in ('embedding_dim', 'p', 'trainable_p', 'dropout')},
            'scale': self.scale, 'margin': self.margin, 'subcenters': self.subcenters,
            'easy_margin': self.easy_margin, 'dynamic_margin': self.dynamic_margin,
            'margin_a': self.margin_a, 'margin_b': self.margin_b,
            'margin_exponent': self.margin_exponent}

  @classmethod
  def from_config(cls, config):
    # class_counts is not in the config: the margins they gave are the `class_margins` weight,
    # which loading the weights restores. Build with the flag off, then record it for get_config.
    config = dict(config)
    dynamic_margin = config.pop('dynamic_margin', False)
    head = cls(**config)
    head.dynamic_margin = dynamic_margin
    return head


def fast_walsh_hadamard(values: tf.Tensor) -> tf.Tensor:
  """H_n · x for every row x of values [B, n], n a power of two, H_n the Sylvester Hadamard matrix.

  H_2h = [[H_h, H_h], [H_h, −H_h]], so each of the log2(n) butterfly stages maps every pair
  (x_i, x_{i+h}) of a block of 2h to (x_i + x_{i+h}, x_i − x_{i+h}): O(n log n) adds, no matrix.
  """
  size = values.shape[-1]
  half = 1
  while half < size:
    pairs = tf.reshape(values, [-1, size // (2 * half), 2, half])
    first, second = pairs[:, :, 0, :], pairs[:, :, 1, :]
    values = tf.reshape(tf.concat([first + second, first - second], axis=-1), [-1, size])
    half *= 2
  return values


@_serializable
class HadamardHead(_Head):
  """A fixed ±1 Hadamard projection of the pooled features to C logits; trains 1 + C parameters.

  The features (zero-padded to n, the smallest power of two ≥ max(D, C)) are multiplied by the
  Sylvester matrix H_n and the first C outputs kept: class c's fixed weight vector is row c of H_n
  restricted to the first D columns. Rows of H_n are orthogonal, so the classes start maximally
  separated and only the backbone learns ("Fix your classifier", Hoffer et al. 2018). Features are
  L2-normalised and outputs divided by √D (each row's norm), which makes them cosines; a learnable
  scale sets the softmax temperature and a per-class bias the class prior.

  The projection is a fast Walsh-Hadamard transform rather than a stored matrix: for D = 32768,
  C = 14951 even a bool/int8 C×D constant holds 490 MB (2 GB as float32) and costs C·D
  multiply-adds per image, while the transform needs no memory and n·log2(n) ≈ 0.5 M adds.

  Args:
    num_classes: C.
    initial_scale: the starting value of the learnable scale.
  """

  needs_spatial = False

  def __init__(self, num_classes: int, initial_scale: float = 10.0, **kwargs):
    super().__init__(num_classes, **kwargs)
    self.initial_scale = float(initial_scale)

  def build(self, input_shape):
    self.feature_dim = self._check_input_shape(input_shape)
    self.transform_size = 1 << (max(self.feature_dim, self.num_classes) - 1).bit_length()
    self.scale = self.add_weight(name='scale', shape=(),
                                 initializer=keras.initializers.Constant(self.initial_scale))
    self.bias = self.add_weight(name='bias', shape=(self.num_classes,), initializer='zeros')

  def _normalised_pooled(self, features):
    return tf.math.l2_normalize(_average_pool(tf.cast(features, tf.float32)), axis=-1)

  def call(self, features, labels=None, training=False):
    """Logits [B, C] from features [B, H, W, D] or [B, D]; `labels` are not used."""
    padded = tf.pad(self._normalised_pooled(features),
                    [[0, 0], [0, self.transform_size - self.feature_dim]])
    projected = fast_walsh_hadamard(padded)[:, :self.num_classes]
    cosines = projected / math.sqrt(self.feature_dim)
    return self.scale * cosines + self.bias

  def embed(self, features):
    """The L2-normalised average-pooled features [B, D]."""
    return self._normalised_pooled(self._float32_features(features))

  def get_config(self):
    return {**super().get_config(), 'initial_scale': self.initial_scale}


@_serializable
class BilinearHead(_Head):
  """Bilinear (B-CNN) pooling → dense logits.

  The outer product x xᵀ of each position's features, averaged over positions, keeps pairwise
  channel co-occurrences (fine-grained detail that average pooling loses); then the signed square
  root and L2 normalisation of B-CNN. The product is symmetric, so only its upper triangle is kept,
  off-diagonal entries × √2 so that dot products (and the L2 norm) equal those of the full d²
  vector: the same classifier capacity with half the weights.

  d² grows fast (ResNet50's 2048² = 4.2 M features per image ran out of memory in a reference), so
  by default D > 512 is first reduced to 256 channels by a linear 1×1 convolution.

  Args:
    num_classes: C.
    reduce_channels: channels after the 1×1 reduction; None: 256 if D > 512, else no reduction;
      0: never reduce.
    dropout: rate on the bilinear descriptor in training.
  """

  _AUTO_REDUCE_ABOVE = 512
  _AUTO_REDUCED_CHANNELS = 256
  # Bounds the signed square root's gradient at 0 to 1/(2·√eps) = 5000.
  _ROOT_EPS = 1e-8

  def __init__(self, num_classes: int, reduce_channels: Optional[int] = None,
               dropout: float = 0.0, **kwargs):
    super().__init__(num_classes, **kwargs)
    if reduce_channels is not None and reduce_channels < 0:
      raise ValueError(f'reduce_channels must be >= 0 or None, got {reduce_channels}')
    self.reduce_channels = reduce_channels
    self.dropout_rate = float(dropout)
    self.dropout = keras.layers.Dropout(dropout, dtype=_HEAD_DTYPE)
    self.reduction = None

  def build(self, input_shape):
    depth = self._check_input_shape(input_shape)
    channels = self.reduce_channels
    if channels is None:
      channels = self._AUTO_REDUCED_CHANNELS if depth > self._AUTO_REDUCE_ABOVE else 0
    if channels:
      self.reduction = keras.layers.Conv2D(channels, 1, use_bias=False, dtype=_HEAD_DTYPE,
                                           name='reduction')
      self.reduction.build(input_shape)
      depth = channels
    self.channels = depth
    # numpy, not tf.constant: build may run inside a tf.function whose graph constants cannot be
    # reused by later calls.
    rows, columns = np.triu_indices(depth)
    self._upper_indices = (rows * depth + columns).astype(np.int32)
    self._upper_weights = np.where(rows == columns, 1.0, math.sqrt(2.0)).astype(np.float32)
    self.classifier = keras.layers.Dense(self.num_classes, dtype=_HEAD_DTYPE, name='classifier')
    self.classifier.build((None, len(rows)))

  def _descriptor(self, features):
    features = tf.cast(features, tf.float32)
    if self.reduction is not None:
      features = self.reduction(features)
    positions = tf.reshape(features, [tf.shape(features)[0], -1, self.channels])
    num_positions = tf.cast(tf.shape(positions)[1], tf.float32)
    outer = tf.matmul(positions, positions, transpose_a=True) / num_positions
    flat = tf.reshape(outer, [-1, self.channels * self.channels])
    upper = tf.gather(flat, self._upper_indices, axis=1)
    rooted = tf.sign(upper) * tf.sqrt(tf.abs(upper) + self._ROOT_EPS)
    return tf.math.l2_normalize(rooted * self._upper_weights, axis=-1)

  def call(self, features, labels=None, training=False):
    """Logits [B, C] from features [B, H, W, D]; `labels` are not used."""
    return self.classifier(self.dropout(self._descriptor(features), training=training))

  def embed(self, features):
    """The normalised bilinear descriptor [B, d·(d+1)/2], d the (reduced) channel count."""
    return self._descriptor(self._float32_features(features))

  def get_config(self):
    return {**super().get_config(), 'reduce_channels': self.reduce_channels,
            'dropout': self.dropout_rate}


HEADS = {
    'softmax': SoftmaxHead,
    'gem': GeMHead,
    'arcface': ArcFaceHead,
    'hadamard': HadamardHead,
    'bilinear': BilinearHead,
}


def _option_names(head_class) -> list[str]:
  parameters = inspect.signature(head_class.__init__).parameters
  return [name for name, parameter in parameters.items()
          if name not in ('self', 'num_classes', 'class_counts')
          and parameter.kind is not inspect.Parameter.VAR_KEYWORD]


def build_head(name: str, num_classes: int, *, class_counts: Optional[Sequence[int]] = None,
               **options) -> _Head:
  """Builds the head registered as `name` in HEADS.

  Args:
    name: a key of HEADS.
    num_classes: C.
    class_counts: training examples per class; used by heads that need them (arcface with
      dynamic_margin) and ignored by the others, so callers can always pass them.
    **options: the head's constructor options (e.g. embedding_dim, dropout, subcenters).

  Returns:
    The head layer, not yet built.

  Raises:
    ValueError: an unknown head or option, listing the valid ones.
  """
  if name not in HEADS:
    raise ValueError(f'unknown head {name!r}; choose one of {", ".join(HEADS)}')
  head_class = HEADS[name]
  valid_options = _option_names(head_class)
  unknown = sorted(set(options) - set(valid_options))
  if unknown:
    raise ValueError(f'head {name!r} has no option {", ".join(unknown)}; its options are '
                     f'{", ".join(valid_options)}')
  if 'class_counts' in inspect.signature(head_class.__init__).parameters:
    options['class_counts'] = class_counts
  return head_class(num_classes, **options)
