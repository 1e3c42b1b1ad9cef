"""What every stage's Beam runner shares: importing Beam quietly, its options, and its runner.

  pipeline_options(flags, error) -> PipelineOptions   the options of --beam_pipeline_options
  runner(options)                                     the runner to give beam.Pipeline
  failure_cause(error) -> str                         the last line of a failed pipeline's error

This module imports Apache Beam (the `beam` extra): only the Beam runners of stages import it.
"""

import logging as python_logging
from typing import Sequence, Type

# Importing Beam without its GCP client libraries logs "apitools not found" on every command. Only
# Dataflow and gs:// need them, where apache-beam[gcp] is installed anyway (and Beam says so
# itself when the DataflowRunner is asked for without them).
_root_logger, _level = python_logging.getLogger(), python_logging.getLogger().level
_root_logger.setLevel(python_logging.ERROR)
try:
  # pylint: disable-next=g-import-not-at-top
  from apache_beam.options import pipeline_options as beam_options
finally:
  _root_logger.setLevel(_level)

# Names of the DirectRunner, which runs here as the FnApiRunner: since Beam 2.6x DirectRunner first
# tries Prism, a Go binary it downloads from GitHub on first use (without internet access its code
# then falls back to the FnApiRunner anyway), and the FnApiRunner is what reads --direct_num_workers
# and --direct_running_mode.
_DIRECT_NAMES = ('direct', 'directrunner', 'switchingdirectrunner', 'fnapirunner')


def pipeline_options(flags: Sequence[str],
                     error: Type[Exception]) -> beam_options.PipelineOptions:
  """The Beam options of `--beam_pipeline_options` (items with or without their leading '--').

  Options no registered Beam options class knows are passed on (runners take some of their own);
  Beam logs a warning naming each, with the closest known option.

  Raises:
    error: an option with a value Beam rejects.
  """
  argv = ['--' + flag.strip().lstrip('-') for flag in flags or () if flag.strip()]
  if not any(flag.startswith('--default_sdk_harness_log_level') for flag in argv):
    # Worker processes (--direct_running_mode=multi_processing) log every connection at INFO, and
    # warn about options they do not know; a worker's error still fails the pipeline, with its
    # cause.
    argv.append('--default_sdk_harness_log_level=ERROR')
  options = beam_options.PipelineOptions(argv)
  try:
    options.get_all_options(display_warnings=True)  # Parses every value, so bad ones show now.
  except SystemExit:  # argparse's way of rejecting a value; it has printed why on stderr.
    raise error(f'--beam_pipeline_options: Beam rejects {",".join(argv)} (see above)') from None
  return options


def runner(options: beam_options.PipelineOptions):
  """The FnApiRunner for DirectRunner (see _DIRECT_NAMES), else None: Beam picks the named runner.

  Built as Beam's own DirectRunner builds it, with the options in its provision info: that is how
  worker processes receive them (their log level, for one).
  """
  name = options.view_as(beam_options.StandardOptions).runner
  if name is not None and name.lower() not in _DIRECT_NAMES:
    return None
  # pylint: disable=g-import-not-at-top
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability import portable_runner
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  # pylint: enable=g-import-not-at-top
  encoded = portable_runner.JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


def failure_cause(error: Exception) -> str:
  """The cause of a failed pipeline: runners report a worker's failure as their own exception types
  with the worker's traceback inside, whose last line names it."""
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  return (lines[-1].strip() if lines else type(error).__name__)[:500]
