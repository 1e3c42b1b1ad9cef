"""The record build as an Apache Beam pipeline (`tfl-build-records --runner=beam`).

The same build as `tf_landmarks.ingest`, spread over a Beam runner's workers (Dataflow, Flink,
Spark, or local processes). Everything that decides what is written is the local builder's own code:
the launching process reads and validates the CSVs, downloads (with --download), shuffles the rows
and checks the image folder exactly as the local build does (`ingest.build_records`); the pipeline
then runs, per row, the local workers' image preparation (`images.prepare_image_files`), once over
all rows the split and shard placement (`ingest.plan_split`), and per shard the local shard writer
(`ingest.ShardWriter`) on `ingest.serialize_placement`'s examples. The launcher finishes with the
local label map, TFDS metadata and manifest writer (`ingest.finish_build`). For the same inputs and
settings, the shards are therefore byte-identical to the local build's.

    rows.jsonl ─ReadFromText─Reshuffle─▶ prepare ─┬─ unusable ───────────────────────────▶ unusable-*.jsonl
                                                  ├─ (position, id, landmark) ─ToList─┬─ plan ─▶ plan-*.json
                                                  │                                   └─ placements (AsDict)
                                                  └─ images ─place─GroupByKey(shard)─write shard─▶ shards-*.jsonl

Retried bundles: elements of a failed bundle are processed again and only the successful attempt's
outputs count (Beam's model); the only side effect, writing a shard, goes through a temporary name
unique to the attempt and a rename, and every attempt writes the same bytes.

Unusable images are counted with Beam metrics (namespace `tf_landmarks.build_records`: `images_read`,
`images_unusable`, one counter per reason, `examples_written`, `shards_written`), shown live by the
runner (the Dataflow console lists them), and listed in the manifest as in the local build.

This module imports Apache Beam (the `beam` extra); `ingest` imports it only for `--runner=beam`.
"""

import collections
import json
from typing import Dict, Iterable, List

from absl import logging
import tensorflow as tf

# First: it imports Beam without the warnings Beam logs on import.
from tf_landmarks import beam_pipelines  # pylint: disable=g-bad-import-order

import apache_beam as beam  # pylint: disable=g-import-not-at-top,g-bad-import-order
from apache_beam.metrics import Metrics  # pylint: disable=g-import-not-at-top,g-bad-import-order
from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-bad-import-order

from tf_landmarks import csv_io
from tf_landmarks import files
from tf_landmarks import images
from tf_landmarks import ingest
from tf_landmarks import records

NAMESPACE = 'tf_landmarks.build_records'
_WORK = 'beam'  # Folder under the build's staging folder for the pipeline's input and outputs.

class _PrepareImage(beam.DoFn):
  """Row → its prepared image, or (tagged 'unusable') the reason it cannot be used."""

  def __init__(self, config: ingest.BuildConfig, image_dir: str):
    super().__init__()
    self._config = config
    self._image_dir = image_dir

  def process(self, row: list) -> Iterable:
    position, image_id, landmark_id = row
    config = self._config
    # The local build's worker function, on a chunk of one image: the same checks and bytes.
    # Unchanged images travel as bytes (never named by path): a worker elsewhere writes the shard.
    (result,) = images.prepare_image_files(
        [images.image_paths(self._image_dir, image_id)], config.max_image_size,
        config.jpeg_quality, config.min_image_side, config.max_file_bytes)
    if isinstance(result, str):
      Metrics.counter(NAMESPACE, 'images_unusable').inc()
      Metrics.counter(NAMESPACE, f'unusable: {ingest.reason_group(result)}').inc()
      yield beam.pvalue.TaggedOutput('unusable', (position, image_id, result))
      return
    Metrics.counter(NAMESPACE, 'images_read').inc()
    yield position, image_id, landmark_id, result.jpeg, result.height, result.width


def _placements(readable: list, config: ingest.BuildConfig) -> Iterable:
  """The global step: the split over every readable row, once; placements keyed by position."""
  at_position = collections.defaultdict(list)
  for placement in ingest.plan_split([tuple(row) for row in readable], config)[1]:
    # Plain tuples: Beam's coders keep tuples, not NamedTuple types.
    at_position[placement.position].append(tuple(placement))
  return at_position.items()


def _plan(readable: list, config: ingest.BuildConfig) -> str:
  """The split's summary for the manifest (JSON): the same global step, kept apart from the
  placements so that they are a single-output transform (side inputs taken from a multi-output
  transform came out empty on Beam 2.77's BundleBasedDirectRunner)."""
  return json.dumps(vars(ingest.plan_split([tuple(row) for row in readable], config)[0]))


class _Place(beam.DoFn):
  """Prepared image → ((split, shard, shards of the split), (rank, serialized Example)) per place."""

  def __init__(self, config: ingest.BuildConfig):
    super().__init__()
    self._config = config

  def process(self, prepared: tuple, placements: dict) -> Iterable:
    position, image_id, _, jpeg, height, width = prepared
    for fields in placements.get(position, ()):
      placement = ingest.Placement(*fields)
      yield ((placement.split, placement.shard, placement.num_shards),
             (placement.rank, ingest.serialize_placement(placement, image_id, jpeg, height, width,
                                                        self._config)))


class _WriteShard(beam.DoFn):
  """All examples of one shard → the shard file (in rank order) → its manifest entry."""

  def __init__(self, output_dir: str, resume: bool):
    super().__init__()
    self._output_dir = output_dir
    self._resume = resume

  def process(self, element) -> Iterable:
    (split, shard, count), ranked = element
    writer = ingest.ShardWriter(self._output_dir, split, self._resume)
    examples = 0
    for _, serialized in sorted(ranked, key=lambda item: item[0]):
      writer.write(serialized, shard, count)
      examples += 1
    writer.close()
    Metrics.counter(NAMESPACE, 'examples_written').inc(examples)
    Metrics.counter(NAMESPACE, 'shards_written').inc()
    (entry,) = writer.shards
    yield json.dumps({'split': split, **entry})


def _add_build(root: beam.Pipeline, config: ingest.BuildConfig, image_dir: str,
               work_dir: str) -> None:
  """Adds the build's transforms to `root`; their results go to text files in `work_dir`."""
  rows = (root
          | 'ReadRows' >> beam.io.ReadFromText(files.join(work_dir, 'rows.jsonl'))
          | 'ParseRows' >> beam.Map(json.loads)
          # Reading is cheap and preparing is not: spread the rows over all workers.
          | 'Spread' >> beam.Reshuffle())
  prepared = rows | 'PrepareImages' >> beam.ParDo(_PrepareImage(config, image_dir)).with_outputs(
      'unusable', main='images')
  readable = (prepared.images
              | 'Readable' >> beam.Map(lambda image: tuple(image[:3]))
              | 'AllReadable' >> beam.combiners.ToList())
  placements = readable | 'Placements' >> beam.FlatMap(_placements, config)
  _ = (prepared.images
       | 'Place' >> beam.ParDo(_Place(config), beam.pvalue.AsDict(placements))
       | 'ByShard' >> beam.GroupByKey()
       | 'WriteShards' >> beam.ParDo(_WriteShard(config.output_dir, config.resume))
       | 'SaveShardEntries' >> beam.io.WriteToText(files.join(work_dir, 'shards'),
                                                  file_name_suffix='.jsonl'))
  _ = (prepared.unusable
       | 'FormatUnusable' >> beam.Map(json.dumps)
       | 'SaveUnusable' >> beam.io.WriteToText(files.join(work_dir, 'unusable'),
                                              file_name_suffix='.jsonl'))
  _ = (readable
       | 'Plan' >> beam.Map(_plan, config)
       | 'SavePlan' >> beam.io.WriteToText(files.join(work_dir, 'plan'), file_name_suffix='.json'))


def counters(result) -> Dict[str, int]:
  """The build's Beam counters of a finished pipeline: committed values where the runner has them."""
  totals = collections.Counter()
  for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))['counters']:
    value = counter.committed if counter.committed is not None else counter.attempted
    totals[counter.key.metric.name] += value or 0
  return dict(totals)


def run_pipeline(config: ingest.BuildConfig, inputs: ingest.BuildInputs,
                 work_dir: str) -> Dict[str, int]:
  """Runs the pipeline over `inputs.rows` with the runner of `--beam_pipeline_options`.

  Returns:
    The build's Beam counters (see the module docstring).

  Raises:
    ingest.BuildError: the options are unusable, or the pipeline failed (the runner's log has its
      workers' errors).
  """
  options = beam_pipelines.pipeline_options(config.beam_pipeline_options, ingest.BuildError)
  root = beam.Pipeline(runner=beam_pipelines.runner(options), options=options)
  _add_build(root, config, inputs.image_dir, work_dir)
  try:
    result = root.run()
    result.wait_until_finish()
  except Exception as error:  # pylint: disable=broad-except
    raise ingest.BuildError(f'the Beam pipeline failed: {beam_pipelines.failure_cause(error)} (the '
                            'runner\'s log has the details); rerun with --resume') from None
  return counters(result)


def _read_lines(pattern: str) -> List[str]:
  """The non-empty lines of the pipeline's text outputs matching `pattern`."""
  lines = []
  for path in sorted(tf.io.gfile.glob(pattern)):
    with tf.io.gfile.GFile(path) as f:
      lines += [line for line in f.read().splitlines() if line]
  return lines


def build(config: ingest.BuildConfig, inputs: ingest.BuildInputs) -> dict:
  """The Beam build of `inputs` (`ingest.build_records` calls it for `--runner=beam`).

  Returns:
    The manifest, as the local build writes it.

  Raises:
    ingest.BuildError: as the local build, or the pipeline failed.
  """
  work_dir = files.join(config.output_dir, records.STAGING, _WORK)
  if tf.io.gfile.exists(work_dir):  # Outputs of an earlier, interrupted run.
    tf.io.gfile.rmtree(work_dir)
  tf.io.gfile.makedirs(work_dir)
  files.write_atomically(files.join(work_dir, 'rows.jsonl'), ''.join(
      json.dumps([position, row.image_id, row.landmark_id]) + '\n'
      for position, row in enumerate(inputs.rows)))
  metrics = run_pipeline(config, inputs, work_dir)
  logging.info('Beam counters: %s', metrics)

  unusable = sorted(json.loads(line) for line in _read_lines(files.join(work_dir, 'unusable*')))
  inputs.skipped += [csv_io.SkippedRow('image', 0, image_id, reason)
                     for _, image_id, reason in unusable]
  (plan_json,) = _read_lines(files.join(work_dir, 'plan*'))
  plan = ingest.SplitPlan(**json.loads(plan_json))
  plan.label_map = [tuple(row) for row in plan.label_map]
  plan.dropped = [tuple(row) for row in plan.dropped]
  ingest.check_plan(plan, inputs.num_train_rows, inputs.skipped, config)
  shards = {name: [] for name in records.SPLITS}
  for entry in sorted((json.loads(line) for line in _read_lines(files.join(work_dir, 'shards*'))),
                      key=lambda entry: entry['file']):
    shards[entry.pop('split')].append(entry)
  return ingest.finish_build(config, inputs, plan, shards)
