"""The backbone registry: building, ImageNet weights from Keras's cache, weight files, freezing."""

import hashlib
import os

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import file_utils

from tf_landmarks import errors
from tf_landmarks.models import backbones

RESNET_FILE = 'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5'


def _images(size, seed=0, batch=2):
  return tf.constant(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), tf.float32)


def _sha256(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _save_legacy_h5(model, path):
  """Writes `model`'s weights in the legacy format of keras.applications' ImageNet files."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture
def downloads(monkeypatch):
  """Records every download attempt and fails it as an offline machine would."""
  attempts = []

  def offline_get_file(fname, origin, **kwargs):
    attempts.append(dict(fname=fname, origin=origin, **kwargs))
    raise Exception(f'URL fetch failure on {origin}: None -- [Errno -3] Temporary failure in '
                    'name resolution')

  monkeypatch.setattr(keras.utils, 'get_file', offline_get_file)
  monkeypatch.setattr(file_utils, 'get_file', offline_get_file)
  return attempts


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
  home = tmp_path / 'keras_home'
  home.mkdir()
  monkeypatch.setenv('KERAS_HOME', str(home))
  return home


@pytest.mark.parametrize('name, image_size, channels, local_channels', [
    ('vgg16', 96, 512, 512),
    ('resnet50', 96, 2048, 1024),
    ('tiny', 32, 128, 64),
    ('efficientnet_lite0', 64, 1280, 672),
    ('efficientnet_lite2', 64, 1280, 720),
])
def test_every_backbone_builds_a_spatial_map_and_has_its_local_feature_layer(
    name, image_size, channels, local_channels):
  built = backbones.build(name, image_size, 'none')
  assert (built.weights, built.weights_sha256) == ('none', None)
  features = built.model(_images(image_size), training=False)
  assert features.shape[0] == 2 and features.shape[3] == channels
  assert features.shape[1] == features.shape[2] >= 1
  local_layer = built.model.get_layer(backbones.get(name).local_feature_layer)
  assert local_layer.output.shape[-1] == local_channels
  assert local_layer.output.shape[1] > features.shape[1]  # Mid-level: a finer map than the last.


@pytest.mark.parametrize('name, image_size', [
    ('tiny', 31), ('tiny', 513), ('vgg16', 95), ('resnet50', 64), ('tiny', 64.0), ('tiny', True),
])
def test_image_size_out_of_range_is_a_user_error(name, image_size):
  with pytest.raises(errors.UserError, match=f'the {name} backbone takes image sizes of'):
    backbones.build(name, image_size, 'none')


def test_image_size_limits_are_accepted():
  assert backbones.build('tiny', 32, 'none').model.input_shape == (None, 32, 32, 3)
  assert backbones.build('tiny', 512, 'none').model.input_shape == (None, 512, 512, 3)


def test_unknown_backbone_and_empty_weights_are_user_errors():
  with pytest.raises(errors.UserError, match="unknown backbone 'resnet_50'; choose one of vgg16"):
    backbones.build('resnet_50', 96, 'none')
  with pytest.raises(errors.UserError, match='--weights'):
    backbones.build('tiny', 32, '')
  with pytest.raises(errors.UserError, match=r'\.weights\.h5'):
    backbones.build('tiny', 32, 'imagenet.ckpt')


@pytest.mark.parametrize('name, application', [
    ('resnet50', keras.applications.ResNet50), ('vgg16', keras.applications.VGG16),
])
def test_imagenet_file_name_url_and_hash_are_the_ones_keras_uses(name, application, downloads):
  with pytest.raises(Exception, match='URL fetch failure'):
    application(include_top=False, weights='imagenet', input_shape=(96, 96, 3))
  [keras_request] = downloads
  expected = backbones.get(name).imagenet
  assert (keras_request['fname'], keras_request['origin'], keras_request['file_hash']) == (
      expected.file_name, expected.url, expected.md5)
  assert keras_request['cache_subdir'] == 'models'


def test_imagenet_weights_load_from_the_keras_cache_without_network(keras_home, downloads):
  reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(96, 96, 3))
  cached = keras_home / 'models' / RESNET_FILE
  _save_legacy_h5(reference, str(cached))

  built = backbones.build('resnet50', 128, 'imagenet')

  assert downloads == []
  assert (built.weights, built.weights_sha256) == ('imagenet', _sha256(cached))
  for layer_name in ('conv1_conv', 'conv5_block3_3_conv'):
    np.testing.assert_array_equal(built.model.get_layer(layer_name).kernel.numpy(),
                                  reference.get_layer(layer_name).kernel.numpy())
  np.testing.assert_array_equal(built.model.get_layer('conv5_block3_3_bn').moving_mean.numpy(),
                                reference.get_layer('conv5_block3_3_bn').moving_mean.numpy())


def test_imagenet_weights_missing_from_the_cache_are_downloaded_into_it(keras_home, monkeypatch):
  reference = keras.applications.VGG16(include_top=False, weights=None, input_shape=(96, 96, 3))
  requests = []

  def fake_download(fname, origin, cache_subdir, file_hash, cache_dir):
    requests.append((fname, origin, cache_subdir, file_hash, cache_dir))
    path = os.path.join(cache_dir, cache_subdir, fname)
    _save_legacy_h5(reference, path)
    return path

  monkeypatch.setattr(keras.utils, 'get_file', fake_download)
  built = backbones.build('vgg16', 96, 'imagenet')

  spec = backbones.get('vgg16').imagenet
  assert requests == [(spec.file_name, spec.url, 'models', spec.md5, str(keras_home))]
  assert built.weights_sha256 == _sha256(keras_home / 'models' / spec.file_name)
  np.testing.assert_array_equal(built.model.get_layer('block5_conv3').kernel.numpy(),
                                reference.get_layer('block5_conv3').kernel.numpy())


@pytest.mark.parametrize('name', ['resnet50', 'vgg16'])
def test_imagenet_weights_neither_cached_nor_downloadable_are_a_user_error(
    name, keras_home, downloads):
  expected_path = keras_home / 'models' / backbones.get(name).imagenet.file_name
  with pytest.raises(errors.UserError) as raised:
    backbones.build(name, 96, 'imagenet')
  message = str(raised.value)
  assert '\n' not in message
  assert str(expected_path) in message
  assert 'Temporary failure in name resolution' in message
  assert '--weights=none' in message and '--weights=<path to a .weights.h5>' in message
  assert len(downloads) == 1


def test_tiny_has_no_imagenet_weights(keras_home, downloads):
  with pytest.raises(errors.UserError, match='tiny backbone has no ImageNet weights'):
    backbones.build('tiny', 32, 'imagenet')
  assert downloads == []


def test_weights_file_round_trip_gives_identical_outputs(tmp_path):
  original = backbones.build('tiny', 32, 'none').model
  images = _images(32)
  # Moves the BatchNormalization statistics away from their initial values, so they are tested too.
  original(images, training=True)
  path = str(tmp_path / 'tiny.weights.h5')
  original.save_weights(path)

  loaded = backbones.build('tiny', 32, path)

  assert (loaded.weights, loaded.weights_sha256) == (path, _sha256(path))
  np.testing.assert_array_equal(loaded.model(images, training=False).numpy(),
                                original(images, training=False).numpy())
  # The backbones are fully convolutional: the same file serves another image size.
  larger = backbones.build('tiny', 64, path).model
  np.testing.assert_array_equal(larger.get_layer('block4_conv').kernel.numpy(),
                                original.get_layer('block4_conv').kernel.numpy())


def test_remote_weights_file_is_copied_and_loaded(tmp_path):
  original = backbones.build('tiny', 32, 'none').model
  local = str(tmp_path / 'tiny.weights.h5')
  original.save_weights(local)
  remote = 'ram://backbone-test/tiny.weights.h5'
  tf.io.gfile.makedirs('ram://backbone-test')
  tf.io.gfile.copy(local, remote, overwrite=True)

  loaded = backbones.build('tiny', 32, remote)

  assert (loaded.weights, loaded.weights_sha256) == (remote, _sha256(local))
  np.testing.assert_array_equal(loaded.model.get_layer('block1_conv').kernel.numpy(),
                                original.get_layer('block1_conv').kernel.numpy())


def _tiny_like(channels):
  """A stack of the tiny backbone's block type with the given widths (another architecture)."""
  inputs = keras.Input((32, 32, 3))
  x = inputs
  for width in channels:
    x = keras.layers.Conv2D(width, 3, strides=2, padding='same', use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
  return keras.Model(inputs, x)


@pytest.mark.parametrize('other_channels', [
    (16, 32, 64, 128, 256),  # A superset: Keras alone would load it silently.
    (16, 32),  # A subset.
    (16, 32, 64, 96),  # Same layers, another width.
])
def test_weights_file_of_another_architecture_is_a_user_error_naming_it(tmp_path, other_channels):
  path = str(tmp_path / 'other.weights.h5')
  _tiny_like(other_channels).save_weights(path)
  with pytest.raises(errors.UserError, match=f'cannot load weights file {path} into the tiny'):
    backbones.build('tiny', 32, path)


def test_legacy_weights_file_of_another_architecture_is_a_user_error(tmp_path):
  path = str(tmp_path / 'other.h5')
  _save_legacy_h5(_tiny_like((16, 32)), path)
  with pytest.raises(errors.UserError, match=f'cannot load weights file {path} into the tiny'):
    backbones.build('tiny', 32, path)


def test_missing_or_unreadable_weights_file_is_a_user_error_naming_it(tmp_path):
  missing = str(tmp_path / 'missing.weights.h5')
  with pytest.raises(errors.UserError, match=f'weights file {missing} does not exist'):
    backbones.build('tiny', 32, missing)
  not_hdf5 = tmp_path / 'junk.weights.h5'
  not_hdf5.write_bytes(b'not an HDF5 file')
  with pytest.raises(errors.UserError, match=f'cannot load weights file {not_hdf5} into the tiny'):
    backbones.build('tiny', 32, str(not_hdf5))
  with pytest.raises(errors.UserError, match='cannot read weights file nofs://'):
    backbones.build('tiny', 32, 'nofs://bucket/tiny.weights.h5')


def _frozen_flags(model):
  return [not layer.trainable for layer in model.layers]


def test_freeze_counts_and_flags_on_tiny():
  model = backbones.build('tiny', 32, 'none').model
  total = len(model.layers)
  assert total == 13  # Input + 4 blocks of conv, batch norm, relu.

  assert backbones.freeze(model, 'tiny', 'all') == total
  assert all(_frozen_flags(model)) and model.trainable_weights == []

  for nothing in ('', None):
    assert backbones.freeze(model, 'tiny', nothing) == 0
    assert not any(_frozen_flags(model))

  assert backbones.freeze(model, 'tiny', 'block2') == 7
  assert _frozen_flags(model) == [True] * 7 + [False] * 6
  assert model.layers[6].name == 'block2_out'

  assert backbones.freeze(model, 'tiny', 'block2_bn') == 6
  assert _frozen_flags(model) == [True] * 6 + [False] * 7

  assert backbones.freeze(model, 'tiny', '5') == 5
  assert backbones.freeze(model, 'tiny', 5) == 5
  assert _frozen_flags(model) == [True] * 5 + [False] * 8
  # block2_bn's gamma and beta, then blocks 3 and 4: a conv kernel, gamma and beta each.
  assert len(model.trainable_weights) == 2 + 2 * 3


@pytest.mark.parametrize('until', ['block9', 'conv4', '14', '-1', 'all_layers'])
def test_freeze_unknown_name_is_a_user_error_listing_the_blocks(until):
  model = backbones.build('tiny', 32, 'none').model
  with pytest.raises(errors.UserError, match=r'\(block1, block2, block3, block4\)'):
    backbones.freeze(model, 'tiny', until)


def test_freeze_blocks_of_the_keras_backbones():
  vgg = backbones.build('vgg16', 96, 'none').model
  # One reference froze VGG16's first 15 layers: the input and blocks 1 to 4.
  assert backbones.freeze(vgg, 'vgg16', '15') == backbones.freeze(vgg, 'vgg16', 'block4') == 15
  assert vgg.layers[14].name == 'block4_pool' and not vgg.layers[14].trainable
  assert vgg.layers[15].name == 'block5_conv1' and vgg.layers[15].trainable

  resnet = backbones.build('resnet50', 96, 'none').model
  count = backbones.freeze(resnet, 'resnet50', 'conv4')
  assert resnet.layers[count - 1].name == 'conv4_block6_out'
  assert all(not layer.trainable for layer in resnet.layers[:count])
  assert all(layer.name.startswith('conv5_') and layer.trainable
             for layer in resnet.layers[count:])


def test_frozen_batch_normalization_runs_in_inference_mode():
  model = backbones.build('tiny', 32, 'none').model
  batch_norms = [layer for layer in model.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
  images = _images(32, batch=4) * 3.0 + 1.0

  def statistics():
    return [np.concatenate([bn.moving_mean.numpy(), bn.moving_variance.numpy()])
            for bn in batch_norms]

  backbones.freeze(model, 'tiny', 'all')
  before = statistics()
  frozen_training = model(images, training=True).numpy()
  for old, new in zip(before, statistics()):
    np.testing.assert_array_equal(new, old)
  np.testing.assert_allclose(frozen_training, model(images, training=False).numpy(), atol=1e-6)

  # The same call on the unfrozen model does move them: the check above can fail.
  backbones.freeze(model, 'tiny', '')
  model(images, training=True)
  assert all(not np.array_equal(new, old) for old, new in zip(before, statistics()))
