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
from typing import Dict, Iterable, List, Sequence, Tuple

import tensorflow as tf

# Imported before Beam: it imports Beam quietly (without the "apitools not found" log line).
from tf_landmarks import beam_pipelines  # pylint: disable=g-bad-import-order
# pylint: disable=g-import-not-at-top
import apache_beam as beam
from apache_beam.metrics import Metrics
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
  options = beam_pipelines.pipeline_options(config.beam_pipeline_options, predict.PredictError)
  root = beam.Pipeline(runner=beam_pipelines.runner(options), options=options)
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
    raise predict.PredictError(f'the Beam pipeline failed: {beam_pipelines.failure_cause(error)} '
                               '(the runner\'s log has the details); rerun the same command') from None


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
