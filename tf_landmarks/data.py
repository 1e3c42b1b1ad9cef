"""The tf.data input pipeline: shards → decoded, augmented, preprocessed batches.

Training pipeline, in order (each step where it is cheapest):
  shuffled shard list → (per-worker shard) → parallel interleaved reading → repeat → class balancing
  (parses only the label) → shuffle (serialized records; the buffer capped by a memory budget) →
  one map: parse + decode + crop (`decode_and_crop_jpeg` decodes only the crop) + resize + flip →
  batch → batch-level Keras layers (shift/rotate, RandAugment, MixUp) → backbone preprocessing →
  prefetch.
Every per-example step lives in that one map because each extra parallel map hands every element
to another thread, which cost ~10% of the throughput on 256-px images (bench/bench_input_pipeline.py).

Images stay uint8 until the batch: a float32 224-px image is 600 KB, and on these 2 cores merely casting
a batch to float costs ~0.4 ms per image, as much as decoding it (BUILD_NOTES.md). With `backbone=None`
the pipeline stops at uint8 and the model applies `models.backbones.preprocess` itself, on the
accelerator, which also makes the host → device copy 4× smaller: the setting for GPU and TPU training.

Evaluation reads the shards in file order, decodes, resizes the short side to `image_size / 0.875` and
takes the central `image_size` square (the usual ImageNet evaluation crop), with no randomness, so each
example comes out exactly once and in a fixed order.

Batches are `(images, labels)`: images float32 [B, S, S, 3] preprocessed for the backbone (uint8 in
[0, 255] with `backbone=None`), labels int32 [B]; with MixUp labels are float32 one-hot mixtures
[B, num_classes]. With `with_ids=True` batches are `(images, labels, ids)`, ids a string [B] tensor.
"""

import dataclasses
import enum
import os
import random
from typing import Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from tf_landmarks import records as records_lib
from tf_landmarks import schema
from tf_landmarks.models import backbones
from tf_landmarks.settings import setting

_EVAL_CROP_FRACTION = 0.875
# The share of physical memory that the pipeline's buffers (shuffle, prefetch, batches) may hold.
_MEMORY_FRACTION = 1 / 8


class Augmentation(str, enum.Enum):
  """How a training image is cropped to `image_size`."""
  INCEPTION_CROP = 'inception_crop'  # Random area 8–100%, aspect 3/4–4/3, like Inception training.
  RESIZE_CROP = 'resize_crop'  # Short side to image_size·256/224, random image_size crop.
  NONE = 'none'  # The evaluation crop.


@dataclasses.dataclass
class InputConfig:
  """How images are sized, augmented and sampled; shared by every command that reads records."""
  image_size: int = setting(224, 'Side of the square images fed to the model, pixels.', lower=32,
                            upper=1024)
  augmentation: Augmentation = setting(
      Augmentation.INCEPTION_CROP, 'Training crop: inception_crop (random area 8-100%, aspect '
      '3/4-4/3), resize_crop (short side to size*256/224, random crop) or none (the central '
      'evaluation crop).')
  shift_rotate: bool = setting(False, 'Also shift (±10%) and rotate (±18°) training batches '
                               '(Keras RandomTranslation, RandomRotation).')
  randaugment: bool = setting(False, 'Also apply Keras RandAugment (2 ops, factor 0.5) to training '
                              'batches.')
  mixup_alpha: float = setting(0.0, 'MixUp alpha for training batches; 0 turns MixUp off (labels '
                               'become one-hot mixtures when on).', lower=0.0)
  class_balance: float = setting(
      1.0, 'Training classes are drawn proportionally to n_c^class_balance: 1 keeps the natural '
      'distribution, 0 makes classes uniform, 0.5 is in between.', lower=0.0, upper=1.0)
  shuffle_buffer: int = setting(4096, 'Examples in the training shuffle buffer.', lower=1)


def memory_budget() -> int:
  """Bytes the input pipeline's buffers may hold: `_MEMORY_FRACTION` of physical memory."""
  return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') * _MEMORY_FRACTION)


def shuffle_buffer_size(requested: int, bytes_per_example: float, budget: int) -> int:
  """`requested` examples, or fewer when that many would take more than `budget` bytes."""
  return int(max(1, min(requested, budget // max(bytes_per_example, 1.0))))


def _bytes_per_example(records: records_lib.Records, split: str) -> float:
  """Mean size of one serialized example of the split (what the shuffle buffer holds)."""
  shards = records.manifest['splits'][split]['shards']
  return sum(shard.get('bytes', 0) for shard in shards) / max(records.num_examples(split), 1)


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
  shape = tf.cast(tf.shape(image)[-3:-1], tf.float32)
  scale = short_side / tf.reduce_min(shape)
  return tf.image.resize(image, tf.cast(tf.math.ceil(shape * scale), tf.int32))


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds a bilinear resize back to uint8, so that batches carry a quarter of the bytes.

  Bilinear weights are convex, so values stay in [0, 255]: +0.5 and truncation round without the
  extra passes of round/saturate_cast.
  """
  return tf.cast(image + 0.5, tf.uint8)


def eval_crop(images: tf.Tensor, image_size: int) -> tf.Tensor:
  """The evaluation crop: short side to image_size / 0.875, then the central square, as uint8.

  Validation, the index's global descriptors and the exported classifier all see this crop.

  Args:
    images: [H, W, 3] or [B, H, W, 3], uint8 or float in [0, 255].
    image_size: side of the square crop.
  """
  resized = _resize_short_side(images, image_size / _EVAL_CROP_FRACTION)
  # The short side is now image_size / 0.875 > image_size, so the crop never pads: slice the
  # central square (offsets rounded down, as tf.image.resize_with_crop_or_pad does). That op's
  # asserts and conditionals cost ~120 ms each time a tf.data pipeline that uses it starts, which
  # the serving signature does on every call.
  shape = tf.shape(resized)
  top = (shape[-3] - image_size) // 2
  left = (shape[-2] - image_size) // 2
  square = resized[..., top:top + image_size, left:left + image_size, :]
  square.set_shape(resized.shape[:-3].concatenate([image_size, image_size, resized.shape[-1]]))
  return _to_uint8(square)


def _eval_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
  return eval_crop(tf.io.decode_jpeg(encoded, channels=3), image_size)


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


def _read_records(files: Sequence[str], training: bool, seed: Optional[int],
                  input_context: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
  dataset = tf.data.Dataset.from_tensor_slices(list(files))
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


def make_dataset(source: Union[str, records_lib.Records], split: str, *, training: bool,
                 batch_size: int, config: Optional[InputConfig] = None,
                 backbone: Optional[str] = 'resnet50', seed: Optional[int] = None,
                 deterministic: bool = False, with_ids: bool = False,
                 input_context: Optional[tf.distribute.InputContext] = None,
                 skip: int = 0) -> tf.data.Dataset:
  """Batches of preprocessed images and labels from a records folder (see the module docstring).

  Args:
    source: a finished records folder (any tf.io.gfile path) or its `records.load` result, which
      supplies the shards, the number of classes and the class counts.
    split: 'train', 'validation' or 'test'.
    training: shuffle, repeat forever, balance classes and augment; otherwise one ordered pass.
    batch_size: global batch size; with `input_context` each replica gets its share.
    config: image size, augmentation and sampling (`InputConfig` defaults if None).
    backbone: selects the preprocessing (`models.backbones.preprocess`); None leaves images uint8
      in [0, 255] for the model to preprocess on the accelerator (see the module docstring).
    seed: makes shuffling, balancing and augmentation repeatable.
    deterministic: fixed element order (slower); with a seed, two runs give identical batches.
      Batch augmentation layers then run one batch at a time (their random state is shared).
    with_ids: also return the image ids.
    input_context: from `strategy.distribute_datasets_from_function`; shards input by worker.
    skip: training: global batches already consumed (a resumed run): the stream continues where
      it stopped, batch for batch, as long as `seed` is the same. The skipped records are read
      and shuffled again but not decoded, unless batch augmentation layers are on (their random
      state must advance).

  Returns:
    A dataset of `(images, labels)` or `(images, labels, ids)` batches.

  Raises:
    records.RecordsError: the folder is not a finished build, or the split is empty.
    ValueError: inconsistent arguments, or an unknown backbone or augmentation.
  """
  config = config or InputConfig()
  records = source if isinstance(source, records_lib.Records) else records_lib.load(source)
  augmentation = Augmentation(config.augmentation)
  if backbone is not None:
    backbones.get(backbone)  # Fails now, listing the valid names, rather than inside a map.
  if not 0.0 <= config.class_balance <= 1.0:
    raise ValueError(f'class_balance must be in [0, 1], got {config.class_balance}')
  if deterministic and seed is None:
    raise ValueError('deterministic=True needs a seed')
  if skip and not training:
    raise ValueError('skip is for training streams')
  files = records.files(split)
  if not files:
    raise records_lib.RecordsError(f'the {split} split of {records.path} is empty')
  records_lib.check_shards(records, split)
  # Each input pipeline (one per worker) gets global batch / pipelines examples per step.
  skip_examples = skip * batch_size // (input_context.num_input_pipelines if input_context else 1)
  if input_context:
    batch_size = input_context.get_per_replica_batch_size(batch_size)
  image_size = config.image_size
  budget = memory_budget()
  layers = []
  if training and config.shift_rotate:
    layers += [keras.layers.RandomTranslation(0.1, 0.1, fill_mode='reflect', seed=seed),
               keras.layers.RandomRotation(0.05, fill_mode='reflect', seed=seed)]
  if training and config.randaugment:
    layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed))
  mixup = (keras.layers.MixUp(alpha=config.mixup_alpha, seed=seed)
           if training and config.mixup_alpha > 0 else None)
  stateful = bool(layers) or mixup is not None
  # Skipped training examples pass the decoding only when the stateful batch layers follow.
  decode_skip = skip_examples if stateful else 0

  serialized = _read_records(files, training, seed, input_context)
  if training:
    # Stateless randomness seeded by (run seed, element index): repeatable given `seed`, different
    # for every element, and cheaper than zipping in a random dataset.
    run_seed = seed if seed is not None else random.SystemRandom().randrange(1 << 62)
    # Repeat first, so that every draw below has its own element index (shard order is reshuffled
    # each epoch); the shuffle then mixes across epoch boundaries, which an endless loop never sees.
    serialized = serialized.repeat()
    if config.class_balance != 1.0:
      # Balancing draws from its own stream: its index counts records before shuffling.
      serialized = _balance(serialized, balancing_weights(records.class_counts,
                                                          config.class_balance), run_seed ^ 0x5EED)
    # The buffer holds serialized records: capped so that it fits the memory budget whatever
    # --shuffle_buffer says (records of large images are megabytes each).
    serialized = serialized.shuffle(
        shuffle_buffer_size(config.shuffle_buffer, _bytes_per_example(records, split), budget // 2),
        seed=seed)
    serialized = serialized.skip(skip_examples - decode_skip)

    def train_element(index, record):
      example = schema.parse_example(record)
      element_seed = tf.stack([tf.constant(run_seed, tf.int64), index])
      return (_train_image(example[schema.ENCODED], element_seed, image_size, augmentation),
              tf.cast(example[schema.LABEL], tf.int32), example[schema.ID])

    dataset = serialized.enumerate(start=skip_examples - decode_skip).map(
        train_element, num_parallel_calls=tf.data.AUTOTUNE)
  else:

    def eval_element(record):
      example = schema.parse_example(record)
      return (_eval_image(example[schema.ENCODED], image_size),
              tf.cast(example[schema.LABEL], tf.int32), example[schema.ID])

    dataset = serialized.map(eval_element, num_parallel_calls=tf.data.AUTOTUNE)
  # A decoded batch: uint8 pixels, float32 after the batch layers or the backbone's preprocessing.
  batch_bytes = batch_size * image_size * image_size * 3 * (
      1 if backbone is None and not stateful else 4)
  # Several batches in flight (parallel batching, prefetch) only when they fit the budget easily.
  in_flight = tf.data.AUTOTUNE if 8 * batch_bytes <= budget else None
  dataset = dataset.batch(batch_size, drop_remainder=training, num_parallel_calls=in_flight)
  num_classes = records.num_classes

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
      images = backbones.preprocess(images, backbone)
    return (images, labels, ids) if with_ids else (images, labels)

  # The batch layers' random state is shared: in parallel calls, which batch draws first varies.
  dataset = dataset.map(finish,
                        num_parallel_calls=None if deterministic and stateful else in_flight)
  if decode_skip:
    dataset = dataset.skip(decode_skip // batch_size)
  options = tf.data.Options()
  options.deterministic = deterministic or not training
  options.autotune.ram_budget = budget
  dataset = dataset.with_options(options)
  return dataset.prefetch(tf.data.AUTOTUNE if in_flight else 1)
