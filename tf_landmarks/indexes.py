"""The index folder (`tfl-build-index`): file names, format, checksums, and a typed, checked load.

An index holds, per image of a classifier run's records (the train split, optionally validation
too), the classifier's global descriptor (for retrieval: which index images look like the query)
and its local features (for geometric verification: do the query and an index image show the same
physical place), DELF or SIFT. `index_builder` writes it; every reader (export, prediction, the
report) opens it with `load`, so the format is checked in one place. Reading goes through memory
maps, so opening even GLDv2's index costs milliseconds and each image's features are one
contiguous read.

  load(path, verify=False) -> Index      a finished index, its files checked against index.json
  Index                                  rows name its images:
    .images_of(landmark_id) -> rows      .landmark_of(row), .image_id(row), .num_images
    .local_features(row) -> LocalFeatures
    .global_descriptors                  float32 [images, E], a memory map
    .global_search(descriptors, k) -> (scores, rows), by cosine similarity
    .local_extractor()                   image -> LocalFeatures as the index was built (backend,
                                         settings, PCA): what query images need
    .stored_image(image_id) -> bytes     the image as the records store it (encoded), read alone
    .local, .counts, .global_dim, .splits, .records_dir, .run, .delf_run, …: index.json, typed

Images: local features come from the image as stored in the records (long side at most the records
build's `--max_image_size`, e.g. 640), and their locations are in that STORED image's pixels;
global descriptors come from the classifier's evaluation crop, exactly what the run was validated
on. Each image is indexed once: an id met twice (`tfl-build-records --singletons=duplicate` stores
a one-image landmark's image in train and, distorted, in validation under the same id) keeps its
first occurrence, train before validation.

On-disk layout:

  index.json             written LAST: the mark of a finished index. Format version, the runs'
                         paths and the sha256 of their model.keras, backbone, image size, records
                         folder, backend and extraction settings, counts, every shard with its
                         records file and its image and feature counts, and `checksums`: the size
                         and SHA-256 of every other file of the index (`files.checksums`).
  build_config.json      the settings and checksums an unfinished build was started with;
                         `--resume` continues only with the same ones.
  images.npy             the image table, a structured array with one row per image: image_id
                         (bytes), landmark_id (int64), shard (int32, position in index.json's
                         shard list), offset and count (the image's features in that shard). Sorted
                         by landmark id (stable: within a landmark, record order), so a landmark's
                         images are the contiguous rows `images_of` returns. A row number is the
                         image's name everywhere below.
  record_offsets.npy     int64 [images], in table order: the byte offset of each image's record in
                         its records shard (the shard's `records_file`), so `stored_image` reads
                         one record instead of scanning the records.
  global.npy             float32 [images, E]: the L2-normalised global descriptors, in table order.
  global_ivf.faiss       an IVF index only (--global_search=ivf, or auto above
                         index_builder.AUTO_IVF_ROWS images): a serialised faiss IVF over them,
                         its rows stored as float16 (IndexIVFScalarQuantizer) or float32
                         (IndexIVFFlat) as index.json's global.search.storage says.
  pca.npz                DELF with --pca_dim > 0: the PCA (`local_features.delf.save_pca`), fitted
                         on descriptors sampled from the index's own images; queries must use it.
  shards/<split>-NNNNN.descriptors.npy   float16 [F, D]: the local descriptors of the images of
                         records shard <split>-NNNNN, image after image, each strongest first.
  shards/<split>-NNNNN.keypoints.npy     float32 [F, 4]: (x, y, score, scale) of each feature, x
                         and y in the stored image's pixels (pixel centres at integers).
  shards/<split>-NNNNN.record_offsets.npy   int64: each image's record offset in the records shard.
  shards/<split>-NNNNN.images.npz        that shard's image ids, landmark ids, feature counts and
                         global descriptors. Written after the other three: the mark of a finished
                         shard, which `--resume` skips.

Index shards follow the record shards one to one (1,024 images with tfl-build-records' default
--examples_per_shard). The reader needs local files (memory maps): copy a gs:// index down before
querying it.

Checks when loaded: the size of every file always (one stat each), its SHA-256 when the folder
changed since the last full check or with `verify=True` (`files.verify_checksums`), and with
`verify=True` also that the descriptors and keypoints hold no NaN or infinity. Indexes of the
previous format ('tf-landmarks index v1', before checksums and record offsets) are still read, but
UNVERIFIED: they recorded no checksums, so only `verify=True`'s scan for non-finite values applies,
and `stored_image` needs a rebuild.

Size, estimated for 1.5 M index images (about GLDv2-clean's train split) with the full 1,000
features each (--max_features; DELF's --delf_abs_threshold may keep fewer), decimal units:

  | part                                 | per feature                | per image | 1.5 M images |
  |--------------------------------------|----------------------------|-----------|--------------|
  | DELF, 40-d PCA (default)             | 40 × 2 B + 4 × 4 B = 96 B  | 96 KB     | 144 GB       |
  | DELF, no PCA (ResNet50 conv4 1024-d) | 2048 B + 16 B = 2,064 B    | 2.06 MB   | 3.1 TB       |
  | SIFT (128-d RootSIFT)                | 128 × 2 B + 16 B = 272 B   | 272 KB    | 408 GB       |
  | global, 512-d (gem/arcface heads)    |                            | 2 KB ×2   | 3.1 GB ×2    |
  | global, 2048-d (ResNet50 softmax)    |                            | 8 KB ×2   | 12.3 GB ×2   |
  | image table (16-byte image ids)      |                            | 40 B      | 60 MB        |
  | record offsets                       |                            | 8 B ×2    | 12 MB ×2     |
  | IVF, float16 rows (auto, 512-d)      |                            | 1 KB      | 1.5 GB       |
  | IVF, float32 rows (512-d)            |                            | 2 KB      | 3.1 GB       |

Global descriptors and record offsets are stored twice (×2): in the folder and in the shards'
files, which `--resume` needs. In memory, the global descriptors are held once, by faiss: a reader
holds the IVF (1.5 GB for 512-d float16 rows at 1.5 M images) or, for a flat index, faiss's copy
filled from global.npy's memory map (whose pages the kernel may drop). The build's last step
sorts them into global.npy through a memory-mapped scratch file in the local temporary folder
(3.1 GB at 512-d), so only the IVF it builds is held in memory. The local features stay on disk,
read per image.
"""

import contextlib
import dataclasses
import json
import os
import threading
from typing import Dict, Iterator, NamedTuple, Optional, Sequence, Tuple

import faiss
import numpy as np
import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import records as records_lib
from tf_landmarks import runs
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.local_features import extractor as extractor_lib
from tf_landmarks.models import delf as delf_model

FORMAT = 'tf-landmarks index v2'
# Still read, unverified: no checksums, no record offsets.
PREVIOUS_FORMAT = 'tf-landmarks index v1'
INDEX_JSON = 'index.json'
BUILD_JSON = 'build_config.json'
TABLE_FILE = 'images.npy'
RECORD_OFFSETS_FILE = 'record_offsets.npy'
GLOBAL_FILE = 'global.npy'
IVF_FILE = 'global_ivf.faiss'
PCA_FILE = 'pca.npz'
SHARDS_DIR = 'shards'
DESCRIPTOR_DTYPE = np.float16
KEYPOINT_COLUMNS = ('x', 'y', 'score', 'scale')
_REBUILD = 'rebuild it with tfl-build-index --overwrite'
# Rows per step of the scan for non-finite values: bounds its memory on GLDv2-sized shards.
_FINITE_CHECK_ROWS = 1 << 18
# Rows per step when a flat search index is filled from global.npy's memory map.
_GLOBAL_CHUNK = 65536
# faiss threads of a single-query global search: one flat query over 1 M rows took 2.1-2.4x longer
# (medians of two runs) on 2 threads than on 1, an IVF one 1.07x (bench/bench_global_search.py):
# faiss splits one query's rows between threads that then merge their results.
SINGLE_QUERY_THREADS = 1


@contextlib.contextmanager
def _faiss_threads(threads: Optional[int]) -> Iterator[None]:
  """Runs the block with faiss on at most `threads` threads (None: unchanged), then restores it."""
  previous = faiss.omp_get_max_threads()
  if threads is not None:
    faiss.omp_set_num_threads(min(previous, threads))
  try:
    yield
  finally:
    faiss.omp_set_num_threads(previous)


class LandmarkIndexError(errors.UserError):
  """The index cannot be built or read as asked; the message says what to change."""


class ShardFiles(NamedTuple):
  """One index shard's files, relative to the index folder; `images` is written last."""
  descriptors: str
  keypoints: str
  record_offsets: str
  images: str


def shard_files(name: str) -> ShardFiles:
  """The files of index shard `name` (e.g. 'train-00003'), relative to the index folder."""
  stem = f'{SHARDS_DIR}/{name}'
  return ShardFiles(f'{stem}.descriptors.npy', f'{stem}.keypoints.npy',
                    f'{stem}.record_offsets.npy', f'{stem}.images.npz')


def table_dtype(id_bytes: int) -> np.dtype:
  """The image table's row type, for image ids of at most `id_bytes` bytes."""
  return np.dtype([('image_id', f'S{max(id_bytes, 1)}'), ('landmark_id', '<i8'),
                   ('shard', '<i4'), ('offset', '<i8'), ('count', '<i4')])


def is_finished(path: str) -> bool:
  """Whether `path` holds a finished index (its index.json exists)."""
  return tf.io.gfile.exists(files.join(path, INDEX_JSON))


def is_started(path: str) -> bool:
  """Whether `path` holds a started build (its settings fingerprint exists)."""
  return tf.io.gfile.exists(files.join(path, BUILD_JSON))


def write_description(path: str, description: dict, names: Sequence[str]) -> dict:
  """Writes index.json, the mark of a finished index: call it last.

  Args:
    path: the index folder.
    description: what index.json says (runs, settings, counts, shards).
    names: every other file of the index, relative to `path`, all written: their sizes and
      SHA-256 go into index.json for `load` to verify.

  Returns:
    index.json's content: `description` with the format and the checksums.
  """
  # No stamp here: the index's files are its content alone, the same bytes from every runner
  # (the Beam build is compared with the local one file by file); the first load leaves it.
  written = {'format': FORMAT, **description, 'checksums': files.checksums(path, names)}
  files.write_atomically(files.join(path, INDEX_JSON), json.dumps(written, indent=1))
  return written


def read_description(path: str) -> dict:
  """index.json of a finished index of this format or the previous one.

  Raises:
    LandmarkIndexError: not JSON, or of another format.
  """
  index_json = files.join(path, INDEX_JSON)
  try:
    return files.read_versioned_json(index_json, FORMAT, 'an index', 'rebuild it',
                                     LandmarkIndexError)
  except LandmarkIndexError as error:
    try:
      return files.read_versioned_json(index_json, PREVIOUS_FORMAT, 'an index', 'rebuild it',
                                       LandmarkIndexError)
    except LandmarkIndexError:
      raise error from None


@dataclasses.dataclass(frozen=True)
class LocalSettings:
  """How the index's local features were extracted, which queries must repeat.

  Attributes:
    backend: 'delf' or 'sift'.
    descriptor_dim: the stored descriptors' size (after DELF's PCA).
    max_features: features kept per image, strongest first.
    delf_scales: DELF's pyramid scales (None for SIFT).
    delf_abs_threshold: DELF's attention threshold.
    pca: the PCA's file in the index folder, or None.
  """
  backend: str
  descriptor_dim: int
  max_features: int
  delf_scales: Optional[Tuple[float, ...]]
  delf_abs_threshold: float
  pca: Optional[str]


@dataclasses.dataclass(frozen=True)
class Counts:
  """What the index holds: images (each once), their landmarks and features, and shards."""
  images: int
  landmarks: int
  features: int
  shards: int


class Index:
  """A finished index, opened for queries by `load` (memory maps; the files must be local).

  Rows are the image table's rows (see the module docstring): a landmark's images are contiguous,
  and a row names one image everywhere.

  Attributes:
    path: the index folder.
    metadata: the whole of index.json.
    has_checksums: False for an index of the previous format, read unverified.
    run, run_model_sha256: the classifier run that gave the global descriptors, and its model's
      digest when the index was built.
    delf_run, delf_model_sha256: the DELF run of a DELF index (else None).
    records_dir: the records folder whose images are indexed.
    splits: the records splits indexed.
    local: the local features' extraction settings.
    global_dim: the global descriptors' size.
    counts: images, landmarks, features, shards.
  """

  def __init__(self, path: str, metadata: dict, *, nprobe: Optional[int], verify: bool):
    self.path = path
    self.metadata = metadata
    self.has_checksums = metadata['format'] == FORMAT
    local = metadata['local']
    scales = local['delf_scales']
    self.local = LocalSettings(
        backend=local['backend'], descriptor_dim=int(local['descriptor_dim']),
        max_features=int(local['max_features']),
        delf_scales=tuple(float(scale) for scale in scales) if scales else None,
        delf_abs_threshold=float(local['delf_abs_threshold']), pca=local['pca'])
    self.counts = Counts(**{key: int(metadata['counts'][key])
                            for key in ('images', 'landmarks', 'features', 'shards')})
    self.global_dim = int(metadata['global']['dim'])
    self.run, self.run_model_sha256 = metadata['run'], metadata.get('run_model_sha256')
    self.delf_run, self.delf_model_sha256 = metadata['delf_run'], metadata.get('delf_model_sha256')
    self.records_dir = metadata['records_dir']
    self.splits = tuple(metadata['splits'])
    try:
      self._table = np.load(os.path.join(path, TABLE_FILE), mmap_mode='r')
      self._global = np.load(os.path.join(path, GLOBAL_FILE), mmap_mode='r')
      self._record_offsets = np.load(os.path.join(path, RECORD_OFFSETS_FILE), mmap_mode='r') \
          if self.has_checksums else None
    except (OSError, ValueError) as error:
      raise LandmarkIndexError(f'{path} is damaged: {error}; {_REBUILD}') from None
    images = self.counts.images
    if self._table.shape != (images,) or self._global.shape != (images, self.global_dim) or (
        self._record_offsets is not None and self._record_offsets.shape != (images,)):
      raise LandmarkIndexError(f'{path} is damaged: its tables do not hold the {images} images '
                               f'index.json lists; {_REBUILD}')
    self._landmarks = np.array(self._table['landmark_id'])
    self._distinct_landmarks = np.unique(self._landmarks)
    self._shards: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    self._search: Optional[faiss.Index] = None
    self._search_lock = threading.Lock()
    self._nprobe = nprobe
    if verify:
      self._check_finite()

  @property
  def num_images(self) -> int:
    return len(self._landmarks)

  @property
  def landmark_ids(self) -> np.ndarray:
    """The distinct landmark ids of the index images, ascending."""
    return self._distinct_landmarks

  @property
  def global_descriptors(self) -> np.ndarray:
    """float32 [images, E], row i the descriptor of image row i (a read-only memory map)."""
    return self._global

  def _check_row(self, row: int) -> int:
    row = int(row)
    if not 0 <= row < self.num_images:
      raise IndexError(f'row {row} is outside 0..{self.num_images - 1}')
    return row

  def images_of(self, landmark_id: int) -> np.ndarray:
    """The rows of the landmark's images (int64, ascending; empty for a landmark not indexed)."""
    start = np.searchsorted(self._landmarks, landmark_id, side='left')
    stop = np.searchsorted(self._landmarks, landmark_id, side='right')
    return np.arange(start, stop, dtype=np.int64)

  def landmark_of(self, row: int) -> int:
    return int(self._landmarks[self._check_row(row)])

  def image_id(self, row: int) -> str:
    return bytes(self._table[self._check_row(row)]['image_id']).decode('utf-8', errors='replace')

  def _shard(self, number: int) -> Tuple[np.ndarray, np.ndarray]:
    """The memory-mapped (descriptors, keypoints) of shard `number`, checked on first use."""
    if number not in self._shards:
      entry = self.metadata['shards'][number]
      names = shard_files(entry['name'])
      try:
        descriptors = np.load(os.path.join(self.path, names.descriptors), mmap_mode='r')
        keypoints = np.load(os.path.join(self.path, names.keypoints), mmap_mode='r')
      except (OSError, ValueError) as error:
        raise LandmarkIndexError(f'shard {entry["name"]} of {self.path} is missing or damaged '
                                 f'({error}); {_REBUILD}') from None
      if descriptors.shape != (entry['features'], self.local.descriptor_dim) or \
          keypoints.shape != (entry['features'], len(KEYPOINT_COLUMNS)):
        raise LandmarkIndexError(f'shard {entry["name"]} of {self.path} does not hold the '
                                 f'{entry["features"]} features index.json lists; {_REBUILD}')
      self._shards[number] = descriptors, keypoints
    return self._shards[number]

  def local_features(self, row: int) -> LocalFeatures:
    """The local features of image `row`: locations in its stored image's pixels, descriptors as
    float32 rows of unit length (stored as float16, so within ~1e-3 of the extraction's)."""
    entry = self._table[self._check_row(row)]
    descriptors, keypoints = self._shard(int(entry['shard']))
    start, stop = int(entry['offset']), int(entry['offset']) + int(entry['count'])
    rows = np.asarray(descriptors[start:stop], np.float32)
    rows /= np.sqrt(np.maximum(np.sum(rows * rows, axis=1, keepdims=True), 1e-12))
    points = np.asarray(keypoints[start:stop])
    return LocalFeatures(locations=np.ascontiguousarray(points[:, :2]), descriptors=rows,
                         scores=np.ascontiguousarray(points[:, 2]),
                         scales=np.ascontiguousarray(points[:, 3]))

  def _search_index(self) -> faiss.Index:
    """The faiss index of the global descriptors, the only copy of them in this process's memory:
    read from global_ivf.faiss, or filled from global.npy's memory map, whose pages the kernel may
    drop once read."""
    # Built by the first search of whichever thread comes first (tfl-predict answers queries on
    # several threads, tfl-serve on its request threads): the others wait for the whole index, never
    # search one still being filled.
    with self._search_lock:
      if self._search is None:
        kind = self.metadata['global']['search']
        if kind['kind'] == 'ivf':
          search = faiss.read_index(os.path.join(self.path, IVF_FILE))
          search.nprobe = self._nprobe or kind['nprobe']
        else:
          search = faiss.IndexFlatIP(self.global_dim)
          for start in range(0, self.num_images, _GLOBAL_CHUNK):
            search.add(np.ascontiguousarray(self._global[start:start + _GLOBAL_CHUNK]))
        self._search = search
    return self._search

  def global_search(self, descriptors: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The `k` index images most similar to each query descriptor (cosine similarity).

    One query searches with faiss on SINGLE_QUERY_THREADS threads (the setting is restored after);
    several keep faiss's thread count, which splits the queries between the threads.

    Args:
      descriptors: [Q, E] or [E] global descriptors of the queries (normalised here).
      k: neighbours per query (at most the number of images).

    Returns:
      (scores float32 [Q, k], rows int64 [Q, k]), best first; rows are -1 where an IVF search
      found fewer than k.

    Raises:
      ValueError: descriptors of another size, or k < 1.
    """
    queries = np.atleast_2d(np.asarray(descriptors, np.float32))
    if queries.ndim != 2 or queries.shape[1] != self.global_dim:
      raise ValueError(f'expected global descriptors [Q, {self.global_dim}], got shape '
                       f'{np.shape(descriptors)}')
    if k < 1:
      raise ValueError(f'k must be at least 1, got {k}')
    queries = queries / np.sqrt(np.maximum(np.sum(queries * queries, axis=1, keepdims=True),
                                           1e-12))
    search = self._search_index()
    with _faiss_threads(SINGLE_QUERY_THREADS if len(queries) == 1 else None):
      scores, rows = search.search(np.ascontiguousarray(queries), min(k, self.num_images))
    return scores, rows.astype(np.int64)

  def pca(self) -> Optional[delf_features.Pca]:
    """The index's DELF PCA, which query descriptors need too (None without one)."""
    return delf_features.load_pca(os.path.join(self.path, self.local.pca)) if self.local.pca \
        else None

  def local_extractor(self) -> extractor_lib.LocalExtractor:
    """The extraction the index was built with (backend, settings, PCA), for query images.

    Raises:
      LandmarkIndexError: the DELF run is gone, or its model changed since the build.
    """
    local = self.local
    if local.backend == 'sift':
      return extractor_lib.make_local_extractor('sift', max_features=local.max_features)
    delf_run = runs.load_delf_run(self.delf_run, 'delf_run')
    if delf_run.model_sha256() != self.delf_model_sha256:
      raise LandmarkIndexError(f'{delf_run.file(runs.MODEL_FILE)}, which built the index '
                               f'{self.path}, changed since; rebuild the index')
    return extractor_lib.make_local_extractor(
        'delf', max_features=local.max_features, delf=delf_run.load_model(delf_model.DelfModel),
        delf_scales=local.delf_scales, delf_abs_threshold=local.delf_abs_threshold,
        pca=self.pca())

  def stored_image(self, image_id: str) -> bytes:
    """The encoded image (JPEG) `image_id` as its records shard stores it, read at its offset.

    Raises:
      KeyError: the image is not in the index.
      LandmarkIndexError: an index of the previous format, which has no record offsets.
      records.RecordsError: the records shard is gone, damaged, or rebuilt since the index.
    """
    if self._record_offsets is None:
      raise LandmarkIndexError(f'{self.path} is an index of the previous format, without the '
                               f'record offsets of its images; {_REBUILD}')
    rows = np.flatnonzero(self._table['image_id'] == image_id.encode())
    if not len(rows):
      raise KeyError(f'image {image_id} is not in the index {self.path}')
    row = int(rows[0])
    shard = self.metadata['shards'][int(self._table[row]['shard'])]
    return records_lib.read_stored_image(files.join(self.records_dir, shard['records_file']),
                                         int(self._record_offsets[row]), image_id)

  def _check_finite(self) -> None:
    """Refuses NaN or infinite descriptors or keypoints, which would reach faiss and RANSAC."""
    arrays = [(os.path.join(self.path, GLOBAL_FILE), self._global)]
    for number, entry in enumerate(self.metadata['shards']):
      names = shard_files(entry['name'])
      descriptors, keypoints = self._shard(number)
      arrays += [(os.path.join(self.path, names.descriptors), descriptors),
                 (os.path.join(self.path, names.keypoints), keypoints)]
    for path, array in arrays:
      for start in range(0, len(array), _FINITE_CHECK_ROWS):
        if not np.all(np.isfinite(array[start:start + _FINITE_CHECK_ROWS])):
          raise LandmarkIndexError(f'{path} holds NaN or infinite values; {_REBUILD}')


def load(path: str, verify: bool = False, *, nprobe: Optional[int] = None) -> Index:
  """Opens a finished index for queries, its files checked against index.json.

  Args:
    path: the index folder (local).
    verify: hash every file whatever the last check found, and scan the descriptors, keypoints
      and global descriptors for NaN or infinity.
    nprobe: IVF cells searched per query (an index with an IVF); default: the build's.

  Raises:
    LandmarkIndexError: not a finished index, a remote path, an incomplete index.json, or a file
      missing, truncated, changed or holding non-finite values (the message names it).
  """
  if files.is_remote(path):
    raise LandmarkIndexError(f'{path}: the index is read through memory maps, which need local '
                             'files; copy the folder down first')
  if not is_finished(path):
    if is_started(path):
      raise LandmarkIndexError(f'{path} holds an unfinished index (no {INDEX_JSON}); finish it '
                               'with tfl-build-index --resume')
    raise LandmarkIndexError(f'{path} is not an index (no {INDEX_JSON}); build one with '
                             'tfl-build-index')
  metadata = read_description(path)
  if metadata['format'] == FORMAT:
    checksums = metadata.get('checksums')
    if not isinstance(checksums, dict):
      raise LandmarkIndexError(f'{files.join(path, INDEX_JSON)} lists no checksums; {_REBUILD}')
    files.verify_checksums(path, checksums, what='the index', hint=_REBUILD,
                           error=LandmarkIndexError, full=verify)
  try:
    return Index(path, metadata, nprobe=nprobe, verify=verify)
  except (KeyError, TypeError, ValueError) as error:
    raise LandmarkIndexError(f'{files.join(path, INDEX_JSON)} is incomplete or damaged '
                             f'({type(error).__name__}: {error}); {_REBUILD}') from None
