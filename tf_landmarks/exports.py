"""The export folder (`tfl-export`): its names, its format, writing it, and a typed, checked load.

Layout of an export folder:

  classifier/1/          the classifier's serving SavedModel (TF Serving's layout: model base path
                         `classifier`, version 1) with assets.extra/label_map.csv.
  delf/1/                with a DELF index: DELF's extraction SavedModel, the index's PCA inside.
  index/                 a copy of the index (`tfl-build-index`).
  export.json            written LAST (the mark of a finished export): the format version, each
                         part's description (`ClassifierPart`, `DelfPart`, `IndexPart`), the records
                         folder, and under "files" the size and SHA-256 of every file above
                         (`files.checksums`).

`load(path)` checks the format and the files against their recorded sizes on every load and
against their digests when they changed since the last full check, or always with `verify=True`
(`files.verify_checksums`), so a damaged SavedModel or index shard is named in one line before it
is used. Exports of the previous format (v1, no "files") are still read, unverified: nothing
records what their files should be.

`tf_landmarks/export.py` (the stage) makes the parts and writes through `write`; prediction and
the report read through `load`.
"""

import dataclasses
import datetime
import json
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks.local_features import delf as delf_features

FORMAT = 'tf-landmarks export v2'
# Read without checksums (it has none): what exports written before v2 are.
FORMAT_V1 = 'tf-landmarks export v1'
EXPORT_JSON = 'export.json'
CLASSIFIER_DIR = 'classifier'
DELF_DIR = 'delf'
INDEX_DIR = 'index'
VERSION = '1'
# The classifier SavedModel's signatures, their input and outputs, and the status of a usable item.
SERVING_SIGNATURE = 'serving_default'
IMAGES_SIGNATURE = 'predict_images'
BYTES_INPUT = 'images'
OUTPUT_NAMES = ('landmark_ids', 'scores', 'embeddings', 'status')
OK = 'ok'
_HINT = 'export it again with tfl-export'


class ExportError(errors.UserError):
  """An export cannot be made or read; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ClassifierPart:
  """The classifier SavedModel and how queries must be prepared for it.

  Attributes:
    path: the SavedModel folder (`<export>/classifier/1`).
    run: the classifier run it was exported from, and the SHA-256 of its model.keras.
    backbone, head, image_size, num_classes: the model.
    top_k: landmarks returned per image.
    max_image_side, min_image_side, jpeg_quality: how the records build prepared the index images
      (long-side cap, 0: none; smallest usable side; JPEG quality), which queries given as files
      must repeat so that their local features live at the same scale.
    max_image_bytes, max_image_pixels: the serving graph's limits.
  """
  path: str
  run: str
  run_model_sha256: str
  backbone: str
  head: Optional[str]
  image_size: int
  num_classes: int
  top_k: int
  max_image_side: int
  min_image_side: int
  jpeg_quality: int
  max_image_bytes: int
  max_image_pixels: int


@dataclasses.dataclass(frozen=True)
class DelfPart:
  """DELF's extraction SavedModel and the settings the index's features were extracted with.

  Attributes:
    path: the SavedModel folder (`<export>/delf/1`).
    run: the DELF run, and the SHA-256 of its model.keras.
    scales, max_feature_num, abs_threshold: the extraction settings.
    pca: whether the index's PCA is in the graph.
  """
  path: str
  run: str
  delf_model_sha256: str
  scales: Tuple[float, ...]
  max_feature_num: int
  abs_threshold: float
  pca: bool


@dataclasses.dataclass(frozen=True)
class IndexPart:
  """The copy of the index.

  Attributes:
    path: the index folder (`<export>/index`).
    source: the index it was copied from.
    local_features: 'delf' or 'sift'.
    images, landmarks: its counts.
    global_dim: the global descriptors' size.
  """
  path: str
  source: str
  local_features: str
  images: int
  landmarks: int
  global_dim: int


@dataclasses.dataclass(frozen=True)
class Export:
  """A finished export, checked.

  Attributes:
    path: the export folder.
    created: when it was written (ISO 8601, UTC).
    records_dir: the records folder of the classifier's training (and of the index images).
    classifier: the classifier part.
    delf: the DELF part, None for an export without a DELF index.
    index: the index part, None for a classifier alone.
    checksums: relative path → {'bytes', 'sha256'} of every file; None for a v1 export, which
      recorded none and so was not verified.
  """
  path: str
  created: str
  records_dir: str
  classifier: ClassifierPart
  delf: Optional[DelfPart]
  index: Optional[IndexPart]
  checksums: Optional[Dict[str, Dict[str, Any]]]

  def index_json(self) -> Optional[Dict[str, Any]]:
    """The index part as export.json records it (predictions folders keep a copy)."""
    return None if self.index is None else _part_json(self.index, INDEX_DIR)


def classifier_path(folder: str) -> str:
  """Where the classifier SavedModel of the export `folder` goes."""
  return files.join(folder, CLASSIFIER_DIR, VERSION)


def delf_path(folder: str) -> str:
  """Where the DELF SavedModel of the export `folder` goes."""
  return files.join(folder, DELF_DIR, VERSION)


def index_path(folder: str) -> str:
  """Where the index copy of the export `folder` goes."""
  return files.join(folder, INDEX_DIR)


def _part_json(part, relative_path: str) -> Dict[str, Any]:
  value = dataclasses.asdict(part)
  value['path'] = relative_path
  return value


def _relative_files(folder: str) -> Sequence[str]:
  """Every file under `folder` ('/'-separated, relative), but the lock and verification stamps."""
  names = []
  for parent, _, children in tf.io.gfile.walk(folder):
    relative = parent[len(folder):].strip('/')
    for name in children:
      if not name.startswith('.') and not (not relative and name == EXPORT_JSON):
        names.append(f'{relative}/{name}' if relative else name)
  return sorted(names)


def write(folder: str, *, classifier: ClassifierPart, delf: Optional[DelfPart],
          index: Optional[IndexPart], records_dir: str) -> Export:
  """Records the checksums of every file now in `folder` and writes export.json, last.

  Args:
    folder: the export folder, its SavedModels and index copy written.
    classifier, delf, index: the parts, with their paths where `classifier_path`, `delf_path` and
      `index_path` put them.
    records_dir: the records folder of the classifier's run.

  Returns:
    The export, as `load` reads it back.
  """
  checksums = files.checksums(folder, _relative_files(folder), stamp=True)
  created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  classifier_json = _part_json(classifier, f'{CLASSIFIER_DIR}/{VERSION}')
  classifier_json['signatures'] = {
      SERVING_SIGNATURE: {'inputs': {BYTES_INPUT: 'string [B] (encoded JPEG/PNG)'},
                          'outputs': list(OUTPUT_NAMES)},
      IMAGES_SIGNATURE: {'inputs': {BYTES_INPUT: 'float32 [B, H, W, 3] in [0, 255]'},
                         'outputs': list(OUTPUT_NAMES[:3])}}
  delf_json = None
  if delf is not None:
    delf_json = {**_part_json(delf, f'{DELF_DIR}/{VERSION}'), 'scales': list(delf.scales),
                 'inputs': list(delf_features.INPUT_NAMES),
                 'outputs': list(delf_features.OUTPUT_NAMES)}
  description = {
      'format': FORMAT, 'created': created, 'classifier': classifier_json,
      'records_dir': records_dir, 'delf': delf_json,
      'index': None if index is None else _part_json(index, INDEX_DIR), 'files': checksums}
  files.write_atomically(files.join(folder, EXPORT_JSON), json.dumps(description, indent=1))
  return Export(path=folder, created=created, records_dir=records_dir, classifier=classifier,
                delf=delf, index=index, checksums=checksums)


def _fields(cls: type, value: Any, folder: str, what: str) -> Dict[str, Any]:
  """The dataclass fields of a part from its JSON object, its path made absolute."""
  if not isinstance(value, Mapping):
    raise ExportError(f'{folder}/{EXPORT_JSON} has no valid "{what}" part; {_HINT}')
  names = [field.name for field in dataclasses.fields(cls)]
  missing = [name for name in names if name not in value]
  if missing:
    raise ExportError(f'{folder}/{EXPORT_JSON}: the "{what}" part lacks {", ".join(missing)}; '
                      f'{_HINT}')
  fields = {name: value[name] for name in names}
  if not isinstance(fields['path'], str) or not fields['path'] or '..' in fields['path']:
    raise ExportError(f'{folder}/{EXPORT_JSON}: the "{what}" part has a bad path; {_HINT}')
  fields['path'] = files.join(folder, fields['path'])
  return fields


def load(path: str, verify: bool = False) -> Export:
  """The finished export at `path`, its format and files checked (see the module docstring).

  Args:
    path: the export folder.
    verify: hash every file, whatever the last full check found.

  Raises:
    ExportError: not a finished export, another format, a damaged export.json, or a file missing,
      of another size or another digest than recorded (the message names it); `verify` for a v1
      export, which recorded no checksums.
  """
  json_path = files.join(path, EXPORT_JSON)
  if not tf.io.gfile.exists(json_path):
    raise ExportError(f'{path} is not a finished export (no {EXPORT_JSON}); make one with '
                      'tfl-export')
  value = files.read_versioned_json(json_path, (FORMAT, FORMAT_V1), 'an export', _HINT, ExportError)
  found = value['format']
  checksums = None
  if found == FORMAT:
    checksums = value.get('files')
    if not isinstance(checksums, dict) or not all(
        isinstance(entry, dict) and {'bytes', 'sha256'} <= set(entry)
        for entry in checksums.values()):
      raise ExportError(f'{json_path} has no valid "files" checksums; {_HINT}')
    files.verify_checksums(path, checksums, what='the export', hint=_HINT, error=ExportError,
                           full=verify)
  elif verify:
    raise ExportError(f'{path} was written by an older tf-landmarks ({FORMAT_V1}) without '
                      f'checksums, so it cannot be verified; {_HINT}')
  delf = index = None
  if value.get('delf') is not None:
    fields = _fields(DelfPart, value['delf'], path, 'delf')
    delf = DelfPart(**{**fields, 'scales': tuple(fields['scales'])})
  if value.get('index') is not None:
    index = IndexPart(**_fields(IndexPart, value['index'], path, 'index'))
  return Export(path=path, created=value.get('created'), records_dir=value.get('records_dir'),
                classifier=ClassifierPart(**_fields(ClassifierPart, value.get('classifier'), path,
                                                    'classifier')),
                delf=delf, index=index, checksums=checksums)
