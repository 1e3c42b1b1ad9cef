"""tfl-inspect-records: a finished build passes and shows a batch; broken builds fail with a message."""

import subprocess
import sys

import pytest

from tf_landmarks import ingest
from conftest import REPO
from test_ingest import GOOD_ROWS, config_for, write_dataset


@pytest.fixture(scope='module')
def build(tmp_path_factory):
  root = tmp_path_factory.mktemp('inspect')
  write_dataset(root, GOOD_ROWS)
  ingest.build_records(config_for(root))
  return root / 'records'


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
