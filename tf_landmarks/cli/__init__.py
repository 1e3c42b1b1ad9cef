"""Entry points: one absl `main()` per command; the only modules that read FLAGS.

Importing this package imports TensorFlow quietly, so that the tools' own output comes first: since
TensorFlow moved to absl logging, its C++ start-up lines ("All log messages before
absl::InitializeLog() …", the oneDNN note) go straight to file descriptor 2 during the import and
ignore TF_CPP_MIN_LOG_LEVEL. They are held back and replayed without the INFO lines; warnings and
errors still show, and a user's own TF_CPP_MIN_LOG_LEVEL=0 shows everything.
"""

import os
import re
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
_START_UP_NOISE = re.compile(r'^(WARNING: All log messages before absl::InitializeLog\(\)|I\d{4} )')


def _import_tensorflow_quietly() -> None:
  if os.environ['TF_CPP_MIN_LOG_LEVEL'] == '0':
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    return
  sys.stderr.flush()
  saved_stderr = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,redefined-outer-name
    finally:
      os.dup2(saved_stderr, 2)
      os.close(saved_stderr)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(keepends=True):
        if not _START_UP_NOISE.match(line):
          sys.stderr.write(line)


_import_tensorflow_quietly()
