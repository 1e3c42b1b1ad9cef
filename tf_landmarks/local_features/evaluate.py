r"""How well a local-feature backend tells same-landmark pairs from the rest, by inlier count.

Each pair of images is scored by geometric verification (putative matches, then a robust affine fit;
the score is the inlier count), and the scores of pairs that show the same landmark are compared
with those that do not, as a ROC AUC: the chance that a random positive pair outscores a random
negative one.

Pair kinds built from a folder in the Google Landmarks layout (`train.csv`, `test.csv`,
`recognition_solution.csv`, `images/<id>.jpg`):

  same_landmark        positive  two train images of one landmark
  query_same_landmark  positive  a landmark query and a train image of its landmark
  different_landmark   negative  two train images of different landmarks
  no_landmark_query    negative  a query whose solution lists no landmark, and a train image

The headline AUC is same_landmark against both negative kinds; query_same_landmark (new viewpoints,
as a recognition query would be) is reported beside it. A test.csv with a header and no rows gives
no query pairs (recognition_solution.csv is then not read). Alternatively the pairs are listed
(`read_pairs`): a CSV `id_a,id_b,same` naming images of `images/`, same 1 for a same_landmark pair
and 0 for a different_landmark one, e.g. a verification set of one's own. Kinds with more pairs
than --max_pairs_per_kind are sampled with --seed.

The command: `python -m tf_landmarks.cli.evaluate_pairs` (tf_landmarks/cli/evaluate_pairs.py).
"""

import csv
import dataclasses
import functools
import io
import itertools
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
import tensorflow as tf

from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import images
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import match
from tf_landmarks.local_features import ransac
from tf_landmarks.local_features import sift

FeatureFn = Callable[[np.ndarray], LocalFeatures]

POSITIVE_KINDS = ('same_landmark', 'query_same_landmark')
NEGATIVE_KINDS = ('different_landmark', 'no_landmark_query')

# Every train image is paired with every other, so the pair lists grow with the square of this;
# the evaluator is meant for small labelled sets, not for a full index.
MAX_TRAIN_IMAGES = 2000


class EvaluationError(errors.UserError):
  """The data folder cannot be evaluated; the message says why."""


@dataclasses.dataclass(frozen=True)
class VerifySettings:
  """How a pair is verified: putative matching (match.py), then the affine fit (ransac.py).

  The defaults: ratio 0.8 with the mutual check. Without the mutual check, many query features
  can pile onto a few index features, and an affine map that squeezes a whole region onto that
  spot scores dozens of inliers on unrelated photos (up to 54 between a non-landmark query and a
  landmark of the real-photo set, against at most 6 with it; that set's ROC AUC goes from 0.92
  to 0.94 with SIFT, the synthetic set's stays at 0.998–0.999).

  Attributes:
    ratio: Lowe's ratio test, or None.
    max_distance: descriptor distance bound, or None.
    mutual: keep only mutual nearest neighbours.
    residual_threshold: inlier distance in pixels.
    max_trials: most RANSAC samples.
    method: 'ransac' or 'usac'.
    seed: RANSAC seed.
  """
  ratio: Optional[float] = 0.8
  max_distance: Optional[float] = None
  mutual: bool = True
  residual_threshold: float = 10.0
  max_trials: int = 1000
  method: str = 'ransac'
  seed: int = 0


def verify_pair(query: LocalFeatures, index: LocalFeatures,
                settings: VerifySettings = VerifySettings()
                ) -> Tuple[np.ndarray, ransac.Verification]:
  """Matches two feature sets and verifies the matches; returns (matches, Verification)."""
  matches = match.putative_matches(query, index, max_distance=settings.max_distance,
                                   ratio=settings.ratio, mutual=settings.mutual)
  verification = ransac.verify(query.locations, index.locations, matches,
                               residual_threshold=settings.residual_threshold,
                               max_trials=settings.max_trials, seed=settings.seed,
                               method=settings.method)
  return matches, verification


def load_rgb(path: str) -> np.ndarray:
  """Reads an image file (local or gs://…) as uint8 RGB, upright by its EXIF orientation.

  Raises:
    images.ImageError, OSError, PIL errors: the file is missing, too large or not an image.
  """
  with Image.open(io.BytesIO(images.read_bytes(path))) as image:
    return np.asarray(ImageOps.exif_transpose(image).convert('RGB'))


# What reading or decoding one bad image can raise; such an image costs its pairs, not the run.
_IMAGE_ERRORS = (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class PairScores:
  """Inlier counts of a list of pairs.

  Attributes:
    inliers: int64 [P], the inlier count of each pair (0 where `valid` is False).
    valid: bool [P], False for pairs with an image that could not be read.
    failures: image key → one-line reason, for every image that could not be read.
  """
  inliers: np.ndarray
  valid: np.ndarray
  failures: Dict[str, str]


def pair_scores(backend_fn: FeatureFn, pairs: Sequence[Tuple[str, str]], *,
                load_image: Callable[[str], np.ndarray] = load_rgb,
                settings: VerifySettings = VerifySettings()) -> PairScores:
  """Verifies every (query, index) pair and returns its inlier count.

  Each image's features are extracted once, however many pairs it is in.

  Args:
    backend_fn: image (uint8 RGB) → LocalFeatures.
    pairs: (query key, index key) pairs; keys are what `load_image` takes (paths by default).
    load_image: key → uint8 RGB image.
    settings: matching and verification settings.

  Returns:
    The PairScores, in the order of `pairs`.
  """
  features: Dict[str, Optional[LocalFeatures]] = {}
  failures: Dict[str, str] = {}

  def features_of(key: str) -> Optional[LocalFeatures]:
    if key not in features:
      try:
        features[key] = backend_fn(load_image(key))
      except _IMAGE_ERRORS as error:
        failures[key] = f'{type(error).__name__}: {error}'.splitlines()[0]
        features[key] = None
    return features[key]

  inliers = np.zeros(len(pairs), np.int64)
  valid = np.zeros(len(pairs), bool)
  for row, (query_key, index_key) in enumerate(pairs):
    query, index = features_of(query_key), features_of(index_key)
    if query is None or index is None:
      continue
    inliers[row] = verify_pair(query, index, settings)[1].num_inliers
    valid[row] = True
  return PairScores(inliers, valid, failures)


def roc_auc(positive_scores: Sequence[float], negative_scores: Sequence[float]) -> float:
  """Area under the ROC curve: P(positive score > negative score) + ½·P(equal).

  This is the Mann-Whitney U statistic over n_pos·n_neg, so tied scores (common with inlier
  counts: many negatives score 0) count one half, as a threshold cannot separate them.

  Args:
    positive_scores: scores of the pairs that should score high.
    negative_scores: scores of the pairs that should score low.

  Returns:
    The AUC in [0, 1].

  Raises:
    ValueError: either side is empty or holds a NaN.
  """
  positives = np.asarray(positive_scores, np.float64).ravel()
  negatives = np.sort(np.asarray(negative_scores, np.float64).ravel())
  if not len(positives) or not len(negatives):
    raise ValueError(f'roc_auc needs scores on both sides, got {len(positives)} positive and '
                     f'{len(negatives)} negative')
  if np.isnan(positives).any() or np.isnan(negatives).any():
    raise ValueError('roc_auc scores must not be NaN')
  below = np.searchsorted(negatives, positives, side='left')
  equal = np.searchsorted(negatives, positives, side='right') - below
  return float((below.sum() + 0.5 * equal.sum()) / (len(positives) * len(negatives)))


def _read_solution(path: str) -> Dict[str, List[int]]:
  """query id → landmark ids from a recognition_solution.csv (empty list: no landmark)."""
  solution = {}
  with tf.io.gfile.GFile(path, 'r') as f:
    reader = csv.DictReader(f)
    if not reader.fieldnames or not {'id', 'landmarks'} <= set(reader.fieldnames):
      raise EvaluationError(f'{path}: needs the columns id and landmarks')
    for line, row in enumerate(reader, start=2):
      query_id, landmarks = (row.get('id') or '').strip(), (row.get('landmarks') or '').split()
      plain_numbers = all(part.isascii() and part.isdigit() for part in landmarks)
      if not csv_io.is_safe_image_id(query_id) or not plain_numbers:
        raise EvaluationError(f'{path}, line {line}: not an id and landmark ids: '
                              f'{query_id[:40]!r}, {" ".join(landmarks)[:40]!r}')
      solution[query_id] = [int(part) for part in landmarks]
  return solution


def _sample(pairs: List[Tuple[str, str]], limit: int, rng: np.random.Generator):
  if limit <= 0 or len(pairs) <= limit:
    return pairs
  return [pairs[i] for i in sorted(rng.choice(len(pairs), size=limit, replace=False))]


def make_pairs(data_dir: str, max_pairs_per_kind: int = 2000,
               seed: int = 0) -> Tuple[Dict[str, List[Tuple[str, str]]], int]:
  """The pairs of each kind (see the module docstring) as image paths.

  Args:
    data_dir: folder with train.csv, test.csv, recognition_solution.csv and images/.
    max_pairs_per_kind: sample kinds with more pairs down to this many; 0 keeps all.
    seed: seed of the sampling.

  Returns:
    kind → (query path, index path) pairs, and the number of unusable CSV rows skipped.

  Raises:
    EvaluationError, csv_io.CsvError: a file is missing or unusable, or the set is too large.
  """
  train, skipped_train = csv_io.read_train_csv(files.join(data_dir, 'train.csv'))
  queries, skipped_queries = csv_io.read_test_csv(files.join(data_dir, 'test.csv'),
                                                  allow_empty=True)
  # Without queries the train pairs are the whole evaluation and there is nothing to look up.
  solution = _read_solution(files.join(data_dir, 'recognition_solution.csv')) if queries else {}
  if len(train) > MAX_TRAIN_IMAGES:
    raise EvaluationError(f'{len(train)} train images: this evaluator pairs them all, so it takes '
                          f'at most {MAX_TRAIN_IMAGES}')
  path = lambda image_id: files.join(data_dir, 'images', f'{image_id}.jpg')
  by_landmark: Dict[int, List[str]] = {}
  for row in train:
    by_landmark.setdefault(row.landmark_id, []).append(row.image_id)
  kinds: Dict[str, List[Tuple[str, str]]] = {kind: [] for kind in POSITIVE_KINDS + NEGATIVE_KINDS}
  for first, second in itertools.combinations(train, 2):
    kind = 'same_landmark' if first.landmark_id == second.landmark_id else 'different_landmark'
    kinds[kind].append((path(first.image_id), path(second.image_id)))
  unlabelled = 0
  for query in queries:
    if query.image_id not in solution:
      unlabelled += 1
      continue
    landmarks = solution[query.image_id]
    if not landmarks:
      kinds['no_landmark_query'].extend((path(query.image_id), path(row.image_id)) for row in train)
    for landmark in landmarks:
      kinds['query_same_landmark'].extend(
          (path(query.image_id), path(image_id)) for image_id in by_landmark.get(landmark, ()))
  rng = np.random.default_rng(seed)
  sampled = {kind: _sample(pairs, max_pairs_per_kind, rng) for kind, pairs in kinds.items()}
  return sampled, len(skipped_train) + len(skipped_queries) + unlabelled


PAIR_COLUMNS = ('id_a', 'id_b', 'same')


def read_pairs(pairs_csv: str, data_dir: str, max_pairs_per_kind: int = 2000,
               seed: int = 0) -> Dict[str, List[Tuple[str, str]]]:
  """The pairs listed in a CSV `id_a,id_b,same`, as image paths `<data_dir>/images/<id>.jpg`.

  The file is untrusted: every row must name two different images by safe ids (no path) and say
  `same` 1 (same landmark) or 0 (different landmarks), each pair once in either order.

  Args:
    pairs_csv: the CSV.
    data_dir: the folder whose images/ holds the images.
    max_pairs_per_kind: sample kinds with more pairs down to this many; 0 keeps all.
    seed: seed of the sampling.

  Returns:
    'same_landmark' and 'different_landmark' → (path, path) pairs, in file order.

  Raises:
    EvaluationError, csv_io.CsvError: the file is missing, unreadable or lacks a column, or a row
      is unusable (named by its line).
  """
  path = lambda image_id: files.join(data_dir, 'images', f'{image_id}.jpg')
  kinds: Dict[str, List[Tuple[str, str]]] = {'same_landmark': [], 'different_landmark': []}
  lines: Dict[frozenset, int] = {}
  for line, row in csv_io.open_rows(pairs_csv, PAIR_COLUMNS):
    where = f'{pairs_csv}, line {line}'
    if row.get(None):
      raise EvaluationError(f'{where}: more fields than the {len(PAIR_COLUMNS)} columns '
                            f'{",".join(PAIR_COLUMNS)}')
    ids = [(row[column] or '').strip() for column in ('id_a', 'id_b')]
    for column, image_id in zip(('id_a', 'id_b'), ids):
      if not csv_io.is_safe_image_id(image_id):
        raise EvaluationError(f'{where}: {column} {csv_io.quoted(image_id)} is not an image id '
                              '(letters, digits, _ - . and no path)')
    same = (row['same'] or '').strip()
    if same not in ('0', '1'):
      raise EvaluationError(f'{where}: same must be 1 (same landmark) or 0, got '
                            f'{csv_io.quoted(same)}')
    if ids[0] == ids[1]:
      raise EvaluationError(f'{where}: pairs {ids[0]} with itself')
    # Listed twice, a pair would count twice in the AUC.
    pair = frozenset(ids)
    if pair in lines:
      raise EvaluationError(f'{where}: the pair of line {lines[pair]} again')
    lines[pair] = line
    kinds['same_landmark' if same == '1' else 'different_landmark'].append(
        (path(ids[0]), path(ids[1])))
  rng = np.random.default_rng(seed)
  return {kind: _sample(pairs, max_pairs_per_kind, rng) for kind, pairs in kinds.items()}


def _sift_backend(max_features: int, max_side: Optional[int],
                  delf_run: Optional[str] = None) -> FeatureFn:
  del delf_run  # SIFT needs no model.
  return functools.partial(sift.extract_sift, max_features=max_features, max_side=max_side)


def _delf_backend(max_features: int, max_side: Optional[int],
                  delf_run: Optional[str] = None) -> FeatureFn:
  """DELF features from the model.keras of a `tfl-train --mode=delf` run."""
  if not delf_run:
    raise EvaluationError('--backend=delf needs --delf_run=<run of tfl-train --mode=delf>')
  # Heavy; the SIFT path does not need them.
  from tf_landmarks import runs  # pylint: disable=g-import-not-at-top
  from tf_landmarks.local_features import delf  # pylint: disable=g-import-not-at-top
  from tf_landmarks.models import delf as delf_model  # pylint: disable=g-import-not-at-top
  model = runs.load_delf_run(delf_run).load_model(delf_model.DelfModel)
  return delf.DelfExtractor(model, max_feature_num=max_features,
                            **({'max_side': max_side} if max_side else {}))


# --backend name → factory(max_features, max_side, delf_run) of the image → LocalFeatures function.
BACKENDS: Mapping[str, Callable[..., FeatureFn]] = {'sift': _sift_backend, 'delf': _delf_backend}


def distribution_line(kind: str, scores: np.ndarray) -> str:
  """'kind  pairs  median  quartiles  max' of one kind's inlier counts."""
  if not len(scores):
    return f'{kind:<20} {0:>6}  (no pairs)'
  q1, median, q3 = np.percentile(scores, [25, 50, 75])
  return (f'{kind:<20} {len(scores):>6}  median {median:6.1f}  quartiles {q1:6.1f}–{q3:<6.1f}'
          f'  max {scores.max():5d}')


def report_lines(scores: Mapping[str, np.ndarray],
                 inlier_thresholds: Sequence[int] = ()) -> List[str]:
  """The inlier distributions of every kind, the ROC AUCs, and accept rates at given thresholds.

  Args:
    scores: pair kind (of POSITIVE_KINDS and NEGATIVE_KINDS) → inlier counts.
    inlier_thresholds: for each, the share of positive and of negative pairs with at least that
      many inliers (what `ransac.accept` would accept).

  Returns:
    Printable lines.
  """
  lines = ['inliers per pair kind:'] + [f'  {distribution_line(kind, values)}'
                                        for kind, values in scores.items()]
  # Listed pairs (`read_pairs`) have no query kinds.
  positive_kinds = [kind for kind in POSITIVE_KINDS if kind in scores]
  negative_kinds = [kind for kind in NEGATIVE_KINDS if kind in scores]
  positives = np.concatenate([scores[kind] for kind in positive_kinds])
  negatives = np.concatenate([scores[kind] for kind in negative_kinds])
  for positive in positive_kinds:
    if not len(scores[positive]) or not len(negatives):
      lines.append(f'ROC AUC {positive}: no pairs on one side')
      continue
    parts = [f'{kind} {roc_auc(scores[positive], scores[kind]):.3f}'
             for kind in negative_kinds if len(scores[kind])]
    lines.append(f'ROC AUC {positive} vs all negatives: '
                 f'{roc_auc(scores[positive], negatives):.3f} ({", ".join(parts)})')
  if len(positives) and len(negatives):
    for threshold in inlier_thresholds:
      lines.append(f'accepted at >= {threshold:3d} inliers: {np.mean(positives >= threshold):6.1%} '
                   f'of positive pairs, {np.mean(negatives >= threshold):6.1%} of negative pairs')
  return lines


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The inlier counts of every pair kind of a folder, and what could not be used.

  Attributes:
    scores: pair kind → inlier counts of its usable pairs.
    skipped_rows: CSV rows that could not be used.
    failures: image id → why it could not be read.
  """
  scores: Dict[str, np.ndarray]
  skipped_rows: int
  failures: Mapping[str, str]


def evaluate_folder(data_dir: str, backend_fn: FeatureFn, settings: VerifySettings,
                    max_pairs_per_kind: int, seed: int,
                    pairs_csv: Optional[str] = None) -> Evaluation:
  """Scores every pair kind of `data_dir` (see the module docstring) with one backend.

  Args:
    data_dir: the folder in the Google Landmarks layout (only images/ with `pairs_csv`).
    backend_fn: image (uint8 RGB) → LocalFeatures.
    settings: matching and verification settings.
    max_pairs_per_kind: sample kinds with more pairs down to this many; 0 keeps all.
    seed: seed of the sampling.
    pairs_csv: score the pairs this CSV lists (`read_pairs`) instead of those the folder's CSVs
      give.

  Raises:
    EvaluationError, csv_io.CsvError: the folder or the pair list is unusable, or it gives no
      positive or no negative pairs.
  """
  pairs, skipped_rows = ((read_pairs(pairs_csv, data_dir, max_pairs_per_kind, seed), 0)
                         if pairs_csv else make_pairs(data_dir, max_pairs_per_kind, seed))
  kinds = list(pairs)
  result = pair_scores(backend_fn, [pair for kind in kinds for pair in pairs[kind]],
                       settings=settings)
  scores, start = {}, 0
  for kind in kinds:
    stop = start + len(pairs[kind])
    scores[kind] = result.inliers[start:stop][result.valid[start:stop]]
    start = stop
  evaluation = Evaluation(scores, skipped_rows, result.failures)
  if not any(len(scores.get(kind, ())) for kind in POSITIVE_KINDS) or \
      not any(len(scores.get(kind, ())) for kind in NEGATIVE_KINDS):
    raise EvaluationError(f'{pairs_csv or data_dir}: no positive or no negative pairs to compare')
  return evaluation
