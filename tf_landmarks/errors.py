"""The one exception type for user mistakes and unusable inputs.

Entry points print a `UserError` as one line (`tfl-…: error: <message>`) and exit 2; anything else
that escapes is a bug and keeps its traceback. Each stage subclasses it (`CsvError`, `BuildError`,
`RecordsError`, …) so that library callers can tell what failed. `beam_required` turns a missing
optional extra into such an error.
"""

import contextlib
from typing import Iterator, Type


class UserError(ValueError):
  """Something the user can fix: the message says what, in terms of flags and files."""


class Terminated(BaseException):
  """SIGTERM arrived (what a preempted cloud VM or `kill` sends).

  A BaseException, like KeyboardInterrupt, so that only code that means to (save a checkpoint,
  close a shard) handles it on the way out.
  """


@contextlib.contextmanager
def beam_required(error: Type[UserError]) -> Iterator[None]:
  """Imports in the block that find no Apache Beam (the `beam` extra) raise `error`, one line.

  Each stage imports its Beam runner inside this block, and only for `--runner=beam`.
  """
  try:
    yield
  except ModuleNotFoundError as missing:
    if not (missing.name or '').startswith('apache_beam'):
      raise
    raise error("--runner=beam needs Apache Beam: pip install 'tf-landmarks[beam]'") from None
