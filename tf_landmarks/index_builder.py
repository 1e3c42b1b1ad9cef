"""Builds an index (`tfl-build-index`): a classifier run's global descriptors and the local features
of its records' images, in the format `indexes` owns.

`build_index` runs a classifier run (`--run`) over the images of its records folder (the train
split, optionally validation too) and stores, per image, the classifier's global descriptor and its
local features, DELF features of a DELF run (`--delf_run`) or SIFT; the layout and its size at
GLDv2 scale are in `tf_landmarks/indexes.py`, which also reads it.

  build_index(IndexConfig) -> dict       builds (or with resume=True finishes) an index; returns
                                         what it writes to index.json
  global_search_kind(setting, images)    'flat' or 'ivf': what --global_search gives `images` images
  ivf_cells(images, requested=0), ivf_probes(images, cells, requested=0)   the IVF's cells and
                                         the cells searched per query (the measured rules)
  build_global_ivf(descriptors, cells, storage) -> faiss.Index   the IVF of the global descriptors

Each records shard is a unit of work and gives one index shard, written under temporary names
unique to the attempt and renamed into place, so an interrupted build continues with `--resume`
from the first unfinished shard, and a folder without index.json is never taken for an index. One build at a time writes a
folder (a lock held while it runs). The last step joins the shards' image lists into the sorted
table, keeping each image id once (its first occurrence, train before validation), sorts the global
descriptors into global.npy through a memory-mapped scratch file (never whole in memory), builds the
IVF above AUTO_IVF_ROWS images (--global_search=auto; BUILD_NOTES.md, "Global search at scale"), and
writes index.json with the checksums of every file.

`--runner=beam` builds the shards as an Apache Beam pipeline (`tf_landmarks/index_beam.py`): this
module checks the settings, runs and output folder and fits the PCA as for a local build, the
pipeline's workers build the unfinished shards with the local build's `ShardBuilder`, and this
module finishes the index with the same last step; the files are the local build's, byte for byte.

Images: local features come from the image as stored in the records; global descriptors from the
classifier's evaluation crop (`data.make_dataset(..., training=False, backbone=None)`), exactly
what the run was validated on.
"""

import dataclasses
import datetime
import io
import json
import math
import os
import tempfile
import uuid
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import faiss
import numpy as np
import tensorflow as tf
import tqdm

from tf_landmarks import data
from tf_landmarks import files
from tf_landmarks import indexes
from tf_landmarks import records as records_lib
from tf_landmarks import runners
from tf_landmarks import runs
from tf_landmarks import schema
from tf_landmarks import settings
from tf_landmarks.indexes import LandmarkIndexError
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.local_features import extractor as extractor_lib
from tf_landmarks.models import classifier
from tf_landmarks.models import delf as delf_model
from tf_landmarks.settings import setting

# Set in what `build_index` returns when --resume found the index already finished.
ALREADY_FINISHED = 'already_finished'
SPLITS = {'train': ('train',), 'train+validation': ('train', 'validation')}
# faiss wants about 39 training vectors per IVF cell; fewer gives poorly placed centroids.
_MIN_VECTORS_PER_CELL = 39
GLOBAL_SEARCHES = ('auto', 'flat', 'ivf')
IVF_STORAGES = ('float16', 'float32')
# --global_search=auto builds an IVF above this many images, flat up to it: one exact search over
# more rows took longer than the 5 ms target (bench/bench_global_search.py, BUILD_NOTES.md
# "Global search at scale").
AUTO_IVF_ROWS = 20_000
# --ivf_nprobe=0 searches the cells that hold about this many rows: at 1 M rows 66 of 4,000 cells
# (the bench's 64 of 4,096 took 4 ms per float16 search, recall@100 1.000 on its default mixture and
# 0.908 on the harder one); at fewer rows, whose cells are smaller, a larger share of them
# (bench/bench_global_search.py, BUILD_NOTES.md "Global search at scale").
IVF_SCANNED_ROWS = 16384
# Descriptors per step when global.npy and the IVF are filled: bounds the memory of both.
_GLOBAL_CHUNK = 65536
_TEMPORARY = '.part'


@dataclasses.dataclass
class IndexConfig:
  """Everything `build_index` needs; `tfl-build-index` defines one flag per field."""
  run: Optional[str] = setting(
      None, 'The classifier run (tfl-train): its run.json names the records folder, backbone and '
      'image size, its model.keras gives the global descriptors.', required=True)
  local_features: str = setting(
      'delf', 'Local features for verification: delf (needs --delf_run) or sift (RootSIFT, '
      'needs no training).', choices=extractor_lib.BACKENDS)
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
      'auto', 'Global search structure: flat (exact inner product), ivf (faiss IVF: searches only '
      '--ivf_nprobe of --ivf_nlist cells), or auto: flat up to AUTO_IVF_ROWS images (the size at '
      'which one exact search stops meeting 5 ms, bench/bench_global_search.py), ivf above.',
      choices=GLOBAL_SEARCHES)
  ivf_nlist: int = setting(0, 'IVF cells; 0: 4·sqrt(images), at most images / 39.', lower=0)
  ivf_nprobe: int = setting(
      0, 'IVF cells searched per query (the reader may change it); 0: the cells that hold about '
      'IVF_SCANNED_ROWS (16,384) images, ceil(cells · 16384 / images).', lower=0)
  ivf_storage: str = setting(
      'float16', 'How the IVF holds each descriptor: float16 (half the memory, the same recall '
      'in bench/bench_global_search.py) or float32.', choices=IVF_STORAGES)
  batch_size: int = setting(64, 'Images per batch of the global descriptor model.', lower=1,
                            runtime=True)
  resume: bool = setting(False, 'Continue an interrupted build in --output_dir, skipping its '
                         'finished shards (same runs and settings).', runtime=True)
  overwrite: bool = setting(False, 'Replace an index already in --output_dir.', runtime=True)
  progress: bool = setting(True, 'Show progress bars.', runtime=True)
  runner: str = runners.runner_setting(
      'the shards one after another in this process',
      'the shards, one records shard per work item, writing the same files')
  beam_pipeline_options: Optional[List[str]] = runners.pipeline_options_setting()


@dataclasses.dataclass
class Inputs:
  """The checked runs and records of a build."""
  run: runs.Run
  classifier: classifier.LandmarkClassifier
  records: records_lib.Records
  checksums: Dict[str, Optional[str]]
  delf_run: Optional[runs.Run] = None
  delf: Optional[delf_model.DelfModel] = None


def open_inputs(config: IndexConfig) -> Inputs:
  """The runs (their models loaded) and records of `config`, checked.

  Raises:
    LandmarkIndexError, records.RecordsError: a run or the records cannot be used.
  """
  run = runs.load_classifier_run(config.run, 'run')
  try:
    records = records_lib.load(run.records_dir)
  except records_lib.RecordsError as error:
    raise LandmarkIndexError(f'the records folder of --run={config.run} '
                             f'({run.records_dir}): {error}') from None
  if records.num_classes != run.num_classes:
    raise LandmarkIndexError(f'{run.records_dir} now has {records.num_classes} classes, the run '
                             f'was trained on {run.num_classes}; it was rebuilt since')
  inputs = Inputs(run, run.load_model(classifier.LandmarkClassifier), records,
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
  runners.check(config.runner, config.beam_pipeline_options, LandmarkIndexError)
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
class Unit:
  """One records shard: the unit of work, and one index shard."""
  name: str
  split: str
  path: str
  examples: int
  records_file: str  # Relative to the records folder.
  records: records_lib.Records  # A view of the records with only this shard in its split.

  def files(self, index_dir: str) -> indexes.ShardFiles:
    """The index shard's paths; the images file is written last."""
    return indexes.ShardFiles(*(files.join(index_dir, name)
                                for name in indexes.shard_files(self.name)))


def _splits(config: IndexConfig, records: records_lib.Records) -> List[str]:
  """The splits --split indexes that hold images."""
  return [split for split in SPLITS[config.split] if records.num_examples(split)]


def work_units(config: IndexConfig, records: records_lib.Records) -> List[Unit]:
  """The build's units of work, its records shards that hold images, in index order."""
  units = []
  for split in _splits(config, records):
    entries = records.manifest['splits'][split]['shards']
    for number, (path, entry) in enumerate(zip(records.files(split), entries)):
      if not entry['examples']:
        continue
      # make_dataset reads a split's shards from the manifest: a view listing one shard makes it
      # read just this unit, with the pipeline (and so the crop) of evaluation.
      view = {**records.manifest['splits'], split: {'examples': entry['examples'],
                                                    'shards': [entry]}}
      units.append(Unit(f'{split}-{number:05d}', split, path, entry['examples'], entry['file'],
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
  """(image id, label, decoded stored image, record bytes) of each example of a records shard, in
  order."""

  def parse(record):
    example = schema.parse_example(record)
    return (example[schema.ID], example[schema.LABEL],
            tf.io.decode_jpeg(example[schema.ENCODED], channels=3), tf.strings.length(record))

  return tf.data.TFRecordDataset(path).map(
      parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(4)


def _fit_pca(config: IndexConfig, units: Sequence[Unit], delf: delf_model.DelfModel,
             scales: Sequence[float]) -> delf_features.Pca:
  """A PCA of DELF descriptors sampled from the first images of every shard."""
  total = min(config.pca_images, sum(unit.examples for unit in units))
  per_unit = math.ceil(total / len(units))

  def sample(bar: tqdm.tqdm) -> Iterator[np.ndarray]:
    sampled = 0
    for unit in units:
      take = min(per_unit, total - sampled)
      for _, _, image, _ in _translated(_stored_images(unit.path).take(take), unit.path):
        yield image.numpy()
        sampled += 1
        bar.update(1)

  with tqdm.tqdm(total=total, unit='img', desc='PCA sample', disable=not config.progress) as bar:
    try:
      return delf_features.fit_pca_to_images(
          delf, sample(bar), dim=config.pca_dim, whiten=config.pca_whiten,
          descriptors_per_image=math.ceil(config.pca_descriptors / total), scales=scales,
          max_feature_num=config.max_features, abs_threshold=config.delf_abs_threshold)
    except delf_model.DelfError as error:
      raise LandmarkIndexError(f'--pca_dim={config.pca_dim}: {error}') from None


def _temporary(path: str) -> str:
  """A temporary name for `path` unique to this attempt: two attempts at one shard (a retried Beam
  bundle beside a straggler) never write into each other's file."""
  return f'{path}{_TEMPORARY}-{uuid.uuid4().hex}'


def _write_npy(path: str, array_chunks: Iterable[np.ndarray], dtype,
               shape: Tuple[int, ...]) -> None:
  """Writes an .npy file from row chunks under a temporary name, then renames it into place.

  Streaming the rows keeps a permuted copy of a large array (global.npy) out of memory.
  """
  temporary = _temporary(path)
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
  temporary = _temporary(path)
  with tf.io.gfile.GFile(temporary, 'wb') as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(temporary, path, overwrite=True)


def _load_npy(path: str) -> np.ndarray:
  with tf.io.gfile.GFile(path, 'rb') as f:
    return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _load_npz(path: str) -> Dict[str, np.ndarray]:
  with tf.io.gfile.GFile(path, 'rb') as f:
    content = f.read()
  with np.load(io.BytesIO(content), allow_pickle=False) as arrays:
    return {name: arrays[name] for name in arrays.files}


def _descriptor_dim(config: IndexConfig, inputs: Inputs) -> int:
  """The size of the local descriptors the index stores."""
  if config.local_features == 'delf':
    return config.pca_dim or inputs.delf.descriptor_dim
  return extractor_lib.SIFT_DIM


class ShardBuilder:
  """Extracts and writes the shards of one build: the local build's, and each Beam worker's.

  Its DELF PCA is read from the index folder, where the build writes it before any shard.
  """

  def __init__(self, config: IndexConfig, inputs: Inputs, scales: Sequence[float]):
    self.config, self.inputs, self.index_dir = config, inputs, config.output_dir
    self.descriptor_dim = _descriptor_dim(config, inputs)
    pca = None
    if config.local_features == 'delf' and config.pca_dim:
      pca = delf_features.load_pca(files.join(config.output_dir, indexes.PCA_FILE))
    self.extract = extractor_lib.make_local_extractor(
        config.local_features, max_features=config.max_features, delf=inputs.delf,
        delf_scales=scales, delf_abs_threshold=config.delf_abs_threshold, pca=pca)
    self.image_size = inputs.run.image_size
    self.embed = tf.function(inputs.classifier.embed, input_signature=[
        tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)])

  def build_unit(self, unit: Unit, bar: Optional[tqdm.tqdm] = None) -> None:
    """Extracts one shard's local features and global descriptors and writes its files, each
    renamed into place when whole, the images file last.

    Raises:
      LandmarkIndexError, records.RecordsError: the shard's records or features are unusable.
    """
    landmark_ids = self.inputs.records.landmark_ids
    ids, landmarks, counts, record_bytes = [], [], [], []
    descriptors = [np.zeros((0, self.descriptor_dim), indexes.DESCRIPTOR_DTYPE)]
    keypoints = [np.zeros((0, len(indexes.KEYPOINT_COLUMNS)), np.float32)]
    for image_id, label, image, size in _translated(_stored_images(unit.path), unit.path):
      label = int(label)
      if not 0 <= label < len(landmark_ids):
        name = image_id.numpy().decode('utf-8', errors='replace')
        raise records_lib.RecordsError(f'{unit.path}: image {name} has label {label}, outside '
                                       f'0..{len(landmark_ids) - 1}; rebuild the records')
      features = self.extract(image.numpy())
      ids.append(image_id.numpy())
      landmarks.append(landmark_ids[label])
      counts.append(len(features))
      record_bytes.append(int(size) + records_lib.RECORD_FRAMING_BYTES)
      descriptors.append(features.descriptors.astype(indexes.DESCRIPTOR_DTYPE))
      keypoints.append(np.column_stack([features.locations, features.scores,
                                        features.scales]).astype(np.float32))
      if bar is not None:
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
    stacked_descriptors, stacked_keypoints = np.concatenate(descriptors), np.concatenate(keypoints)
    global_descriptors = np.concatenate(embeddings).astype(np.float32)
    # Checksums would vouch for NaN written now, and faiss fails on it at query time.
    if not np.all(np.isfinite(global_descriptors)):
      raise LandmarkIndexError(f'the classifier of --run={self.config.run} gives NaN or infinite '
                               f'global descriptors for images of {unit.path}; the run diverged: '
                               'train it again')
    if not (np.all(np.isfinite(stacked_descriptors)) and np.all(np.isfinite(stacked_keypoints))):
      raise LandmarkIndexError(f'the {self.config.local_features} features of images of '
                               f'{unit.path} hold NaN or infinite values' +
                               ('; the --delf_run diverged: train it again'
                                if self.config.local_features == 'delf' else ''))
    paths = unit.files(self.index_dir)
    _write_npy(paths.descriptors, [stacked_descriptors], indexes.DESCRIPTOR_DTYPE,
               stacked_descriptors.shape)
    _write_npy(paths.keypoints, [stacked_keypoints], np.float32, stacked_keypoints.shape)
    # A record's offset is the framed size of the records before it.
    offsets = np.cumsum([0] + record_bytes[:-1], dtype=np.int64)
    _write_npy(paths.record_offsets, [offsets], np.int64, offsets.shape)
    _save_npz(paths.images, ids=np.array(ids, dtype=bytes),
              landmark_ids=np.array(landmarks, np.int64), counts=np.array(counts, np.int32),
              global_descriptors=global_descriptors)


def _prepare_output(config: IndexConfig, fingerprint: dict) -> bool:
  """Checks, clears or starts --output_dir (which exists, locked) as --resume and --overwrite say.

  Returns:
    True when --resume finds the index finished with the same runs and settings: there is
    nothing to do.
  """
  output_dir = config.output_dir
  finished, started = indexes.is_finished(output_dir), indexes.is_started(output_dir)
  others = [name.rstrip('/') for name in tf.io.gfile.listdir(output_dir)
            if name.rstrip('/') != files.LOCK_FILE]
  if (finished or started) and config.overwrite:
    files.clear_folder(output_dir)
    finished = started = False
    others = []
  if finished and not config.resume:
    raise LandmarkIndexError(f'{output_dir} holds a finished index; use another --output_dir or '
                             '--overwrite')
  if started and not config.resume:
    raise LandmarkIndexError(f'{output_dir} holds an unfinished index; pass --resume to continue '
                             'it, or --overwrite to start again')
  shards_dir = files.join(output_dir, indexes.SHARDS_DIR)
  if started:
    with tf.io.gfile.GFile(files.join(output_dir, indexes.BUILD_JSON)) as f:
      previous = json.load(f)
    changed = sorted(key for key in fingerprint if previous.get(key) != fingerprint[key])
    if changed:
      raise LandmarkIndexError(f'{output_dir} holds an index begun with other runs or settings '
                               f'({", ".join(changed)}); use --overwrite to start again')
    if finished:
      return True
    # Temporary files of the interrupted build: never renamed into place, so never needed.
    for folder in (output_dir, shards_dir):
      for leftover in tf.io.gfile.glob(files.join(folder, f'*{_TEMPORARY}*')):
        tf.io.gfile.remove(leftover)
    tf.io.gfile.makedirs(shards_dir)
    return False
  if others:
    raise LandmarkIndexError(f'--output_dir={output_dir} holds other files; choose a new or empty '
                             'folder')
  tf.io.gfile.makedirs(shards_dir)
  files.write_atomically(files.join(output_dir, indexes.BUILD_JSON),
                         json.dumps(fingerprint, indent=1))
  return False


def global_search_kind(global_search: str, images: int) -> str:
  """The structure --global_search=`global_search` gives an index of `images` images: flat or ivf.
  """
  if global_search == 'auto':
    return 'ivf' if images > AUTO_IVF_ROWS else 'flat'
  return global_search


def ivf_cells(images: int, requested: int = 0) -> int:
  """The IVF cells of an index of `images` images: `requested` (--ivf_nlist), or with 0
  4·sqrt(images); at most images / 39, the fewest training rows per cell faiss accepts."""
  wanted = requested or round(4 * math.sqrt(images))
  return max(1, min(wanted, images // _MIN_VECTORS_PER_CELL))


def ivf_probes(images: int, cells: int, requested: int = 0) -> int:
  """The IVF cells searched per query: `requested` (--ivf_nprobe), or with 0 those that hold about
  IVF_SCANNED_ROWS of the `images` rows; at most `cells`."""
  wanted = requested or math.ceil(cells * IVF_SCANNED_ROWS / images)
  return max(1, min(wanted, cells))


def build_global_ivf(descriptors: np.ndarray, cells: int, storage: str) -> faiss.Index:
  """An inner-product IVF over `descriptors` (rows in index order; a memory map is read in chunks).

  Args:
    descriptors: float32 [images, E], L2-normalised.
    cells: IVF cells (k-means centroids, seeded: the same descriptors give the same cells).
    storage: one of IVF_STORAGES, how the IVF holds each descriptor.

  Returns:
    The filled faiss index, its ids the row numbers.
  """
  dim = descriptors.shape[1]
  quantizer = faiss.IndexFlatIP(dim)
  if storage == 'float16':
    ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, cells, faiss.ScalarQuantizer.QT_fp16,
                                        faiss.METRIC_INNER_PRODUCT)
  else:
    ivf = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
  ivf.cp.seed = 0
  # k-means samples at most 256 rows per cell from what it is given, reading a memory map in place.
  ivf.train(descriptors)
  for start in range(0, len(descriptors), _GLOBAL_CHUNK):
    ivf.add(np.ascontiguousarray(descriptors[start:start + _GLOBAL_CHUNK], np.float32))
  return ivf


def _finish(config: IndexConfig, inputs: Inputs, units: Sequence[Unit], descriptor_dim: int,
            splits: Sequence[str], scales: Sequence[float],
            pca: Optional[delf_features.Pca]) -> dict:
  """Joins the shards' image lists into the sorted table, its record offsets and global.npy,
  keeping each image id once; writes index.json last."""
  output_dir = config.output_dir
  # The shards' global descriptors are dropped as they are read and read again below, in index
  # order, into a file-backed array: at GLDv2 scale they never sit in memory whole.
  parts, global_dims = [], set()
  for unit in units:
    part = _load_npz(unit.files(output_dir).images)
    global_dims.add(part.pop('global_descriptors').shape[1])
    parts.append(part)
  if len(global_dims) != 1:
    raise LandmarkIndexError(f'the shards of {output_dir} hold global descriptors of sizes '
                             f'{sorted(global_dims)}; rebuild with --overwrite')
  record_offsets = np.concatenate([_load_npy(unit.files(output_dir).record_offsets)
                                   for unit in units])
  ids = np.concatenate([part['ids'] for part in parts])
  landmarks = np.concatenate([part['landmark_ids'] for part in parts])
  counts = np.concatenate([part['counts'] for part in parts])
  shard_numbers = np.concatenate([np.full(len(part['ids']), number, np.int32)
                                  for number, part in enumerate(parts)])
  offsets = np.concatenate([np.cumsum(part['counts'], dtype=np.int64) - part['counts']
                            for part in parts])
  if record_offsets.shape != ids.shape:
    raise LandmarkIndexError(f'the shards of {output_dir} list {len(ids)} images and '
                             f'{len(record_offsets)} record offsets; rebuild with --overwrite')
  # An id met again (--singletons=duplicate stores a one-image landmark's image in train and
  # validation) keeps its first occurrence: units come in split order, train first.
  _, first = np.unique(ids, return_index=True)
  kept = np.sort(first)
  order = kept[np.argsort(landmarks[kept], kind='stable')]
  table = np.zeros(len(ids), dtype=indexes.table_dtype(ids.dtype.itemsize))
  table['image_id'], table['landmark_id'], table['shard'] = ids, landmarks, shard_numbers
  table['offset'], table['count'] = offsets, counts
  _write_npy(files.join(output_dir, indexes.TABLE_FILE), [table[order]], table.dtype,
             order.shape)
  _write_npy(files.join(output_dir, indexes.RECORD_OFFSETS_FILE), [record_offsets[order]],
             np.int64, order.shape)
  global_dim = global_dims.pop()
  written = [indexes.TABLE_FILE, indexes.RECORD_OFFSETS_FILE, indexes.GLOBAL_FILE]
  search = {'kind': global_search_kind(config.global_search, len(order))}
  with tempfile.TemporaryDirectory(prefix='tfl-build-index-') as scratch:
    # Local even when the index goes to gs://: a memory map of the sorted descriptors, whose pages
    # the kernel may drop, instead of a copy in memory.
    in_order = np.lib.format.open_memmap(os.path.join(scratch, indexes.GLOBAL_FILE), mode='w+',
                                         dtype=np.float32, shape=(len(order), global_dim))
    position = np.full(len(ids), -1, np.int64)
    position[order] = np.arange(len(order))
    first_row = 0
    for unit, part in zip(units, parts):
      rows = _load_npz(unit.files(output_dir).images)['global_descriptors']
      if len(rows) != len(part['ids']):
        raise LandmarkIndexError(f'{unit.files(output_dir).images} holds {len(part["ids"])} image '
                                 f'ids and {len(rows)} global descriptors; rebuild with '
                                 '--overwrite')
      targets = position[first_row:first_row + len(rows)]
      in_order[targets[targets >= 0]] = rows[targets >= 0]
      first_row += len(rows)
    in_order.flush()
    _write_npy(files.join(output_dir, indexes.GLOBAL_FILE),
               (in_order[start:start + _GLOBAL_CHUNK]
                for start in range(0, len(order), _GLOBAL_CHUNK)), np.float32,
               (len(order), global_dim))
    if search['kind'] == 'ivf':
      cells = ivf_cells(len(order), config.ivf_nlist)
      # Written to the scratch folder by faiss, not serialised into memory: no second copy.
      scratch_ivf = os.path.join(scratch, indexes.IVF_FILE)
      faiss.write_index(build_global_ivf(in_order, cells, config.ivf_storage), scratch_ivf)
      ivf_path = files.join(output_dir, indexes.IVF_FILE)
      tf.io.gfile.copy(scratch_ivf, ivf_path + _TEMPORARY, overwrite=True)
      tf.io.gfile.rename(ivf_path + _TEMPORARY, ivf_path, overwrite=True)
      search.update(nlist=cells, nprobe=ivf_probes(len(order), cells, config.ivf_nprobe),
                    storage=config.ivf_storage)
      written.append(indexes.IVF_FILE)
    del in_order
  if pca is not None:
    written.append(indexes.PCA_FILE)
  for unit in units:
    written.extend(indexes.shard_files(unit.name))
  return indexes.write_description(output_dir, {
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'run': config.run, 'delf_run': config.delf_run, **inputs.checksums,
      'backbone': inputs.run.backbone, 'image_size': inputs.run.image_size,
      'head': inputs.run.metadata.get('head'),
      'delf': inputs.delf_run.metadata['delf'] if inputs.delf_run else None,
      'records_dir': inputs.records.path,
      'records_created': inputs.records.manifest.get('created'), 'splits': list(splits),
      'local': {'backend': config.local_features, 'descriptor_dim': descriptor_dim,
                'descriptor_dtype': np.dtype(indexes.DESCRIPTOR_DTYPE).name,
                'keypoint_columns': list(indexes.KEYPOINT_COLUMNS),
                'max_features': config.max_features,
                'delf_scales': list(scales) if config.local_features == 'delf' else None,
                'delf_abs_threshold': config.delf_abs_threshold,
                'pca': indexes.PCA_FILE if pca is not None else None},
      'global': {'dim': global_dim, 'dtype': 'float32', 'search': search},
      'counts': {'images': int(len(order)), 'landmarks': int(len(np.unique(landmarks[order]))),
                 'features': int(counts[order].sum()), 'shards': len(units)},
      'shards': [{'name': unit.name, 'records_file': unit.records_file,
                  'images': int(len(part['ids'])), 'features': int(part['counts'].sum())}
                 for unit, part in zip(units, parts)],
      'settings': settings.as_dict(config),
  }, written)


def build_index(config: IndexConfig) -> dict:
  """Builds (or, with `config.resume`, finishes) the index described in the module docstring.

  Returns:
    The index description, also written to `<output_dir>/index.json`. With `config.resume` and
    an index already finished in the output folder (same runs and settings), nothing is built or
    written: its index.json, with `ALREADY_FINISHED` set.

  Raises:
    LandmarkIndexError, records.RecordsError: unusable settings, runs, records or output folder,
      or another build writing to it.
  """
  scales = _check_config(config)
  if not config.output_dir:
    config = dataclasses.replace(config, output_dir=files.join(config.run, 'index'))
  if config.runner == 'beam':
    _beam_runner()  # Without Beam installed, a one-line error before any model loads.
  inputs = open_inputs(config)
  if inputs.delf is not None and config.pca_dim > inputs.delf.descriptor_dim:
    raise LandmarkIndexError(f'--pca_dim={config.pca_dim} is more than the '
                             f'{inputs.delf.descriptor_dim} dimensions of the DELF descriptors')
  splits = _splits(config, inputs.records)
  units = work_units(config, inputs.records)
  if not units:
    raise LandmarkIndexError(f'{inputs.records.path} has no {config.split} images to index')
  fingerprint = {**settings.fingerprint(config), **inputs.checksums,
                 'records_created': inputs.records.manifest.get('created')}
  output_dir = config.output_dir
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise LandmarkIndexError(f'--output_dir={output_dir} is a file, not a folder')
  tf.io.gfile.makedirs(output_dir)
  with files.exclusive_writer(output_dir, 'tfl-build-index', LandmarkIndexError):
    if _prepare_output(config, fingerprint):
      return {**indexes.read_description(output_dir), ALREADY_FINISHED: True}
    return _build(config, inputs, units, splits, scales)


def _build(config: IndexConfig, inputs: Inputs, units: Sequence[Unit], splits: Sequence[str],
           scales: Sequence[float]) -> dict:
  """Fits the PCA (DELF), builds the unfinished shards here or on Beam and finishes the index."""
  pca = None
  if config.local_features == 'delf' and config.pca_dim:
    pca_path = files.join(config.output_dir, indexes.PCA_FILE)
    if tf.io.gfile.exists(pca_path):  # Fitted by the interrupted build (written whole).
      pca = delf_features.load_pca(pca_path)
    else:
      # Written before any shard: the shards' builders (Beam's workers too) read it from there.
      pca = _fit_pca(config, units, inputs.delf, scales)
      delf_features.save_pca(pca, pca_path)
  pending = [unit for unit in units
             if not all(tf.io.gfile.exists(path) for path in unit.files(config.output_dir))]
  done_images = sum(unit.examples for unit in units) - sum(unit.examples for unit in pending)
  if config.progress and len(pending) < len(units):
    print(f'resuming: {len(units) - len(pending)} of {len(units)} shards already done', flush=True)
  if config.runner == 'beam':
    _beam_runner().build_shards(config, inputs.checksums, scales, pending)
  else:
    builder = ShardBuilder(config, inputs, scales)
    with tqdm.tqdm(total=sum(unit.examples for unit in units), initial=done_images, unit='img',
                   desc='index', disable=not config.progress, smoothing=0.1) as bar:
      for unit in pending:
        builder.build_unit(unit, bar)
  return _finish(config, inputs, units, _descriptor_dim(config, inputs), splits, scales, pca)


def _beam_runner():
  """The Beam runner module; a one-line error if the `beam` extra is not installed."""
  with runners.beam_required(LandmarkIndexError):
    from tf_landmarks import index_beam  # pylint: disable=g-import-not-at-top  (optional extra)
  return index_beam
