r"""Geometric verification throughput against DELF's reference method, and extraction speed.

Verification: three sides interleaved over --rounds rounds (bench/timing.py), all on the SAME
RootSIFT features (--max_features per image, extracted once beforehand, untimed) of the same image
pairs: --pairs_per_kind pairs of each kind of `tf_landmarks.local_features.evaluate` (same landmark,
query of the same landmark, different landmarks, no-landmark query) from --data_dir.

  reference   DELF's method as its re-ranking and `match_images.py` do it (tensorflow/models,
              research/delf): a scipy cKDTree over the index image's descriptors queried with
              `distance_upper_bound=--distance_bound`, then `skimage.measure.ransac` with
              `AffineTransform`, min_samples=3, residual_threshold=10, max_trials=1000 (pairs with
              at most 3 putative matches score 0, as there). Written from that description here.
  ours_bound  the same putative rule (nearest neighbour within --distance_bound) with faiss, then
              OpenCV's `estimateAffine2D` RANSAC (10 px, 1000 trials, seed 0): one implementation
              of the same method against the other.
  ours        what tf-landmarks verifies with (`evaluate.VerifySettings()`): Lowe's ratio 0.8 and
              the mutual check with faiss, then the same OpenCV RANSAC.

Reported: verified pairs/s of each side as median (range), the per-round speed-ups over the
reference, agreement (the share of pairs on which a side makes the same accept/reject decision as
the reference at each --min_inliers threshold), and each side's accept rates on the positive and
on the negative pairs at those thresholds, which say who is right where they disagree.

Extraction: SIFT images/s (and CPU ms per image) on --extract_images images of --data_dir,
downscaled in memory to --extract_side px on the longer side beforehand, --rounds rounds.

--distance_bound: DELF's 0.8 is for its 40-d PCA-whitened descriptors. On 128-d RootSIFT, 0.3
keeps most true matches while 0.4 lets so many wrong ones through that 29% of the real set's
negative pairs reach 10 inliers (5% at 0.3;
`evaluate --ratio=0 --nomutual --max_distance=…`).

Usage (from the repository root; needs the `bench` extra: scipy and scikit-image):
  .venv/bin/python bench/bench_verify.py                      # the real-photo set, ~3 minutes
  .venv/bin/python bench/bench_verify.py --data_dir=/tmp/lf_synth --pairs_per_kind=100
"""

import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import cv2
import numpy as np

import timing
from tf_landmarks import errors
from tf_landmarks.local_features import evaluate
from tf_landmarks.local_features import match
from tf_landmarks.local_features import ransac
from tf_landmarks.local_features import sift

REAL_DATA = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'landmarks-real')
RESIDUAL_THRESHOLD = 10.0
MAX_TRIALS = 1000
SEED = 0

_DATA_DIR = flags.DEFINE_string('data_dir', REAL_DATA, 'Folder in the Google Landmarks layout '
                                '(train.csv, test.csv, recognition_solution.csv, images/).')
_PAIRS_PER_KIND = flags.DEFINE_integer('pairs_per_kind', 50, 'Pairs of each of the four kinds.',
                                       lower_bound=1)
_MAX_FEATURES = flags.DEFINE_integer('max_features', 1000, 'SIFT features per image.',
                                     lower_bound=1)
_DISTANCE_BOUND = flags.DEFINE_float('distance_bound', 0.3, 'Descriptor distance bound of the '
                                     'reference and ours_bound sides.', lower_bound=0.01)
_MIN_INLIERS = flags.DEFINE_multi_integer('min_inliers', [8, 10, 15], 'Accept thresholds at '
                                          'which decisions are compared (repeat the flag).')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds.', lower_bound=1)
_EXTRACT_IMAGES = flags.DEFINE_integer('extract_images', 60, 'Images timed for extraction.',
                                       lower_bound=1)
_DELF_IMAGES = flags.DEFINE_integer('delf_images', 4, 'Images timed for DELF extraction (slow on a '
                                    'CPU); 0 skips DELF.', lower_bound=0)
_DELF_BACKBONES = flags.DEFINE_list(
    'delf_backbones', ['resnet50'], 'Backbones whose DELF extraction is timed (registry names, '
    'e.g. resnet50,efficientnet_lite0).')
_EXTRACT_SIDE = flags.DEFINE_integer('extract_side', 512, 'Longer side of the images timed for '
                                     'extraction.', lower_bound=16)


def reference_inliers(query, index, distance_bound: float) -> int:
  """DELF's verification of one pair: cKDTree with a distance bound, then scikit-image RANSAC."""
  from scipy import spatial  # pylint: disable=g-import-not-at-top
  from skimage import measure, transform  # pylint: disable=g-import-not-at-top
  if not len(query) or not len(index):
    return 0
  _, nearest = spatial.cKDTree(index.descriptors).query(query.descriptors,
                                                        distance_upper_bound=distance_bound)
  # The tree reports a missing neighbour as the row past the end.
  found = nearest != len(index)
  if found.sum() <= ransac.MINIMAL_SAMPLE:
    return 0
  _, inliers = measure.ransac((query.locations[found], index.locations[nearest[found]]),
                              transform.AffineTransform, min_samples=ransac.MINIMAL_SAMPLE,
                              residual_threshold=RESIDUAL_THRESHOLD, max_trials=MAX_TRIALS,
                              rng=SEED)
  return 0 if inliers is None else int(inliers.sum())


def ours_bound_inliers(query, index, distance_bound: float) -> int:
  """The same putative rule with faiss, verified with OpenCV."""
  matches = match.putative_matches(query, index, max_distance=distance_bound)
  return ransac.verify(query.locations, index.locations, matches,
                       residual_threshold=RESIDUAL_THRESHOLD, max_trials=MAX_TRIALS,
                       seed=SEED).num_inliers


def ours_inliers(query, index, settings: evaluate.VerifySettings) -> int:
  return evaluate.verify_pair(query, index, settings)[1].num_inliers


def agreement_line(name: str, ours: np.ndarray, reference: np.ndarray,
                   thresholds) -> str:
  parts = [f'>= {threshold}: {np.mean((ours >= threshold) == (reference >= threshold)):.1%}'
           for threshold in thresholds]
  return f'  {name + " agrees with reference":<37} {", ".join(parts)}'


def bench_verification(feature_pairs, kinds, distance_bound: float, rounds: int, thresholds):
  """Times the three sides on the feature pairs; returns the report lines."""
  settings = evaluate.VerifySettings(residual_threshold=RESIDUAL_THRESHOLD,
                                     max_trials=MAX_TRIALS, seed=SEED)
  scorers = {
      'reference': lambda q, i: reference_inliers(q, i, distance_bound),
      'ours_bound': lambda q, i: ours_bound_inliers(q, i, distance_bound),
      'ours': lambda q, i: ours_inliers(q, i, settings),
  }
  scores = {}

  def side(name):
    def run():
      start = time.perf_counter()
      counts = [scorers[name](query, index) for query, index in feature_pairs]
      seconds = time.perf_counter() - start
      # Every side is deterministic (fixed seeds): each round gives the same counts.
      scores[name] = np.array(counts)
      return timing.Sample(len(feature_pairs), seconds)
    return run

  load_at_start = timing.load_note()
  samples = timing.interleave({name: side(name) for name in scorers}, rounds)
  lines = [f'verification of {len(feature_pairs)} pairs, {rounds} rounds, distance bound '
           f'{distance_bound:g}, median (range):']
  for name, side_samples in samples.items():
    rates = [sample.rate for sample in side_samples]
    lines.append(f'  {name:<37} {timing.spread(rates, digits=1, unit=" pairs/s")}')
  for name in ('ours_bound', 'ours'):
    lines.append(f'  {name + "/reference":<37} '
                 f'{timing.spread(timing.ratios(samples[name], samples["reference"]), 1, "x")}')
  for name in ('ours_bound', 'ours'):
    lines.append(agreement_line(name, scores[name], scores['reference'], thresholds))
  # Where decisions differ, the labels say which side was right.
  positive = np.isin(kinds, evaluate.POSITIVE_KINDS)
  for name in scorers:
    parts = [f'>= {threshold}: {np.mean(scores[name][positive] >= threshold):.0%}/'
             f'{np.mean(scores[name][~positive] >= threshold):.0%}' for threshold in thresholds]
    lines.append(f'  {name + " accepts positive/negative":<37} {", ".join(parts)}')
  lines.append(f'  {load_at_start} at the start, {timing.load_note()} at the end')
  return lines


def _delf_extractors(max_features: int, backbone_names):
  """DELF on each backbone's local-feature layer (random weights: the work per image does not
  depend on them), with the default 7-scale pyramid and with scale 1 only."""
  from tf_landmarks.local_features import delf  # pylint: disable=g-import-not-at-top
  from tf_landmarks.models import backbones  # pylint: disable=g-import-not-at-top
  from tf_landmarks.models import delf as delf_model  # pylint: disable=g-import-not-at-top
  extractors = {}
  for name in backbone_names:
    model = delf_model.build_delf(name, backbones.build(name, 224, 'none').model, 10)
    extractors[f'delf {name}, 7 scales'] = delf.DelfExtractor(model, max_feature_num=max_features)
    extractors[f'delf {name}, scale 1'] = delf.DelfExtractor(model, scales=(1.0,),
                                                             max_feature_num=max_features)
  return extractors


def bench_extraction(images, max_features: int, rounds: int, delf_images: int,
                     delf_backbones=('resnet50',)):
  """Times SIFT (all `images`) and DELF (the first `delf_images`) extraction; report lines."""
  def side(extract, subset):
    return lambda: timing.time_call(lambda: [extract(image) for image in subset], len(subset))

  sides = {'sift (RootSIFT)': side(lambda image: sift.extract_sift(image, max_features), images)}
  if delf_images:
    for name, extractor in _delf_extractors(max_features, delf_backbones).items():
      extractor(images[0])  # Traces the extraction graph outside the timed runs.
      sides[name] = side(extractor, images[:delf_images])
  samples = timing.interleave(sides, rounds)
  lengths = sorted({max(image.shape[:2]) for image in images})
  return [f'extraction ({lengths[0]}–{lengths[-1]} px longer side; SIFT on {len(images)} images, '
          f'DELF on {delf_images}), {max_features} features, {rounds} rounds, OpenCV on '
          f'{cv2.getNumThreads()} threads:'] + [
              f'  {name:<37} {timing.describe(samples[name])}' for name in sides]


def main(argv):
  del argv
  try:
    pairs, _ = evaluate.make_pairs(_DATA_DIR.value, _PAIRS_PER_KIND.value, seed=SEED)
  except errors.UserError as error:
    print(f'bench_verify: error: {error}', file=sys.stderr)
    return 2
  try:
    import scipy  # pylint: disable=g-import-not-at-top,unused-import
    import skimage  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print('bench_verify: error: the reference side needs scipy and scikit-image: '
          ".venv/bin/pip install -e '.[bench]'", file=sys.stderr)
    return 2
  features, images = {}, {}
  for kind_pairs in pairs.values():
    for path in {path for pair in kind_pairs for path in pair} - set(features):
      images[path] = evaluate.load_rgb(path)
      features[path] = sift.extract_sift(images[path], _MAX_FEATURES.value)
  kinds = np.array([kind for kind, kind_pairs in pairs.items() for _ in kind_pairs])
  feature_pairs = [(features[query], features[index])
                   for kind_pairs in pairs.values() for query, index in kind_pairs]
  timing.print_line(f'{os.path.normpath(_DATA_DIR.value)}: {len(features)} images, '
                    f'{_MAX_FEATURES.value} RootSIFT features each')
  timing.print_line('\n'.join(bench_verification(feature_pairs, kinds, _DISTANCE_BOUND.value,
                                                 _ROUNDS.value, _MIN_INLIERS.value)))
  side = _EXTRACT_SIDE.value
  small = []
  for image in list(images.values())[:_EXTRACT_IMAGES.value]:
    scale = side / max(image.shape[:2])
    small.append(cv2.resize(image, (max(1, round(image.shape[1] * scale)),
                                    max(1, round(image.shape[0] * scale))),
                            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR))
  timing.print_line('\n'.join(bench_extraction(small, _MAX_FEATURES.value, _ROUNDS.value,
                                                _DELF_IMAGES.value, _DELF_BACKBONES.value)))
  timing.print_line(f'  {timing.load_note()}')
  return 0


if __name__ == '__main__':
  app.run(main)
