r"""tfl-build-records: Google Landmarks CSVs + images → sharded TFRecords.

Examples:
  tfl-build-records --train_csv=train.csv --test_csv=test.csv --image_dir=images \
      --output_dir=records/gld --max_image_size=640
  tfl-build-records --train_csv=train.csv --train_clean_csv=train_clean.csv --download \
      --output_dir=gs://bucket/records/gldv2 --validation_fraction=0.05
  tfl-build-records --flagfile=configs/synthetic_records.flags --output_dir=records/synthetic

Writes `{train,validation,test}-NNNNN-of-NNNNN` shards, `label_map.csv`, `manifest.json` and TFDS
metadata into --output_dir; see records/README.md for the layout. An interrupted build (Ctrl-C, a
full disk, a killed process) continues with --resume.
"""

from tf_landmarks import ingest
from tf_landmarks import records
from tf_landmarks.cli import common

common.define_flags(ingest.BuildConfig)


def main() -> int:
  manifest = ingest.build_records(common.from_flags(ingest.BuildConfig))
  output_dir = common.FLAGS.output_dir
  print(f'Wrote {output_dir}:')
  for line in records.summary_lines(records.load(output_dir)):
    print(f'  {line}')
  if manifest['skipped']['total']:
    print('  (each skipped row and its reason is listed in manifest.json)')
  return 0


def run():
  common.run(main, resume_hint=common.RESUME)


if __name__ == '__main__':
  run()
