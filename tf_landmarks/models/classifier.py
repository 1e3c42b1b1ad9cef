"""The landmark classifier: uint8 images → backbone preprocessing → backbone → head → logits.

Preprocessing is inside the model, so it runs on the accelerator and the input pipeline hands over
uint8 batches (a quarter of the bytes of float32; see data.py), and an exported model needs nothing
but pixels. The head sees the backbone's spatial feature map and, in training, the labels (margin
heads such as ArcFace need them).
"""

import keras
import tensorflow as tf

from tf_landmarks.models import backbones


@keras.saving.register_keras_serializable('tf_landmarks')
class LandmarkClassifier(keras.Model):
  """A backbone and a head with the backbone's preprocessing in front.

  Args:
    backbone: a Keras model from preprocessed images to a spatial feature map.
    head: a layer of `models.heads`, called as head(features, labels=None, training=False).
    backbone_name: the registry name, which fixes the preprocessing.
  """

  def __init__(self, backbone: keras.Model, head: keras.layers.Layer, backbone_name: str,
               **kwargs):
    super().__init__(**kwargs)
    self.backbone = backbone
    self.head = head
    self.backbone_name = backbone_name
    backbones.get(backbone_name)  # An unknown name fails here, not at the first batch.

  def features(self, images: tf.Tensor, training: bool = False) -> tf.Tensor:
    """The backbone's spatial feature map of uint8 (or float [0, 255]) RGB images."""
    return self.backbone(backbones.preprocess(images, self.backbone_name), training=training)

  def call(self, images, labels=None, training=False):
    return self.head(self.features(images, training=training), labels=labels, training=training)

  def embed(self, images: tf.Tensor) -> tf.Tensor:
    """The head's L2-normalised global descriptor of each image (inference mode)."""
    return self.head.embed(self.features(images, training=False))

  def get_config(self):
    return {**super().get_config(),
            'backbone': keras.saving.serialize_keras_object(self.backbone),
            'head': keras.saving.serialize_keras_object(self.head),
            'backbone_name': self.backbone_name}

  @classmethod
  def from_config(cls, config):
    config = dict(config)
    backbone = keras.saving.deserialize_keras_object(config.pop('backbone'))
    head = keras.saving.deserialize_keras_object(config.pop('head'))
    return cls(backbone, head, **config)
