"""One image → `LocalFeatures` for either backend: what an index's images and its queries share.

The index builder extracts its images with `make_local_extractor`, and a query must be extracted
the same way (backend, feature count, DELF's pyramid and threshold, the index's PCA) for its
features to match the index's: `indexes.Index.local_extractor` rebuilds it from index.json.
"""

from typing import Callable, Optional, Sequence

import numpy as np

from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.local_features import sift
from tf_landmarks.models import delf as delf_model

BACKENDS = ('delf', 'sift')
SIFT_DIM = 128

LocalExtractor = Callable[[np.ndarray], LocalFeatures]


def make_local_extractor(backend: str, *, max_features: int,
                         delf: Optional[delf_model.DelfModel] = None,
                         delf_scales: Sequence[float] = delf_features.DEFAULT_SCALES,
                         delf_abs_threshold: float = 0.0,
                         pca: Optional[delf_features.Pca] = None) -> LocalExtractor:
  """The function uint8 RGB image [H, W, 3] → `LocalFeatures` of a backend.

  Args:
    backend: 'delf' or 'sift'.
    max_features: features kept per image, strongest first.
    delf: the DELF model (backend 'delf').
    delf_scales: DELF's pyramid scales.
    delf_abs_threshold: DELF's attention threshold.
    pca: DELF's descriptor PCA, if any.
  """
  if backend == 'sift':
    return lambda image: sift.extract_sift(image, max_features=max_features)
  return delf_features.DelfExtractor(delf, scales=delf_scales, max_feature_num=max_features,
                                     abs_threshold=delf_abs_threshold, pca=pca)
