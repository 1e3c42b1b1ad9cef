"""Batch prediction as an Apache Beam pipeline (`tfl-predict --runner=beam`).

The same prediction as `tf_landmarks.predict`, spread over a Beam runner's workers (Dataflow, Flink,
Spark, or local processes). The launching process (`predict.predict`) checks the export, settings,
queries and output folder, and splits the pending queries into the batches the local run would
classify: the work units, (position of the first query, query ids). Each worker process loads the
export once (`DoFn.setup`: `Recognizer.open`) and opens the queries' reader; per work unit it reads
its queries from their position on (`queries.open_queries`) and answers them with
`predict.answer_batch`, the local run's own step, emitting one journal entry per query. The launcher
journals the entries in query order and writes the submissions with `predictions.finish`, so they
are byte-identical to the local run's.

    chunks.jsonl ─ReadFromText─Reshuffle─▶ answer (setup: Recognizer.open) ─▶ entries-*.jsonl

Retried bundles: elements of a failed bundle are processed again and only the successful attempt's
outputs count (Beam's model); a worker has no side effect but its output, which Beam's file sink
writes under names unique to the attempt and renames on success; the launcher keys the entries by
query id. A failed pipeline journals nothing: rerunning the same command answers every query again.

Answers are counted with Beam metrics (namespace `tf_landmarks.predict`: `queries`, `unusable`,
`verified`), shown live by the runner.

This module imports Apache Beam (the `beam` extra); `predict` imports it only for `--runner=beam`.
"""

import json
import logging as python_logging
from typing import Dict, Iterable, List, Sequence, Tuple

import tensorflow as tf

# Importing Beam without its GCP client libraries logs "apitools not found" on every command (see
# ingest_beam.py).
_root_logger, _level = python_logging.getLogger(), python_logging.getLogger().level
_root_logger.setLevel(python_logging.ERROR)
# pylint: disable=g-import-not-at-top
try:
  import apache_beam as beam
  from apache_beam.metrics import Metrics
  from apache_beam.options import pipeline_options as beam_options
finally:
  _root_logger.setLevel(_level)
# pylint: enable=g-import-not-at-top

from tf_landmarks import files
from tf_landmarks import predict
from tf_landmarks import queries as queries_lib
from tf_landmarks.recognizer import OK
from tf_landmarks.recognizer import Recognizer
from tf_landmarks.recognizer import RecognizerSettings

NAMESPACE = 'tf_landmarks.predict'
# Folder under --output_dir for the pipeline's input and outputs, removed once they are read.
WORK = '.beam'
# As in ingest_beam.py: DirectRunner runs here as the FnApiRunner, which reads --direct_num_workers.
_DIRECT_NAMES = ('direct', 'directrunner', 'switchingdirectrunner', 'fnapirunner')


def pipeline_options(flags: Sequence[str]) -> beam_options.PipelineOptions:
  """The Beam options of `--beam_pipeline_options`, parsed as `tfl-build-records` parses them.

  Raises:
    predict.PredictError: an option with a value Beam rejects.
  """
  argv = ['--' + flag.strip().lstrip('-') for flag in flags or () if flag.strip()]
  if not any(flag.startswith('--default_sdk_harness_log_level') for flag in argv):
    argv.append('--default_sdk_harness_log_level=ERROR')  # Worker processes log at INFO.
  options = beam_options.PipelineOptions(argv)
  try:
    options.get_all_options(display_warnings=True)  # Parses every value, so bad ones show now.
  except SystemExit:  # argparse's way of rejecting a value; it has printed why on stderr.
    raise predict.PredictError(f'--beam_pipeline_options: Beam rejects {",".join(argv)} (see '
                               'above)') from None
  return options


def _runner(options: beam_options.PipelineOptions):
  """The FnApiRunner for DirectRunner, with the options in its provision info (how worker
  processes receive them), else None: Beam picks the named runner."""
  runner = options.view_as(beam_options.StandardOptions).runner
  if runner is not None and runner.lower() not in _DIRECT_NAMES:
    return None
  # pylint: disable=g-import-not-at-top
  from apache_beam.portability.api import beam_provision_api_pb2
  from apache_beam.runners.portability import portable_runner
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  # pylint: enable=g-import-not-at-top
  encoded = portable_runner.JobServiceHandle.encode_pipeline_options(options.get_all_options())
  return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(
      beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)))


class _AnswerChunk(beam.DoFn):
  """(position of the first query, query ids) → the journal entry of each query, as JSON."""

  def __init__(self, config: predict.PredictConfig, recognition: RecognizerSettings):
    super().__init__()
    self._config = config
    self._recognition = recognition

  def setup(self):
    # Once per worker process: the SavedModel, the index and the extractor stay loaded for every
    # chunk it answers. The launcher has checked the export (and hashed it with --verify).
    config = self._config
    self._recognizer = Recognizer.open(config.export, self._recognition)
    _, self._read, _ = queries_lib.open_queries(
        self._recognizer.export, test_csv=config.test_csv, image_dir=config.image_dir,
        test_records=config.test_records)

  def process(self, chunk: list) -> Iterable[str]:
    start, ids = chunk
    wanted = set(ids)
    batch: List[queries_lib.Query] = []
    for _, query in self._read(lambda image_id: image_id in wanted, start):
      if query is not None:
        batch.append(query)
        if len(batch) == len(wanted):
          break
    for entry in predict.answer_batch(self._recognizer, batch):
      Metrics.counter(NAMESPACE, 'queries').inc()
      if entry['status'] != OK:
        Metrics.counter(NAMESPACE, 'unusable').inc()
      elif entry['prediction'] and entry['prediction'][1] >= 1.0:
        Metrics.counter(NAMESPACE, 'verified').inc()
      yield json.dumps(entry, sort_keys=True)


def _run(config: predict.PredictConfig, recognition: RecognizerSettings, work_dir: str) -> None:
  """Runs the pipeline over `work_dir`/chunks.jsonl with the runner of --beam_pipeline_options.

  Raises:
    predict.PredictError: the options are unusable, or the pipeline failed.
  """
  options = pipeline_options(config.beam_pipeline_options)
  root = beam.Pipeline(runner=_runner(options), options=options)
  _ = (root
       | 'ReadChunks' >> beam.io.ReadFromText(files.join(work_dir, 'chunks.jsonl'))
       | 'ParseChunks' >> beam.Map(json.loads)
       # Reading is cheap and answering is not: spread the chunks over all workers.
       | 'Spread' >> beam.Reshuffle()
       | 'Answer' >> beam.ParDo(_AnswerChunk(config, recognition))
       | 'SaveEntries' >> beam.io.WriteToText(files.join(work_dir, 'entries'),
                                              file_name_suffix='.jsonl'))
  try:
    root.run().wait_until_finish()
  except Exception as error:  # pylint: disable=broad-except
    # Runners report a worker's failure as their own exception types with the worker's traceback
    # inside; its last line names the cause.
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    cause = lines[-1].strip() if lines else type(error).__name__
    raise predict.PredictError(f'the Beam pipeline failed: {cause[:500]} (the runner\'s log has '
                               'the details); rerun the same command') from None


def answer(config: predict.PredictConfig, recognition: RecognizerSettings,
           chunks: Sequence[Tuple[int, List[str]]]) -> Dict[str, dict]:
  """The journal entries of the queries of `chunks`, answered by the pipeline, by query id.

  Args:
    config: the prediction's settings (--export, the queries, --output_dir, the Beam options).
    recognition: how each query is answered.
    chunks: the work units: (position of the first query in the query order, their ids).

  Raises:
    predict.PredictError: the options are unusable, or the pipeline failed.
  """
  work_dir = files.join(config.output_dir, WORK)
  if tf.io.gfile.exists(work_dir):  # Outputs of an earlier, interrupted run.
    tf.io.gfile.rmtree(work_dir)
  tf.io.gfile.makedirs(work_dir)
  files.write_atomically(files.join(work_dir, 'chunks.jsonl'),
                         ''.join(json.dumps(chunk) + '\n' for chunk in chunks))
  _run(config, recognition, work_dir)
  entries = {}
  for path in sorted(tf.io.gfile.glob(files.join(work_dir, 'entries*'))):
    with tf.io.gfile.GFile(path) as f:
      for line in f.read().splitlines():
        if line:
          entry = json.loads(line)
          entries[entry['id']] = entry
  tf.io.gfile.rmtree(work_dir)
  return entries
