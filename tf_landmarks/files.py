"""Paths and files: local or remote (`gs://…`) paths, and writes that readers never see half-written.

Every write goes through `tf.io.gfile`, so it works for local folders and gs:// buckets alike.
TensorFlow is imported inside the writing functions only: `is_remote` and `join` are used by the
TensorFlow-free image workers (`tf_landmarks/images.py`).
"""

import csv
import io
import os
import posixpath
import threading
from typing import Iterable, Sequence, Union


def is_remote(path: str) -> bool:
  """True for URL-style paths (gs://, s3://, hdfs://…) that only `tf.io.gfile` can open."""
  return '://' in path


def join(*parts: str) -> str:
  """Joins path parts; '/' for remote paths (os.path.join would use '\\' on Windows)."""
  return posixpath.join(*parts) if is_remote(parts[0]) else os.path.join(*parts)


def write_atomically(path: str, data: Union[bytes, str]) -> None:
  """Writes `data` to `path` through a temporary file unique to this process and thread."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  temporary = f'{path}.part-{os.getpid()}-{threading.get_ident()}'
  with tf.io.gfile.GFile(temporary, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def write_csv_atomically(path: str, header: Sequence[str], rows: Iterable[Sequence]) -> None:
  """Writes a CSV (`\\n` line ends, quoting as the csv module does) with `write_atomically`."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(header)
  writer.writerows(rows)
  write_atomically(path, buffer.getvalue())
