"""Cached base features for the bottleneck stage: run the frozen backbone once, train the top many times.

The frozen base is the expensive part of every step, and in the bottleneck stage it never changes,
so its outputs are computed once per split (the evaluation crop: no augmentation, BatchNorm in
inference mode) and written as TFRecord shards of float16 features. The cache is keyed by what
determines the features: the records build, backbone, weights checksum, image size, preprocessing
and whether the head needs spatial maps or pooled vectors; a later run with the same key reuses it
(`info.json`, written last, marks a finished split).

Training reads the cache every epoch. A split that fits half the input pipeline's memory budget
(`data.memory_budget`) is held in memory after the first pass and shuffled over up to 65,536
examples; a larger one (Google Landmarks v2's 1.5 M clean images as ResNet50's 7×7×2048 maps
are ~300 GB) is streamed from its shards, their order reshuffled every epoch, through a shuffle
buffer the same budget bounds.
"""

import dataclasses
import hashlib
import json
import math
from typing import Optional, Tuple

import keras
import tensorflow as tf
import tqdm

from tf_landmarks import data
from tf_landmarks import files
from tf_landmarks import records as records_lib
from tf_landmarks.models import backbones

_INFO = 'info.json'
_EXAMPLES_PER_SHARD = 4096
_FEATURES, _LABEL = 'features', 'label'


@dataclasses.dataclass(frozen=True)
class CachedSplit:
  """A finished split of the cache: its shard paths, per-example feature shape and count."""
  files: Tuple[str, ...]
  shape: Tuple[int, ...]
  examples: int


def cache_key(records: records_lib.Records, backbone_name: str, weights_sha256: Optional[str],
              image_size: int, spatial: bool) -> str:
  """A short hash of everything that determines the cached features."""
  if weights_sha256 is None:
    raise ValueError('bottleneck features of randomly initialised weights cannot be reused; '
                     'give --weights=imagenet or a weights file')
  key = {'records': records.path, 'records_created': records.manifest.get('created'),
         'backbone': backbone_name, 'preprocessing': backbones.get(backbone_name).preprocessing,
         'weights_sha256': weights_sha256, 'image_size': image_size, 'spatial': spatial}
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _load(split_dir: str) -> Optional[CachedSplit]:
  info_path = files.join(split_dir, _INFO)
  if not tf.io.gfile.exists(info_path):
    return None
  with tf.io.gfile.GFile(info_path) as f:
    info = json.load(f)
  return CachedSplit(tuple(files.join(split_dir, name) for name in info['files']),
                     tuple(info['shape']), info['examples'])


def cache_features(backbone: keras.Model, backbone_name: str, records: records_lib.Records,
                   split: str, image_size: int, spatial: bool, cache_dir: str,
                   batch_size: int = 64, progress: bool = True) -> CachedSplit:
  """Computes (or reuses) the frozen backbone's features of one split.

  Args:
    backbone: preprocessed images → spatial feature map.
    backbone_name: registry name (fixes the preprocessing).
    records: the records build.
    split: 'train' or 'validation'.
    image_size: side of the evaluation crop fed to the backbone.
    spatial: keep the [H, W, D] maps (heads with `needs_spatial`); else average-pool to [D].
    cache_dir: the folder of this cache key (see `cache_key`).
    batch_size: images per forward pass.
    progress: show a progress bar.

  Returns:
    The cached split.
  """
  split_dir = files.join(cache_dir, split)
  cached = _load(split_dir)
  if cached is not None:
    return cached
  tf.io.gfile.makedirs(split_dir)
  dataset = data.make_dataset(records, split, training=False, batch_size=batch_size,
                              config=data.InputConfig(image_size=image_size), backbone=None)

  @tf.function
  def extract(images):
    features = backbone(backbones.preprocess(images, backbone_name), training=False)
    if not spatial:
      features = tf.reduce_mean(features, axis=[1, 2])
    return tf.cast(features, tf.float16)

  names, writer, shape, written = [], None, None, 0
  bar = tqdm.tqdm(total=records.num_examples(split), unit='img', desc=f'{split} features',
                  disable=not progress)
  for images, labels in dataset:
    features = extract(images).numpy()
    shape = features.shape[1:]
    for feature, label in zip(features, labels.numpy()):
      if written % _EXAMPLES_PER_SHARD == 0:
        if writer is not None:
          writer.close()
        names.append(f'{split}-{len(names):05d}.tfrecord')
        writer = tf.io.TFRecordWriter(files.join(split_dir, names[-1]))
      writer.write(tf.train.Example(features=tf.train.Features(feature={
          _FEATURES: tf.train.Feature(bytes_list=tf.train.BytesList(value=[feature.tobytes()])),
          _LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
      })).SerializeToString())
      written += 1
    bar.update(len(features))
  bar.close()
  if writer is not None:
    writer.close()
  files.write_atomically(files.join(split_dir, _INFO), json.dumps(
      {'files': names, 'shape': list(shape), 'examples': written}))
  return _load(split_dir)


def feature_dataset(cached: CachedSplit, training: bool, batch_size: int, seed: Optional[int] = None,
                    input_context: Optional[tf.distribute.InputContext] = None) -> tf.data.Dataset:
  """Batches of (float16 features, int32 labels) from the cache.

  Training shuffles (in memory, or streamed from the shards: see the module docstring) and repeats
  forever; otherwise one ordered pass, the last batch partial.
  """
  if input_context:
    batch_size = input_context.get_per_replica_batch_size(batch_size)
  spec = {_FEATURES: tf.io.FixedLenFeature([], tf.string),
          _LABEL: tf.io.FixedLenFeature([], tf.int64)}
  # A record is its float16 features plus framing, the label and the Example's own fields.
  example_bytes = 2 * math.prod(cached.shape) + 64
  budget = data.memory_budget() // 2
  streamed = training and cached.examples * example_bytes > budget
  if streamed:
    dataset = (tf.data.Dataset.from_tensor_slices(list(cached.files))
               .shuffle(len(cached.files), seed=seed, reshuffle_each_iteration=True).repeat()
               .interleave(tf.data.TFRecordDataset, cycle_length=min(len(cached.files), 8),
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True))
  else:
    dataset = tf.data.TFRecordDataset(list(cached.files))
  if input_context and input_context.num_input_pipelines > 1:
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  if streamed:
    dataset = dataset.shuffle(data.shuffle_buffer_size(65536, example_bytes, budget), seed=seed)
  elif training:
    dataset = dataset.cache().repeat().shuffle(min(cached.examples, 65536), seed=seed)

  def parse(serialized):
    example = tf.io.parse_example(serialized, spec)
    features = tf.io.decode_raw(example[_FEATURES], tf.float16)
    return (tf.reshape(features, [-1, *cached.shape]), tf.cast(example[_LABEL], tf.int32))

  return (dataset.batch(batch_size, drop_remainder=training)
          .map(parse, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))
