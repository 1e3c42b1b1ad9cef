"""The index build on Apache Beam: the local build's files byte for byte, retries, one-line errors.

Runners as in test_ingest_beam.py: the FnApiRunner (what `--runner=DirectRunner` runs), with
`--direct_num_workers=2 --direct_running_mode=multi_processing` for worker processes that load the
models themselves, and the BundleBasedDirectRunner, which retries a failed bundle, for the retry
test.
"""

import importlib.util
import json
import os
import pathlib
import sys

import numpy as np
import pytest

import tf_landmarks
from tf_landmarks import data
from tf_landmarks import files
from tf_landmarks import index_builder
from tf_landmarks import indexes
from tf_landmarks import train
from helpers import synthetic_records

requires_beam = pytest.mark.skipif(
    importlib.util.find_spec('apache_beam') is None,
    reason="apache_beam is not installed (pip install 'tf-landmarks[beam]')")

_TWO_WORKERS = ['--runner=DirectRunner', '--direct_num_workers=2',
                '--direct_running_mode=multi_processing']


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  """Records of 6 landmarks in 4 train and validation shards, a 1-epoch classifier and a DELF run
  on it, and the local build of their DELF index."""
  root = tmp_path_factory.mktemp('index_beam_world')
  synthetic_records(root, num_landmarks=6, num_train_images=40, examples_per_shard=12)

  def run(name, **overrides):
    settings = dict(records_dir=str(root / 'records'), workdir=str(root / name), backbone='tiny',
                    weights='none', head='softmax', batch_size=16, epochs=1, steps_per_epoch=2,
                    optimizer='adam', learning_rate=0.003, progress=False)
    settings.update(overrides)
    train.train(train.TrainConfig(**settings), data.InputConfig(image_size=64))
    return str(root / name)

  classifier = run('classifier')
  world = {'root': root, 'classifier': classifier,
           'delf': run('delf', mode=train.Mode.DELF, weights='', init_from=classifier)}
  world['local'] = str(root / 'local')
  index_builder.build_index(_config(world, world['local']))
  return world


def _config(world, output_dir, **overrides) -> index_builder.IndexConfig:
  # Three DELF scales and a 16-d PCA keep it quick; batches of 5 split each shard's global pass.
  settings = dict(run=world['classifier'], local_features='delf', delf_run=world['delf'],
                  delf_scales='0.5,1,2', pca_dim=16, split='train+validation', batch_size=5,
                  output_dir=str(output_dir), progress=False)
  settings.update(overrides)
  return index_builder.IndexConfig(**settings)


def _assert_same_index(local_dir, beam_dir, other_settings=()):
  """Every file byte for byte; index.json but for its creation time, the output folder and the
  runner's settings (and `other_settings`, which the Beam build was given differently)."""
  local, beam = pathlib.Path(local_dir), pathlib.Path(beam_dir)

  def listing(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob('*')
                  if path.is_file() and path.name != files.LOCK_FILE)

  assert listing(beam) == listing(local)
  assert len([name for name in listing(local) if name.startswith(indexes.SHARDS_DIR)]) == 4 * 4
  for name in listing(local):
    if name != indexes.INDEX_JSON:
      assert (beam / name).read_bytes() == (local / name).read_bytes(), name
  local_description, beam_description = (json.loads((folder / indexes.INDEX_JSON).read_text())
                                          for folder in (local, beam))
  for description in (local_description, beam_description):
    del description['created'], description['settings']['output_dir']
    for name in other_settings:
      del description['settings'][name]
  assert beam_description['settings'].pop('runner') == 'beam'
  beam_description['settings'].pop('beam_pipeline_options')
  assert local_description['settings'].pop('runner') == 'local'
  assert local_description['settings'].pop('beam_pipeline_options') is None
  assert beam_description == local_description
  indexes.load(str(beam), verify=True)


def _image_ids(index_dir):
  return list(np.load(os.path.join(index_dir, indexes.TABLE_FILE))['image_id'])


@requires_beam
@pytest.mark.slow
def test_two_worker_processes_write_the_local_index(world):
  """DirectRunner with 2 worker processes (~23 s: each imports TensorFlow and Beam and loads the
  models); the other tests run the same pipeline in this process."""
  beam_dir = world['root'] / 'beam'
  built = index_builder.build_index(_config(world, beam_dir, runner='beam',
                                            beam_pipeline_options=_TWO_WORKERS))
  _assert_same_index(world['local'], beam_dir)
  assert built['counts']['shards'] == 4 and built['settings']['runner'] == 'beam'


@requires_beam
def test_a_retried_bundle_neither_duplicates_nor_drops_images(world, tmp_path, monkeypatch):
  """BundleBasedDirectRunner retries failed bundles: one shard fails before its images file is
  written, another after it is renamed into place."""
  beam_dir = tmp_path / 'beam'
  markers = tmp_path / 'attempted'
  markers.mkdir()
  real_save = index_builder._save_npz

  def fail_first_attempt(name):
    if not (markers / name).exists():
      (markers / name).touch()
      raise RuntimeError(f'worker lost while writing {name} (first attempt)')

  def flaky_save(path, **arrays):
    name = os.path.basename(path)
    if name.startswith('train-00001'):
      fail_first_attempt(f'before-{name}')
    real_save(path, **arrays)
    if name.startswith('validation-00000'):
      fail_first_attempt(f'after-{name}')

  monkeypatch.setattr(index_builder, '_save_npz', flaky_save)
  index_builder.build_index(_config(world, beam_dir, runner='beam',
                                    beam_pipeline_options=['--runner=BundleBasedDirectRunner']))
  assert sorted(path.name for path in markers.iterdir()) == [
      'after-validation-00000.images.npz', 'before-train-00001.images.npz']
  _assert_same_index(world['local'], beam_dir)
  ids = _image_ids(beam_dir)
  assert len(set(ids)) == len(ids) and ids == _image_ids(world['local'])


@requires_beam
def test_a_failed_pipeline_is_one_line_and_resume_finishes_the_same_index(world, tmp_path,
                                                                         monkeypatch):
  """The FnApiRunner does not retry a bundle: the build stops, --resume ends it."""
  beam_dir = tmp_path / 'beam'
  real_build = index_builder.ShardBuilder.build_unit

  def failing(builder, unit, bar=None):
    if unit.name == 'train-00002':
      raise RuntimeError('worker lost')
    real_build(builder, unit, bar)

  monkeypatch.setattr(index_builder.ShardBuilder, 'build_unit', failing)
  with pytest.raises(indexes.LandmarkIndexError,
                     match=r'^the Beam pipeline failed: .*worker lost.*rerun with --resume$'):
    index_builder.build_index(_config(world, beam_dir, runner='beam'))
  assert not (beam_dir / indexes.INDEX_JSON).exists()
  monkeypatch.undo()
  index_builder.build_index(_config(world, beam_dir, runner='beam', resume=True))
  _assert_same_index(world['local'], beam_dir, other_settings=['resume'])


def test_runner_beam_without_apache_beam_is_a_one_line_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'apache_beam', None)  # Makes `import apache_beam` fail.
  # As if never imported: `from tf_landmarks import index_beam` finds the package attribute first.
  monkeypatch.delitem(sys.modules, 'tf_landmarks.index_beam', raising=False)
  monkeypatch.delattr(tf_landmarks, 'index_beam', raising=False)
  monkeypatch.delitem(sys.modules, 'tf_landmarks.beam_pipelines', raising=False)
  monkeypatch.delattr(tf_landmarks, 'beam_pipelines', raising=False)
  run = str(tmp_path / 'no_such_run')  # The error comes before any run is read.
  expected = r"^--runner=beam needs Apache Beam: pip install 'tf-landmarks\[beam\]'$"
  with pytest.raises(indexes.LandmarkIndexError, match=expected):
    index_builder.build_index(index_builder.IndexConfig(run=run, local_features='sift',
                                                        runner='beam'))
  with pytest.raises(indexes.LandmarkIndexError, match='only used with --runner=beam'):
    index_builder.build_index(index_builder.IndexConfig(
        run=run, local_features='sift', beam_pipeline_options=['--runner=DirectRunner']))


@requires_beam
def test_bad_pipeline_options_are_a_one_line_error(world, tmp_path):
  with pytest.raises(indexes.LandmarkIndexError, match='--beam_pipeline_options: Beam rejects'):
    index_builder.build_index(_config(world, tmp_path / 'beam', runner='beam',
                                      beam_pipeline_options=['--direct_num_workers=two']))
