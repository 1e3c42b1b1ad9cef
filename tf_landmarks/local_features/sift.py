"""The classical backend: OpenCV SIFT keypoints with RootSIFT descriptors.

RootSIFT (Arandjelović & Zisserman, "Three things everyone should know to improve object
retrieval", CVPR 2012) L1-normalises each SIFT histogram and takes the element-wise square root,
so that the Euclidean distance between two descriptors becomes the Hellinger distance between the
histograms; the result has unit L2 norm, as `LocalFeatures` requires. It needs no training and
matches markedly better than raw SIFT with the same nearest-neighbour machinery.
"""

from typing import Optional

import cv2
import numpy as np

from tf_landmarks.local_features import LocalFeatures

# Keypoints whose histogram sums to (almost) nothing carry no direction to normalise; SIFT itself
# never produces them on textured patches, but a flat image region can.
_MIN_HISTOGRAM_MASS = 1e-6


def _check_image(image: np.ndarray) -> None:
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
      or image.shape[2] != 3:
    shape = getattr(image, 'shape', None)
    dtype = getattr(image, 'dtype', type(image).__name__)
    raise ValueError(f'expected a uint8 RGB image [H, W, 3], got {dtype} of shape {shape}')
  if min(image.shape[:2]) < 1:
    raise ValueError(f'the image is empty (shape {image.shape})')


def _root_sift(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """RootSIFT of raw SIFT rows; returns the descriptors and the mask of the rows kept."""
  descriptors = descriptors.astype(np.float32)
  mass = descriptors.sum(axis=1)
  usable = mass > _MIN_HISTOGRAM_MASS
  rooted = np.sqrt(descriptors[usable] / mass[usable, None])
  # sqrt of an L1-normalised non-negative vector has unit L2 norm already; dividing again removes
  # the float32 rounding so that distances between identical patches are exactly 0.
  rooted /= np.linalg.norm(rooted, axis=1, keepdims=True)
  return rooted, usable


def extract_sift(image: np.ndarray, max_features: int = 1000,
                 max_side: Optional[int] = None) -> LocalFeatures:
  """Detects SIFT keypoints and describes them with RootSIFT.

  Deterministic: OpenCV finds the same keypoints in every run, and ties in the strength order are
  broken by location, size and angle, so the order does not depend on OpenCV's thread scheduling.

  Args:
    image: uint8 RGB [H, W, 3].
    max_features: keep at most this many keypoints, the strongest by SIFT response.
    max_side: if set and the image's longer side is larger, the image is downscaled (area
      interpolation) to this longer side before detection; locations and scales are mapped back to
      the original image's pixels. Bounds the cost of large photos.

  Returns:
    `LocalFeatures` with 128-d RootSIFT descriptors, sorted by response, strongest first; empty
    arrays (with the right shapes) if the image has no keypoints.

  Raises:
    ValueError: `image` is not a uint8 RGB array, or an argument is out of range.
  """
  _check_image(image)
  if max_features < 1:
    raise ValueError(f'max_features must be at least 1, got {max_features}')
  if max_side is not None and max_side < 16:
    raise ValueError(f'max_side must be at least 16 pixels, got {max_side}')
  gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
  height, width = gray.shape
  scale_x = scale_y = 1.0
  if max_side is not None and max(height, width) > max_side:
    factor = max_side / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    # The size is rounded: map back with the exact factor of each axis.
    scale_x, scale_y = size[0] / width, size[1] / height
  # nfeatures makes OpenCV drop weak keypoints before describing them (the expensive part); it may
  # keep a few more on ties, which the sort below trims.
  sift = cv2.SIFT_create(nfeatures=max_features)
  keypoints, descriptors = sift.detectAndCompute(gray, None)
  if not keypoints or descriptors is None:
    return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32),
                         np.zeros((0,), np.float32), np.zeros((0,), np.float32))
  points = np.array([keypoint.pt for keypoint in keypoints], np.float32)
  responses = np.array([keypoint.response for keypoint in keypoints], np.float32)
  sizes = np.array([keypoint.size for keypoint in keypoints], np.float32)
  angles = np.array([keypoint.angle for keypoint in keypoints], np.float32)
  # lexsort sorts by the last key first: strongest response, then position, size and angle.
  order = np.lexsort((angles, sizes, points[:, 1], points[:, 0], -responses))[:max_features]
  rooted, usable = _root_sift(descriptors[order])
  order = order[usable]
  # OpenCV puts pixel centres at integer coordinates, so map through the centres, not the corners.
  locations = np.stack([(points[order, 0] + 0.5) / scale_x - 0.5,
                        (points[order, 1] + 0.5) / scale_y - 0.5], axis=1).astype(np.float32)
  return LocalFeatures(locations=locations, descriptors=rooted, scores=responses[order],
                       scales=(sizes[order] / np.sqrt(scale_x * scale_y)).astype(np.float32))
