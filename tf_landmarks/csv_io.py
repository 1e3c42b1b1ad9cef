"""Reading and validating the Google Landmarks CSV files.

Every CSV is untrusted input: ids become file names, so they are checked before any path is built from
them; structural problems (missing columns, an empty file) raise `CsvError` with a message meant for the
user, and per-row problems are returned as skipped rows with a reason rather than raised.
"""

import re

# Google Landmarks ids are 16 hex digits; other datasets use other ids, so accept any short name made
# of safe characters. Never a path separator, never '.' or '..', never a leading dot.
_SAFE_ID = re.compile(r'^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$')


class CsvError(ValueError):
  """A CSV file cannot be used at all; the message says why, for the user."""


def is_safe_image_id(image_id: str) -> bool:
  """True if `image_id` can be used as a file name without escaping its folder."""
  return bool(_SAFE_ID.match(image_id)) and '..' not in image_id
