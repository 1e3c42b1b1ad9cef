r"""Putative matching of geometric verification: one BLAS distance matrix against faiss's flat scan.

Two sides, interleaved over --rounds rounds (bench/timing.py), on the SAME real local features (DELF
or SIFT, as the index stores them) of the same image pairs of an index folder (tfl-build-index):
--queries query images, each against --per_query index images (the other images of its landmark
first, then random ones), as `tfl-predict` verifies a query against its shortlist.

  faiss_scan   `match.putative_matches` with a faiss `IndexFlatL2` built per pair and passed as
               `search_index`: faiss's exact search (its sequential kernel below
               `faiss.cvar.distance_compute_blas_threshold` queries) and, for the mutual check, a
               second search over the query's features. What the flat path did before.
  blas_matrix  `match.putative_matches` as `verify_pair` calls it (flat, no search_index): one
               query × index matrix of squared distances from one BLAS product, every neighbour
               taken from it.

Both run on one faiss thread (match.MAX_SEARCH_THREADS), on --threads Python threads that share
the pairs, as a caller verifying several pairs at once would. Matching only: RANSAC is not timed.

Reported: milliseconds per pair of each side as median (range) over the rounds, the per-round
speed-up of blas_matrix over faiss_scan, and, computed once (untimed), the share of pairs whose
match arrays are identical and whose RANSAC inlier counts (`ransac.verify` defaults) are
identical. The two differ only where float rounding flips a near-tie.

Usage (from the repository root):
  .venv/bin/python bench/bench_matching.py --index=runs/demo_finetune/index
  .venv/bin/python bench/bench_matching.py --index=DIR --threads=2 --nomutual --ratio=0
"""

import concurrent.futures
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import numpy as np

import timing
from tf_landmarks import indexes
from tf_landmarks.local_features import match
from tf_landmarks.local_features import ransac

_INDEX = flags.DEFINE_string('index', None, 'Index folder (tfl-build-index) whose stored local '
                             'features are matched.', required=True)
_QUERIES = flags.DEFINE_integer('queries', 20, 'Query images, drawn at random from the index.',
                                lower_bound=1)
_PER_QUERY = flags.DEFINE_integer('per_query', 40, 'Index images each query is matched against '
                                  '(its landmark\'s other images first, then random ones).',
                                  lower_bound=1)
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Interleaved rounds; each runs every pair once per '
                               'side.', lower_bound=1)
_THREADS = flags.DEFINE_integer('threads', 1, 'Python threads sharing the pairs of a side.',
                                lower_bound=1)
_RATIO = flags.DEFINE_float('ratio', 0.8, "Lowe's ratio of the matching; 0: no ratio test.",
                            lower_bound=0, upper_bound=1)
_MUTUAL = flags.DEFINE_boolean('mutual', True, 'Keep only mutual nearest neighbours.')
_MAX_DISTANCE = flags.DEFINE_float('max_distance', 0, 'Descriptor distance bound; 0: none.',
                                   lower_bound=0)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the query and index image draw.')


def make_pairs(index: indexes.Index, queries: int, per_query: int, seed: int):
  """(query features, index features) pairs of `queries` random rows, `per_query` each."""
  rng = np.random.default_rng(seed)
  pairs = []
  for row in rng.choice(index.num_images, min(queries, index.num_images), replace=False):
    same = [other for other in index.images_of(index.landmark_of(row)) if other != row]
    others = [other for other in rng.permutation(index.num_images)
              if other != row and other not in same]
    query = index.local_features(int(row))
    pairs += [(query, index.local_features(int(other)))
              for other in (same + others)[:per_query]]
  return pairs


def main(argv):
  del argv
  index = indexes.load(_INDEX.value)
  pairs = make_pairs(index, _QUERIES.value, _PER_QUERY.value, _SEED.value)
  filters = dict(ratio=_RATIO.value or None, mutual=_MUTUAL.value,
                 max_distance=_MAX_DISTANCE.value or None)
  sides = {
      'faiss_scan': lambda query, other: match.putative_matches(
          query, other, search_index=match.build_search_index(other.descriptors), **filters),
      'blas_matrix': lambda query, other: match.putative_matches(query, other, **filters),
  }
  matches = {name: [side(*pair) for pair in pairs] for name, side in sides.items()}
  same_matches = np.mean([np.array_equal(old, new)
                          for old, new in zip(matches['faiss_scan'], matches['blas_matrix'])])
  inliers = {name: [ransac.verify(query.locations, other.locations, found).num_inliers
                    for (query, other), found in zip(pairs, side_matches)]
             for name, side_matches in matches.items()}
  same_inliers = np.mean(np.equal(inliers['faiss_scan'], inliers['blas_matrix']))

  pool = concurrent.futures.ThreadPoolExecutor(_THREADS.value)

  def timed(side):
    def run():
      start = time.perf_counter()
      list(pool.map(lambda pair: side(*pair), pairs))
      return timing.Sample(len(pairs), time.perf_counter() - start)
    return run

  load_at_start = timing.load_note()
  samples = timing.interleave({name: timed(side) for name, side in sides.items()}, _ROUNDS.value)
  pool.shutdown()
  sizes = sorted({(len(query), len(other)) for query, other in pairs})
  timing.print_line(
      f'{os.path.normpath(_INDEX.value)}: {len(pairs)} pairs ({_QUERIES.value} queries × '
      f'{_PER_QUERY.value}), {index.local.backend} '
      f'{pairs[0][0].descriptors.shape[1]}-d descriptors, {sizes[0]}–{sizes[-1]} features per '
      f'pair; filters {filters}; {_THREADS.value} Python thread(s), {_ROUNDS.value} rounds, '
      f'median (range):')
  for name, side_samples in samples.items():
    milliseconds = [1000 / sample.rate for sample in side_samples]
    timing.print_line(f'  {name:<28} {timing.spread(milliseconds, 2, " ms/pair")}')
  speedups = timing.ratios(samples['blas_matrix'], samples['faiss_scan'])
  timing.print_line(f'  {"blas_matrix/faiss_scan":<28} {timing.spread(speedups, 2, "x")} pairs/s')
  timing.print_line(f'  identical match arrays: {same_matches:.2%} of pairs; identical RANSAC '
                    f'inlier counts: {same_inliers:.2%}')
  timing.print_line(f'  {load_at_start} at the start, {timing.load_note()} at the end')
  return 0


if __name__ == '__main__':
  app.run(main)
