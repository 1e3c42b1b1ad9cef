"""The one owner of the tf.train.Example layout of tf-landmarks shards.

Keys follow DELF's `build_image_dataset.py` (tensorflow/models research/delf) so that shards written here
train DELF unchanged, plus `landmark_id`, the dataset's original id, which the remapped
`image/class/label` (0..C-1) loses. Test shards carry label -1 and landmark_id -1.

`make_example` and `parse_example` are a pair; tests round-trip them. `tfds_features` describes the same
layout to tensorflow-datasets so that the shard folder also loads with `tfds.builder_from_directory`.
"""

from typing import Dict

import tensorflow as tf

ENCODED = 'image/encoded'
ID = 'image/id'
LABEL = 'image/class/label'
HEIGHT = 'image/height'
WIDTH = 'image/width'
CHANNELS = 'image/channels'
FORMAT = 'image/format'
COLORSPACE = 'image/colorspace'
LANDMARK_ID = 'landmark_id'

# Label of images whose landmark is unknown (test split).
NO_LABEL = -1

_FEATURE_SPEC = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    ID: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=NO_LABEL),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    CHANNELS: tf.io.FixedLenFeature([], tf.int64, default_value=3),
    FORMAT: tf.io.FixedLenFeature([], tf.string, default_value='JPEG'),
    COLORSPACE: tf.io.FixedLenFeature([], tf.string, default_value='RGB'),
    LANDMARK_ID: tf.io.FixedLenFeature([], tf.int64, default_value=NO_LABEL),
}


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def make_example(image_id: str, encoded_jpeg: bytes, height: int, width: int,
                 label: int = NO_LABEL, landmark_id: int = NO_LABEL) -> tf.train.Example:
  """Builds the Example for one RGB JPEG image.

  Args:
    image_id: the dataset's image id (16 hex digits in Google Landmarks).
    encoded_jpeg: JPEG bytes of a 3-channel RGB image.
    height: image height in pixels.
    width: image width in pixels.
    label: contiguous class index 0..C-1, or NO_LABEL for unlabelled (test) images.
    landmark_id: the original landmark id from the CSV, or NO_LABEL.

  Returns:
    A tf.train.Example with the DELF-compatible keys plus `landmark_id`.
  """
  return tf.train.Example(features=tf.train.Features(feature={
      ENCODED: _bytes(encoded_jpeg),
      ID: _bytes(image_id.encode('utf-8')),
      LABEL: _int64(label),
      HEIGHT: _int64(height),
      WIDTH: _int64(width),
      CHANNELS: _int64(3),
      FORMAT: _bytes(b'JPEG'),
      COLORSPACE: _bytes(b'RGB'),
      LANDMARK_ID: _int64(landmark_id),
  }))


def serialize_example(image_id: str, encoded_jpeg: bytes, height: int, width: int,
                      label: int = NO_LABEL, landmark_id: int = NO_LABEL) -> bytes:
  """`make_example` serialized with its feature map in a fixed key order.

  Protobuf writes map entries in an order that varies between processes; fixing it makes the same
  build (or a resumed one) write byte-identical shards.
  """
  return make_example(image_id, encoded_jpeg, height, width, label,
                      landmark_id).SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Parses one serialized Example (a scalar string tensor) into its feature dict.

  Works in eager mode and inside `tf.data` maps. Use `parse_examples` on a batch of serialized
  records, which is faster.

  Returns:
    Dict from the key constants of this module to scalar tensors; the image stays encoded.
  """
  return tf.io.parse_single_example(serialized, _FEATURE_SPEC)


def parse_label(serialized: tf.Tensor) -> tf.Tensor:
  """Parses only the label of one serialized Example: cheaper when nothing else is needed yet."""
  return tf.io.parse_single_example(serialized, {LABEL: _FEATURE_SPEC[LABEL]})[LABEL]


def parse_examples(serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
  """Vectorized `parse_example` for a 1-D batch of serialized Examples."""
  return tf.io.parse_example(serialized, _FEATURE_SPEC)


def tfds_features():
  """The tensorflow-datasets FeaturesDict describing this layout.

  TFDS flattens nested dicts with '/', so {'image': {'class': {'label': ...}}} is the key
  'image/class/label'. Test shards carry label -1, which a ClassLabel rejects, so labels are plain
  int64 tensors.
  """
  import tensorflow_datasets as tfds  # Heavy import; only the TFDS metadata writer needs it.
  scalar = lambda dtype: tfds.features.Tensor(shape=(), dtype=dtype)
  return tfds.features.FeaturesDict({
      'image': {
          'encoded': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'id': tfds.features.Text(),
          'class': {'label': scalar(tf.int64)},
          'height': scalar(tf.int64),
          'width': scalar(tf.int64),
          'channels': scalar(tf.int64),
          'format': tfds.features.Text(),
          'colorspace': tfds.features.Text(),
      },
      'landmark_id': scalar(tf.int64),
  })
