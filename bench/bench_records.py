r"""Record-building throughput: `tfl-build-records` against a naive single-process baseline.

Both sides turn the same CSV rows into resized JPEG TFRecords in the same run:
  baseline  one loop in one process: tf.io.read_file → tf.io.decode_image → tf.image.resize
            (long side = --max_image_size) → tf.io.encode_jpeg → Example → TFRecordWriter.
  ours      ingest.build_records with --num_workers processes (Pillow with JPEG draft mode), the
            full build: staging, split, shards, label map, TFDS metadata and manifest.

Usage (from the repository root):
  .venv/bin/python bench/bench_records.py                       # real photos + 640-px synthetic
  .venv/bin/python bench/bench_records.py --sets=real --repeats=5 --real_copies=1

Prints images/s of each side and the ratio; the target is ours ≥ 3× the baseline.
"""

import csv
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import tensorflow as tf

from tf_landmarks import csv_io
from tf_landmarks import ingest
from tf_landmarks import schema


REAL_DATA = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'landmarks-real')

_SETS = flags.DEFINE_list('sets', ['real', 'synthetic'], 'Image sets to measure: real, synthetic.')
_MAX_IMAGE_SIZE = flags.DEFINE_integer('max_image_size', 256, 'Long side after resizing.')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2, 'Processes of our builder.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per side; the median is reported.')
_SYNTHETIC_IMAGES = flags.DEFINE_integer('synthetic_images', 600, 'Synthetic train images.')
_SYNTHETIC_SIZE = flags.DEFINE_integer('synthetic_size', 640, 'Side of the synthetic images, px.')
_REAL_COPIES = flags.DEFINE_integer(
    'real_copies', 8, 'The 125 real photos are measured this many times over (copies under new ids '
    'in a temporary folder), so that per-build fixed costs (worker start, TFDS metadata) do not '
    'dominate; 1 measures the set as it is.')


def baseline(rows, image_dir, output_path, max_side):
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


def ours(train_csv, test_csv, image_dir, output_dir, max_side, num_workers):
  ingest.build_records(ingest.BuildConfig(
      output_dir=output_dir, train_csv=train_csv, test_csv=test_csv, image_dir=image_dir,
      max_image_size=max_side, num_workers=num_workers, overwrite=True, progress=False))


def replicate_real_set(copies, work_dir):
  """Copies the real set `copies` times under fresh ids; returns (train_csv, test_csv, image_dir)."""
  data_dir = os.path.join(work_dir, 'real')
  image_dir = os.path.join(data_dir, 'images')
  os.makedirs(image_dir)
  paths = []
  for name in ('train.csv', 'test.csv'):
    with open(os.path.join(REAL_DATA, name), newline='') as f:
      rows = list(csv.DictReader(f))
    out_path = os.path.join(data_dir, name)
    with open(out_path, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      for copy in range(copies):
        for row in rows:
          new_id = f'{copy:02x}{row["id"][2:]}'
          shutil.copyfile(os.path.join(REAL_DATA, 'images', f'{row["id"]}.jpg'),
                          os.path.join(image_dir, f'{new_id}.jpg'))
          writer.writerow({**row, 'id': new_id})
    paths.append(out_path)
  return paths[0], paths[1], image_dir


def measure(name, train_csv, test_csv, image_dir, work_dir):
  rows = csv_io.read_train_csv(train_csv)[0] + csv_io.read_test_csv(test_csv)[0]
  timings = {'baseline': [], 'ours': []}
  # Warm up TensorFlow's eager kernels so the baseline is not charged for their first call.
  baseline(rows[:3], image_dir, os.path.join(work_dir, 'warmup.tfrecord'), _MAX_IMAGE_SIZE.value)
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    baseline(rows, image_dir, os.path.join(work_dir, 'baseline.tfrecord'), _MAX_IMAGE_SIZE.value)
    timings['baseline'].append(time.perf_counter() - start)
    start = time.perf_counter()
    ours(train_csv, test_csv, image_dir, os.path.join(work_dir, 'ours'), _MAX_IMAGE_SIZE.value,
         _NUM_WORKERS.value)
    timings['ours'].append(time.perf_counter() - start)
  rates = {side: len(rows) / statistics.median(seconds) for side, seconds in timings.items()}
  print(f'{name:<11} {len(rows):>5} images → {_MAX_IMAGE_SIZE.value} px: '
        f'baseline {rates["baseline"]:7.1f} img/s, ours ({_NUM_WORKERS.value} workers) '
        f'{rates["ours"]:7.1f} img/s, ratio {rates["ours"] / rates["baseline"]:.2f}x')
  sys.stdout.flush()


def main(argv):
  del argv
  print(f'cores: {os.cpu_count()}, repeats: {_REPEATS.value} (median)')
  with tempfile.TemporaryDirectory() as work_dir:
    if 'real' in _SETS.value:
      if not os.path.exists(os.path.join(REAL_DATA, 'train.csv')):
        print(f'real: skipped, {REAL_DATA} is absent')
      else:
        measure(f'real x{_REAL_COPIES.value}', *replicate_real_set(_REAL_COPIES.value, work_dir),
                work_dir)
    if 'synthetic' in _SETS.value:
      from tf_landmarks import synthetic  # pylint: disable=g-import-not-at-top
      data_dir = os.path.join(work_dir, 'synthetic')
      synthetic.generate(data_dir, synthetic.WorldSpec(
          num_landmarks=40, num_unseen_landmarks=8, num_train_images=_SYNTHETIC_IMAGES.value,
          num_test_images=_SYNTHETIC_IMAGES.value // 4, image_size=_SYNTHETIC_SIZE.value))
      measure(f'synth {_SYNTHETIC_SIZE.value}', os.path.join(data_dir, 'train.csv'),
              os.path.join(data_dir, 'test.csv'), os.path.join(data_dir, 'images'), work_dir)


if __name__ == '__main__':
  app.run(main)
