r"""Input-pipeline throughput: our training pipeline against bare decoding and DELF's reader.

Every side reads the same shards (--records_dir, split --split) and yields batches of --batch_size
images of --image_size × --image_size:

  bare       TFRecordDataset → parse (image, label) → decode_jpeg → resize → batch → prefetch,
             the map parallel and unordered: the least any training pipeline must do.
  ours       tf_landmarks.data.make_dataset(training=True, backbone=None): shuffle, Inception-style
             crop decoded with decode_and_crop_jpeg, resize, flip, uint8 batches (the model
             preprocesses on the accelerator).
  balanced   the same with class balancing (--class_balance, default 0.5).
  ours+host  the same as ours with ResNet50 preprocessing on the host (float32 batches), the output
             DELF's reader gives, for a like-for-like comparison.
  delf       DELF's reader, CreateDataset(augmentation=True) of googlelandmarks.py
             (tensorflow/models, research/delf), loaded from --delf_dir: our shards use DELF's
             Example keys, so it reads them unchanged. Skipped with a message when the file is
             absent (bench/README.md).

The sides run interleaved over --rounds rounds (bench/timing.py); in each round every side gets a
fresh iterator, --warmup_seconds of untimed batches, then --seconds of timed ones, and only one
pipeline runs at a time. Prints images/s per side and the ratios ours/bare and ours/DELF (median and
min–max range of the per-round ratios).

Usage (from the repository root; shards from tfl-build-records):
  .venv/bin/python bench/bench_input_pipeline.py --records_dir=records/synthetic
  .venv/bin/python bench/bench_input_pipeline.py --records_dir=records/landmarks_real --rounds=7
"""

import importlib.util
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import tensorflow as tf

import timing
from tf_landmarks import data
from tf_landmarks import errors
from tf_landmarks import schema

DELF_READER = 'googlelandmarks.py'
DELF_READER_SOURCE = ('research/delf/delf/python/datasets/google_landmarks_dataset/'
                      'googlelandmarks.py')

_RECORDS_DIR = flags.DEFINE_string('records_dir', None, 'A tfl-build-records output folder.',
                                   required=True)
_SPLIT = flags.DEFINE_string('split', 'train', 'Split to read: shards <split>-*.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Side of the output images.', lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Batch size.', lower_bound=1)
_SECONDS = flags.DEFINE_float('seconds', 4.0, 'Timed seconds per side and round.', lower_bound=0.1)
_WARMUP_SECONDS = flags.DEFINE_float(
    'warmup_seconds', 2.0, 'Untimed seconds per side and round before timing (buffers fill, '
    'AUTOTUNE settles).', lower_bound=0.0)
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds.', lower_bound=1)
_CLASS_BALANCE = flags.DEFINE_float('class_balance', 0.5,
                                    'Class balance power of the balanced side.', lower_bound=0.0,
                                    upper_bound=1.0)
_DELF_DIR = flags.DEFINE_string(
    'delf_dir', os.path.join(os.path.dirname(__file__), 'delf_reference'),
    f'Folder holding DELF\'s {DELF_READER} (see bench/README.md).')


def _ours_dataset(records_dir: str, split: str, image_size: int, batch_size: int,
                  class_balance: float = 1.0, backbone=None) -> tf.data.Dataset:
  """Our training pipeline on `split` of a record build: the bench's one call to make_dataset."""
  return data.make_dataset(
      records_dir, split, training=True, batch_size=batch_size, backbone=backbone,
      config=data.InputConfig(image_size=image_size, class_balance=class_balance))


def bare_dataset(file_pattern: str, image_size: int, batch_size: int) -> tf.data.Dataset:
  """Decode + resize + batch and nothing else (float32 out, as tf.image.resize gives it)."""
  features = {schema.ENCODED: tf.io.FixedLenFeature([], tf.string),
              schema.LABEL: tf.io.FixedLenFeature([], tf.int64)}

  def decode(record):
    example = tf.io.parse_single_example(record, features)
    image = tf.io.decode_jpeg(example[schema.ENCODED], channels=3)
    return tf.image.resize(image, (image_size, image_size)), example[schema.LABEL]

  dataset = tf.data.TFRecordDataset(tf.io.gfile.glob(file_pattern)).repeat()
  dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
  options = tf.data.Options()
  options.deterministic = False
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


def load_delf_reader(delf_dir: str):
  """DELF's googlelandmarks module from `delf_dir`, or None with a printed reason."""
  path = os.path.join(delf_dir, DELF_READER)
  if not os.path.isfile(path):
    timing.print_line(f'delf: skipped, {path} is absent; save {DELF_READER_SOURCE} of the '
                      'tensorflow/models repository there (bench/README.md)')
    return None
  spec = importlib.util.spec_from_file_location('delf_googlelandmarks', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def time_dataset(dataset: tf.data.Dataset, batch_size: int) -> timing.Sample:
  """Images per second of a fresh iterator, after an untimed warm-up.

  The iterator is dropped on return, which stops its threads before the next side runs.
  """
  iterator = iter(dataset)
  start = time.perf_counter()
  next(iterator)
  while time.perf_counter() - start < _WARMUP_SECONDS.value:
    next(iterator)
  batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value:
    next(iterator)
    batches += 1
  return timing.Sample(batches * batch_size, time.perf_counter() - start)


def main(argv):
  del argv
  records_dir, split = _RECORDS_DIR.value, _SPLIT.value
  pattern = os.path.join(records_dir, f'{split}-*')
  if not tf.io.gfile.glob(pattern):
    print(f'bench_input_pipeline: error: no shards match {pattern}; build them with '
          'tfl-build-records', file=sys.stderr)
    return 2
  size, batch = _IMAGE_SIZE.value, _BATCH_SIZE.value
  try:
    datasets = {
        'bare': bare_dataset(pattern, size, batch),
        'ours': _ours_dataset(records_dir, split, size, batch),
        'balanced': _ours_dataset(records_dir, split, size, batch,
                                  class_balance=_CLASS_BALANCE.value),
        'ours+host': _ours_dataset(records_dir, split, size, batch, backbone='resnet50'),
    }
  except errors.UserError as error:  # E.g. an unfinished build: make_dataset says what to do.
    print(f'bench_input_pipeline: error: {error}', file=sys.stderr)
    return 2
  delf = load_delf_reader(os.path.abspath(_DELF_DIR.value))
  if delf is not None:
    datasets['delf'] = delf.CreateDataset(pattern, image_size=size, batch_size=batch,
                                          augmentation=True)
  load_at_start = timing.load_note()
  samples = timing.interleave(
      {name: lambda dataset=dataset: time_dataset(dataset, batch)
       for name, dataset in datasets.items()}, _ROUNDS.value)

  labels = {'bare': 'bare decode+resize', 'ours': 'ours, uint8 out',
            'balanced': f'ours, class_balance={_CLASS_BALANCE.value:g}',
            'ours+host': 'ours, ResNet50 preproc. on host', 'delf': 'DELF CreateDataset'}
  lines = [f'{pattern}: {size} px, batch {batch}, {_ROUNDS.value} rounds of {_SECONDS.value:g} s '
           'per side, median (range):']
  lines += [f'  {labels[name]:<32} {timing.describe(side)}' for name, side in samples.items()]
  pairs = [('ours', 'bare'), ('balanced', 'bare')]
  if 'delf' in samples:
    pairs += [('ours', 'delf'), ('balanced', 'delf'), ('ours+host', 'delf')]
  for top, bottom in pairs:
    ratios = timing.ratios(samples[top], samples[bottom])
    lines.append(f'  {top + "/" + bottom:<32} {timing.spread(ratios, unit="x")}')
  lines.append(f'  {load_at_start} at the start, {timing.load_note()} at the end')
  timing.print_line('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
