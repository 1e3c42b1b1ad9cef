"""The predictions folder (`tfl-predict`): its names, its format, writing it, and a typed load.

Layout of a predictions folder:

  predictions.jsonl      one JSON object per query, appended as each finishes (the journal a re-run
                         continues from; see `Journal`): {"id", "status" ("ok" or why the image
                         could not be used), "prediction" [landmark_id, score] or null,
                         "unverified" [landmark_id, score] or null (the first stage's answer),
                         "candidates" [{"landmark_id", "first_stage", "inliers", "index_image",
                         "comparisons"}] (the classes verified, in first-stage order),
                         "retrieval" [index image ids], "seconds", "timing" {stage: seconds}}.
  recognition.csv        the Kaggle recognition submission (id,landmarks "<landmark_id> <score>").
  recognition_unverified.csv   the same queries answered by the first stage alone, for comparison.
  retrieval.csv          the Kaggle retrieval submission (id,images), for an export with an index.
  predict.log            one line per query: its answer and where its time went.
  predict.json           the export, queries and settings; written first with "finished": false
                         and again, LAST, with "finished": true once the CSVs are written.

`tf_landmarks/predict.py` (the stage) writes through `start`, `Journal` and `finish`;
`tfl-evaluate` and the report read through `load`.
"""

import dataclasses
import json
from typing import Any, Dict, Mapping, Optional, Sequence

import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import submission

FORMAT = 'tf-landmarks predictions v1'
PREDICT_JSON = 'predict.json'
JOURNAL = 'predictions.jsonl'
LOG = 'predict.log'
RECOGNITION_CSV = 'recognition.csv'
UNVERIFIED_CSV = 'recognition_unverified.csv'
RETRIEVAL_CSV = 'retrieval.csv'
# Every file of the folder, for starting again in it (not the lock, held by the writer).
NAMES = (JOURNAL, RECOGNITION_CSV, UNVERIFIED_CSV, RETRIEVAL_CSV, LOG, PREDICT_JSON)
_ENTRY_KEYS = {'id', 'status', 'prediction', 'unverified', 'candidates', 'retrieval', 'seconds',
               'timing'}


class PredictionsError(errors.UserError):
  """A predictions folder cannot be read or written; the message says what to do."""


class Journal:
  """predictions.jsonl: one line per finished query, flushed as written, read back on a re-run.

  A line cut short by a kill (or otherwise not a whole entry) ends what is read: the file is
  truncated after the last whole line, so a re-run redoes exactly the queries after it.
  """

  def __init__(self, path: str):
    self.path = path
    self.entries: Dict[str, dict] = {}
    if tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path, 'rb') as f:
        content = f.read()
      good_length = 0
      for line in content.splitlines(keepends=True):
        try:
          entry = json.loads(line)
        except ValueError:
          break
        if not line.endswith(b'\n') or not isinstance(entry, dict) or \
            not _ENTRY_KEYS <= set(entry):
          break
        self.entries[entry['id']] = entry
        good_length += len(line)
      if good_length < len(content):
        files.write_atomically(path, content[:good_length])
    self._file = None

  def append(self, entry: dict) -> None:
    if self._file is None:
      # Local files are appended to in place (a kill loses at most the line being written);
      # tf.io.gfile cannot append to gs://, where the journal is rewritten by close().
      self._file = open(self.path, 'ab') if not files.is_remote(self.path) else None
    line = (json.dumps(entry, sort_keys=True) + '\n').encode()
    self.entries[entry['id']] = entry
    if self._file is not None:
      self._file.write(line)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    elif files.is_remote(self.path):
      files.write_atomically(self.path, b''.join(
          (json.dumps(entry, sort_keys=True) + '\n').encode() for entry in self.entries.values()))


def read_started(folder: str) -> Optional[dict]:
  """predict.json of a folder a prediction started in (finished or not), None if it has none.

  Raises:
    PredictionsError: a predict.json of another format, or a journal without predict.json.
  """
  meta_path = files.join(folder, PREDICT_JSON)
  if tf.io.gfile.exists(meta_path):
    return files.read_versioned_json(meta_path, FORMAT, 'predictions', 'pass --overwrite',
                                     PredictionsError)
  if tf.io.gfile.exists(files.join(folder, JOURNAL)):
    raise PredictionsError(f'{folder} holds a {JOURNAL} without {PREDICT_JSON}; remove it or '
                           'choose another folder')
  return None


def clear(folder: str) -> None:
  """Removes every file of a prediction from `folder`, to start again there."""
  for name in NAMES:
    if tf.io.gfile.exists(files.join(folder, name)):
      tf.io.gfile.remove(files.join(folder, name))


def start(folder: str, meta: Mapping[str, Any]) -> None:
  """Writes predict.json of a prediction starting (or resuming) in `folder`, not finished."""
  files.write_atomically(files.join(folder, PREDICT_JSON),
                         json.dumps({**meta, 'format': FORMAT, 'finished': False}, indent=1))


def finish(folder: str, meta: Mapping[str, Any], entries: Sequence[dict],
           with_retrieval: bool) -> dict:
  """Writes the submissions of `entries` (in query order), then predict.json marked finished.

  Returns:
    predict.json's content.
  """
  submission.write_recognition_submission(
      files.join(folder, RECOGNITION_CSV),
      {entry['id']: tuple(entry['prediction']) if entry['prediction'] else None
       for entry in entries})
  submission.write_recognition_submission(
      files.join(folder, UNVERIFIED_CSV),
      {entry['id']: tuple(entry['unverified']) if entry['unverified'] else None
       for entry in entries})
  if with_retrieval:
    submission.write_retrieval_submission(files.join(folder, RETRIEVAL_CSV),
                                          {entry['id']: entry['retrieval'] for entry in entries})
  meta = {**meta, 'format': FORMAT, 'finished': True,
          'submissions': {'recognition': RECOGNITION_CSV, 'recognition_unverified': UNVERIFIED_CSV,
                          'retrieval': RETRIEVAL_CSV if with_retrieval else None}}
  files.write_atomically(files.join(folder, PREDICT_JSON), json.dumps(meta, indent=1))
  return meta


@dataclasses.dataclass(frozen=True)
class Predictions:
  """A finished predictions folder (a file attribute is None where the file is absent).

  Attributes:
    path: the folder.
    records_dir: the records folder of the index it predicted against.
    recognition: `recognition.csv`, the verified recognition submission.
    unverified_recognition: `recognition_unverified.csv`, the same queries before local-feature
      verification (first stage only).
    retrieval: `retrieval.csv`.
    first_stage: what proposed the landmarks (classifier, knn or both).
    export: the export it predicted with.
    settings: the prediction's settings (`predict.PredictConfig` and
      `recognizer.RecognizerSettings` fields), as recorded.
    queries: where the queries came from: {"test_csv", "image_dir", "test_records"}.
  """
  path: str
  records_dir: Optional[str]
  recognition: Optional[str]
  unverified_recognition: Optional[str]
  retrieval: Optional[str]
  first_stage: Optional[str] = None
  export: Optional[str] = None
  settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  queries: Optional[Mapping[str, Any]] = None

  def entries(self) -> Dict[str, dict]:
    """The journal: query id → its entry (see the module docstring)."""
    return Journal(files.join(self.path, JOURNAL)).entries


def load(path: str) -> Predictions:
  """Checks predict.json of a finished predictions folder and finds its files.

  Raises:
    PredictionsError: no predict.json, one of another format, or an unfinished run.
  """
  manifest_path = files.join(path, PREDICT_JSON)
  if not tf.io.gfile.exists(manifest_path):
    raise PredictionsError(f'{path} is not a predictions folder (no {PREDICT_JSON})')
  manifest = files.read_versioned_json(manifest_path, FORMAT, 'a predictions folder',
                                       'rerun the prediction command', PredictionsError)
  if manifest.get('finished') is not True:
    raise PredictionsError(f'{path} holds an unfinished prediction run; rerun the same '
                           'tfl-predict command to finish it')

  def present(name: str) -> Optional[str]:
    candidate = files.join(path, name)
    return candidate if tf.io.gfile.exists(candidate) else None

  def text(value: Any) -> Optional[str]:
    return value if isinstance(value, str) and value else None

  settings = manifest.get('settings') if isinstance(manifest.get('settings'), dict) else {}
  queries = manifest.get('queries')
  return Predictions(
      path=path, records_dir=text(manifest.get('records_dir')),
      recognition=present(RECOGNITION_CSV), unverified_recognition=present(UNVERIFIED_CSV),
      retrieval=present(RETRIEVAL_CSV), first_stage=text(settings.get('first_stage')),
      export=text(manifest.get('export')), settings=settings,
      queries=queries if isinstance(queries, dict) else None)
