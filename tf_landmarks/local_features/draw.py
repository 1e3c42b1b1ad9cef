"""A picture of a verified pair: both images side by side, matches as lines, inliers highlighted."""

from typing import Optional, Tuple

import cv2
import numpy as np

from tf_landmarks import files
from tf_landmarks.local_features import LocalFeatures

# Colours in RGB. Rejected putative matches are drawn thin and first, so that the inliers drawn
# over them stay visible even when most matches are rejected.
PUTATIVE_COLOUR = (255, 200, 0)
INLIER_COLOUR = (0, 230, 60)
CAPTION_HEIGHT = 28
_CAPTION_BACKGROUND = (255, 255, 255)
_CAPTION_TEXT = (0, 0, 0)


def _scaled(image: np.ndarray, height: int, what: str) -> Tuple[np.ndarray, float]:
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
      or image.shape[2] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f'{what} must be a non-empty uint8 RGB image [H, W, 3], got '
                     f'{getattr(image, "dtype", type(image).__name__)} of shape '
                     f'{getattr(image, "shape", None)}')
  scale = height / image.shape[0]
  width = max(1, round(image.shape[1] * scale))
  interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
  return cv2.resize(image, (width, height), interpolation=interpolation), scale


def _point(location: np.ndarray, scale: float, x_offset: int) -> Tuple[int, int]:
  # OpenCV's integer drawing coordinates: shift by half a pixel so that the scaled point stays on
  # the same pixel centre.
  x = (location[0] + 0.5) * scale - 0.5 + x_offset
  y = (location[1] + 0.5) * scale - 0.5
  return int(round(x)), int(round(y))


def draw_matches(image_a: np.ndarray, image_b: np.ndarray, features_a: LocalFeatures,
                 features_b: LocalFeatures, matches: np.ndarray,
                 inlier_mask: Optional[np.ndarray], path: str,
                 height: Optional[int] = None) -> Tuple[int, int]:
  """Writes a PNG of a matched pair: image A left, image B right, with a caption line below.

  Putative matches the verification rejected are thin lines in PUTATIVE_COLOUR; inliers are
  thicker lines in INLIER_COLOUR with their keypoints circled. The caption reads
  "<inliers> inliers / <matches> putative matches".

  Args:
    image_a: uint8 RGB [H, W, 3], the image `features_a` (and the first column of `matches`) is of.
    image_b: uint8 RGB, the image of `features_b` (second column of `matches`).
    features_a: features of image A (locations in its pixels).
    features_b: features of image B.
    matches: int [M, 2] of (row in A, row in B).
    inlier_mask: bool [M] from the verification, or None to draw every match as putative.
    path: the PNG to write (any tf.io.gfile path).
    height: the common height both images are scaled to; default the taller image's height.

  Returns:
    (height, width) of the written picture: the common height plus the caption band, and the sum
    of the two scaled widths.

  Raises:
    ValueError: a bad image, or matches or a mask that do not fit the features.
  """
  matches = np.asarray(matches).reshape(-1, 2)
  if len(matches) and (not np.issubdtype(matches.dtype, np.integer) or matches.min() < 0
                       or matches[:, 0].max() >= len(features_a)
                       or matches[:, 1].max() >= len(features_b)):
    raise ValueError(f'matches must be integer rows of the {len(features_a)} and '
                     f'{len(features_b)} features')
  if inlier_mask is None:
    inlier_mask = np.zeros(len(matches), bool)
  inlier_mask = np.asarray(inlier_mask, bool).ravel()
  if len(inlier_mask) != len(matches):
    raise ValueError(f'inlier_mask has {len(inlier_mask)} entries for {len(matches)} matches')
  common_height = max(image_a.shape[0], image_b.shape[0]) if height is None else height
  if common_height < 1:
    raise ValueError(f'height must be positive, got {height}')
  left, scale_a = _scaled(image_a, common_height, 'image_a')
  right, scale_b = _scaled(image_b, common_height, 'image_b')
  canvas = np.full((common_height + CAPTION_HEIGHT, left.shape[1] + right.shape[1], 3),
                   _CAPTION_BACKGROUND, np.uint8)
  canvas[:common_height, :left.shape[1]] = left
  canvas[:common_height, left.shape[1]:] = right
  for is_inlier in (False, True):
    colour = INLIER_COLOUR if is_inlier else PUTATIVE_COLOUR
    for row_a, row_b in matches[inlier_mask == is_inlier]:
      start = _point(features_a.locations[row_a], scale_a, 0)
      end = _point(features_b.locations[row_b], scale_b, left.shape[1])
      cv2.line(canvas, start, end, colour, 2 if is_inlier else 1, cv2.LINE_AA)
      if is_inlier:
        cv2.circle(canvas, start, 3, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, end, 3, colour, 1, cv2.LINE_AA)
  caption = f'{int(inlier_mask.sum())} inliers / {len(matches)} putative matches'
  cv2.putText(canvas, caption, (6, common_height + CAPTION_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX,
              0.55, _CAPTION_TEXT, 1, cv2.LINE_AA)
  encoded, png = cv2.imencode('.png', cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
  if not encoded:
    raise ValueError(f'OpenCV could not encode a {canvas.shape} picture as PNG')
  files.write_atomically(path, png.tobytes())
  return canvas.shape[0], canvas.shape[1]
