"""Google Landmarks CSVs + images → sharded TFRecords, label map, manifest and TFDS metadata.

The build runs in two phases so that the split sees only images that could actually be read:

1. *Staging.* Every row (train and test, in a seeded shuffled order so that shards mix classes
   even when a CSV is sorted by landmark) is read, oriented, converted to RGB, resized and
   JPEG-encoded by a pool of worker processes. Each chunk of rows becomes a staging file of
   concatenated JPEGs plus a JSON list of per-row results with their byte lengths; a chunk is
   complete once its JSON exists, which is what `--resume` relies on. A local image that passes
   through unchanged is not copied: its entry names the file and its SHA-256.
2. *Sharding.* The stratified split runs on the readable train rows, then one sequential pass over
   the staging files (and the unchanged images, checked against their SHA-256) writes
   `train-/validation-/test-NNNNN-of-NNNNN` shards, each under a temporary name renamed when
   complete.

`manifest.json` is written last: a folder without it is an unfinished build.

`--runner=beam` runs the same build as an Apache Beam pipeline (`tf_landmarks/ingest_beam.py`) from
this module's pieces: `plan_split` (split and shard placement), `serialize_placement`,
`ShardWriter` and `finish_build`, so both builders write the same bytes.
"""

import collections
import ctypes
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import posixpath
import random
import signal
import uuid
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf
import tqdm

from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import images
from tf_landmarks import records
from tf_landmarks import runners
from tf_landmarks import schema
from tf_landmarks import settings
from tf_landmarks import splits
from tf_landmarks.settings import setting

_FINGERPRINT = 'fingerprint.json'
# 2: chunk-N.jpegs (concatenated JPEGs) + chunk-N.json with byte lengths. 3: unchanged local images
# are named (path and SHA-256), not copied, and chunk-N.jpegs is absent when nothing was copied.
_STAGING_FORMAT = 3
# Rows per staging chunk: large enough to amortise a file per chunk, small enough that a few
# thousand rows still spread over all workers. Depends on the row count only, so that --resume finds
# the same chunks whatever --num_workers is.
_MIN_CHUNK_SIZE, _MAX_CHUNK_SIZE = 16, 256
_MIN_CHUNKS = 64


class BuildError(errors.UserError):
  """The build cannot go on; the message tells the user what to change."""


@dataclasses.dataclass
class BuildConfig:
  """Everything `build_records` needs; `tfl-build-records` defines one flag per field.

  Fields marked `runtime` change how the build runs, not what it writes: they may differ between a
  build and its `--resume`. Every other field is part of the build's fingerprint.
  """
  output_dir: str = setting(
      'records', 'Folder for shards, label_map.csv, manifest.json and TFDS metadata (any '
      'tf.io.gfile path, e.g. gs://bucket/records/gld).', runtime=True)
  train_csv: Optional[str] = setting(
      None, 'Train CSV with columns id,url,landmark_id (url may be absent with --image_dir). Rows '
      'with an unsafe, empty or duplicate id or a landmark_id that is not a non-negative integer '
      'are skipped and listed in the manifest.')
  test_csv: Optional[str] = setting(
      None, 'Optional test CSV with columns id,url; its images become the unlabelled test split.')
  train_clean_csv: Optional[str] = setting(
      None, 'Optional GLDv2 train_clean.csv (landmark_id,images with space-separated ids): train '
      'is restricted to this clean subset. May be given without --train_csv.')
  image_dir: Optional[str] = setting(
      None, "Folder with the images as <id>.jpg or in DELF's nested layout a/b/c/<id>.jpg (any "
      'format Pillow reads, despite the .jpg name). Any tf.io.gfile path (gs://…) works.')
  download: bool = setting(
      False, 'Fetch the url column (http/https only) into --download_dir instead of reading '
      '--image_dir. Finished downloads are reused by later runs.')
  download_dir: Optional[str] = setting(
      None, 'Download cache folder; default <output_dir>/downloads. Failures are listed in its '
      'failures.csv.', runtime=True)
  download_threads: int = setting(16, 'Concurrent downloads.', lower=1, runtime=True)
  download_timeout_s: float = setting(
      30.0, 'Time limit of one download attempt in seconds, connection, headers and body included.',
      lower=0.1, runtime=True)
  download_max_bytes: int = setting(50 * 2**20, 'Largest image file accepted, bytes.', lower=1)
  download_allow_private_hosts: bool = setting(
      False, 'Also fetch from loopback, private, link-local and other non-public addresses '
      '(refused by default: a CSV could otherwise make the builder query internal services such '
      "as a cloud VM's metadata server).", runtime=True)
  validation_fraction: float = setting(
      0.1, 'Share of each class sent to validation (stratified per class; every class keeps at '
      'least one training image).', lower=0.0, upper=0.99)
  seed: int = setting(0, 'Seed of the split and of the shard order.')
  singletons: splits.Singletons = setting(
      splits.Singletons.TRAIN, 'Classes with one image: "train" keeps it in train only; '
      '"duplicate" also puts a distorted copy in validation; "drop" leaves the class out.')
  min_images_per_class: int = setting(
      1, 'Classes with fewer readable images are dropped (the manifest says how many).', lower=1)
  max_image_size: int = setting(
      640, 'Resize so that the long side is at most this many pixels (aspect kept, never '
      'upscaled); 0 keeps the original size.', lower=0)
  jpeg_quality: int = setting(images.JPEG_QUALITY, 'JPEG quality of re-encoded images.', lower=1,
                             upper=100)
  min_image_side: int = setting(
      images.MIN_IMAGE_SIDE, 'Images whose shorter side is smaller (before or after resizing) are '
      'skipped.', lower=1)
  max_file_bytes: int = setting(
      images.MAX_FILE_BYTES,
      'Largest image file read from --image_dir, bytes; larger files are skipped.', lower=1)
  examples_per_shard: int = setting(1024, 'Target number of examples per shard.', lower=1)
  num_workers: int = setting(
      2, 'Image-processing processes of --runner=local; 1 works in this process.', lower=1,
      runtime=True)
  resume: bool = setting(
      False, 'Continue an interrupted build in --output_dir, skipping finished work (the inputs '
      'and settings must be the same).', runtime=True)
  overwrite: bool = setting(
      False, 'Delete a build already in --output_dir (only files a build writes).', runtime=True)
  keep_staging: bool = setting(
      False, 'Keep the intermediate .staging folder after a successful build.', runtime=True)
  progress: bool = setting(True, 'Show progress bars.', runtime=True)
  runner: str = runners.runner_setting(
      'this machine, --num_workers processes',
      'the same build, writing the same examples, label map and manifest')
  beam_pipeline_options: Optional[List[str]] = runners.pipeline_options_setting()


@dataclasses.dataclass(frozen=True)
class Row:
  """A row to build, in build order: `landmark_id` None marks a test row."""
  image_id: str
  landmark_id: Optional[int]


def _previous_fingerprint(config: BuildConfig, complete: bool) -> Optional[dict]:
  """The fingerprint of the build already in `output_dir`, if it recorded one."""
  if complete:
    try:
      return records.load_manifest(config.output_dir).get('fingerprint')
    except records.RecordsError as error:
      raise BuildError(f'{error}. Use --overwrite to rebuild it.') from None
  path = files.join(config.output_dir, records.STAGING, _FINGERPRINT)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError:
      return None  # Killed while writing it: the staged chunks are checked one by one anyway.


def _prepare_output_dir(config: BuildConfig, fingerprint: dict) -> bool:
  """Checks what `output_dir` holds against --resume/--overwrite.

  Returns:
    True if the folder already holds this complete build (nothing to do).
  """
  output_dir = config.output_dir
  staging = files.join(output_dir, records.STAGING)
  existing = records.own_files(output_dir) + ([staging] if tf.io.gfile.exists(staging) else [])
  complete = tf.io.gfile.exists(files.join(output_dir, records.MANIFEST))
  if existing and config.overwrite:
    for path in existing:
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)
    existing, complete = [], False
  if existing and not config.resume:
    state = 'a complete build' if complete else 'an unfinished build'
    raise BuildError(f'{output_dir} already holds {state}; pass --resume to continue or reuse it, '
                     'or --overwrite to replace it.')
  previous = _previous_fingerprint(config, complete) if existing else None
  if previous is not None and previous != fingerprint:
    changed = sorted(k for k in fingerprint if fingerprint.get(k) != previous.get(k))
    raise BuildError(f'{output_dir} holds a build made from different inputs or settings '
                     f'({", ".join(changed)}); use --overwrite to rebuild it.')
  if complete:
    if tf.io.gfile.exists(staging) and not config.keep_staging:
      tf.io.gfile.rmtree(staging)  # Left by a build killed during its final clean-up.
    return True
  # Shards being written when the last attempt stopped; their final names are complete shards.
  for path in existing:
    if '.tmp-' in posixpath.basename(path):
      tf.io.gfile.remove(path)
  tf.io.gfile.makedirs(staging)
  files.write_atomically(files.join(staging, _FINGERPRINT),
                         json.dumps(fingerprint, indent=1, sort_keys=True))
  return False


def _fingerprint(config: BuildConfig, sources: Dict[str, dict]) -> dict:
  """What must be equal for `--resume` to continue a build: inputs and every shaping setting."""
  # Staging written by a tool version with another staging layout cannot be continued.
  return {'sources': {name: info['sha256'] for name, info in sources.items()},
          'staging_format': _STAGING_FORMAT, **settings.fingerprint(config)}


def _read_rows(config: BuildConfig, skipped: List[csv_io.SkippedRow]):
  """Reads and cross-checks the CSVs; returns (train rows, test rows, source path and sha256)."""
  train, test, sources = [], [], {}
  if config.train_csv:
    train, bad = csv_io.read_train_csv(config.train_csv)
    skipped += bad
    sources['train_csv'] = config.train_csv
  if config.train_clean_csv:
    clean, bad = csv_io.read_train_clean_csv(config.train_clean_csv)
    skipped += bad
    sources['train_clean_csv'] = config.train_clean_csv
    if config.train_csv:
      train, bad = csv_io.apply_clean_subset(train, clean, config.train_csv)
      skipped += bad
    else:
      train = [csv_io.ImageRow(image_id, '', landmark_id)
               for image_id, landmark_id in clean.items()]
  if config.test_csv:
    rows, bad = csv_io.read_test_csv(config.test_csv)
    skipped += bad
    sources['test_csv'] = config.test_csv
    train_ids = {row.image_id for row in train}
    for row in rows:
      if row.image_id in train_ids:
        skipped.append(csv_io.SkippedRow(config.test_csv, 0, row.image_id,
                                         'id also in the train CSV'))
      else:
        test.append(row)
  source_info = {name: {'path': path, 'sha256': files.sha256(path)}
                 for name, path in sources.items()}
  return train, test, source_info


def _download(config: BuildConfig, rows: Sequence[csv_io.ImageRow],
              skipped: List[csv_io.SkippedRow]) -> tuple[str, set]:
  """Fetches the url column into the cache; failed rows become skipped rows.

  Returns:
    The cache folder, and the ids that have no image in it.
  """
  # Imported here: its HTTP and TLS modules cost every build that reads --image_dir ~35 ms.
  from tf_landmarks import download  # pylint: disable=g-import-not-at-top
  cache_dir = config.download_dir or files.join(config.output_dir, 'downloads')
  without_url = [row for row in rows if not row.url]
  if len(without_url) == len(rows):
    raise BuildError('--download needs a url column with URLs; none of the rows has one. '
                     'Use --image_dir for images already on disk.')
  report = download.download_images(
      [(row.image_id, row.url) for row in rows if row.url], cache_dir,
      num_threads=config.download_threads, timeout_s=config.download_timeout_s,
      max_bytes=config.download_max_bytes,
      allow_private_hosts=config.download_allow_private_hosts, progress=config.progress)
  skipped += [csv_io.SkippedRow('download', 0, failure.image_id,
                                f'download failed: {failure.reason}')
              for failure in report.failures]
  skipped += [csv_io.SkippedRow('download', 0, row.image_id, 'no url to download')
              for row in without_url]
  if report.failures:
    download.write_failure_report(report, files.join(cache_dir, 'failures.csv'))
  if report.downloaded + report.cached == 0:
    raise BuildError(f'no image could be downloaded ({_skipped_summary(skipped)}); the reasons per '
                     f'row are in {files.join(cache_dir, "failures.csv")}')
  return cache_dir, {f.image_id for f in report.failures} | {row.image_id for row in without_url}


def _check_some_images_exist(image_dir: str, rows: Sequence[Row]) -> None:
  """Fails fast, before hours of work, when --image_dir is plainly wrong."""
  sample = random.Random(0).sample(list(rows), min(len(rows), 50))
  if not any(tf.io.gfile.exists(path)
             for row in sample for path in images.image_paths(image_dir, row.image_id)):
    example = images.image_paths(image_dir, sample[0].image_id)
    raise BuildError(f'none of {len(sample)} sampled images was found under '
                     f'--image_dir={image_dir} (looked for e.g. {" and ".join(example)}).')


def _chunk_size(num_rows: int) -> int:
  return max(_MIN_CHUNK_SIZE, min(_MAX_CHUNK_SIZE, math.ceil(num_rows / _MIN_CHUNKS)))


def _chunk_paths(staging: str, chunk: int) -> tuple[str, str]:
  stem = files.join(staging, f'chunk-{chunk:06d}')
  return f'{stem}.jpegs', f'{stem}.json'


class _Staged(NamedTuple):
  """One row's staging entry, a JSON list in the chunk's JSON file.

  Attributes:
    image_id: the row's id.
    reason: why the row is unusable; empty if it is usable.
    height: image height in pixels.
    width: image width in pixels.
    num_bytes: length of its JPEG.
    path: for an unchanged image that was not copied, its file; empty if the JPEG is in the
      chunk's .jpegs file.
    sha256: hex SHA-256 of the file at `path`.
  """
  image_id: str
  reason: str
  height: int
  width: int
  num_bytes: int
  path: str
  sha256: str


def _stage(config: BuildConfig, image_dir: str, rows: Sequence[Row]) -> None:
  """Phase 1: prepares every row's image into staging chunks, skipping chunks already complete."""
  staging = files.join(config.output_dir, records.STAGING)
  size = _chunk_size(len(rows))
  chunks = [rows[start:start + size] for start in range(0, len(rows), size)]
  pending = [i for i in range(len(chunks)) if not tf.io.gfile.exists(_chunk_paths(staging, i)[1])]
  done_rows = len(rows) - sum(len(chunks[i]) for i in pending)
  bar = tqdm.tqdm(total=len(rows), initial=done_rows, unit='img', desc='images',
                  disable=not config.progress, smoothing=0.1)

  def save(chunk_index: int, results: Sequence) -> None:
    jpegs_path, results_path = _chunk_paths(staging, chunk_index)
    entries, jpegs = [], []
    for row, result in zip(chunks[chunk_index], results):
      if isinstance(result, images.UnchangedFile):
        entries.append(_Staged(row.image_id, '', result.height, result.width, result.num_bytes,
                               result.path, result.sha256))
      elif isinstance(result, images.PreparedImage):
        jpegs.append(result.jpeg)
        entries.append(_Staged(row.image_id, '', result.height, result.width, len(result.jpeg),
                               '', ''))
      else:
        entries.append(_Staged(row.image_id, result, 0, 0, 0, '', ''))
    # One plain write per chunk: the main process shares the cores with the workers, and a
    # TFRecordWriter per chunk plus per-record framing cost it ~0.1 ms per image.
    if jpegs:
      files.write_atomically(jpegs_path, b''.join(jpegs))
    files.write_atomically(results_path, json.dumps(entries))
    bar.update(len(results))

  # Unchanged images are named rather than copied when they are local: the workers then send the
  # main process a path instead of the bytes, and the staging holds no second copy of them.
  # Receiving, writing and reading back ~75 KB per photo cost the main process ~0.2 ms of CPU per
  # image, more than it now spends reading and hashing the file again (0.08 ms). A remote folder
  # is still copied: the shard pass reads files one after the other, and one request per image
  # would make it as slow as the storage's latency.
  name_unchanged_files = not files.is_remote(image_dir)

  def job(chunk_index: int):
    return (chunk_index,
            [images.image_paths(image_dir, row.image_id) for row in chunks[chunk_index]],
            config.max_image_size, config.jpeg_quality, config.min_image_side,
            config.max_file_bytes, name_unchanged_files)

  if config.num_workers <= 1:
    for chunk_index in pending:
      save(*_prepare_chunk(job(chunk_index)))
  else:
    # Workers run only Pillow code (tf_landmarks.images). Forking is then safe and starts them in
    # milliseconds; 'spawn' would re-import the entry point, and with it TensorFlow, in every worker
    # (seconds each). Remote folders are read through TensorFlow's filesystems, whose threads must
    # not be forked, so those get 'spawn'.
    start_method = 'spawn' if files.is_remote(image_dir) or os.name != 'posix' else 'fork'
    context = multiprocessing.get_context(start_method)
    # Leaving the block terminates the workers, also on Ctrl-C, SIGTERM or an error in this process.
    with context.Pool(config.num_workers, initializer=_init_worker,
                      initargs=(os.getpid(),)) as pool:
      for chunk_index, results in pool.imap_unordered(_prepare_chunk, map(job, pending)):
        save(chunk_index, results)
  bar.close()


def _prepare_chunk(job: tuple) -> tuple:
  """Worker task: (chunk index, paths, settings…) → (chunk index, per-row results)."""
  chunk_index, path_lists, *settings_of_job = job
  return chunk_index, images.prepare_image_files(path_lists, *settings_of_job)


def _init_worker(parent_pid: int) -> None:
  """Makes a worker die with the build: Ctrl-C is the main process's to report, and a killed main
  process (even SIGKILL) takes its workers with it instead of leaving them running."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # Not the main process's handler, which fork would otherwise pass on.
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  try:
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
  except (OSError, AttributeError):  # Not Linux: workers end when the pool's pipes close.
    pass
  if os.getppid() != parent_pid:  # The parent died before prctl took effect.
    os._exit(1)  # pylint: disable=protected-access


def _read_staged_results(staging: str, num_chunks: int) -> List[_Staged]:
  """Per row, in row order, its staging entry."""
  results = []
  for chunk in range(num_chunks):
    with tf.io.gfile.GFile(_chunk_paths(staging, chunk)[1]) as f:
      results.extend(_Staged(*entry) for entry in json.load(f))
  return results


def _read_unchanged(entry: _Staged) -> bytes:
  """The JPEG of an entry that names its file, checked to be the bytes that were staged."""
  try:
    return images.read_unchanged(images.UnchangedFile(entry.path, entry.num_bytes, entry.sha256,
                                                      entry.height, entry.width))
  except images.ImageError as error:
    # The split is decided: skipping the image now could leave a class without its validation
    # or training examples, so the build stops instead.
    raise BuildError(f'{error}; restore it, or rebuild with --overwrite') from None


def _staged_jpegs(staging: str, staged: List[_Staged]) -> Iterable[Optional[bytes]]:
  """Per row, in row order, its JPEG (None for an unusable row); one chunk in memory at a time."""
  size = _chunk_size(len(staged))
  for chunk, start in enumerate(range(0, len(staged), size)):
    entries = staged[start:start + size]
    data = b''
    if any(not entry.reason and not entry.path for entry in entries):
      with tf.io.gfile.GFile(_chunk_paths(staging, chunk)[0], 'rb') as f:
        data = f.read()
    offset = 0
    for entry in entries:
      if entry.reason:
        yield None
      elif entry.path:
        yield _read_unchanged(entry)
      else:
        yield data[offset:offset + entry.num_bytes]
        offset += entry.num_bytes


class Placement(NamedTuple):
  """Where one example goes: a split, its rank there (the order of the split's shards), its shard.

  Attributes:
    position: the row's position in build order.
    split: 'train', 'validation' or 'test'.
    rank: index among the split's examples; shards are consecutive blocks of ranks.
    shard: index of its shard.
    num_shards: shards of the split.
    label: contiguous label, or schema.NO_LABEL (test).
    landmark_id: the CSV's landmark id, or schema.NO_LABEL (test).
    distorted: the example is a distorted copy of the row's image (`--singletons=duplicate`).
  """
  position: int
  split: str
  rank: int
  shard: int
  num_shards: int
  label: int
  landmark_id: int
  distorted: bool


@dataclasses.dataclass
class SplitPlan:
  """The build's split, apart from the per-example placements: what the manifest reports.

  Attributes:
    label_map: (label, landmark_id, training images) rows in label order.
    candidate_classes: classes among the readable train images (before class-size rules).
    validation_duplicates: distorted copies of single-image classes in validation.
    dropped: (image id, reason) of readable train images left out by the split.
    readable_train: readable train images.
    totals: examples per split.
  """
  label_map: List[Tuple[int, int, int]]
  candidate_classes: int
  validation_duplicates: int
  dropped: List[Tuple[str, str]]
  readable_train: int
  totals: Dict[str, int]


def num_shards(total: int, examples_per_shard: int) -> int:
  """Shards of a split of `total` examples: near-equal blocks of at most `examples_per_shard`."""
  return max(1, math.ceil(total / examples_per_shard)) if total else 0


def plan_split(readable: Sequence[Tuple[int, str, Optional[int]]],
               config: BuildConfig) -> Tuple[SplitPlan, List[Placement]]:
  """Splits the readable rows and places every example in a split and shard.

  Pure and deterministic: the local builder and the Beam pipeline (one global step over all rows)
  call it with the same rows and get the same placements.

  Args:
    readable: (position, image id, landmark id or None for test) of the rows whose image is usable.
    config: the build's settings (validation fraction, seed, class-size rules, shard size).

  Returns:
    The plan, and the placements in write order: by position, a row's distorted copy right after
    its original.
  """
  readable = sorted(readable)
  train = [(position, image_id, landmark_id) for position, image_id, landmark_id in readable
           if landmark_id is not None]
  split = splits.stratified_split([landmark_id for _, _, landmark_id in train],
                                  config.validation_fraction, config.seed, config.singletons,
                                  config.min_images_per_class)
  destination = {}  # position → split name
  for name, indices in (('train', split.train), ('validation', split.validation)):
    for index in indices:
      destination[train[index][0]] = name
  duplicated = {train[index][0] for index in split.duplicated}
  order = []  # (position, split, landmark id, distorted) in write order
  for position, _, landmark_id in readable:
    name = 'test' if landmark_id is None else destination.get(position)
    if name is not None:
      order.append((position, name, landmark_id, False))
    if position in duplicated:
      order.append((position, 'validation', landmark_id, True))
  totals = collections.Counter(name for _, name, _, _ in order)
  shards = {name: num_shards(totals[name], config.examples_per_shard) for name in records.SPLITS}
  ranks = collections.Counter()
  placements = []
  for position, name, landmark_id, distorted in order:
    rank = ranks[name]
    ranks[name] += 1
    labelled = name != 'test'
    placements.append(Placement(
        position, name, rank, rank * shards[name] // totals[name], shards[name],
        split.label_of_landmark[landmark_id] if labelled else schema.NO_LABEL,
        landmark_id if labelled else schema.NO_LABEL, distorted))
  counts = collections.Counter(train[index][2] for index in split.train)
  plan = SplitPlan(
      label_map=[(label, landmark_id, counts[landmark_id]) for landmark_id, label
                 in sorted(split.label_of_landmark.items(), key=lambda item: item[1])],
      candidate_classes=len({landmark_id for _, _, landmark_id in train}),
      validation_duplicates=len(split.duplicated),
      dropped=[(train[index][1], reason) for index, reason in sorted(split.dropped.items())],
      readable_train=len(train), totals={name: totals[name] for name in records.SPLITS})
  return plan, placements


def check_plan(plan: SplitPlan, num_train_rows: int, skipped: Sequence[csv_io.SkippedRow],
               config: BuildConfig) -> None:
  """Stops a build whose split has nothing to train on.

  Raises:
    BuildError: no train image was readable, or every class fell under the class-size rules.
  """
  if not plan.readable_train:
    raise BuildError(f'none of the {num_train_rows} train images could be used: '
                     f'{_skipped_summary(skipped)}')
  if not plan.label_map:
    raise BuildError(f'no class is left: every class has fewer than --min_images_per_class='
                     f'{config.min_images_per_class} readable images')


def serialize_placement(placement: Placement, image_id: str, jpeg: bytes, height: int, width: int,
                        config: BuildConfig) -> bytes:
  """The serialized Example of one placement of a prepared image (its distorted copy if asked)."""
  if placement.distorted:
    copy = images.distorted_copy(jpeg, seed=config.seed + placement.position,
                                 jpeg_quality=config.jpeg_quality)
    jpeg, height, width = copy.jpeg, copy.height, copy.width
  return schema.serialize_example(image_id, jpeg, height, width, placement.label,
                                  placement.landmark_id)


class ShardWriter:
  """Streams one split's placed examples into its shards, one open shard at a time.

  Each shard is written under a temporary name unique to this writer and renamed when complete:
  two attempts at the same shard (a retried Beam bundle, a backup worker) may then run at once, and
  since both write the same bytes, whichever rename comes last is right.

  Args:
    output_dir: the build folder.
    split: the split.
    resume: keep shards that already have their final name (a finished shard of an interrupted
      build holds exactly these examples: the placement is deterministic).
  """

  def __init__(self, output_dir: str, split: str, resume: bool):
    self.split = split
    self.shards: List[dict] = []  # Manifest entries of the finished shards.
    self._output_dir = output_dir
    self._resume = resume
    self._suffix = f'.tmp-{uuid.uuid4().hex}'
    self._shard = None  # (index, count) of the open shard
    self._writer = None
    self._count = 0

  def _path(self) -> str:
    return files.join(self._output_dir, records.shard_name(self.split, *self._shard))

  def write(self, serialized: bytes, shard: int, count: int) -> None:
    """Appends an example to shard `shard` of `count`; examples must come in rank order."""
    if self._shard != (shard, count):
      self._finish_shard()
      self._shard = (shard, count)
      path = self._path()
      self._writer = None if self._resume and tf.io.gfile.exists(path) else \
          tf.io.TFRecordWriter(path + self._suffix)
    if self._writer is not None:
      self._writer.write(serialized)
    self._count += 1

  def _finish_shard(self) -> None:
    if self._shard is None:
      return
    path = self._path()
    if self._writer is not None:
      self._writer.close()
      tf.io.gfile.rename(path + self._suffix, path, overwrite=True)
    self.shards.append({'file': posixpath.basename(path), 'examples': self._count,
                        'bytes': tf.io.gfile.stat(path).length})
    self._count = 0
    self._writer = None

  def close(self) -> None:
    """Finishes the open shard."""
    self._finish_shard()
    self._shard = None


def _write_shards(config: BuildConfig, staged: List[_Staged],
                  placements: Sequence[Placement]) -> Dict[str, List[dict]]:
  """Phase 2: routes staged images into split shards in one sequential pass."""
  at_position = collections.defaultdict(list)
  for placement in placements:
    at_position[placement.position].append(placement)
  writers = {name: ShardWriter(config.output_dir, name, config.resume) for name in records.SPLITS}
  staging = files.join(config.output_dir, records.STAGING)
  bar = tqdm.tqdm(total=len(placements), unit='ex', desc='shards', disable=not config.progress)
  for position, (entry, jpeg) in enumerate(zip(staged, _staged_jpegs(staging, staged))):
    for placement in at_position.get(position, ()):
      writers[placement.split].write(serialize_placement(
          placement, entry.image_id, jpeg, entry.height, entry.width, config), placement.shard,
                                     placement.num_shards)
      bar.update()
  bar.close()
  for writer in writers.values():
    writer.close()
  return {name: writer.shards for name, writer in writers.items()}


def reason_group(reason: str) -> str:
  """The kind of a skip reason: 'corrupt or truncated image (OSError: …)' → its part before ' ('."""
  return reason.split(' (')[0]


def _skipped_summary(skipped: Iterable[csv_io.SkippedRow]) -> Dict[str, int]:
  return dict(collections.Counter(reason_group(row.reason) for row in skipped).most_common())


def build_records(config: BuildConfig) -> dict:
  """Builds the shards described by `config`; see the module docstring.

  Returns:
    The manifest (also written to `<output_dir>/manifest.json`).

  Raises:
    BuildError: for unusable inputs or an output folder in the way, with a message for the user.
    csv_io.CsvError: for unusable CSV files.
  """
  if not (config.train_csv or config.train_clean_csv):
    raise BuildError('give --train_csv or --train_clean_csv')
  if not (config.download or config.image_dir):
    raise BuildError('give --image_dir with the images, or --download to fetch the url column')
  if config.image_dir and not config.download and not tf.io.gfile.isdir(config.image_dir):
    raise BuildError(f'--image_dir={config.image_dir} is not a folder')
  try:
    settings.check(config)
  except ValueError as error:
    raise BuildError(str(error)) from None
  if config.max_image_size and config.max_image_size < config.min_image_side:
    raise BuildError(f'--max_image_size={config.max_image_size} is below the smallest accepted '
                     f'image side ({config.min_image_side} px)')

  runners.check(config.runner, config.beam_pipeline_options, BuildError)
  builder = _beam_builder().build if config.runner == 'beam' else _build
  if tf.io.gfile.exists(config.output_dir) and not tf.io.gfile.isdir(config.output_dir):
    raise BuildError(f'--output_dir={config.output_dir} is a file, not a folder')

  skipped: List[csv_io.SkippedRow] = []
  train_rows, test_rows, sources = _read_rows(config, skipped)
  fingerprint = _fingerprint(config, sources)
  tf.io.gfile.makedirs(config.output_dir)
  with files.exclusive_writer(config.output_dir, 'tfl-build-records', BuildError):
    if _prepare_output_dir(config, fingerprint):
      return records.load_manifest(config.output_dir)
    return builder(config, _build_inputs(config, train_rows, test_rows, sources, fingerprint,
                                         skipped))


def _beam_builder():
  """The Beam builder module; a one-line error if the `beam` extra is not installed."""
  with runners.beam_required(BuildError):
    from tf_landmarks import ingest_beam  # pylint: disable=g-import-not-at-top  (optional extra)
  return ingest_beam


@dataclasses.dataclass
class BuildInputs:
  """What both builders (local and Beam) start from, after the CSVs and any download.

  Attributes:
    rows: every row to build, in build order (the seeded shuffle); positions index this list.
    image_dir: where the images are (the download cache with --download).
    num_train_rows: train rows among them.
    sources: the CSVs read, with their SHA-256.
    fingerprint: what --resume compares.
    skipped: rows left out so far, with reasons; builders add the unusable images.
  """
  rows: List[Row]
  image_dir: str
  num_train_rows: int
  sources: Dict[str, dict]
  fingerprint: dict
  skipped: List[csv_io.SkippedRow]


def _build_inputs(config: BuildConfig, train_rows: List[csv_io.ImageRow],
                  test_rows: List[csv_io.ImageRow], sources: Dict[str, dict], fingerprint: dict,
                  skipped: List[csv_io.SkippedRow]) -> BuildInputs:
  """Downloads (optional), then puts the rows in build order and checks the image folder."""
  image_dir = config.image_dir
  if config.download:
    image_dir, unavailable = _download(config, train_rows + test_rows, skipped)
    train_rows = [row for row in train_rows if row.image_id not in unavailable]
    test_rows = [row for row in test_rows if row.image_id not in unavailable]
  rows = [Row(row.image_id, row.landmark_id) for row in train_rows] + \
         [Row(row.image_id, None) for row in test_rows]
  # A seeded shuffle: shards get a mix of classes even from a CSV sorted by landmark.
  random.Random(config.seed).shuffle(rows)
  _check_some_images_exist(image_dir, rows)
  return BuildInputs(rows, image_dir, len(train_rows), sources, fingerprint, skipped)


def _build(config: BuildConfig, inputs: BuildInputs) -> dict:
  """The local build: staging, split, shards, then `finish_build`."""
  rows = inputs.rows
  _stage(config, inputs.image_dir, rows)
  staging = files.join(config.output_dir, records.STAGING)
  num_chunks = math.ceil(len(rows) / _chunk_size(len(rows)))
  staged = _read_staged_results(staging, num_chunks)
  inputs.skipped += [csv_io.SkippedRow('image', 0, entry.image_id, entry.reason)
                     for entry in staged if entry.reason]
  plan, placements = plan_split([(position, entry.image_id, rows[position].landmark_id)
                                 for position, entry in enumerate(staged) if not entry.reason],
                                config)
  check_plan(plan, inputs.num_train_rows, inputs.skipped, config)
  return finish_build(config, inputs, plan, _write_shards(config, staged, placements))


def finish_build(config: BuildConfig, inputs: BuildInputs, plan: SplitPlan,
                 shards: Dict[str, List[dict]]) -> dict:
  """Writes the label map, the TFDS metadata and, last, the manifest; removes the staging.

  Args:
    config: the build's settings.
    inputs: the build's inputs, with every unusable image among `skipped`.
    plan: the split.
    shards: per split, the manifest entries of its shards in order.

  Returns:
    The manifest, as read back.
  """
  written = {name: sum(shard['examples'] for shard in shards[name]) for name in records.SPLITS}
  if written != plan.totals:
    raise AssertionError(f'wrote {written} examples, expected {plan.totals}')
  skipped = inputs.skipped + [csv_io.SkippedRow('split', 0, image_id, reason)
                              for image_id, reason in plan.dropped]
  records.write_label_map(config.output_dir, plan.label_map)
  records.write_tfds_metadata(config.output_dir, shards, len(plan.label_map))
  manifest = {
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'config': settings.as_dict(config),
      'fingerprint': inputs.fingerprint,
      'sources': inputs.sources,
      'image_dir': inputs.image_dir,
      'num_classes': len(plan.label_map),
      'dropped_classes': plan.candidate_classes - len(plan.label_map),
      'validation_duplicates': plan.validation_duplicates,
      'splits': {name: {'examples': plan.totals[name], 'shards': shards[name]}
                 for name in records.SPLITS},
      'skipped': {'total': len(skipped), 'by_reason': _skipped_summary(skipped),
                  'rows': [dataclasses.asdict(row) for row in skipped]},
  }
  records.write_manifest(config.output_dir, manifest)
  staging = files.join(config.output_dir, records.STAGING)
  if not config.keep_staging:
    tf.io.gfile.rmtree(staging)
  return records.load_manifest(config.output_dir)
