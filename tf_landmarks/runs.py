"""The run folder (`tfl-train --workdir`): its file names, its format, its writing and a typed,
checked load.

A finished run holds:

  model.keras            the whole trained model (a LandmarkClassifier or a DelfModel)
  backbone.weights.h5    the backbone's weights alone (what `--init_from` starts the next stage from)
  head.weights.npz       the classifier head's weights (classifier runs), or
  delf.weights.h5        the DELF model's weights (DELF runs)
  label_map.csv          a copy of the records folder's label map (class index → landmark id)
  train_config.json      the settings fingerprint, written first (the mark of a started run)
  run.json               written LAST (the mark of a finished run): what was trained on what, with
                         which weights, its scores, `"status": "complete"` and each file's size and
                         SHA-256 (`"files"`)

A run that training gave up on (it diverged) gets a run.json with `"status": "failed"` and the
reason (`"failure"`) and no files: it records what happened and is never used by a later stage.

Every reader of a run (the next training stage, the index builder, the exporter, the pair
evaluation) goes through `load`, so the format and the files are checked in one place; `write`
and `write_failed` are the only writers of run.json.
"""

import dataclasses
import datetime
import enum
import json
import os
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import records as records_lib

FORMAT = 'tf-landmarks run v2'
# v1 run.json has no "files" and no "status": such runs are read without checking their files.
_FORMAT_V1 = 'tf-landmarks run v1'
COMPLETE = 'complete'
FAILED = 'failed'
RUN_JSON = 'run.json'
CONFIG_JSON = 'train_config.json'
MODEL_FILE = 'model.keras'
BACKBONE_WEIGHTS = 'backbone.weights.h5'
HEAD_WEIGHTS = 'head.weights.npz'  # Keras 3 layers (unlike models) have no save_weights.
DELF_WEIGHTS = 'delf.weights.h5'
LABEL_MAP = records_lib.LABEL_MAP
_HINT = 'train the run again'


class Mode(str, enum.Enum):
  """What a run trains: a classifier (three ways) or DELF's attention over a backbone."""
  SCRATCH = 'scratch'
  BOTTLENECK = 'bottleneck'
  FINETUNE = 'finetune'
  DELF = 'delf'


class RunError(errors.UserError):
  """A run folder is missing, unfinished, damaged or of the wrong kind."""


# run.json's keys every reader relies on, with their types.
_REQUIRED = {'mode': str, 'backbone': str, 'image_size': int, 'records_dir': str,
             'num_classes': int}


@dataclasses.dataclass(frozen=True)
class Run:
  """A finished training run, as run.json describes it.

  Attributes:
    path: the run folder.
    mode: what was trained.
    backbone: the backbone's registry name.
    image_size: the training input size.
    num_classes: the classes of the records it was trained on.
    records_dir: the records folder it was trained on.
    metadata: the whole of run.json (head config, DELF settings, scores, settings).
  """
  path: str
  mode: Mode
  backbone: str
  image_size: int
  num_classes: int
  records_dir: str
  metadata: Dict[str, Any]

  @property
  def is_delf(self) -> bool:
    return self.mode == Mode.DELF

  def file(self, name: str) -> str:
    """The path of one of the run's files (`MODEL_FILE`, `BACKBONE_WEIGHTS`, …)."""
    return files.join(self.path, name)

  def landmark_ids(self) -> Tuple[int, ...]:
    """The landmark id of each class (in class order), from the run's copy of the label map.

    Raises:
      RunError, records.RecordsError: the copy is missing or malformed.
    """
    if not tf.io.gfile.exists(self.file(LABEL_MAP)):
      raise RunError(f'{self.file(LABEL_MAP)} is missing; {_HINT}')
    return tuple(row[1] for row in records_lib.read_label_map(self.path))

  def model_sha256(self) -> str:
    """SHA-256 of model.keras: what indexes and exports record to name the model they used."""
    return files.sha256(self.file(MODEL_FILE))

  def load_model(self, kind: type):
    """The run's model.keras, checked to be a `kind` (e.g. `classifier.LandmarkClassifier`).

    Raises:
      RunError: the file is missing, damaged, or holds another kind of model.
    """
    import keras  # pylint: disable=g-import-not-at-top
    # Registers the head classes that model.keras deserialises.
    from tf_landmarks.models import heads  # pylint: disable=g-import-not-at-top,unused-import
    path = self.file(MODEL_FILE)
    if not tf.io.gfile.exists(path):
      raise RunError(f'{self.path} has no {MODEL_FILE}; train the run again')
    if not _ends_like_a_zip(path):
      # Keras reports a truncated or foreign file as "File not found"; say what is wrong instead.
      raise RunError(f'{path} is damaged or truncated (not a .keras archive); train the run again')
    try:
      model = keras.saving.load_model(path)
    except Exception as error:  # pylint: disable=broad-except
      # A damaged archive fails anywhere in Keras's loader (zip, JSON, h5, deserialisation), each
      # with its own exception type; all mean the same to the user.
      reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
      raise RunError(f'cannot load {path} ({reason}); train the run again') from None
    if not isinstance(model, kind):
      raise RunError(f'{path} holds a {type(model).__name__}, not a {kind.__name__}')
    return model


def _ends_like_a_zip(path: str) -> bool:
  """Whether the file ends with a zip archive's end record (as a whole .keras file does)."""
  size = tf.io.gfile.stat(path).length
  # The end record is 22 bytes plus a comment of at most 65,535.
  tail_size = min(size, 22 + 65535)
  with tf.io.gfile.GFile(path, 'rb') as f:
    f.seek(size - tail_size)
    return b'PK\x05\x06' in f.read(tail_size)


def is_finished(path: str) -> bool:
  """Whether `path` holds an ended run (its run.json exists): complete, or failed."""
  return tf.io.gfile.exists(files.join(path, RUN_JSON))


def is_started(path: str) -> bool:
  """Whether `path` holds a started run (its settings fingerprint exists)."""
  return tf.io.gfile.exists(files.join(path, CONFIG_JSON))


def failure_of(path: str) -> Optional[str]:
  """Why the run in `path` failed, or None when it did not (or has not ended)."""
  run_json = files.join(path, RUN_JSON)
  if not tf.io.gfile.exists(run_json):
    return None
  metadata = files.read_versioned_json(run_json, (FORMAT, _FORMAT_V1), 'a run',
                                       'train it again with tfl-train', RunError)
  return metadata.get('failure') if metadata.get('status') == FAILED else None


def write(workdir: str, metadata: Mapping[str, Any],
          save_parts: Sequence[Tuple[str, Callable[[str], None]]], records_dir: str) -> dict:
  """Writes a finished run into `workdir`: its model files, the label map copy, run.json last.

  Args:
    workdir: the run folder (it exists).
    metadata: what run.json describes (mode, backbone, image_size, records_dir, num_classes, head,
      weights, scores, settings…); `format`, `created`, `status` and `files` are added.
    save_parts: (file name, save(local path)) for each model file (`MODEL_FILE`, …). Keras writes
      .keras and .h5 files to local paths only: each is saved in a local temporary folder and
      copied in, so that gs:// workdirs work too.
    records_dir: the records folder whose label map the run keeps a copy of.

  Returns:
    What run.json holds.
  """
  with tempfile.TemporaryDirectory() as local:
    for name, save in save_parts:
      save(os.path.join(local, name))
      tf.io.gfile.copy(os.path.join(local, name), files.join(workdir, name), overwrite=True)
  tf.io.gfile.copy(files.join(records_dir, LABEL_MAP), files.join(workdir, LABEL_MAP),
                   overwrite=True)
  # The stamp spares the first load from hashing the files again, and readers of a read-only run
  # folder from hashing them on every load.
  checksums = files.checksums(workdir, [name for name, _ in save_parts] + [LABEL_MAP],
                              stamp=True)
  run = {'format': FORMAT, 'created': _now(), **metadata, 'status': COMPLETE, 'files': checksums}
  files.write_atomically(files.join(workdir, RUN_JSON), json.dumps(run, indent=1, default=str))
  return run


def write_failed(workdir: str, metadata: Mapping[str, Any], failure: str) -> dict:
  """Ends a run that training gave up on: run.json with `"status": "failed"` and the reason.

  The folder keeps its checkpoints for inspection, but `load` refuses it, so it is never used as
  --init_from (or by any other stage), and tfl-train neither resumes it nor trains over it without
  --overwrite.

  Args:
    workdir: the run folder.
    metadata: what `write` would record, without files (mode, backbone, settings, history…).
    failure: what went wrong, for users (made one line).

  Returns:
    What run.json holds.
  """
  run = {'format': FORMAT, 'created': _now(), **metadata, 'status': FAILED,
         'failure': ' '.join(failure.split())}
  files.write_atomically(files.join(workdir, RUN_JSON), json.dumps(run, indent=1, default=str))
  return run


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _well_formed_files(listed: Any) -> bool:
  return isinstance(listed, dict) and bool(listed) and all(
      isinstance(entry, dict) and isinstance(entry.get('bytes'), int) and
      isinstance(entry.get('sha256'), str) for entry in listed.values())


def load(path: str, flag: str = 'run', verify: bool = False) -> Run:
  """Reads and checks a finished run: its run.json, then its files.

  A run of the current format has its files checked against the sizes and SHA-256 digests its
  run.json recorded: the sizes on every load, the digests when the files changed since the last
  full check (`files.verify_checksums`), or always with `verify`. A v1 run (written before run.json
  recorded its files) is loaded WITHOUT checking its files: a damaged file shows only when a stage
  reads it.

  Args:
    path: the run folder.
    flag: the flag that named it, for messages ("init_from", "delf_run", …).
    verify: hash every file, whatever changed since the last check.

  Raises:
    RunError: not a folder, not finished, failed, of another format, missing a field readers need,
      or one of its files is missing, truncated or not the file the run wrote.
  """
  if not tf.io.gfile.isdir(path):
    raise RunError(f'--{flag}={path} is not a folder')
  run_json = files.join(path, RUN_JSON)
  if not tf.io.gfile.exists(run_json):
    raise RunError(f'--{flag}={path} is not a finished training run (no {RUN_JSON})')
  metadata = files.read_versioned_json(run_json, (FORMAT, _FORMAT_V1), 'a run',
                                       'train it again with tfl-train', RunError)
  current = metadata['format'] == FORMAT
  if current and metadata.get('status') == FAILED:
    raise RunError(f'{path} is a failed run ({metadata.get("failure")}); it cannot be used as '
                   f'--{flag}')
  if not all(isinstance(metadata.get(key), kind) for key, kind in _REQUIRED.items()) or (
      current and (metadata.get('status') != COMPLETE or
                   not _well_formed_files(metadata.get('files')))):
    needs = ', '.join(_REQUIRED) + (', status and files' if current else '')
    raise RunError(f'{run_json} is incomplete or damaged (it needs {needs}); {_HINT}')
  try:
    mode = Mode(metadata['mode'])
  except ValueError:
    raise RunError(f'{run_json} names an unknown mode {metadata["mode"]!r}; {_HINT}') from None
  if current:
    files.verify_checksums(path, metadata['files'], what='the run', hint=_HINT, error=RunError,
                           full=verify)
  return Run(path=path, mode=mode, backbone=metadata['backbone'],
             image_size=metadata['image_size'], num_classes=metadata['num_classes'],
             records_dir=metadata['records_dir'], metadata=metadata)


def load_classifier_run(path: str, flag: str = 'run') -> Run:
  """`load`, refusing a DELF run where a classifier run is wanted."""
  run = load(path, flag)
  if run.is_delf:
    raise RunError(f'--{flag}={path} is a DELF run; --{flag} takes a classifier run (scratch, '
                   'bottleneck or finetune), --delf_run the DELF one')
  return run


def load_delf_run(path: str, flag: str = 'delf_run') -> Run:
  """`load`, refusing anything but a DELF run whose attention stage is trained."""
  run = load(path, flag)
  if not run.is_delf:
    raise RunError(f'--{flag}={path} is a {run.mode.value} run, not a DELF run (tfl-train '
                   '--mode=delf)')
  stage = (run.metadata.get('delf') or {}).get('stage')
  if stage != 'attention':
    raise RunError(f'--{flag}={path} is a {stage} stage run: its attention is untrained; train '
                   'the attention stage from it (tfl-train --mode=delf --delf_stage=attention '
                   f'--init_from={path})')
  return run

