"""Every entry point as a user meets it: --help, and environment failures as one line, then --resume.

The environment faults are real: a full or read-only file system is a tmpfs mounted for the test
(skipped where mounting is not permitted), interruptions are real signals sent to a real build.
"""

import configparser
import contextlib
import fcntl
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from helpers import GOOD_ROWS, REPO, read_split, write_dataset

BIN = pathlib.Path(sys.executable).parent


def _entry_points():
  parser = configparser.ConfigParser()
  parser.read(REPO / 'setup.cfg')
  lines = parser['options.entry_points']['console_scripts'].strip().splitlines()
  return [(line.split('=')[0].strip(), line.split('=')[1].strip().split(':')[0])
          for line in lines]


@pytest.mark.parametrize('command,module', _entry_points())
@pytest.mark.parametrize('how', ['console script', 'python -m'])
def test_help_lists_the_commands_own_flags_first(command, module, how):
  argv = [str(BIN / command)] if how == 'console script' else [sys.executable, '-m', module]
  result = subprocess.run([*argv, '--help'], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'})
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(f'{command}: ')  # The command's own description comes first.
  assert 'Try --helpfull' not in result.stdout
  flags = [line.split(':')[0].strip() for line in result.stdout.splitlines()
           if line.startswith('  --')]
  assert len(flags) >= 5, result.stdout
  assert result.stderr == ''  # No TensorFlow start-up lines before or after.


# One flag per entry point that absl refuses while parsing: a value out of bounds, an unknown flag,
# an unknown choice. Every entry point, `python -m tf_landmarks.cli.evaluate_pairs` included.
_BAD_FLAGS = {'tfl-synth': '--num_landmarks=0', 'tfl-build-records': '--examples_per_shard=0',
              'tfl-inspect-records': '--batch_size=0', 'tfl-train': '--image_size=7',
              'tfl-build-index': '--no_such_flag=1', 'tfl-evaluate': '--report_mistakes=-1',
              'tfl-export': '--top_k=0', 'tfl-predict': '--first_stage=oracle',
              'tfl-serve': '--port=70000',
              'evaluate_pairs': '--max_features=0'}
_ENTRY_POINTS = [*_entry_points(), ('evaluate_pairs', 'tf_landmarks.cli.evaluate_pairs')]


@pytest.fixture(scope='module')
def bad_flag_runs():
  """Every entry point started at once with its bad flag: each costs an import of TensorFlow."""
  processes = {command: subprocess.Popen([sys.executable, '-m', module, _BAD_FLAGS[command]],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command, module in _ENTRY_POINTS}
  yield processes
  for process in processes.values():
    if process.poll() is None:
      process.kill()
      process.communicate()


@pytest.mark.parametrize('command,module', _ENTRY_POINTS)
def test_a_bad_flag_is_a_user_mistake_in_one_line(bad_flag_runs, command, module):
  process = bad_flag_runs[command]
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 2, stderr
  assert 'Traceback' not in stderr
  line = _one_line(subprocess.CompletedProcess(process.args, 2, '', stderr))
  name = _BAD_FLAGS[command].split('=')[0].lstrip('-')
  assert line.startswith(f'{module.rsplit(".", 1)[1]}.py: error: ') and name in line, line


def _build(tmp_path, output_dir, *extra, wait=True, **kwargs):
  command = [str(BIN / 'tfl-build-records'), f'--train_csv={tmp_path / "train.csv"}',
             f'--image_dir={tmp_path / "images"}', f'--output_dir={output_dir}', '--noprogress',
             '--max_image_size=64', '--examples_per_shard=50', *extra]
  if not wait:
    # As from a terminal: the test runner's workers ignore SIGINT, which children would inherit.
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            **kwargs)
  return subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)


def _one_line(result) -> str:
  assert 'Traceback' not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1, result.stderr
  return lines[0]


def test_output_dir_that_is_a_file(tmp_path):
  write_dataset(tmp_path, GOOD_ROWS)
  (tmp_path / 'taken').write_text('x')
  result = _build(tmp_path, tmp_path / 'taken')
  assert result.returncode == 2
  assert 'is a file, not a folder' in _one_line(result)


def test_a_second_build_of_the_same_folder_is_refused_while_one_runs(tmp_path):
  write_dataset(tmp_path, GOOD_ROWS)
  output_dir = tmp_path / 'out'
  output_dir.mkdir()
  with open(output_dir / '.lock', 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # As a running build holds it.
    result = _build(tmp_path, output_dir, '--resume')
  assert result.returncode == 2
  assert 'another tfl-build-records is writing to' in _one_line(result)
  assert _build(tmp_path, output_dir, '--resume').returncode == 0  # The lock died with its holder.


@contextlib.contextmanager
def _tmpfs(path: pathlib.Path, options: str):
  path.mkdir()
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                           capture_output=True, text=True)
  if mounted.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here to make a full or read-only disk '
                f'({mounted.stderr.strip() or "mount failed"})')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], check=False)


def test_read_only_output_folder(tmp_path):
  write_dataset(tmp_path, GOOD_ROWS)
  with _tmpfs(tmp_path / 'ro', 'ro,size=1m') as folder:
    result = _build(tmp_path, folder / 'out')
  assert result.returncode == 1
  assert 'read-only file system' in _one_line(result)


@pytest.fixture(scope='module')
def many_images(tmp_path_factory):
  """1,500 rows whose images take a few seconds to stage: long enough to interrupt for real."""
  root = tmp_path_factory.mktemp('many')
  (root / 'images').mkdir()
  source = root / 'source.png'
  Image.effect_noise((400, 300), 60).convert('RGB').save(source)  # PNG: decoded and re-encoded.
  rows = [(f'img{i:05d}', i % 40) for i in range(1500)]
  for image_id, _ in rows:
    os.link(source, root / 'images' / f'{image_id}.jpg')
  (root / 'train.csv').write_text('id,url,landmark_id\n' +
                                  ''.join(f'{i},u,{label}\n' for i, label in rows))
  reference = root / 'reference'
  assert _build(root, reference).returncode == 0
  return root, reference


def _wait_for_staging(output_dir: pathlib.Path, process) -> None:
  deadline = time.monotonic() + 60
  while not list((output_dir / '.staging').glob('chunk-*.json')):
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline
    time.sleep(0.02)


def _assert_same_build(output_dir, reference) -> None:
  for split in ('train', 'validation'):
    ours, theirs = read_split(output_dir, split), read_split(reference, split)
    assert sorted(ours) == sorted(theirs)
  shards = sorted(p.name for p in pathlib.Path(reference).glob('*-of-*'))
  assert sorted(p.name for p in pathlib.Path(output_dir).glob('*-of-*')) == shards
  for name in shards:  # Byte for byte: an interrupted and resumed build is the same build.
    assert (pathlib.Path(output_dir) / name).read_bytes() == (pathlib.Path(reference) / name).read_bytes()


def _children(pid: int):
  found = []
  for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):
    with contextlib.suppress(OSError):
      fields = stat.read_text().rsplit(')', 1)[1].split()
      if int(fields[1]) == pid:
        found.append(int(stat.parent.name))
  return found


def _alive(pid: int) -> bool:
  with contextlib.suppress(OSError):
    return pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
  return False


@pytest.mark.parametrize('signum,status,message', [
    (signal.SIGINT, 130, 'interrupted; the work done so far is kept: rerun with --resume'),
    (signal.SIGTERM, 143, 'terminated (SIGTERM); the work done so far is kept'),
])
def test_interrupted_build_says_so_in_one_line_and_resumes(many_images, tmp_path, signum, status,
                                                           message):
  root, reference = many_images
  output_dir = tmp_path / 'out'
  process = _build(root, output_dir, wait=False)
  _wait_for_staging(output_dir, process)
  workers = _children(process.pid)
  process.send_signal(signum)
  _, stderr = process.communicate(timeout=60)
  assert process.returncode == status, stderr
  assert 'Traceback' not in stderr and [l for l in stderr.splitlines() if l.strip()] == [
      l for l in stderr.splitlines() if message in l]
  time.sleep(0.5)
  assert not [pid for pid in workers if _alive(pid)]
  assert not (output_dir / 'manifest.json').exists()
  resumed = _build(root, output_dir, '--resume')
  assert resumed.returncode == 0, resumed.stderr
  _assert_same_build(output_dir, reference)


def test_killed_build_takes_its_workers_with_it(many_images, tmp_path):
  root, _ = many_images
  output_dir = tmp_path / 'out'
  process = _build(root, output_dir, wait=False)
  _wait_for_staging(output_dir, process)
  workers = _children(process.pid)
  assert len(workers) >= 2
  process.kill()
  process.communicate()
  deadline = time.monotonic() + 5
  while [pid for pid in workers if _alive(pid)] and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not [pid for pid in workers if _alive(pid)]


def test_disk_full_says_so_and_resume_finishes_once_there_is_space(many_images, tmp_path):
  root, reference = many_images
  with _tmpfs(tmp_path / 'small', 'size=2m') as folder:
    full = _build(root, folder / 'out')
    assert full.returncode == 1
    assert 'disk full' in _one_line(full) and 'rerun with --resume' in full.stderr
    subprocess.run(['mount', '-o', 'remount,size=256m', str(folder)], check=True)
    resumed = _build(root, folder / 'out', '--resume')
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_build(folder / 'out', reference)


def test_resume_removes_staging_left_by_a_kill_during_clean_up(tmp_path):
  write_dataset(tmp_path, GOOD_ROWS)
  output_dir = tmp_path / 'out'
  assert _build(tmp_path, output_dir, '--keep_staging').returncode == 0
  assert (output_dir / '.staging').is_dir()  # As a build killed while deleting it leaves it.
  assert _build(tmp_path, output_dir, '--resume').returncode == 0
  assert not (output_dir / '.staging').exists()


def _configs_by_command():
  by_command = {}
  for path in sorted((REPO / 'configs').glob('*.flags')):
    header = path.read_text().split('\n--', 1)[0]
    command = next(word for word in header.split() if word.startswith('tfl-'))
    by_command.setdefault(command, []).append(path)
  return by_command


def test_shared_flagfiles_are_included_by_recipes_and_every_inclusion_exists():
  shared = {f'configs/shared/{path.name}' for path in (REPO / 'configs' / 'shared').glob('*.flags')}
  included = set()
  for path in (REPO / 'configs').glob('*.flags'):
    for line in path.read_text().splitlines():
      if line.startswith('--flagfile='):
        included.add(line.split('=', 1)[1])
  assert included == shared  # No inclusion of a missing file, no shared file left unused.
  for name in shared:
    # A shared file is no recipe: it has no launch command of its own.
    assert 'tfl-' not in (REPO / name).read_text(), name


def test_every_config_names_its_command_and_parses_against_the_real_flags():
  commands = {'tfl-synth': ('synth', ['--output_dir=o']),
              'tfl-build-records': ('build_records', []),
              'tfl-inspect-records': ('inspect_records', []),
              'tfl-train': ('train', ['--records_dir=r', '--workdir=w']),
              'tfl-predict': ('predict', ['--export=e', '--output_dir=o'])}
  by_command = _configs_by_command()
  assert set(by_command) <= set(commands), by_command
  assert len(by_command.get('tfl-train', [])) >= 11
  for command, paths in by_command.items():
    module, required = commands[command]
    # An unknown flag in a file raises; every file is parsed afresh in the command's process.
    script = (f'from tf_landmarks.cli import {module}\n'
              'from absl import flags\n'
              'import sys\n'
              'for path in sys.argv[1:]:\n'
              '  flags.FLAGS.unparse_flags()\n'
              f"  flags.FLAGS(['prog', f'--flagfile={{path}}', *{required!r}])\n"
              '  print("OK", path)\n')
    result = subprocess.run([sys.executable, '-c', script, *map(str, paths)], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count('OK ') == len(paths)
