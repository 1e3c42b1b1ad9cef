"""Classification heads on tiny feature maps: shapes, float32 under mixed precision, gradients to
every trainable weight, and the arithmetic of GeM, ArcFace's margin, the Hadamard projection and
bilinear pooling checked against numpy."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_landmarks.models import heads
from tf_landmarks.models import losses

NUM_CLASSES = 5
FEATURES = np.random.default_rng(0).uniform(0.0, 2.0, size=(4, 3, 3, 6)).astype(np.float32)
LABELS = np.array([0, 2, 4, 2], np.int32)

# Tiny options so every head builds in milliseconds; the bilinear reduction case reaches its conv.
HEAD_CASES = {
    'softmax': ('softmax', {'dropout': 0.1}),
    'gem': ('gem', {'embedding_dim': 8}),
    'arcface': ('arcface', {'embedding_dim': 8, 'scale': 4.0}),
    'arcface_subcenters': ('arcface', {'embedding_dim': 8, 'subcenters': 3}),
    'hadamard': ('hadamard', {}),
    'bilinear': ('bilinear', {}),
    'bilinear_reduced': ('bilinear', {'reduce_channels': 4}),
}


def _head(case):
  name, options = HEAD_CASES[case]
  return heads.build_head(name, NUM_CLASSES, **options)


@pytest.fixture
def restore_policy():
  previous = keras.mixed_precision.global_policy()
  yield
  keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize('case', HEAD_CASES)
def test_head_logits_embeddings_and_gradients_reach_every_trainable_weight(case):
  head = _head(case)
  with tf.GradientTape() as tape:
    logits = head(FEATURES, labels=LABELS, training=True)
    loss = tf.reduce_mean(losses.cross_entropy(LABELS, logits))
  assert logits.shape == (4, NUM_CLASSES) and logits.dtype == tf.float32
  assert np.all(np.isfinite(logits))
  gradients = tape.gradient(loss, head.trainable_variables)
  assert head.trainable_variables
  for variable, gradient in zip(head.trainable_variables, gradients):
    assert gradient is not None, variable.path
    assert np.all(np.isfinite(gradient)) and np.any(gradient != 0), variable.path
  embeddings = head.embed(FEATURES)
  assert embeddings.shape[0] == 4
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('case', HEAD_CASES)
def test_head_config_round_trips(case):
  head = _head(case)
  config = head.get_config()
  assert type(head).from_config(config).get_config() == config


@pytest.mark.parametrize('case', ['softmax', 'hadamard'])
def test_heads_without_spatial_needs_accept_pooled_features_with_the_same_result(case):
  head = _head(case)
  assert not head.needs_spatial
  pooled = FEATURES.mean(axis=(1, 2))
  np.testing.assert_allclose(head(FEATURES), head(pooled), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(head.embed(FEATURES), head.embed(pooled), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', ['gem', 'arcface', 'bilinear'])
def test_spatial_heads_reject_pooled_features(case):
  head = _head(case)
  assert head.needs_spatial
  with pytest.raises(ValueError, match=r'needs features \[B, H, W, D\]'):
    head(FEATURES.mean(axis=(1, 2)))


@pytest.mark.parametrize('case', ['gem', 'arcface', 'hadamard', 'bilinear_reduced'])
def test_heads_compute_in_float32_under_mixed_float16(case, restore_policy):
  keras.mixed_precision.set_global_policy('mixed_float16')
  head = _head(case)
  logits = head(tf.constant(FEATURES, tf.float16), labels=LABELS, training=True)
  assert logits.dtype == tf.float32
  assert head.embed(tf.constant(FEATURES, tf.float16)).dtype == tf.float32
  assert all(variable.dtype == 'float32' for variable in head.weights)


def test_build_head_rejects_unknown_names_and_options():
  with pytest.raises(ValueError, match='softmax, gem, arcface, hadamard, bilinear'):
    heads.build_head('svm', NUM_CLASSES)
  with pytest.raises(ValueError, match="no option subcenters; its options are dropout"):
    heads.build_head('softmax', NUM_CLASSES, subcenters=2)
  # class_counts can always be passed: heads that do not use them ignore them.
  assert isinstance(heads.build_head('softmax', 2, class_counts=[3, 1]), heads.SoftmaxHead)


def test_gem_pooling_worked_example_and_no_overflow_for_large_p():
  # One channel over 4 positions: (mean(1³, 2³, 3³, 4³))^(1/3) = (100/4)^(1/3) = 25^(1/3) = 2.9240.
  values = tf.constant([1.0, 2.0, 3.0, 4.0], shape=[1, 2, 2, 1])
  assert float(heads.GeMPooling(3.0)(values)[0, 0]) == pytest.approx(25 ** (1 / 3), rel=1e-5)
  # p = 1 is average pooling.
  assert float(heads.GeMPooling(1.0)(values)[0, 0]) == pytest.approx(2.5, rel=1e-5)
  # 100^200 overflows float32, yet GeM with p = 200 is finite and close to the maximum.
  large = tf.constant([1.0, 50.0, 80.0, 100.0], shape=[1, 2, 2, 1])
  assert float(heads.GeMPooling(200.0)(large)[0, 0]) == pytest.approx(100 * 0.25 ** (1 / 200))


def test_additive_angular_margin_worked_example():
  m = 0.5  # cos m = 0.87758, sin m = 0.47943, threshold cos(π − m) = −0.87758.
  cosines = tf.constant([[0.8, -0.9, 0.1]])
  targets = tf.ones_like(cosines)  # Every entry is a target, to see the three regimes at once.
  # 0.8: cos(θ + m) = 0.8·0.87758 − 0.6·0.47943 = 0.41441.
  # −0.9 < threshold: linear penalty −0.9 − m·sin m = −0.9 − 0.23971 = −1.13971.
  # 0.1: 0.1·0.87758 − √0.99·0.47943 = 0.08776 − 0.47703 = −0.38927.
  np.testing.assert_allclose(heads.additive_angular_margin(cosines, targets, m),
                             [[0.41441, -1.13971, -0.38927]], atol=1e-5)
  # Easy margin: no margin where cos ≤ 0, so −0.9 stays.
  np.testing.assert_allclose(heads.additive_angular_margin(cosines, targets, m, easy_margin=True),
                             [[0.41441, -0.9, -0.38927]], atol=1e-5)
  # Non-target classes are untouched; a half target gets half the change.
  half = heads.additive_angular_margin(cosines, tf.constant([[0.5, 0.0, 0.0]]), m)
  np.testing.assert_allclose(half, [[(0.8 + 0.41441) / 2, -0.9, 0.1]], atol=1e-5)


def test_arcface_margin_only_on_the_true_class_in_training_and_none_at_inference():
  head = heads.build_head('arcface', NUM_CLASSES, embedding_dim=8, scale=4.0, margin=0.3)
  # training=True without labels uses the same batch statistics in BN, so same cosines.
  plain = head(FEATURES, training=True).numpy()
  with_margin = head(FEATURES, labels=LABELS, training=True).numpy()
  cosines = plain / 4.0
  assert np.all(np.abs(cosines) <= 1.0 + 1e-6)
  true_class = np.eye(NUM_CLASSES, dtype=bool)[LABELS]
  np.testing.assert_allclose(with_margin[~true_class], plain[~true_class], rtol=1e-6)
  true_cosines = cosines[true_class]
  expected = np.where(true_cosines > math.cos(math.pi - 0.3),
                      np.cos(np.arccos(true_cosines) + 0.3), true_cosines - 0.3 * math.sin(0.3))
  np.testing.assert_allclose(with_margin[true_class], 4.0 * expected, atol=1e-5)
  # Inference: labels change nothing.
  np.testing.assert_allclose(head(FEATURES, labels=LABELS), head(FEATURES), rtol=1e-6)


def test_arcface_subcenters_take_the_closest_centre():
  head = heads.build_head('arcface', 3, embedding_dim=8, subcenters=2, scale=1.0)
  logits = head(FEATURES).numpy()
  assert tuple(head.class_centres.shape) == (8, 3 * 2)
  centres = head.class_centres.numpy()
  centres /= np.linalg.norm(centres, axis=0)
  cosines = head.embed(FEATURES).numpy() @ centres  # Columns c·2 + j.
  np.testing.assert_allclose(logits, cosines.reshape(4, 3, 2).max(axis=-1), atol=1e-5)


def test_arcface_dynamic_margins_from_class_counts():
  # m_c = 0.45·n^(−1/4) + 0.05: n = 1, 16, 81 → 0.45·(1, 1/2, 1/3) + 0.05 = 0.5, 0.275, 0.2.
  head = heads.build_head('arcface', 3, class_counts=[1, 16, 81], dynamic_margin=True,
                          embedding_dim=8)
  head(FEATURES)
  np.testing.assert_allclose(head.class_margins.numpy(), [0.5, 0.275, 0.2], rtol=1e-6)
  restored = heads.ArcFaceHead.from_config(head.get_config())
  assert restored.get_config()['dynamic_margin']
  with pytest.raises(ValueError, match='needs class_counts'):
    heads.build_head('arcface', 3, dynamic_margin=True)
  with pytest.raises(ValueError, match='2 entries for 3 classes'):
    heads.build_head('arcface', 3, dynamic_margin=True, class_counts=[1, 2])


def _sylvester(size):
  matrix = np.ones((1, 1))
  while len(matrix) < size:
    matrix = np.block([[matrix, matrix], [matrix, -matrix]])
  return matrix


def test_fast_walsh_hadamard_equals_the_sylvester_matrix():
  values = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
  np.testing.assert_allclose(heads.fast_walsh_hadamard(tf.constant(values)),
                             values @ _sylvester(16).T, rtol=1e-5, atol=1e-5)


def test_hadamard_logits_are_scaled_cosines_with_fixed_rows():
  # D = 6, C = 5: padded to n = 8; class c's weights are row c of H_8 on the first 6 columns.
  head = heads.build_head('hadamard', NUM_CLASSES, initial_scale=10.0)
  pooled = FEATURES.mean(axis=(1, 2))
  unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  expected = 10.0 * unit @ _sylvester(8)[:NUM_CLASSES, :6].T / math.sqrt(6)
  np.testing.assert_allclose(head(FEATURES), expected, rtol=1e-5, atol=1e-5)


def test_hadamard_head_trains_only_scale_and_bias_at_full_size():
  # The reference setting: 14,951 classes on 32,768 features. A dense head would train 490 M.
  head = heads.build_head('hadamard', 14951)
  logits = head(tf.ones([1, 32768]))
  assert logits.shape == (1, 14951)
  assert sum(int(np.prod(v.shape)) for v in head.trainable_variables) == 1 + 14951
  assert not head.non_trainable_variables


def test_bilinear_reduces_wide_features_by_default():
  head = heads.build_head('bilinear', 3)
  head(tf.ones([1, 2, 2, 600]))
  assert tuple(head.reduction.kernel.shape) == (1, 1, 600, 256)
  assert tuple(head.classifier.kernel.shape) == (256 * 257 // 2, 3)
  narrow = heads.build_head('bilinear', 3)
  narrow(FEATURES)
  assert narrow.reduction is None
  never = heads.build_head('bilinear', 3, reduce_channels=0)
  never(tf.ones([1, 2, 2, 600]))
  assert never.reduction is None


def test_bilinear_descriptor_keeps_the_full_outer_product_geometry():
  # The upper triangle with off-diagonals × √2 has the dot products of the full d² vector.
  head = heads.build_head('bilinear', 3)
  descriptors = head.embed(FEATURES).numpy()
  positions = FEATURES.reshape(4, 9, 6)
  outer = np.einsum('bnd,bne->bde', positions, positions).reshape(4, 36) / 9
  rooted = np.sign(outer) * np.sqrt(np.abs(outer) + 1e-8)
  full = rooted / np.linalg.norm(rooted, axis=1, keepdims=True)
  assert descriptors.shape == (4, 6 * 7 // 2)
  np.testing.assert_allclose(descriptors @ descriptors.T, full @ full.T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('case', HEAD_CASES)
def test_heads_build_and_run_inside_an_xla_compiled_function(case):
  # The training step is a tf.function, often XLA-compiled, and builds the head on its first trace.
  head = _head(case)

  def both_modes(features, labels):
    return (head(features, labels=labels, training=True),
            head(features, labels=labels, training=False))

  compiled = tf.function(both_modes, jit_compile=True, autograph=False)
  training_logits, inference_logits = compiled(tf.constant(FEATURES), tf.constant(LABELS))
  assert training_logits.shape == (4, NUM_CLASSES)
  assert np.all(np.isfinite(training_logits))
  # Dropout makes training mode random; inference must match eager execution.
  np.testing.assert_allclose(inference_logits, head(FEATURES, labels=LABELS), rtol=1e-4,
                             atol=1e-4)
