"""Two-stage prediction: classify (or vote over neighbours), then verify with local features.

`predict(PredictConfig)` reads the queries (a test CSV + image folder, or the test shards of a
records folder), runs them through an export (`tfl-export`, opened and checked with
`exports.load`), and writes the predictions folder `tf_landmarks/predictions.py` describes into
`--output_dir`: the journal (predictions.jsonl) a re-run continues from, the Kaggle submissions,
predict.log and predict.json. One `tfl-predict` writes a folder at a time.

Recognition. The first stage proposes landmarks: `classifier` (the export's softmax), `knn` (the
landmarks of the query's nearest index images by global descriptor, each with the cosine
similarity of its nearest image: a landmark with a single index image is as reachable as a large
one) or `both` (the mean of the two, per landmark). The `--verify_top_k` best proposals are
verified: the query's local features are matched (nearest neighbours, ratio test, mutual check)
against up to `--max_verifications` index images of each landmark, nearest first by global
descriptor, and an affine RANSAC counts the inliers; a pair is accepted by `ransac.accept` (at
least `--min_inliers` inliers), and a landmark stops being checked once one of its images is. The
answer is the verified landmark with the most inliers, scored
in [1, 2) (`verified_score`), so every verified answer ranks above every unverified one. Without a
verified landmark the first stage's best is kept with a score of `--unverified_weight` × its
confidence (at most 0.1 by default): queries without a landmark, or with a landmark the index does
not hold, rarely verify, so their answers sink to the bottom of GAP's ranking, where they cost
least.

Retrieval. The query's `--retrieval_depth` nearest index images by global descriptor, the first
`--rerank` of them verified (reusing recognition's verifications): those with at least
`--min_inliers` inliers, and the index image that verified the recognised landmark wherever the
search put it, move to the front, most inliers first (`retrieval_order`). A row never lists an
image id twice.

Query images are prepared as the records build prepared the index images (long side capped at the
build's `max_image_size`, JPEG-encoded), so local features of both live at the same scale.
"""

import collections
import dataclasses
import datetime
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tqdm

from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import exports
from tf_landmarks import files
from tf_landmarks import images as images_lib
from tf_landmarks import indexes
from tf_landmarks import predictions
from tf_landmarks import records as records_lib
from tf_landmarks import schema
from tf_landmarks import settings
from tf_landmarks import submission
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.local_features import evaluate as pair_evaluation
from tf_landmarks.local_features import extractor as extractor_lib
from tf_landmarks.local_features import ransac
from tf_landmarks.settings import setting

FIRST_STAGES = ('classifier', 'knn', 'both')


class PredictError(errors.UserError):
  """Prediction cannot run as asked; the message says what to change."""


@dataclasses.dataclass
class PredictConfig:
  """Everything `predict` needs; `tfl-predict` defines one flag per field."""
  export: Optional[str] = setting(
      None, 'The export (tfl-export): classifier SavedModel, index and local-feature extractor. '
      'Verification uses the local features its index was built with (tfl-build-index '
      '--local_features=delf|sift).', required=True)
  output_dir: Optional[str] = setting(
      None, 'Where the submissions, predictions.jsonl, predict.log and predict.json go.',
      required=True, runtime=True)
  test_csv: Optional[str] = setting(
      None, 'Queries: a Kaggle test CSV (id[,url]) whose images are in --image_dir. Without it, '
      'the test split of --test_records is read.')
  image_dir: Optional[str] = setting(
      None, 'Folder of the --test_csv images (<id>.jpg, or DELF\'s nested a/b/c/<id>.jpg).')
  test_records: Optional[str] = setting(
      None, 'A records folder (tfl-build-records --test_csv) whose test split holds the queries; '
      'default: the export\'s records folder.')
  first_stage: str = setting(
      'classifier', 'Which landmarks are proposed for verification: classifier (softmax top-k), knn '
      '(the landmarks of the nearest index images by global descriptor, each scored by its '
      'nearest image\'s cosine similarity) or both (their mean).',
      choices=FIRST_STAGES)
  verify_top_k: int = setting(
      3, 'Landmarks verified per query: the first stage\'s best, then (if it proposed fewer, as '
      'the classifier gives only its top k) the index\'s other landmarks by their nearest image. '
      'The number of landmarks in the index verifies them all: then verification alone '
      'recognises.', lower=0)
  max_verifications: int = setting(
      20, 'Index images compared per verified landmark, nearest first by global descriptor.',
      lower=1)
  min_inliers: int = setting(
      15, 'RANSAC inliers that verify a pair; a landmark stops being checked at the first image '
      'that reaches it.', lower=3)
  knn_k: int = setting(20, 'Nearest index images whose landmarks the knn first stage proposes.',
                       lower=1)
  unverified_weight: float = setting(
      0.1, 'Score of an unverified answer: this times its first-stage confidence (0: such '
      'queries get no prediction).', lower=0.0, upper=1.0)
  ratio: float = setting(0.8, "Lowe's ratio test of putative matches (1: off).", lower=0.01,
                         upper=1.0)
  mutual: bool = setting(True, 'Keep only mutual nearest-neighbour matches.')
  residual_threshold: float = setting(10.0, 'RANSAC inlier distance, pixels of the stored image.',
                                      lower=0.01)
  retrieval_depth: int = setting(100, 'Index images listed per query in retrieval.csv (Kaggle '
                                 'scores 100).', lower=1, upper=submission.RETRIEVAL_DEPTH)
  rerank: int = setting(20, 'Retrieval: of the --retrieval_depth nearest index images, this many '
                        'are verified; they and the image that verified the recognised landmark '
                        'move to the front, most inliers first (0: only that image).',
                        lower=0)
  batch_size: int = setting(32, 'Queries classified per batch.', lower=1, runtime=True)
  overwrite: bool = setting(False, 'Start again in a --output_dir that holds predictions made '
                            'with other settings.', runtime=True)
  progress: bool = setting(True, 'Show a progress bar.', runtime=True)
  verify: bool = setting(False, 'Hash every file of the export before using it (by default '
                         'sizes are checked on every run, digests when the files changed since '
                         'the last full check).', runtime=True)


@dataclasses.dataclass(frozen=True)
class Query:
  """One query: its id and its prepared JPEG, or why it has none."""
  image_id: str
  jpeg: Optional[bytes]
  status: str = 'ok'


def verified_score(inliers: int, first_stage: float, min_inliers: int) -> float:
  """The score of a verified answer, in [1, 2): above every unverified one (at most 1).

  Half of it grows with the inliers (saturating: inliers / (inliers + min_inliers), at least 1/2
  for a verified pair), half with the first stage's confidence, so among verified answers the
  better supported rank first.

  Args:
    inliers: the best verification's inliers (at least `min_inliers`).
    first_stage: the first stage's confidence in the landmark, in [0, 1].
    min_inliers: the acceptance threshold.
  """
  return 1.0 + 0.5 * inliers / (inliers + min_inliers) + 0.5 * min(max(first_stage, 0.0), 1.0)


def knn_scores(similarities: np.ndarray, landmarks: np.ndarray) -> Dict[int, float]:
  """Landmark → the cosine similarity of its nearest image among the query's neighbours.

  The knn first stage's confidences. The similarity itself, not a share of votes: a share sums to
  1 over whatever is nearest, so a photo with no landmark in it gets as confident an answer as a
  landmark's photo, while its nearest similarity is low (median 0.31 against 0.86 for landmark
  queries of the real photos, EfficientNet-Lite0; BUILD_NOTES.md). A landmark with a single index
  image is as reachable as a large one.

  Args:
    similarities: [K] cosine similarities of the nearest index images, nearest first.
    landmarks: [K] their landmark ids (-1 for an empty IVF slot, ignored).

  Returns:
    landmark → similarity clipped to [0, 1] (so it compares with softmax probabilities); landmarks
    whose nearest image is not similar at all (≤ 0) are left out.
  """
  scores: Dict[int, float] = {}
  for similarity, landmark in zip(np.asarray(similarities, np.float64), landmarks):
    if landmark >= 0 and similarity > 0:
      scores[int(landmark)] = max(scores.get(int(landmark), 0.0), min(float(similarity), 1.0))
  return scores


def fuse(*proposals: Dict[int, float]) -> Dict[int, float]:
  """The mean of several landmark → confidence maps (a landmark missing from one counts 0)."""
  fused: Dict[int, float] = collections.defaultdict(float)
  for proposal in proposals:
    for landmark, confidence in proposal.items():
      fused[landmark] += confidence / len(proposals)
  return dict(fused)


def ranked(proposal: Dict[int, float]) -> List[Tuple[int, float]]:
  """(landmark, confidence) best first; ties by landmark id, so that runs repeat."""
  return sorted(proposal.items(), key=lambda item: (-item[1], item[0]))


# --- Reading queries -------------------------------------------------------------------------


# Reads the queries in order, as (image id, Query), preparing only those `wanted` accepts (the rest,
# already predicted, come as (image id, None)): one pass, and a resumed run skips their images.
QueryReader = Callable[[Callable[[str], bool]], Iterator[Tuple[str, Optional[Query]]]]


def _csv_queries(config: PredictConfig, max_side: int, jpeg_quality: int,
                 min_side: int) -> Tuple[int, QueryReader, List[csv_io.SkippedRow]]:
  """(number of queries, reader, unusable CSV rows) of --test_csv and --image_dir."""
  if not config.image_dir:
    raise PredictError('--test_csv needs --image_dir, the folder of its images')
  if not tf.io.gfile.isdir(config.image_dir):
    raise PredictError(f'--image_dir={config.image_dir} is not a folder')
  rows, skipped = csv_io.read_test_csv(config.test_csv)

  def read(wanted):
    for row in rows:
      if not wanted(row.image_id):
        yield row.image_id, None
        continue
      try:
        prepared = images_lib.prepare_image_file(
            images_lib.image_paths(config.image_dir, row.image_id), max_side=max_side,
            jpeg_quality=jpeg_quality, min_side=min_side)
      except images_lib.ImageError as error:
        yield row.image_id, Query(row.image_id, None, str(error))
        continue
      yield row.image_id, Query(row.image_id, prepared.jpeg)

  return len(rows), read, skipped


def _record_queries(records_dir: str) -> Tuple[int, QueryReader, List[csv_io.SkippedRow]]:
  """(number of queries, reader, no skipped rows) of the test split of a records folder."""
  try:
    records = records_lib.load(records_dir)
  except records_lib.RecordsError as error:
    raise PredictError(f'the query records {records_dir}: {error}') from None
  paths = records.files('test')
  if not paths:
    raise PredictError(f'{records_dir} has no test split; build it with tfl-build-records '
                       '--test_csv, or give --test_csv and --image_dir')

  def read(wanted):
    dataset = tf.data.TFRecordDataset(paths).map(schema.parse_example)
    try:
      for example in dataset:
        image_id = example[schema.ID].numpy().decode()
        yield image_id, (Query(image_id, example[schema.ENCODED].numpy())
                         if wanted(image_id) else None)
    except tf.errors.DataLossError:
      raise PredictError(f'{records_lib.find_corrupt_shard(paths)} is corrupt or truncated; '
                         'rebuild the records') from None

  return records.num_examples('test'), read, []


def query_reader(config: PredictConfig,
                 export: exports.Export) -> Tuple[int, QueryReader, List[csv_io.SkippedRow]]:
  """The queries `config` names, prepared as the export's records build prepared its images."""
  if not config.test_csv:
    return _record_queries(config.test_records or export.records_dir)
  classifier = export.classifier
  return _csv_queries(config, classifier.max_image_side, classifier.jpeg_quality,
                      classifier.min_image_side)


# --- Verification ----------------------------------------------------------------------------


class Verifier:
  """Local features of queries, and their verification against index images.

  Args:
    index: the export's index.
    extract: image → LocalFeatures, as the index was built.
    pair_settings: matching and RANSAC settings.
  """

  def __init__(self, index: indexes.Index, extract, pair_settings):
    self.index = index
    self.extract = extract
    self.pair_settings = pair_settings

  def verify(self, query: LocalFeatures, row: int):
    """(matches, Verification) of the query against index image `row`."""
    return pair_evaluation.verify_pair(query, self.index.local_features(row), self.pair_settings)


def open_verifier(export: exports.Export, config: PredictConfig) -> Optional[Verifier]:
  """The export's index and extractor (None for an export without an index)."""
  if export.index is None:
    return None
  index = indexes.load(export.index.path, verify=config.verify)
  local = index.metadata['local']
  if local['backend'] == 'sift':
    extract = extractor_lib.make_local_extractor('sift', max_features=local['max_features'])
  else:
    delf = export.delf
    try:
      extract = delf_features.load_saved_model(
          delf.path, scales=list(delf.scales), max_feature_num=delf.max_feature_num,
          abs_threshold=delf.abs_threshold)
    except delf_features.DelfError as error:
      raise PredictError(str(error)) from None
  pair_settings = pair_evaluation.VerifySettings(
      ratio=None if config.ratio >= 1 else config.ratio, mutual=config.mutual,
      residual_threshold=config.residual_threshold)
  return Verifier(index, extract, pair_settings)


# --- One query -------------------------------------------------------------------------------


class _QueryPredictor:
  """Turns one classified query into its journal entry."""

  def __init__(self, config: PredictConfig, verifier: Optional[Verifier]):
    self.config = config
    self.verifier = verifier

  def _first_stage(self, landmark_ids, scores, neighbours, timing) -> Dict[int, float]:
    classifier = {int(landmark): float(score)
                  for landmark, score in zip(landmark_ids, scores) if landmark >= 0}
    if self.config.first_stage == 'classifier' or neighbours is None:
      return classifier
    started = time.perf_counter()
    index = self.verifier.index
    similarities, rows = (part[:self.config.knn_k] for part in neighbours)
    landmarks = np.array([index.landmark_of(row) if row >= 0 else -1 for row in rows])
    nearest = knn_scores(similarities, landmarks)
    timing['knn'] = time.perf_counter() - started
    return nearest if self.config.first_stage == 'knn' else fuse(classifier, nearest)

  def _neighbours(self, embedding, timing) -> Tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of the query's nearest index images: one search that the knn stage,
    the verification order and retrieval all read (each its own prefix)."""
    started = time.perf_counter()
    similarities, rows = self.verifier.index.global_search(
        embedding, max(self.config.knn_k, self.config.retrieval_depth))
    timing['search'] = time.perf_counter() - started
    return similarities[0], rows[0]

  def __call__(self, query: Query, landmark_ids, scores, embedding, status: str,
               classify_seconds: float) -> dict:
    started = time.perf_counter()
    timing = {'classify': classify_seconds}
    entry = {'id': query.image_id, 'status': status, 'prediction': None, 'unverified': None,
             'candidates': [], 'retrieval': []}
    if status != 'ok':
      return {**entry, 'seconds': classify_seconds, 'timing': timing}
    neighbours = self._neighbours(embedding, timing) if self.verifier is not None else None
    proposals = ranked(self._first_stage(landmark_ids, scores, neighbours, timing))
    if proposals:
      entry['unverified'] = [proposals[0][0], proposals[0][1]]
    verified = self._verify(query, proposals, embedding, neighbours, entry, timing)
    if verified is not None:
      entry['prediction'] = list(verified)
    elif proposals and self.config.unverified_weight > 0:
      entry['prediction'] = [proposals[0][0], self.config.unverified_weight * proposals[0][1]]
    timing['total'] = classify_seconds + time.perf_counter() - started
    return {**entry, 'seconds': timing['total'], 'timing': timing}

  def _verify(self, query: Query, proposals, embedding, neighbours, entry: dict,
              timing: dict) -> Optional[Tuple[int, float]]:
    if self.verifier is None:
      return None
    index, config = self.verifier.index, self.config
    features = None
    if config.verify_top_k or config.rerank:
      started = time.perf_counter()
      features = self.verifier.extract(tf.io.decode_jpeg(query.jpeg, channels=3).numpy())
      timing['extract'] = time.perf_counter() - started
    started = time.perf_counter()
    # index row → its check, shared with retrieval.
    verified_rows: Dict[int, ransac.Verification] = {}
    query_descriptor = np.asarray(embedding, np.float32)
    best, answer_row = None, None
    for landmark, first_stage in self._to_verify(proposals, query_descriptor, neighbours[1]):
      rows = index.images_of(landmark)
      if len(rows):
        similarity = index.global_descriptors[rows] @ query_descriptor
        rows = rows[np.argsort(-similarity, kind='stable')][:config.max_verifications]
      candidate = {'landmark_id': landmark, 'first_stage': first_stage, 'inliers': 0,
                   'index_image': None, 'comparisons': 0}
      candidate_row = None
      for row in rows:
        _, verification = self.verifier.verify(features, int(row))
        verified_rows[int(row)] = verification
        candidate['comparisons'] += 1
        if verification.num_inliers > candidate['inliers'] or candidate['index_image'] is None:
          candidate['inliers'] = verification.num_inliers
          candidate['index_image'] = index.image_id(int(row))
          candidate_row = int(row)
        if ransac.accept(verification, config.min_inliers):
          break
      entry['candidates'].append(candidate)
      if candidate_row is not None and ransac.accept(verified_rows[candidate_row],
                                                     config.min_inliers) and (
          best is None or candidate['inliers'] > best['inliers']):
        best, answer_row = candidate, candidate_row
    timing['verify'] = time.perf_counter() - started
    started = time.perf_counter()
    entry['retrieval'] = self._retrieval(features, neighbours[1][:config.retrieval_depth],
                                         verified_rows, answer_row)
    timing['retrieval'] = time.perf_counter() - started
    if best is None:
      return None
    return best['landmark_id'], verified_score(best['inliers'], best['first_stage'],
                                               config.min_inliers)

  def _to_verify(self, proposals: List[Tuple[int, float]], query_descriptor: np.ndarray,
                 nearest_rows: np.ndarray) -> List[Tuple[int, float]]:
    """The first `--verify_top_k` proposals; if the first stage proposed fewer (the classifier
    returns its top k), the index's other landmarks follow in the order of their nearest image to
    the query, with first-stage confidence 0: so `--verify_top_k` can reach every landmark.

    `nearest_rows` (the query's search) usually names enough landmarks; only if not is the index
    searched deeper, up to 100 images per landmark still wanted."""
    chosen = proposals[:self.config.verify_top_k]
    if len(chosen) >= self.config.verify_top_k:
      return chosen
    index = self.verifier.index
    proposed = {landmark for landmark, _ in chosen}

    def add_landmarks_of(rows) -> bool:
      for row in rows:
        landmark = index.landmark_of(int(row)) if row >= 0 else None
        if landmark is not None and landmark not in proposed:
          proposed.add(landmark)
          chosen.append((landmark, 0.0))
          if len(chosen) == self.config.verify_top_k:
            return True
      return False

    depth = min(index.num_images, 100 * self.config.verify_top_k)
    if not add_landmarks_of(nearest_rows) and len(nearest_rows) < depth:
      # The deeper search starts with the same rows: their landmarks are already in `proposed`.
      add_landmarks_of(index.global_search(query_descriptor, depth)[1][0])
    return chosen

  def _retrieval(self, features: Optional[LocalFeatures], nearest_rows: np.ndarray,
                 verified_rows: Dict[int, ransac.Verification],
                 answer_row: Optional[int]) -> List[str]:
    index, config = self.verifier.index, self.config
    rows = [int(row) for row in nearest_rows if row >= 0]
    verified = {}
    for row in rows[:config.rerank] if features is not None else ():
      if row not in verified_rows:
        verified_rows[row] = self.verifier.verify(features, row)[1]
      verified[row] = verified_rows[row]
    # Of recognition's matches beyond the window only the answer's image joins: recognition checks
    # every proposed landmark and stops at its first match, so the other landmarks' matches are
    # mostly false ones; promoting them all cost mAP@100 on the real photos (BUILD_NOTES.md).
    if answer_row is not None:
      verified[answer_row] = verified_rows[answer_row]
    ordered = retrieval_order(rows, verified, config.min_inliers, index.image_id)
    return [index.image_id(row) for row in ordered[:config.retrieval_depth]]


def retrieval_order(nearest_rows: Sequence[int], verified: Dict[int, ransac.Verification],
                    min_inliers: int, image_id: Callable[[int], str]) -> List[int]:
  """Index rows for retrieval: the verified matches first, then the nearest rows in their order.

  A match is a row `ransac.accept` accepts (at least `min_inliers` inliers). It may lie beyond
  `nearest_rows` (the recognised landmark's image, found by checking that landmark's images nearest
  first): a geometric match is stronger evidence than global similarity, so it is listed however
  low the search put it. An image held twice by the index (under one id in two rows) is listed
  once, where it first comes: a retrieval row that repeats an id wastes a place of the 100 scored.

  Args:
    nearest_rows: index rows by descending global similarity.
    verified: index row → its Verification, for the rows verified.
    min_inliers: inliers a verified match needs.
    image_id: index row → its image id.

  Returns:
    The matches by descending inliers (ties: the nearer row first, then rows outside
    `nearest_rows` by row number), then the remaining `nearest_rows`; of rows with the same image
    id, only the first.
  """
  position = {row: i for i, row in enumerate(nearest_rows)}
  matches = sorted((row for row, verification in verified.items()
                    if ransac.accept(verification, min_inliers)),
                   key=lambda row: (-verified[row].num_inliers,
                                    position.get(row, len(position)), row))
  matched = set(matches)
  ordered, listed = [], set()
  for row in matches + [row for row in nearest_rows if row not in matched]:
    if image_id(row) not in listed:
      listed.add(image_id(row))
      ordered.append(row)
  return ordered


# --- The whole run ---------------------------------------------------------------------------


def _fingerprint(config: PredictConfig, export: exports.Export) -> dict:
  return {**settings.fingerprint(config), 'export_created': export.created,
          'classifier_sha256': export.classifier.run_model_sha256}


def _prepare_output(config: PredictConfig, fingerprint: dict) -> None:
  """Checks what --output_dir holds (the caller holds its lock); starts again with --overwrite."""
  previous = predictions.read_started(config.output_dir)
  if previous is not None and previous.get('fingerprint') != fingerprint:
    if not config.overwrite:
      raise PredictError(f'{config.output_dir} holds predictions made with other settings or '
                         'another export; pass --overwrite to start again, or choose another '
                         'folder')
    predictions.clear(config.output_dir)


def _batches(queries: Iterable[Query], size: int) -> Iterator[List[Query]]:
  batch = []
  for query in queries:
    batch.append(query)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _log_line(entry: dict) -> str:
  prediction = entry['prediction']
  answer = 'none' if prediction is None else f'{prediction[0]} {prediction[1]:.3f}'
  parts = ' '.join(f'{stage} {seconds * 1000:.0f} ms'
                   for stage, seconds in entry['timing'].items() if stage != 'total')
  return (f'{entry["id"]} {entry["status"]}: {answer}, {entry["seconds"] * 1000:.0f} ms '
          f'({parts})\n')


def predict(config: PredictConfig) -> dict:
  """Runs the prediction described in the module docstring.

  Returns:
    predict.json's content: counts, timing (median and 90th percentile seconds per query) and
    where the submissions are.

  Raises:
    PredictError, exports.ExportError, predictions.PredictionsError, indexes.LandmarkIndexError,
      csv_io.CsvError: unusable settings, export, queries or output folder.
  """
  settings.check(config)
  if not config.export or not config.output_dir:
    raise PredictError('give --export=<tfl-export folder> and --output_dir')
  export = exports.load(config.export, verify=config.verify)
  total, read_queries, skipped = query_reader(config, export)
  for row in skipped:
    print(f'{config.test_csv}: skipped line {row.line}: {row.reason}')
  output_dir = config.output_dir
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise PredictError(f'--output_dir={output_dir} is a file, not a folder')
  tf.io.gfile.makedirs(output_dir)
  with files.exclusive_writer(output_dir, 'tfl-predict', PredictError):
    return _predict(config, export, total, read_queries)


def _predict(config: PredictConfig, export: exports.Export, total: int,
             read_queries: QueryReader) -> dict:
  """The prediction into --output_dir, whose lock the caller holds."""
  fingerprint = _fingerprint(config, export)
  _prepare_output(config, fingerprint)
  meta = {'export': config.export, 'records_dir': export.records_dir,
          'queries': {'test_csv': config.test_csv, 'image_dir': config.image_dir,
                      'test_records': None if config.test_csv else
                      (config.test_records or export.records_dir)},
          'index': export.index_json(), 'fingerprint': fingerprint,
          'settings': settings.as_dict(config)}
  predictions.start(config.output_dir, meta)

  verifier = open_verifier(export, config)
  if verifier is None and config.first_stage != 'classifier':
    raise PredictError(f'--first_stage={config.first_stage} needs an index in the export')
  predictor = _QueryPredictor(config, verifier)
  serve = tf.saved_model.load(export.classifier.path).signatures[exports.SERVING_SIGNATURE]
  journal = predictions.Journal(files.join(config.output_dir, predictions.JOURNAL))
  done = len(journal.entries)
  if done:
    print(f'resuming: {done} of {total} queries already predicted')
  log_mode = 'a' if done else 'w'
  ids: List[str] = []  # Every query in order, for the submissions.

  def pending() -> Iterator[Query]:
    for image_id, query in read_queries(lambda image_id: image_id not in journal.entries):
      ids.append(image_id)
      if query is not None:
        yield query
  try:
    with tf.io.gfile.GFile(files.join(config.output_dir, predictions.LOG), log_mode) as log, \
        tqdm.tqdm(total=total, initial=done, unit='query', desc='predict',
                  disable=not config.progress) as bar:
      for batch in _batches(pending(), config.batch_size):
        usable = [query for query in batch if query.jpeg is not None]
        started = time.perf_counter()
        outputs = serve(images=tf.constant([query.jpeg for query in usable], tf.string)) \
            if usable else None
        per_query = (time.perf_counter() - started) / max(len(usable), 1)
        position = 0
        for query in batch:
          if query.jpeg is None:
            entry = predictor(query, (), (), None, query.status, 0.0)
          else:
            entry = predictor(query, outputs['landmark_ids'][position].numpy(),
                              outputs['scores'][position].numpy(),
                              outputs['embeddings'][position].numpy(),
                              outputs['status'][position].numpy().decode(), per_query)
            position += 1
          journal.append(entry)
          log.write(_log_line(entry))
          bar.update(1)
        log.flush()
  finally:
    journal.close()
  ordered = [journal.entries[image_id] for image_id in ids]
  seconds = np.array([entry['seconds'] for entry in ordered]) if ordered else np.zeros(1)
  statuses = collections.Counter(entry['status'] for entry in ordered)
  meta = {**meta,
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'counts': {'queries': len(ordered),
                     'unusable': sum(count for status, count in statuses.items() if status != 'ok'),
                     'predictions': sum(1 for entry in ordered if entry['prediction']),
                     'verified': sum(1 for entry in ordered
                                     if entry['prediction'] and entry['prediction'][1] >= 1.0)},
          'statuses': dict(statuses),
          'seconds_per_query': {'median': float(np.median(seconds)),
                                'p90': float(np.percentile(seconds, 90)),
                                'total': float(seconds.sum())}}
  return predictions.finish(config.output_dir, meta, ordered, with_retrieval=bool(meta['index']))
