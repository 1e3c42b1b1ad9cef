"""DELF: the model's stages and losses, keypoint extraction, PCA, and the SavedModel export."""

import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_landmarks import train
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.models import backbones
from tf_landmarks.models import delf
from tf_landmarks.models import losses

NUM_CLASSES = 3
SAVED_MODEL_CLI = pathlib.Path(sys.executable).parent / 'saved_model_cli'


def _tiny_delf(stage='attention', reduced_dim=0, seed=0):
  keras.utils.set_random_seed(seed)
  backbone = backbones.build('tiny', 32, 'none').model
  return delf.build_delf('tiny', backbone, NUM_CLASSES, stage=stage, reduced_dim=reduced_dim)


def _image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _batch():
  """Eight 40×48 images of three classes told apart by colour, with noise."""
  rng = np.random.default_rng(1)
  labels = np.arange(8) % NUM_CLASSES
  colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]])
  images = colours[labels][:, None, None, :] + rng.normal(0, 20, (8, 40, 48, 3))
  return tf.constant(np.clip(images, 0, 255).astype(np.uint8)), tf.constant(labels, tf.int32)


def _ids(variables):
  return {id(variable) for variable in variables}


# --- Receptive fields ------------------------------------------------------------------------


def _field_from_layers(tensor, known=None):
  """(size, stride, padding) of the cells of a Keras tensor along the height axis, computed from
  the layers that made it and the actual sizes they saw (so 'same' padding is exact).

  `known` memoises by tensor: ResNet's 16 residual Adds would otherwise make 2**16 paths.
  """
  known = {} if known is None else known
  if id(tensor) not in known:
    known[id(tensor)] = _field_of_operation(tensor, known)
  return known[id(tensor)]


def _field_of_operation(tensor, known):
  operation, node_index, _ = tensor._keras_history
  if isinstance(operation, keras.layers.InputLayer):
    return 1, 1, 0
  node = operation._inbound_nodes[node_index]
  parents = [_field_from_layers(parent, known) for parent in node.input_tensors]
  # Several inputs (ResNet's Add of a block and its shortcut): the union of their fields.
  strides = {stride for _, stride, _ in parents}
  assert len(strides) == 1, f'{operation.name} adds maps of different strides'
  stride = strides.pop()
  start = min(-padding for _, _, padding in parents)
  end = max(size - 1 - padding for size, _, padding in parents)
  size, padding = end - start + 1, -start
  config = operation.get_config()
  if isinstance(operation, keras.layers.ZeroPadding2D):
    return size, stride, padding + config['padding'][0][0] * stride
  if isinstance(operation, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                            keras.layers.MaxPooling2D)):
    kernel = (config.get('kernel_size') or config['pool_size'])[0]
    step = config['strides'][0]
    before = 0
    if config['padding'] == 'same':
      in_side, out_side = node.input_tensors[0].shape[1], node.output_tensors[0].shape[1]
      before = max((out_side - 1) * step + kernel - in_side, 0) // 2
    return size + (kernel - 1) * stride, stride * step, padding + before * stride
  assert isinstance(operation, (keras.layers.BatchNormalization, keras.layers.Activation,
                                keras.layers.ReLU, keras.layers.Add, keras.layers.Dropout)), operation
  return size, stride, padding


@pytest.mark.parametrize('name, image_size', [
    ('tiny', 64), ('tiny', 72), ('vgg16', 96), ('vgg16', 100), ('resnet50', 96), ('resnet50', 97),
    ('efficientnet_lite0', 64), ('efficientnet_lite0', 224), ('efficientnet_lite2', 96),
])
def test_registry_receptive_fields_are_those_of_the_layers(name, image_size):
  # Sizes: multiples of the input_multiple of tiny (8) and EfficientNet-Lite (16); any size for
  # the others, odd ones included.
  entry = backbones.get(name)
  field = entry.local_feature_receptive_field
  assert image_size % field.input_multiple == 0
  model = entry.build((image_size, image_size, 3), None)
  computed = _field_from_layers(model.get_layer(entry.local_feature_layer).output)
  assert computed == (field.size, field.stride, field.padding)


def test_tiny_receptive_field_needs_its_input_multiple():
  # At 60 px the third convolution's input is odd (15): TensorFlow pads it on the left, which
  # shifts every field; hence the extractor rounds tiny's pyramid sides to multiples of 8.
  entry = backbones.get('tiny')
  model = entry.build((60, 60, 3), None)
  size, stride, padding = _field_from_layers(model.get_layer(entry.local_feature_layer).output)
  assert (size, stride) == (15, 8) and padding != entry.local_feature_receptive_field.padding


# --- The model -------------------------------------------------------------------------------


@pytest.mark.parametrize('stage, reduced_dim', [
    ('attention', 0), ('attention', 16), ('descriptor', 0), ('descriptor', 16)])
def test_each_stage_trains_exactly_its_variables(stage, reduced_dim):
  model = _tiny_delf(stage, reduced_dim)
  attention_parts = [model.attention_conv, model.attention_bn, model.attention_score,
                     model.attention_classifier]
  if reduced_dim:
    attention_parts += [model.autoencoder_reduce, model.autoencoder_expand]
  attention_variables = [v for layer in attention_parts for v in layer.weights
                         if 'moving' not in v.path]
  if stage == 'attention':
    expected = attention_variables
  else:
    expected = model.local_backbone.trainable_weights + model.descriptor_classifier.weights
    assert len(model.local_backbone.trainable_weights) == 9  # Three convolutions and BN pairs.
  assert _ids(model.trainable_variables) == _ids(expected)
  assert len(model.trainable_variables) == len(expected)


@pytest.mark.parametrize('stage, reduced_dim, depth', [
    ('attention', 0, 64), ('attention', 16, 16), ('descriptor', 0, 64)])
def test_logits_and_local_outputs_have_the_documented_shapes(stage, reduced_dim, depth):
  model = _tiny_delf(stage, reduced_dim)
  images, _ = _batch()
  assert model(images).shape == (8, NUM_CLASSES)
  descriptors, attention = model.local_outputs(images)
  assert descriptors.shape == (8, 5, 6, depth) and attention.shape == (8, 5, 6)
  assert model.descriptor_dim == depth
  np.testing.assert_allclose(np.linalg.norm(descriptors, axis=-1), 1.0, atol=1e-5)
  assert np.all(attention.numpy() > 0)  # Softplus.


@pytest.mark.parametrize('stage, reaches_backbone', [('attention', False), ('descriptor', True)])
def test_gradient_reaches_the_backbone_only_in_the_descriptor_stage(stage, reaches_backbone):
  model = _tiny_delf(stage)
  images, labels = _batch()
  pixels = tf.cast(images, tf.float32)
  backbone_variables = [v.value for v in model.local_backbone.weights]
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(pixels)
    tape.watch(backbone_variables)  # Watched even when frozen, so only stop_gradient cuts them.
    loss = tf.reduce_mean(losses.cross_entropy(labels, model(pixels, training=True)))
  pixel_gradient = tape.gradient(loss, pixels)
  variable_gradients = tape.gradient(loss, backbone_variables)
  if reaches_backbone:
    assert float(tf.reduce_max(tf.abs(pixel_gradient))) > 0
    assert any(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in variable_gradients)
  else:
    assert pixel_gradient is None and all(g is None for g in variable_gradients)


@pytest.mark.parametrize('stage, reduced_dim', [
    ('descriptor', 0), ('attention', 0), ('attention', 16)])
def test_train_steps_lower_the_loss(stage, reduced_dim):
  model = _tiny_delf(stage, reduced_dim)
  images, labels = _batch()
  step = tf.function(train.make_train_step(
      model, keras.optimizers.Adam(0.01), lambda y, logits, x: losses.cross_entropy(y, logits),
      global_batch_size=8))
  backbone_before = [v.numpy() for v in model.local_backbone.weights]
  history = [float(step(images, labels)[0]) for _ in range(12)]
  assert history[-1] < 0.8 * history[0], history
  backbone_changed = any(not np.array_equal(before, v.numpy())
                         for before, v in zip(backbone_before, model.local_backbone.weights))
  assert backbone_changed == (stage == 'descriptor')


def test_autoencoder_adds_its_weighted_reconstruction_loss():
  model = _tiny_delf('attention', reduced_dim=16)
  images, _ = _batch()
  model(images, training=True)
  features = model.local_backbone(backbones.preprocess(images, 'tiny'), training=False)
  reconstruction = model.autoencoder_expand(model.autoencoder_reduce(features))
  expected_reconstruction = 10.0 * float(tf.reduce_mean(tf.square(features - reconstruction)))
  expected_decay = sum(1e-4 * float(tf.reduce_sum(tf.square(layer.kernel)))
                       for layer in (model.attention_conv, model.attention_score))
  assert expected_reconstruction > 0
  assert float(tf.add_n(model.losses)) == pytest.approx(
      expected_reconstruction + expected_decay, rel=1e-5)


def test_model_round_trips_through_a_keras_file(tmp_path):
  model = _tiny_delf('attention', reduced_dim=16)
  images, _ = _batch()
  path = str(tmp_path / 'delf.keras')
  model.save(path)
  loaded = keras.models.load_model(path)
  assert isinstance(loaded, delf.DelfModel) and loaded.reduced_dim == 16
  np.testing.assert_allclose(loaded(images), model(images), atol=1e-5)
  for mine, theirs in zip(model.local_outputs(images), loaded.local_outputs(images)):
    np.testing.assert_allclose(theirs, mine, atol=1e-5)
  assert _ids(loaded.trainable_variables).isdisjoint(_ids(loaded.local_backbone.weights))


@pytest.mark.parametrize('options, message', [
    (dict(stage='global'), 'unknown DELF stage'),
    (dict(reduced_dim=64), 'reduced_dim must be 0'),
    (dict(reduced_dim=-1), 'reduced_dim must be 0'),
])
def test_bad_model_options_are_user_errors(options, message):
  backbone = backbones.build('tiny', 32, 'none').model
  with pytest.raises(delf.DelfError, match=message):
    delf.build_delf('tiny', backbone, NUM_CLASSES, **options)


def test_a_model_of_another_backbone_is_a_user_error():
  backbone = backbones.build('tiny', 32, 'none').model
  with pytest.raises(delf.DelfError, match="has no layer 'block4_conv3'"):
    delf.build_delf('vgg16', backbone, NUM_CLASSES)


# --- Extraction ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def attention_model():
  return _tiny_delf('attention', seed=3)


@pytest.mark.parametrize('scale', [0.5, 1.0, 2.0])
def test_keypoints_sit_at_receptive_field_centres_of_their_cells(attention_model, scale):
  # Tiny's cell (i, j) sees resized pixels 8j .. 8j + 14 across, centred on 8j + 7; a resized
  # pixel u is original pixel (u + 0.5) / s − 0.5. E.g. cell (1, 2) at s = 0.5 is at
  # x = (16 + 7 + 0.5) · 2 − 0.5 = 46.5, y = (8 + 7 + 0.5) · 2 − 0.5 = 30.5.
  image = _image(48, 64)
  extractor = delf_features.DelfExtractor(attention_model, scales=(scale,), max_feature_num=10**4)
  features = extractor(image)
  resized = tf.image.resize(tf.cast(image, tf.float32)[None], [int(48 * scale), int(64 * scale)])
  descriptors, attention = (t[0].numpy() for t in attention_model.local_outputs(resized))
  rows, cols = attention.shape
  assert len(features) == rows * cols
  cell_x = (features.locations[:, 0] + 0.5) * scale - 0.5 - 7
  cell_y = (features.locations[:, 1] + 0.5) * scale - 0.5 - 7
  j, i = np.round(cell_x / 8).astype(int), np.round(cell_y / 8).astype(int)
  np.testing.assert_allclose(cell_x, 8 * j, atol=1e-3)
  np.testing.assert_allclose(cell_y, 8 * i, atol=1e-3)
  assert len(set(zip(i, j))) == rows * cols and i.max() == rows - 1 and j.max() == cols - 1
  if scale == 0.5:
    first = np.flatnonzero((i == 1) & (j == 2))[0]
    np.testing.assert_allclose(features.locations[first], [46.5, 30.5], atol=1e-3)
  np.testing.assert_allclose(features.descriptors, descriptors[i, j], atol=1e-5)
  np.testing.assert_allclose(features.scores, attention[i, j], rtol=1e-5)
  np.testing.assert_array_equal(features.scales, np.float32(scale))


def test_features_of_an_odd_sized_image_are_valid_and_sorted(attention_model):
  image = _image(45, 70, seed=2)
  features = delf_features.DelfExtractor(attention_model)(image)
  assert 0 < len(features) <= 1000
  x, y = features.locations[:, 0], features.locations[:, 1]
  # Pixel centres at integers: the image spans −0.5 to side − 0.5.
  assert x.min() >= -0.5 and x.max() <= 70 - 0.5 and y.min() >= -0.5 and y.max() <= 45 - 0.5
  assert np.all(np.diff(features.scores) <= 0)
  np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
  assert set(features.scales.tolist()) <= set(np.float32(delf_features.DEFAULT_SCALES).tolist())
  assert features.descriptors.dtype == features.locations.dtype == np.float32


def test_max_feature_num_and_abs_threshold_are_respected(attention_model):
  image = _image(48, 64)
  everything = delf_features.DelfExtractor(attention_model, scales=(1.0, 0.5),
                                           max_feature_num=10**4)(image)
  threshold = float(np.median(everything.scores))
  kept = delf_features.DelfExtractor(attention_model, scales=(1.0, 0.5), max_feature_num=10**4,
                                     abs_threshold=threshold)(image)
  assert len(kept) == np.sum(everything.scores >= threshold) < len(everything)
  assert kept.scores.min() >= threshold
  top = delf_features.DelfExtractor(attention_model, scales=(1.0, 0.5), max_feature_num=5)(image)
  assert len(top) == 5
  np.testing.assert_array_equal(top.scores, everything.scores[:5])
  np.testing.assert_array_equal(top.locations, everything.locations[:5])


def test_a_threshold_above_every_score_gives_empty_features(attention_model):
  features = delf_features.DelfExtractor(attention_model, abs_threshold=1e9)(_image(48, 64))
  assert len(features) == 0
  assert features.locations.shape == (0, 2) and features.descriptors.shape == (0, 64)
  assert features.scores.shape == features.scales.shape == (0,)


def test_non_maximum_suppression_removes_duplicate_boxes(attention_model):
  # The same scale twice gives every box twice; tiny's neighbouring boxes overlap far less
  # (IoU 0.3), so a 0.9 threshold removes exactly the duplicates.
  image = _image(48, 64)
  with_duplicates = delf_features.DelfExtractor(attention_model, scales=(1.0, 1.0),
                                                max_feature_num=10**4)(image)
  suppressed = delf_features.DelfExtractor(attention_model, scales=(1.0, 1.0),
                                           max_feature_num=10**4, iou_threshold=0.9)(image)
  assert len(with_duplicates) == 2 * 6 * 8 and len(suppressed) == 6 * 8
  assert len({tuple(point) for point in suppressed.locations.tolist()}) == 6 * 8


def test_max_side_caps_the_image_before_the_pyramid(attention_model):
  image = _image(48, 64)
  capped = delf_features.DelfExtractor(attention_model, scales=(1.0,), max_side=32)(image)
  half = delf_features.DelfExtractor(attention_model, scales=(0.5,), max_side=None)(image)
  np.testing.assert_allclose(capped.locations, half.locations, atol=1e-3)
  np.testing.assert_allclose(capped.descriptors, half.descriptors, atol=1e-5)
  np.testing.assert_array_equal(capped.scales, 1.0)  # The nominal pyramid scale.


@pytest.mark.parametrize('arguments, message', [
    (dict(scales=()), 'scales must be one or more positive'),
    (dict(scales=(1.0, -0.5)), 'scales must be one or more positive'),
    (dict(max_feature_num=0), 'max_feature_num must be a positive integer'),
    (dict(iou_threshold=0.0), r'iou_threshold must be in \(0, 1\]'),
    (dict(max_side=0), 'max_side must be a positive integer'),
])
def test_bad_extractor_settings_are_user_errors(attention_model, arguments, message):
  with pytest.raises(delf.DelfError, match=message):
    delf_features.DelfExtractor(attention_model, **arguments)


@pytest.mark.parametrize('image', [np.zeros((16, 16), np.uint8), np.zeros((16, 16, 3), np.float32),
                                   np.zeros((0, 16, 3), np.uint8)])
def test_bad_images_are_user_errors(attention_model, image):
  extractor = delf_features.DelfExtractor(attention_model, scales=(1.0,))
  with pytest.raises(delf.DelfError, match='uint8 RGB image|image is empty'):
    extractor(image)


# --- PCA -------------------------------------------------------------------------------------


def _correlated_descriptors(count=600, depth=64, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(count, depth)) @ rng.normal(size=(depth, depth)) + 0.5


def test_pca_gives_unit_vectors_and_whitening_gives_unit_variance():
  descriptors = _correlated_descriptors()
  pca = delf_features.fit_pca(descriptors, dim=40)
  assert pca.components.shape == (40, 64) and pca.mean.shape == (64,) and pca.dim == 40
  np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(40), atol=1e-5)
  assert np.all(np.diff(pca.variances) <= 0)
  projected = delf_features.apply_pca(descriptors, pca).numpy()
  assert projected.shape == (600, 40)
  np.testing.assert_allclose(np.linalg.norm(projected, axis=1), 1.0, atol=1e-5)

  whitened_pca = delf_features.fit_pca(descriptors, dim=40, whiten=True)
  normalised = descriptors / np.linalg.norm(descriptors, axis=1, keepdims=True)
  whitened = (normalised - whitened_pca.mean) @ whitened_pca.components.T
  whitened /= np.sqrt(whitened_pca.variances)
  np.testing.assert_allclose(whitened.var(axis=0, ddof=1), 1.0, rtol=1e-3)
  np.testing.assert_allclose(
      delf_features.apply_pca(descriptors, whitened_pca),
      whitened / np.linalg.norm(whitened, axis=1, keepdims=True), atol=1e-4)


def test_pca_round_trips_through_its_file_and_rejects_bad_input(tmp_path):
  pca = delf_features.fit_pca(_correlated_descriptors(), dim=8, whiten=True)
  path = str(tmp_path / 'pca' / 'pca.npz')
  delf_features.save_pca(pca, path)
  loaded = delf_features.load_pca(path)
  assert loaded.whiten and loaded.dim == 8
  for name in ('mean', 'components', 'variances'):
    np.testing.assert_array_equal(getattr(loaded, name), getattr(pca, name))
  (tmp_path / 'junk.npz').write_bytes(b'not an npz')
  with pytest.raises(delf.DelfError, match='not a PCA file'):
    delf_features.load_pca(str(tmp_path / 'junk.npz'))
  with pytest.raises(delf.DelfError, match='needs more than 40 descriptors'):
    delf_features.fit_pca(_correlated_descriptors(count=40))
  rng = np.random.default_rng(0)
  in_three_directions = rng.normal(size=(100, 3)) @ rng.normal(size=(3, 10))
  with pytest.raises(delf.DelfError, match='span only 3 directions'):
    delf_features.fit_pca(in_three_directions, dim=5)
  with pytest.raises(delf.DelfError, match='fitted on 64-d descriptors'):
    delf_features.apply_pca(np.ones((3, 10)), delf_features.fit_pca(_correlated_descriptors()))


# --- SavedModel ------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """A tiny DELF model with an autoencoder and a whitened PCA, exported; and its extractor."""
  model = _tiny_delf('attention', reduced_dim=16, seed=5)
  index_features = delf_features.DelfExtractor(model, max_feature_num=10**4)(_image(96, 128, 7))
  pca = delf_features.fit_pca(index_features.descriptors, dim=8, whiten=True)
  path = str(tmp_path_factory.mktemp('export') / 'delf')
  delf_features.export_saved_model(model, path, pca=pca)
  return path, model, pca


def test_saved_model_has_delf_signature_and_matches_the_extractor(exported):
  path, model, pca = exported
  signature = tf.saved_model.load(path).signatures['serving_default']
  assert set(signature.structured_input_signature[1]) == {
      'input_image', 'input_scales', 'input_max_feature_num', 'input_abs_thres'}
  assert set(signature.structured_outputs) == {'boxes', 'features', 'scales', 'scores'}

  image = _image(45, 70, seed=4)
  outputs = signature(input_image=tf.constant(image),
                      input_scales=tf.constant(delf_features.DEFAULT_SCALES, tf.float32),
                      input_max_feature_num=tf.constant(300),
                      input_abs_thres=tf.constant(0.0))
  boxes = outputs['boxes'].numpy()
  assert boxes.shape == (300, 4) and outputs['features'].shape == (300, 8)
  # A box spans the receptive field's 15 resized pixels, in original pixels; the height 45 at
  # scale s is resized to 45·s rounded to a multiple of 8 (tiny's input multiple), at least 8.
  resized_height = np.maximum(np.round(45 / outputs['scales'].numpy() / 8) * 8, 8)
  np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], 14 * 45 / resized_height, rtol=1e-4)

  in_process = delf_features.DelfExtractor(model, max_feature_num=300, pca=pca)(image)
  from_saved = delf_features.load_saved_model(path, max_feature_num=300)(image)
  np.testing.assert_allclose(from_saved.locations, in_process.locations, atol=1e-3)
  np.testing.assert_allclose(from_saved.descriptors, in_process.descriptors, atol=1e-5)
  np.testing.assert_allclose(from_saved.scores, in_process.scores, rtol=1e-5)
  np.testing.assert_array_equal(from_saved.scales, in_process.scales)
  np.testing.assert_allclose(from_saved.locations[:, ::-1], (boxes[:, :2] + boxes[:, 2:]) / 2,
                             atol=1e-3)
  saved_pca = delf_features.load_pca(str(pathlib.Path(path) / delf_features.PCA_FILE))
  np.testing.assert_array_equal(saved_pca.components, pca.components)


def test_saved_model_cli_shows_the_export(exported):
  path, _, _ = exported
  result = subprocess.run([str(SAVED_MODEL_CLI), 'show', '--all', '--dir', path],
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  for name in ('input_image', 'input_scales', 'input_max_feature_num', 'input_abs_thres',
               'boxes', 'features', 'scales', 'scores'):
    assert f"['{name}']" in result.stdout


def test_export_refuses_to_overwrite_unless_asked_and_load_explains_failures(exported, tmp_path):
  _, model, pca = exported
  path = str(tmp_path / 'again')
  delf_features.export_saved_model(model, path, pca=pca)
  with pytest.raises(delf.DelfError, match='already holds a SavedModel'):
    delf_features.export_saved_model(model, path)
  delf_features.export_saved_model(model, path, overwrite=True)
  assert not (tmp_path / 'again' / delf_features.PCA_FILE).exists()  # The old export's PCA.
  assert delf_features.load_saved_model(path)(_image(48, 64)).descriptors.shape[1] == 16
  with pytest.raises(delf.DelfError, match='cannot load a SavedModel'):
    delf_features.load_saved_model(str(tmp_path / 'missing'))
  with pytest.raises(delf.DelfError, match='fitted on 64-d descriptors'):
    delf_features.export_saved_model(model, str(tmp_path / 'other'),
                                     pca=delf_features.fit_pca(_correlated_descriptors()))
