"""DELF: attentive deep local features, learned with nothing but class labels.

Noh et al., "Large-Scale Image Retrieval with Attentive Deep Local Features" (ICCV 2017). The
backbone cut at its local-feature layer (the registry's `local_feature_layer`, ResNet50's conv4 as
in the paper) turns an image into a dense map of descriptors; a small attention head scores each
cell, and the strongest cells become keypoints (`local_features/delf.py`). Both parts learn from
classification, in two stages, each an ordinary classifier for `train.py`'s loop
(`model(images, labels=labels, training=True) -> logits`, plus `model.losses`):

- 'descriptor' (optional): fine-tunes the cut backbone to the landmarks: the global average of its
  map feeds a dense classifier of its own.
- 'attention': the backbone frozen and under stop-gradient; attention
  softplus(conv1×1(ReLU(BN(conv1×1₅₁₂(map))))) weights the L2-normalised map, and the weighted
  mean over cells feeds a dense classifier. Cells that tell landmarks apart earn high scores.
  DELF's TF2 code also pools with the mean; a plain sum would scale the logits with the number of
  cells (×196 at 224 px for ResNet50), far from where a fresh dense layer starts.

With `reduced_dim` > 0 an autoencoder, as in DELF's TF2 (and DELG) code, shrinks the descriptors:
a 1×1 convolution down to `reduced_dim` channels (the descriptors) and a 1×1 convolution + ReLU
back up (backbone maps are non-negative), trained with their mean squared reconstruction error
(weight 10, DELF's) through `add_loss`. The attention then scores the reconstruction, so at
inference it is a function of the reduced descriptors alone; the pooled classification target
stays the full map, as in DELF.

All new layers compute in float32 under any mixed-precision policy (see heads.py for why).
"""

import numbers
from typing import Tuple

import keras
import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks.models import backbones

STAGES = ('descriptor', 'attention')
ATTENTION_CHANNELS = 512
RECONSTRUCTION_WEIGHT = 10.0  # DELF's weight of the autoencoder's loss.
ATTENTION_DECAY = 1e-4  # DELF's L2 regularisation of the attention kernels.
_HEAD_DTYPE = 'float32'


class DelfError(errors.UserError):
  """A DELF model or extractor cannot be built or used as asked; the message says why."""


@keras.saving.register_keras_serializable('tf_landmarks')
class DelfModel(keras.Model):
  """The DELF network: the cut backbone, the attention head, the optional autoencoder, and the
  classifiers of both training stages.

  Use `build_delf`, which cuts the backbone and checks the options. Every variable of every
  stage exists from the start, so weights saved in one stage load in the other.

  Args:
    local_backbone: a Keras model from preprocessed float images of any size [B, H, W, 3] to the
      local-feature map [B, h, w, C].
    backbone_name: the registry name, which fixes the preprocessing.
    num_classes: classes of both classifiers.
    stage: 'descriptor' or 'attention' (see the module docstring); sets the trainable flags.
    reduced_dim: channels of the autoencoder's reduction (the descriptors); 0: no autoencoder.
    reconstruction_weight: weight of the autoencoder's mean squared error in the loss.
    attention_decay: L2 regularisation of the attention kernels (DELF's 1e-4); 0: none.
  """

  def __init__(self, local_backbone: keras.Model, backbone_name: str, num_classes: int,
               stage: str = 'attention', reduced_dim: int = 0,
               reconstruction_weight: float = RECONSTRUCTION_WEIGHT,
               attention_decay: float = ATTENTION_DECAY, **kwargs):
    super().__init__(**kwargs)
    backbones.get(backbone_name)  # An unknown name fails here, not at the first batch.
    channels = int(local_backbone.output.shape[-1])
    _check_options(num_classes, stage, reduced_dim, channels)
    self.local_backbone = local_backbone
    self.backbone_name = backbone_name
    self.num_classes = int(num_classes)
    self.stage = stage
    self.reduced_dim = int(reduced_dim)
    self.reconstruction_weight = float(reconstruction_weight)
    self.attention_decay = float(attention_decay)
    regularizer = keras.regularizers.L2(attention_decay) if attention_decay else None
    self.attention_conv = keras.layers.Conv2D(
        ATTENTION_CHANNELS, 1, kernel_regularizer=regularizer, dtype=_HEAD_DTYPE,
        name='attention_conv1')
    self.attention_bn = keras.layers.BatchNormalization(dtype=_HEAD_DTYPE, name='attention_bn')
    self.attention_score = keras.layers.Conv2D(1, 1, kernel_regularizer=regularizer,
                                               dtype=_HEAD_DTYPE, name='attention_conv2')
    self.attention_classifier = keras.layers.Dense(num_classes, dtype=_HEAD_DTYPE,
                                                   name='attention_classifier')
    self.descriptor_classifier = keras.layers.Dense(num_classes, dtype=_HEAD_DTYPE,
                                                    name='descriptor_classifier')
    if self.reduced_dim:
      self.autoencoder_reduce = keras.layers.Conv2D(self.reduced_dim, 1, dtype=_HEAD_DTYPE,
                                                    name='autoencoder_reduce')
      self.autoencoder_expand = keras.layers.Conv2D(channels, 1, activation='relu',
                                                    dtype=_HEAD_DTYPE, name='autoencoder_expand')
      self.autoencoder_reduce.build((None, None, None, channels))
      self.autoencoder_expand.build((None, None, None, self.reduced_dim))
    # The attention reads the map, or its reconstruction: `channels` deep either way.
    self.attention_conv.build((None, None, None, channels))
    self.attention_bn.build((None, None, None, ATTENTION_CHANNELS))
    self.attention_score.build((None, None, None, ATTENTION_CHANNELS))
    self.attention_classifier.build((None, channels))
    self.descriptor_classifier.build((None, channels))
    self._set_trainable_flags()
    self.built = True

  @property
  def descriptor_dim(self) -> int:
    """Channels of the local descriptors: `reduced_dim`, else the backbone map's."""
    return self.reduced_dim or int(self.local_backbone.output.shape[-1])

  def _attention_layers(self):
    layers = [self.attention_conv, self.attention_bn, self.attention_score,
              self.attention_classifier]
    if self.reduced_dim:
      layers += [self.autoencoder_reduce, self.autoencoder_expand]
    return layers

  def _set_trainable_flags(self) -> None:
    """Sets the flags of the DELF layers for the stage, and freezes the backbone for attention.

    The descriptor stage leaves the backbone's flags as they are (`build_delf` unfreezes it; a
    deserialised model keeps the flags it was saved with, e.g. those of `backbones.freeze`).
    """
    attention_stage = self.stage == 'attention'
    if attention_stage:
      self.local_backbone.trainable = False
    for layer in self._attention_layers():
      layer.trainable = attention_stage
    self.descriptor_classifier.trainable = not attention_stage

  def _feature_map(self, images: tf.Tensor, training: bool) -> tf.Tensor:
    features = self.local_backbone(backbones.preprocess(images, self.backbone_name),
                                   training=training)
    return tf.cast(features, tf.float32)

  def _attention(self, features: tf.Tensor, training: bool) -> tf.Tensor:
    """[B, h, w, C] → attention scores [B, h, w, 1], positive."""
    hidden = tf.nn.relu(self.attention_bn(self.attention_conv(features), training=training))
    return tf.nn.softplus(self.attention_score(hidden))

  def call(self, images, labels=None, training=False):
    """Logits [B, num_classes] of the stage's classifier for uint8 RGB images [B, H, W, 3].

    `labels` is accepted for train.py's interface; these plain softmax classifiers ignore it.
    """
    del labels
    if self.stage == 'descriptor':
      features = self._feature_map(images, training=training)
      return self.descriptor_classifier(tf.reduce_mean(features, axis=[1, 2]))
    # The backbone is frozen in this stage; stop_gradient also spares the backward pass through it.
    features = tf.stop_gradient(self._feature_map(images, training=False))
    attention_input = features
    if self.reduced_dim:
      reconstruction = self.autoencoder_expand(self.autoencoder_reduce(features))
      self.add_loss(self.reconstruction_weight *
                    tf.reduce_mean(tf.square(features - reconstruction)))
      attention_input = reconstruction
    attention = self._attention(attention_input, training=training)
    pooled = tf.reduce_mean(tf.math.l2_normalize(features, axis=-1) * attention, axis=[1, 2])
    return self.attention_classifier(pooled)

  def local_outputs(self, images: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
    """The local descriptors and their attention (inference mode).

    Args:
      images: uint8 (or float in [0, 255]) RGB images [B, H, W, 3], any size.

    Returns:
      descriptors: float32 [B, h, w, descriptor_dim], L2-normalised (the autoencoder's reduction
        when there is one).
      attention: float32 [B, h, w], positive.
    """
    features = self._feature_map(images, training=False)
    descriptors = attention_input = features
    if self.reduced_dim:
      descriptors = self.autoencoder_reduce(features)
      attention_input = self.autoencoder_expand(descriptors)
    attention = self._attention(attention_input, training=False)[..., 0]
    return tf.math.l2_normalize(descriptors, axis=-1), attention

  def get_config(self):
    return {**super().get_config(),
            'local_backbone': keras.saving.serialize_keras_object(self.local_backbone),
            'backbone_name': self.backbone_name, 'num_classes': self.num_classes,
            'stage': self.stage, 'reduced_dim': self.reduced_dim,
            'reconstruction_weight': self.reconstruction_weight,
            'attention_decay': self.attention_decay}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    local_backbone = keras.saving.deserialize_keras_object(config.pop('local_backbone'))
    return cls(local_backbone, **config)


def _check_options(num_classes, stage, reduced_dim, channels) -> None:
  if stage not in STAGES:
    raise DelfError(f'unknown DELF stage {stage!r}; choose one of {", ".join(STAGES)}')
  for name, value in (('num_classes', num_classes), ('reduced_dim', reduced_dim)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
      raise DelfError(f'{name} must be an integer, not {value!r}')
  if num_classes < 1:
    raise DelfError(f'num_classes must be at least 1, not {num_classes}')
  if not 0 <= reduced_dim < channels:
    raise DelfError(f'reduced_dim must be 0 (no autoencoder) or fewer than the {channels} '
                    f'channels of the local-feature map, not {reduced_dim}')


def cut_backbone(backbone_name: str, backbone_model: keras.Model) -> keras.Model:
  """The backbone from its input to its local-feature layer, for images of any size.

  The cut shares its layers (and so its weights and trainable flags) with `backbone_model`:
  weights loaded into either are the other's.

  Raises:
    DelfError: `backbone_model` has no layer named as the registry's local-feature layer of
      `backbone_name` (a model of another backbone).
  """
  layer_name = backbones.get(backbone_name).local_feature_layer
  try:
    layer = backbone_model.get_layer(layer_name)
  except ValueError:
    raise DelfError(f'the model given as the {backbone_name} backbone has no layer '
                    f'{layer_name!r} (is it a {backbone_name} backbone?)') from None
  fixed_size = keras.Model(backbone_model.input, layer.output)
  # The backbone was built for one image size and its input layer rejects any other; the image
  # pyramid needs every size. Re-applying the same layers to a size-free input keeps the weights.
  return keras.models.clone_model(fixed_size, input_tensors=keras.Input((None, None, 3)),
                                  clone_function=lambda same_layer: same_layer)


def build_delf(backbone_name: str, backbone_model: keras.Model, num_classes: int, *,
               stage: str = 'attention', reduced_dim: int = 0) -> DelfModel:
  """A DELF model on `backbone_model`, with the trainable variables of `stage`.

  Args:
    backbone_name: registry name of the backbone.
    backbone_model: the model of `backbones.build(backbone_name, ...)`, any image size; the DELF
      model shares its layers up to the local-feature layer.
    num_classes: classes of the classifiers.
    stage: 'descriptor' (fine-tune the backbone's layers up to the local-feature layer and the
      descriptor classifier; apply `backbones.freeze` to `backbone_model` afterwards to keep lower
      blocks fixed) or 'attention' (train the attention head, its classifier and the autoencoder;
      freezes the backbone).
    reduced_dim: > 0 adds the autoencoder reducing descriptors to this many channels (DELF: 128).

  Returns:
    The model; its `trainable_variables` are exactly those the stage trains.

  Raises:
    BackboneError: unknown backbone name.
    DelfError: unknown stage, a model of another backbone, or a class count or reduction out of
      range.
  """
  local_backbone = cut_backbone(backbone_name, backbone_model)
  if stage == 'descriptor':
    # Undoes an earlier attention-stage model's freeze of the shared layers.
    local_backbone.trainable = True
  return DelfModel(local_backbone, backbone_name, num_classes, stage=stage,
                   reduced_dim=reduced_dim, name=f'delf_{backbone_name}')
