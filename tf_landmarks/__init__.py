"""tf-landmarks: Google-Landmarks-style landmark recognition and retrieval with TensorFlow/Keras."""

__version__ = '0.1.0'
