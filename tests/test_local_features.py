"""Tests of the classical local-feature path: SIFT, faiss matching, RANSAC, drawing, evaluation."""

import csv
import os
import shutil
import subprocess
import sys

import cv2
import faiss
import numpy as np
from PIL import Image
import pytest

from helpers import REPO
from tf_landmarks import csv_io
from tf_landmarks import runs
from tf_landmarks import synthetic
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import draw
from tf_landmarks.local_features import evaluate
from tf_landmarks.local_features import match
from tf_landmarks.local_features import ransac
from tf_landmarks.local_features import sift

# A known affine map (query → index): rotation, shear, anisotropic scale and a shift.
AFFINE = np.array([[0.92, 0.18, 31.0], [-0.12, 1.07, -14.0]])


def textured_image(seed: int, height: int = 240, width: int = 320) -> np.ndarray:
  """A uint8 RGB image full of blobs and edges at several scales: plenty of SIFT keypoints."""
  rng = np.random.default_rng(seed)
  image = np.zeros((height, width, 3), np.float32)
  for cells in (4, 12, 40):
    noise = rng.uniform(0, 255, (cells * height // width + 1, cells, 3)).astype(np.float32)
    image += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) / 3
  return np.clip(image, 0, 255).astype(np.uint8)


def features(locations, descriptors) -> LocalFeatures:
  count = len(locations)
  return LocalFeatures(np.asarray(locations, np.float32).reshape(count, 2),
                       np.asarray(descriptors, np.float32),
                       np.zeros(count, np.float32), np.ones(count, np.float32))


def unit_rows(rng: np.random.Generator, count: int, dims: int) -> np.ndarray:
  rows = rng.normal(size=(count, dims)).astype(np.float32)
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def apply_affine(points: np.ndarray, matrix: np.ndarray = AFFINE) -> np.ndarray:
  return points @ matrix[:, :2].T + matrix[:, 2]


# ---- sift.py


def test_extract_sift_gives_sorted_rootsift_features():
  image = textured_image(0)
  result = sift.extract_sift(image, max_features=300)
  assert 100 < len(result) <= 300
  assert result.locations.shape == (len(result), 2) and result.descriptors.shape[1] == 128
  assert all(array.dtype == np.float32 for array in (result.locations, result.descriptors,
                                                      result.scores, result.scales))
  assert np.all(np.diff(result.scores) <= 0)
  np.testing.assert_allclose(np.linalg.norm(result.descriptors, axis=1), 1, atol=1e-5)
  assert result.descriptors.min() >= 0
  # RootSIFT: the squared descriptor is the L1-normalised raw SIFT histogram of the same keypoint.
  keypoints, raw = cv2.SIFT_create().detectAndCompute(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), None)
  strongest = [i for i, keypoint in enumerate(keypoints)
               if np.allclose(keypoint.pt, result.locations[0]) and
               np.isclose(keypoint.response, result.scores[0])]
  assert strongest
  matching_rows = [np.allclose(result.descriptors[0] ** 2, raw[i] / raw[i].sum(), atol=1e-5)
                   for i in strongest]
  assert any(matching_rows)


def test_extract_sift_is_deterministic():
  image = textured_image(1)
  first, second = sift.extract_sift(image), sift.extract_sift(image)
  for name in ('locations', 'descriptors', 'scores', 'scales'):
    np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_extract_sift_downscales_and_maps_back_to_original_pixels():
  # Grey (R = G = B), so that converting to grey and downscaling commute exactly.
  small = np.repeat(textured_image(2, 200, 300)[:, :, :1], 3, axis=2)
  large = cv2.resize(small, (600, 400), interpolation=cv2.INTER_CUBIC)
  on_large = sift.extract_sift(large, max_side=300)
  # The same detection as on the image downscaled by hand, with coordinates twice as large.
  by_hand = sift.extract_sift(cv2.resize(large, (300, 200), interpolation=cv2.INTER_AREA))
  assert len(on_large) == len(by_hand) > 50
  np.testing.assert_allclose(on_large.locations, (by_hand.locations + 0.5) * 2 - 0.5, atol=1e-3)
  np.testing.assert_allclose(on_large.scales, by_hand.scales * 2, rtol=1e-6)
  np.testing.assert_array_equal(on_large.descriptors, by_hand.descriptors)
  assert on_large.locations[:, 0].max() > 300  # In the large image's pixels.
  # Smaller images are left as they are.
  untouched = sift.extract_sift(small, max_side=1000)
  np.testing.assert_array_equal(untouched.locations, sift.extract_sift(small).locations)


def test_extract_sift_of_a_flat_image_is_empty_with_the_right_shapes():
  result = sift.extract_sift(np.full((64, 80, 3), 128, np.uint8))
  assert len(result) == 0
  assert result.locations.shape == (0, 2) and result.descriptors.shape == (0, 128)
  assert result.scores.shape == result.scales.shape == (0,)


@pytest.mark.parametrize('image', [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 3), np.float32),
                                   np.zeros((32, 32, 4), np.uint8), np.zeros((0, 5, 3), np.uint8)])
def test_extract_sift_rejects_what_is_not_an_rgb_image(image):
  with pytest.raises(ValueError, match='RGB|empty'):
    sift.extract_sift(image)


# ---- match.py


def test_putative_matches_pairs_each_query_with_its_nearest_index_feature():
  rng = np.random.default_rng(0)
  index = unit_rows(rng, 200, 32)
  order = rng.permutation(200)[:50]
  query = index[order] + rng.normal(0, 0.01, (50, 32)).astype(np.float32)
  result = match.putative_matches(features(np.zeros((50, 2)), query),
                                  features(np.zeros((200, 2)), index))
  np.testing.assert_array_equal(result, np.stack([np.arange(50), order], axis=1))
  assert result.dtype == np.int64


def test_ratio_test_drops_ambiguous_matches_and_the_bound_drops_distant_ones():
  unit = lambda *rows: np.array(rows, np.float32) / np.linalg.norm(rows, axis=1, keepdims=True)
  # Index rows 1 and 2 are near copies of each other.
  index = unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0.05, 0])
  query = unit([1, 0, 0, 0],  # Exactly index row 0: passes everything.
               [0, 1, 0.025, 0],  # Halfway between rows 1 and 2: close, but ambiguous.
               [0, 0, 0, 1],  # √2 from every row: far and ambiguous.
               [0.6, 0, 0, 1])  # 0.98 from row 0, 1.41 from the others: far, but unambiguous.
  query_features = features(np.zeros((4, 2)), query)
  index_features = features(np.zeros((3, 2)), index)
  rows = lambda **filters: match.putative_matches(query_features, index_features,
                                                  **filters)[:, 0].tolist()
  assert rows() == [0, 1, 2, 3]
  assert rows(ratio=0.8) == [0, 3]
  assert rows(max_distance=0.5) == [0, 1]
  assert rows(max_distance=0.5, ratio=0.8) == [0]


def test_mutual_check_keeps_only_the_closest_of_several_queries_on_one_index_feature():
  index = np.eye(4, dtype=np.float32)
  query = np.array([[1, 0.1, 0, 0], [1, 0.3, 0, 0], [0, 0, 1, 0]], np.float32)
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  args = features(np.zeros((3, 2)), query), features(np.zeros((4, 2)), index)
  assert match.putative_matches(*args).tolist() == [[0, 0], [1, 0], [2, 2]]
  assert match.putative_matches(*args, mutual=True).tolist() == [[0, 0], [2, 2]]


def test_putative_matches_of_empty_sets_and_bad_arguments():
  rng = np.random.default_rng(2)
  some = features(np.zeros((5, 2)), unit_rows(rng, 5, 8))
  empty = features(np.zeros((0, 2)), np.zeros((0, 8)))
  for query, index in ((empty, some), (some, empty), (empty, empty)):
    result = match.putative_matches(query, index, ratio=0.8, mutual=True)
    assert result.shape == (0, 2) and result.dtype == np.int64
  with pytest.raises(ValueError, match='sizes differ'):
    match.putative_matches(some, features(np.zeros((5, 2)), unit_rows(rng, 5, 16)))
  with pytest.raises(ValueError, match='ratio'):
    match.putative_matches(some, some, ratio=1.5)
  with pytest.raises(ValueError, match='index_kind'):
    match.putative_matches(some, some, index_kind='hnsw')
  no_dims = features(np.zeros((5, 2)), np.zeros((5, 0)))
  for index_kind in match.INDEX_KINDS:
    with pytest.raises(ValueError, match='0 dims'):
      match.putative_matches(no_dims, no_dims, index_kind=index_kind)


def test_a_single_index_feature_passes_the_ratio_test():
  rng = np.random.default_rng(3)
  one = unit_rows(rng, 1, 8)
  result = match.putative_matches(features(np.zeros((1, 2)), one), features(np.zeros((1, 2)), one),
                                  ratio=0.8)
  assert result.tolist() == [[0, 0]]


# Filters of the flat-path tests: each one drops some of the nearest-neighbour pairs of
# `matching_sets` and keeps others.
FILTERS = [{}, {'ratio': 0.8}, {'mutual': True}, {'ratio': 0.8, 'mutual': True},
           {'max_distance': 0.9}, {'max_distance': 0.9, 'ratio': 0.9, 'mutual': True}]


def matching_sets(seed: int):
  """400 index and 300 query descriptors: half the queries near an index row (some index rows
  near two queries, at different noise, so the mutual check keeps one), half unrelated.

  The flat path rounds differently from faiss's scan, so agreeing with it exactly means something
  only without near-ties: checked here for the thresholds of FILTERS.
  """
  rng = np.random.default_rng(seed)
  index = unit_rows(rng, 400, 16)
  near = index[rng.integers(0, 400, 150)] + rng.normal(0, 0.1, (150, 16)).astype(np.float32)
  query = np.concatenate([near, unit_rows(rng, 150, 16)])
  query /= np.linalg.norm(query, axis=1, keepdims=True)
  squared = ((query[:, None, :] - index[None, :, :]) ** 2).sum(-1)
  rows, columns = np.sort(squared, axis=1), np.sort(squared, axis=0)
  assert np.min(rows[:, 1] - rows[:, 0]) > 1e-4 and np.min(columns[1] - columns[0]) > 1e-4
  for threshold in (0.8 ** 2 * rows[:, 1], 0.9 ** 2 * rows[:, 1], 0.9 ** 2):
    assert np.min(np.abs(rows[:, 0] - threshold)) > 1e-4
  return query, index


def faiss_reference(query, index, max_distance=None, ratio=None, mutual=False) -> np.ndarray:
  """The matching rule written out with two faiss IndexFlatL2 searches."""
  forward = faiss.IndexFlatL2(query.shape[1])
  forward.add(index)
  squared, nearest = forward.search(query, 2)
  keep = np.ones(len(query), bool)
  if max_distance is not None:
    keep &= np.sqrt(squared[:, 0]) < max_distance
  if ratio is not None:
    keep &= np.sqrt(squared[:, 0]) < ratio * np.sqrt(squared[:, 1])
  if mutual:
    backward = faiss.IndexFlatL2(query.shape[1])
    backward.add(query)
    keep &= backward.search(index[nearest[:, 0]], 1)[1][:, 0] == np.arange(len(query))
  return np.stack([np.flatnonzero(keep), nearest[keep, 0]], axis=1)


@pytest.mark.parametrize('columns', [1, 7, None])
@pytest.mark.parametrize('filters', FILTERS)
def test_flat_matching_agrees_with_faiss_index_flat_searches(monkeypatch, filters, columns):
  query, index = matching_sets(5)
  expected = faiss_reference(query, index, **filters)
  if filters:
    unfiltered = len(faiss_reference(query, index))
    assert 0 < len(expected) < unfiltered
  if columns is not None:
    # Blocks of that many index columns (None: the whole matrix at once).
    monkeypatch.setattr(match, 'MAX_MATRIX_ENTRIES', 300 * columns)
  result = match.putative_matches(features(np.zeros((300, 2)), query),
                                  features(np.zeros((400, 2)), index), **filters)
  np.testing.assert_array_equal(result, expected)
  assert result.dtype == np.int64


@pytest.mark.parametrize('columns', [1, 7, None])
@pytest.mark.parametrize('filters', FILTERS)
def test_flat_matching_in_blocks_of_index_columns_breaks_ties_towards_the_earlier_row(
    monkeypatch, filters, columns):
  # 0/1 vectors: every distance is a small integer, computed exactly in any order, so ties are
  # everywhere (repeated rows, equal Hamming distances) and each block sees the same values.
  rng = np.random.default_rng(7)
  query = rng.integers(0, 2, (300, 12)).astype(np.float32)
  index = rng.integers(0, 2, (400, 12)).astype(np.float32)
  squared = ((query[:, None, :] - index[None, :, :]) ** 2).sum(-1)
  nearest = squared.argmin(axis=1)
  first = squared.min(axis=1)
  keep = np.ones(300, bool)
  if 'max_distance' in filters:
    keep &= first < filters['max_distance'] ** 2
  if 'ratio' in filters:
    keep &= first < filters['ratio'] ** 2 * np.sort(squared, axis=1)[:, 1]
  if 'mutual' in filters:
    keep &= squared.argmin(axis=0)[nearest] == np.arange(300)
  if columns is not None:
    monkeypatch.setattr(match, 'MAX_MATRIX_ENTRIES', 300 * columns)
  result = match.putative_matches(features(np.zeros((300, 2)), query),
                                  features(np.zeros((400, 2)), index), **filters)
  np.testing.assert_array_equal(result, np.stack([np.flatnonzero(keep), nearest[keep]], axis=1))


@pytest.mark.parametrize('index_kind,min_recall', [('ivf_flat', 0.95), ('ivf_pq', 0.8)])
def test_ivf_indexes_find_most_true_neighbours_and_restore_the_thread_count(index_kind,
                                                                            min_recall):
  rng = np.random.default_rng(4)
  # Clustered data, as descriptors of many images are: 40 centres, 4,000 points.
  centres = unit_rows(rng, 40, 32)
  index = centres[rng.integers(40, size=4000)] + rng.normal(0, 0.15, (4000, 32)).astype(np.float32)
  index /= np.linalg.norm(index, axis=1, keepdims=True)
  planted = rng.choice(4000, 300, replace=False)
  query = index[planted] + rng.normal(0, 0.005, (300, 32)).astype(np.float32)
  threads = faiss.omp_get_max_threads()
  search_index = match.build_search_index(index, index_kind, nlist=64, nprobe=8, pq_bytes=16)
  result = match.putative_matches(features(np.zeros((300, 2)), query),
                                  features(np.zeros((4000, 2)), index), search_index=search_index)
  assert faiss.omp_get_max_threads() == threads
  assert np.mean(result[:, 1] == planted[result[:, 0]]) >= min_recall
  with pytest.raises(ValueError, match='search_index holds'):
    match.putative_matches(features(np.zeros((300, 2)), query),
                           features(np.zeros((10, 2)), index[:10]), search_index=search_index)


# ---- ransac.py


def planted_pair(seed: int, inliers: int = 80, outliers: int = 60, noise: float = 1.0):
  """Query and index locations of `inliers` points related by AFFINE (plus noise of up to `noise`
  px per axis) and `outliers` random pairs; matches pair row i with row i."""
  rng = np.random.default_rng(seed)
  query = rng.uniform(0, 400, (inliers + outliers, 2))
  index = np.concatenate([apply_affine(query[:inliers])
                          + rng.uniform(-noise, noise, (inliers, 2)),
                          rng.uniform(0, 400, (outliers, 2))])
  matches = np.stack([np.arange(inliers + outliers)] * 2, axis=1)
  return query, index, matches


@pytest.mark.parametrize('method', sorted(ransac.METHODS))
def test_verify_recovers_a_known_affine_map_and_exactly_its_inliers(method):
  query, index, matches = planted_pair(0)
  result = ransac.verify(query, index, matches, residual_threshold=10.0, method=method)
  # What the true map explains within the threshold: the planted pairs, plus any random pair that
  # happens to fall within 10 px of where the map sends its query point.
  expected = np.linalg.norm(apply_affine(query) - index, axis=1) < 10.0
  assert expected[:80].all() and expected.sum() < 85
  np.testing.assert_array_equal(result.inlier_mask, expected)
  assert result.num_inliers == expected.sum()
  np.testing.assert_allclose(result.matrix[:, :2], AFFINE[:, :2], atol=0.01)
  np.testing.assert_allclose(result.matrix[:, 2], AFFINE[:, 2], atol=1.0)
  np.testing.assert_allclose(apply_affine(query[:80], result.matrix), apply_affine(query[:80]),
                             atol=1.0)


def test_verify_finds_few_inliers_between_unrelated_points():
  rng = np.random.default_rng(1)
  query, index = rng.uniform(0, 400, (200, 2)), rng.uniform(0, 400, (200, 2))
  result = ransac.verify(query, index, np.stack([np.arange(200)] * 2, axis=1))
  assert result.num_inliers <= 8


@pytest.mark.parametrize('method', sorted(ransac.METHODS))
def test_the_seed_makes_repeated_runs_identical(method):
  # Few planted inliers among many outliers: the search has real randomness to repeat.
  query, index, matches = planted_pair(3, inliers=12, outliers=150, noise=4.0)
  runs = [ransac.verify(query, index, matches, seed=7, method=method) for _ in range(3)]
  # Other users of OpenCV's random generator in between must not change the outcome.
  cv2.randu(np.zeros((100, 1)), 0, 1)
  runs.append(ransac.verify(query, index, matches, seed=7, method=method))
  for run in runs[1:]:
    np.testing.assert_array_equal(run.inlier_mask, runs[0].inlier_mask)
    np.testing.assert_array_equal(run.matrix, runs[0].matrix)


def test_verify_scores_zero_below_three_matches_and_checks_its_input():
  query, index, matches = planted_pair(4)
  for count in (0, 1, 2):
    result = ransac.verify(query, index, matches[:count])
    assert result.num_inliers == 0 and result.matrix is None and len(result.inlier_mask) == count
  assert ransac.verify(query, index, np.zeros((0, 2), np.int64)).num_inliers == 0
  assert ransac.verify(query, index, matches[:10], min_matches=20).num_inliers == 0
  with pytest.raises(ValueError, match='outside'):
    ransac.verify(query, index, matches + 1000)
  with pytest.raises(ValueError, match='method'):
    ransac.verify(query, index, matches, method='lmeds')
  with pytest.raises(ValueError, match=r'\[N, 2\]'):
    ransac.verify(query[:, :1], index, matches)


def test_convex_hull_area_fraction_of_a_known_square():
  corners = [[10, 20], [60, 20], [60, 70], [10, 70]]
  inside = [[30, 30], [40, 55], [15, 65]]
  # A 50 × 50 square in a 100-high, 200-wide image: 2,500 / 20,000.
  assert ransac.convex_hull_area_fraction(np.array(corners + inside), (100, 200)) == \
      pytest.approx(0.125)
  assert ransac.convex_hull_area_fraction(np.array([[0, 0], [5, 5], [9, 9]]), (100, 200)) == 0
  assert ransac.convex_hull_area_fraction(np.array(corners[:2]), (100, 200)) == 0
  with pytest.raises(ValueError, match='image_size'):
    ransac.convex_hull_area_fraction(np.array(corners), (0, 200))


def test_verify_measures_the_inliers_hull_and_accept_applies_both_conditions():
  query, index, matches = planted_pair(5)
  result = ransac.verify(query, index, matches, query_image_size=(400, 400))
  expected = ransac.convex_hull_area_fraction(query[result.inlier_mask], (400, 400))
  assert result.hull_fraction == pytest.approx(expected) and result.hull_fraction > 0.5
  assert ransac.accept(result, min_inliers=80)
  assert not ransac.accept(result, min_inliers=result.num_inliers + 1)
  assert ransac.accept(result, min_inliers=10, min_hull_fraction=0.5)
  assert not ransac.accept(result, min_inliers=10, min_hull_fraction=0.95)
  without_size = ransac.verify(query, index, matches)
  assert without_size.hull_fraction is None
  with pytest.raises(ValueError, match='query_image_size'):
    ransac.accept(without_size, min_inliers=10, min_hull_fraction=0.1)


# ---- draw.py


def test_draw_matches_writes_a_side_by_side_png_with_both_colours(tmp_path):
  image_a, image_b = textured_image(3, 60, 80), textured_image(4, 120, 90)
  features_a = features([[5, 5], [70, 50], [40, 30]], np.eye(3, 4))
  features_b = features([[10, 100], [80, 10], [45, 60]], np.eye(3, 4))
  matches = np.array([[0, 0], [1, 1], [2, 2]])
  path = tmp_path / 'pair.png'
  shape = draw.draw_matches(image_a, image_b, features_a, features_b, matches,
                            np.array([True, False, True]), str(path))
  # Image A is scaled to the common height of 120 (80 → 160 wide), B stays 90 wide.
  assert shape == (120 + draw.CAPTION_HEIGHT, 160 + 90)
  with Image.open(path) as picture:
    assert picture.format == 'PNG' and picture.size == (250, 120 + draw.CAPTION_HEIGHT)
    pixels = np.asarray(picture.convert('RGB'))
  for colour in (draw.INLIER_COLOUR, draw.PUTATIVE_COLOUR):
    # Lines are anti-aliased: count the pixels close to the colour.
    distance = np.abs(pixels[:120].astype(int) - colour).sum(axis=2)
    assert (distance < 60).sum() > 20
  # The caption band holds dark text.
  assert (pixels[120:].min(axis=2) < 100).sum() > 50
  with pytest.raises(ValueError, match='inlier_mask'):
    draw.draw_matches(image_a, image_b, features_a, features_b, matches, np.array([True]),
                      str(path))


# ---- evaluate.py


def test_roc_auc_is_the_mann_whitney_statistic_with_ties_as_halves():
  # Positive 3 beats 1 and 2 (2); each 5 beats 1 and 2 and ties the negative 5 (2.5): 7 of 9.
  assert evaluate.roc_auc([3, 5, 5], [1, 5, 2]) == pytest.approx(7 / 9)
  assert evaluate.roc_auc([4, 5], [1, 2, 3]) == 1.0
  assert evaluate.roc_auc([1], [4, 5]) == 0.0
  assert evaluate.roc_auc([0, 0], [0, 0, 0]) == 0.5
  rng = np.random.default_rng(0)
  positives, negatives = rng.integers(0, 8, 40), rng.integers(0, 6, 30)
  pairwise = (positives[:, None] > negatives[None]) + 0.5 * (positives[:, None] == negatives[None])
  assert evaluate.roc_auc(positives, negatives) == pytest.approx(pairwise.mean())
  with pytest.raises(ValueError, match='both sides'):
    evaluate.roc_auc([], [1])
  with pytest.raises(ValueError, match='NaN'):
    evaluate.roc_auc([np.nan], [1])


def test_pair_scores_verifies_pairs_extracts_each_image_once_and_counts_unreadable_ones():
  base = textured_image(5, 240, 320)
  warped = cv2.warpAffine(base, AFFINE, (320, 240))
  other = textured_image(6, 240, 320)
  images_by_key = {'base': base, 'warped': warped, 'other': other}
  extracted = []

  def backend(image):
    extracted.append(image.shape)
    return sift.extract_sift(image, max_features=500)

  def load(key):
    if key not in images_by_key:
      raise OSError(f'no such image: {key}')
    return images_by_key[key]

  result = evaluate.pair_scores(backend, [('base', 'warped'), ('base', 'other'),
                                          ('warped', 'missing'), ('other', 'warped')],
                                load_image=load)
  assert result.valid.tolist() == [True, True, False, True]
  assert result.inliers[0] > 50 and result.inliers[1] < 10 and result.inliers[3] < 10
  assert result.inliers[2] == 0 and list(result.failures) == ['missing']
  assert len(extracted) == 3


def write_layout(root, train_rows, solution_rows):
  """train.csv, test.csv and recognition_solution.csv (no images) in the Kaggle layout."""
  with open(root / 'train.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('id', 'url', 'landmark_id')] + [(i, '', l) for i, l in train_rows])
  with open(root / 'test.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('id', 'url')] + [(i, '') for i, _ in solution_rows])
  with open(root / 'recognition_solution.csv', 'w', newline='') as f:
    csv.writer(f).writerows([('id', 'landmarks', 'Usage')] +
                            [(i, landmarks, 'Public') for i, landmarks in solution_rows])


def test_make_pairs_builds_every_kind_from_the_csvs(tmp_path):
  write_layout(tmp_path, [('a1', 1), ('a2', 1), ('a3', 1), ('b1', 2), ('b2', 2)],
               [('qa', '1'), ('qn', ''), ('qx', '7')])
  pairs, skipped = evaluate.make_pairs(str(tmp_path), max_pairs_per_kind=0)
  name = lambda path: os.path.basename(path)[:-4]
  named = {kind: {(name(a), name(b)) for a, b in kind_pairs} for kind, kind_pairs in pairs.items()}
  assert named['same_landmark'] == {('a1', 'a2'), ('a1', 'a3'), ('a2', 'a3'), ('b1', 'b2')}
  assert len(named['different_landmark']) == 6
  assert named['query_same_landmark'] == {('qa', 'a1'), ('qa', 'a2'), ('qa', 'a3')}
  # 'qx' shows a landmark without train images: neither a positive nor a no-landmark query.
  assert named['no_landmark_query'] == {('qn', t) for t in ('a1', 'a2', 'a3', 'b1', 'b2')}
  assert skipped == 0
  sampled, _ = evaluate.make_pairs(str(tmp_path), max_pairs_per_kind=2, seed=1)
  assert [len(sampled[kind]) for kind in sampled] == [2, 2, 2, 2]
  assert set(sampled['different_landmark']) <= set(pairs['different_landmark'])


def test_make_pairs_reports_a_broken_solution_file_in_one_line(tmp_path):
  write_layout(tmp_path, [('a1', 1), ('a2', 1)], [('q1', '1')])
  (tmp_path / 'recognition_solution.csv').write_text('id,landmarks,Usage\n../etc,1,Public\n')
  with pytest.raises(evaluate.EvaluationError, match='line 2'):
    evaluate.make_pairs(str(tmp_path))


def test_make_pairs_of_a_test_csv_with_only_a_header_gives_the_train_pairs(tmp_path):
  write_layout(tmp_path, [('a1', 1), ('a2', 1), ('b1', 2)], [])
  (tmp_path / 'recognition_solution.csv').unlink()  # No queries: nothing to look up in it.
  pairs, skipped = evaluate.make_pairs(str(tmp_path), max_pairs_per_kind=0)
  assert [len(pairs[kind]) for kind in evaluate.POSITIVE_KINDS + evaluate.NEGATIVE_KINDS] == \
      [1, 0, 2, 0]
  assert skipped == 0


def _write_pairs(path, text):
  path.write_text(text)
  return str(path)


def test_read_pairs_takes_a_listed_verification_set(tmp_path):
  listed = _write_pairs(tmp_path / 'pairs.csv',
                        'id_a,id_b,same\na1,a2,1\na1,b1,0\n\n b2 , a2 , 0 \nc1,c2,1\n')
  pairs = evaluate.read_pairs(listed, str(tmp_path / 'data'), max_pairs_per_kind=0)
  image = lambda image_id: str(tmp_path / 'data' / 'images' / f'{image_id}.jpg')
  assert pairs == {'same_landmark': [(image('a1'), image('a2')), (image('c1'), image('c2'))],
                   'different_landmark': [(image('a1'), image('b1')), (image('b2'), image('a2'))]}
  sampled = evaluate.read_pairs(listed, str(tmp_path), max_pairs_per_kind=1, seed=0)
  assert [len(kind_pairs) for kind_pairs in sampled.values()] == [1, 1]


@pytest.mark.parametrize('row,message', [
    ('../etc/passwd,a2,1', r"line 3: id_a '../etc/passwd' is not an image id"),
    ('a1,,1', "line 3: id_b '' is not an image id"),
    ('a1,a3,yes', "line 3: same must be 1 \\(same landmark\\) or 0, got 'yes'"),
    ('a1,a3', "line 3: same must be 1 \\(same landmark\\) or 0, got ''"),
    ('a1,a3,1,x', 'line 3: more fields than the 3 columns id_a,id_b,same'),
    ('a3,a3,1', 'line 3: pairs a3 with itself'),
    ('a2,a1,0', 'line 3: the pair of line 2 again'),
])
def test_read_pairs_refuses_a_bad_row_by_its_line(tmp_path, row, message):
  listed = _write_pairs(tmp_path / 'pairs.csv', f'id_a,id_b,same\na1,a2,1\n{row}\n')
  with pytest.raises(evaluate.EvaluationError, match=message):
    evaluate.read_pairs(listed, str(tmp_path))


def test_read_pairs_needs_its_columns(tmp_path):
  listed = _write_pairs(tmp_path / 'pairs.csv', 'a,b,same\na1,a2,1\n')
  with pytest.raises(csv_io.CsvError, match='missing column\\(s\\) id_a, id_b'):
    evaluate.read_pairs(listed, str(tmp_path))


SMALL_WORLD = synthetic.WorldSpec(seed=5, num_landmarks=4, num_unseen_landmarks=1,
                                  num_train_images=16, num_test_images=8,
                                  non_landmark_fraction=0.5, unseen_landmark_fraction=0.0)


@pytest.fixture(scope='module')
def small_world(tmp_path_factory):
  root = tmp_path_factory.mktemp('world')
  synthetic.generate(str(root), SMALL_WORLD)
  return root


def test_sift_separates_same_landmark_pairs_on_a_small_synthetic_world(small_world):
  pairs, _ = evaluate.make_pairs(str(small_world), max_pairs_per_kind=25, seed=0)
  backend = evaluate.BACKENDS['sift'](1000, None)
  scores = {kind: evaluate.pair_scores(backend, kind_pairs).inliers
            for kind, kind_pairs in pairs.items()}
  negatives = np.concatenate([scores[kind] for kind in evaluate.NEGATIVE_KINDS])
  assert len(scores['same_landmark']) >= 10 and len(negatives) >= 40
  assert evaluate.roc_auc(scores['same_landmark'], negatives) >= 0.95


def run_evaluate(*args):
  return subprocess.run([sys.executable, '-m', 'tf_landmarks.cli.evaluate_pairs', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2'})


def test_the_command_prints_distributions_and_aucs_and_fails_in_one_line(small_world, tmp_path):
  done = run_evaluate('--backend=sift', f'--data_dir={small_world}', '--max_pairs_per_kind=10',
                      '--inlier_threshold=10')
  assert done.returncode == 0, done.stderr
  for kind in evaluate.POSITIVE_KINDS + evaluate.NEGATIVE_KINDS:
    assert kind in done.stdout
  assert 'ROC AUC same_landmark vs all negatives: ' in done.stdout
  assert 'accepted at >=  10 inliers' in done.stdout
  failed = run_evaluate(f'--data_dir={tmp_path}')
  assert failed.returncode == 2
  assert failed.stderr.strip().splitlines()[-1].startswith('evaluate_pairs.py: error: ')
  assert 'Traceback' not in failed.stderr


def test_a_folder_whose_test_csv_has_only_a_header_scores_its_train_pairs(small_world,
                                                                         tmp_path):
  world = tmp_path / 'world'
  shutil.copytree(small_world, world)
  (world / 'test.csv').write_text('id,url\n')
  evaluation = evaluate.evaluate_folder(str(world), evaluate.BACKENDS['sift'](500, None),
                                        evaluate.VerifySettings(), max_pairs_per_kind=5, seed=0)
  assert {kind: len(scores) for kind, scores in evaluation.scores.items()} == {
      'same_landmark': 5, 'query_same_landmark': 0, 'different_landmark': 5,
      'no_landmark_query': 0}


def test_the_command_scores_the_pairs_of_a_csv(small_world, tmp_path):
  with open(small_world / 'train.csv', newline='') as f:
    train = [(row['id'], row['landmark_id']) for row in csv.DictReader(f)]
  same = [(a, b) for (a, la), (b, lb) in zip(train, train[1:]) if la == lb][:6]
  different = [(a, b) for (a, la), (b, lb) in zip(train, train[1:]) if la != lb][:6]
  assert len(same) >= 3 and len(different) >= 3
  rows = [f'{a},{b},1' for a, b in same] + [f'{a},{b},0' for a, b in different]
  (tmp_path / 'pairs.csv').write_text('id_a,id_b,same\n' + '\n'.join(rows) + '\n')
  done = run_evaluate('--backend=sift', f'--data_dir={small_world}',
                      f'--pairs_csv={tmp_path / "pairs.csv"}', '--inlier_threshold=10')
  assert done.returncode == 0, done.stderr
  assert f'same_landmark        {len(same):>6}  median' in done.stdout
  assert f'different_landmark   {len(different):>6}  median' in done.stdout
  assert 'ROC AUC same_landmark vs all negatives: ' in done.stdout
  assert 'query_same_landmark' not in done.stdout and 'no_landmark_query' not in done.stdout


def test_delf_backend_needs_a_finished_delf_run(tmp_path):
  with pytest.raises(evaluate.EvaluationError, match='--backend=delf needs --delf_run'):
    evaluate.BACKENDS['delf'](1000, None, None)
  with pytest.raises(runs.RunError, match='is not a finished training run'):
    evaluate.BACKENDS['delf'](1000, None, str(tmp_path))
