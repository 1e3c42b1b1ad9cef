r"""tfl-build-records: Google Landmarks CSVs + images → sharded TFRecords.

Examples:
  tfl-build-records --train_csv=train.csv --test_csv=test.csv --image_dir=images \
      --output_dir=records/gld --max_image_size=640
  tfl-build-records --train_csv=train.csv --train_clean_csv=train_clean.csv --download \
      --output_dir=gs://bucket/records/gldv2 --validation_fraction=0.05
  tfl-build-records --flagfile=configs/synthetic_records.flags --output_dir=records/synthetic

Writes `{train,validation,test}-NNNNN-of-NNNNN` shards, `label_map.csv`, `manifest.json` and TFDS
metadata into --output_dir; see records/README.md for the layout.
"""

import sys

from absl import app
from absl import flags

from tf_landmarks import csv_io
from tf_landmarks import ingest
from tf_landmarks import splits

_DEFAULTS = ingest.BuildConfig()

_TRAIN_CSV = flags.DEFINE_string(
    'train_csv', None, 'Train CSV with columns id,url,landmark_id (url may be absent with '
    '--image_dir). Rows with an unsafe, empty or duplicate id or a non-integer landmark_id are skipped '
    'and listed in the manifest.')
_TEST_CSV = flags.DEFINE_string(
    'test_csv', None, 'Optional test CSV with columns id,url; its images become the unlabelled test '
    'split.')
_TRAIN_CLEAN_CSV = flags.DEFINE_string(
    'train_clean_csv', None, "Optional GLDv2 train_clean.csv (landmark_id,images with space-separated "
    'ids): train is restricted to this clean subset. May be given without --train_csv.')
_IMAGE_DIR = flags.DEFINE_string(
    'image_dir', None, 'Folder with the images as <id>.jpg or in DELF\'s nested layout a/b/c/<id>.jpg '
    '(any format Pillow reads, despite the .jpg name). Any tf.io.gfile path (gs://…) works.')
_DOWNLOAD = flags.DEFINE_boolean(
    'download', False, 'Fetch the url column (http/https only) into --download_dir instead of '
    'reading --image_dir. Finished downloads are reused by later runs.')
_DOWNLOAD_DIR = flags.DEFINE_string(
    'download_dir', None, 'Download cache folder; default <output_dir>/downloads. Failures are listed '
    'in its failures.csv.')
_DOWNLOAD_THREADS = flags.DEFINE_integer(
    'download_threads', _DEFAULTS.download_threads, 'Concurrent downloads.', lower_bound=1)
_DOWNLOAD_TIMEOUT = flags.DEFINE_float(
    'download_timeout_s', _DEFAULTS.download_timeout_s, 'Time limit of one download attempt, seconds.',
    lower_bound=0.1)
_DOWNLOAD_MAX_BYTES = flags.DEFINE_integer(
    'download_max_bytes', _DEFAULTS.download_max_bytes, 'Largest image file accepted, bytes.',
    lower_bound=1)
_OUTPUT_DIR = flags.DEFINE_string(
    'output_dir', _DEFAULTS.output_dir, 'Folder for shards, label_map.csv, manifest.json and TFDS '
    'metadata.')
_VALIDATION_FRACTION = flags.DEFINE_float(
    'validation_fraction', _DEFAULTS.validation_fraction, 'Share of each class sent to validation '
    '(stratified per class; every class keeps at least one training image).', lower_bound=0.0,
    upper_bound=0.99)
_SEED = flags.DEFINE_integer('seed', _DEFAULTS.seed, 'Seed of the split and of the shard order.')
_SINGLETONS = flags.DEFINE_enum_class(
    'singletons', _DEFAULTS.singletons, splits.Singletons, 'Classes with one image: "train" keeps it '
    'in train only; "duplicate" also puts a distorted copy in validation; "drop" leaves the class out.')
_MIN_IMAGES = flags.DEFINE_integer(
    'min_images_per_class', _DEFAULTS.min_images_per_class, 'Classes with fewer readable images are '
    'dropped (the manifest says how many).', lower_bound=1)
_MAX_IMAGE_SIZE = flags.DEFINE_integer(
    'max_image_size', _DEFAULTS.max_image_size, 'Resize so that the long side is at most this many '
    'pixels (aspect kept, never upscaled); 0 keeps the original size.', lower_bound=0)
_JPEG_QUALITY = flags.DEFINE_integer(
    'jpeg_quality', _DEFAULTS.jpeg_quality, 'JPEG quality of re-encoded images.', lower_bound=1,
    upper_bound=100)
_MIN_IMAGE_SIDE = flags.DEFINE_integer(
    'min_image_side', _DEFAULTS.min_image_side, 'Images whose shorter side is smaller are skipped.',
    lower_bound=1)
_EXAMPLES_PER_SHARD = flags.DEFINE_integer(
    'examples_per_shard', _DEFAULTS.examples_per_shard, 'Target number of examples per shard.',
    lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer(
    'num_workers', _DEFAULTS.num_workers, 'Image-processing processes; 1 works in this process.',
    lower_bound=1)
_RESUME = flags.DEFINE_boolean(
    'resume', False, 'Continue an interrupted build in --output_dir, skipping finished work (the '
    'inputs and settings must be the same).')
_OVERWRITE = flags.DEFINE_boolean(
    'overwrite', False, 'Delete a build already in --output_dir (only files a build writes).')
_KEEP_STAGING = flags.DEFINE_boolean(
    'keep_staging', False, 'Keep the intermediate .staging folder after a successful build.')
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show progress bars.')


def _print_summary(manifest: dict) -> None:
  lines = [f'Wrote {manifest["config"]["output_dir"]}: {manifest["num_classes"]} classes']
  for name, info in manifest['splits'].items():
    if info['examples']:
      lines.append(f'  {name:<10} {info["examples"]:>8} examples in {len(info["shards"])} shard(s)')
  if manifest['dropped_classes']:
    lines.append(f'  dropped {manifest["dropped_classes"]} class(es) (--min_images_per_class/'
                 '--singletons)')
  skipped = manifest['skipped']
  if skipped['total']:
    reasons = ', '.join(f'{count} {reason}' for reason, count in skipped['by_reason'].items())
    lines.append(f'  skipped {skipped["total"]} row(s): {reasons} (details in manifest.json)')
  print('\n'.join(lines))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = ingest.BuildConfig(
      output_dir=_OUTPUT_DIR.value, train_csv=_TRAIN_CSV.value, test_csv=_TEST_CSV.value,
      train_clean_csv=_TRAIN_CLEAN_CSV.value, image_dir=_IMAGE_DIR.value, download=_DOWNLOAD.value,
      download_dir=_DOWNLOAD_DIR.value, download_threads=_DOWNLOAD_THREADS.value,
      download_timeout_s=_DOWNLOAD_TIMEOUT.value, download_max_bytes=_DOWNLOAD_MAX_BYTES.value,
      validation_fraction=_VALIDATION_FRACTION.value, seed=_SEED.value, singletons=_SINGLETONS.value,
      min_images_per_class=_MIN_IMAGES.value, max_image_size=_MAX_IMAGE_SIZE.value,
      jpeg_quality=_JPEG_QUALITY.value, min_image_side=_MIN_IMAGE_SIDE.value,
      examples_per_shard=_EXAMPLES_PER_SHARD.value, num_workers=_NUM_WORKERS.value,
      resume=_RESUME.value, overwrite=_OVERWRITE.value, keep_staging=_KEEP_STAGING.value,
      progress=_PROGRESS.value)
  try:
    manifest = ingest.build_records(config)
  except (ingest.BuildError, csv_io.CsvError) as error:
    print(f'tfl-build-records: error: {error}', file=sys.stderr)
    return 2
  _print_summary(manifest)
  return 0


def run():
  app.run(main)


if __name__ == '__main__':
  run()
