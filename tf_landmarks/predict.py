"""Two-stage prediction of a set of queries: `tfl-predict`.

`predict(PredictConfig, RecognizerSettings)` reads the queries (a test CSV + image folder, or the
test shards of a records folder: `tf_landmarks/queries.py`), answers each through a
`recognizer.Recognizer` of the export (`tfl-export`; the module docstring there describes the
first stage, the verification and the retrieval list), classifying them in batches, and writes the
predictions folder `tf_landmarks/predictions.py` describes into `--output_dir`: the journal
(predictions.jsonl) a re-run continues from, the Kaggle submissions, predict.log and predict.json.
One `tfl-predict` writes a folder at a time.

Locally the work is pipelined: this thread reads and classifies batch k + 1 while `--threads`
threads answer batch k's queries (extraction, verification, retrieval; TensorFlow, faiss and OpenCV
release the GIL while they compute), and the entries are journalled in query order. Each answer
depends only on its query and its batch, so the submissions are the same whatever `--threads`.

`--runner=beam` answers the queries as an Apache Beam pipeline (`tf_landmarks/predict_beam.py`):
this process does the checks, opens the output folder and splits the pending queries into the same
batches the local run classifies; the pipeline's workers answer them with `answer_batch`, as the
local run does; this process then journals the answers in query order and writes the same
submissions. Beam is imported only for `--runner=beam` (the `beam` extra).
"""

import collections
from concurrent import futures
import dataclasses
import datetime
import os
import time
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import tqdm

from tf_landmarks import errors
from tf_landmarks import exports
from tf_landmarks import files
from tf_landmarks import predictions
from tf_landmarks import queries as queries_lib
from tf_landmarks import runners
from tf_landmarks import settings
from tf_landmarks.recognizer import Answer
from tf_landmarks.recognizer import Classified
from tf_landmarks.recognizer import Recognizer
from tf_landmarks.recognizer import RecognizerSettings
from tf_landmarks.settings import setting


class PredictError(errors.UserError):
  """Prediction cannot run as asked; the message says what to change."""


@dataclasses.dataclass
class PredictConfig:
  """Everything `predict` needs; `tfl-predict` defines one flag per field."""
  export: Optional[str] = setting(
      None, 'The export (tfl-export): classifier SavedModel, index and local-feature extractor. '
      'Verification uses the local features its index was built with (tfl-build-index '
      '--local_features=delf|sift).', required=True)
  output_dir: Optional[str] = setting(
      None, 'Where the submissions, predictions.jsonl, predict.log and predict.json go.',
      required=True, runtime=True)
  test_csv: Optional[str] = setting(
      None, 'Queries: a Kaggle test CSV (id[,url]) whose images are in --image_dir. Without it, '
      'the test split of --test_records is read.')
  image_dir: Optional[str] = setting(
      None, 'Folder of the --test_csv images (<id>.jpg, or DELF\'s nested a/b/c/<id>.jpg).')
  test_records: Optional[str] = setting(
      None, 'A records folder (tfl-build-records --test_csv) whose test split holds the queries; '
      'default: the export\'s records folder.')
  batch_size: int = setting(32, 'Queries classified per batch.', lower=1, runtime=True)
  threads: int = setting(
      0, 'Queries answered at once after classification (local features, verification, '
      'retrieval), each on its own thread, while the next batch is read and classified; 0: one '
      'per CPU core. The answers do not depend on it.', lower=0, runtime=True)
  overwrite: bool = setting(False, 'Start again in a --output_dir that holds predictions made '
                            'with other settings.', runtime=True)
  progress: bool = setting(True, 'Show a progress bar.', runtime=True)
  verify: bool = setting(False, 'Hash every file of the export before using it (by default '
                         'sizes are checked on every run, digests when the files changed since '
                         'the last full check).', runtime=True)
  runner: str = runners.runner_setting(
      'this process answers the queries (--threads)',
      'the queries in batches of --batch_size, each worker process loading the export once and '
      'answering one query at a time, writing the same submissions')
  beam_pipeline_options: Optional[List[str]] = runners.pipeline_options_setting()


# --- The whole run ---------------------------------------------------------------------------


def _fingerprint(config: PredictConfig, recognition: RecognizerSettings,
                 export: exports.Export) -> dict:
  return {**settings.fingerprint(config), **settings.fingerprint(recognition),
          'export_created': export.created,
          'classifier_sha256': export.classifier.run_model_sha256}


def _prepare_output(config: PredictConfig, fingerprint: dict) -> None:
  """Checks what --output_dir holds (the caller holds its lock); starts again with --overwrite."""
  previous = predictions.read_started(config.output_dir)
  if previous is not None and previous.get('fingerprint') != fingerprint:
    if not config.overwrite:
      raise PredictError(f'{config.output_dir} holds predictions made with other settings or '
                         'another export; pass --overwrite to start again, or choose another '
                         'folder')
    predictions.clear(config.output_dir)


def _batches(items: Iterable, size: int) -> Iterator[List]:
  batch = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _log_line(entry: dict) -> str:
  prediction = entry['prediction']
  answer = 'none' if prediction is None else f'{prediction[0]} {prediction[1]:.3f}'
  parts = ' '.join(f'{stage} {seconds * 1000:.0f} ms'
                   for stage, seconds in entry['timing'].items() if stage != 'total')
  return (f'{entry["id"]} {entry["status"]}: {answer}, {entry["seconds"] * 1000:.0f} ms '
          f'({parts})\n')


def _entry(recognizer: Recognizer, query: queries_lib.Query,
           classified: Optional[Classified]) -> dict:
  """A query's journal entry, given its classification (None for a query without an image)."""
  if classified is None:
    return Answer(query.status, timing={'classify': 0.0}).journal_entry(query.image_id)
  return recognizer.decide(query.jpeg, classified).journal_entry(query.image_id)


def _classified(recognizer: Recognizer, batch: Sequence[queries_lib.Query]
                ) -> List[Tuple[queries_lib.Query, Optional[Classified]]]:
  """Each query with its classification: the batch's images classified in one call."""
  classified = iter(recognizer.classify([query.jpeg for query in batch
                                         if query.jpeg is not None]))
  return [(query, None if query.jpeg is None else next(classified)) for query in batch]


def answer_batch(recognizer: Recognizer, batch: Sequence[queries_lib.Query]) -> List[dict]:
  """The journal entries of a batch of queries, classified together, answered one by one (each
  Beam worker's step; the local run's answers are the same, `answer_batches`)."""
  return [_entry(recognizer, query, classified)
          for query, classified in _classified(recognizer, batch)]


def answer_batches(recognizer: Recognizer, batches: Iterable[Sequence[queries_lib.Query]],
                   threads: int) -> Iterator[List[dict]]:
  """The journal entries of each batch, in order (the local run's step).

  Batch k + 1 is read (the iterator) and classified on this thread while `threads` threads answer
  batch k's queries: the classifier, the local features and the matching overlap, and the second
  stage of several queries runs at once. At most two batches are in flight.
  """
  pool = futures.ThreadPoolExecutor(threads, thread_name_prefix='tfl-answer')
  try:
    in_flight: Optional[List[futures.Future]] = None
    for batch in batches:
      started = [pool.submit(_entry, recognizer, query, classified)
                 for query, classified in _classified(recognizer, batch)]
      if in_flight is not None:
        yield [future.result() for future in in_flight]
      in_flight = started
    if in_flight is not None:
      yield [future.result() for future in in_flight]
  finally:
    # Stopped early (Ctrl-C, a failed journal write): answers not started are dropped, those
    # running finish; the journal keeps what was recorded, and a re-run continues from there.
    pool.shutdown(wait=True, cancel_futures=True)


def _cpu_cores() -> int:
  """The cores this process may run on (a container's, not the host's, where the OS says)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def predict(config: PredictConfig, recognition: Optional[RecognizerSettings] = None) -> dict:
  """Runs the prediction described in the module docstring.

  Args:
    config: the queries, the export and the output folder.
    recognition: how each query is answered; default `RecognizerSettings()`.

  Returns:
    predict.json's content: counts, timing (median and 90th percentile seconds per query) and
    where the submissions are.

  Raises:
    PredictError, exports.ExportError, predictions.PredictionsError, indexes.LandmarkIndexError,
      queries.QueriesError, recognizer.RecognizerError, csv_io.CsvError: unusable settings,
      export, queries or output folder.
  """
  recognition = recognition or RecognizerSettings()
  settings.check(config)
  settings.check(recognition)
  if not config.export or not config.output_dir:
    raise PredictError('give --export=<tfl-export folder> and --output_dir')
  runners.check(config.runner, config.beam_pipeline_options, PredictError)
  beam_runner = _beam_runner() if config.runner == 'beam' else None
  export = exports.load(config.export, verify=config.verify)
  total, read_queries, skipped = queries_lib.open_queries(
      export, test_csv=config.test_csv, image_dir=config.image_dir,
      test_records=config.test_records)
  for row in skipped:
    print(f'{config.test_csv}: skipped line {row.line}: {row.reason}')
  output_dir = config.output_dir
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise PredictError(f'--output_dir={output_dir} is a file, not a folder')
  tf.io.gfile.makedirs(output_dir)
  with files.exclusive_writer(output_dir, 'tfl-predict', PredictError):
    return _predict(config, recognition, export, total, read_queries, beam_runner)


def _beam_runner():
  """The Beam runner module; a one-line error if the `beam` extra is not installed."""
  with runners.beam_required(PredictError):
    from tf_landmarks import predict_beam  # pylint: disable=g-import-not-at-top  (optional extra)
  return predict_beam


def _predict(config: PredictConfig, recognition: RecognizerSettings, export: exports.Export,
             total: int, read_queries: queries_lib.QueryReader, beam_runner) -> dict:
  """The prediction into --output_dir, whose lock the caller holds."""
  fingerprint = _fingerprint(config, recognition, export)
  _prepare_output(config, fingerprint)
  meta = {'export': config.export, 'records_dir': export.records_dir,
          'queries': {'test_csv': config.test_csv, 'image_dir': config.image_dir,
                      'test_records': None if config.test_csv else
                      (config.test_records or export.records_dir)},
          'index': export.index_json(), 'fingerprint': fingerprint,
          'settings': {**settings.as_dict(config), **settings.as_dict(recognition)}}
  predictions.start(config.output_dir, meta)

  # Also where an export that cannot answer with these settings fails, before any Beam worker.
  recognizer = Recognizer(export, recognition, verify=config.verify)
  journal = predictions.Journal(files.join(config.output_dir, predictions.JOURNAL))
  done = len(journal.entries)
  if done:
    print(f'resuming: {done} of {total} queries already predicted')
  log_mode = 'a' if done else 'w'
  ids: List[str] = []  # Every query in order, for the submissions.

  def pending() -> Iterator[queries_lib.Query]:
    for image_id, query in read_queries(lambda image_id: image_id not in journal.entries):
      ids.append(image_id)
      if query is not None:
        yield query
  started = time.perf_counter()
  try:
    with tf.io.gfile.GFile(files.join(config.output_dir, predictions.LOG), log_mode) as log, \
        tqdm.tqdm(total=total, initial=done, unit='query', desc='predict',
                  disable=not config.progress) as bar:

      def record(entries: Iterable[dict]) -> None:
        for entry in entries:
          journal.append(entry)
          log.write(_log_line(entry))
          bar.update(1)
        log.flush()

      if beam_runner is None:
        threads = config.threads or _cpu_cores()
        for entries in answer_batches(recognizer, _batches(pending(), config.batch_size), threads):
          record(entries)
      else:
        ids += [image_id for image_id, _ in read_queries(lambda image_id: False)]
        # Work units: (position of the first, ids) of the local run's batches of pending queries.
        positions = [position for position, image_id in enumerate(ids)
                     if image_id not in journal.entries]
        chunks = [(batch[0], [ids[position] for position in batch])
                  for batch in _batches(positions, config.batch_size)]
        answered = beam_runner.answer(config, recognition, chunks)
        missing = [image_id for _, chunk in chunks for image_id in chunk
                   if image_id not in answered]
        if missing:
          raise PredictError(f'the Beam pipeline answered no entry for {len(missing)} queries '
                             f'({missing[0]}, …); rerun the same command')
        record(answered[image_id] for _, chunk in chunks for image_id in chunk)
  finally:
    journal.close()
  answered_now, elapsed = len(journal.entries) - done, time.perf_counter() - started
  ordered = [journal.entries[image_id] for image_id in ids]
  seconds = np.array([entry['seconds'] for entry in ordered]) if ordered else np.zeros(1)
  statuses = collections.Counter(entry['status'] for entry in ordered)
  meta = {**meta,
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'counts': {'queries': len(ordered),
                     'unusable': sum(count for status, count in statuses.items() if status != 'ok'),
                     'predictions': sum(1 for entry in ordered if entry['prediction']),
                     'verified': sum(1 for entry in ordered
                                     if entry['prediction'] and entry['prediction'][1] >= 1.0)},
          'statuses': dict(statuses),
          'seconds_per_query': {'median': float(np.median(seconds)),
                                'p90': float(np.percentile(seconds, 90)),
                                'total': float(seconds.sum()),
                                # What the queries of this run took together: below the median
                                # when several are answered at once (--threads, Beam's workers).
                                'wall': elapsed / answered_now if answered_now else None}}
  return predictions.finish(config.output_dir, meta, ordered, with_retrieval=bool(meta['index']))
