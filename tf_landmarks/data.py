"""The tf.data input pipeline: shards → decoded, augmented, preprocessed batches.

Training pipeline, in order (each step where it is cheapest):
  shuffled shard list → (per-worker shard) → parallel interleaved reading → repeat → class balancing
  (parses only the label) → shuffle (serialized records) → one map: parse + decode + crop
  (`decode_and_crop_jpeg` decodes only the crop) + resize + flip → batch → batch-level Keras layers
  (shift/rotate, RandAugment, MixUp) → backbone preprocessing → prefetch.
Every per-example step lives in that one map because each extra parallel map hands every element
to another thread, which cost ~10% of the throughput on 256-px images (bench/bench_input_pipeline.py).

Images stay uint8 until the batch: a float32 224-px image is 600 KB, and on these 2 cores merely casting
a batch to float costs ~0.4 ms per image, as much as decoding it (BUILD_NOTES.md). With `backbone=None`
the pipeline stops at uint8 and the model applies `preprocess` itself, on the accelerator, which also
makes the host → device copy 4× smaller: the setting for GPU and TPU training.

Evaluation reads the shards in file order, decodes, resizes the short side to `image_size / 0.875` and
takes the central `image_size` square (the usual ImageNet evaluation crop), with no randomness, so each
example comes out exactly once and in a fixed order.

Batches are `(images, labels)`: images float32 [B, S, S, 3] preprocessed for the backbone (uint8 in
[0, 255] with `backbone=None`), labels int32 [B]; with MixUp labels are float32 one-hot mixtures
[B, num_classes]. With `with_ids=True` batches are `(images, labels, ids)`, ids a string [B] tensor.
"""

import enum
import random
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_landmarks import inspect_records
from tf_landmarks import schema

# VGG16 and ResNet50 were trained on Caffe-style inputs: BGR, ImageNet channel means subtracted, no
# scaling (keras.applications.{vgg16,resnet50}.preprocess_input). Every other backbone we use expects
# [-1, 1] (mode 'tf' of keras.applications.imagenet_utils).
CAFFE_BACKBONES = frozenset({'vgg16', 'resnet50'})
_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
_EVAL_CROP_FRACTION = 0.875


class Augmentation(str, enum.Enum):
  """How a training image is cropped to `image_size`."""
  INCEPTION_CROP = 'inception_crop'  # Random area 8–100%, aspect 3/4–4/3, like Inception training.
  RESIZE_CROP = 'resize_crop'  # Short side to image_size·256/224, random image_size crop.
  NONE = 'none'  # The evaluation crop.


def preprocess(images: tf.Tensor, backbone: str) -> tf.Tensor:
  """Maps RGB images in [0, 255] (any dtype) to float32 as `backbone` was trained (CAFFE_BACKBONES)."""
  images = tf.cast(images, tf.float32)
  if backbone in CAFFE_BACKBONES:
    # tf.reverse, not images[..., ::-1]: the negative-stride slice is 3× slower on CPU (measured).
    return tf.reverse(images, axis=[-1]) - tf.constant(_CAFFE_BGR_MEANS, tf.float32)
  return images / 127.5 - 1.0


def read_class_counts(records_dir: str) -> list[int]:
  """Training images per label, from `label_map.csv` of a record build (index = label)."""
  rows = sorted(inspect_records.read_label_map(records_dir), key=lambda row: row['label'])
  if [row['label'] for row in rows] != list(range(len(rows))):
    raise ValueError(f'{records_dir}/label_map.csv does not list labels 0..{len(rows) - 1}')
  return [row['num_images'] for row in rows]


def balancing_weights(class_counts: Sequence[int], power: float) -> np.ndarray:
  """Expected copies per example of each class so that classes are drawn ∝ n_c^power.

  power 1 keeps the natural distribution, 0 makes classes uniform. Weights are normalised so that an
  epoch keeps about the same number of examples: w_c = n_c^(power−1) · N / Σ n_c^power.
  """
  counts = np.maximum(np.asarray(class_counts, np.float64), 1.0)
  return (counts ** (power - 1.0) * counts.sum() / (counts ** power).sum()).astype(np.float32)


def _balance(records: tf.data.Dataset, weights: np.ndarray, run_seed: int) -> tf.data.Dataset:
  """Repeats or drops each serialized example: floor(w) copies plus one with probability frac(w).

  O(1) per example whatever the number of classes (one dataset per class, as `sample_from_datasets`
  needs, does not scale to 200k classes), and it runs before decoding, so dropped examples cost nothing.
  One map per example, its random draw seeded by (run_seed, index), like the augmentation.
  """
  weights = tf.constant(weights)

  def copies(index, record):
    weight = tf.gather(weights, schema.parse_label(record))
    uniform = tf.random.stateless_uniform([], seed=tf.stack([tf.constant(run_seed, tf.int64), index]))
    count = tf.cast(tf.floor(weight), tf.int32) + tf.cast(uniform < weight - tf.floor(weight), tf.int32)
    # A batch of `count` copies, flattened by unbatch(): no per-example Dataset objects (flat_map).
    return tf.repeat(record[tf.newaxis], count, axis=0)

  return records.enumerate().map(copies, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def _resize_short_side(image: tf.Tensor, short_side: float) -> tf.Tensor:
  """Bilinear resize (float32 out) so that the shorter side is at least `short_side`."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = short_side / tf.reduce_min(shape)
  return tf.image.resize(image, tf.cast(tf.math.ceil(shape * scale), tf.int32))


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds a bilinear resize back to uint8, so that batches carry a quarter of the bytes.

  Bilinear weights are convex, so values stay in [0, 255]: +0.5 and truncation round without the
  extra passes of round/saturate_cast.
  """
  return tf.cast(image + 0.5, tf.uint8)


def _eval_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
  resized = _resize_short_side(tf.io.decode_jpeg(encoded, channels=3),
                               image_size / _EVAL_CROP_FRACTION)
  return _to_uint8(tf.image.resize_with_crop_or_pad(resized, image_size, image_size))


def _train_image(encoded: tf.Tensor, seed: tf.Tensor, image_size: int,
                 augmentation: Augmentation) -> tf.Tensor:
  if augmentation == Augmentation.INCEPTION_CROP:
    shape = tf.image.extract_jpeg_shape(encoded)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
        min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.io.decode_and_crop_jpeg(encoded, window, channels=3)
    image = _to_uint8(tf.image.resize(image, (image_size, image_size)))
  elif augmentation == Augmentation.RESIZE_CROP:
    image = _resize_short_side(tf.io.decode_jpeg(encoded, channels=3), image_size * 256 / 224)
    image = _to_uint8(tf.image.stateless_random_crop(image, (image_size, image_size, 3), seed=seed))
  else:
    image = _eval_image(encoded, image_size)
  return tf.image.stateless_random_flip_left_right(image, seed=seed + 1)


def _read_records(file_pattern: str, training: bool, seed: Optional[int],
                  input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
  files = sorted(tf.io.gfile.glob(file_pattern))
  if not files:
    raise ValueError(f'no files match {file_pattern!r}; build shards with tfl-build-records')
  dataset = tf.data.Dataset.from_tensor_slices(files)
  shard_records = False
  if input_context and input_context.num_input_pipelines > 1:
    if len(files) >= input_context.num_input_pipelines:
      dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    else:  # Fewer files than workers: every worker reads all and keeps its share of records.
      shard_records = True
  if training:
    dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
  records = dataset.interleave(
      lambda path: tf.data.TFRecordDataset(path, buffer_size=8 << 20),
      cycle_length=min(len(files), 16), block_length=1 if training else 1 << 30,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True if not training else None)
  if shard_records:
    records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  return records


def make_dataset(file_pattern: str, training: bool, batch_size: int, image_size: int = 224,
                 backbone: Optional[str] = 'resnet50',
                 augmentation: Augmentation = Augmentation.INCEPTION_CROP,
                 shift_rotate: bool = False, randaugment: bool = False,
                 mixup_alpha: float = 0.0, num_classes: Optional[int] = None,
                 class_counts: Optional[Sequence[int]] = None, class_balance: float = 1.0,
                 shuffle_buffer: int = 4096, seed: Optional[int] = None,
                 deterministic: bool = False, with_ids: bool = False,
                 input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
  """Batches of preprocessed images and labels from TFRecord shards (see the module docstring).

  Args:
    file_pattern: glob of shards, e.g. 'records/gld/train-*' (any tf.io.gfile path).
    training: shuffle, repeat forever, balance classes and augment; otherwise one ordered pass.
    batch_size: global batch size; with `input_context` each replica gets its share.
    image_size: side of the square output images.
    backbone: selects the preprocessing (`preprocess`); None leaves images uint8 in [0, 255] for the
      model to preprocess on the accelerator (see the module docstring).
    augmentation: the training crop.
    shift_rotate: also apply Keras RandomTranslation(±10%) and RandomRotation(±18°) on batches.
    randaugment: also apply Keras RandAugment (2 ops, factor 0.5) on batches.
    mixup_alpha: > 0 applies Keras MixUp with this alpha; labels become one-hot mixtures.
    num_classes: needed with MixUp (label width).
    class_counts: training images per label (`read_class_counts`), needed for `class_balance` ≠ 1.
    class_balance: classes are drawn ∝ n_c^class_balance: 1 natural, 0 uniform, 0.5 in between.
    shuffle_buffer: examples in the shuffle buffer.
    seed: makes shuffling, balancing and augmentation repeatable.
    deterministic: fixed element order (slower); with a seed, two runs give identical batches.
    with_ids: also return the image ids.
    input_context: from `strategy.distribute_datasets_from_function`; shards input by worker.

  Returns:
    A dataset of `(images, labels)` or `(images, labels, ids)` batches.

  Raises:
    ValueError: no file matches, or inconsistent arguments.
  """
  augmentation = Augmentation(augmentation)
  if mixup_alpha > 0 and not num_classes:
    raise ValueError('MixUp needs num_classes (labels become one-hot mixtures)')
  if class_balance != 1.0 and class_counts is None:
    raise ValueError('class_balance needs class_counts (see read_class_counts)')
  if not 0.0 <= class_balance <= 1.0:
    raise ValueError(f'class_balance must be in [0, 1], got {class_balance}')
  if deterministic and seed is None:
    raise ValueError('deterministic=True needs a seed')
  if input_context:
    batch_size = input_context.get_per_replica_batch_size(batch_size)

  records = _read_records(file_pattern, training, seed, input_context)
  if training:
    # Stateless randomness seeded by (run seed, element index): repeatable given `seed`, different
    # for every element, and cheaper than zipping in a random dataset.
    run_seed = seed if seed is not None else random.SystemRandom().randrange(1 << 62)
    # Repeat first, so that every draw below has its own element index (shard order is reshuffled
    # each epoch); the shuffle then mixes across epoch boundaries, which an endless loop never sees.
    records = records.repeat()
    if class_counts is not None and class_balance != 1.0:
      # Balancing draws from its own stream: its index counts records before shuffling.
      records = _balance(records, balancing_weights(class_counts, class_balance), run_seed ^ 0x5EED)
    records = records.shuffle(shuffle_buffer, seed=seed)

    def train_element(index, record):
      example = schema.parse_example(record)
      element_seed = tf.stack([tf.constant(run_seed, tf.int64), index])
      return (_train_image(example[schema.ENCODED], element_seed, image_size, augmentation),
              tf.cast(example[schema.LABEL], tf.int32), example[schema.ID])

    dataset = records.enumerate().map(train_element, num_parallel_calls=tf.data.AUTOTUNE)
  else:

    def eval_element(record):
      example = schema.parse_example(record)
      return (_eval_image(example[schema.ENCODED], image_size),
              tf.cast(example[schema.LABEL], tf.int32), example[schema.ID])

    dataset = records.map(eval_element, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(batch_size, drop_remainder=training, num_parallel_calls=tf.data.AUTOTUNE)

  layers = []
  if training and shift_rotate:
    layers += [keras.layers.RandomTranslation(0.1, 0.1, fill_mode='reflect', seed=seed),
               keras.layers.RandomRotation(0.05, fill_mode='reflect', seed=seed)]
  if training and randaugment:
    layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed))
  mixup = keras.layers.MixUp(alpha=mixup_alpha, seed=seed) if training and mixup_alpha > 0 else None

  def finish(images, labels, ids):
    if layers or mixup is not None:
      images = tf.cast(images, tf.float32)
      for layer in layers:
        images = layer(images, training=True)
      if mixup is not None:
        mixed = mixup({'images': images, 'labels': tf.one_hot(labels, num_classes)}, training=True)
        images, labels = mixed['images'], mixed['labels']
      images = tf.saturate_cast(tf.round(images), tf.uint8)  # Also clips interpolation overshoot.
    if backbone is not None:
      images = preprocess(images, backbone)
    return (images, labels, ids) if with_ids else (images, labels)

  dataset = dataset.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = deterministic or not training
  dataset = dataset.with_options(options)
  return dataset.prefetch(tf.data.AUTOTUNE)
