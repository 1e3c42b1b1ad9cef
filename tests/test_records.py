"""The records folder: load() and its checks, and tfl-inspect-records on good and broken builds."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from tf_landmarks import data
from tf_landmarks import ingest
from tf_landmarks import records
from tf_landmarks import schema
from helpers import GOOD_ROWS, REPO, config_for, write_dataset


@pytest.fixture(scope='module')
def build(tmp_path_factory):
  root = tmp_path_factory.mktemp('inspect')
  write_dataset(root, GOOD_ROWS)
  ingest.build_records(config_for(root))
  return root / 'records'


@pytest.fixture
def copy(build, tmp_path):
  """A copy of the finished build to damage."""
  target = tmp_path / 'copy'
  shutil.copytree(build, target)
  return target


def test_load_gives_what_readers_need(build):
  loaded = records.load(str(build))
  assert loaded.num_classes == 3 and loaded.landmark_ids == (100, 101, 102)
  assert sum(loaded.class_counts) == loaded.num_examples('train')
  assert loaded.max_image_size == 64
  assert [os.path.basename(p) for p in loaded.files('train')] == [
      s['file'] for s in loaded.manifest['splits']['train']['shards']]
  records.verify(loaded)


@pytest.mark.parametrize('damage,message', [
    (lambda d: (d / 'manifest.json').write_text('{}'), "not a manifest this version reads"),
    (lambda d: (d / 'manifest.json').write_text('{"format": "tf-landmarks records v1"}'),
     'incomplete or damaged'),
    (lambda d: (d / 'manifest.json').write_text('[1, 2'), 'is not valid JSON'),
    (lambda d: (d / 'label_map.csv').unlink(), 'label_map.csv is missing'),
    (lambda d: (d / 'label_map.csv').write_text('a,b\n1,2\n'), 'malformed: the header'),
    (lambda d: (d / 'label_map.csv').write_text('label,landmark_id,num_images\n0,x,1\n'),
     'malformed near line 2'),
    (lambda d: (d / 'label_map.csv').write_text('label,landmark_id,num_images\n1,100,3\n'),
     'must list labels 0..0'),
    (lambda d: (d / 'label_map.csv').write_text('label,landmark_id,num_images\n0,100,3\n'),
     'lists 1 classes, the manifest 3'),
])
def test_damaged_builds_are_clear_errors(copy, damage, message):
  damage(copy)
  with pytest.raises(records.RecordsError, match=message):
    records.load(str(copy))
  result = _inspect(copy)
  assert result.returncode == 2 and message.split(':')[0] in result.stderr.replace('\\', '')
  assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _inspect(records_dir, *args):
  return subprocess.run([sys.executable, '-m', 'tf_landmarks.cli.inspect_records',
                         f'--records_dir={records_dir}', '--batch_size=4', '--image_size=32', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=120)


def test_finished_build_verifies_and_shows_a_batch(build):
  result = _inspect(build, '--backbone=none')
  assert result.returncode == 0, result.stderr
  assert 'all shards match the manifest' in result.stdout
  assert 'images uint8 [4, 32, 32, 3]' in result.stdout
  evaluation = _inspect(build, '--split=validation', '--backbone=vgg16')
  assert evaluation.returncode == 0, evaluation.stderr
  assert 'validation batch' in evaluation.stdout and 'float32' in evaluation.stdout


def test_missing_manifest_and_truncated_shard_are_reported_without_traceback(build, tmp_path):
  nothing = _inspect(tmp_path)
  assert nothing.returncode == 2 and 'is not a record build' in nothing.stderr
  shard = sorted(build.glob('train-*-of-*'))[0]
  original = shard.read_bytes()
  try:
    shard.write_bytes(original[:len(original) // 2])
    truncated = _inspect(build)
  finally:
    shard.write_bytes(original)
  assert truncated.returncode == 2, truncated.stdout
  assert 'is corrupt or truncated (truncated record at' in truncated.stderr
  assert 'function_node' not in truncated.stderr
  assert 'Traceback' not in truncated.stderr


def test_noverify_on_a_corrupt_shard_names_the_shard(copy):
  shard = sorted(copy.glob('train-*-of-*'))[0]
  data = bytearray(shard.read_bytes())
  data[40:60] = b'x' * 20  # Inside the first record: its CRC no longer matches.
  shard.write_bytes(bytes(data))
  result = _inspect(copy, '--noverify')
  assert result.returncode == 2, result.stdout
  assert f'{shard} is corrupt or truncated' in result.stderr
  assert 'Traceback' not in result.stderr


def _scanned(path):
  """(offset, payload) of every record of a shard, read through; offsets from the framing."""
  offset, found = 0, []
  for record in tf.data.TFRecordDataset(path):
    found.append((offset, record.numpy()))
    offset += len(found[-1][1]) + records.RECORD_FRAMING_BYTES
  return found


def test_read_record_at_an_offset_equals_the_scan(build):
  path = records.load(str(build)).files('train')[0]
  scanned = _scanned(path)
  assert len(scanned) > 2
  for offset, payload in scanned:
    assert records.read_record(path, offset) == payload
  offset, payload = scanned[1]
  feature = tf.train.Example.FromString(payload).features.feature
  image_id = feature[schema.ID].bytes_list.value[0].decode()
  assert records.read_stored_image(path, offset, image_id) == \
      feature[schema.ENCODED].bytes_list.value[0]
  with pytest.raises(records.RecordsError, match=f'is image {image_id}, not other; the shard was '
                     'rebuilt since'):
    records.read_stored_image(path, offset, 'other')


def test_read_record_refuses_a_wrong_offset_and_a_damaged_record(copy):
  path = records.load(str(copy)).files('train')[0]
  offset, payload = _scanned(path)[1]
  content = open(path, 'rb').read()
  cases = [
      (offset + 1, content, f'{path}: no record starts at byte {offset + 1:,}'),
      (len(content), content, f'{path} has {len(content):,} bytes: no record can start at byte'),
      (offset, content[:offset + 12 + len(payload) // 2], 'more than the shard holds after it'),
      (offset, content[:offset + 20] + bytes([content[offset + 20] ^ 1]) + content[offset + 21:],
       f'{path}: the record at byte {offset:,} fails its checksum'),
  ]
  for at, damaged, message in cases:
    with open(path, 'wb') as f:
      f.write(damaged)
    with pytest.raises(records.RecordsError, match=message):
      records.read_record(path, at)
  with pytest.raises(records.RecordsError, match='is missing'):
    records.read_record(str(copy / 'nowhere'), 0)


@pytest.mark.parametrize('damage', ['missing', 'shortened'])
def test_missing_or_shortened_shard_is_named_before_reading(copy, damage):
  # Without the check, tf.data fails with "Graph execution error:" and no file name.
  shard = sorted(copy.glob('train-*-of-*'))[-1]
  if damage == 'missing':
    shard.unlink()
    message = f'shard {shard} is missing (the manifest lists it)'
  else:
    shard.write_bytes(shard.read_bytes()[:-10])
    message = f'{shard} is corrupt or truncated ('
  with pytest.raises(records.RecordsError, match=re.escape(message)):
    data.make_dataset(str(copy), 'train', training=True, batch_size=4, seed=0)
  result = _inspect(copy, '--noverify')
  assert result.returncode == 2, result.stdout
  assert 'Traceback' not in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert message in result.stderr
