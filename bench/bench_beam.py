r"""The records build on Beam's DirectRunner (2 worker processes) against the local builder.

Both sides are whole `tfl-build-records` processes (interpreter, TensorFlow and, for Beam, its
worker processes' start-up included) on the same input: the real photos of
../shared/data/landmarks-real (train + test) copied --copies times under new ids, resized to
--max_image_size. Sides, interleaved over --rounds rounds (bench/timing.py), median and range:

  local      --runner=local --num_workers=2
  beam_2     --runner=beam with --runner=DirectRunner,--direct_num_workers=2,
             --direct_running_mode=multi_processing (the FnApiRunner with 2 worker processes)
  beam_1     --runner=beam with --runner=DirectRunner (the FnApiRunner in this one process)

CPU time is the child's user + system time, its worker processes included. After the rounds, the
shards of every side are compared byte for byte with the local build's.

The point is correctness and a path to scale (a cluster runner), not speed on 2 cores.

Usage (from the repository root):
  .venv/bin/python bench/bench_beam.py                 # ~6 minutes on 2 quiet cores
  .venv/bin/python bench/bench_beam.py --copies=32 --rounds=5
"""

import os
import shutil
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags

import timing
from real_set import REAL_DATA, replicate_real_set

_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds.', lower_bound=1)
_COPIES = flags.DEFINE_integer(
    'copies', 16, 'The 125 real photos are copied this many times under new ids (16: 2,000).',
    lower_bound=1)
_MAX_IMAGE_SIZE = flags.DEFINE_integer('max_image_size', 256, 'Long side after resizing, px.')
_SIDES = flags.DEFINE_list('sides', ['local', 'beam_2', 'beam_1'],
                           'Sides to run: local, beam_2, beam_1 (see the docstring).')

_BEAM_OPTIONS = {
    'beam_2': '--runner=DirectRunner,--direct_num_workers=2,--direct_running_mode=multi_processing',
    'beam_1': '--runner=DirectRunner',
}


def _shards(output_dir):
  return {name: open(os.path.join(output_dir, name), 'rb').read()
          for name in sorted(os.listdir(output_dir)) if '-of-' in name}


def main(argv):
  del argv
  if not os.path.exists(os.path.join(REAL_DATA, 'train.csv')):
    timing.print_line(f'skipped: {REAL_DATA} is absent')
    return
  command = shutil.which('tfl-build-records', path=os.path.dirname(sys.executable))
  if command is None:
    timing.print_line('skipped: tfl-build-records is not installed beside this Python')
    return
  timing.print_line(f'start: {timing.load_note()}')
  with tempfile.TemporaryDirectory() as work_dir:
    paths, image_dir, rows = replicate_real_set(_COPIES.value, os.path.join(work_dir, 'input'),
                                                ['train.csv', 'test.csv'])
    num_images = sum(len(copied) for copied in rows.values())
    outputs = {side: os.path.join(work_dir, side) for side in _SIDES.value}
    common = [command, f'--train_csv={paths["train.csv"]}', f'--test_csv={paths["test.csv"]}',
              f'--image_dir={image_dir}', f'--max_image_size={_MAX_IMAGE_SIZE.value}',
              '--examples_per_shard=256', '--noprogress']
    commands = {side: common + [f'--output_dir={outputs[side]}'] + (
        ['--num_workers=2'] if side == 'local' else
        ['--runner=beam', f'--beam_pipeline_options={_BEAM_OPTIONS[side]}'])
                for side in _SIDES.value}
    samples = timing.interleave(
        {side: lambda side=side: timing.time_process(commands[side], num_images)
         for side in commands}, _ROUNDS.value,
        before_each=lambda side: shutil.rmtree(outputs[side], ignore_errors=True))
    lines = [f'{num_images} real photos (125 ×{_COPIES.value}) → {_MAX_IMAGE_SIZE.value} px, '
             f'whole processes, {_ROUNDS.value} rounds, median (range):']
    for side in commands:
      lines.append(f'  {side:<8} {timing.describe(samples[side])}')
      if side != 'local' and 'local' in samples:
        ratio = timing.spread(timing.ratios(samples[side], samples['local']), unit='x')
        same = _shards(outputs[side]) == _shards(outputs['local'])
        lines.append(f'  {"":<8} speed vs local {ratio}; shards identical to local: {same}')
    timing.print_line('\n'.join(lines))
  timing.print_line(f'end: {timing.load_note()}')


if __name__ == '__main__':
  app.run(main)
