"""The Example layout: make/parse round trip and compatibility with DELF's keys."""

import os
import subprocess
import sys

import tensorflow as tf

from tf_landmarks import schema
from helpers import jpeg_bytes


def test_make_then_parse_round_trips_every_field():
  encoded = jpeg_bytes(40, 30, seed=1)
  serialized = schema.make_example('0123456789abcdef', encoded, 30, 40, label=7,
                                   landmark_id=123456).SerializeToString()
  parsed = schema.parse_example(tf.constant(serialized))
  assert parsed[schema.ENCODED].numpy() == encoded
  assert parsed[schema.ID].numpy() == b'0123456789abcdef'
  assert parsed[schema.LABEL].numpy() == 7
  assert parsed[schema.LANDMARK_ID].numpy() == 123456
  assert (parsed[schema.HEIGHT].numpy(), parsed[schema.WIDTH].numpy()) == (30, 40)
  assert parsed[schema.CHANNELS].numpy() == 3
  assert parsed[schema.FORMAT].numpy() == b'JPEG'
  assert parsed[schema.COLORSPACE].numpy() == b'RGB'
  image = tf.io.decode_jpeg(parsed[schema.ENCODED])
  assert image.shape == (30, 40, 3)


def test_unlabelled_example_defaults_to_no_label():
  serialized = schema.make_example('a', b'x', 1, 1).SerializeToString()
  parsed = schema.parse_example(tf.constant(serialized))
  assert parsed[schema.LABEL].numpy() == schema.NO_LABEL
  assert parsed[schema.LANDMARK_ID].numpy() == schema.NO_LABEL


def test_batch_parse_matches_single_parse():
  serialized = [schema.make_example(f'id{i}', b'x', 2, 3, label=i, landmark_id=10 + i)
                .SerializeToString() for i in range(4)]
  batch = schema.parse_examples(tf.constant(serialized))
  assert batch[schema.LABEL].numpy().tolist() == [0, 1, 2, 3]
  assert batch[schema.ID].numpy().tolist() == [b'id0', b'id1', b'id2', b'id3']


def test_keys_are_delf_build_image_dataset_keys():
  # DELF's research/delf/delf/python/training/build_image_dataset.py writes exactly these keys.
  delf_keys = {'image/height', 'image/width', 'image/colorspace', 'image/channels',
               'image/class/label', 'image/format', 'image/id', 'image/encoded'}
  example = schema.make_example('a', b'x', 1, 1, 0, 5)
  assert set(example.features.feature) == delf_keys | {'landmark_id'}


def test_serialized_examples_are_byte_identical_across_processes():
  # Protobuf map order varies between processes; shards of a resumed build must not.
  script = ('from tf_landmarks import schema; import sys; '
            'sys.stdout.buffer.write(schema.serialize_example("abc", b"\\xff\\xd8", 2, 3, 1, 7))')
  outputs = {subprocess.run([sys.executable, '-c', script], capture_output=True, check=True,
                            env={**os.environ, 'PYTHONHASHSEED': str(seed)}).stdout
             for seed in range(4)}
  assert len(outputs) == 1
  parsed = schema.parse_example(tf.constant(outputs.pop()))
  assert parsed[schema.ID].numpy() == b'abc' and int(parsed[schema.LANDMARK_ID]) == 7
