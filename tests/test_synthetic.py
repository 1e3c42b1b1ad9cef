"""The synthetic world: determinism, Kaggle layout, test-split composition, RANSAC meaningfulness."""

import collections
import csv
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from tf_landmarks import synthetic
from helpers import REPO

SMALL = synthetic.WorldSpec(seed=3, num_landmarks=10, num_unseen_landmarks=3, num_train_images=60,
                            num_test_images=30, image_size=96)


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('world')
  synthetic.generate(str(root), SMALL)
  return root


def test_same_seed_gives_identical_files_other_seed_differs(world, tmp_path):
  synthetic.generate(str(tmp_path / 'again'), SMALL)
  for name in ('train.csv', 'test.csv', 'recognition_solution.csv', 'retrieval_solution.csv'):
    assert (world / name).read_bytes() == (tmp_path / 'again' / name).read_bytes()
  for row in _rows(world / 'train.csv')[:10]:
    assert (world / 'images' / f'{row["id"]}.jpg').read_bytes() == \
        (tmp_path / 'again' / 'images' / f'{row["id"]}.jpg').read_bytes()
  other = synthetic.WorldSpec(**{**SMALL.__dict__, 'seed': 4})
  synthetic.generate(str(tmp_path / 'other'), other)
  assert (world / 'train.csv').read_bytes() != (tmp_path / 'other' / 'train.csv').read_bytes()


def test_kaggle_layout(world):
  train, test = _rows(world / 'train.csv'), _rows(world / 'test.csv')
  assert list(train[0]) == ['id', 'url', 'landmark_id'] and list(test[0]) == ['id', 'url']
  assert list(_rows(world / 'recognition_solution.csv')[0]) == ['id', 'landmarks', 'Usage']
  assert list(_rows(world / 'retrieval_solution.csv')[0]) == ['id', 'images', 'Usage']
  ids = [row['id'] for row in train + test]
  assert len(ids) == len(set(ids)) == 90
  for image_id in ids:
    assert re.fullmatch(r'[0-9a-f]{16}', image_id)
    image = Image.open(world / 'images' / f'{image_id}.jpg')
    assert image.mode == 'RGB' and max(image.size) == 96 and image.format == 'JPEG'
  assert all(row['url'].startswith('https://') and row['id'] in row['url'] for row in train)


def test_solutions_are_consistent_with_train(world):
  train = _rows(world / 'train.csv')
  landmark_of = {row['id']: row['landmark_id'] for row in train}
  recognition = {row['id']: row for row in _rows(world / 'recognition_solution.csv')}
  assert set(recognition) == {row['id'] for row in _rows(world / 'test.csv')}
  # Both leaderboards have queries of training landmarks: Google's scoring divides by their number.
  assert {row['Usage'] for row in recognition.values() if row['landmarks']} == {'Public', 'Private'}
  # Retrieval lists every test image as GLDv2 does: one without relevant images is None, Ignored.
  retrieval = _rows(world / 'retrieval_solution.csv')
  assert [row['id'] for row in retrieval] == sorted(recognition)
  for row in retrieval:
    landmark = recognition[row['id']]['landmarks']
    if landmark:
      expected = sorted(i for i, l in landmark_of.items() if l == landmark)
      assert row['images'].split() == expected
      assert row['Usage'] == recognition[row['id']]['Usage']
    else:
      assert (row['images'], row['Usage']) == ('None', 'Ignored')


def test_test_split_composition_and_long_tail():
  train, queries = synthetic.plan_world(synthetic.WorldSpec())
  kinds = collections.Counter(query.kind for query in queries)
  assert kinds['none'] / len(queries) >= 0.3
  assert kinds['unseen'] > 0 and kinds['known'] > 0
  assert all(q.landmark >= 24 for q in queries if q.kind == 'unseen')
  sizes = collections.Counter(landmark for _, landmark, _ in train)
  assert len(sizes) == 24 and min(sizes.values()) >= 1
  assert sum(size <= 2 for size in sizes.values()) >= 3
  assert max(sizes.values()) >= 10 * min(sizes.values())


def test_unseen_and_non_landmark_queries_have_no_ground_truth(tmp_path):
  spec = synthetic.WorldSpec(seed=1, num_landmarks=4, num_unseen_landmarks=2, num_train_images=8,
                             num_test_images=20, image_size=64)
  synthetic.generate(str(tmp_path), spec)
  _, queries = synthetic.plan_world(spec)
  recognition = {row['id']: row['landmarks'] for row in _rows(tmp_path / 'recognition_solution.csv')}
  train_landmarks = {row['landmark_id'] for row in _rows(tmp_path / 'train.csv')}
  for query in queries:
    assert (recognition[query.image_id] == '') == (query.kind != 'known')
    if query.kind == 'known':
      assert recognition[query.image_id] in train_landmarks


def _inliers(first, second, sift):
  """RANSAC homography inliers of SIFT matches (Lowe ratio 0.8) between two RGB images."""
  kp1, d1 = sift.detectAndCompute(cv2.cvtColor(first, cv2.COLOR_RGB2GRAY), None)
  kp2, d2 = sift.detectAndCompute(cv2.cvtColor(second, cv2.COLOR_RGB2GRAY), None)
  if d1 is None or d2 is None or len(kp1) < 2 or len(kp2) < 2:
    return 0
  pairs = cv2.BFMatcher().knnMatch(d1, d2, k=2)
  good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
  if len(good) < 4:
    return 0
  _, mask = cv2.findHomography(np.float32([kp1[m.queryIdx].pt for m in good]),
                               np.float32([kp2[m.trainIdx].pt for m in good]), cv2.RANSAC, 5.0)
  return 0 if mask is None else int(mask.sum())


def test_views_of_one_landmark_verify_geometrically_others_do_not():
  sift = cv2.SIFT_create()
  noise = synthetic._Noise(0, 256)  # pylint: disable=protected-access
  landmarks = [synthetic.make_landmark(7, i, i) for i in range(6)]
  view = lambda seed, landmark: synthetic.render(np.random.default_rng(seed), 256, noise, landmark)
  same, other, none = [], [], []
  for k in range(12):
    anchor = view(100 + k, landmarks[k % 6])
    same.append(_inliers(anchor, view(200 + k, landmarks[k % 6]), sift))
    other.append(_inliers(anchor, view(300 + k, landmarks[(k + 1) % 6]), sift))
    none.append(_inliers(anchor, view(400 + k, None), sift))
  assert np.median(same) >= 15
  assert np.median(same) >= 3 * max(np.median(other), np.median(none), 1)


def _run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'tf_landmarks.cli.synth', '--noprogress', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_writes_world_and_rejects_bad_flags(tmp_path):
  result = _run_cli(f'--output_dir={tmp_path / "w"}', '--num_landmarks=3', '--num_unseen_landmarks=1',
                    '--num_train_images=6', '--num_test_images=4', '--image_size=48')
  assert result.returncode == 0, result.stderr
  assert 'Wrote' in result.stdout and len(_rows(tmp_path / 'w' / 'train.csv')) == 6
  for bad in ('--num_landmarks=0', '--non_landmark_fraction=1.5', '--num_train_images=2'):
    result = _run_cli(f'--output_dir={tmp_path / "bad"}', bad)
    assert result.returncode != 0
    assert 'error' in result.stderr.lower() and 'Traceback' not in result.stderr
    assert not (tmp_path / 'bad' / 'train.csv').exists()
