"""The input pipeline on tiny shards written here: order, determinism, preprocessing, augmentation,
class balancing, MixUp, and sharding under a real MirroredStrategy."""

import collections
import dataclasses
import io
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_landmarks import data
from tf_landmarks import records
from tf_landmarks.models import backbones
from helpers import REPO, flat_jpeg, write_records

COUNTS = [20, 10, 5, 3, 2]  # Very imbalanced: 40 examples of 5 classes.
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230)]


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """A records folder with three train shards; every image is a flat colour identifying its class."""
  root = tmp_path_factory.mktemp('shards') / 'records'
  examples = [(f'id{label}_{k:02d}', label) for label, count in enumerate(COUNTS)
              for k in range(count)]
  np.random.default_rng(0).shuffle(examples)
  write_records(root, {'train': [(i, flat_jpeg(COLOURS[label]), label) for i, label in examples]},
                COUNTS, shards_per_split=3)
  return root, sorted(examples)


def _dataset(root, training, **kwargs):
  """make_dataset on the train split; InputConfig fields may be given as keywords."""
  fields = {f.name for f in dataclasses.fields(data.InputConfig)}
  config = data.InputConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
  return data.make_dataset(str(root), 'train', training=training, config=config, **kwargs)


def test_eval_returns_every_example_once_in_fixed_order(shards):
  root, examples = shards
  dataset = _dataset(root, False, batch_size=7, image_size=32, with_ids=True)
  batches = list(dataset)
  ids = [i.decode() for _, _, batch_ids in batches for i in batch_ids.numpy()]
  labels = [int(l) for _, batch_labels, _ in batches for l in batch_labels.numpy()]
  assert sorted(ids) == [image_id for image_id, _ in examples]
  assert labels == [dict(examples)[i] for i in ids]
  again = [i.decode() for _, _, batch_ids in dataset for i in batch_ids.numpy()]
  assert again == ids
  images = batches[0][0]
  assert images.shape == (7, 32, 32, 3) and images.dtype == tf.float32
  assert batches[-1][0].shape[0] == 40 % 7  # The last partial batch is kept in evaluation.


def test_eval_pixels_are_resnet_preprocessed_class_colours(shards):
  root, _ = shards
  images, labels = next(iter(_dataset(root, False, batch_size=40, image_size=32)))
  for image, label in zip(images.numpy(), labels.numpy()):
    expected = keras.applications.resnet50.preprocess_input(
        np.full((32, 32, 3), COLOURS[label], np.float32))
    assert np.abs(image - expected).max() < 6  # JPEG tolerance.


def test_backbone_none_gives_uint8_that_the_model_preprocesses_identically(shards):
  # The accelerator setting: uint8 batches, preprocessing in the model, same numbers in the end.
  root, _ = shards
  for training in (False, True):
    settings = dict(batch_size=8, image_size=32, seed=3, deterministic=True)
    raw, _ = next(iter(_dataset(root, training, backbone=None, **settings)))
    ready, _ = next(iter(_dataset(root, training, backbone='vgg16', **settings)))
    assert raw.dtype == tf.uint8 and ready.dtype == tf.float32
    np.testing.assert_allclose(backbones.preprocess(raw, 'vgg16').numpy(), ready.numpy(), atol=1e-4)


@pytest.mark.parametrize('backbone,reference', [
    ('resnet50', keras.applications.resnet50.preprocess_input),
    ('vgg16', keras.applications.vgg16.preprocess_input),
    ('tiny', keras.applications.mobilenet_v2.preprocess_input),  # Keras's 'tf' mode: [-1, 1].
])
def test_preprocess_matches_keras_applications(backbone, reference):
  images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(backbones.preprocess(tf.constant(images), backbone).numpy(),
                             reference(images.copy()), atol=1e-4)


def test_unknown_backbone_is_an_error_listing_the_valid_names(shards):
  with pytest.raises(ValueError, match="unknown backbone 'resnet_50'; choose one of vgg16, resnet50"):
    backbones.preprocess(tf.zeros([1, 4, 4, 3]), 'resnet_50')
  root, _ = shards
  with pytest.raises(ValueError, match='resnet_50'):
    _dataset(root, False, batch_size=2, backbone='resnet_50')


def _take_training(root, batches, **kwargs):
  settings = dict(batch_size=8, image_size=32, seed=5, deterministic=True)
  settings.update(kwargs)
  dataset = _dataset(root, True, **settings)
  return [tuple(t.numpy() for t in batch) for batch in dataset.take(batches)]


def test_deterministic_training_repeats_exactly(shards):
  root, _ = shards
  first, again = _take_training(root, 6), _take_training(root, 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  other = _take_training(root, 6, seed=6)
  assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))


@pytest.mark.parametrize('layers', [{}, {'mixup_alpha': 0.4, 'shift_rotate': True}])
def test_skip_continues_the_deterministic_stream_batch_for_batch(shards, layers):
  # What a resumed --deterministic run relies on: skipping k batches gives batches k, k+1, … of
  # the whole stream, also with the batch layers' random state (which must advance over them).
  root, _ = shards
  whole = _take_training(root, 9, augmentation='resize_crop', **layers)
  resumed = [tuple(t.numpy() for t in batch) for batch in _dataset(
      root, True, batch_size=8, image_size=32, seed=5, deterministic=True, skip=5,
      augmentation='resize_crop', **layers).take(4)]
  for a, b in zip(whole[5:], resumed):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_shuffle_buffer_is_capped_by_the_memory_budget():
  assert data.shuffle_buffer_size(4096, bytes_per_example=1e6, budget=10**9) == 1000
  assert data.shuffle_buffer_size(4096, bytes_per_example=1e3, budget=10**9) == 4096
  assert data.shuffle_buffer_size(4096, bytes_per_example=1e9, budget=10**6) == 1
  assert 0 < data.memory_budget() < os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


@pytest.mark.parametrize('augmentation', list(data.Augmentation))
def test_every_augmentation_keeps_shape_and_class_colour(shards, augmentation):
  root, _ = shards
  for images, labels in _take_training(root, 2, augmentation=augmentation, backbone='tiny'):
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8,)
    assert -1.0 <= images.min() and images.max() <= 1.0
    for image, label in zip(images, labels):
      # Crops and flips of a flat colour keep the colour.
      expected = np.array(COLOURS[label]) / 127.5 - 1
      assert np.abs(image.mean(axis=(0, 1)) - expected).max() < 0.1


@pytest.fixture(scope='module')
def structured(tmp_path_factory):
  """One 96×64 image of random blocks: every crop, shift or rotation changes its pixels."""
  blocks = np.random.default_rng(7).integers(0, 256, (8, 12, 3), dtype=np.uint8)
  image = np.kron(blocks, np.ones((8, 8, 1), np.uint8))
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=95)
  root = tmp_path_factory.mktemp('structured') / 'records'
  return write_records(root, {'train': [('g', buffer.getvalue(), 0)]}, [1])


def _train_images(root, **kwargs):
  settings = dict(batch_size=8, image_size=32, seed=5, deterministic=True, backbone=None)
  settings.update(kwargs)
  return np.concatenate([images for images, _ in _take_training(root, 2, **settings)])


def _eval_crop(root):
  images, _ = next(iter(_dataset(root, False, batch_size=1, image_size=32, backbone=None)))
  return images.numpy()[0].astype(float)


@pytest.mark.parametrize('augmentation', [data.Augmentation.INCEPTION_CROP,
                                          data.Augmentation.RESIZE_CROP])
def test_random_crops_differ_from_the_evaluation_crop(structured, augmentation):
  # Every training image is the crop, maybe mirrored; a random crop must differ from the fixed
  # evaluation crop and its mirror image for most elements, and from element to element.
  evaluation = _eval_crop(structured)
  crops = _train_images(structured, augmentation=augmentation).astype(float)
  distance = np.array([min(np.abs(crop - evaluation).mean(), np.abs(crop[:, ::-1] - evaluation).mean())
                       for crop in crops])
  assert (distance > 8).mean() > 0.5, distance
  assert len({crop.tobytes() for crop in crops}) > 4
  none = _train_images(structured, augmentation=data.Augmentation.NONE).astype(float)
  assert all(min(np.abs(c - evaluation).mean(), np.abs(c[:, ::-1] - evaluation).mean()) < 1
             for c in none)


@pytest.mark.parametrize('layer', ['shift_rotate', 'randaugment'])
def test_batch_augmentation_layers_change_the_pixels(structured, layer):
  plain = _train_images(structured, augmentation=data.Augmentation.NONE).astype(float)
  augmented = _train_images(structured, augmentation=data.Augmentation.NONE,
                            **{layer: True}).astype(float)
  assert augmented.shape == plain.shape
  changed = np.abs(augmented - plain).mean(axis=(1, 2, 3))
  assert (changed > 3).sum() >= 4, changed  # Most of the 16 images moved or changed colour.


def test_mixup_mixes_images_and_labels_of_two_classes(shards):
  root, _ = shards
  images, labels = _take_training(root, 1, batch_size=16, mixup_alpha=1.0, backbone=None,
                                  augmentation=data.Augmentation.NONE, image_size=32)[0]
  assert labels.shape == (16, 5) and labels.dtype == np.float32
  np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
  mixed = (labels > 0.05).sum(axis=1) == 2
  # Plain one-hot labels would give no mixed row; pairs of one class (half the data is class 0)
  # stay one-hot, so about half the rows mix two classes.
  assert mixed.sum() >= 4, labels
  # Each image is the same mixture of its two flat class colours as its label says.
  for image, label in zip(images[mixed], labels[mixed]):
    expected = (label[:, None] * np.array(COLOURS, float)).sum(axis=0)
    assert np.abs(image.astype(float).mean(axis=(0, 1)) - expected).max() < 8


def _class_frequencies(root, balance):
  labels = np.concatenate([labels for _, labels in _take_training(
      root, 250, batch_size=16, image_size=32, class_balance=balance,
      deterministic=False, augmentation=data.Augmentation.NONE)])
  frequency = collections.Counter(labels.tolist())
  return np.array([frequency[c] for c in range(5)]) / len(labels)


def test_class_balance_zero_is_uniform_and_one_is_natural(shards):
  root, _ = shards
  assert records.load(str(root)).class_counts == tuple(COUNTS)
  np.testing.assert_allclose(_class_frequencies(root, 0.0), 0.2, atol=0.04)
  np.testing.assert_allclose(_class_frequencies(root, 1.0), np.array(COUNTS) / 40, atol=0.04)
  half = _class_frequencies(root, 0.5)
  expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
  np.testing.assert_allclose(half, expected, atol=0.04)


def test_balancing_weights_keep_epoch_size():
  weights = data.balancing_weights(COUNTS, 0.0)
  assert np.isclose((weights * np.array(COUNTS)).sum(), sum(COUNTS))
  np.testing.assert_allclose(weights * np.array(COUNTS), 8.0)


def test_errors_are_clear(shards, tmp_path):
  root, _ = shards
  with pytest.raises(records.RecordsError, match='is not a record build'):
    data.make_dataset(str(tmp_path), 'train', training=False, batch_size=1)
  with pytest.raises(ValueError, match="'zoom' is not a valid Augmentation"):
    _dataset(root, True, batch_size=1, augmentation='zoom')
  with pytest.raises(records.RecordsError, match='the validation split of .* is empty'):
    data.make_dataset(str(root), 'validation', training=False, batch_size=1)
  with pytest.raises(records.RecordsError, match="unknown split 'dev'"):
    data.make_dataset(str(root), 'dev', training=False, batch_size=1)


def test_mirrored_strategy_two_replicas_each_get_their_share(shards):
  # Logical devices must be set before TensorFlow initialises, hence a fresh process.
  root, _ = shards
  script = textwrap.dedent(f'''
      import tensorflow as tf
      cpu = tf.config.list_physical_devices('CPU')[0]
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      from tf_landmarks import data
      strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])
      def dataset_fn(context):
        return data.make_dataset({str(root)!r}, 'train', training=True, batch_size=8,
                                 config=data.InputConfig(image_size=32), seed=1,
                                 input_context=context)
      dataset = strategy.distribute_datasets_from_function(dataset_fn)
      images, labels = next(iter(dataset))
      shapes = [tuple(t.shape) for t in strategy.experimental_local_results(images)]
      print('SHAPES', shapes, strategy.num_replicas_in_sync)
  ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO,
                          timeout=180, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'SHAPES [(4, 32, 32, 3), (4, 32, 32, 3)] 2' in result.stdout


@pytest.mark.parametrize('height, width', [(1, 1), (7, 300), (224, 224), (255, 256), (256, 255),
                                           (481, 640), (640, 481), (1000, 3)])
def test_eval_crop_is_resize_with_crop_or_pad_of_the_short_side_resize(height, width):
  # The slice replaced tf.image.resize_with_crop_or_pad for speed: it must give the same bytes.
  rng = np.random.default_rng(height * 7919 + width)
  image = tf.constant(rng.integers(0, 256, (height, width, 3)), tf.uint8)
  resized = data._resize_short_side(image, 224 / 0.875)  # pylint: disable=protected-access
  expected = tf.cast(tf.image.resize_with_crop_or_pad(resized, 224, 224) + 0.5, tf.uint8)
  crop = data.eval_crop(image, 224)
  assert crop.shape == (224, 224, 3)
  np.testing.assert_array_equal(crop.numpy(), expected.numpy())
  batch = data.eval_crop(tf.stack([image, image]), 224)
  assert batch.shape == (2, 224, 224, 3)
  np.testing.assert_array_equal(batch[1].numpy(), expected.numpy())
