r"""tfl-inspect-records: checks a finished record build and shows one batch through the input pipeline.

Examples:
  tfl-inspect-records --records_dir=records/synthetic
  tfl-inspect-records --records_dir=gs://bucket/records/gldv2 --noverify --class_balance=0.5

Exits non-zero with a message if the folder is not a finished build or a shard does not match the
manifest (missing, truncated, or with a different example count).
"""

from absl import flags
import tensorflow as tf

from tf_landmarks import data
from tf_landmarks import records
from tf_landmarks.cli import common
from tf_landmarks.models import backbones

_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records', 'Output folder of tfl-build-records.')
_SPLIT = flags.DEFINE_enum('split', 'train', list(records.SPLITS), 'Split to read a batch from.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Examples in the batch shown.', lower_bound=1)
_BACKBONE = flags.DEFINE_enum('backbone', 'resnet50', [*backbones.BACKBONES, 'none'],
                              'Backbone whose preprocessing is applied (see '
                              'tf_landmarks/models/backbones.py); "none": uint8 pixels, as fed to '
                              'a model that preprocesses itself.')
_VERIFY = flags.DEFINE_boolean('verify', True, 'Count the records of every shard against the '
                               'manifest (reads every shard once).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the training pipeline.')
common.define_flags(data.InputConfig)


def main() -> int:
  build = records.load(_RECORDS_DIR.value)
  if _VERIFY.value:
    records.verify(build)
  print(f'{build.path}:' + (' all shards match the manifest' if _VERIFY.value else ''))
  for line in records.summary_lines(build):
    print(f'  {line}')

  split = _SPLIT.value
  if not build.num_examples(split):
    print(f'The {split} split is empty; nothing to read.')
    return 0
  training = split == 'train'
  backbone = None if _BACKBONE.value == 'none' else _BACKBONE.value
  dataset = data.make_dataset(build, split, training=training, batch_size=_BATCH_SIZE.value,
                              config=common.from_flags(data.InputConfig), backbone=backbone,
                              seed=_SEED.value, with_ids=True)
  try:
    images, labels, ids = (t.numpy() for t in next(iter(dataset)))
  except tf.errors.DataLossError:
    raise records.RecordsError(records.find_corrupt_shard(build.files(split))) from None
  print(f'One {"training (augmented) " if training else ""}{split} batch through the input pipeline:')
  print(f'  images {images.dtype} {list(images.shape)}, values {images.min():.1f}..{images.max():.1f}'
        f' (per-channel means {", ".join(f"{m:.1f}" for m in images.mean(axis=(0, 1, 2)))}; '
        f'{_BACKBONE.value} preprocessing)')
  if labels.ndim == 2:  # MixUp: one-hot mixtures; show the dominant class.
    labels = labels.argmax(axis=1)
  print(f'  labels {labels.tolist()}')
  shown = [f'{i.decode()}→{build.landmark_ids[l] if l >= 0 else "none"}'
           for i, l in zip(ids[:4], labels[:4])]
  print(f'  ids→landmark_id {", ".join(shown)}{", …" if len(ids) > 4 else ""}')
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
