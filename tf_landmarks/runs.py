"""The run folder (`tfl-train --workdir`): its file names, its format, and a typed, checked load.

A finished run holds:

  model.keras            the whole trained model (a LandmarkClassifier or a DelfModel)
  backbone.weights.h5    the backbone's weights alone (what `--init_from` starts the next stage from)
  head.weights.npz       the classifier head's weights (classifier runs), or
  delf.weights.h5        the DELF model's weights (DELF runs)
  label_map.csv          a copy of the records folder's label map (class index → landmark id)
  train_config.json      the settings fingerprint, written first (the mark of a started run)
  run.json               written LAST (the mark of a finished run): what was trained on what, with
                         which weights, and its scores

Every reader of a run (the next training stage, the index builder, the exporter, the pair
evaluation) goes through `load`, so the format is checked in one place.
"""

import dataclasses
import enum
import json
from typing import Any, Dict

import tensorflow as tf

from tf_landmarks import errors
from tf_landmarks import files

FORMAT = 'tf-landmarks run v1'
RUN_JSON = 'run.json'
CONFIG_JSON = 'train_config.json'
MODEL_FILE = 'model.keras'
BACKBONE_WEIGHTS = 'backbone.weights.h5'
HEAD_WEIGHTS = 'head.weights.npz'  # Keras 3 layers (unlike models) have no save_weights.
DELF_WEIGHTS = 'delf.weights.h5'


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
  """Whether `path` holds a finished run (its run.json exists)."""
  return tf.io.gfile.exists(files.join(path, RUN_JSON))


def is_started(path: str) -> bool:
  """Whether `path` holds a started run (its settings fingerprint exists)."""
  return tf.io.gfile.exists(files.join(path, CONFIG_JSON))


def load(path: str, flag: str = 'run') -> Run:
  """Reads and checks a finished run's run.json.

  Args:
    path: the run folder.
    flag: the flag that named it, for messages ("init_from", "delf_run", …).

  Raises:
    RunError: not a folder, not finished, of another format, or missing a field readers need.
  """
  if not tf.io.gfile.isdir(path):
    raise RunError(f'--{flag}={path} is not a folder')
  run_json = files.join(path, RUN_JSON)
  if not tf.io.gfile.exists(run_json):
    raise RunError(f'--{flag}={path} is not a finished training run (no {RUN_JSON})')
  metadata = files.read_versioned_json(run_json, FORMAT, 'a run', 'train it again with tfl-train',
                                       RunError)
  if not all(isinstance(metadata.get(key), kind) for key, kind in _REQUIRED.items()):
    raise RunError(f'{run_json} is incomplete or damaged (it needs {", ".join(_REQUIRED)}); train '
                   'the run again')
  try:
    mode = Mode(metadata['mode'])
  except ValueError:
    raise RunError(f'{run_json} names an unknown mode {metadata["mode"]!r}; train the run '
                   'again') from None
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


def write_failed(workdir: str, metadata: dict, failure: str) -> None:
  """Marks a run failed: run.json with status "failed" and the one-line cause; never usable."""
  files.write_atomically(files.join(workdir, RUN_JSON), json.dumps(
      {**metadata, 'format': FORMAT, 'status': 'failed', 'failure': failure}, indent=1, default=str))
