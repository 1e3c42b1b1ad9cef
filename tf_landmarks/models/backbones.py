"""The backbone registry: how each backbone is built, fed, and where its local features come from.

A plain dict, chosen by name (`--backbone`, a DEFINE_enum over `BACKBONES`). Each entry owns what
other stages must agree on: the input preprocessing (the input pipeline and exported models apply
exactly this), the mid-level layer DELF attaches its attention to, and the block names that
`--freeze_until` accepts. `tiny` is a few conv blocks for tests and the CPU demo.
"""

import dataclasses
from typing import Callable, Dict, Tuple

import keras
import tensorflow as tf

# VGG16 and ResNet50 were trained on Caffe-style inputs: BGR, ImageNet channel means subtracted, no
# scaling (keras.applications.{vgg16,resnet50}.preprocess_input).
_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)


def _caffe(images: tf.Tensor) -> tf.Tensor:
  # tf.reverse, not images[..., ::-1]: the negative-stride slice is 3× slower on CPU (measured).
  return tf.reverse(images, axis=[-1]) - tf.constant(_CAFFE_BGR_MEANS, tf.float32)


def _minus_one_to_one(images: tf.Tensor) -> tf.Tensor:
  return images / 127.5 - 1.0


PREPROCESSING: Dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    'caffe': _caffe,  # BGR minus ImageNet means, as keras.applications' 'caffe' mode.
    'tf': _minus_one_to_one,  # [-1, 1], as keras.applications' 'tf' mode.
}


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One registry entry.

  Attributes:
    build: (input_shape, weights) → a Keras model from preprocessed float images to the last
      spatial feature map; weights is 'imagenet' or None.
    preprocessing: key of PREPROCESSING.
    local_feature_layer: the mid-level layer whose output DELF's attention uses.
    blocks: layer-name prefixes of the backbone's blocks, input to output (for --freeze_until).
  """
  build: Callable[..., keras.Model]
  preprocessing: str
  local_feature_layer: str
  blocks: Tuple[str, ...]


def _vgg16(input_shape, weights):
  return keras.applications.VGG16(include_top=False, weights=weights, input_shape=input_shape)


def _resnet50(input_shape, weights):
  return keras.applications.ResNet50(include_top=False, weights=weights, input_shape=input_shape)


def _tiny(input_shape, weights):
  """Four strided conv blocks (16 → 128 channels): trains in seconds on a CPU."""
  if weights == 'imagenet':
    raise ValueError('the tiny backbone has no ImageNet weights; use --weights=none or a path')
  inputs = keras.Input(input_shape)
  x = inputs
  for index, channels in enumerate((16, 32, 64, 128), start=1):
    x = keras.layers.Conv2D(channels, 3, strides=2, padding='same', use_bias=False,
                            name=f'block{index}_conv')(x)
    x = keras.layers.BatchNormalization(name=f'block{index}_bn')(x)
    x = keras.layers.ReLU(name=f'block{index}_out')(x)
  return keras.Model(inputs, x, name='tiny')


BACKBONES: Dict[str, Backbone] = {
    'vgg16': Backbone(_vgg16, 'caffe', 'block4_conv3',
                      ('block1', 'block2', 'block3', 'block4', 'block5')),
    'resnet50': Backbone(_resnet50, 'caffe', 'conv4_block6_out',
                         ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')),
    'tiny': Backbone(_tiny, 'tf', 'block3_out', ('block1', 'block2', 'block3', 'block4')),
}


def get(name: str) -> Backbone:
  """The registry entry of `name`.

  Raises:
    ValueError: unknown name (the message lists the valid ones).
  """
  try:
    return BACKBONES[name]
  except KeyError:
    raise ValueError(f'unknown backbone {name!r}; choose one of {", ".join(BACKBONES)}') from None


def preprocess(images: tf.Tensor, backbone: str) -> tf.Tensor:
  """Maps RGB images in [0, 255] (any dtype) to float32 as `backbone` was trained.

  Raises:
    ValueError: unknown backbone name (never a silent fallback to another convention).
  """
  return PREPROCESSING[get(backbone).preprocessing](tf.cast(images, tf.float32))
