"""Paths and files: local or remote (`gs://…`) paths, and writes that readers never see half-written.

Every write goes through `tf.io.gfile`, so it works for local folders and gs:// buckets alike.
TensorFlow is imported inside the writing functions only: `is_remote` and `join` are used by the
TensorFlow-free image workers (`tf_landmarks/images.py`).
"""

import contextlib
import csv
import errno
import hashlib
import io
import os
import posixpath
import threading
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

LOCK_FILE = '.lock'


def is_remote(path: str) -> bool:
  """True for URL-style paths (gs://, s3://, hdfs://…) that only `tf.io.gfile` can open."""
  return '://' in path


def join(*parts: str) -> str:
  """Joins path parts; '/' for remote paths (os.path.join would use '\\' on Windows)."""
  return posixpath.join(*parts) if is_remote(parts[0]) else os.path.join(*parts)


def read_versioned_json(path: str, expected_format: Union[str, Tuple[str, ...]], what: str,
                        hint: str, error: type) -> dict:
  """Reads an artifact's JSON (manifest, run.json, index.json) and checks its format version.

  Args:
    path: the file (any tf.io.gfile path); the caller has checked that it exists.
    expected_format: the value its "format" key must have, or the values this version reads (the
      current one first).
    what: the artifact, for the message ("a manifest", "a run", …).
    hint: what the user should do about a foreign or outdated file.
    error: the exception type to raise (a `errors.UserError` subclass).

  Raises:
    error: the file is not valid JSON, not an object, or of another format.
  """
  import json  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    value = json.loads(text)
  except json.JSONDecodeError as decode_error:
    raise error(f'{path} is not valid JSON ({decode_error})') from None
  found = value.get('format') if isinstance(value, dict) else None
  readable = (expected_format,) if isinstance(expected_format, str) else expected_format
  if found not in readable:
    raise error(f'{path} is not {what} this version reads (format {found!r}, expected '
                f'{readable[0]!r}); {hint}')
  return value


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


def sha256(path: str) -> str:
  """Hex SHA-256 of a file, streamed in 1 MiB chunks (any tf.io.gfile path)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def clear_folder(folder: str) -> None:
  """Removes a folder's contents but its lock file (`exclusive_writer`'s), which the caller holds.

  Removing the lock file would let a second writer lock a new file of that name beside this one.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for name in tf.io.gfile.listdir(folder):
    name = name.rstrip('/')  # tf.io.gfile lists remote folders with a trailing '/'.
    if name == LOCK_FILE:
      continue
    path = join(folder, name)
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    else:
      tf.io.gfile.remove(path)


@contextlib.contextmanager
def exclusive_writer(folder: str, command: str, error: type) -> Iterator[Optional[object]]:
  """Holds an exclusive lock on a local artifact folder while one command writes it.

  Two commands writing one folder (two `tfl-train` into one workdir, a `--resume` beside a
  running build) would replace or corrupt each other's files. flock is released by the kernel
  when the process dies, however it dies, so a killed writer never leaves a stale lock. Remote
  folders (gs://) have no such lock: one writer at a time is then the user's responsibility.

  Args:
    folder: the artifact folder; it must exist.
    command: the command's name for the message ("tfl-train").
    error: the exception type (a `errors.UserError` subclass) raised when the folder is taken.

  Yields:
    The open lock file, or None for remote folders.

  Raises:
    error: another process holds the lock.
  """
  if is_remote(folder):
    yield None
    return
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  lock = open(join(folder, LOCK_FILE), 'a')  # pylint: disable=consider-using-with
  try:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as failure:
      if failure.errno in (errno.EAGAIN, errno.EACCES):
        raise error(f'another {command} is writing to {folder}; wait for it to finish (or stop '
                    'it) before running this one') from None
      raise
    yield lock
  finally:
    lock.close()


VERIFIED_STAMP = '.verified.json'


def checksums(folder: str, names: Iterable[str],
              stamp: bool = False) -> Dict[str, Dict[str, Any]]:
  """Size and SHA-256 of files in `folder`, as artifacts record them: {name: {bytes, sha256}}.

  Args:
    folder: the artifact folder.
    names: the files' paths relative to `folder` ('/'-separated).
    stamp: also leave the stamp of a full check (see `verify_checksums`): the files were just
      hashed, so the first load need not hash them again.
  """
  recorded, stats = {}, {}
  for name in names:
    size, modified = _size_and_time(join(folder, name))
    recorded[name] = {'bytes': size, 'sha256': sha256(join(folder, name))}
    stats[name] = [size, modified]
  if stamp:
    _write_stamp(folder, _stamp(recorded, stats))
  return recorded


def verify_checksums(folder: str, expected: Mapping[str, Mapping[str, Any]], *, what: str,
                     hint: str, error: type, full: bool = False) -> None:
  """Checks an artifact's files against the sizes and digests it recorded when written.

  Sizes are checked on every call (one stat per file). Digests are checked when `full` is set or
  when the files changed since the last full check: a successful full check leaves a stamp
  (`.verified.json`: each file's size and modification time) in the folder, so a later load only
  compares stats. A folder that cannot be written (read-only, a bucket without rights) is simply
  hashed on every load.

  Args:
    folder: the artifact folder.
    expected: {relative path: {'bytes': int, 'sha256': hex}} as `checksums` returned it.
    what: the artifact for the message ("the index", "the export").
    hint: what the user should do about a damaged file ("rebuild the index").
    error: the exception type (a `errors.UserError` subclass).
    full: hash every file whatever the stamp says.

  Raises:
    error: a file is missing, has another size, or another digest; the message names it.
  """
  import json  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  stats = {}
  for name, recorded in sorted(expected.items()):
    path = join(folder, name)
    if not tf.io.gfile.exists(path):
      raise error(f'{path} is missing from {what}; {hint}')
    size, modified = _size_and_time(path)
    if size != recorded['bytes']:
      raise error(f'{path} has {size:,} bytes, {what} recorded {recorded["bytes"]:,} '
                  f'(truncated or replaced); {hint}')
    stats[name] = [size, modified]
  stamp_path = join(folder, VERIFIED_STAMP)
  stamp = _stamp(expected, stats)
  if not full and tf.io.gfile.exists(stamp_path):
    try:
      with tf.io.gfile.GFile(stamp_path) as f:
        if json.load(f) == stamp:
          return
    except (ValueError, tf.errors.OpError):
      pass  # A damaged stamp only costs a full check.
  for name, recorded in sorted(expected.items()):
    if sha256(join(folder, name)) != recorded['sha256']:
      raise error(f'{join(folder, name)} is not the file {what} was written with (its SHA-256 '
                  f'differs); {hint}')
  _write_stamp(folder, stamp)


def _stamp(expected: Mapping[str, Mapping[str, Any]], stats: Mapping[str, list]) -> dict:
  """What a full check leaves: the recorded checksums' digest and each file's size and time."""
  import json  # pylint: disable=g-import-not-at-top
  return {'expected': sha256_of_text(json.dumps(expected, sort_keys=True)), 'files': dict(stats)}


def _write_stamp(folder: str, stamp: dict) -> None:
  import json  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    write_atomically(join(folder, VERIFIED_STAMP), json.dumps(stamp))
  except (OSError, tf.errors.OpError):
    pass  # Read-only: the next load hashes again.


def _size_and_time(path: str):
  """A file's size and modification time in ns (tf.io.gfile's local stat rounds to seconds)."""
  if is_remote(path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    stat = tf.io.gfile.stat(path)
    return stat.length, stat.mtime_nsec
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def sha256_of_text(text: str) -> str:
  """Hex SHA-256 of a string's UTF-8 bytes."""
  return hashlib.sha256(text.encode()).hexdigest()
