"""Geometric verification: a robust affine fit between matched keypoints, and the decision.

The score of an image pair is the number of putative matches that one affine map explains within
`residual_threshold` pixels, as in DELF's reference re-ranking (affine model, 3-point samples,
1,000 trials, 10 px). The fit is OpenCV's `estimateAffine2D`, compiled and with adaptive stopping:
it ends as soon as the best model found so far is the best with `confidence`, where the reference
(scikit-image's `ransac`) always runs all its trials in Python.

Everything here is a pure function of its arguments: OpenCV's random generator is seeded on every
call, so the same matches give the same inliers in every run.
"""

import dataclasses
from typing import Optional, Sequence

import cv2
import numpy as np

METHODS = {
    # Classic RANSAC with OpenCV's Levenberg-Marquardt refinement of the best model.
    'ransac': cv2.RANSAC,
    # OpenCV's USAC framework in its accurate setting: uniform sampling, graph-cut local
    # optimisation of promising models and SPRT model checks.
    'usac': cv2.USAC_ACCURATE,
}

# An affine map has six parameters: three correspondences determine it exactly.
MINIMAL_SAMPLE = 3


@dataclasses.dataclass(frozen=True)
class Verification:
  """The outcome of verifying one image pair.

  Attributes:
    num_inliers: matches the affine map explains within the threshold; the pair's score.
    inlier_mask: bool [M], one per match given to `verify`, in its order.
    matrix: float64 [2, 3], the affine map taking query (x, y) to index (x, y) in pixels, or None
      if no model was found (too few matches, or degenerate ones).
    hull_fraction: the area of the convex hull of the inliers' query locations over the query
      image's area, if `verify` was given the query image size; otherwise None.
  """
  num_inliers: int
  inlier_mask: np.ndarray
  matrix: Optional[np.ndarray]
  hull_fraction: Optional[float] = None


def _as_locations(locations: np.ndarray, what: str) -> np.ndarray:
  locations = np.asarray(locations, dtype=np.float64)
  if locations.ndim != 2 or locations.shape[1] != 2:
    raise ValueError(f'{what} must be [N, 2] (x, y), got shape {locations.shape}')
  if not np.all(np.isfinite(locations)):
    raise ValueError(f'{what} contain NaN or infinite values')
  return locations


def _as_matches(matches: np.ndarray, num_query: int, num_index: int) -> np.ndarray:
  matches = np.asarray(matches)
  if matches.size == 0:
    return np.zeros((0, 2), np.int64)
  if matches.ndim != 2 or matches.shape[1] != 2 or not np.issubdtype(matches.dtype, np.integer):
    raise ValueError(f'matches must be integer [M, 2] (query row, index row), got '
                     f'{matches.dtype} of shape {matches.shape}')
  if matches.min() < 0 or matches[:, 0].max() >= num_query or matches[:, 1].max() >= num_index:
    raise ValueError(f'matches refer to rows outside the {num_query} query and {num_index} index '
                     f'locations')
  return matches.astype(np.int64)


def convex_hull_area_fraction(locations: np.ndarray, image_size: Sequence[int]) -> float:
  """The area of the convex hull of `locations` as a fraction of the image's area.

  A large fraction says the matches spread over much of the image (a facade); a tiny one says they
  cluster on a small patch, such as a logo or a sign that also appears elsewhere.

  Args:
    locations: [N, 2] (x, y) pixels.
    image_size: (height, width) of the image, as `image.shape[:2]`.

  Returns:
    The fraction in [0, 1] (capped at 1: points outside the image could push it above); 0 for
    fewer than 3 points or collinear ones.

  Raises:
    ValueError: bad shapes, or a non-positive image size.
  """
  locations = _as_locations(locations, 'locations')
  if len(image_size) != 2 or min(image_size) <= 0:
    raise ValueError(f'image_size must be a positive (height, width), got {tuple(image_size)}')
  if len(locations) < 3:
    return 0.0
  hull = cv2.convexHull(locations.astype(np.float32))
  area = float(cv2.contourArea(hull))
  return min(1.0, area / (float(image_size[0]) * float(image_size[1])))


def verify(query_locations: np.ndarray, index_locations: np.ndarray, matches: np.ndarray, *,
           residual_threshold: float = 10.0, max_trials: int = 1000, seed: int = 0,
           method: str = 'ransac', min_matches: int = MINIMAL_SAMPLE, confidence: float = 0.99,
           query_image_size: Optional[Sequence[int]] = None) -> Verification:
  """Fits an affine map to the matched locations robustly and counts the matches it explains.

  Args:
    query_locations: [Nq, 2] (x, y) of the query features.
    index_locations: [Ni, 2] (x, y) of the index features.
    matches: int [M, 2] of (query row, index row), as `match.putative_matches` returns.
    residual_threshold: a match is an inlier if the map sends its query point within this many
      pixels of its index point.
    max_trials: most random 3-point samples to try.
    seed: seeds OpenCV's random generator before the fit, so that results repeat exactly.
    method: 'ransac' or 'usac' (see METHODS).
    min_matches: pairs with fewer matches score 0 without a fit; at least 3 (an affine map fits
      any 3 points exactly, so 3 inliers out of 3 prove nothing, and callers usually want more).
    confidence: the fit stops once the best model is the best with this probability.
    query_image_size: (height, width) of the query image; if given, the inliers' convex hull
      fraction is computed (`Verification.hull_fraction`).

  Returns:
    The Verification.

  Raises:
    ValueError: bad shapes, rows out of range, or a setting out of range.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {", ".join(METHODS)}, got {method!r}')
  if not residual_threshold > 0:
    raise ValueError(f'residual_threshold must be positive, got {residual_threshold}')
  if max_trials < 1 or min_matches < MINIMAL_SAMPLE or not 0 < confidence < 1:
    raise ValueError(f'need max_trials ≥ 1, min_matches ≥ {MINIMAL_SAMPLE} and 0 < confidence < '
                     f'1; got {max_trials}, {min_matches}, {confidence}')
  query_locations = _as_locations(query_locations, 'query_locations')
  index_locations = _as_locations(index_locations, 'index_locations')
  matches = _as_matches(matches, len(query_locations), len(index_locations))
  no_fit = Verification(0, np.zeros(len(matches), bool), None,
                        None if query_image_size is None else 0.0)
  if len(matches) < min_matches:
    return no_fit
  source = query_locations[matches[:, 0]]
  target = index_locations[matches[:, 1]]
  cv2.setRNGSeed(seed)
  matrix, mask = cv2.estimateAffine2D(source, target, method=METHODS[method],
                                      ransacReprojThreshold=residual_threshold,
                                      maxIters=max_trials, confidence=confidence)
  if matrix is None or mask is None:
    return no_fit
  inlier_mask = mask.ravel().astype(bool)
  hull_fraction = None
  if query_image_size is not None:
    hull_fraction = convex_hull_area_fraction(source[inlier_mask], query_image_size)
  return Verification(int(inlier_mask.sum()), inlier_mask, matrix, hull_fraction)


def accept(verification: Verification, min_inliers: int, min_hull_fraction: float = 0.0) -> bool:
  """Whether a verified pair counts as showing the same landmark.

  Args:
    verification: the pair's Verification.
    min_inliers: the fewest inliers that count.
    min_hull_fraction: the smallest part of the query image the inliers must span; 0 ignores it.

  Returns:
    True if both conditions hold.

  Raises:
    ValueError: `min_hull_fraction` > 0 but the verification has no hull fraction (verify was not
      given the query image size).
  """
  if min_hull_fraction > 0 and verification.hull_fraction is None:
    raise ValueError('min_hull_fraction needs verify(..., query_image_size=...)')
  if verification.num_inliers < min_inliers:
    return False
  return min_hull_fraction <= 0 or verification.hull_fraction >= min_hull_fraction
