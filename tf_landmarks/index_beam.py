"""The index build's shards as an Apache Beam pipeline (`tfl-build-index --runner=beam`).

The same build as `tf_landmarks.index_builder`, its shards spread over a Beam runner's workers
(Dataflow, Flink, Spark, or local processes). Everything that decides what is written is the local
builder's own code: the launching process checks the settings, runs, records and output folder and
fits the DELF PCA exactly as the local build does (`index_builder.build_index`); the pipeline then
builds each unfinished records shard's index shard with the local builder (`ShardBuilder`), whose
models each worker process loads once (`DoFn.setup`); the launcher finishes with the local last
step, which joins the shards and writes index.json. For the same inputs and settings the files are
therefore byte-identical to the local build's.

    shard names ─Create─Reshuffle─▶ build shard (ShardBuilder.build_unit) ─▶ <index>/shards/<name>.*

Retried bundles: a shard of a failed bundle is built again and only the successful attempt counts
(Beam's model); its only side effect, the shard's files, goes through temporary names unique to the
attempt and renames, and every attempt writes the same bytes, so a retried shard neither drops nor
duplicates an image.

Progress shows in Beam metrics (namespace `tf_landmarks.build_index`: `images_indexed`,
`shards_written`), which the runner shows live (the Dataflow console lists them).

This module imports Apache Beam (the `beam` extra); `index_builder` imports it only for
`--runner=beam`.
"""

import collections
from typing import Dict, Iterable, Optional, Sequence

from absl import logging
import tensorflow as tf

# First: it imports Beam without the warnings Beam logs on import.
from tf_landmarks import beam_pipelines  # pylint: disable=g-bad-import-order

import apache_beam as beam  # pylint: disable=g-import-not-at-top,g-bad-import-order
from apache_beam.metrics import Metrics  # pylint: disable=g-bad-import-order
from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-bad-import-order

from tf_landmarks import files
from tf_landmarks import index_builder
from tf_landmarks import indexes
from tf_landmarks.indexes import LandmarkIndexError

NAMESPACE = 'tf_landmarks.build_index'


class _BuildShard(beam.DoFn):
  """A records shard's name → its index shard, written; yields the name."""

  def __init__(self, config: index_builder.IndexConfig, checksums: Dict[str, Optional[str]],
               scales: Sequence[float]):
    super().__init__()
    self._config, self._checksums, self._scales = config, checksums, list(scales)
    self._builder = self._units = None

  def setup(self) -> None:
    # Once per worker process: the models load here, not per shard.
    inputs = index_builder.open_inputs(self._config)
    if inputs.checksums != self._checksums:
      raise LandmarkIndexError(f'the models of --run={self._config.run} or --delf_run changed '
                               'while the index was being built; build it again')
    self._units = {unit.name: unit
                   for unit in index_builder.work_units(self._config, inputs.records)}
    self._builder = index_builder.ShardBuilder(self._config, inputs, self._scales)

  def process(self, name: str) -> Iterable[str]:
    unit = self._units[name]
    self._builder.build_unit(unit)
    Metrics.counter(NAMESPACE, 'images_indexed').inc(unit.examples)
    Metrics.counter(NAMESPACE, 'shards_written').inc()
    yield name


def counters(result) -> Dict[str, int]:
  """The build's Beam counters of a finished pipeline: committed values where the runner has
  them."""
  totals = collections.Counter()
  for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))['counters']:
    value = counter.committed if counter.committed is not None else counter.attempted
    totals[counter.key.metric.name] += value or 0
  return dict(totals)


def run_pipeline(config: index_builder.IndexConfig, checksums: Dict[str, Optional[str]],
                 scales: Sequence[float], names: Sequence[str]) -> Dict[str, int]:
  """Builds the index shards `names` with the runner of `--beam_pipeline_options`.

  Returns:
    The build's Beam counters (see the module docstring).

  Raises:
    LandmarkIndexError: the options are unusable, or the pipeline failed (the runner's log has its
      workers' errors).
  """
  options = beam_pipelines.pipeline_options(config.beam_pipeline_options, LandmarkIndexError)
  root = beam.Pipeline(runner=beam_pipelines.runner(options), options=options)
  _ = (root
       | 'ShardNames' >> beam.Create(list(names))
       # A shard is a lot of work and its name is nothing: one worker must not get them all.
       | 'Spread' >> beam.Reshuffle()
       | 'BuildShards' >> beam.ParDo(_BuildShard(config, checksums, scales)))
  try:
    result = root.run()
    result.wait_until_finish()
  except Exception as error:  # pylint: disable=broad-except
    raise LandmarkIndexError(f'the Beam pipeline failed: {beam_pipelines.failure_cause(error)} '
                             '(the runner\'s log has the details); rerun with --resume') from None
  return counters(result)


def build_shards(config: index_builder.IndexConfig, checksums: Dict[str, Optional[str]],
                 scales: Sequence[float], units: Sequence[index_builder.Unit]) -> None:
  """Builds the index shards of `units` on Beam (`index_builder` calls it for `--runner=beam`).

  Args:
    config: the build's settings, `output_dir` set.
    checksums: the models' checksums the launcher checked; workers refuse other models.
    scales: the DELF scales.
    units: the unfinished shards.

  Raises:
    LandmarkIndexError: the pipeline failed, or finished without writing a shard.
  """
  if units:
    logging.info('Beam counters: %s', run_pipeline(config, checksums, scales,
                                                   [unit.name for unit in units]))
  shards_dir = files.join(config.output_dir, indexes.SHARDS_DIR)
  # Files of attempts that failed before their rename: never renamed into place, never needed.
  for leftover in tf.io.gfile.glob(files.join(shards_dir, '*.part*')):
    tf.io.gfile.remove(leftover)
  missing = [unit.name for unit in units
             if not all(tf.io.gfile.exists(path) for path in unit.files(config.output_dir))]
  if missing:
    raise LandmarkIndexError(f'the Beam pipeline finished without writing the index shard(s) '
                             f'{", ".join(missing)}; rerun with --resume')
