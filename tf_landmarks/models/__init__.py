"""Model parts: backbones, classification heads and training losses; `tracked_variables`, which
the SavedModel exports of the classifier and of DELF share."""

from typing import List

import tensorflow as tf


def tracked_variables(model) -> List[tf.Variable]:
  """The TensorFlow variables under a Keras 3 model, for a tf.Module to track.

  Keras 3 wraps each tf.Variable in a keras.Variable; a tf.Module that only holds the model saves
  a SavedModel that tf.saved_model.load runs, but that TF1-style loaders (TF Serving,
  saved_model_cli run, the C++ and Java APIs) cannot: "Could not find variable …" (keras-team/keras
  #20095). Tracking the underlying variables as well makes the variables restorable there.
  """
  return [variable.value for variable in model.variables]
