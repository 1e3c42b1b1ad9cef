r"""Input-pipeline throughput: the full training pipeline against bare JPEG decoding of the same shards.

  bare   TFRecordDataset → parse → tf.io.decode_jpeg → batch → prefetch (parallel map): the rate at which
         these 2 cores can merely decode the shards.
  full   tf_landmarks.data.make_dataset(training=True, backbone=None): interleaved reading, shuffle,
         Inception-style crop decoded with decode_and_crop_jpeg, resize to --image_size, flip, uint8
         batches (the model preprocesses on the accelerator). Optionally class balancing (--class_balance).
  +host  the same with ResNet50 preprocessing on the host (float32 batches), for CPU-only training.

Usage (from the repository root; shards from tfl-build-records):
  .venv/bin/python bench/bench_input_pipeline.py --records_dir=records/landmarks_real
  .venv/bin/python bench/bench_input_pipeline.py --records_dir=records/synthetic640 --seconds=20

Prints images/s of each and the ratios to bare; the target is full ≥ 0.8 × bare.
"""

import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import tensorflow as tf

from tf_landmarks import data
from tf_landmarks import schema

_RECORDS_DIR = flags.DEFINE_string('records_dir', None, 'A tfl-build-records output folder.',
                                   required=True)
_SPLIT = flags.DEFINE_string('split', 'train', 'Shards to read: <split>-*.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Output side of the full pipeline.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Batch size.')
_SECONDS = flags.DEFINE_float('seconds', 10.0, 'Timed seconds per pipeline (after warm-up).')
_CLASS_BALANCE = flags.DEFINE_float('class_balance', 1.0, 'Class balance power of the full pipeline.')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'Alternating timed rounds; the best rate of each wins.')


def bare_dataset(file_pattern: str, batch_size: int) -> tf.data.Dataset:
  files = tf.io.gfile.glob(file_pattern)
  dataset = tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE).repeat()
  dataset = dataset.map(lambda r: tf.io.decode_jpeg(schema.parse_example(r)[schema.ENCODED], channels=3),
                        num_parallel_calls=tf.data.AUTOTUNE)
  # Images differ in size: a ragged batch keeps the bare side free of any resize work.
  dataset = dataset.ragged_batch(batch_size)
  return dataset.prefetch(tf.data.AUTOTUNE)


def rate(dataset: tf.data.Dataset, batch_size: int, seconds: float) -> float:
  iterator = iter(dataset)
  for _ in range(5):  # Warm-up: fill buffers, let AUTOTUNE settle.
    next(iterator)
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    count += batch_size
  return count / (time.perf_counter() - start)


def main(argv):
  del argv
  pattern = os.path.join(_RECORDS_DIR.value, f'{_SPLIT.value}-*')
  counts = data.read_class_counts(_RECORDS_DIR.value) if _CLASS_BALANCE.value != 1.0 else None
  pipelines = {'bare': bare_dataset(pattern, _BATCH_SIZE.value)}
  for name, backbone in (('full', None), ('+host', 'resnet50')):
    pipelines[name] = data.make_dataset(
        pattern, training=True, batch_size=_BATCH_SIZE.value, image_size=_IMAGE_SIZE.value,
        backbone=backbone, class_counts=counts, class_balance=_CLASS_BALANCE.value,
        shuffle_buffer=1024)
  best = dict.fromkeys(pipelines, 0.0)
  for _ in range(_REPEATS.value):
    for name, dataset in pipelines.items():
      best[name] = max(best[name], rate(dataset, _BATCH_SIZE.value, _SECONDS.value))
  print(f'{pattern} ({_IMAGE_SIZE.value} px, class_balance={_CLASS_BALANCE.value:g}): '
        f'bare decode {best["bare"]:.0f} img/s; full pipeline, uint8 out {best["full"]:.0f} img/s '
        f'(ratio {best["full"] / best["bare"]:.2f}); with ResNet50 preprocessing on the host '
        f'{best["+host"]:.0f} img/s (ratio {best["+host"] / best["bare"]:.2f})')


if __name__ == '__main__':
  app.run(main)
