"""The retrieval and verification index, built for real from tiny runs on a synthetic world."""

import concurrent.futures
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from tf_landmarks import data
from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import index_builder
from tf_landmarks import indexes
from tf_landmarks import ingest
from tf_landmarks import schema
from tf_landmarks import train
from helpers import REPO, config_for, read_split, synthetic_records, write_dataset

BACKENDS = ('sift', 'delf')


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Records of 6 landmarks in 3 train shards, a 1-epoch classifier and a DELF run on it."""
  root = tmp_path_factory.mktemp('index_world')
  synthetic_records(root, num_landmarks=6, num_train_images=60, examples_per_shard=16)

  def run(name, **overrides):
    settings = dict(records_dir=str(root / 'records'), workdir=str(root / name), backbone='tiny',
                    weights='none', head='softmax', batch_size=16, epochs=1, steps_per_epoch=2,
                    optimizer='adam', learning_rate=0.003, progress=False)
    settings.update(overrides)
    train.train(train.TrainConfig(**settings), data.InputConfig(image_size=64))
    return str(root / name)

  classifier = run('classifier')
  delf = run('delf', mode=train.Mode.DELF, weights='', init_from=classifier)
  return {'root': root, 'records': str(root / 'records'), 'classifier': classifier, 'delf': delf}


def _config(world, backend, output_dir, **overrides):
  settings = dict(run=world['classifier'], local_features=backend, output_dir=str(output_dir),
                  progress=False)
  if backend == 'delf':
    # Three scales instead of seven keep the test quick; 16 of the tiny backbone's 64 channels.
    settings.update(delf_run=world['delf'], delf_scales='0.5,1,2', pca_dim=16, pca_whiten=True)
  settings.update(overrides)
  return index_builder.IndexConfig(**settings)


@pytest.fixture(scope='module')
def built(world):
  """One finished index per backend: backend → its folder."""
  folders = {}
  for backend in BACKENDS:
    folders[backend] = str(world['root'] / f'index_{backend}')
    index_builder.build_index(_config(world, backend, folders[backend]))
  return folders


@pytest.fixture(scope='module')
def train_images(world):
  """The records' train split: image id → parsed example, with the decoded stored image."""
  return read_split(world['records'], 'train')


@pytest.mark.parametrize('backend', BACKENDS)
def test_every_train_image_is_indexed_once_with_its_landmark(built, train_images, backend):
  opened = indexes.load(built[backend])
  rows = range(opened.num_images)
  indexed = [opened.image_id(row) for row in rows]
  assert sorted(indexed) == sorted(train_images)  # Every train image, once.
  for row, image_id in zip(rows, indexed):
    assert opened.landmark_of(row) == train_images[image_id]['landmark_id']
  landmarks = [opened.landmark_of(row) for row in rows]
  assert landmarks == sorted(landmarks)  # A landmark's images are contiguous.
  metadata = opened.metadata
  assert metadata['local']['backend'] == backend and metadata['counts']['shards'] == 3
  assert metadata['local']['descriptor_dim'] == (16 if backend == 'delf' else 128)
  assert metadata['counts']['features'] == sum(len(opened.local_features(row)) for row in rows)


@pytest.mark.parametrize('backend', BACKENDS)
def test_local_features_read_back_equal_a_fresh_extraction(built, train_images, backend):
  opened = indexes.load(built[backend])
  extract = opened.local_extractor()
  for row in (0, opened.num_images // 2, opened.num_images - 1):
    stored = train_images[opened.image_id(row)]['pixels']
    fresh, read = extract(stored), opened.local_features(row)
    assert len(read) == len(fresh) > 10
    np.testing.assert_array_equal(read.locations, fresh.locations)
    np.testing.assert_array_equal(read.scores, fresh.scores)
    np.testing.assert_array_equal(read.scales, fresh.scales)
    # Stored as float16: within its rounding, and unit length again.
    np.testing.assert_allclose(read.descriptors, fresh.descriptors, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(read.descriptors, axis=1), 1.0, rtol=1e-5)
    # Locations are pixels of the stored image (long side 96), not of the 128-px original.
    height, width = stored.shape[:2]
    assert max(height, width) == 96
    assert np.all(read.locations >= -0.5)
    assert np.all(read.locations < [width, height])
  if backend == 'delf':
    assert opened.pca().dim == 16 and opened.pca().whiten


def test_images_of_returns_the_landmarks_images(built, train_images):
  opened = indexes.load(built['sift'])
  landmarks = {int(example['landmark_id']) for example in train_images.values()}
  assert set(opened.landmark_ids.tolist()) == landmarks
  for landmark in landmarks:
    expected = {image_id for image_id, example in train_images.items()
                if example['landmark_id'] == landmark}
    rows = opened.images_of(landmark)
    assert {opened.image_id(row) for row in rows} == expected
    assert np.all(np.diff(rows) == 1)
  assert opened.images_of(max(landmarks) + 1).size == 0


def test_global_descriptors_are_the_classifiers_of_the_evaluation_crop(world, built):
  import keras  # pylint: disable=g-import-not-at-top
  opened = indexes.load(built['sift'])
  model = keras.saving.load_model(os.path.join(world['classifier'], 'model.keras'))
  fresh = {}
  for images, _, ids in data.make_dataset(world['records'], 'train', training=False,
                                          batch_size=32, config=data.InputConfig(image_size=64),
                                          backbone=None, with_ids=True):
    fresh.update(zip((i.decode() for i in ids.numpy()), model.embed(images).numpy()))
  for row in range(opened.num_images):
    np.testing.assert_allclose(opened.global_descriptors[row], fresh[opened.image_id(row)],
                               atol=1e-5)


@pytest.mark.parametrize('search', ['flat', 'ivf'])
def test_global_search_of_an_index_image_returns_itself_first(world, built, tmp_path, search):
  folder = built['sift']
  if search == 'ivf':  # Over the validation images too.
    folder = str(tmp_path / 'ivf')
    # float32 rows: a float16 IVF's scores are within its rounding of 1, not within 1e-5.
    index_builder.build_index(_config(world, 'sift', folder, max_features=20, global_search='ivf',
                              ivf_storage='float32', split='train+validation'))
  opened = indexes.load(folder)
  assert opened.metadata['global']['search']['kind'] == search
  splits = ['train', 'validation'] if search == 'ivf' else ['train']
  assert opened.metadata['splits'] == splits
  assert opened.num_images == sum(len(read_split(world['records'], split)) for split in splits)
  scores, rows = opened.global_search(opened.global_descriptors, k=3)
  assert rows.shape == scores.shape == (opened.num_images, 3)
  np.testing.assert_array_equal(rows[:, 0], np.arange(opened.num_images))
  np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
  assert np.all(scores[:, 0] >= scores[:, 1])
  one_scores, one_rows = opened.global_search(opened.global_descriptors[5] * 7.0, k=1)
  assert one_rows.tolist() == [[5]] and one_scores[0, 0] == pytest.approx(1.0, rel=1e-5)


def test_auto_global_search_builds_ivf_only_above_the_measured_row_count(world, tmp_path,
                                                                         monkeypatch):
  limit = index_builder.AUTO_IVF_ROWS
  assert index_builder.global_search_kind('auto', limit) == 'flat'
  assert index_builder.global_search_kind('auto', limit + 1) == 'ivf'
  # An explicit choice is kept whatever the size.
  assert index_builder.global_search_kind('flat', 100 * limit) == 'flat'
  assert index_builder.global_search_kind('ivf', 100) == 'ivf'
  assert index_builder.IndexConfig.global_search == 'auto'
  # The whole build with the limit just below its image count: an IVF of float16 rows that
  # finds every image first, within float16's rounding (the default build, at the limit, is flat).
  images = len(read_split(world['records'], 'train'))
  monkeypatch.setattr(index_builder, 'AUTO_IVF_ROWS', images - 1)
  folder = str(tmp_path / 'auto')
  index_builder.build_index(_config(world, 'sift', folder, max_features=20))
  opened = indexes.load(folder)
  assert opened.num_images == images
  search = opened.metadata['global']['search']
  assert search == {'kind': 'ivf', 'nlist': 1, 'nprobe': 1, 'storage': 'float16'}
  scores, rows = opened.global_search(opened.global_descriptors, k=2)
  np.testing.assert_array_equal(rows[:, 0], np.arange(images))
  np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)


def _clustered(rng, rows, dim, centres):
  """L2-normalised rows around `centres` cluster centres, which are grouped in turn (as the
  global descriptors of similar-looking landmarks are): bench_global_search.py's mixture."""
  def unit(array):
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)
  groups = unit(rng.standard_normal((centres // 20, dim)))
  middles = unit(groups[rng.integers(len(groups), size=centres)] +
                 rng.standard_normal((centres, dim)) / np.sqrt(dim))
  return unit(middles[rng.integers(centres, size=rows)] +
              rng.standard_normal((rows, dim)) / np.sqrt(dim))


def test_the_ivf_of_the_auto_rule_finds_95_percent_of_the_exact_top_100():
  import faiss  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  # Just above the size where auto starts building IVFs: the smallest IVF it builds.
  rows, dim = index_builder.AUTO_IVF_ROWS + 1000, 64
  # The queries are further draws of the same mixture, not index rows.
  descriptors, queries = np.split(_clustered(rng, rows + 100, dim, rows // 20), [rows])
  descriptors = np.ascontiguousarray(descriptors)
  flat = faiss.IndexFlatIP(dim)
  flat.add(descriptors)
  truth = flat.search(queries, 100)[1]
  cells = index_builder.ivf_cells(rows)
  ivf = index_builder.build_global_ivf(descriptors, cells, 'float16')
  ivf.nprobe = index_builder.ivf_probes(rows, cells)
  found = ivf.search(queries, 100)[1]
  recall = np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(found, truth)])
  assert recall >= 0.95


def test_a_single_query_searches_on_the_measured_thread_count(built):
  import faiss  # pylint: disable=g-import-not-at-top
  opened = indexes.load(built['sift'])

  class Recorder:
    """The index's faiss search, recording faiss's thread count at each call."""

    def __init__(self, search):
      self.search_index, self.threads = search, []

    def search(self, queries, k):
      self.threads.append(faiss.omp_get_max_threads())
      return self.search_index.search(queries, k)

  recorder = Recorder(opened._search_index())  # pylint: disable=protected-access
  opened._search = recorder  # pylint: disable=protected-access
  previous = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(2)
  try:
    opened.global_search(opened.global_descriptors[0], k=3)
    opened.global_search(opened.global_descriptors[:4], k=3)
    assert recorder.threads == [indexes.SINGLE_QUERY_THREADS, 2]
    assert faiss.omp_get_max_threads() == 2  # Restored after the single query.
  finally:
    faiss.omp_set_num_threads(previous)


def test_threads_searching_a_fresh_index_at_once_all_see_the_whole_index(built, monkeypatch):
  # tfl-predict and tfl-serve search one Index from several threads; the first search fills the
  # faiss index. Filled a row at a time here, so that a thread searching the half-filled index
  # (the bug) finds too few rows.
  monkeypatch.setattr(indexes, '_GLOBAL_CHUNK', 1)
  expected = indexes.load(built['sift']).global_search(
      indexes.load(built['sift']).global_descriptors, k=3)
  opened = indexes.load(built['sift'])
  queries = np.array(opened.global_descriptors)
  start = threading.Barrier(8)

  def search(_):
    start.wait()
    return opened.global_search(queries, k=3)

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    results = list(pool.map(search, range(8)))
  for scores, rows in results:
    np.testing.assert_array_equal(rows, expected[1])
    np.testing.assert_array_equal(scores, expected[0])


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'tf_landmarks.cli.build_index', *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def test_resume_after_an_interruption_redoes_only_the_missing_shard(world, built, tmp_path):
  folder = tmp_path / 'interrupted'
  shutil.copytree(built['sift'], folder)
  shards = folder / 'shards'
  last = sorted(shards.glob('train-00002.*'))
  assert len(last) == 4
  for path in last + [folder / 'index.json']:
    path.unlink()
  (shards / 'train-00002.descriptors.npy.part').write_bytes(b'half a shard')
  kept = {path: path.stat().st_mtime_ns for path in shards.iterdir() if 'train-00002' not in
          path.name}
  with pytest.raises(indexes.LandmarkIndexError, match='unfinished index'):
    indexes.load(str(folder))  # A half-written index is never taken for a finished one.
  with pytest.raises(indexes.LandmarkIndexError, match='pass --resume'):
    index_builder.build_index(_config(world, 'sift', folder))
  with pytest.raises(indexes.LandmarkIndexError, match=r'other runs or settings \(max_features\)'):
    index_builder.build_index(_config(world, 'sift', folder, max_features=50, resume=True))

  result = _cli(f'--run={world["classifier"]}', '--local_features=sift', f'--output_dir={folder}',
                '--resume')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming: 2 of 3 shards already done' in result.stdout
  assert {path: path.stat().st_mtime_ns for path in kept} == kept  # Finished shards untouched.
  assert sorted(path.name for path in shards.glob('train-00002.*')) == [p.name for p in last]
  assert not list(shards.glob('*.part*'))
  original, resumed = indexes.load(built['sift']), indexes.load(str(folder))
  for name in ('images.npy', 'global.npy'):
    np.testing.assert_array_equal(np.load(folder / name), np.load(os.path.join(built['sift'],
                                                                               name)))
  assert resumed.metadata['counts'] == original.metadata['counts']
  row = resumed.num_images - 1
  np.testing.assert_array_equal(resumed.local_features(row).descriptors,
                                original.local_features(row).descriptors)
  with pytest.raises(indexes.LandmarkIndexError, match='holds a finished index'):
    index_builder.build_index(_config(world, 'sift', folder))


def test_resume_of_a_finished_index_does_nothing_and_says_so(world, built, tmp_path):
  folder = tmp_path / 'finished'
  shutil.copytree(built['sift'], folder)
  before = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in folder.rglob('*')
            if path.is_file()}
  result = _cli(f'--run={world["classifier"]}', '--local_features=sift', f'--output_dir={folder}',
                '--resume')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == [
      f'{folder} holds a finished index: nothing to resume, left as it is'], result.stdout
  assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in folder.rglob('*')
          if path.is_file()} == before


def _one_line_error(result) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  return lines[0]


def test_missing_and_corrupt_runs_are_one_line_errors_through_the_cli(world, tmp_path):
  line = _one_line_error(_cli(f'--run={tmp_path / "nowhere"}', '--local_features=sift'))
  assert line.endswith(f'--run={tmp_path / "nowhere"} is not a folder')
  damaged = _copy_with_truncated_model(world['classifier'], tmp_path / 'damaged')
  line = _one_line_error(_cli(f'--run={damaged}', '--local_features=sift',
                              f'--output_dir={tmp_path / "index"}'))
  assert re.search(f'{re.escape(str(damaged / "model.keras"))} has [0-9,]+ bytes, the run '
                   r'recorded [0-9,]+ \(truncated or replaced\); train the run again$', line), line


def _copy_with_truncated_model(run, copy):
  shutil.copytree(run, copy)
  model = (copy / 'model.keras').read_bytes()
  (copy / 'model.keras').write_bytes(model[:len(model) // 2])
  return copy


def test_unusable_runs_and_settings_are_named(world, tmp_path):
  bad_json = tmp_path / 'bad_json'
  shutil.copytree(world['classifier'], bad_json)
  (bad_json / 'run.json').write_text('{"format": ')
  damaged_delf = _copy_with_truncated_model(world['delf'], tmp_path / 'damaged_delf')
  delf = dict(local_features='delf', delf_run=world['delf'])
  cases = [
      (dict(run=str(bad_json)), 'run.json is not valid JSON'),
      (dict(run=world['delf']), 'is a DELF run; --run takes a classifier run'),
      (dict(local_features='delf'), '--local_features=delf needs --delf_run'),
      (dict(delf_run=world['delf']), '--delf_run belongs to --local_features=delf'),
      (dict(delf, delf_run=world['classifier']), 'is a scratch run, not a DELF run'),
      (dict(delf, delf_run=str(damaged_delf)), 'damaged_delf/model.keras has [0-9,]+ bytes, the run recorded'),
      (dict(delf, pca_dim=65), '--pca_dim=65 is more than the 64 dimensions'),
      (dict(delf, delf_scales='1,two'), '--delf_scales must be one or more positive numbers'),
      (dict(max_features=0), '--max_features must be >= 1, got 0'),
  ]
  for overrides, message in cases:
    settings = dict(run=world['classifier'], local_features='sift',
                    output_dir=str(tmp_path / 'index'), progress=False)
    settings.update(overrides)
    with pytest.raises(errors.UserError, match=message):
      index_builder.build_index(index_builder.IndexConfig(**settings))
  assert not (tmp_path / 'index').exists()  # Each was refused before anything was written.
  with pytest.raises(indexes.LandmarkIndexError, match='is not an index'):
    indexes.load(str(tmp_path))


def test_help_lists_the_commands_flags():
  # As the console script runs it: the module imported by name, then run().
  result = subprocess.run(
      [sys.executable, '-c', 'import sys; sys.argv[0] = "tfl-build-index"; '
       'from tf_landmarks.cli import build_index; build_index.run()', '--help'],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith('tfl-build-index: the retrieval and verification index')
  for flag in ('--run', '--local_features', '--delf_run', '--output_dir', '--pca_dim',
               '--resume', '--overwrite'):
    assert f'  {flag}:' in result.stdout or f'  --[no]{flag[2:]}:' in result.stdout, flag


def _damaged_copy(built, tmp_path, name='damaged'):
  copy = tmp_path / name
  shutil.copytree(built['sift'], copy)
  indexes.load(str(copy))  # Verified once: later loads hash only files changed since.
  return copy


def _nan_filled(path):
  """Overwrites an .npy file's values with NaN, its size and header unchanged."""
  array = np.load(path)
  np.save(path, np.full_like(array, np.nan))


@pytest.mark.parametrize('damage', ['truncated', 'flipped byte', 'NaN-filled'])
def test_a_damaged_file_is_refused_in_one_line_naming_it(built, tmp_path, damage):
  copy = _damaged_copy(built, tmp_path)
  shard = copy / 'shards' / 'train-00001.descriptors.npy'
  content = shard.read_bytes()
  if damage == 'truncated':
    shard.write_bytes(content[:len(content) // 2])
  elif damage == 'flipped byte':
    shard.write_bytes(content[:-7] + bytes([content[-7] ^ 1]) + content[-6:])
  else:
    _nan_filled(shard)
  with pytest.raises(indexes.LandmarkIndexError) as raised:
    indexes.load(str(copy))
  message = str(raised.value)
  assert str(shard) in message and '\n' not in message, message
  assert message.endswith('rebuild it with tfl-build-index --overwrite')


def test_verify_hashes_files_whose_size_and_time_look_unchanged(built, tmp_path):
  copy = _damaged_copy(built, tmp_path)
  table = copy / 'global.npy'
  stat = table.stat()
  content = table.read_bytes()
  table.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
  os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  indexes.load(str(copy))  # Sizes only: the stamp says the folder was verified as it looks.
  with pytest.raises(indexes.LandmarkIndexError, match=f'{table} is not the file the index'):
    indexes.load(str(copy), verify=True)


def test_an_index_of_the_previous_format_is_read_unverified(built, tmp_path):
  copy = tmp_path / 'v1'
  shutil.copytree(built['sift'], copy)
  description = json.loads((copy / 'index.json').read_text())
  description['format'] = indexes.PREVIOUS_FORMAT
  del description['checksums']
  (copy / 'index.json').write_text(json.dumps(description))
  (copy / 'record_offsets.npy').unlink()
  original, previous = indexes.load(built['sift']), indexes.load(str(copy), verify=True)
  assert original.has_checksums and not previous.has_checksums
  assert previous.counts == original.counts and previous.local == original.local
  np.testing.assert_array_equal(previous.local_features(3).descriptors,
                                original.local_features(3).descriptors)
  with pytest.raises(indexes.LandmarkIndexError, match='previous format'):
    previous.stored_image(previous.image_id(0))
  _nan_filled(copy / 'global.npy')
  indexes.load(str(copy))  # Unverified: nothing recorded to compare with.
  with pytest.raises(indexes.LandmarkIndexError,
                     match=f'{copy / "global.npy"} holds NaN or infinite values'):
    indexes.load(str(copy), verify=True)


def test_stored_image_reads_the_records_image_by_id(built, train_images):
  opened = indexes.load(built['sift'])
  for row in range(opened.num_images):
    image_id = opened.image_id(row)
    assert opened.stored_image(image_id) == train_images[image_id][schema.ENCODED]
  with pytest.raises(KeyError, match='not-an-image is not in the index'):
    opened.stored_image('not-an-image')


def test_an_image_stored_in_train_and_validation_is_indexed_once(world, tmp_path):
  # Six landmarks, as the run was trained on; landmark 105 has one image, which
  # --singletons=duplicate stores in train and, distorted, in validation under the same id.
  rows = [(f'img{i:02d}', 100 + i % 5) for i in range(20)] + [('single', 105)]
  write_dataset(tmp_path, rows)
  ingest.build_records(config_for(tmp_path, singletons='duplicate', validation_fraction=0.2))
  train_ids = set(read_split(tmp_path / 'records', 'train'))
  validation_ids = set(read_split(tmp_path / 'records', 'validation'))
  assert 'single' in train_ids & validation_ids
  run = tmp_path / 'run'  # The classifier, as if trained on these records.
  shutil.copytree(world['classifier'], run)
  metadata = json.loads((run / 'run.json').read_text())
  (run / 'run.json').write_text(json.dumps({**metadata, 'records_dir': str(tmp_path / 'records')}))
  folder = tmp_path / 'index'
  index_builder.build_index(index_builder.IndexConfig(
      run=str(run), local_features='sift', split='train+validation', max_features=20,
      output_dir=str(folder), progress=False))
  opened = indexes.load(str(folder))
  indexed = [opened.image_id(row) for row in range(opened.num_images)]
  assert sorted(indexed) == sorted(train_ids | validation_ids)  # Each image once.
  assert opened.counts.images == len(indexed)
  row = indexed.index('single')
  assert opened.landmark_of(row) == 105 and list(opened.images_of(105)) == [row]
  # The first occurrence, train's: its features are those of the undistorted image.
  shard = opened.metadata['shards'][int(np.load(folder / 'images.npy')['shard'][row])]
  assert shard['name'].startswith('train-')
  train_image = read_split(tmp_path / 'records', 'train')['single']
  assert opened.stored_image('single') == train_image[schema.ENCODED]
  assert opened.counts.features == sum(len(opened.local_features(r)) for r in range(len(indexed)))


def test_a_folder_another_build_is_writing_is_refused(world, built, tmp_path):
  folder = tmp_path / 'locked'
  folder.mkdir()
  with files.exclusive_writer(str(folder), 'tfl-build-index', RuntimeError):
    with pytest.raises(indexes.LandmarkIndexError,
                       match=f'another tfl-build-index is writing to {folder}'):
      index_builder.build_index(_config(world, 'sift', folder, max_features=20))
  assert os.listdir(folder) == ['.lock']  # Nothing written.
  # Released: --overwrite of a finished index keeps the lock file and rebuilds.
  shutil.rmtree(folder)
  shutil.copytree(built['sift'], folder)
  index_builder.build_index(_config(world, 'sift', folder, max_features=20, overwrite=True))
  assert indexes.load(str(folder)).local.max_features == 20


def test_non_finite_features_are_refused_before_checksums_vouch_for_them(world, tmp_path,
                                                                        monkeypatch):
  sift = index_builder.extractor_lib.make_local_extractor('sift', max_features=20)

  def diverged(*args, **kwargs):
    del args, kwargs
    def extract(image):
      features = sift(image)
      return dataclasses.replace(features, descriptors=np.full_like(features.descriptors, np.nan))
    return extract

  monkeypatch.setattr(index_builder.extractor_lib, 'make_local_extractor', diverged)
  folder = tmp_path / 'nan'
  with pytest.raises(indexes.LandmarkIndexError,
                     match=r'the sift features of images of .*train-00000-of-00003 hold NaN'):
    index_builder.build_index(_config(world, 'sift', folder, max_features=20))
  assert not (folder / 'index.json').exists()
  assert not list((folder / 'shards').iterdir())
