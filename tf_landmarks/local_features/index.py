"""The retrieval and verification index: global descriptors and local features of the index images.

`build_index` runs a classifier run (`--run`) over the images of its records folder (the train
split, optionally validation too) and stores, per image, the classifier's global descriptor (for
retrieval: which index images look like the query) and its local features (for geometric
verification: do the query and an index image show the same physical place), DELF features of a
DELF run (`--delf_run`) or SIFT. `Index` reads a finished index at query time through memory maps,
so opening even GLDv2's index costs milliseconds and each image's features are one contiguous read.

  build_index(IndexConfig) -> dict       builds (or with resume=True finishes) an index; returns
                                         what it writes to index.json
  Index(path)                            a finished index; rows name its images:
    .images_of(landmark_id) -> rows      .landmark_of(row), .image_id(row), .num_images
    .local_features(row) -> LocalFeatures
    .global_descriptors                  float32 [images, E], a memory map
    .global_search(descriptors, k) -> (scores, rows), by cosine similarity
    .local_extractor()                   image -> LocalFeatures as the index was built (backend,
                                         settings, PCA): what query images need

Images: local features come from the image as stored in the records (long side at most the build's
`--max_image_size`, e.g. 640), and their locations are in that STORED image's pixels; global
descriptors come from the classifier's evaluation crop (`data.make_dataset(..., training=False,
backbone=None)`), exactly what the run was validated on.

On-disk layout (`--output_dir`, default `<run>/index`):

  index.json             written LAST: the mark of a finished index. Format version, the runs'
                         paths and the sha256 of their model.keras, backbone, image size, records
                         folder, backend and extraction settings, counts, and every shard with its
                         image and feature counts.
  build_config.json      the settings and checksums an unfinished build was started with;
                         `--resume` continues only with the same ones.
  images.npy             the image table, a structured array with one row per image: image_id
                         (bytes), landmark_id (int64), shard (int32, position in index.json's
                         shard list), offset and count (the image's features in that shard). Sorted
                         by landmark id (stable: within a landmark, record order), so a landmark's
                         images are the contiguous rows `images_of` returns. A row number is the
                         image's name everywhere below.
  global.npy             float32 [images, E]: the L2-normalised global descriptors, in table order.
  global_ivf.faiss       with --global_search=ivf only: a serialised faiss IndexIVFFlat over them.
  pca.npz                DELF with --pca_dim > 0: the PCA (`local_features.delf.save_pca`), fitted
                         on descriptors sampled from the index's own images; queries must use it.
  shards/<split>-NNNNN.descriptors.npy   float16 [F, D]: the local descriptors of the images of
                         records shard <split>-NNNNN, image after image, each strongest first.
  shards/<split>-NNNNN.keypoints.npy     float32 [F, 4]: (x, y, score, scale) of each feature, x
                         and y in the stored image's pixels (pixel centres at integers).
  shards/<split>-NNNNN.images.npz        that shard's image ids, landmark ids, feature counts and
                         global descriptors. Written after the two arrays: the mark of a finished
                         shard, which `--resume` skips.

Index shards follow the record shards one to one (1,024 images with tfl-build-records' default
--examples_per_shard): each is a unit of work, written under temporary names and renamed into
place, so an interrupted build continues with `--resume` from the first unfinished shard, and a
folder without index.json is never taken for an index. The reader needs local files (memory maps):
copy a gs:// index down before querying it.

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
  | IVF (--global_search=ivf, 512-d)     |                            | 2 KB      | 3.1 GB       |

Global descriptors are stored twice (×2): in global.npy and in the shards' .images.npz, which
`--resume` needs. The build's last step (sorting them into global.npy) and querying (faiss copies
them) hold them in memory, 3.1 GB for 512-d; the local features stay on disk, read per image.
"""

import dataclasses
import datetime
import io
import json
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import faiss
import numpy as np
import tensorflow as tf
import tqdm

from tf_landmarks import data
from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import records as records_lib
from tf_landmarks import runs
from tf_landmarks import schema
from tf_landmarks import settings
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.local_features import sift
from tf_landmarks.models import classifier
from tf_landmarks.models import delf as delf_model
from tf_landmarks.settings import setting

FORMAT = 'tf-landmarks index v1'
INDEX_JSON = 'index.json'
# Set in what `build_index` returns when --resume found the index already finished.
ALREADY_FINISHED = 'already_finished'
BUILD_JSON = 'build_config.json'
TABLE_FILE = 'images.npy'
GLOBAL_FILE = 'global.npy'
IVF_FILE = 'global_ivf.faiss'
PCA_FILE = 'pca.npz'
SHARDS_DIR = 'shards'
BACKENDS = ('delf', 'sift')
SPLITS = {'train': ('train',), 'train+validation': ('train', 'validation')}
SIFT_DIM = 128
DESCRIPTOR_DTYPE = np.float16
KEYPOINT_COLUMNS = ('x', 'y', 'score', 'scale')
# faiss wants about 39 training vectors per IVF cell; fewer gives poorly placed centroids.
_MIN_VECTORS_PER_CELL = 39
_TEMPORARY = '.part'


class LandmarkIndexError(errors.UserError):
  """The index cannot be built or read as asked; the message says what to change."""


@dataclasses.dataclass
class IndexConfig:
  """Everything `build_index` needs; `tfl-build-index` defines one flag per field."""
  run: Optional[str] = setting(
      None, 'The classifier run (tfl-train): its run.json names the records folder, backbone and '
      'image size, its model.keras gives the global descriptors.', required=True)
  local_features: str = setting(
      'delf', 'Local features for verification: delf (needs --delf_run) or sift (RootSIFT, '
      'needs no training).', choices=BACKENDS)
  delf_run: Optional[str] = setting(
      None, 'The DELF run (tfl-train --mode=delf, attention stage) whose model.keras extracts the '
      'DELF features.')
  output_dir: Optional[str] = setting(None, 'The index folder; default: <run>/index.',
                                      runtime=True)
  split: str = setting('train', 'Records splits whose images are indexed.',
                       choices=tuple(SPLITS))
  max_features: int = setting(1000, 'Local features kept per image, the strongest first.',
                              lower=1)
  delf_scales: str = setting(
      ','.join(map(str, delf_features.DEFAULT_SCALES)), 'DELF image pyramid scales, '
      'comma-separated.')
  delf_abs_threshold: float = setting(
      0.0, 'DELF: keep only cells whose attention reaches this (0 keeps every cell).', lower=0.0)
  pca_dim: int = setting(
      40, 'DELF: descriptors are shortened to this many PCA dimensions (0: kept whole). The PCA is '
      'fitted on the index\'s own descriptors and saved in the index.', lower=0)
  pca_whiten: bool = setting(False, 'DELF: whiten the PCA projections.')
  pca_images: int = setting(500, 'DELF: images sampled (the first of every shard) to fit the '
                            'PCA.', lower=1)
  pca_descriptors: int = setting(
      100000, 'DELF: at most this many descriptors (drawn at random from the sampled images) fit '
      'the PCA.', lower=2)
  global_search: str = setting(
      'flat', 'Global search structure: flat (exact inner product) or ivf (faiss IndexIVFFlat, '
      'for large indexes: searches only --ivf_nprobe of --ivf_nlist cells).',
      choices=('flat', 'ivf'))
  ivf_nlist: int = setting(0, 'IVF cells; 0: 4·sqrt(images), at most images / 39.', lower=0)
  ivf_nprobe: int = setting(32, 'IVF cells searched per query (the reader may change it).',
                            lower=1)
  batch_size: int = setting(64, 'Images per batch of the global descriptor model.', lower=1,
                            runtime=True)
  resume: bool = setting(False, 'Continue an interrupted build in --output_dir, skipping its '
                         'finished shards (same runs and settings).', runtime=True)
  overwrite: bool = setting(False, 'Replace an index already in --output_dir.', runtime=True)
  progress: bool = setting(True, 'Show progress bars.', runtime=True)


LocalExtractor = Callable[[np.ndarray], LocalFeatures]


def make_local_extractor(backend: str, *, max_features: int,
                         delf: Optional[delf_model.DelfModel] = None,
                         delf_scales: Sequence[float] = delf_features.DEFAULT_SCALES,
                         delf_abs_threshold: float = 0.0,
                         pca: Optional[delf_features.Pca] = None) -> LocalExtractor:
  """The function uint8 RGB image [H, W, 3] → `LocalFeatures` of an index's backend.

  Args:
    backend: 'delf' or 'sift'.
    max_features: features kept per image, strongest first.
    delf: the DELF model (backend 'delf').
    delf_scales: DELF's pyramid scales.
    delf_abs_threshold: DELF's attention threshold.
    pca: DELF's descriptor PCA, if any.
  """
  if backend == 'sift':
    return lambda image: sift.extract_sift(image, max_features=max_features)
  return delf_features.DelfExtractor(delf, scales=delf_scales, max_feature_num=max_features,
                                     abs_threshold=delf_abs_threshold, pca=pca)


@dataclasses.dataclass
class _Inputs:
  """The checked runs and records of a build."""
  run: runs.Run
  classifier: classifier.LandmarkClassifier
  records: records_lib.Records
  checksums: Dict[str, Optional[str]]
  delf_run: Optional[runs.Run] = None
  delf: Optional[delf_model.DelfModel] = None


def _open_inputs(config: IndexConfig) -> _Inputs:
  run = runs.load_classifier_run(config.run, 'run')
  try:
    records = records_lib.load(run.records_dir)
  except records_lib.RecordsError as error:
    raise LandmarkIndexError(f'the records folder of --run={config.run} '
                             f'({run.records_dir}): {error}') from None
  if records.num_classes != run.num_classes:
    raise LandmarkIndexError(f'{run.records_dir} now has {records.num_classes} classes, the run '
                             f'was trained on {run.num_classes}; it was rebuilt since')
  inputs = _Inputs(run, run.load_model(classifier.LandmarkClassifier), records,
                   {'run_model_sha256': run.model_sha256()})
  if config.local_features == 'delf':
    delf_run = runs.load_delf_run(config.delf_run, 'delf_run')
    inputs.delf_run = delf_run
    inputs.delf = delf_run.load_model(delf_model.DelfModel)
    inputs.checksums['delf_model_sha256'] = delf_run.model_sha256()
  return inputs


def _check_config(config: IndexConfig) -> List[float]:
  """Checks the settings; returns the DELF scales as numbers."""
  settings.check(config)
  if not config.run:
    raise LandmarkIndexError('--run=<classifier run> is required')
  if config.local_features == 'delf' and not config.delf_run:
    raise LandmarkIndexError('--local_features=delf needs --delf_run=<run of tfl-train '
                             '--mode=delf>, or use --local_features=sift')
  if config.local_features == 'sift' and config.delf_run:
    raise LandmarkIndexError('--delf_run belongs to --local_features=delf')
  try:
    scales = [float(scale) for scale in config.delf_scales.split(',')]
  except ValueError:
    scales = []
  if not scales or not all(math.isfinite(scale) and scale > 0 for scale in scales):
    raise LandmarkIndexError(f'--delf_scales must be one or more positive numbers, '
                             f'comma-separated, got {config.delf_scales!r}')
  return scales


# --- Building --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Unit:
  """One records shard: the unit of work, and one index shard."""
  name: str
  split: str
  path: str
  examples: int
  records: records_lib.Records  # A view of the records with only this shard in its split.

  def files(self, index_dir: str) -> Tuple[str, str, str]:
    """(descriptors, keypoints, images) paths; the images file is written last."""
    stem = files.join(index_dir, SHARDS_DIR, self.name)
    return f'{stem}.descriptors.npy', f'{stem}.keypoints.npy', f'{stem}.images.npz'


def _units(records: records_lib.Records, splits: Sequence[str]) -> List[_Unit]:
  units = []
  for split in splits:
    entries = records.manifest['splits'][split]['shards']
    for number, (path, entry) in enumerate(zip(records.files(split), entries)):
      if not entry['examples']:
        continue
      # make_dataset reads a split's shards from the manifest: a view listing one shard makes it
      # read just this unit, with the pipeline (and so the crop) of evaluation.
      view = {**records.manifest['splits'], split: {'examples': entry['examples'],
                                                    'shards': [entry]}}
      units.append(_Unit(f'{split}-{number:05d}', split, path, entry['examples'],
                         dataclasses.replace(records, manifest={**records.manifest,
                                                                'splits': view})))
  return units


def _translated(dataset: tf.data.Dataset, path: str):
  """Iterates `dataset`, turning the records' read and decode failures into one-line errors."""
  iterator = iter(dataset)
  while True:
    try:
      element = next(iterator)
    except StopIteration:
      return
    except tf.errors.DataLossError as error:
      raise records_lib.RecordsError(f'{path} is corrupt or truncated '
                                     f'({records_lib.plain_tf_message(error.message)})') from None
    except tf.errors.InvalidArgumentError as error:
      raise records_lib.RecordsError(
          f'{path} holds an image that does not decode '
          f'({records_lib.plain_tf_message(error.message)}); rebuild the records') from None
    yield element


def _stored_images(path: str) -> tf.data.Dataset:
  """(image id, label, decoded stored image) of each example of a records shard, in order."""

  def parse(record):
    example = schema.parse_example(record)
    return (example[schema.ID], example[schema.LABEL],
            tf.io.decode_jpeg(example[schema.ENCODED], channels=3))

  return tf.data.TFRecordDataset(path).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(4)


def _fit_pca(config: IndexConfig, units: Sequence[_Unit], delf: delf_model.DelfModel,
             scales: Sequence[float]) -> delf_features.Pca:
  """A PCA of DELF descriptors sampled from the first images of every shard."""
  extract = make_local_extractor('delf', max_features=config.max_features, delf=delf,
                                 delf_scales=scales, delf_abs_threshold=config.delf_abs_threshold)
  total = min(config.pca_images, sum(unit.examples for unit in units))
  per_unit = math.ceil(total / len(units))
  per_image = math.ceil(config.pca_descriptors / total)
  rng = np.random.default_rng(0)
  samples = [np.zeros((0, delf.descriptor_dim), np.float32)]
  sampled = 0
  with tqdm.tqdm(total=total, unit='img', desc='PCA sample', disable=not config.progress) as bar:
    for unit in units:
      take = min(per_unit, total - sampled)
      for _, _, image in _translated(_stored_images(unit.path).take(take), unit.path):
        descriptors = extract(image.numpy()).descriptors
        if len(descriptors) > per_image:
          descriptors = descriptors[np.sort(rng.choice(len(descriptors), per_image,
                                                       replace=False))]
        samples.append(descriptors)
        sampled += 1
        bar.update(1)
  try:
    return delf_features.fit_pca(np.concatenate(samples), config.pca_dim, config.pca_whiten)
  except delf_model.DelfError as error:
    raise LandmarkIndexError(f'--pca_dim={config.pca_dim}: {error}') from None


def _write_npy(path: str, array_chunks: Iterable[np.ndarray], dtype,
               shape: Tuple[int, ...]) -> None:
  """Writes an .npy file from row chunks under a temporary name, then renames it into place.

  Streaming the rows keeps a permuted copy of a large array (global.npy) out of memory.
  """
  temporary = path + _TEMPORARY
  with tf.io.gfile.GFile(temporary, 'wb') as f:
    header = {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
              'shape': tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)
    for chunk in array_chunks:
      f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _save_npz(path: str, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  files.write_atomically(path, buffer.getvalue())


def _load_npz(path: str) -> Dict[str, np.ndarray]:
  with tf.io.gfile.GFile(path, 'rb') as f:
    content = f.read()
  with np.load(io.BytesIO(content), allow_pickle=False) as arrays:
    return {name: arrays[name] for name in arrays.files}


class _Builder:
  """Extracts and writes the shards of one build."""

  def __init__(self, config: IndexConfig, inputs: _Inputs, index_dir: str,
               extract: LocalExtractor, descriptor_dim: int):
    self.config, self.inputs, self.index_dir = config, inputs, index_dir
    self.extract, self.descriptor_dim = extract, descriptor_dim
    self.image_size = inputs.run.image_size
    self.embed = tf.function(inputs.classifier.embed, input_signature=[
        tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)])

  def build_unit(self, unit: _Unit, bar: tqdm.tqdm) -> None:
    """Extracts one shard's local features and global descriptors and writes its files."""
    landmark_ids = self.inputs.records.landmark_ids
    ids, landmarks, counts = [], [], []
    descriptors = [np.zeros((0, self.descriptor_dim), DESCRIPTOR_DTYPE)]
    keypoints = [np.zeros((0, len(KEYPOINT_COLUMNS)), np.float32)]
    for image_id, label, image in _translated(_stored_images(unit.path), unit.path):
      label = int(label)
      if not 0 <= label < len(landmark_ids):
        name = image_id.numpy().decode('utf-8', errors='replace')
        raise records_lib.RecordsError(f'{unit.path}: image {name} has label {label}, outside '
                                       f'0..{len(landmark_ids) - 1}; rebuild the records')
      features = self.extract(image.numpy())
      ids.append(image_id.numpy())
      landmarks.append(landmark_ids[label])
      counts.append(len(features))
      descriptors.append(features.descriptors.astype(DESCRIPTOR_DTYPE))
      keypoints.append(np.column_stack([features.locations, features.scores,
                                        features.scales]).astype(np.float32))
      bar.update(1)
    global_ids, embeddings = [], []
    dataset = data.make_dataset(unit.records, unit.split, training=False,
                                batch_size=self.config.batch_size,
                                config=data.InputConfig(image_size=self.image_size),
                                backbone=None, with_ids=True)
    for images, _, batch_ids in _translated(dataset, unit.path):
      embeddings.append(self.embed(images).numpy())
      global_ids.extend(batch_ids.numpy())
    if len(ids) != unit.examples:
      raise records_lib.RecordsError(f'{unit.path} holds {len(ids)} examples, the manifest says '
                                     f'{unit.examples}; rebuild the records')
    if global_ids != ids:
      raise records_lib.RecordsError(f'{unit.path} gave its images in two different orders')
    descriptors_path, keypoints_path, images_path = unit.files(self.index_dir)
    stacked_descriptors, stacked_keypoints = np.concatenate(descriptors), np.concatenate(keypoints)
    _write_npy(descriptors_path, [stacked_descriptors], DESCRIPTOR_DTYPE,
               stacked_descriptors.shape)
    _write_npy(keypoints_path, [stacked_keypoints], np.float32, stacked_keypoints.shape)
    _save_npz(images_path, ids=np.array(ids, dtype=bytes),
              landmark_ids=np.array(landmarks, np.int64), counts=np.array(counts, np.int32),
              global_descriptors=np.concatenate(embeddings).astype(np.float32))


def _prepare_output(config: IndexConfig, fingerprint: dict) -> bool:
  """Creates, checks or clears --output_dir as --resume and --overwrite say.

  Returns:
    True when --resume finds the index finished with the same runs and settings: there is
    nothing to do.
  """
  output_dir = config.output_dir
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise LandmarkIndexError(f'--output_dir={output_dir} is a file, not a folder')
  finished = tf.io.gfile.exists(files.join(output_dir, INDEX_JSON))
  started = tf.io.gfile.exists(files.join(output_dir, BUILD_JSON))
  if (finished or started) and config.overwrite:
    tf.io.gfile.rmtree(output_dir)
    finished = started = False
  if finished and not config.resume:
    raise LandmarkIndexError(f'{output_dir} holds a finished index; use another --output_dir or '
                             '--overwrite')
  if started and not config.resume:
    raise LandmarkIndexError(f'{output_dir} holds an unfinished index; pass --resume to continue '
                             'it, or --overwrite to start again')
  if started:
    with tf.io.gfile.GFile(files.join(output_dir, BUILD_JSON)) as f:
      previous = json.load(f)
    changed = sorted(key for key in fingerprint if previous.get(key) != fingerprint[key])
    if changed:
      raise LandmarkIndexError(f'{output_dir} holds an index begun with other runs or settings '
                               f'({", ".join(changed)}); use --overwrite to start again')
    if finished:
      return True
    # Temporary files of the interrupted build: never renamed into place, so never needed.
    for folder in (output_dir, files.join(output_dir, SHARDS_DIR)):
      for leftover in tf.io.gfile.glob(files.join(folder, f'*{_TEMPORARY}*')):
        tf.io.gfile.remove(leftover)
    tf.io.gfile.makedirs(files.join(output_dir, SHARDS_DIR))
    return False
  if tf.io.gfile.exists(output_dir) and tf.io.gfile.listdir(output_dir):
    raise LandmarkIndexError(f'--output_dir={output_dir} holds other files; choose a new or empty '
                             'folder')
  tf.io.gfile.makedirs(files.join(output_dir, SHARDS_DIR))
  files.write_atomically(files.join(output_dir, BUILD_JSON), json.dumps(fingerprint, indent=1))
  return False


def _ivf_cells(config: IndexConfig, count: int) -> int:
  wanted = config.ivf_nlist or round(4 * math.sqrt(count))
  return max(1, min(wanted, count // _MIN_VECTORS_PER_CELL))


def _finish(config: IndexConfig, inputs: _Inputs, units: Sequence[_Unit], descriptor_dim: int,
            splits: Sequence[str], scales: Sequence[float],
            pca: Optional[delf_features.Pca]) -> dict:
  """Joins the shards' image lists into the sorted table and global.npy; writes index.json last."""
  output_dir = config.output_dir
  parts = [_load_npz(unit.files(output_dir)[2]) for unit in units]
  global_dims = {part['global_descriptors'].shape[1] for part in parts}
  if len(global_dims) != 1:
    raise LandmarkIndexError(f'the shards of {output_dir} hold global descriptors of sizes '
                             f'{sorted(global_dims)}; rebuild with --overwrite')
  ids = np.concatenate([part['ids'] for part in parts])
  landmarks = np.concatenate([part['landmark_ids'] for part in parts])
  counts = np.concatenate([part['counts'] for part in parts])
  shard_numbers = np.concatenate([np.full(len(part['ids']), number, np.int32)
                                  for number, part in enumerate(parts)])
  offsets = np.concatenate([np.cumsum(part['counts'], dtype=np.int64) - part['counts']
                            for part in parts])
  order = np.argsort(landmarks, kind='stable')
  table = np.zeros(len(ids), dtype=[('image_id', f'S{max(ids.dtype.itemsize, 1)}'),
                                    ('landmark_id', '<i8'), ('shard', '<i4'), ('offset', '<i8'),
                                    ('count', '<i4')])
  table['image_id'], table['landmark_id'], table['shard'] = ids, landmarks, shard_numbers
  table['offset'], table['count'] = offsets, counts
  _write_npy(files.join(output_dir, TABLE_FILE), [table[order]], table.dtype, table.shape)
  global_descriptors = np.concatenate([part['global_descriptors'] for part in parts])
  global_dim = global_descriptors.shape[1]
  chunk = 65536
  _write_npy(files.join(output_dir, GLOBAL_FILE),
             (global_descriptors[order[start:start + chunk]]
              for start in range(0, len(order), chunk)), np.float32, global_descriptors.shape)
  search = {'kind': config.global_search}
  if config.global_search == 'ivf':
    cells = _ivf_cells(config, len(order))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(global_dim), global_dim, cells,
                             faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = 0  # The same descriptors give the same cells.
    sorted_descriptors = np.ascontiguousarray(global_descriptors[order])
    ivf.train(sorted_descriptors)
    ivf.add(sorted_descriptors)
    files.write_atomically(files.join(output_dir, IVF_FILE),
                           faiss.serialize_index(ivf).tobytes())
    search.update(nlist=cells, nprobe=min(config.ivf_nprobe, cells))
  index = {
      'format': FORMAT,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'run': config.run, 'delf_run': config.delf_run, **inputs.checksums,
      'backbone': inputs.run.backbone, 'image_size': inputs.run.image_size,
      'head': inputs.run.metadata.get('head'),
      'delf': inputs.delf_run.metadata['delf'] if inputs.delf_run else None,
      'records_dir': inputs.records.path,
      'records_created': inputs.records.manifest.get('created'), 'splits': list(splits),
      'local': {'backend': config.local_features, 'descriptor_dim': descriptor_dim,
                'descriptor_dtype': np.dtype(DESCRIPTOR_DTYPE).name,
                'keypoint_columns': list(KEYPOINT_COLUMNS), 'max_features': config.max_features,
                'delf_scales': list(scales) if config.local_features == 'delf' else None,
                'delf_abs_threshold': config.delf_abs_threshold,
                'pca': PCA_FILE if pca is not None else None},
      'global': {'dim': global_dim, 'dtype': 'float32', 'search': search},
      'counts': {'images': int(len(order)), 'landmarks': int(len(np.unique(landmarks))),
                 'features': int(counts.sum()), 'shards': len(units)},
      'shards': [{'name': unit.name, 'images': int(len(part['ids'])),
                  'features': int(part['counts'].sum())} for unit, part in zip(units, parts)],
      'settings': settings.as_dict(config),
  }
  files.write_atomically(files.join(output_dir, INDEX_JSON), json.dumps(index, indent=1))
  return index


def build_index(config: IndexConfig) -> dict:
  """Builds (or, with `config.resume`, finishes) the index described in the module docstring.

  Returns:
    The index description, also written to `<output_dir>/index.json`. With `config.resume` and
    an index already finished in the output folder (same runs and settings), nothing is built or
    written: its index.json, with `ALREADY_FINISHED` set.

  Raises:
    LandmarkIndexError, records.RecordsError: unusable settings, runs, records or output folder.
  """
  scales = _check_config(config)
  if not config.output_dir:
    config = dataclasses.replace(config, output_dir=files.join(config.run, 'index'))
  inputs = _open_inputs(config)
  if inputs.delf is not None and config.pca_dim > inputs.delf.descriptor_dim:
    raise LandmarkIndexError(f'--pca_dim={config.pca_dim} is more than the '
                             f'{inputs.delf.descriptor_dim} dimensions of the DELF descriptors')
  splits = [split for split in SPLITS[config.split] if inputs.records.num_examples(split)]
  units = _units(inputs.records, splits)
  if not units:
    raise LandmarkIndexError(f'{inputs.records.path} has no {config.split} images to index')
  fingerprint = {**settings.fingerprint(config), **inputs.checksums,
                 'records_created': inputs.records.manifest.get('created')}
  if _prepare_output(config, fingerprint):
    finished = files.read_versioned_json(files.join(config.output_dir, INDEX_JSON), FORMAT,
                                         'an index', 'rebuild it', LandmarkIndexError)
    return {**finished, ALREADY_FINISHED: True}
  pca = None
  if config.local_features == 'delf':
    descriptor_dim = config.pca_dim or inputs.delf.descriptor_dim
    if config.pca_dim:
      pca_path = files.join(config.output_dir, PCA_FILE)
      if tf.io.gfile.exists(pca_path):  # Fitted by the interrupted build (written whole).
        pca = delf_features.load_pca(pca_path)
      else:
        pca = _fit_pca(config, units, inputs.delf, scales)
        delf_features.save_pca(pca, pca_path)
  else:
    descriptor_dim = SIFT_DIM
  extract = make_local_extractor(config.local_features, max_features=config.max_features,
                                 delf=inputs.delf, delf_scales=scales,
                                 delf_abs_threshold=config.delf_abs_threshold, pca=pca)
  builder = _Builder(config, inputs, config.output_dir, extract, descriptor_dim)
  pending = [unit for unit in units
             if not all(tf.io.gfile.exists(path) for path in unit.files(config.output_dir))]
  done_images = sum(unit.examples for unit in units) - sum(unit.examples for unit in pending)
  if config.progress and len(pending) < len(units):
    print(f'resuming: {len(units) - len(pending)} of {len(units)} shards already done', flush=True)
  with tqdm.tqdm(total=sum(unit.examples for unit in units), initial=done_images, unit='img',
                 desc='index', disable=not config.progress, smoothing=0.1) as bar:
    for unit in pending:
      builder.build_unit(unit, bar)
  return _finish(config, inputs, units, descriptor_dim, splits, scales, pca)


# --- Reading ---------------------------------------------------------------------------------


class Index:
  """A finished index, opened for queries (memory maps; the files must be local).

  Rows are the image table's rows (see the module docstring): a landmark's images are contiguous,
  and a row names one image everywhere.

  Args:
    path: the index folder.
    nprobe: IVF cells searched per query (an --global_search=ivf index); default: the build's.

  Raises:
    LandmarkIndexError: not a finished index, a remote path, or damaged files.
  """

  def __init__(self, path: str, *, nprobe: Optional[int] = None):
    if files.is_remote(path):
      raise LandmarkIndexError(f'{path}: the index is read through memory maps, which need local '
                               'files; copy the folder down first')
    self.path = path
    self.metadata = self._read_metadata(path)
    try:
      self._table = np.load(os.path.join(path, TABLE_FILE), mmap_mode='r')
      self._global = np.load(os.path.join(path, GLOBAL_FILE), mmap_mode='r')
    except (OSError, ValueError) as error:
      raise LandmarkIndexError(f'{path} is damaged: {error}; rebuild it with --overwrite') from None
    counts = self.metadata['counts']
    if self._table.shape != (counts['images'],) or self._global.shape != (
        counts['images'], self.metadata['global']['dim']):
      raise LandmarkIndexError(f'{path} is damaged: its tables do not hold the '
                               f'{counts["images"]} images index.json lists; rebuild it')
    self._landmarks = np.array(self._table['landmark_id'])
    self._distinct_landmarks = np.unique(self._landmarks)
    self._shards: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
    self._search: Optional[faiss.Index] = None
    self._nprobe = nprobe

  @staticmethod
  def _read_metadata(path: str) -> dict:
    metadata_path = os.path.join(path, INDEX_JSON)
    if not os.path.exists(metadata_path):
      if os.path.exists(os.path.join(path, BUILD_JSON)):
        raise LandmarkIndexError(f'{path} holds an unfinished index (no {INDEX_JSON}); finish it '
                                 'with tfl-build-index --resume')
      raise LandmarkIndexError(f'{path} is not an index (no {INDEX_JSON}); build one with '
                               'tfl-build-index')
    return files.read_versioned_json(metadata_path, FORMAT, 'an index', 'rebuild it',
                                     LandmarkIndexError)

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
      stem = os.path.join(self.path, SHARDS_DIR, entry['name'])
      local = self.metadata['local']
      try:
        descriptors = np.load(f'{stem}.descriptors.npy', mmap_mode='r')
        keypoints = np.load(f'{stem}.keypoints.npy', mmap_mode='r')
      except (OSError, ValueError) as error:
        raise LandmarkIndexError(f'shard {entry["name"]} of {self.path} is missing or damaged '
                                 f'({error}); rebuild the index') from None
      if descriptors.shape != (entry['features'], local['descriptor_dim']) or \
          keypoints.shape != (entry['features'], len(KEYPOINT_COLUMNS)):
        raise LandmarkIndexError(f'shard {entry["name"]} of {self.path} does not hold the '
                                 f'{entry["features"]} features index.json lists; rebuild it')
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
    if self._search is None:
      search = self.metadata['global']['search']
      if search['kind'] == 'ivf':
        self._search = faiss.deserialize_index(np.fromfile(os.path.join(self.path, IVF_FILE),
                                                           np.uint8))
        self._search.nprobe = self._nprobe or search['nprobe']
      else:
        self._search = faiss.IndexFlatIP(self._global.shape[1])
        self._search.add(np.ascontiguousarray(self._global))
    return self._search

  def global_search(self, descriptors: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """The `k` index images most similar to each query descriptor (cosine similarity).

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
    if queries.ndim != 2 or queries.shape[1] != self._global.shape[1]:
      raise ValueError(f'expected global descriptors [Q, {self._global.shape[1]}], got shape '
                       f'{np.shape(descriptors)}')
    if k < 1:
      raise ValueError(f'k must be at least 1, got {k}')
    queries = queries / np.sqrt(np.maximum(np.sum(queries * queries, axis=1, keepdims=True),
                                           1e-12))
    scores, rows = self._search_index().search(np.ascontiguousarray(queries),
                                               min(k, self.num_images))
    return scores, rows.astype(np.int64)

  def pca(self) -> Optional[delf_features.Pca]:
    """The index's DELF PCA, which query descriptors need too (None without one)."""
    name = self.metadata['local']['pca']
    return delf_features.load_pca(os.path.join(self.path, name)) if name else None

  def local_extractor(self) -> LocalExtractor:
    """The extraction the index was built with (backend, settings, PCA), for query images.

    Raises:
      LandmarkIndexError: the DELF run is gone, or its model changed since the build.
    """
    local = self.metadata['local']
    if local['backend'] == 'sift':
      return make_local_extractor('sift', max_features=local['max_features'])
    delf_run = runs.load_delf_run(self.metadata['delf_run'], 'delf_run')
    if delf_run.model_sha256() != self.metadata['delf_model_sha256']:
      raise LandmarkIndexError(f'{delf_run.file(runs.MODEL_FILE)}, which built the index '
                               f'{self.path}, changed since; rebuild the index')
    return make_local_extractor('delf', max_features=local['max_features'],
                                delf=delf_run.load_model(delf_model.DelfModel),
                                delf_scales=local['delf_scales'],
                                delf_abs_threshold=local['delf_abs_threshold'], pca=self.pca())
