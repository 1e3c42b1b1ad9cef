"""Writing files that readers never see half-written: a temporary name, renamed when complete.

Every path goes through `tf.io.gfile`, so this works for local folders and gs:// buckets alike.
"""

import csv
import io
import os
import threading
from typing import Iterable, Sequence, Union

import tensorflow as tf


def write_atomically(path: str, data: Union[bytes, str]) -> None:
  """Writes `data` to `path` through a temporary file unique to this process and thread."""
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
