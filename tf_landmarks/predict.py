"""Two-stage prediction: classify (or vote over neighbours), then verify with local features.

`predict(PredictConfig)` reads the queries (a test CSV + image folder, or the test shards of a
records folder), runs them through an export (`tfl-export`), and writes into `--output_dir`:

  predictions.jsonl      one JSON object per query, appended as each finishes (the journal a re-run
                         continues from; see `Journal`): {"id", "status" ("ok" or why the image
                         could not be used), "prediction" [landmark_id, score] or null,
                         "unverified" [landmark_id, score] or null (the first stage's answer),
                         "candidates" [{"landmark_id", "first_stage", "inliers", "index_image",
                         "comparisons"}] (the classes verified, in first-stage order),
                         "retrieval" [index image ids], "seconds", "timing" {stage: seconds}}.
  recognition.csv        the Kaggle recognition submission (id,landmarks "<landmark_id> <score>").
  recognition_unverified.csv   the same queries answered by the first stage alone, for comparison.
  retrieval.csv          the Kaggle retrieval submission (id,images: up to 100 index image ids).
  predict.log            one line per query: its answer and where its time went.
  predict.json           the export, queries and settings; "finished" once the CSVs are written.

Recognition. The first stage proposes landmarks: `classifier` (the export's softmax), `knn` (the
landmarks of the query's nearest index images by global descriptor, each with the cosine
similarity of its nearest image: a landmark with a single index image is as reachable as a large
one) or `both` (the mean of the two, per landmark). The `--verify_top_k` best proposals are
verified: the query's local features are matched (nearest neighbours, ratio test, mutual check)
against up to `--max_verifications` index images of each landmark, nearest first by global
descriptor, and an affine RANSAC counts the inliers; a landmark stops being checked once one of its
images reaches `--min_inliers`. The answer is the verified landmark with the most inliers, scored
in [1, 2) (`verified_score`), so every verified answer ranks above every unverified one. Without a
verified landmark the first stage's best is kept with a score of `--unverified_weight` × its
confidence (at most 0.1 by default): queries without a landmark, or with a landmark the index does
not hold, rarely verify, so their answers sink to the bottom of GAP's ranking, where they cost
least.

Retrieval. The query's `--retrieval_depth` nearest index images by global descriptor, the first
`--rerank` of them verified (reusing recognition's verifications): those with at least
`--min_inliers` inliers, and the index image that verified the recognised landmark wherever the
search put it, move to the front, most inliers first (`retrieval_order`).

Query images are prepared as the records build prepared the index images (long side capped at the
build's `max_image_size`, JPEG-encoded), so local features of both live at the same scale.
"""

import collections
import dataclasses
import datetime
import functools
import json
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tqdm

from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import export as export_lib
from tf_landmarks import files
from tf_landmarks import images as images_lib
from tf_landmarks import indexes
from tf_landmarks import ingest
from tf_landmarks import records as records_lib
from tf_landmarks import schema
from tf_landmarks import settings
from tf_landmarks import submission
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.local_features import draw
from tf_landmarks.local_features import evaluate as pair_evaluation
from tf_landmarks.local_features import extractor as extractor_lib
from tf_landmarks.settings import setting

# The folder's format, predict.json and the submissions' names belong to submission.py, which reads
# them back; the journal and the log are this module's own.
FORMAT = submission.PREDICTIONS_FORMAT
PREDICT_JSON = submission.PREDICTIONS_JSON
RECOGNITION_CSV = submission.RECOGNITION_CSV
UNVERIFIED_CSV = submission.UNVERIFIED_RECOGNITION_CSV
RETRIEVAL_CSV = submission.RETRIEVAL_CSV
JOURNAL = 'predictions.jsonl'
LOG = 'predict.log'
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
            ingest.image_paths(config.image_dir, row.image_id), max_side=max_side,
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


def _query_reader(config: PredictConfig,
                  description: dict) -> Tuple[int, QueryReader, List[csv_io.SkippedRow]]:
  """The queries `config` names, prepared as the export's records build prepared its images."""
  if not config.test_csv:
    return _record_queries(config.test_records or description['records_dir'])
  classifier = description['classifier']
  return _csv_queries(config, classifier['max_image_side'], classifier['jpeg_quality'],
                      classifier['min_image_side'])


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


def open_verifier(export_dir: str, description: dict, config: PredictConfig) -> Optional[Verifier]:
  """The export's index and extractor (None for an export without an index)."""
  if not description['index']:
    return None
  index = indexes.load(files.join(export_dir, description['index']['path']))
  local = index.metadata['local']
  if local['backend'] == 'sift':
    extract = extractor_lib.make_local_extractor('sift', max_features=local['max_features'])
  else:
    delf = description['delf']
    try:
      extract = delf_features.load_saved_model(
          files.join(export_dir, delf['path']), scales=delf['scales'],
          max_feature_num=delf['max_feature_num'], abs_threshold=delf['abs_threshold'])
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
    inliers_of: Dict[int, int] = {}  # index row → inliers, shared with retrieval
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
        inliers_of[int(row)] = verification.num_inliers
        candidate['comparisons'] += 1
        if verification.num_inliers > candidate['inliers'] or candidate['index_image'] is None:
          candidate['inliers'] = verification.num_inliers
          candidate['index_image'] = index.image_id(int(row))
          candidate_row = int(row)
        if verification.num_inliers >= config.min_inliers:
          break
      entry['candidates'].append(candidate)
      if candidate['inliers'] >= config.min_inliers and (
          best is None or candidate['inliers'] > best['inliers']):
        best, answer_row = candidate, candidate_row
    timing['verify'] = time.perf_counter() - started
    started = time.perf_counter()
    entry['retrieval'] = self._retrieval(features, neighbours[1][:config.retrieval_depth],
                                         inliers_of, answer_row)
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
                 inliers_of: Dict[int, int], answer_row: Optional[int]) -> List[str]:
    index, config = self.verifier.index, self.config
    rows = [int(row) for row in nearest_rows if row >= 0]
    verified = {}
    for row in rows[:config.rerank] if features is not None else ():
      if row not in inliers_of:
        inliers_of[row] = self.verifier.verify(features, row)[1].num_inliers
      verified[row] = inliers_of[row]
    # Of recognition's matches beyond the window only the answer's image joins: recognition checks
    # every proposed landmark and stops at its first match, so the other landmarks' matches are
    # mostly false ones; promoting them all cost mAP@100 on the real photos (BUILD_NOTES.md).
    if answer_row is not None:
      verified[answer_row] = inliers_of[answer_row]
    ordered = retrieval_order(rows, verified, config.min_inliers)[:config.retrieval_depth]
    return [index.image_id(row) for row in ordered]


def retrieval_order(nearest_rows: Sequence[int], inliers_of: Dict[int, int],
                    min_inliers: int) -> List[int]:
  """Index rows for retrieval: the verified matches first, then the nearest rows in their order.

  A match is a row with at least `min_inliers` inliers. It may lie beyond `nearest_rows` (the
  recognised landmark's image, found by checking that landmark's images nearest first): a geometric
  match is stronger evidence than global similarity, so it is listed however low the search put it.

  Args:
    nearest_rows: index rows by descending global similarity.
    inliers_of: index row → RANSAC inliers, for the rows verified.
    min_inliers: inliers a verified match needs.

  Returns:
    The matches by descending inliers (ties: the nearer row first, then rows outside
    `nearest_rows` by row number), then the remaining `nearest_rows`.
  """
  position = {row: i for i, row in enumerate(nearest_rows)}
  matches = sorted((row for row, inliers in inliers_of.items() if inliers >= min_inliers),
                   key=lambda row: (-inliers_of[row], position.get(row, len(position)), row))
  matched = set(matches)
  return matches + [row for row in nearest_rows if row not in matched]


# --- The journal -----------------------------------------------------------------------------


_ENTRY_KEYS = {'id', 'status', 'prediction', 'unverified', 'candidates', 'retrieval', 'seconds',
               'timing'}


class Journal:
  """predictions.jsonl: one line per finished query, flushed as written, read back on a re-run.

  A line cut short by a kill (or otherwise not a whole entry) ends what is read: the file is
  truncated after the last whole line, so a re-run redoes exactly the queries after it.
  """

  def __init__(self, path: str):
    self.path = path
    self.entries: Dict[str, dict] = {}
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path, 'rb') as f:
        content = f.read()
      good_length = 0
      for line in content.splitlines(keepends=True):
        try:
          entry = json.loads(line)
        except ValueError:
          break
        if not line.endswith(b'\n') or not isinstance(entry, dict) or \
            not _ENTRY_KEYS <= set(entry):
          break
        self.entries[entry['id']] = entry
        good_length += len(line)
      if good_length < len(content):
        files.write_atomically(path, content[:good_length])
    self._file = None

  def append(self, entry: dict) -> None:
    if self._file is None:
      # Local files are appended to in place (a kill loses at most the line being written);
      # tf.io.gfile cannot append to gs://, where the journal is rewritten by close().
      self._file = open(self.path, 'ab') if not files.is_remote(self.path) else None
    line = (json.dumps(entry, sort_keys=True) + '\n').encode()
    self.entries[entry['id']] = entry
    if self._file is not None:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    elif files.is_remote(self.path):
      files.write_atomically(self.path, b''.join(
          (json.dumps(entry, sort_keys=True) + '\n').encode() for entry in self.entries.values()))


# --- The whole run ---------------------------------------------------------------------------


def _fingerprint(config: PredictConfig, description: dict) -> dict:
  return {**settings.fingerprint(config), 'export_created': description['created'],
          'classifier_sha256': description['classifier']['run_model_sha256']}


def _prepare_output(config: PredictConfig, fingerprint: dict) -> None:
  output_dir = config.output_dir
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise PredictError(f'--output_dir={output_dir} is a file, not a folder')
  meta_path = files.join(output_dir, PREDICT_JSON)
  if tf.io.gfile.exists(meta_path):
    previous = files.read_versioned_json(meta_path, FORMAT, 'predictions', 'pass --overwrite',
                                         PredictError)
    if previous.get('fingerprint') != fingerprint:
      if not config.overwrite:
        raise PredictError(f'{output_dir} holds predictions made with other settings or another '
                           'export; pass --overwrite to start again, or choose another folder')
      for name in (JOURNAL, RECOGNITION_CSV, UNVERIFIED_CSV, RETRIEVAL_CSV, LOG, PREDICT_JSON):
        if tf.io.gfile.exists(files.join(output_dir, name)):
          tf.io.gfile.remove(files.join(output_dir, name))
  elif tf.io.gfile.exists(files.join(output_dir, JOURNAL)):
    raise PredictError(f'{output_dir} holds a predictions.jsonl without predict.json; remove it '
                       'or choose another folder')
  tf.io.gfile.makedirs(output_dir)


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
    PredictError, export.ExportError, indexes.LandmarkIndexError, csv_io.CsvError: unusable
      settings, export, queries or output folder.
  """
  settings.check(config)
  if not config.export or not config.output_dir:
    raise PredictError('give --export=<tfl-export folder> and --output_dir')
  description = export_lib.read_export(config.export)
  total, read_queries, skipped = _query_reader(config, description)
  for row in skipped:
    print(f'{config.test_csv}: skipped line {row.line}: {row.reason}')
  fingerprint = _fingerprint(config, description)
  _prepare_output(config, fingerprint)
  meta = {'format': FORMAT, 'export': config.export, 'records_dir': description['records_dir'],
          'queries': {'test_csv': config.test_csv, 'image_dir': config.image_dir,
                      'test_records': None if config.test_csv else
                      (config.test_records or description['records_dir'])},
          'index': description['index'], 'fingerprint': fingerprint,
          'settings': settings.as_dict(config), 'finished': False}
  files.write_atomically(files.join(config.output_dir, PREDICT_JSON), json.dumps(meta, indent=1))

  verifier = open_verifier(config.export, description, config)
  if verifier is None and config.first_stage != 'classifier':
    raise PredictError(f'--first_stage={config.first_stage} needs an index in the export')
  predictor = _QueryPredictor(config, verifier)
  loaded = tf.saved_model.load(files.join(config.export, description['classifier']['path']))
  serve = loaded.signatures[export_lib.SERVING_SIGNATURE]
  journal = Journal(files.join(config.output_dir, JOURNAL))
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
    with tf.io.gfile.GFile(files.join(config.output_dir, LOG), log_mode) as log, tqdm.tqdm(
        total=total, initial=done, unit='query', desc='predict',
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
  return _finish(config, meta, ids, journal.entries)


def _finish(config: PredictConfig, meta: dict, ids: Sequence[str], entries: Dict[str, dict]):
  """Writes the three submissions in query order, then predict.json marked finished."""
  ordered = [entries[image_id] for image_id in ids]
  submission.write_recognition_submission(
      files.join(config.output_dir, RECOGNITION_CSV),
      {entry['id']: tuple(entry['prediction']) if entry['prediction'] else None
       for entry in ordered})
  submission.write_recognition_submission(
      files.join(config.output_dir, UNVERIFIED_CSV),
      {entry['id']: tuple(entry['unverified']) if entry['unverified'] else None
       for entry in ordered})
  if meta['index']:
    submission.write_retrieval_submission(files.join(config.output_dir, RETRIEVAL_CSV),
                                          {entry['id']: entry['retrieval'] for entry in ordered})
  seconds = np.array([entry['seconds'] for entry in ordered]) if ordered else np.zeros(1)
  statuses = collections.Counter(entry['status'] for entry in ordered)
  meta = {**meta, 'finished': True,
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'counts': {'queries': len(ordered),
                     'unusable': sum(count for status, count in statuses.items() if status != 'ok'),
                     'predictions': sum(1 for entry in ordered if entry['prediction']),
                     'verified': sum(1 for entry in ordered
                                     if entry['prediction'] and entry['prediction'][1] >= 1.0)},
          'statuses': dict(statuses),
          'seconds_per_query': {'median': float(np.median(seconds)),
                                'p90': float(np.percentile(seconds, 90)),
                                'total': float(seconds.sum())},
          'submissions': {'recognition': RECOGNITION_CSV, 'recognition_unverified': UNVERIFIED_CSV,
                          'retrieval': RETRIEVAL_CSV if meta['index'] else None}}
  files.write_atomically(files.join(config.output_dir, PREDICT_JSON), json.dumps(meta, indent=1))
  return meta


# --- Match pictures for the report -----------------------------------------------------------


def _stored_image(records: records_lib.Records, splits: Sequence[str],
                  image_id: str) -> Optional[np.ndarray]:
  """The stored (records) image `image_id`, looked up in the given splits' shards."""
  wanted = image_id.encode()
  for split in splits:
    paths = records.files(split)
    if not paths:
      continue
    for example in tf.data.TFRecordDataset(paths).map(schema.parse_example):
      if example[schema.ID].numpy() == wanted:
        return tf.io.decode_jpeg(example[schema.ENCODED], channels=3).numpy()
  return None


@dataclasses.dataclass(frozen=True)
class _Predicted:
  """A finished prediction folder opened for drawing: its journal, export, verifier, queries,
  and the records folder of the index images."""
  entries: Dict[str, dict]
  verifier: Verifier
  read_queries: QueryReader
  index_records: records_lib.Records


@functools.lru_cache(maxsize=2)
def _open_predicted(predictions_dir: str, meta_text: str) -> Optional[_Predicted]:
  """Opens the folder once per report (keyed by predict.json's content, so a new run reopens it):
  loading the export's index and DELF model for every picture would cost more than drawing."""
  meta = json.loads(meta_text)
  if not all(isinstance(meta.get(key), dict) for key in ('settings', 'queries')) or \
      not meta.get('export'):
    return None
  description = export_lib.read_export(meta['export'])
  names = {field.name for field in dataclasses.fields(PredictConfig)}
  config = PredictConfig(**{key: value for key, value in meta['settings'].items() if key in names})
  verifier = open_verifier(meta['export'], description, config)
  if verifier is None:
    return None
  return _Predicted(Journal(files.join(predictions_dir, JOURNAL)).entries, verifier,
                    _query_reader(config, description)[1],
                    records_lib.load(verifier.index.metadata['records_dir']))


def match_drawer(predictions_dir: str) -> Callable[[str, int, str], Optional[str]]:
  """`draw_match` for the pictures of one predictions folder, its export and index opened now.

  Opening them before the report is written lets a folder whose export has since been moved or
  deleted be reported once, instead of failing half-way through the report.

  Args:
    predictions_dir: a finished `predict` output folder.

  Returns:
    draw(query_id, landmark_id, png_path) -> caption or None, as `draw_match`.

  Raises:
    PredictError, export.ExportError, indexes.LandmarkIndexError, records.RecordsError: the folder,
      its export, the export's index or the index's records cannot be opened, or the export has
      no index to draw matches from.
  """
  meta = files.read_versioned_json(files.join(predictions_dir, PREDICT_JSON), FORMAT,
                                   'predictions', 'predict again', PredictError)
  if _open_predicted(predictions_dir, json.dumps(meta, sort_keys=True)) is None:
    raise PredictError(f'{predictions_dir} names no export with an index to draw matches with')
  return functools.partial(draw_match, predictions_dir)


def draw_match(predictions_dir: str, query_id: str, landmark_id: int,
               png_path: str) -> Optional[str]:
  """Draws the query next to the index image of `landmark_id` it was verified against.

  For the report's worst mistakes: the index image is the one recorded for that landmark in the
  query's journal entry, or the landmark's first index image if it was not verified. The folder's
  export and index are opened once for all the pictures of one folder.

  Args:
    predictions_dir: a finished `predict` output folder.
    query_id: the query.
    landmark_id: the landmark whose index image to show.
    png_path: where the picture goes.

  Returns:
    A caption ("<inliers> inliers / <matches> matches with index image <id>"), or None when the
    query, its image or the index image cannot be found.
  """
  meta = files.read_versioned_json(files.join(predictions_dir, PREDICT_JSON), FORMAT,
                                   'predictions', 'predict again', PredictError)
  predicted = _open_predicted(predictions_dir, json.dumps(meta, sort_keys=True))
  entry = predicted.entries.get(query_id) if predicted else None
  if entry is None or entry.get('status') != 'ok':
    return None
  index = predicted.verifier.index
  rows = index.images_of(landmark_id)
  recorded = next((candidate['index_image'] for candidate in entry['candidates']
                   if candidate['landmark_id'] == landmark_id and candidate['index_image']), None)
  row = next((int(r) for r in rows if index.image_id(int(r)) == recorded),
             int(rows[0]) if len(rows) and recorded is None else None)
  if row is None:
    return None
  query = next((query for _, query in predicted.read_queries(lambda i: i == query_id)
                if query is not None), None)
  index_picture = _stored_image(predicted.index_records, index.metadata['splits'],
                                index.image_id(row))
  if query is None or query.jpeg is None or index_picture is None:
    return None
  query_image = tf.io.decode_jpeg(query.jpeg, channels=3).numpy()
  query_features = predicted.verifier.extract(query_image)
  matches, verification = predicted.verifier.verify(query_features, row)
  draw.draw_matches(query_image, index_picture, query_features, index.local_features(row),
                    matches, verification.inlier_mask, png_path)
  return (f'{verification.num_inliers} inliers / {len(matches)} matches with index image '
          f'{index.image_id(row)} (landmark {landmark_id})')
