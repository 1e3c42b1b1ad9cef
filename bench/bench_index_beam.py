r"""The index build on Beam's DirectRunner against the local build, on a tiny synthetic world.

Builds once a synthetic world (--images train images of 8 landmarks, 96 px records in shards of
--examples_per_shard), a tiny classifier and a DELF run on it (one short epoch each); then times
whole `tfl-build-index` processes (interpreter, TensorFlow, models and, for Beam, its worker
processes' start-up included), DELF features at the default 7 scales with a 40-d PCA. Sides,
interleaved over --rounds rounds (bench/timing.py), median and range:

  local      --runner=local
  beam_2     --runner=beam with --runner=DirectRunner,--direct_num_workers=2,
             --direct_running_mode=multi_processing (2 worker processes, each loading the models)
  beam_1     --runner=beam with --runner=DirectRunner (the FnApiRunner in this one process)

CPU time is the child's user + system time, its worker processes included. After the rounds, every
file of each Beam side's index but index.json is compared byte for byte with the local build's.

The point is correctness and a path to scale (a cluster runner), not speed on 2 cores.

Usage (from the repository root):
  .venv/bin/python bench/bench_index_beam.py               # ~5 minutes on 2 quiet cores
  .venv/bin/python bench/bench_index_beam.py --images=480 --rounds=5
"""

import os
import pathlib
import shutil
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags

import timing

_REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_REPO))

from tf_landmarks import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_landmarks import ingest  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_landmarks import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position
from tf_landmarks import train  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds.', lower_bound=1)
_IMAGES = flags.DEFINE_integer('images', 160, 'Train images of the synthetic world.',
                               lower_bound=16)
_PER_SHARD = flags.DEFINE_integer('examples_per_shard', 32, 'Records (and index) shard size.',
                                  lower_bound=1)
_SIDES = flags.DEFINE_list('sides', ['local', 'beam_2', 'beam_1'],
                           'Sides to run: local, beam_2, beam_1 (see the docstring).')

_BEAM_OPTIONS = {
    'beam_2': '--runner=DirectRunner,--direct_num_workers=2,--direct_running_mode=multi_processing',
    'beam_1': '--runner=DirectRunner',
}


def _world(root: str) -> dict:
  """The records, classifier run and DELF run the sides index."""
  synthetic.generate(os.path.join(root, 'world'), synthetic.WorldSpec(
      seed=3, num_landmarks=8, num_unseen_landmarks=1, num_train_images=_IMAGES.value,
      num_test_images=4, image_size=128))
  ingest.build_records(ingest.BuildConfig(
      output_dir=os.path.join(root, 'records'), train_csv=os.path.join(root, 'world', 'train.csv'),
      image_dir=os.path.join(root, 'world', 'images'), validation_fraction=0.2, max_image_size=96,
      examples_per_shard=_PER_SHARD.value, num_workers=1, progress=False))

  def run(name, **overrides):
    settings = dict(records_dir=os.path.join(root, 'records'), workdir=os.path.join(root, name),
                    backbone='tiny', weights='none', head='softmax', batch_size=16, epochs=1,
                    steps_per_epoch=2, optimizer='adam', learning_rate=0.003, progress=False)
    settings.update(overrides)
    train.train(train.TrainConfig(**settings), data.InputConfig(image_size=64))
    return os.path.join(root, name)

  classifier = run('classifier')
  return {'classifier': classifier,
          'delf': run('delf', mode=train.Mode.DELF, weights='', init_from=classifier)}


def _files(index_dir: str) -> dict:
  """Every file of an index but index.json (creation time, runner) and the lock, by name."""
  root = pathlib.Path(index_dir)
  return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob('*'))
          if path.is_file() and path.name not in ('index.json', '.lock')}


def main(argv):
  del argv
  timing.print_line(f'start: {timing.load_note()}')
  with tempfile.TemporaryDirectory() as work_dir:
    world = _world(work_dir)
    outputs = {side: os.path.join(work_dir, side) for side in _SIDES.value}
    # `-m` from the repository root: this checkout's code, whatever is installed.
    common = [sys.executable, '-m', 'tf_landmarks.cli.build_index',
              f'--run={world["classifier"]}', f'--delf_run={world["delf"]}',
              '--split=train+validation', '--noprogress']
    commands = {side: common + [f'--output_dir={outputs[side]}'] + (
        [] if side == 'local' else
        ['--runner=beam', f'--beam_pipeline_options={_BEAM_OPTIONS[side]}'])
                for side in _SIDES.value}
    samples = timing.interleave(
        {side: lambda side=side: timing.time_process(commands[side], _IMAGES.value,
                                                     cwd=str(_REPO))
         for side in commands}, _ROUNDS.value,
        before_each=lambda side: shutil.rmtree(outputs[side], ignore_errors=True))
    lines = [f'{_IMAGES.value} synthetic images, {_PER_SHARD.value} per shard, DELF (7 scales, '
             f'40-d PCA) + global, whole processes, {_ROUNDS.value} rounds, median (range):']
    for side in commands:
      lines.append(f'  {side:<8} {timing.describe(samples[side])}')
      if side != 'local' and 'local' in samples:
        ratio = timing.spread(timing.ratios(samples[side], samples['local']), unit='x')
        same = _files(outputs[side]) == _files(outputs['local'])
        lines.append(f'  {"":<8} speed vs local {ratio}; files identical to local: {same}')
    timing.print_line('\n'.join(lines))
  timing.print_line(f'end: {timing.load_note()}')


if __name__ == '__main__':
  app.run(main)
