"""The input pipeline on tiny shards written here: order, determinism, preprocessing, augmentation,
class balancing, MixUp, and sharding under a real MirroredStrategy."""

import collections
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
from tf_landmarks import schema
from conftest import REPO

COUNTS = [20, 10, 5, 3, 2]  # Very imbalanced: 40 examples of 5 classes.
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (230, 230, 20), (20, 230, 230)]


def _jpeg(colour, width=80, height=60):
  buffer = io.BytesIO()
  Image.new('RGB', (width, height), colour).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """Three train shards; every image is a flat colour identifying its class."""
  root = tmp_path_factory.mktemp('shards')
  examples = [(f'id{label}_{k:02d}', label) for label, count in enumerate(COUNTS)
              for k in range(count)]
  np.random.default_rng(0).shuffle(examples)
  for shard in range(3):
    with tf.io.TFRecordWriter(str(root / f'train-{shard:05d}-of-00003')) as writer:
      for image_id, label in examples[shard::3]:
        writer.write(schema.make_example(image_id, _jpeg(COLOURS[label]), 60, 80, label,
                                         1000 + label).SerializeToString())
  (root / 'label_map.csv').write_text('label,landmark_id,num_images\n' + ''.join(
      f'{label},{1000 + label},{count}\n' for label, count in enumerate(COUNTS)))
  return root, sorted(examples)


def test_eval_returns_every_example_once_in_fixed_order(shards):
  root, examples = shards
  dataset = data.make_dataset(str(root / 'train-*'), training=False, batch_size=7, image_size=32,
                              with_ids=True)
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
  images, labels = next(iter(data.make_dataset(str(root / 'train-*'), training=False,
                                               batch_size=40, image_size=16)))
  for image, label in zip(images.numpy(), labels.numpy()):
    expected = keras.applications.resnet50.preprocess_input(
        np.full((16, 16, 3), COLOURS[label], np.float32))
    assert np.abs(image - expected).max() < 6  # JPEG tolerance.


def test_backbone_none_gives_uint8_that_the_model_preprocesses_identically(shards):
  # The accelerator setting: uint8 batches, preprocessing in the model, same numbers in the end.
  root, _ = shards
  for training in (False, True):
    settings = dict(training=training, batch_size=8, image_size=24, seed=3, deterministic=True)
    raw, _ = next(iter(data.make_dataset(str(root / 'train-*'), backbone=None, **settings)))
    ready, _ = next(iter(data.make_dataset(str(root / 'train-*'), backbone='vgg16', **settings)))
    assert raw.dtype == tf.uint8 and ready.dtype == tf.float32
    np.testing.assert_allclose(data.preprocess(raw, 'vgg16').numpy(), ready.numpy(), atol=1e-4)


@pytest.mark.parametrize('backbone,reference', [
    ('resnet50', keras.applications.resnet50.preprocess_input),
    ('vgg16', keras.applications.vgg16.preprocess_input),
    ('mobilenet_v2', keras.applications.mobilenet_v2.preprocess_input),
])
def test_preprocess_matches_keras_applications(backbone, reference):
  images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(data.preprocess(tf.constant(images), backbone).numpy(),
                             reference(images.copy()), atol=1e-4)


def _take_training(root, batches, **kwargs):
  settings = dict(training=True, batch_size=8, image_size=32, seed=5, deterministic=True)
  settings.update(kwargs)
  dataset = data.make_dataset(str(root / 'train-*'), **settings)
  return [tuple(t.numpy() for t in batch) for batch in dataset.take(batches)]


def test_deterministic_training_repeats_exactly(shards):
  root, _ = shards
  first, again = _take_training(root, 6), _take_training(root, 6)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  other = _take_training(root, 6, seed=6)
  assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))


@pytest.mark.parametrize('augmentation', list(data.Augmentation))
def test_every_augmentation_keeps_shape_and_class_colour(shards, augmentation):
  root, _ = shards
  for images, labels in _take_training(root, 2, augmentation=augmentation, backbone='other'):
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8,)
    assert -1.0 <= images.min() and images.max() <= 1.0
    for image, label in zip(images, labels):
      # Crops and flips of a flat colour keep the colour.
      expected = np.array(COLOURS[label]) / 127.5 - 1
      assert np.abs(image.mean(axis=(0, 1)) - expected).max() < 0.1


def test_inception_crop_changes_pixels_of_structured_images(tmp_path):
  gradient = np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (64, 1, 3))
  buffer = io.BytesIO()
  Image.fromarray(gradient).save(buffer, format='JPEG', quality=95)
  with tf.io.TFRecordWriter(str(tmp_path / 'train-00000-of-00001')) as writer:
    writer.write(schema.make_example('g', buffer.getvalue(), 64, 96, 0, 1).SerializeToString())
  crops = _take_training(tmp_path, 2, batch_size=4, backbone='other')
  flat = np.concatenate([images for images, _ in crops])
  assert len({round(float(image[:, 0].mean()), 2) for image in flat}) > 1


def test_keras_layers_and_mixup(shards):
  root, _ = shards
  for images, labels in _take_training(root, 2, shift_rotate=True, randaugment=True,
                                       mixup_alpha=0.4, num_classes=5, deterministic=False):
    assert images.shape == (8, 32, 32, 3) and np.isfinite(images).all()
    assert labels.shape == (8, 5) and labels.dtype == np.float32
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match='num_classes'):
    data.make_dataset(str(root / 'train-*'), training=True, batch_size=8, mixup_alpha=0.2)


def _class_frequencies(root, balance):
  counts = data.read_class_counts(str(root))
  labels = np.concatenate([labels for _, labels in _take_training(
      root, 250, batch_size=16, image_size=8, class_counts=counts, class_balance=balance,
      deterministic=False, augmentation=data.Augmentation.NONE)])
  frequency = collections.Counter(labels.tolist())
  return np.array([frequency[c] for c in range(5)]) / len(labels)


def test_class_balance_zero_is_uniform_and_one_is_natural(shards):
  root, _ = shards
  assert data.read_class_counts(str(root)) == COUNTS
  np.testing.assert_allclose(_class_frequencies(root, 0.0), 0.2, atol=0.04)
  np.testing.assert_allclose(_class_frequencies(root, 1.0), np.array(COUNTS) / 40, atol=0.04)
  half = _class_frequencies(root, 0.5)
  expected = np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()
  np.testing.assert_allclose(half, expected, atol=0.04)


def test_balancing_weights_keep_epoch_size():
  weights = data.balancing_weights(COUNTS, 0.0)
  assert np.isclose((weights * np.array(COUNTS)).sum(), sum(COUNTS))
  np.testing.assert_allclose(weights * np.array(COUNTS), 8.0)


def test_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match='no files match'):
    data.make_dataset(str(tmp_path / 'nothing-*'), training=False, batch_size=1)
  with pytest.raises(ValueError):
    data.make_dataset(str(tmp_path / 'nothing-*'), training=True, batch_size=1, augmentation='zoom')
  with pytest.raises(ValueError, match='class_counts'):
    data.make_dataset(str(tmp_path / 'x'), training=True, batch_size=1, class_balance=0.5)


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
        return data.make_dataset({str(root / 'train-*')!r}, training=True, batch_size=8,
                                 image_size=16, seed=1, input_context=context)
      dataset = strategy.distribute_datasets_from_function(dataset_fn)
      images, labels = next(iter(dataset))
      shapes = [tuple(t.shape) for t in strategy.experimental_local_results(images)]
      print('SHAPES', shapes, strategy.num_replicas_in_sync)
  ''')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO,
                          timeout=180, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'SHAPES [(4, 16, 16, 3), (4, 16, 16, 3)] 2' in result.stdout
