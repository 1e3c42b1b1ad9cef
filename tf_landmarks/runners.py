"""Where a stage runs: in this process, or as an Apache Beam pipeline (`--runner=beam`).

The records build, the index build and batch prediction take the same two settings, made here
(`runner_setting`, `pipeline_options_setting`), check them alike (`check`), and import their Beam
runner module only for `--runner=beam`, inside `beam_required`: Beam is an optional extra. This
module imports no Beam; what the Beam runners themselves share is `beam_pipelines.py`.
"""

import contextlib
from typing import Any, Iterator, Optional, Sequence, Type

from tf_landmarks import errors
from tf_landmarks.settings import setting

RUNNERS = ('local', 'beam')
_INSTALL = "pip install 'tf-landmarks[beam]'"


def runner_setting(local: str, beam: str) -> Any:
  """A stage's `runner` field.

  Args:
    local: what "local" does there (a sentence fragment).
    beam: what "beam" does there, and that it writes the same outputs (a sentence fragment).
  """
  return setting(
      'local', f'"local": {local}. "beam": {beam}, as an Apache Beam pipeline ({_INSTALL}) run by '
      'the Beam runner that --beam_pipeline_options names (Dataflow, Flink, Spark; DirectRunner by '
      'default).', choices=RUNNERS, runtime=True)


def pipeline_options_setting() -> Any:
  """A stage's `beam_pipeline_options` field."""
  return setting(
      None, 'Beam pipeline options for --runner=beam, comma-separated, e.g. '
      '"--runner=DirectRunner,--direct_num_workers=2,--direct_running_mode=multi_processing" or '
      '"--runner=DataflowRunner,--project=P,--region=R,--temp_location=gs://B/tmp". DirectRunner '
      "runs as Beam's FnApiRunner (local processes).", runtime=True)


def check(runner: str, pipeline_options: Optional[Sequence[str]],
          error: Type[errors.UserError]) -> None:
  """Refuses pipeline options without `--runner=beam` (they would be silently ignored)."""
  if pipeline_options and runner != 'beam':
    raise error('--beam_pipeline_options is only used with --runner=beam')


@contextlib.contextmanager
def beam_required(error: Type[errors.UserError]) -> Iterator[None]:
  """Imports in the block that find no Apache Beam raise `error`, one line saying how to install
  it (a stage imports its Beam runner inside this block, and only for `--runner=beam`)."""
  try:
    yield
  except ModuleNotFoundError as missing:
    if not (missing.name or '').startswith('apache_beam'):
      raise
    raise error(f'--runner=beam needs Apache Beam: {_INSTALL}') from None
