r"""Batch prediction's milliseconds per query: this checkout's `tfl-predict` against other code's.

Sides, interleaved over --rounds rounds (bench/timing.py), each a whole `tfl-predict` process over
the same export and queries into a fresh output folder:

  after          this checkout, --threads=0 (one answering thread per core, the default)
  after_1thread  this checkout, --threads=1 (the pipeline alone: batch k + 1 read and classified
                 while batch k is answered on one thread)
  before         --before, a checkout of other code (e.g. the previous commit), if given

Each side's figure is wall-clock milliseconds per query of the whole process, start-up included
(TensorFlow, the SavedModels and the index load in ~8 s on the 2-core machine, the same on every
side); the ratios against `before` are taken within each round. After the rounds, every side's
submissions are compared with the first side's, byte for byte: the speed must not change answers.

The checkouts' code is imported from their folders (`python -P`, the folder first on sys.path), so
one virtualenv serves both; --before only needs the folder, e.g.
  git worktree add --detach ../before <commit>

Usage (from the repository root, after `make demo`):
  .venv/bin/python bench/bench_predict.py --export=exports/demo --before=../before
"""

import os
import shutil
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags

import timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBMISSIONS = ('recognition.csv', 'recognition_unverified.csv', 'retrieval.csv')

_EXPORT = flags.DEFINE_string('export', 'exports/demo', 'The export (tfl-export) to predict with.')
_PREDICT_FLAGS = flags.DEFINE_string(
    'predict_flags', os.path.join(REPO, 'configs', 'demo_predict.flags'),
    "A tfl-predict flagfile every side reads (the recognition settings); the queries are the "
    "export's test records unless it names others.")
_BEFORE = flags.DEFINE_string('before', None, 'A checkout of other code to compare against; '
                              'without it only this checkout\'s two sides run.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds.', lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'tfl-predict --batch_size of every side.',
                                   lower_bound=1)

# Runs a checkout's tfl-predict: its folder first on sys.path (-P keeps the working folder off it),
# and a check that its code, not the installed one, was imported.
_LAUNCH = ('import sys; sys.path.insert(0, {tree!r}); import tf_landmarks; '
           'assert tf_landmarks.__file__.startswith({tree!r}), tf_landmarks.__file__; '
           'from tf_landmarks.cli.predict import run; sys.argv[0] = "tfl-predict"; run()')


def _command(tree, output_dir, extra=()):
  return [sys.executable, '-P', '-c', _LAUNCH.format(tree=os.path.abspath(tree)),
          f'--flagfile={_PREDICT_FLAGS.value}', f'--export={_EXPORT.value}',
          f'--output_dir={output_dir}', f'--batch_size={_BATCH_SIZE.value}', '--noprogress',
          '--overwrite', *extra]


def _queries(output_dir):
  with open(os.path.join(output_dir, 'recognition.csv')) as f:
    return sum(1 for _ in f) - 1


def main(argv):
  del argv
  work = tempfile.mkdtemp(prefix='bench_predict_')
  sides = {'after': (REPO, ()), 'after_1thread': (REPO, ('--threads=1',))}
  if _BEFORE.value:
    sides['before'] = (_BEFORE.value, ())
  folders = {name: os.path.join(work, name) for name in sides}
  try:
    # One untimed run of this checkout: the number of queries, and warm page caches for all.
    timing.time_process(_command(REPO, folders['after']), 1)
    queries = _queries(folders['after'])
    samples = timing.interleave(
        {name: (lambda tree=tree, extra=extra, name=name: timing.time_process(
            _command(tree, folders[name], extra), queries)) for name, (tree, extra) in
         sides.items()},
        _ROUNDS.value, before_each=lambda name: shutil.rmtree(folders[name], ignore_errors=True))
    print(f'{queries} queries, {_ROUNDS.value} rounds, --export={_EXPORT.value}, '
          f'--batch_size={_BATCH_SIZE.value}; whole processes, start-up included')
    for name, runs in samples.items():
      ms = [1000 * sample.seconds / sample.items for sample in runs]
      cpu = [1000 * sample.cpu_seconds / sample.items for sample in runs]
      print(f'  {name:14s} {timing.spread(ms, digits=0, unit=" ms/query")}, '
            f'CPU {timing.spread(cpu, digits=0, unit=" ms/query")}')
    if 'before' in samples:
      for name in ('after', 'after_1thread'):
        print(f'  {name} / before time: '
              f'{timing.spread(timing.ratios(samples["before"], samples[name]), unit="x")}')
    for name in list(sides)[1:]:
      differing = [submission for submission in SUBMISSIONS if
                   open(os.path.join(folders[name], submission), 'rb').read() !=
                   open(os.path.join(folders['after'], submission), 'rb').read()]
      print(f'  submissions of {name} and after: '
            f'{"identical" if not differing else "DIFFER: " + ", ".join(differing)}')
    print(f'  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
