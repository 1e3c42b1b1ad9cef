"""The records folder, one format with one owner: names, manifest, label map, TFDS metadata, checks.

A finished build (`tfl-build-records`; layout in records/README.md) holds
`{train,validation,test}-NNNNN-of-NNNNN` shards, `label_map.csv` (label, landmark_id, num_images),
TFDS metadata and `manifest.json`, written last. Writers (the local builder, later the Beam one) and
readers (the input pipeline, training, prediction) go through this module; readers call `load` and
get a `Records` with everything they need, checked, instead of globbing and parsing files themselves.
One stored image is read alone at its record's byte offset (`read_stored_image`, `read_record`),
which a reader of the whole shard noted (the index keeps them), never by scanning shards.
It imports no image or download code, so readers stay light.
"""

import csv
import dataclasses
import io
import json
import re
import statistics
import struct
from typing import Dict, Iterable, List, Sequence, Tuple

from google.protobuf import message as protobuf_message
import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import schema

SPLITS = ('train', 'validation', 'test')
MANIFEST = 'manifest.json'
LABEL_MAP = 'label_map.csv'
STAGING = '.staging'
TFDS_FILES = ('dataset_info.json', 'features.json')
FORMAT = 'tf-landmarks records v1'
_LABEL_MAP_COLUMNS = ('label', 'landmark_id', 'num_images')
# TFRecord framing: uint64 payload length, uint32 masked CRC-32C of the length, the payload, uint32
# masked CRC-32C of the payload; all little-endian.
RECORD_FRAMING_BYTES = 16
_RECORD_HEADER = struct.Struct('<QI')
_RECORD_FOOTER = struct.Struct('<I')
# Far above any stored image (a 640-px JPEG is ~100 KB, GLDv2's originals a few MB): a length read
# at a wrong offset is refused before it is allocated.
MAX_RECORD_BYTES = 1 << 28


class RecordsError(errors.UserError):
  """The folder is not a finished, intact build; the message says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Records:
  """What readers need from a finished build (`load`).

  Attributes:
    path: the folder.
    manifest: the parsed manifest.json.
    landmark_ids: original landmark id of each label (index = label 0..C-1).
    class_counts: training images of each label.
    max_image_size: long side the images were resized to (0: original sizes).
  """
  path: str
  manifest: dict
  landmark_ids: Tuple[int, ...]
  class_counts: Tuple[int, ...]
  max_image_size: int

  @property
  def num_classes(self) -> int:
    return len(self.landmark_ids)

  def num_examples(self, split: str) -> int:
    return self.manifest['splits'][split]['examples']

  def files(self, split: str) -> List[str]:
    """The split's shard paths, in order (empty for an empty split)."""
    if split not in SPLITS:
      raise RecordsError(f'unknown split {split!r}; the splits are {", ".join(SPLITS)}')
    return [files.join(self.path, shard['file']) for shard in self.manifest['splits'][split]['shards']]


def shard_name(split: str, index: int, num_shards: int) -> str:
  """DELF's shard naming: `train-00003-of-00128`."""
  return f'{split}-{index:05d}-of-{num_shards:05d}'


def own_files(records_dir: str) -> List[str]:
  """Files in `records_dir` that a build writes (what `--overwrite` may delete)."""
  found = [files.join(records_dir, name) for name in (MANIFEST, LABEL_MAP, *TFDS_FILES)
           if tf.io.gfile.exists(files.join(records_dir, name))]
  for split in SPLITS:
    found += tf.io.gfile.glob(files.join(records_dir, f'{split}-*-of-*'))
  return found


def write_label_map(records_dir: str, rows: Iterable[Tuple[int, int, int]]) -> None:
  """Writes `label_map.csv` from (label, landmark_id, num_images) rows in label order."""
  files.write_csv_atomically(files.join(records_dir, LABEL_MAP), _LABEL_MAP_COLUMNS, rows)


def read_label_map(records_dir: str) -> List[Tuple[int, int, int]]:
  """(label, landmark_id, num_images) rows of `label_map.csv`, checked to list labels 0..C-1.

  Raises:
    RecordsError: the file is missing or malformed.
  """
  path = files.join(records_dir, LABEL_MAP)
  if not tf.io.gfile.exists(path):
    raise RecordsError(f'{path} is missing; rebuild the folder with tfl-build-records --overwrite')
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  reader = csv.DictReader(io.StringIO(text))
  if tuple(reader.fieldnames or ()) != _LABEL_MAP_COLUMNS:
    raise RecordsError(f'{path} is malformed: the header must be {",".join(_LABEL_MAP_COLUMNS)}')
  rows = []
  for row in reader:
    try:
      rows.append(tuple(int(row[key]) for key in _LABEL_MAP_COLUMNS))
    except (TypeError, ValueError):
      raise RecordsError(f'{path} is malformed near line {reader.line_num}: '
                         f'{",".join(str(v) for v in row.values())}') from None
  if [row[0] for row in rows] != list(range(len(rows))):
    raise RecordsError(f'{path} is malformed: it must list labels 0..{len(rows) - 1} in order')
  return rows


def write_manifest(records_dir: str, manifest: dict) -> None:
  """Writes manifest.json, the mark of a finished build: call it last."""
  files.write_atomically(files.join(records_dir, MANIFEST),
                         json.dumps({'format': FORMAT, **manifest}, indent=1))


def load_manifest(records_dir: str) -> dict:
  """The manifest of a finished build, checked for its format version.

  Raises:
    RecordsError: no manifest (no build, or an unfinished one), or an unreadable or foreign one.
  """
  path = files.join(records_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    if tf.io.gfile.exists(files.join(records_dir, STAGING)):
      raise RecordsError(f'{records_dir} holds an unfinished build (no {MANIFEST}); continue it '
                         'with tfl-build-records --resume')
    raise RecordsError(f'{records_dir} is not a record build (no {MANIFEST}); make one with '
                       'tfl-build-records')
  manifest = files.read_versioned_json(path, FORMAT, 'a manifest', 'rebuild the folder with '
                                       'tfl-build-records --overwrite', RecordsError)
  try:
    well_formed = isinstance(manifest['num_classes'], int) and all(
        isinstance(shard['file'], str) and isinstance(shard['examples'], int)
        for split in SPLITS for shard in manifest['splits'][split]['shards'])
  except (KeyError, TypeError):
    well_formed = False
  if not well_formed:
    raise RecordsError(f'{path} is incomplete or damaged (missing split or shard entries); rebuild '
                       'the folder with tfl-build-records --overwrite')
  return manifest


def load(records_dir: str) -> Records:
  """Opens a finished build for reading: manifest, label map and class counts, cross-checked.

  Raises:
    RecordsError: the folder is not a finished build, or its files disagree.
  """
  manifest = load_manifest(records_dir)
  label_map = read_label_map(records_dir)
  if len(label_map) != manifest['num_classes']:
    raise RecordsError(f'{files.join(records_dir, LABEL_MAP)} lists {len(label_map)} classes, the '
                       f'manifest {manifest["num_classes"]}; rebuild with tfl-build-records '
                       '--overwrite')
  return Records(path=records_dir, manifest=manifest,
                 landmark_ids=tuple(row[1] for row in label_map),
                 class_counts=tuple(row[2] for row in label_map),
                 max_image_size=int(manifest.get('config', {}).get('max_image_size', 0)))


def write_tfds_metadata(records_dir: str, shards: Dict[str, Sequence[dict]], num_classes: int) -> None:
  """Adds dataset_info.json and features.json so `tfds.builder_from_directory` loads the shards.

  Args:
    records_dir: the build folder.
    shards: per split, its shards as manifest entries ({'file', 'examples', 'bytes'}).
    num_classes: for the description.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow; only needed here)
  template = tfds.core.ShardedFileTemplate(data_dir=records_dir, template='{SPLIT}-{SHARD_X_OF_Y}',
                                           dataset_name='landmarks', filetype_suffix='tfrecord')
  split_infos = [
      tfds.core.SplitInfo(name=name, shard_lengths=[s['examples'] for s in entries],
                          num_bytes=sum(s['bytes'] for s in entries), filename_template=template)
      for name, entries in shards.items() if entries]
  tfds.folder_dataset.write_metadata(
      data_dir=records_dir, features=schema.tfds_features(), split_infos=split_infos,
      filename_template=template, check_data=False,
      description=f'Landmark images with {num_classes} classes, built by tf-landmarks.')


def plain_tf_message(message: str) -> str:
  """A TensorFlow error message without its op and function-node decorations."""
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message)
  return message.split(' [Op:')[0].strip()


def count_records(path: str) -> int:
  """Records in one shard, read through.

  Raises:
    RecordsError: the shard is missing, truncated or corrupt (the message names it).
  """
  if not tf.io.gfile.exists(path):
    raise RecordsError(f'shard {path} is missing')
  try:
    return int(tf.data.TFRecordDataset(path).reduce(0, lambda n, _: n + 1))
  except tf.errors.DataLossError as error:
    raise RecordsError(f'{path} is corrupt or truncated ({plain_tf_message(error.message)})') from None


def check_shards(records: Records, split: str) -> None:
  """Checks that every shard of `split` the manifest lists exists with the size it was written at.

  A stat per shard, no reading: without it a missing shard surfaces deep inside tf.data as a bare
  "Graph execution error". A damaged shard of the right size is caught when read (`verify`,
  `find_corrupt_shard`).

  Raises:
    RecordsError: naming the first missing shard, or one whose size differs from the manifest's.
  """
  for path, shard in zip(records.files(split), records.manifest['splits'][split]['shards']):
    try:
      size = tf.io.gfile.stat(path).length
    except tf.errors.NotFoundError:
      raise RecordsError(f'shard {path} is missing (the manifest lists it); restore it or rebuild '
                         'the folder with tfl-build-records --overwrite') from None
    expected = shard.get('bytes')
    if size != expected if expected is not None else size == 0:
      raise RecordsError(f'{path} is corrupt or truncated ({size} bytes, the manifest says '
                         f'{expected}); restore it or rebuild the folder with tfl-build-records '
                         '--overwrite')


def verify(records: Records) -> None:
  """Counts the records of every shard and compares them with the manifest.

  Raises:
    RecordsError: a shard is missing, unreadable (truncated or corrupt) or holds a different count.
  """
  for split in SPLITS:
    for path, shard in zip(records.files(split), records.manifest['splits'][split]['shards']):
      count = count_records(path)
      if count != shard['examples']:
        raise RecordsError(f'{path} holds {count} examples, the manifest says {shard["examples"]}')


def find_corrupt_shard(paths: Sequence[str]) -> str:
  """After a DataLossError while reading `paths`: the message naming the first bad shard."""
  for path in paths:
    try:
      count_records(path)
    except RecordsError as error:
      return str(error)
  return f'one of {len(paths)} shards is corrupt, but none failed when read again'


def summary_lines(records: Records) -> List[str]:
  """A human summary: classes, splits, the long tail of class sizes, skipped rows."""
  manifest = records.manifest
  lines = [f'classes: {records.num_classes} (dropped {manifest.get("dropped_classes", 0)})']
  for split in SPLITS:
    info = manifest['splits'][split]
    lines.append(f'{split:<11} {info["examples"]:>8} examples in {len(info["shards"])} shard(s)')
  sizes = sorted(records.class_counts)
  if sizes:
    lines.append(f'train images per class: min {sizes[0]}, median {statistics.median(sizes):g}, '
                 f'max {sizes[-1]}; {sum(s <= 2 for s in sizes)} class(es) with at most 2')
  skipped = manifest.get('skipped', {'total': 0, 'by_reason': {}})
  reasons = ', '.join(f'{count} {reason}' for reason, count in skipped['by_reason'].items())
  lines.append(f'skipped rows: {skipped["total"]}' + (f' ({reasons})' if reasons else ''))
  return lines


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected.
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum: CRC-32C, rotated and offset (the "masked" form of TensorFlow's crc32c).

  Pure Python (about 3 ms per 10 KB): it checks the few records read one by one, never a shard.
  """
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_record(path: str, offset: int) -> bytes:
  """The payload of the record that starts at byte `offset` of a TFRecord file, read alone.

  A record's offset is the sum of the framed sizes (payload + `RECORD_FRAMING_BYTES`) of the
  records before it, which a reader of the whole shard can note as it goes (the index builder
  does). Both checksums are verified, so an offset that is not a record's start, or a shard
  rewritten or damaged since the offset was taken, is refused rather than misread.

  Raises:
    RecordsError: the file is missing, the offset is outside it or not a record's start, the
      length is beyond the file (or `MAX_RECORD_BYTES`), or a checksum fails.
  """
  if not tf.io.gfile.exists(path):
    raise RecordsError(f'shard {path} is missing')
  with tf.io.gfile.GFile(path, 'rb') as f:
    size = f.size()
    if not 0 <= offset <= size - RECORD_FRAMING_BYTES:
      raise RecordsError(f'{path} has {size:,} bytes: no record can start at byte {offset:,}')
    f.seek(offset)
    header = f.read(_RECORD_HEADER.size)
    length, length_crc = _RECORD_HEADER.unpack(header)
    if _masked_crc32c(header[:8]) != length_crc:
      raise RecordsError(f'{path}: no record starts at byte {offset:,} (its length fails its '
                         'checksum); the shard was rebuilt or damaged')
    if length > min(size - offset - RECORD_FRAMING_BYTES, MAX_RECORD_BYTES):
      raise RecordsError(f'{path}: the record at byte {offset:,} claims {length:,} bytes, more '
                         'than the shard holds after it (truncated)')
    payload = f.read(length)
    (payload_crc,) = _RECORD_FOOTER.unpack(f.read(_RECORD_FOOTER.size))
  if _masked_crc32c(payload) != payload_crc:
    raise RecordsError(f'{path}: the record at byte {offset:,} fails its checksum (corrupt)')
  return payload


def read_stored_image(path: str, offset: int, image_id: str) -> bytes:
  """The encoded image (JPEG) of example `image_id`, its record at byte `offset` of a shard.

  Raises:
    RecordsError: as `read_record`, or the record is not an Example of that image.
  """
  payload = read_record(path, offset)
  try:
    features = tf.train.Example.FromString(payload).features.feature
    found = features[schema.ID].bytes_list.value[0].decode('utf-8', errors='replace')
    encoded = features[schema.ENCODED].bytes_list.value[0]
  except (protobuf_message.DecodeError, IndexError):
    raise RecordsError(f'{path}: the record at byte {offset:,} is not an image example') from None
  if found != image_id:
    raise RecordsError(f'{path}: the record at byte {offset:,} is image {found}, not {image_id}; '
                       'the shard was rebuilt since')
  return encoded
