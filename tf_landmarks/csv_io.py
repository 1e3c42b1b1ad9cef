"""Reading and validating the Google Landmarks CSV files.

Every CSV is untrusted input: ids become file names, so they are checked before any path is built
from them; structural problems (missing columns, an empty file) raise `CsvError` with a message
meant for the user, and per-row problems are returned as skipped rows with a reason, not raised.
"""

import csv
import dataclasses
import itertools
import re
from typing import Dict, Iterator, List, Optional, Sequence

import tensorflow as tf

from tf_landmarks import errors

# Google Landmarks ids are 16 hex digits; other datasets use other ids, so accept any short name
# made of safe characters. Never a path separator, never '.' or '..', never a leading dot.
_SAFE_ID = re.compile(r'^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}$')

# `int()` also accepts '1_000', '+5' and non-ASCII digits such as '١٢٣'; landmark ids are plain
# decimals.
_ASCII_DIGITS = re.compile(r'[0-9]+')

# Landmark ids are stored as int64 in the records; a larger one would only fail later, mid-build.
_INT64_MAX = 2**63 - 1

# GLDv2's `images` column separates ids with spaces, but edited copies use commas, unquoted ones
# spilling into extra fields.
_ID_SEPARATORS = re.compile(r'[\s,]+')

# Spreadsheet programs start "CSV UTF-8" files with a byte order mark, which would otherwise become
# part of the first column's name.
_BYTE_ORDER_MARK = '\ufeff'


class CsvError(errors.UserError):
  """A CSV file cannot be used at all; the message says why, for the user."""


def is_safe_image_id(image_id: str) -> bool:
  """True if `image_id` can be used as a file name without escaping its folder."""
  return bool(_SAFE_ID.match(image_id)) and '..' not in image_id


@dataclasses.dataclass(frozen=True)
class ImageRow:
  """One usable CSV row. `landmark_id` is None for test rows."""
  image_id: str
  url: str
  landmark_id: Optional[int]


@dataclasses.dataclass(frozen=True)
class SkippedRow:
  """A row left out and why; `line` is its 1-based line in `source` (0 if not from a file)."""
  source: str
  line: int
  image_id: str
  reason: str


def open_rows(path: str, required: Sequence[str]) -> Iterator[tuple[int, dict]]:
  """Yields (line number, row dict) of a CSV after checking that it has the required columns.

  A UTF-8 byte-order mark is ignored, header names are stripped and blank lines skipped. The line
  number is the one the row starts on: a quoted field can run over several lines (an unterminated
  quote runs to the end of the file), and the problem is where the row begins. As in
  `csv.DictReader`, a short row's missing columns are None and a long row's extra fields are a list
  under the key None.

  Raises:
    CsvError: the file is missing, unreadable, empty or lacks a required column.
  """
  if not tf.io.gfile.exists(path):
    raise CsvError(f'{path}: file not found')
  with tf.io.gfile.GFile(path, 'r') as f:
    try:
      lines = iter(f)
      first_line = next(lines, '').removeprefix(_BYTE_ORDER_MARK)
      reader = csv.reader(itertools.chain([first_line], lines))
      header = next(reader, [])
    except (csv.Error, UnicodeDecodeError) as error:
      raise CsvError(f'{path}: not a readable CSV ({error})') from None
    if not header:
      raise CsvError(f'{path}: the file is empty (expected a header with columns '
                     f'{",".join(required)})')
    header = [name.strip() for name in header]
    missing = [name for name in required if name not in header]
    if missing:
      raise CsvError(f'{path}: missing column(s) {", ".join(missing)}; the header has '
                     f'{", ".join(header) or "no columns"}')
    last_line = reader.line_num
    try:
      for fields in reader:
        first_line, last_line = last_line + 1, reader.line_num
        if not fields:
          continue
        row = dict.fromkeys(header)
        row.update(zip(header, fields))
        if len(fields) > len(header):
          row[None] = fields[len(header):]
        yield first_line, row
    except (csv.Error, UnicodeDecodeError) as error:
      # Named by the line the unreadable row starts on: an open quote is detected only where the
      # field it opened outgrows csv's limit, thousands of lines further.
      raise CsvError(f'{path}: not a readable CSV in the row starting at line {last_line + 1} '
                     f'({error})') from None


def _check_id(source: str, line: int, raw_id: Optional[str], seen: set,
              skipped: List[SkippedRow]) -> Optional[str]:
  """Returns the stripped id, or None after recording why the row is skipped."""
  image_id = (raw_id or '').strip()
  if not image_id:
    reason = 'empty id'
  elif not is_safe_image_id(image_id):
    reason = 'unsafe id (path separators, "..", or unusual characters)'
  elif image_id in seen:
    reason = 'duplicate id'
  else:
    seen.add(image_id)
    return image_id
  skipped.append(SkippedRow(source, line, image_id, reason))
  return None


def quoted(text: Optional[str], limit: int = 40) -> str:
  """`text` quoted, shortened if long: reasons are one-line messages and manifest entries."""
  return repr(text) if text is None or len(text) <= limit else f'{text[:limit]!r}…'


def _parse_landmark_id(text: Optional[str]) -> tuple[Optional[int], str]:
  """Returns (landmark id, '') or (None, the reason it is unusable)."""
  digits = (text or '').strip()
  if not _ASCII_DIGITS.fullmatch(digits):
    return None, (f'landmark_id {quoted(text)} is not a non-negative integer '
                  '(ASCII digits 0-9 only)')
  # Comparing lengths first keeps int() off huge strings (it refuses over 4300 digits); leading
  # zeros would make that comparison wrong.
  digits = digits.lstrip('0') or '0'
  value = int(digits) if len(digits) <= len(str(_INT64_MAX)) else None
  if value is None or value > _INT64_MAX:
    return None, f'landmark_id {quoted(text)} is too large (the largest is {_INT64_MAX}, int64)'
  return value, ''


def _require_rows(path: str, rows: list, skipped: List[SkippedRow]) -> None:
  if not rows:
    detail = f'all {len(skipped)} rows were unusable, e.g. line {skipped[0].line}: ' \
             f'{skipped[0].reason}' if skipped else 'it has a header but no rows'
    raise CsvError(f'{path}: no usable rows ({detail})')


def read_train_csv(path: str) -> tuple[List[ImageRow], List[SkippedRow]]:
  """Reads a Google Landmarks train CSV (`id,url,landmark_id`; `url` may be absent).

  Per-row problems skip that row: an unsafe, empty or duplicate id; a landmark_id that is not plain
  ASCII digits (such as 'None' in the 2018 data, '1_000' or non-ASCII digits) or does not fit in
  int64. The first occurrence of a duplicate id is kept. A UTF-8 byte order mark is ignored.

  Returns:
    The usable rows in file order, and the skipped rows with reasons.

  Raises:
    CsvError: the file is missing, unreadable, empty, lacks `id` or `landmark_id`, or has no usable
      row.
  """
  rows, skipped, seen = [], [], set()
  for line, row in open_rows(path, ('id', 'landmark_id')):
    image_id = _check_id(path, line, row.get('id'), seen, skipped)
    if image_id is None:
      continue
    landmark_id, reason = _parse_landmark_id(row.get('landmark_id'))
    if landmark_id is None:
      skipped.append(SkippedRow(path, line, image_id, reason))
      continue
    rows.append(ImageRow(image_id, (row.get('url') or '').strip(), landmark_id))
  _require_rows(path, rows, skipped)
  return rows, skipped


def read_test_csv(path: str, *, allow_empty: bool = False
                  ) -> tuple[List[ImageRow], List[SkippedRow]]:
  """Reads a Google Landmarks test or index CSV (`id,url`; `url` may be absent).

  Args:
    path: the CSV.
    allow_empty: a file without usable rows gives no rows instead of an error (for readers to
      which the queries are optional).

  Returns and raises as `read_train_csv`; rows have landmark_id None.
  """
  rows, skipped, seen = [], [], set()
  for line, row in open_rows(path, ('id',)):
    image_id = _check_id(path, line, row.get('id'), seen, skipped)
    if image_id is not None:
      rows.append(ImageRow(image_id, (row.get('url') or '').strip(), None))
  if not allow_empty:
    _require_rows(path, rows, skipped)
  return rows, skipped


def _listed_ids(row: dict) -> List[str]:
  """The ids of a `train_clean.csv` row: its `images` field and any unquoted comma overflow."""
  fields = [row.get('images') or ''] + (row.get(None) or [])
  return [image_id for field in fields for image_id in _ID_SEPARATORS.split(field) if image_id]


def read_train_clean_csv(path: str) -> tuple[Dict[str, int], List[SkippedRow]]:
  """Reads GLDv2's `train_clean.csv` (`landmark_id,images`, images space-separated).

  Ids may also be separated by commas, quoted or not: unquoted ones spill into extra CSV fields,
  which are read as part of `images`.

  Returns:
    A map image id → landmark id of the clean subset, and the skipped entries (bad landmark ids as
    in `read_train_csv`, rows listing no image, unsafe ids, ids listed twice).

  Raises:
    CsvError: as `read_train_csv`.
  """
  clean, skipped, seen = {}, [], set()
  for line, row in open_rows(path, ('landmark_id', 'images')):
    landmark_id, reason = _parse_landmark_id(row.get('landmark_id'))
    if landmark_id is None:
      skipped.append(SkippedRow(path, line, '', reason))
      continue
    image_ids = _listed_ids(row)
    if not image_ids:
      skipped.append(SkippedRow(path, line, '', 'no images listed'))
    for raw_id in image_ids:
      image_id = _check_id(path, line, raw_id, seen, skipped)
      if image_id is not None:
        clean[image_id] = landmark_id
  _require_rows(path, list(clean), skipped)
  return clean, skipped


def apply_clean_subset(rows: List[ImageRow], clean: Dict[str, int],
                       source: str) -> tuple[List[ImageRow], List[SkippedRow]]:
  """Keeps the train rows that GLDv2's clean subset lists, with the clean subset's landmark id.

  Rows absent from the clean subset are skipped with a reason, so the manifest accounts for them.
  Clean ids with no train row are returned as rows without url (images are then read from disk).
  """
  kept, skipped = [], []
  for row in rows:
    if row.image_id in clean:
      kept.append(ImageRow(row.image_id, row.url, clean[row.image_id]))
    else:
      skipped.append(SkippedRow(source, 0, row.image_id, 'not in the clean subset'))
  listed = {row.image_id for row in rows}
  kept.extend(ImageRow(image_id, '', landmark_id)
              for image_id, landmark_id in clean.items() if image_id not in listed)
  return kept, skipped

