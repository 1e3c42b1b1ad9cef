"""The backbone registry: how each backbone is built, fed, initialised and frozen.

A plain dict, chosen by name (`--backbone`, a DEFINE_enum over `BACKBONES`). Each entry owns what
other stages must agree on: the input preprocessing (the input pipeline and exported models apply
exactly this), the mid-level layer DELF attaches its attention to and the receptive field of its
cells (where DELF's keypoints are), the block names that
`--freeze_until` accepts, the smallest image it takes, and where its ImageNet weights come from:
Keras's download for VGG16 and ResNet50, a registry package's checkpoint converted on first use for
EfficientNet-Lite (`efficientnet_lite.py`), which therefore works with no network. `tiny` is a few
conv blocks for tests.

`build` turns a name, an image size and a `--weights` value ('imagenet', 'none' or the path of a
`.weights.h5` file) into a model, recording which weights it loaded; `freeze` applies
`--freeze_until`. Every user mistake (unknown name, size out of range, missing or unfitting weights
file, ImageNet weights neither cached nor downloadable) is a `BackboneError`, a one-line
`errors.UserError`.
"""

import dataclasses
import numbers
import os
import posixpath
import re
import tempfile
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import h5py
import keras
import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks.models import efficientnet_lite

MAX_IMAGE_SIZE = 512

# VGG16 and ResNet50 were trained on Caffe-style inputs: BGR, ImageNet channel means subtracted, no
# scaling (keras.applications.{vgg16,resnet50}.preprocess_input).
_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)

# keras.applications' download folder: `keras.utils.get_file(..., cache_subdir='models')`.
_KERAS_CACHE_SUBDIR = 'models'


class BackboneError(errors.UserError):
  """A backbone cannot be built as asked; the message says what to change (flag or file)."""


def _caffe(images: tf.Tensor) -> tf.Tensor:
  # tf.reverse, not images[..., ::-1]: the negative-stride slice is 3× slower on CPU (measured).
  return tf.reverse(images, axis=[-1]) - tf.constant(_CAFFE_BGR_MEANS, tf.float32)


def _minus_one_to_one(images: tf.Tensor) -> tf.Tensor:
  return images / 127.5 - 1.0


def _efficientnet_lite(images: tf.Tensor) -> tf.Tensor:
  return (images - 127.0) / 128.0


PREPROCESSING: Dict[str, Callable[[tf.Tensor], tf.Tensor]] = {
    'caffe': _caffe,  # BGR minus ImageNet means, as keras.applications' 'caffe' mode.
    'tf': _minus_one_to_one,  # [-1, 1], as keras.applications' 'tf' mode.
    # RGB (x − 127) / 128, as Google trained EfficientNet-Lite. ImageNet's mean and standard
    # deviation also classify, but retrieve worse on the real photos (BUILD_NOTES.md).
    'efficientnet_lite': _efficientnet_lite,
}


@dataclasses.dataclass(frozen=True)
class ImagenetWeights:
  """keras.applications' ImageNet weights of a backbone without its classifier (include_top=False).

  The same name, URL and MD5 as Keras uses, so a file Keras downloaded is found in its cache and
  a file downloaded here is one Keras would accept.

  Attributes:
    file_name: name of the file in Keras's cache folder (`<keras home>/models`).
    url: where Keras downloads it from.
    md5: Keras's hash of the file, checked after a download.
  """
  file_name: str
  url: str
  md5: str


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
  """The input pixels one cell of a feature map sees, in DELF's terms (its `rf, stride, padding`).

  Along either axis, cell i sees input pixels i·stride − padding to i·stride − padding + size − 1
  (the part outside the image is zero padding), so its centre is at pixel
  i·stride − padding + (size − 1) / 2.

  Attributes:
    size: pixels each cell sees along one axis.
    stride: input pixels between neighbouring cells.
    padding: how far before pixel 0 the first cell's field starts.
    input_multiple: the field is exactly as stated for input sides that are multiples of this (a
      divisor of `stride`); 1 for any side. TensorFlow's 'same' padding of a strided
      convolution adds its extra row on the left only when that layer's input side is odd, which
      shifts every field by one of that layer's input pixels.
  """
  size: int
  stride: int
  padding: int
  input_multiple: int = 1


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One registry entry.

  Attributes:
    build: (input_shape, weights) → a Keras model from preprocessed float images to the last
      spatial feature map; weights is 'imagenet' or None. Use the module's `build`, which also
      handles cached ImageNet weights and weight files.
    preprocessing: key of PREPROCESSING.
    local_feature_layer: the mid-level layer whose output DELF's attention uses.
    blocks: layer-name prefixes of the backbone's blocks, input to output (for --freeze_until).
    local_feature_receptive_field: the receptive field of the local-feature layer's cells.
    min_image_size: smallest square image side `build` accepts.
    imagenet: where the ImageNet weights come from: Keras's download (`ImagenetWeights`), or a
      registry package's checkpoint converted on first use (an `efficientnet_lite.Variant`);
      None when there are none.
  """
  build: Callable[..., keras.Model]
  preprocessing: str
  local_feature_layer: str
  blocks: Tuple[str, ...]
  local_feature_receptive_field: ReceptiveField
  min_image_size: int = 96
  imagenet: Optional[Union[ImagenetWeights, efficientnet_lite.Variant]] = None


@dataclasses.dataclass(frozen=True)
class BuiltBackbone:
  """A built backbone and a record of the weights it started from.

  Attributes:
    model: preprocessed float32 images [B, S, S, 3] → the last spatial feature map.
    weights: 'imagenet', 'none', or the weights file's path as given.
    weights_sha256: hex SHA-256 of the weights file that was loaded; None for 'none'.
    source_sha256: for ImageNet weights converted from a package's checkpoint, that checkpoint's
      hex SHA-256 (verified before conversion); else None.
  """
  model: keras.Model
  weights: str
  weights_sha256: Optional[str]
  source_sha256: Optional[str] = None


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


def _efficientnet_lite_builder(variant: efficientnet_lite.Variant) -> Callable[..., keras.Model]:
  def build_variant(input_shape, weights):
    if weights == 'imagenet':
      raise ValueError('ImageNet weights are loaded by backbones.build, not by the builder')
    return efficientnet_lite.build(variant, input_shape)
  return build_variant


def _efficientnet_lite_entry(name: str, field: ReceptiveField) -> Backbone:
  # DELF attaches to the last stride-16 map: stage 5's output as block 6 expands it (672 channels
  # in lite0, 720 in lite2), before block 6's strided depthwise convolution.
  variant = efficientnet_lite.VARIANTS[name]
  return Backbone(_efficientnet_lite_builder(variant), 'efficientnet_lite',
                  efficientnet_lite.expansion_after_stage(5),
                  efficientnet_lite.BLOCK_NAMES, field, min_image_size=64,
                  imagenet=variant)


_KERAS_WEIGHTS_URL = 'https://storage.googleapis.com/tensorflow/keras-applications'

BACKBONES: Dict[str, Backbone] = {
    # Receptive fields (tests/test_delf.py recomputes them from the layers): ten 3×3 convolutions
    # and three 2×2 pools for VGG16's block4_conv3; for ResNet50's conv4 the 7×7 stem, the 3×3 pool
    # and the 3×3 convolution of each of 3 + 4 + 6 bottleneck blocks (DELF's 291/16/145); for tiny
    # three 3×3 convolutions of stride 2.
    'vgg16': Backbone(
        _vgg16, 'caffe', 'block4_conv3', ('block1', 'block2', 'block3', 'block4', 'block5'),
        ReceptiveField(size=92, stride=8, padding=42),
        imagenet=ImagenetWeights(
            'vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5',
            f'{_KERAS_WEIGHTS_URL}/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5',
            '6d6bbae143d832006294945121d1f1fc')),
    'resnet50': Backbone(
        _resnet50, 'caffe', 'conv4_block6_out', ('conv1', 'conv2', 'conv3', 'conv4', 'conv5'),
        ReceptiveField(size=291, stride=16, padding=145),
        imagenet=ImagenetWeights(
            'resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5',
            f'{_KERAS_WEIGHTS_URL}/resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5',
            '4d473c1dd8becc155b73f8504c6f6626')),
    # Receptive fields of the end of stage 5 (1×1 convolutions add nothing): the stem, then every
    # depthwise convolution (k×k) up to there. TensorFlow's 'same' padding pads a strided layer's
    # even-sided input on the right only (k=3) or by one more on the right (k=5), hence
    # input_multiple 16.
    'efficientnet_lite0': _efficientnet_lite_entry(
        'efficientnet_lite0', ReceptiveField(size=339, stride=16, padding=154, input_multiple=16)),
    'efficientnet_lite2': _efficientnet_lite_entry(
        'efficientnet_lite2', ReceptiveField(size=475, stride=16, padding=222, input_multiple=16)),
    'tiny': Backbone(_tiny, 'tf', 'block3_out', ('block1', 'block2', 'block3', 'block4'),
                     ReceptiveField(size=15, stride=8, padding=0, input_multiple=8),
                     min_image_size=32),
}


def get(name: str) -> Backbone:
  """The registry entry of `name`.

  Raises:
    BackboneError: unknown name (the message lists the valid ones).
  """
  try:
    return BACKBONES[name]
  except KeyError:
    raise BackboneError(
        f'unknown backbone {name!r}; choose one of {", ".join(BACKBONES)}') from None


def preprocess(images: tf.Tensor, backbone: str) -> tf.Tensor:
  """Maps RGB images in [0, 255] (any dtype) to float32 as `backbone` was trained.

  Raises:
    BackboneError: unknown backbone name (never a silent fallback to another convention).
  """
  return PREPROCESSING[get(backbone).preprocessing](tf.cast(images, tf.float32))


def build(name: str, image_size: int, weights: str) -> BuiltBackbone:
  """Builds backbone `name` for square images of side `image_size`, initialised from `weights`.

  The backbones are fully convolutional, so their weights do not depend on the image size: a file
  saved at one size loads at any other.

  Args:
    name: a key of BACKBONES.
    image_size: image side in pixels, from the backbone's `min_image_size` to MAX_IMAGE_SIZE.
    weights: 'none' (random initialisation); 'imagenet' (keras.applications' weights, read from
      Keras's cache `$KERAS_HOME/models` or `~/.keras/models` when the file is there, without
      network or hash check so that a copy placed there by hand works offline, else downloaded
      there as Keras would); or the path (local or any `tf.io.gfile` URL) of a `.weights.h5` file
      saved by `model.save_weights` from this backbone (a legacy Keras `.h5` weights file, such as
      Keras's ImageNet file itself, loads too).

  Returns:
    The model and the description and SHA-256 of the weights loaded.

  Raises:
    BackboneError: unknown name, image size out of range, a backbone without ImageNet weights, or
      ImageNet weights neither cached nor downloadable, or a weights file that is missing,
      unreadable or saved from another architecture.
  """
  backbone = get(name)
  if (isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral)
      or not backbone.min_image_size <= image_size <= MAX_IMAGE_SIZE):
    raise BackboneError(f'the {name} backbone takes image sizes of {backbone.min_image_size} to '
                        f'{MAX_IMAGE_SIZE} pixels, not {image_size!r}')
  if not isinstance(weights, str) or not weights:
    raise BackboneError(f'--weights={weights!r}: expected imagenet, none or the path of a '
                        '.weights.h5 file')
  input_shape = (int(image_size), int(image_size), 3)
  if weights == 'none':
    return BuiltBackbone(backbone.build(input_shape, None), 'none', None)
  if weights == 'imagenet':
    model = backbone.build(input_shape, None)
    if isinstance(backbone.imagenet, efficientnet_lite.Variant):
      return _load_converted_imagenet_weights(model, name, backbone.imagenet)
    path = _imagenet_weights_file(name, backbone)
    return BuiltBackbone(model, 'imagenet', _load_weights_file(model, name, path, path))
  model = backbone.build(input_shape, None)
  return BuiltBackbone(model, weights, _load_weights_path(model, name, weights))


def freeze(model: keras.Model, name: str, until: Optional[Union[str, int]]) -> int:
  """Makes the first layers of backbone model `model` untrainable and all the others trainable.

  Call it before compiling. Frozen BatchNormalization layers run in inference mode (Keras 3 does
  that for a layer with trainable=False), so their moving statistics stay as loaded.

  Args:
    model: the model of `build(name, ...)` itself (a model wrapping it has other layers).
    name: its backbone name (for its block names).
    until: None or '' freezes nothing; 'all' every layer; a block name of `name` (e.g. 'conv4'
      for resnet50, 'block4' for vgg16) the layers up to and including that block's last one;
      an exact layer name the layers up to and including it; a count N (e.g. '15', or 15) the
      first N layers of `model.layers` (its input layer counts as one).

  Returns:
    How many layers of `model.layers` are frozen.

  Raises:
    BackboneError: unknown backbone, or `until` is none of the above (the message lists the
      blocks).
  """
  blocks = get(name).blocks
  layer_names = [layer.name for layer in model.layers]
  spec = '' if until is None else str(until).strip()
  if spec in ('', 'all'):
    count = len(layer_names) if spec else 0
  elif spec in blocks:
    count = 1 + max(index for index, layer_name in enumerate(layer_names)
                    if layer_name.startswith(f'{spec}_'))
  elif spec in layer_names:
    count = 1 + layer_names.index(spec)
  elif spec.isdigit() and int(spec) <= len(layer_names):
    count = int(spec)
  else:
    raise BackboneError(
        f'--freeze_until={until!r} is not a block of the {name} backbone ({", ".join(blocks)}), '
        f"'all', a layer name or a layer count from 0 to {len(layer_names)}")
  # Every layer is set, and the model itself made trainable (else it hides all its variables), so
  # the result depends only on `until`, not on earlier calls. Setting model.trainable alone does
  # not reach a functional model's layers.
  model.trainable = True
  for index, layer in enumerate(model.layers):
    layer.trainable = index >= count
  return count


def _keras_home() -> str:
  """Keras's cache root, computed now as Keras does at import (it reads KERAS_HOME only then)."""
  if 'KERAS_HOME' in os.environ:
    return os.path.expanduser(os.environ['KERAS_HOME'])
  home = os.path.expanduser('~')
  return os.path.join(home if os.access(home, os.W_OK) else '/tmp', '.keras')


def _imagenet_weights_file(name: str, backbone: Backbone) -> str:
  """The local path of `backbone`'s ImageNet weights: Keras's cached file, else a download."""
  if backbone.imagenet is None:
    raise BackboneError(f'the {name} backbone has no ImageNet weights; use --weights=none or '
                        '--weights=<path to a .weights.h5>')
  keras_home = _keras_home()
  expected = os.path.join(keras_home, _KERAS_CACHE_SUBDIR, backbone.imagenet.file_name)
  if os.path.isfile(expected):
    return expected
  try:
    # get_file downloads to /tmp/.keras instead when the cache root does not exist yet; create it
    # so the download lands where the next run looks.
    os.makedirs(keras_home, exist_ok=True)
  except OSError:
    pass  # Unwritable: get_file falls back to /tmp/.keras, where it also looks for a cached copy.
  try:
    return keras.utils.get_file(backbone.imagenet.file_name, backbone.imagenet.url,
                                cache_subdir=_KERAS_CACHE_SUBDIR, file_hash=backbone.imagenet.md5,
                                cache_dir=keras_home)
  except Exception as e:  # pylint: disable=broad-except  # get_file raises a bare Exception.
    reason = ' '.join(str(e).split(' -- ')[-1].split()) or type(e).__name__
    raise BackboneError(
        f'ImageNet weights for {name} need {expected}, which is not there and could not be '
        f'downloaded from {backbone.imagenet.url} ({reason}); put that file there, or use '
        '--weights=none or --weights=<path to a .weights.h5>') from None


def _load_converted_imagenet_weights(model: keras.Model, name: str,
                                     variant: efficientnet_lite.Variant) -> BuiltBackbone:
  """Loads the Keras file converted from `variant`'s packaged checkpoint (converting it first).

  A cached file that fails to load (damaged, cut short) is converted again, once.
  """
  cache_dir = os.path.join(_keras_home(), _KERAS_CACHE_SUBDIR)
  path = efficientnet_lite.imagenet_weights_file(variant, cache_dir)
  try:
    sha256 = _load_weights_file(model, name, path, path)
  except BackboneError:
    path = efficientnet_lite.imagenet_weights_file(variant, cache_dir, reconvert=True)
    sha256 = _load_weights_file(model, name, path, path)
  return BuiltBackbone(model, 'imagenet', sha256, source_sha256=variant.checkpoint.sha256)


def _load_weights_path(model: keras.Model, name: str, path: str) -> str:
  """Loads a user-given weights file (local or remote) into `model`; returns its SHA-256."""
  if not path.endswith('.h5'):
    raise BackboneError(f'--weights={path!r}: expected imagenet, none or the path of a '
                        '.weights.h5 file')
  try:
    exists = tf.io.gfile.exists(path)
  except tf.errors.OpError as e:
    raise BackboneError(f'cannot read weights file {path}: {e.message}') from None
  if not exists:
    raise BackboneError(f'weights file {path} does not exist')
  if not files.is_remote(path):
    return _load_weights_file(model, name, path, path)
  # Keras and h5py open local files only.
  with tempfile.TemporaryDirectory() as folder:
    local_copy = os.path.join(folder, posixpath.basename(path))
    try:
      tf.io.gfile.copy(path, local_copy)
    except tf.errors.OpError as e:
      raise BackboneError(f'cannot read weights file {path}: {e.message}') from None
    return _load_weights_file(model, name, local_copy, path)


def _load_weights_file(model: keras.Model, name: str, local_path: str, shown_path: str) -> str:
  """Loads local weights file `local_path` into `model`; returns its SHA-256.

  Raises:
    BackboneError: naming `shown_path`, when the file is unreadable or does not fit the model.
  """
  try:
    if local_path.endswith('.weights.h5'):
      _check_array_count(local_path, model)
    with warnings.catch_warnings():
      # Keras warns about each unmatched layer before raising the error reported below.
      warnings.filterwarnings('ignore', message='Skipping nested container')
      model.load_weights(local_path)
  except (OSError, KeyError, ValueError) as e:
    reason = re.sub(r'\s+', ' ', str(e).strip().split('\n')[0]) or type(e).__name__
    if len(reason) > 200:
      reason = f'{reason[:199]}…'
    raise BackboneError(
        f'cannot load weights file {shown_path} into the {name} backbone: {reason}') from None
  return files.sha256(local_path)


def _check_array_count(path: str, model: keras.Model) -> None:
  """Raises ValueError unless the `.weights.h5` file holds exactly as many arrays as `model`.

  Keras loads a file saved from a larger model into a smaller one without complaint; equal counts
  plus Keras's own per-layer checks make the match exact.
  """
  saved_arrays = 0

  def count_datasets(_, item):
    nonlocal saved_arrays
    saved_arrays += isinstance(item, h5py.Dataset)

  with h5py.File(path, 'r') as f:
    f.visititems(count_datasets)
  if saved_arrays != len(model.weights):
    raise ValueError(f'it holds {saved_arrays} weight arrays, the backbone has '
                     f'{len(model.weights)} (saved from another architecture?)')
