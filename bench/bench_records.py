r"""Record-building throughput: `tfl-build-records` against DELF's builder and a naive loop.

Two comparisons, each interleaved over --rounds rounds (bench/timing.py), each reporting the median
and the min–max range of the per-round figures:

  delf   The public peer: DELF's `build_image_dataset.py` (tensorflow/models, research/delf), run as
         `python build_image_dataset.py` from --delf_dir, against the `tfl-build-records` console
         script, both as whole processes (interpreter and TensorFlow start-up included) on the same
         input: the real photos of ../shared/data/landmarks-real (train split, ≤ 640 px) copied
         --delf_copies times under new ids into a temporary folder. Both copy the original JPEG
         bytes (ours with --max_image_size=640, so nothing is resized), read the same train.csv and
         GLDv2-style train_clean.csv, split off 10% for validation and write about the same number
         of shard files. CPU time is the child's user + system time, its worker processes included.
  naive  One loop in this process: tf.io.read_file → decode_image → tf.image.resize (long side =
         --max_image_size) → encode_jpeg → Example → TFRecordWriter, against ingest.build_records
         with --num_workers processes, in this process too (no start-up cost on either side), on
         the real photos (train + test) ×--real_copies and on a synthetic set (--sets).

DELF's files are not part of this repository: see bench/README.md for where they come from. Without
them the delf comparison is skipped with a message and the rest still runs.

Usage (from the repository root):
  .venv/bin/python bench/bench_records.py                        # both comparisons, ~4 minutes
  .venv/bin/python bench/bench_records.py --comparisons=delf --rounds=7
  .venv/bin/python bench/bench_records.py --comparisons=naive --sets=synthetic --synthetic_size=1280
"""

import csv
import importlib.util
import math
import os
import shutil
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import tensorflow as tf

import timing
from real_set import REAL_DATA, replicate_real_set
from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import ingest
from tf_landmarks import schema

DELF_BUILDER = 'build_image_dataset.py'
DELF_BUILDER_SOURCE = 'research/delf/delf/python/training/build_image_dataset.py'

_COMPARISONS = flags.DEFINE_list('comparisons', ['delf', 'naive'],
                                 'Comparisons to run: delf, naive (see the docstring).')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds of each comparison.', lower_bound=1)
_DELF_DIR = flags.DEFINE_string(
    'delf_dir', os.path.join(os.path.dirname(__file__), 'delf_reference'),
    f'Folder holding DELF\'s {DELF_BUILDER} (see bench/README.md).')
_DELF_COPIES = flags.DEFINE_integer(
    'delf_copies', 64, 'The 58 real train photos are copied this many times under new ids for the '
    'delf comparison (64: 3,712 images).', lower_bound=1)
_DELF_EXAMPLES_PER_SHARD = flags.DEFINE_integer(
    'delf_examples_per_shard', 256, '--examples_per_shard of our side in the delf comparison; DELF '
    'gets the --num_shards (per split) that makes the same total number of shard files.',
    lower_bound=1)
_SETS = flags.DEFINE_list('sets', ['real', 'synthetic'],
                          'Image sets of the naive comparison: real, synthetic.')
_MAX_IMAGE_SIZE = flags.DEFINE_integer('max_image_size', 256,
                                       'Long side after resizing, naive comparison.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2, 'Processes of our builder.', lower_bound=1)
_SYNTHETIC_IMAGES = flags.DEFINE_integer('synthetic_images', 600, 'Synthetic train images.')
_SYNTHETIC_SIZE = flags.DEFINE_integer('synthetic_size', 640, 'Side of the synthetic images, px.')
_REAL_COPIES = flags.DEFINE_integer(
    'real_copies', 8, 'Naive comparison: the 125 real photos are measured this many times over '
    '(copies under new ids in a temporary folder), so that per-build fixed costs (worker start, '
    'TFDS metadata) do not dominate; 1 measures the set as it is.', lower_bound=1)

flags.register_validator('comparisons', lambda names: set(names) <= {'delf', 'naive'},
                         '--comparisons takes delf and/or naive')
flags.register_validator('sets', lambda names: set(names) <= {'real', 'synthetic'},
                         '--sets takes real and/or synthetic')


def write_train_clean_csv(train_rows, path):
  """The GLDv2 train_clean.csv layout: landmark_id,images (space-separated ids)."""
  ids_by_landmark = {}
  for row in train_rows:
    ids_by_landmark.setdefault(row['landmark_id'], []).append(row['id'])
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['landmark_id', 'images'])
    for landmark_id, ids in sorted(ids_by_landmark.items()):
      writer.writerow([landmark_id, ' '.join(ids)])


def count_output(output_dir):
  """'<train>+<validation> examples in <n>+<m> shards' of a build: shows both did the same."""
  examples, shards = [], []
  for split in ('train', 'validation'):
    paths = tf.io.gfile.glob(os.path.join(output_dir, f'{split}-*'))
    shards.append(len(paths))
    examples.append(sum(1 for _ in tf.data.TFRecordDataset(paths)) if paths else 0)
  return f'{examples[0]}+{examples[1]} examples in {shards[0]}+{shards[1]} shards'


def delf_missing_reason(delf_dir):
  """Why DELF's builder cannot run here, or None if it can."""
  if not os.path.isfile(os.path.join(delf_dir, DELF_BUILDER)):
    return (f'{os.path.join(delf_dir, DELF_BUILDER)} is absent; save {DELF_BUILDER_SOURCE} of the '
            'tensorflow/models repository there (bench/README.md)')
  if importlib.util.find_spec('pandas') is None:
    return 'DELF\'s builder needs pandas: .venv/bin/pip install pandas'
  return None


def compare_with_delf(work_dir):
  """Interleaved whole-process runs of tfl-build-records and DELF's builder; prints the results."""
  delf_dir = os.path.abspath(_DELF_DIR.value)
  reason = delf_missing_reason(delf_dir)
  if reason is None and not os.path.exists(os.path.join(REAL_DATA, 'train.csv')):
    reason = f'{REAL_DATA} is absent'
  if reason:
    timing.print_line(f'delf: skipped, {reason}')
    return
  data_dir = os.path.join(work_dir, 'delf_input')
  paths, image_dir, rows = replicate_real_set(_DELF_COPIES.value, data_dir, ['train.csv'])
  train_csv, clean_csv = paths['train.csv'], os.path.join(data_dir, 'train_clean.csv')
  write_train_clean_csv(rows['train.csv'], clean_csv)
  num_images = len(rows['train.csv'])
  # Ours writes ceil(n / examples_per_shard) shards per split, DELF --num_shards per split: give
  # DELF the count that makes the same total number of shard files.
  per_shard = _DELF_EXAMPLES_PER_SHARD.value
  validation = round(num_images * 0.1)
  our_shards = math.ceil((num_images - validation) / per_shard) + math.ceil(validation / per_shard)
  delf_shards = max(1, round(our_shards / 2))
  outputs = {'ours': os.path.join(work_dir, 'ours_out'), 'delf': os.path.join(work_dir, 'delf_out')}
  ours_command = shutil.which('tfl-build-records', path=os.path.dirname(sys.executable))
  if ours_command is None:
    timing.print_line('delf: skipped, tfl-build-records is not installed beside this Python '
                      '(pip install -e .)')
    return
  commands = {
      'ours': [ours_command, f'--train_csv={train_csv}', f'--train_clean_csv={clean_csv}',
               f'--image_dir={image_dir}', f'--output_dir={outputs["ours"]}',
               '--max_image_size=640', '--validation_fraction=0.1', '--seed=0',
               f'--examples_per_shard={per_shard}', f'--num_workers={_NUM_WORKERS.value}',
               '--noprogress'],
      'delf': [sys.executable, DELF_BUILDER, f'--train_directory={image_dir}',
               f'--output_directory={outputs["delf"]}', f'--train_csv_path={train_csv}',
               f'--train_clean_csv_path={clean_csv}', f'--num_shards={delf_shards}',
               '--generate_train_validation_splits', '--validation_split_size=0.1', '--seed=0'],
  }
  cwds = {'ours': None, 'delf': delf_dir}

  def fresh_output(side):
    shutil.rmtree(outputs[side], ignore_errors=True)
    if side == 'delf':  # DELF's builder writes into an existing folder; ours creates its own.
      os.makedirs(outputs[side])

  try:
    samples = timing.interleave(
        {side: lambda side=side: timing.time_process(commands[side], num_images, cwd=cwds[side])
         for side in commands}, _ROUNDS.value, before_each=fresh_output)
  except RuntimeError as error:
    timing.print_line(f'delf: failed, {error}')
    return
  speed = timing.spread(timing.ratios(samples['ours'], samples['delf']), unit='x')
  ours_label = f'ours ({_NUM_WORKERS.value} workers)'
  timing.print_line(
      f'delf: {num_images} real photos (58 ×{_DELF_COPIES.value}), ≤ 640 px passed through, '
      f'whole processes, {_ROUNDS.value} rounds, median (range):\n'
      f'  {ours_label:<20} {timing.describe(samples["ours"])}; wrote '
      f'{count_output(outputs["ours"])}\n'
      f'  {"DELF (1 process)":<20} {timing.describe(samples["delf"])}; wrote '
      f'{count_output(outputs["delf"])}\n'
      f'  {"ours/DELF speed":<20} {speed}')


def naive_loop(rows, image_dir, output_path, max_side):
  """The naive pipeline: everything in TensorFlow ops, one image at a time, one process."""
  with tf.io.TFRecordWriter(output_path) as writer:
    for row in rows:
      image = tf.io.decode_image(tf.io.read_file(os.path.join(image_dir, f'{row.image_id}.jpg')),
                                 channels=3, expand_animations=False)
      height, width = image.shape[0], image.shape[1]
      scale = min(1.0, max_side / max(height, width))
      size = (max(1, round(height * scale)), max(1, round(width * scale)))
      resized = tf.cast(tf.clip_by_value(tf.image.resize(image, size), 0, 255), tf.uint8)
      encoded = tf.io.encode_jpeg(resized, quality=90).numpy()
      writer.write(schema.make_example(row.image_id, encoded, size[0], size[1], 0,
                                       row.landmark_id or 0).SerializeToString())


def compare_with_naive_loop(name, train_csv, test_csv, image_dir, work_dir):
  """Interleaved in-process runs of the naive loop and ingest.build_records; prints the results."""
  rows = csv_io.read_train_csv(train_csv)[0] + csv_io.read_test_csv(test_csv)[0]
  naive_path, ours_dir = os.path.join(work_dir, 'naive.tfrecord'), os.path.join(work_dir, 'ours')
  # Warm up TensorFlow's eager kernels so the naive side is not charged for their first call.
  naive_loop(rows[:3], image_dir, naive_path, _MAX_IMAGE_SIZE.value)
  config = ingest.BuildConfig(
      output_dir=ours_dir, train_csv=train_csv, test_csv=test_csv, image_dir=image_dir,
      max_image_size=_MAX_IMAGE_SIZE.value, num_workers=_NUM_WORKERS.value, progress=False)
  sides = {
      'naive': lambda: timing.time_call(
          lambda: naive_loop(rows, image_dir, naive_path, _MAX_IMAGE_SIZE.value), len(rows)),
      'ours': lambda: timing.time_call(lambda: ingest.build_records(config), len(rows)),
  }
  samples = timing.interleave(sides, _ROUNDS.value,
                              before_each=lambda side: shutil.rmtree(ours_dir, ignore_errors=True))
  speed = timing.spread(timing.ratios(samples['ours'], samples['naive']), unit='x')
  ours_label = f'ours ({_NUM_WORKERS.value} workers)'
  timing.print_line(
      f'naive: {name}, {len(rows)} images → {_MAX_IMAGE_SIZE.value} px, in-process, '
      f'{_ROUNDS.value} rounds, median (range):\n'
      f'  {ours_label:<20} {timing.describe(samples["ours"])}\n'
      f'  {"naive tf.image loop":<20} {timing.describe(samples["naive"])}\n'
      f'  {"ours/naive speed":<20} {speed}')


def compare_naive_on_sets():
  """The naive comparison on each set of --sets, each in its own temporary folder."""
  if 'real' in _SETS.value:
    if not os.path.exists(os.path.join(REAL_DATA, 'train.csv')):
      timing.print_line(f'naive: real set skipped, {REAL_DATA} is absent')
    else:
      with tempfile.TemporaryDirectory() as work_dir:
        paths, image_dir, _ = replicate_real_set(
            _REAL_COPIES.value, os.path.join(work_dir, 'real'), ['train.csv', 'test.csv'])
        compare_with_naive_loop(f'real photos ×{_REAL_COPIES.value}', paths['train.csv'],
                                paths['test.csv'], image_dir, work_dir)
  if 'synthetic' in _SETS.value:
    from tf_landmarks import synthetic  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as work_dir:
      data_dir = os.path.join(work_dir, 'synthetic')
      synthetic.generate(data_dir, synthetic.WorldSpec(
          num_landmarks=40, num_unseen_landmarks=8, num_train_images=_SYNTHETIC_IMAGES.value,
          num_test_images=_SYNTHETIC_IMAGES.value // 4, image_size=_SYNTHETIC_SIZE.value))
      compare_with_naive_loop(
          f'synthetic {_SYNTHETIC_SIZE.value} px', os.path.join(data_dir, 'train.csv'),
          os.path.join(data_dir, 'test.csv'), os.path.join(data_dir, 'images'), work_dir)


def main(argv):
  del argv
  timing.print_line(f'start: {timing.load_note()}')
  if 'delf' in _COMPARISONS.value:
    with tempfile.TemporaryDirectory() as work_dir:
      compare_with_delf(work_dir)
  if 'naive' in _COMPARISONS.value:
    try:
      compare_naive_on_sets()
    except errors.UserError as error:  # Our builder refused the input: its message says why.
      timing.print_line(f'naive: failed, {error}')
  timing.print_line(f'end: {timing.load_note()}')


if __name__ == '__main__':
  app.run(main)
