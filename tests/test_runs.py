"""The run folder's owner: `runs.load` checks a run before any stage uses it."""

import json
import os

import pytest

from tf_landmarks import files
from tf_landmarks import records
from tf_landmarks import runs

_FIELDS = {'mode': 'finetune', 'backbone': 'tiny', 'image_size': 64, 'records_dir': '/records',
           'num_classes': 3}


def _save_bytes(data):
  def save(path):
    with open(path, 'wb') as f:
      f.write(data)
  return save


def _write_run(folder, **fields):
  """A run written by `runs.write`, with small stand-in files for the model's."""
  folder.mkdir(parents=True, exist_ok=True)
  records_dir = folder.parent / f'{folder.name}-records'
  records_dir.mkdir(exist_ok=True)
  records.write_label_map(str(records_dir), [(0, 1000, 5), (1, 1001, 4), (2, 1002, 3)])
  runs.write(str(folder), {**_FIELDS, **fields},
             [(runs.MODEL_FILE, _save_bytes(b'model' * 100)),
              (runs.BACKBONE_WEIGHTS, _save_bytes(b'backbone' * 100)),
              (runs.HEAD_WEIGHTS, _save_bytes(b'head' * 100))], str(records_dir))
  return folder


def _flip_byte(path, keep_time=False):
  """Changes one byte in the middle of the file, its size unchanged."""
  stat = os.stat(path)
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))
  if keep_time:  # As a copy that preserves times, or a bit rot, would.
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_damaged_run_json_is_a_clear_error(tmp_path):
  (tmp_path / 'run.json').write_text('{"format": "tf-landmarks run v1"')  # Cut short.
  with pytest.raises(runs.RunError, match='run.json is not valid JSON'):
    runs.load(str(tmp_path))
  (tmp_path / 'run.json').write_text('{"format": "something else"}')
  with pytest.raises(runs.RunError, match="is not a run this version reads .*'something else'"):
    runs.load(str(tmp_path))


def test_load_types_the_fields_every_reader_needs(tmp_path):
  run = runs.load(str(_write_run(tmp_path / 'run')), 'init_from')
  assert (run.mode, run.backbone, run.image_size, run.num_classes, run.records_dir) == (
      runs.Mode.FINETUNE, 'tiny', 64, 3, '/records')
  assert not run.is_delf


@pytest.mark.parametrize('change, message', [
    (dict(image_size='64'), 'incomplete or damaged'),
    (dict(num_classes=None), 'incomplete or damaged'),
    (dict(mode='sideways'), "unknown mode 'sideways'"),
])
def test_load_refuses_a_run_json_with_bad_fields(tmp_path, change, message):
  with pytest.raises(runs.RunError, match=message):
    runs.load(str(_write_run(tmp_path / 'run', **change)))


def test_load_names_the_flag_of_a_folder_that_is_no_run(tmp_path):
  with pytest.raises(runs.RunError, match=r'--delf_run=\S+ is not a folder'):
    runs.load(str(tmp_path / 'missing'), 'delf_run')
  with pytest.raises(runs.RunError, match=r'--init_from=\S+ is not a finished training run'):
    runs.load(str(tmp_path), 'init_from')


def test_stage_specific_loads_refuse_the_other_kind_of_run(tmp_path):
  delf = _write_run(tmp_path / 'delf', mode='delf', delf={'stage': 'attention'})
  classifier = _write_run(tmp_path / 'classifier')
  untrained = _write_run(tmp_path / 'descriptor', mode='delf', delf={'stage': 'descriptor'})
  with pytest.raises(runs.RunError, match='is a DELF run; --run takes a classifier run'):
    runs.load_classifier_run(str(delf))
  with pytest.raises(runs.RunError, match='is a finetune run, not a DELF run'):
    runs.load_delf_run(str(classifier))
  with pytest.raises(runs.RunError, match='descriptor stage run: its attention is untrained'):
    runs.load_delf_run(str(untrained))
  assert runs.load_delf_run(str(delf)).is_delf


def test_write_records_every_file_and_ends_with_run_json(tmp_path):
  folder = _write_run(tmp_path / 'run')
  written = json.loads((folder / runs.RUN_JSON).read_text())
  assert written['format'] == runs.FORMAT == 'tf-landmarks run v2'
  assert written['status'] == runs.COMPLETE
  assert set(written['files']) == {runs.MODEL_FILE, runs.BACKBONE_WEIGHTS, runs.HEAD_WEIGHTS,
                                   runs.LABEL_MAP}
  assert written['files'][runs.HEAD_WEIGHTS]['bytes'] == 400
  assert runs.load(str(folder)).landmark_ids() == (1000, 1001, 1002)

  def fail(path):
    raise OSError('disk full (test)')

  (tmp_path / 'half').mkdir()
  with pytest.raises(OSError, match='disk full'):
    runs.write(str(tmp_path / 'half'), _FIELDS, [(runs.MODEL_FILE, _save_bytes(b'model')),
                                                 (runs.BACKBONE_WEIGHTS, fail)],
               str(tmp_path / 'run-records'))
  assert not runs.is_finished(str(tmp_path / 'half'))  # run.json comes last.


@pytest.mark.parametrize('name', [runs.BACKBONE_WEIGHTS, runs.HEAD_WEIGHTS])
def test_load_names_a_file_whose_bytes_changed(tmp_path, name):
  folder = _write_run(tmp_path / 'run')
  _flip_byte(folder / name)
  with pytest.raises(runs.RunError, match=f'{folder / name} is not the file the run was written '
                     r'with \(its SHA-256 differs\); train the run again'):
    runs.load(str(folder), 'init_from')


def test_load_checks_sizes_always_and_digests_when_asked(tmp_path):
  folder = _write_run(tmp_path / 'run')
  assert (folder / files.VERIFIED_STAMP).exists()  # The write's digests spare the first load's.
  _flip_byte(folder / runs.HEAD_WEIGHTS, keep_time=True)
  runs.load(str(folder))  # Same sizes and times as when last checked: not hashed.
  with pytest.raises(runs.RunError, match='head.weights.npz is not the file the run was written'):
    runs.load(str(folder), verify=True)
  with open(folder / runs.MODEL_FILE, 'ab') as f:
    f.write(b'more')
  with pytest.raises(runs.RunError, match=r'model.keras has 504 bytes, the run recorded 500'):
    runs.load(str(folder))
  (folder / runs.LABEL_MAP).unlink()
  with pytest.raises(runs.RunError, match='label_map.csv is missing from the run'):
    runs.load(str(folder))


def test_a_v1_run_is_read_without_checking_its_files(tmp_path):
  folder = tmp_path / 'old'
  folder.mkdir()
  (folder / runs.RUN_JSON).write_text(json.dumps({'format': 'tf-landmarks run v1', **_FIELDS}))
  run = runs.load(str(folder), 'init_from')  # No files at all: v1 recorded none.
  assert (run.mode, run.num_classes) == (runs.Mode.FINETUNE, 3)


def test_a_failed_run_is_recorded_and_never_used(tmp_path):
  folder = tmp_path / 'diverged'
  folder.mkdir()
  written = runs.write_failed(str(folder), _FIELDS, 'the loss became NaN at step 7\n(lr 10)')
  assert written['status'] == runs.FAILED
  assert json.loads((folder / runs.RUN_JSON).read_text())['failure'] == (
      'the loss became NaN at step 7 (lr 10)')
  assert runs.failure_of(str(folder)) == 'the loss became NaN at step 7 (lr 10)'
  assert runs.failure_of(str(_write_run(tmp_path / 'good'))) is None
  with pytest.raises(runs.RunError, match=r'diverged is a failed run \(the loss became NaN at '
                     r'step 7 \(lr 10\)\); it cannot be used as --init_from$'):
    runs.load(str(folder), 'init_from')
