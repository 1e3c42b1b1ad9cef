"""Reading query images: a Kaggle test CSV with its image folder, or a records folder's test split.

`open_queries(export, test_csv=…, image_dir=…, test_records=…)` returns the number of queries, a
reader and the CSV rows it could not use. Images given as files are prepared as the export's
records build prepared the index images (long side capped at the build's `max_image_size`,
JPEG-encoded), so the local features of both live at the same scale; records already hold them so.
`tfl-predict` reads its queries here, and the report reads the queries of its match pictures.
"""

import dataclasses
from typing import Callable, Iterator, List, Optional, Tuple

import tensorflow as tf

from tf_landmarks import csv_io
from tf_landmarks import errors
from tf_landmarks import exports
from tf_landmarks import images as images_lib
from tf_landmarks import records as records_lib
from tf_landmarks import schema


class QueriesError(errors.UserError):
  """The queries cannot be read as named; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Query:
  """One query: its id and its prepared JPEG, or why it has none."""
  image_id: str
  jpeg: Optional[bytes]
  status: str = 'ok'


# Reads the queries in order from position `start` (default 0), as (image id, Query), preparing
# only those `wanted` accepts (the rest, already predicted, come as (image id, None)): one pass, and
# a resumed run skips their images; a Beam worker starts at its batch (`predict_beam.py`).
QueryReader = Callable[..., Iterator[Tuple[str, Optional[Query]]]]


def _csv_queries(test_csv: str, image_dir: Optional[str], max_side: int, jpeg_quality: int,
                 min_side: int) -> Tuple[int, QueryReader, List[csv_io.SkippedRow]]:
  """(number of queries, reader, unusable CSV rows) of a test CSV and its image folder."""
  if not image_dir:
    raise QueriesError('--test_csv needs --image_dir, the folder of its images')
  if not tf.io.gfile.isdir(image_dir):
    raise QueriesError(f'--image_dir={image_dir} is not a folder')
  rows, skipped = csv_io.read_test_csv(test_csv)

  def read(wanted, start=0):
    for row in rows[start:]:
      if not wanted(row.image_id):
        yield row.image_id, None
        continue
      try:
        prepared = images_lib.prepare_image_file(
            images_lib.image_paths(image_dir, row.image_id), max_side=max_side,
            jpeg_quality=jpeg_quality, min_side=min_side)
      except images_lib.ImageError as error:
        yield row.image_id, Query(row.image_id, None, str(error))
        continue
      yield row.image_id, Query(row.image_id, prepared.jpeg)

  return len(rows), read, skipped


def _record_queries(records_dir: str) -> Tuple[int, QueryReader, List[csv_io.SkippedRow]]:
  """(number of queries, reader, no skipped rows) of the test split of a records folder."""
  try:
    records = records_lib.load(records_dir)
  except records_lib.RecordsError as error:
    raise QueriesError(f'the query records {records_dir}: {error}') from None
  paths = records.files('test')
  if not paths:
    raise QueriesError(f'{records_dir} has no test split; build it with tfl-build-records '
                       '--test_csv, or give --test_csv and --image_dir')

  shards = records.manifest['splits']['test']['shards']

  def read(wanted, start=0):
    first = 0  # Shards wholly before `start` are not even opened.
    while first < len(paths) and start >= shards[first]['examples']:
      start -= shards[first]['examples']
      first += 1
    dataset = tf.data.TFRecordDataset(paths[first:]).skip(start).map(schema.parse_example)
    try:
      for example in dataset:
        image_id = example[schema.ID].numpy().decode()
        yield image_id, (Query(image_id, example[schema.ENCODED].numpy())
                         if wanted(image_id) else None)
    except tf.errors.DataLossError:
      raise QueriesError(f'{records_lib.find_corrupt_shard(paths)} is corrupt or truncated; '
                         'rebuild the records') from None

  return records.num_examples('test'), read, []


def open_queries(export: exports.Export, *, test_csv: Optional[str] = None,
                 image_dir: Optional[str] = None, test_records: Optional[str] = None
                 ) -> Tuple[int, QueryReader, List[csv_io.SkippedRow]]:
  """The queries of a test CSV, or else of a records folder's test split.

  Args:
    export: the export the queries are for (how its records build prepared images; its records
      folder is the default `test_records`).
    test_csv: a Kaggle test CSV (id[,url]) whose images are in `image_dir`.
    image_dir: the folder of the CSV's images (<id>.jpg, or DELF's nested a/b/c/<id>.jpg).
    test_records: a records folder whose test split holds the queries (without `test_csv`).

  Returns:
    (number of queries, reader, the CSV rows skipped as unusable).

  Raises:
    QueriesError, csv_io.CsvError: the queries cannot be read.
  """
  if not test_csv:
    return _record_queries(test_records or export.records_dir)
  classifier = export.classifier
  return _csv_queries(test_csv, image_dir, classifier.max_image_side, classifier.jpeg_quality,
                      classifier.min_image_side)
