"""Local features for geometric verification: two backends (DELF, SIFT) behind one type.

Every backend returns `LocalFeatures`, so matching (faiss nearest neighbours) and verification
(OpenCV RANSAC) never care where the features came from.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LocalFeatures:
  """The local features of one image.

  Attributes:
    locations: float32 [N, 2], keypoint centres as (x, y) in pixels of the ORIGINAL image (OpenCV's
      order; DELF's own outputs are (y, x) boxes, converted at its SavedModel boundary).
    descriptors: float32 [N, D], each row L2-normalised.
    scores: float32 [N], the backend's keypoint strength (DELF attention, SIFT response), higher is
      stronger; features are sorted by it, strongest first.
    scales: float32 [N], the scale each feature was found at (pyramid scale for DELF, keypoint size
      for SIFT).
  """
  locations: np.ndarray
  descriptors: np.ndarray
  scores: np.ndarray
  scales: np.ndarray

  def __len__(self) -> int:
    return len(self.locations)
