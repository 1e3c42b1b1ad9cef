"""The run folder's owner: `runs.load` checks a run before any stage uses it."""

import json

import pytest

from tf_landmarks import runs


def _write_run(folder, **fields):
  folder.mkdir(parents=True, exist_ok=True)
  run = {'format': runs.FORMAT, 'mode': 'finetune', 'backbone': 'tiny', 'image_size': 64,
         'records_dir': '/records', 'num_classes': 3, **fields}
  (folder / runs.RUN_JSON).write_text(json.dumps(run))
  return folder


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
