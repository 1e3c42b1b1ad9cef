"""One photo's answer: which landmark it shows, how sure, and how it was verified.

`Recognizer.open(export_path, RecognizerSettings(…))` loads an export (`tfl-export`, checked by
`exports.load`) once: the classifier SavedModel, the index (`indexes.load`) and the local-feature
extractor the index was built with. `answer(image_bytes)` answers one photo with an `Answer`;
`tfl-predict` classifies its queries in batches (`classify`) and answers each through `decide`, and
`tfl-serve` shares one Recognizer between its threads (it holds no per-query state; the TensorFlow
functions, the memory-mapped index and faiss searches are safe to call concurrently).

Recognition. The first stage proposes landmarks: `classifier` (the export's softmax), `knn` (the
landmarks of the query's nearest index images by global descriptor, each with the cosine
similarity of its nearest image: a landmark with a single index image is as reachable as a large
one) or `both` (the mean of the two, per landmark). The `--verify_top_k` best proposals are
verified: the query's local features are matched (nearest neighbours, ratio test, mutual check)
against up to `--max_verifications` index images of each landmark, nearest first by global
descriptor, and an affine RANSAC counts the inliers; a pair is accepted by `ransac.accept` (at
least `--min_inliers` inliers), and a landmark stops being checked once one of its images is. The
answer is the verified landmark with the most inliers, scored in [1, 2) (`verified_score`), so
every verified answer ranks above every unverified one. Without a verified landmark the first
stage's best is kept with a score of `--unverified_weight` × its confidence (at most 0.1 by
default): queries without a landmark, or with a landmark the index does not hold, rarely verify,
so their answers sink to the bottom of GAP's ranking, where they cost least.

Retrieval. The query's `--retrieval_depth` nearest index images by global descriptor, the first
`--rerank` of them verified (reusing recognition's verifications): those with at least
`--min_inliers` inliers, and the index image that verified the recognised landmark wherever the
search put it, move to the front, most inliers first (`retrieval_order`). A list never names an
image id twice.
"""

import collections
import dataclasses
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import exports
from tf_landmarks import files
from tf_landmarks import images as images_lib
from tf_landmarks import indexes
from tf_landmarks import records as records_lib
from tf_landmarks import settings as settings_lib
from tf_landmarks import submission
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.local_features import draw
from tf_landmarks.local_features import evaluate as pair_evaluation
from tf_landmarks.local_features import extractor as extractor_lib
from tf_landmarks.local_features import ransac
from tf_landmarks.settings import setting

FIRST_STAGES = ('classifier', 'knn', 'both')
OK = exports.OK


class RecognizerError(errors.UserError):
  """The export cannot answer as asked; the message says what to change."""


@dataclasses.dataclass
class RecognizerSettings:
  """How one query is answered; `tfl-predict` and `tfl-serve` define one flag per field."""
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


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A landmark the first stage proposed, and its verification.

  Attributes:
    landmark_id: the landmark.
    first_stage: the first stage's confidence in it, in [0, 1] (0: proposed only to fill
      `verify_top_k`).
    inliers: the most RANSAC inliers of its index images checked.
    index_image: the id of that index image (None: the landmark has no index image).
    comparisons: index images checked.
  """
  landmark_id: int
  first_stage: float
  inliers: int
  index_image: Optional[str]
  comparisons: int


@dataclasses.dataclass(frozen=True)
class Classified:
  """The classifier's output for one query: its top landmarks, descriptor and status."""
  landmark_ids: np.ndarray
  scores: np.ndarray
  embedding: Optional[np.ndarray]
  status: str
  seconds: float


@dataclasses.dataclass(frozen=True)
class Answer:
  """One photo's answer.

  Attributes:
    status: 'ok', or why the photo could not be read (nothing else is then set).
    landmark_id: the answer (None: no landmark recognised, or `unverified_weight` 0 without a
      verified one).
    score: its score: in [1, 2) when verified (`verified_score`), else `unverified_weight` × the
      first stage's confidence.
    verified: whether local features verified the answer.
    inliers: the verifying pair's RANSAC inliers (0 unverified).
    index_image: the id of the index image that verified it (None unverified).
    unverified: (landmark, confidence) the first stage alone would answer, or None.
    candidates: the landmarks verified, in the order they were checked.
    retrieval: index image ids for retrieval, best first (empty without an index).
    timing: seconds per stage (classify, search, knn, extract, verify, retrieval, total).
    seconds: the query's whole time.
  """
  status: str
  landmark_id: Optional[int] = None
  score: Optional[float] = None
  verified: bool = False
  inliers: int = 0
  index_image: Optional[str] = None
  unverified: Optional[Tuple[int, float]] = None
  candidates: Tuple[Candidate, ...] = ()
  retrieval: Tuple[str, ...] = ()
  timing: Dict[str, float] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0

  def journal_entry(self, image_id: str) -> dict:
    """The answer as a line of a predictions journal (`tf_landmarks/predictions.py`)."""
    return {'id': image_id, 'status': self.status,
            'prediction': None if self.landmark_id is None else [self.landmark_id, self.score],
            'unverified': None if self.unverified is None else list(self.unverified),
            'candidates': [dataclasses.asdict(candidate) for candidate in self.candidates],
            'retrieval': list(self.retrieval), 'seconds': self.seconds, 'timing': self.timing}

  def as_json(self) -> dict:
    """Every field as JSON-ready values."""
    return {**dataclasses.asdict(self),
            'unverified': None if self.unverified is None else list(self.unverified),
            'candidates': [dataclasses.asdict(candidate) for candidate in self.candidates],
            'retrieval': list(self.retrieval)}


@dataclasses.dataclass(frozen=True)
class MatchPicture:
  """A query drawn beside an index image, with the matches between them."""
  png: bytes
  index_image: str
  inliers: int
  matches: int


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


class _Verifier:
  """Local features of queries, and their verification against index images."""

  def __init__(self, index: indexes.Index, extract: extractor_lib.LocalExtractor,
               pair_settings: pair_evaluation.VerifySettings):
    self.index = index
    self.extract = extract
    self.pair_settings = pair_settings

  def verify(self, query: LocalFeatures, row: int):
    """(matches, Verification) of the query against index image `row`."""
    return pair_evaluation.verify_pair(query, self.index.local_features(row), self.pair_settings)


def _open_verifier(export: exports.Export, settings: RecognizerSettings,
                   verify: bool) -> Optional[_Verifier]:
  """The export's index and extractor (None for an export without an index)."""
  if export.index is None:
    return None
  index = indexes.load(export.index.path, verify=verify)
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
      raise RecognizerError(str(error)) from None
  pair_settings = pair_evaluation.VerifySettings(
      ratio=None if settings.ratio >= 1 else settings.ratio, mutual=settings.mutual,
      residual_threshold=settings.residual_threshold)
  return _Verifier(index, extract, pair_settings)


class Recognizer:
  """An export loaded once, answering photos (see the module docstring).

  Use `Recognizer.open(path, settings)`. Safe to share between threads: it holds no per-query state.

  Attributes:
    export: the export.
    settings: how queries are answered.
    index: the export's index (None for a classifier alone).
  """

  def __init__(self, export: exports.Export, settings: RecognizerSettings, *,
               verify: bool = False):
    settings_lib.check(settings)
    self.export = export
    self.settings = settings
    self._verifier = _open_verifier(export, settings, verify)
    if self._verifier is None and settings.first_stage != 'classifier':
      raise RecognizerError(f'--first_stage={settings.first_stage} needs an index in the export')
    self.index = None if self._verifier is None else self._verifier.index
    self._serve = tf.saved_model.load(export.classifier.path).signatures[
        exports.SERVING_SIGNATURE]

  @classmethod
  def open(cls, export_path: str, settings: Optional[RecognizerSettings] = None, *,
           verify: bool = False) -> 'Recognizer':
    """Loads the export at `export_path` (`verify`: hash every file first).

    Raises:
      exports.ExportError, indexes.LandmarkIndexError, RecognizerError: an unusable export, or
        settings it cannot answer with.
    """
    return cls(exports.load(export_path, verify=verify), settings or RecognizerSettings(),
               verify=verify)

  # --- Whole photos ----------------------------------------------------------------------------

  def prepare(self, data: bytes) -> bytes:
    """An image file's bytes as the export's records build prepared its images (a JPEG).

    Raises:
      images.ImageError: empty, not an image, corrupt, too small, too large or a decompression bomb.
    """
    classifier = self.export.classifier
    if len(data) > classifier.max_image_bytes:
      raise images_lib.ImageError(f'image too large ({len(data)} bytes > '
                                  f'{classifier.max_image_bytes})')
    return images_lib.prepare_image(data, max_side=classifier.max_image_side,
                                    jpeg_quality=classifier.jpeg_quality,
                                    min_side=classifier.min_image_side).jpeg

  def answer_all(self, datas: Sequence[bytes]) -> List[Tuple[Answer, Optional[bytes]]]:
    """(answer, prepared JPEG or None) of each image file's bytes, classified in one batch."""
    prepared: List[Optional[bytes]] = []
    statuses = []
    for data in datas:
      try:
        prepared.append(self.prepare(data))
        statuses.append(OK)
      except images_lib.ImageError as error:
        prepared.append(None)
        statuses.append(str(error))
    usable = [jpeg for jpeg in prepared if jpeg is not None]
    classified = iter(self.classify(usable))
    return [(self.decide(jpeg, next(classified)) if jpeg is not None else Answer(status),
             jpeg) for jpeg, status in zip(prepared, statuses)]

  def answer(self, data: bytes) -> Answer:
    """The answer for one image file's bytes (a status, never an exception, for bad bytes)."""
    return self.answer_all([data])[0][0]

  # --- The stages, for callers that batch ------------------------------------------------------

  def classify(self, jpegs: Sequence[bytes]) -> List[Classified]:
    """The classifier's outputs for prepared JPEGs, run as one batch."""
    if not jpegs:
      return []
    started = time.perf_counter()
    outputs = self._serve(images=tf.constant(list(jpegs), tf.string))
    per_query = (time.perf_counter() - started) / len(jpegs)
    outputs = {name: outputs[name].numpy() for name in exports.OUTPUT_NAMES}
    return [Classified(outputs['landmark_ids'][i], outputs['scores'][i], outputs['embeddings'][i],
                       outputs['status'][i].decode(), per_query) for i in range(len(jpegs))]

  def decide(self, jpeg: bytes, classified: Classified) -> Answer:
    """The answer for a prepared JPEG given its classification: the second stage."""
    started = time.perf_counter()
    timing = {'classify': classified.seconds}
    if classified.status != OK:
      return Answer(classified.status, timing=timing, seconds=classified.seconds)
    neighbours = self._neighbours(classified.embedding, timing) \
        if self._verifier is not None else None
    proposals = ranked(self._first_stage(classified.landmark_ids, classified.scores, neighbours,
                                         timing))
    unverified = (proposals[0][0], proposals[0][1]) if proposals else None
    candidates: List[Candidate] = []
    retrieval: List[str] = []
    best = self._verify(jpeg, proposals, classified.embedding, neighbours, candidates, retrieval,
                        timing)
    answer = {}
    if best is not None:
      answer = dict(landmark_id=best.landmark_id, verified=True, inliers=best.inliers,
                    index_image=best.index_image,
                    score=verified_score(best.inliers, best.first_stage,
                                         self.settings.min_inliers))
    elif proposals and self.settings.unverified_weight > 0:
      answer = dict(landmark_id=proposals[0][0],
                    score=self.settings.unverified_weight * proposals[0][1])
    timing['total'] = classified.seconds + time.perf_counter() - started
    return Answer(OK, unverified=unverified, candidates=tuple(candidates),
                  retrieval=tuple(retrieval), timing=timing, seconds=timing['total'], **answer)

  def _first_stage(self, landmark_ids, scores, neighbours, timing) -> Dict[int, float]:
    classifier = {int(landmark): float(score)
                  for landmark, score in zip(landmark_ids, scores) if landmark >= 0}
    if self.settings.first_stage == 'classifier' or neighbours is None:
      return classifier
    started = time.perf_counter()
    similarities, rows = (part[:self.settings.knn_k] for part in neighbours)
    landmarks = np.array([self.index.landmark_of(row) if row >= 0 else -1 for row in rows])
    nearest = knn_scores(similarities, landmarks)
    timing['knn'] = time.perf_counter() - started
    return nearest if self.settings.first_stage == 'knn' else fuse(classifier, nearest)

  def _neighbours(self, embedding, timing) -> Tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of the query's nearest index images: one search that the knn stage,
    the verification order and retrieval all read (each its own prefix)."""
    started = time.perf_counter()
    similarities, rows = self.index.global_search(
        embedding, max(self.settings.knn_k, self.settings.retrieval_depth))
    timing['search'] = time.perf_counter() - started
    return similarities[0], rows[0]

  def _verify(self, jpeg: bytes, proposals, embedding, neighbours, candidates: List[Candidate],
              retrieval: List[str], timing: dict) -> Optional[Candidate]:
    """Verifies the proposals (filling `candidates` and `retrieval`); the verified best or None."""
    if self._verifier is None:
      return None
    index, settings = self.index, self.settings
    features = None
    if settings.verify_top_k or settings.rerank:
      started = time.perf_counter()
      features = self._verifier.extract(tf.io.decode_jpeg(jpeg, channels=3).numpy())
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
        rows = rows[np.argsort(-similarity, kind='stable')][:settings.max_verifications]
      inliers, index_image, comparisons, candidate_row = 0, None, 0, None
      for row in rows:
        _, verification = self._verifier.verify(features, int(row))
        verified_rows[int(row)] = verification
        comparisons += 1
        if verification.num_inliers > inliers or index_image is None:
          inliers, index_image = verification.num_inliers, index.image_id(int(row))
          candidate_row = int(row)
        if ransac.accept(verification, settings.min_inliers):
          break
      candidate = Candidate(landmark, first_stage, inliers, index_image, comparisons)
      candidates.append(candidate)
      if candidate_row is not None and ransac.accept(verified_rows[candidate_row],
                                                     settings.min_inliers) and (
          best is None or candidate.inliers > best.inliers):
        best, answer_row = candidate, candidate_row
    timing['verify'] = time.perf_counter() - started
    started = time.perf_counter()
    retrieval.extend(self._retrieval(features, neighbours[1][:settings.retrieval_depth],
                                     verified_rows, answer_row))
    timing['retrieval'] = time.perf_counter() - started
    return best

  def _to_verify(self, proposals: List[Tuple[int, float]], query_descriptor: np.ndarray,
                 nearest_rows: np.ndarray) -> List[Tuple[int, float]]:
    """The first `--verify_top_k` proposals; if the first stage proposed fewer (the classifier
    returns its top k), the index's other landmarks follow in the order of their nearest image to
    the query, with first-stage confidence 0: so `--verify_top_k` can reach every landmark.

    `nearest_rows` (the query's search) usually names enough landmarks; only if not is the index
    searched deeper, up to 100 images per landmark still wanted."""
    chosen = proposals[:self.settings.verify_top_k]
    if len(chosen) >= self.settings.verify_top_k:
      return chosen
    index = self.index
    proposed = {landmark for landmark, _ in chosen}

    def add_landmarks_of(rows) -> bool:
      for row in rows:
        landmark = index.landmark_of(int(row)) if row >= 0 else None
        if landmark is not None and landmark not in proposed:
          proposed.add(landmark)
          chosen.append((landmark, 0.0))
          if len(chosen) == self.settings.verify_top_k:
            return True
      return False

    depth = min(index.num_images, 100 * self.settings.verify_top_k)
    if not add_landmarks_of(nearest_rows) and len(nearest_rows) < depth:
      # The deeper search starts with the same rows: their landmarks are already in `proposed`.
      add_landmarks_of(index.global_search(query_descriptor, depth)[1][0])
    return chosen

  def _retrieval(self, features: Optional[LocalFeatures], nearest_rows: np.ndarray,
                 verified_rows: Dict[int, ransac.Verification],
                 answer_row: Optional[int]) -> List[str]:
    index, settings = self.index, self.settings
    rows = [int(row) for row in nearest_rows if row >= 0]
    verified = {}
    for row in rows[:settings.rerank] if features is not None else ():
      if row not in verified_rows:
        verified_rows[row] = self._verifier.verify(features, row)[1]
      verified[row] = verified_rows[row]
    # Of recognition's matches beyond the window only the answer's image joins: recognition checks
    # every proposed landmark and stops at its first match, so the other landmarks' matches are
    # mostly false ones; promoting them all cost mAP@100 on the real photos (BUILD_NOTES.md).
    if answer_row is not None:
      verified[answer_row] = verified_rows[answer_row]
    ordered = retrieval_order(rows, verified, settings.min_inliers, index.image_id)
    return [index.image_id(row) for row in ordered[:settings.retrieval_depth]]

  # --- Match pictures --------------------------------------------------------------------------

  def match_picture(self, jpeg: bytes, landmark_id: int,
                    index_image: Optional[str] = None) -> Optional[MatchPicture]:
    """The query drawn beside an index image of `landmark_id`, with their matches (a PNG).

    Args:
      jpeg: the prepared query.
      landmark_id: the landmark.
      index_image: the index image to draw (the one that verified the answer, or the best
        candidate); default: the landmark's first index image.

    Returns:
      The picture, or None without an index, for a landmark or image the index does not hold, or
      when the index image cannot be read (its records were moved or rebuilt since the index).
    """
    if self._verifier is None:
      return None
    index = self.index
    rows = index.images_of(landmark_id)
    row = next((int(r) for r in rows if index.image_id(int(r)) == index_image),
               int(rows[0]) if len(rows) and index_image is None else None)
    if row is None:
      return None
    try:
      # The index keeps each image's place in the records: one read, no scan of the shards.
      stored = index.stored_image(index.image_id(row))
    except (records_lib.RecordsError, indexes.LandmarkIndexError):
      return None
    index_picture = tf.io.decode_jpeg(stored, channels=3).numpy()
    query_image = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    query_features = self._verifier.extract(query_image)
    matches, verification = self._verifier.verify(query_features, row)
    with tempfile.TemporaryDirectory() as folder:
      path = files.join(folder, 'match.png')
      draw.draw_matches(query_image, index_picture, query_features, index.local_features(row),
                        matches, verification.inlier_mask, path)
      with open(path, 'rb') as f:
        png = f.read()
    return MatchPicture(png, index.image_id(row), verification.num_inliers, len(matches))
