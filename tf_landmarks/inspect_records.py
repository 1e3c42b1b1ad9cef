"""Checks a finished record build against its manifest and summarises it for people."""

import csv
import json
import os
import re
import statistics
from typing import Dict, List

import tensorflow as tf

from tf_landmarks import ingest


class InspectError(RuntimeError):
  """The folder is not a finished, intact build; the message says what is wrong."""


def load_manifest(records_dir: str) -> dict:
  """The manifest of a finished build.

  Raises:
    InspectError: there is no manifest (no build, or an unfinished one) or it is unreadable.
  """
  path = os.path.join(records_dir, ingest.MANIFEST)
  if not tf.io.gfile.exists(path):
    unfinished = tf.io.gfile.exists(os.path.join(records_dir, ingest.STAGING))
    raise InspectError(f'{records_dir} holds an unfinished build (no {ingest.MANIFEST}); continue it '
                       'with tfl-build-records --resume' if unfinished else
                       f'{records_dir} is not a record build (no {ingest.MANIFEST}); make one with '
                       'tfl-build-records')
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except json.JSONDecodeError as error:
    raise InspectError(f'{path} is not valid JSON ({error})') from None


def _plain(message: str) -> str:
  """A TensorFlow error message without its op and function-node decorations."""
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', message)
  return message.split(' [Op:')[0].strip()


def verify_shards(records_dir: str, manifest: dict) -> None:
  """Counts the records of every shard and compares them with the manifest.

  Raises:
    InspectError: a shard is missing, unreadable (truncated or corrupt) or holds a different count.
  """
  for split, info in manifest['splits'].items():
    for shard in info['shards']:
      path = os.path.join(records_dir, shard['file'])
      if not tf.io.gfile.exists(path):
        raise InspectError(f'{split} shard {path} is missing')
      try:
        count = int(tf.data.TFRecordDataset(path).reduce(0, lambda n, _: n + 1))
      except tf.errors.DataLossError as error:
        raise InspectError(f'{path} is corrupt or truncated ({_plain(error.message)})') from None
      if count != shard['examples']:
        raise InspectError(f'{path} holds {count} examples, the manifest says {shard["examples"]}')


def read_label_map(records_dir: str) -> List[Dict[str, int]]:
  """Rows of `label_map.csv` as dicts of ints: label, landmark_id, num_images."""
  with tf.io.gfile.GFile(os.path.join(records_dir, ingest.LABEL_MAP)) as f:
    return [{key: int(value) for key, value in row.items()} for row in csv.DictReader(f)]


def summary_lines(manifest: dict, label_map: List[Dict[str, int]]) -> List[str]:
  """A human summary: splits, the long tail of class sizes, skipped rows."""
  lines = [f'classes: {manifest["num_classes"]} (dropped {manifest["dropped_classes"]})']
  for split, info in manifest['splits'].items():
    lines.append(f'{split:<11} {info["examples"]:>8} examples in {len(info["shards"])} shard(s)')
  sizes = sorted(row['num_images'] for row in label_map)
  if sizes:
    lines.append(f'train images per class: min {sizes[0]}, median {statistics.median(sizes):g}, '
                 f'max {sizes[-1]}; {sum(s <= 2 for s in sizes)} class(es) with at most 2')
  skipped = manifest['skipped']
  reasons = ', '.join(f'{count} {reason}' for reason, count in skipped['by_reason'].items())
  lines.append(f'skipped rows: {skipped["total"]}' + (f' ({reasons})' if reasons else ''))
  return lines
