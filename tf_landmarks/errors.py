"""The one exception type for user mistakes and unusable inputs.

Entry points print a `UserError` as one line (`tfl-…: error: <message>`) and exit 2; anything else
that escapes is a bug and keeps its traceback. Each stage subclasses it (`CsvError`, `BuildError`,
`RecordsError`, …) so that library callers can tell what failed.
"""


class UserError(ValueError):
  """Something the user can fix: the message says what, in terms of flags and files."""


class Terminated(BaseException):
  """SIGTERM arrived (what a preempted cloud VM or `kill` sends).

  A BaseException, like KeyboardInterrupt, so that only code that means to (save a checkpoint,
  close a shard) handles it on the way out.
  """
