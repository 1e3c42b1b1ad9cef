r"""tfl-inspect-records: checks a finished record build and shows one batch through the input pipeline.

Examples:
  tfl-inspect-records --records_dir=records/synthetic
  tfl-inspect-records --records_dir=gs://bucket/records/gldv2 --noverify --class_balance=0.5

Exits non-zero with a message if the folder is not a finished build or a shard does not match the
manifest (missing, truncated, or with a different example count).
"""

import sys

from absl import app
from absl import flags

from tf_landmarks import data
from tf_landmarks import inspect_records

_RECORDS_DIR = flags.DEFINE_string('records_dir', 'records', 'Output folder of tfl-build-records.')
_SPLIT = flags.DEFINE_enum('split', 'train', ['train', 'validation', 'test'],
                           'Split to read a batch from.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 16, 'Examples in the batch shown.', lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'Side of the square images.', lower_bound=8)
_BACKBONE = flags.DEFINE_string('backbone', 'resnet50', 'Backbone whose preprocessing is applied '
                                '(vgg16 and resnet50: Caffe-style BGR minus means; others: [-1, 1]; '
                                '"none": uint8 pixels, as fed to a model that preprocesses itself).')
_CLASS_BALANCE = flags.DEFINE_float('class_balance', 1.0, 'For the train split: classes drawn '
                                    'proportionally to n^class_balance (1 natural, 0 uniform).',
                                    lower_bound=0.0, upper_bound=1.0)
_VERIFY = flags.DEFINE_boolean('verify', True, 'Count the records of every shard against the '
                               'manifest (reads every shard once).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the training pipeline.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  records_dir = _RECORDS_DIR.value
  try:
    manifest = inspect_records.load_manifest(records_dir)
    if _VERIFY.value:
      inspect_records.verify_shards(records_dir, manifest)
  except inspect_records.InspectError as error:
    print(f'tfl-inspect-records: error: {error}', file=sys.stderr)
    return 2
  label_map = inspect_records.read_label_map(records_dir)
  print(f'{records_dir}:' + (' all shards match the manifest' if _VERIFY.value else ''))
  for line in inspect_records.summary_lines(manifest, label_map):
    print(f'  {line}')

  split = _SPLIT.value
  if not manifest['splits'][split]['examples']:
    print(f'The {split} split is empty; nothing to read.')
    return 0
  training = split == 'train'
  dataset = data.make_dataset(
      f'{records_dir}/{split}-*', training=training, batch_size=_BATCH_SIZE.value,
      image_size=_IMAGE_SIZE.value, seed=_SEED.value,
      backbone=None if _BACKBONE.value == 'none' else _BACKBONE.value,
      class_counts=[row['num_images'] for row in label_map] if training else None,
      class_balance=_CLASS_BALANCE.value if training else 1.0, with_ids=True)
  images, labels, ids = (t.numpy() for t in next(iter(dataset)))
  landmark_of = {row['label']: row['landmark_id'] for row in label_map}
  print(f'One {"training (augmented) " if training else ""}{split} batch through the input pipeline:')
  print(f'  images {images.dtype} {list(images.shape)}, values {images.min():.1f}..{images.max():.1f}'
        f' (per-channel means {", ".join(f"{m:.1f}" for m in images.mean(axis=(0, 1, 2)))}; '
        f'{_BACKBONE.value} preprocessing)')
  print(f'  labels {labels.dtype} {labels.tolist()}')
  shown = [f'{i.decode()}→{landmark_of.get(int(l), "none")}' for i, l in zip(ids[:4], labels[:4])]
  print(f'  ids→landmark_id {", ".join(shown)}{", …" if len(ids) > 4 else ""}')
  return 0


def run():
  app.run(main)


if __name__ == '__main__':
  run()
