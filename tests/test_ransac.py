"""The verification rule: when RANSAC fits, and when a verified pair counts (`ransac.accept`)."""

import numpy as np
import pytest

from tf_landmarks.local_features import ransac


def _verification(inliers):
  return ransac.Verification(inliers, np.ones(inliers, bool), None, None)


@pytest.mark.parametrize('min_inliers', [3, 15, 40])
def test_accept_takes_exactly_min_inliers(min_inliers):
  assert not ransac.accept(_verification(min_inliers - 1), min_inliers)
  assert ransac.accept(_verification(min_inliers), min_inliers)
  assert ransac.accept(_verification(min_inliers + 1), min_inliers)


@pytest.mark.parametrize('count', [ransac.MINIMAL_SAMPLE, 5])
def test_verify_fits_exactly_enough_matches(count):
  # `count` points under an affine map, matched one to one, and min_matches == count: enough.
  rng = np.random.default_rng(count)
  query = rng.uniform(0, 200, size=(count, 2))
  index = query @ np.array([[0.9, 0.1], [-0.1, 0.9]]) + np.array([12.0, -7.0])
  matches = np.stack([np.arange(count)] * 2, axis=1)
  result = ransac.verify(query, index, matches, min_matches=count)
  assert result.num_inliers == count
  # One match fewer than asked: no fit.
  assert ransac.verify(query, index, matches[:-1], min_matches=count).num_inliers == 0
