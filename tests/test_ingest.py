"""CSV + images → shards: bad input, round trips, resume, layouts, TFDS loading, the CLI."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_landmarks import ingest
from tf_landmarks import images
from tf_landmarks import records
from tf_landmarks import schema
from tf_landmarks.splits import Singletons
from helpers import (GOOD_ROWS, REAL_DATA, REPO, config_for, jpeg_bytes, read_split,
                     requires_real_data, write_dataset)


def test_planted_bad_rows_leave_exactly_the_good_rows(tmp_path):
  bad_files = {
      'zerobyte.jpg': b'',
      'truncated.jpg': jpeg_bytes(300, 200)[:700],
      'garbage.jpg': b'<html>not found</html>',
      'tiny.jpg': jpeg_bytes(20, 20),
  }
  write_dataset(tmp_path, GOOD_ROWS, extra_files=bad_files)
  with open(tmp_path / 'train.csv', 'a') as f:
    f.write('zerobyte,u,100\ntruncated,u,101\ngarbage,u,102\ntiny,u,100\nmissing,u,101\n'
            'good00,u,100\nbadlabel,u,None\n../../etc/passwd,u,100\n,u,100\n')
  manifest = ingest.build_records(config_for(tmp_path, num_workers=2))

  written = {**read_split(manifest['config']['output_dir'], 'train'),
             **read_split(manifest['config']['output_dir'], 'validation')}
  assert sorted(written) == sorted(image_id for image_id, _ in GOOD_ROWS)
  assert manifest['skipped']['total'] == 9
  assert manifest['skipped']['by_reason'] == {
      'empty file': 1, 'corrupt or truncated image': 1, 'not a readable image': 1,
      'image too small': 1, 'missing image file': 1, 'duplicate id': 1,
      "landmark_id 'None' is not a non-negative integer": 1, 'unsafe id': 1, 'empty id': 1}
  splits = manifest['splits']
  assert splits['train']['examples'] + splits['validation']['examples'] == 18
  assert not tf.io.gfile.exists(os.path.join(manifest['config']['output_dir'], records.STAGING))


def test_round_trip_ids_labels_and_pixels(tmp_path):
  write_dataset(tmp_path, GOOD_ROWS, sizes={'good00': (200, 100)})
  manifest = ingest.build_records(config_for(tmp_path, max_image_size=0))
  output_dir = manifest['config']['output_dir']
  label_map = list(csv.DictReader(open(os.path.join(output_dir, 'label_map.csv'))))
  assert [(r['label'], r['landmark_id']) for r in label_map] == [('0', '100'), ('1', '101'),
                                                                  ('2', '102')]
  train, validation = read_split(output_dir, 'train'), read_split(output_dir, 'validation')
  assert sum(int(r['num_images']) for r in label_map) == len(train)
  landmark_of = dict(GOOD_ROWS)
  for image_id, example in {**train, **validation}.items():
    assert example[schema.LANDMARK_ID] == landmark_of[image_id]
    assert example[schema.LABEL] == landmark_of[image_id] - 100
    source = np.asarray(Image.open(tmp_path / 'images' / f'{image_id}.jpg').convert('RGB'))
    assert example['pixels'].shape == source.shape
    assert (example[schema.HEIGHT], example[schema.WIDTH]) == source.shape[:2]
    assert np.abs(example['pixels'].astype(float) - source).mean() < 2.0
  # Shards: DELF naming, sizes near examples_per_shard, counts consistent with the manifest.
  shards = manifest['splits']['train']['shards']
  assert [s['file'] for s in shards] == [f'train-{i:05d}-of-{len(shards):05d}'
                                          for i in range(len(shards))]
  assert sum(s['examples'] for s in shards) == len(train)
  assert max(s['examples'] for s in shards) <= 7


def test_resize_on_ingest_and_nested_delf_layout(tmp_path):
  rows = [('abcdef01', 1), ('abcdef02', 1), ('bcdef003', 2)]
  image_dir = write_dataset(tmp_path, rows, sizes={'abcdef01': (400, 200)})
  nested = image_dir / 'a' / 'b' / 'c'
  nested.mkdir(parents=True)
  (image_dir / 'abcdef01.jpg').rename(nested / 'abcdef01.jpg')
  output_dir = ingest.build_records(config_for(tmp_path, max_image_size=64,
                                               validation_fraction=0))['config']['output_dir']
  train = read_split(output_dir, 'train')
  assert sorted(train) == ['abcdef01', 'abcdef02', 'bcdef003']
  assert train['abcdef01']['pixels'].shape == (32, 64, 3)


def test_test_split_and_singleton_duplicate_and_min_images(tmp_path):
  rows = [('a1', 1), ('a2', 1), ('a3', 1), ('b1', 2), ('c1', 3), ('c2', 3)]
  write_dataset(tmp_path, rows + [('q1', 0), ('q2', 0)])
  with open(tmp_path / 'train.csv', 'w') as f:  # Queries are images only, not train rows.
    f.write('id,url,landmark_id\n' + ''.join(f'{i},u,{l}\n' for i, l in rows))
  (tmp_path / 'test.csv').write_text('id,url\nq1,u\nq2,u\nq3,u\n')
  manifest = ingest.build_records(config_for(tmp_path, test_csv=str(tmp_path / 'test.csv'),
                                             validation_fraction=0.34,
                                             singletons=Singletons.DUPLICATE))
  output_dir = manifest['config']['output_dir']
  test = read_split(output_dir, 'test')
  assert sorted(test) == ['q1', 'q2']  # q3 has no image file.
  assert {int(e[schema.LABEL]) for e in test.values()} == {schema.NO_LABEL}
  validation = tf.data.TFRecordDataset(tf.io.gfile.glob(os.path.join(output_dir, 'validation-*')))
  validation_ids = [schema.parse_example(r)[schema.ID].numpy().decode() for r in validation]
  assert 'b1' in validation_ids and 'b1' in read_split(output_dir, 'train')  # Distorted copy.
  assert manifest['validation_duplicates'] == 1

  dropped = ingest.build_records(config_for(tmp_path, output_dir=str(tmp_path / 'r2'),
                                            min_images_per_class=2))
  assert dropped['num_classes'] == 2 and dropped['dropped_classes'] == 1
  assert dropped['skipped']['by_reason'] == {'class too small': 1}


def test_existing_output_needs_resume_or_overwrite_and_resume_skips_finished_work(tmp_path,
                                                                                   monkeypatch):
  write_dataset(tmp_path, GOOD_ROWS)
  config = config_for(tmp_path, keep_staging=True)
  first = ingest.build_records(config)
  with pytest.raises(ingest.BuildError, match='already holds a complete build'):
    ingest.build_records(config)

  # Interrupt after the fact: the manifest and one shard are gone, staging is complete.
  output_dir = config.output_dir
  os.remove(os.path.join(output_dir, 'manifest.json'))
  lost = os.path.join(output_dir, first['splits']['train']['shards'][1]['file'])
  kept = os.path.join(output_dir, first['splits']['train']['shards'][0]['file'])
  lost_bytes = open(lost, 'rb').read()
  os.remove(lost)
  kept_mtime = os.stat(kept).st_mtime_ns
  with pytest.raises(ingest.BuildError, match='unfinished build'):
    ingest.build_records(config)

  def no_image_work(*args, **kwargs):
    raise AssertionError('a finished staging chunk was processed again')
  monkeypatch.setattr(images, 'prepare_image_files', no_image_work)
  config.resume = True
  second = ingest.build_records(config)
  assert open(lost, 'rb').read() == lost_bytes
  assert os.stat(kept).st_mtime_ns == kept_mtime
  assert second['splits'] == first['splits']
  # A finished build is returned as it is by --resume.
  assert ingest.build_records(config)['created'] == second['created']

  changed = config_for(tmp_path, resume=True, validation_fraction=0.5)
  with pytest.raises(ingest.BuildError, match='different inputs or settings.*validation_fraction'):
    ingest.build_records(changed)
  monkeypatch.undo()
  changed.resume, changed.overwrite = False, True
  assert ingest.build_records(changed)['config']['validation_fraction'] == 0.5


def test_resume_finishes_an_interrupted_staging_phase(tmp_path, monkeypatch):
  write_dataset(tmp_path, [(f'img{i:03d}', i % 4) for i in range(300)])
  rows_per_call = []
  real = images.prepare_image_files

  def interrupted_on_second_chunk(candidate_path_lists, *args):
    if len(rows_per_call) == 1:
      raise KeyboardInterrupt  # The user pressed Ctrl-C.
    rows_per_call.append(len(candidate_path_lists))
    return real(candidate_path_lists, *args)
  monkeypatch.setattr(images, 'prepare_image_files', interrupted_on_second_chunk)
  with pytest.raises(KeyboardInterrupt):
    ingest.build_records(config_for(tmp_path, examples_per_shard=100))
  assert not os.path.exists(tmp_path / 'records' / 'manifest.json')
  assert not tf.io.gfile.glob(str(tmp_path / 'records' / 'train-*'))
  assert rows_per_call[0] < 300

  monkeypatch.setattr(images, 'prepare_image_files',
                      lambda paths, *args: rows_per_call.append(len(paths)) or real(paths, *args))
  manifest = ingest.build_records(config_for(tmp_path, examples_per_shard=100, resume=True))
  assert sum(rows_per_call) == 300  # The finished chunk was not redone.
  total = manifest['splits']['train']['examples'] + manifest['splits']['validation']['examples']
  assert total == 300


def _shard_bytes(output_dir):
  return {name: open(os.path.join(output_dir, name), 'rb').read()
          for name in sorted(os.listdir(output_dir)) if '-of-' in name}


def test_unchanged_local_images_are_named_in_staging_not_copied(tmp_path):
  rows = [('abcdef01', 1), ('abcdef02', 1), ('bcdef003', 2), ('bcdef004', 2)]
  image_dir = write_dataset(tmp_path, rows, sizes={'abcdef02': (400, 200)})
  (image_dir / 'a' / 'b' / 'c').mkdir(parents=True)
  (image_dir / 'abcdef01.jpg').rename(image_dir / 'a' / 'b' / 'c' / 'abcdef01.jpg')
  config = config_for(tmp_path, max_image_size=100, validation_fraction=0, keep_staging=True)
  output_dir = ingest.build_records(config)['config']['output_dir']

  train = read_split(output_dir, 'train')
  sources = {image_id: next(image_dir.rglob(f'{image_id}.jpg')) for image_id, _ in rows}
  for image_id in ('abcdef01', 'bcdef003', 'bcdef004'):  # 96x72: passed through.
    assert train[image_id][schema.ENCODED] == sources[image_id].read_bytes()
  assert train['abcdef02']['pixels'].shape == (50, 100, 3)
  staging = tmp_path / 'records' / records.STAGING
  (results,) = [json.loads(path.read_text()) for path in staging.glob('chunk-*.json')]
  named = {entry[0]: entry[5] for entry in results if entry[5]}
  assert named == {image_id: str(sources[image_id]) for image_id in ('abcdef01', 'bcdef003',
                                                                      'bcdef004')}
  (copied,) = staging.glob('chunk-*.jpegs')  # Only the resized image's JPEG.
  assert copied.read_bytes() == train['abcdef02'][schema.ENCODED]


def test_image_changed_after_staging_stops_the_build_and_resume_finishes_it(tmp_path, monkeypatch):
  write_dataset(tmp_path, GOOD_ROWS)
  reference = ingest.build_records(config_for(tmp_path, output_dir=str(tmp_path / 'reference'),
                                              max_image_size=0))
  victim = tmp_path / 'images' / 'good05.jpg'
  original = victim.read_bytes()
  real_stage = ingest._stage  # pylint: disable=protected-access

  def stage_then_change_an_image(*args):
    real_stage(*args)
    victim.write_bytes(original[:-100])
  monkeypatch.setattr(ingest, '_stage', stage_then_change_an_image)
  config = config_for(tmp_path, max_image_size=0)
  message = (f'{victim} changed or disappeared after it was checked; restore it, or rebuild '
             'with --overwrite')
  with pytest.raises(ingest.BuildError, match=f'^{re.escape(message)}$'):
    ingest.build_records(config)
  monkeypatch.undo()
  victim.write_bytes(original)
  config.resume = True
  ingest.build_records(config)
  assert _shard_bytes(config.output_dir) == _shard_bytes(reference['config']['output_dir'])


def test_images_from_a_remote_folder_are_copied_into_staging(tmp_path):
  write_dataset(tmp_path, GOOD_ROWS)
  # A URL scheme: read through tf.io.gfile like gs://, where reading each file again in the shard
  # pass would cost a request per image.
  config = config_for(tmp_path, image_dir=f'file://{tmp_path / "images"}', max_image_size=0,
                      keep_staging=True)
  output_dir = ingest.build_records(config)['config']['output_dir']
  staging = tmp_path / 'records' / records.STAGING
  assert not [entry for path in staging.glob('chunk-*.json')
              for entry in json.loads(path.read_text()) if entry[5]]
  copied = sum(path.stat().st_size for path in staging.glob('chunk-*.jpegs'))
  assert copied == sum(path.stat().st_size for path in (tmp_path / 'images').iterdir())
  written = {**read_split(output_dir, 'train'), **read_split(output_dir, 'validation')}
  for image_id, example in written.items():
    assert example[schema.ENCODED] == (tmp_path / 'images' / f'{image_id}.jpg').read_bytes()


def test_shards_load_with_tensorflow_datasets(tmp_path):
  import tensorflow_datasets as tfds
  write_dataset(tmp_path, GOOD_ROWS)
  manifest = ingest.build_records(config_for(tmp_path))
  builder = tfds.builder_from_directory(manifest['config']['output_dir'])
  assert builder.info.splits['train'].num_examples == manifest['splits']['train']['examples']
  example = next(iter(builder.as_dataset(split='validation').take(1)))
  assert example['image']['encoded'].shape[-1] == 3
  assert example['image']['encoded'].dtype == tf.uint8
  assert int(example['landmark_id']) in {100, 101, 102}


@requires_real_data
def test_real_photo_set_builds_with_expected_counts(tmp_path):
  output_dir = str(tmp_path / 'real')
  manifest = ingest.build_records(ingest.BuildConfig(
      output_dir=output_dir, train_csv=str(REAL_DATA / 'train.csv'),
      test_csv=str(REAL_DATA / 'test.csv'), image_dir=str(REAL_DATA / 'images'),
      validation_fraction=0.1, max_image_size=0, num_workers=2, progress=False))
  assert manifest['num_classes'] == 8
  splits = manifest['splits']
  assert splits['train']['examples'] + splits['validation']['examples'] == 58
  assert manifest['splits']['test']['examples'] == 67
  assert manifest['skipped']['total'] == 0
  train = read_split(output_dir, 'train')
  landmark_of = {row['id']: int(row['landmark_id'])
                 for row in csv.DictReader(open(REAL_DATA / 'train.csv'))}
  for image_id, example in list(train.items())[:10]:
    assert example[schema.LANDMARK_ID] == landmark_of[image_id]
    source = np.asarray(Image.open(REAL_DATA / 'images' / f'{image_id}.jpg').convert('RGB'))
    # JPEGs that need no change pass through byte for byte.
    assert example[schema.ENCODED] == (REAL_DATA / 'images' / f'{image_id}.jpg').read_bytes()
    # Decoders differ slightly.
    assert np.abs(example['pixels'].astype(float) - source).mean() < 2.5


def _run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'tf_landmarks.cli.build_records', *args,
                         '--noprogress'], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize('csv_text,message', [
    ('id,url\nabc,u\n', 'missing column(s) landmark_id'),
    ('', 'the file is empty'),
    ('id,url,landmark_id\nabc,u,notanumber\n', 'no usable rows'),
])
def test_cli_reports_bad_csv_without_traceback(tmp_path, csv_text, message):
  (tmp_path / 'train.csv').write_text(csv_text)
  (tmp_path / 'images').mkdir()
  result = _run_cli(f'--train_csv={tmp_path / "train.csv"}', f'--image_dir={tmp_path / "images"}',
                    f'--output_dir={tmp_path / "out"}')
  assert result.returncode == 2
  assert message in result.stderr and 'Traceback' not in result.stderr


def test_cli_reports_wrong_image_dir_and_builds_when_right(tmp_path):
  write_dataset(tmp_path, GOOD_ROWS)
  (tmp_path / 'empty').mkdir()
  common = [f'--train_csv={tmp_path / "train.csv"}', f'--output_dir={tmp_path / "out"}',
            '--examples_per_shard=5']
  wrong = _run_cli(*common, f'--image_dir={tmp_path / "empty"}')
  assert wrong.returncode == 2 and 'none of 18 sampled images was found' in wrong.stderr
  assert 'Traceback' not in wrong.stderr
  right = _run_cli(*common, f'--image_dir={tmp_path / "images"}', '--overwrite')
  assert right.returncode == 0, right.stderr
  assert 'classes: 3' in right.stdout
  assert json.load(open(tmp_path / 'out' / 'manifest.json'))['num_classes'] == 3


def test_synthetic_world_round_trips_through_the_builder(tmp_path):
  from tf_landmarks import synthetic
  world = tmp_path / 'world'
  synthetic.generate(str(world), synthetic.WorldSpec(
      seed=4, num_landmarks=8, num_unseen_landmarks=2, num_train_images=48, num_test_images=16,
      image_size=160))
  output_dir = str(tmp_path / 'records')
  manifest = ingest.build_records(ingest.BuildConfig(
      output_dir=output_dir, train_csv=str(world / 'train.csv'), test_csv=str(world / 'test.csv'),
      image_dir=str(world / 'images'), validation_fraction=0.2, singletons=Singletons.TRAIN,
      max_image_size=128, examples_per_shard=16, num_workers=2, progress=False))
  assert manifest['skipped']['total'] == 0
  train_rows = {row['id']: int(row['landmark_id'])
                for row in csv.DictReader(open(world / 'train.csv'))}
  test_ids = {row['id'] for row in csv.DictReader(open(world / 'test.csv'))}
  labelled = {**read_split(output_dir, 'train'), **read_split(output_dir, 'validation')}
  test = read_split(output_dir, 'test')
  assert set(labelled) == set(train_rows) and set(test) == test_ids
  label_of = {int(row['landmark_id']): int(row['label'])
              for row in csv.DictReader(open(os.path.join(output_dir, 'label_map.csv')))}
  assert sorted(label_of.values()) == list(range(8))
  for image_id, example in labelled.items():
    assert example[schema.LANDMARK_ID] == train_rows[image_id]
    assert example[schema.LABEL] == label_of[train_rows[image_id]]
  for image_id, example in list(labelled.items())[:12] + list(test.items())[:4]:
    # Pixels: the source downsized with an area filter and re-encoded at quality 90; what is left
    # is the difference between TensorFlow's and Pillow's JPEG decoders.
    source = Image.open(world / 'images' / f'{image_id}.jpg').convert('RGB')
    scale = 128 / max(source.size)
    resized = source.resize((round(source.width * scale), round(source.height * scale)),
                            Image.Resampling.BOX)
    buffer = io.BytesIO()
    resized.save(buffer, format='JPEG', quality=90)
    expected = np.asarray(Image.open(buffer), dtype=float)
    assert example['pixels'].shape == expected.shape
    assert np.abs(example['pixels'] - expected).mean() < 1.5
