r"""Global search at scale: flat against IVF (flat, float16 or 8-bit storage) and IVF-PQ.

Data: --rows synthetic L2-normalised --dim descriptors (seeded), clustered like a landmark set's
global descriptors at two levels: --groups groups (similar-looking places), each holding centres
(landmarks, --centres in all) spread around it by --centre_noise, and every descriptor spread
around its centre by --noise (noise norms relative to the unit centre: 1.0 gives a cosine of ~0.7
to the centre and ~0.5 between two images of a landmark). Queries are fresh draws of the same
mixture, not index rows. The rows live in a memory-mapped file in --work_dir, as global.npy does.

Sides, each a faiss index over the same rows, searched one query at a time (what prediction
does), k=100:

  flat              IndexFlatIP: exact; today's default and the baseline of every ratio.
  ivf<N>-<S>/p<P>   IndexIVF with N cells (k-means on --train_per_cell rows per cell,
                    --kmeans_iterations), searching P of them, each row stored as S: flat
                    (float32), fp16 (float16 scalar quantizer) or sq8 (8-bit scalar quantizer).
  ivf<N>-pq/p<P>    IndexIVFPQ (--pq_bytes bytes per row), the best 4·k re-ranked exactly on the
                    memory-mapped float32 rows (reads 4·k rows of the file per query).
  …@t2              the same with faiss on 2 threads instead of 1.

Reported per side: ms/query as median (range) over --rounds interleaved rounds (bench/timing.py),
its speed against flat in the same rounds, recall@100 against flat's exact neighbours on
--recall_queries queries (deterministic), and the memory the faiss index holds (codes, ids,
centroids; the flat baseline is the whole float32 copy).

--sweep=ROWS,ROWS,… adds flat's single-query ms/query on the first ROWS rows of each size, 1
thread: where exact search stops meeting the --target_ms target, `tfl-build-index
--global_search=auto` switches to IVF.

Usage (from the repository root):
  .venv/bin/python bench/bench_global_search.py              # 1 M rows, ~15 minutes at load 5-8
  .venv/bin/python bench/bench_global_search.py --rows=200000 --nlists=1024 --sweep=  # minutes

`--storages=pq` adds IVF-PQ; its training is slow (96 s at 50,000 rows on 2 loaded cores).
"""

import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import faiss
from faiss.contrib import ivf_tools
import numpy as np

import timing

_ROWS = flags.DEFINE_integer('rows', 1_000_000, 'Index rows (synthetic descriptors).')
_DIM = flags.DEFINE_integer('dim', 512, 'Descriptor size.')
_CENTRES = flags.DEFINE_integer('centres', 20000, 'Clusters (landmarks).')
_GROUPS = flags.DEFINE_integer('groups', 500, 'Groups of clusters (similar-looking places).')
_CENTRE_NOISE = flags.DEFINE_float('centre_noise', 1.0, 'Spread of the centres in their group.')
_NOISE = flags.DEFINE_float('noise', 1.0, 'Spread of the descriptors around their centre.')
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed of the data.')
_K = flags.DEFINE_integer('k', 100, 'Neighbours per query.')
_RECALL_QUERIES = flags.DEFINE_integer('recall_queries', 500, 'Queries that measure recall.')
_TIMED_QUERIES = flags.DEFINE_integer('timed_queries', 100,
                                      'Single queries per round of an IVF side.')
_FLAT_QUERIES = flags.DEFINE_integer('flat_queries', 10, 'Single queries per round of flat.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds.')
_NLISTS = flags.DEFINE_list('nlists', ['1024', '4096'], 'IVF cell counts.')
_NPROBES = flags.DEFINE_list('nprobes', ['16', '32', '64', '128'], 'Cells searched per query.')
_STORAGES = flags.DEFINE_list('storages', ['flat', 'fp16', 'sq8'],
                              'IVF row storage: flat, fp16, sq8, pq.')
_PQ_BYTES = flags.DEFINE_integer('pq_bytes', 64, 'Bytes per row of the pq storage.')
_TRAIN_PER_CELL = flags.DEFINE_integer('train_per_cell', 39, 'k-means training rows per cell '
                                       '(faiss warns below 39).')
_KMEANS_ITERATIONS = flags.DEFINE_integer('kmeans_iterations', 10, 'k-means iterations.')
_THREADS = flags.DEFINE_list('threads', ['1', '2'], 'faiss thread counts; those above 1 are '
                             'timed on flat and on the first IVF side.')
_SWEEP = flags.DEFINE_list('sweep', ['10000', '20000', '40000', '100000', '200000'],
                           'Row counts at which flat is timed alone (empty: none).')
_TARGET_MS = flags.DEFINE_float('target_ms', 5.0, 'The single-query latency target.')
_WORK_DIR = flags.DEFINE_string('work_dir', None, 'Folder of the memory-mapped rows; default: a '
                                'temporary folder, removed at the end.')

_CHUNK = 65536


def _normalise(rows: np.ndarray) -> np.ndarray:
  return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _mixture(rng: np.random.Generator, dim: int):
  """(centres, draw): the cluster centres, and draw(n) -> n descriptors of the mixture."""
  groups = _normalise(rng.standard_normal((_GROUPS.value, dim), dtype=np.float32))
  owners = rng.integers(len(groups), size=_CENTRES.value)
  scale = _CENTRE_NOISE.value / np.sqrt(dim)
  centres = _normalise(groups[owners] + scale * rng.standard_normal((len(owners), dim),
                                                                    dtype=np.float32))

  def draw(count: int) -> np.ndarray:
    chosen = centres[rng.integers(len(centres), size=count)]
    noise = rng.standard_normal((count, dim), dtype=np.float32) * (_NOISE.value / np.sqrt(dim))
    return np.ascontiguousarray(_normalise(chosen + noise), np.float32)

  return draw


def _make_rows(path: str, rows: int, dim: int) -> tuple:
  """Writes the rows to a memory-mapped file; returns (rows memmap, queries)."""
  rng = np.random.default_rng(_SEED.value)
  draw = _mixture(rng, dim)
  data = np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=(rows, dim))
  for start in range(0, rows, _CHUNK):
    data[start:start + _CHUNK] = draw(min(_CHUNK, rows - start))
  data.flush()
  queries = draw(_RECALL_QUERIES.value)
  return np.load(path, mmap_mode='r'), queries


def _memory(index: faiss.Index) -> int:
  """Bytes the index holds: codes, ids and, for IVF, the centroids."""
  if isinstance(index, faiss.IndexFlat):
    return index.ntotal * index.code_size
  ivf = faiss.extract_index_ivf(index)
  return ivf.ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4


class _Side:
  """One searchable configuration: search(queries, k) -> rows, and its memory."""

  def __init__(self, name, index, nprobe=None, rerank_rows=None):
    self.name, self.index, self.nprobe, self.rerank_rows = name, index, nprobe, rerank_rows

  def search(self, queries: np.ndarray, k: int) -> np.ndarray:
    if self.nprobe is not None:
      self.index.nprobe = self.nprobe
    if self.rerank_rows is None:
      return self.index.search(queries, k)[1]
    _, candidates = self.index.search(queries, 4 * k)
    found = []
    for query, rows in zip(queries, candidates):
      rows = np.sort(rows[rows >= 0])
      scores = np.asarray(self.rerank_rows[rows]) @ query
      found.append(rows[np.argsort(-scores, kind='stable')[:k]])
    return np.stack(found)


def _train_quantizer(data: np.ndarray, nlist: int, rng: np.random.Generator) -> faiss.Index:
  sample_rows = np.sort(rng.choice(len(data), size=min(len(data), _TRAIN_PER_CELL.value * nlist),
                                   replace=False))
  sample = np.ascontiguousarray(data[sample_rows])
  kmeans = faiss.Kmeans(data.shape[1], nlist, niter=_KMEANS_ITERATIONS.value, seed=0,
                        spherical=True, max_points_per_centroid=_TRAIN_PER_CELL.value)
  kmeans.train(sample)
  quantizer = faiss.IndexFlatIP(data.shape[1])
  quantizer.add(kmeans.centroids)
  return quantizer, sample


def _ivf_indexes(data, nlist, rng):
  """The IVF indexes of every --storages over one trained quantizer, rows added once assigned."""
  dim = data.shape[1]
  started = time.perf_counter()
  quantizer, sample = _train_quantizer(data, nlist, rng)
  assignments = np.concatenate([
      quantizer.search(np.ascontiguousarray(data[start:start + _CHUNK]), 1)[1][:, 0]
      for start in range(0, len(data), _CHUNK)])
  timing.print_line(f'  nlist {nlist}: k-means and assignment '
                    f'{time.perf_counter() - started:.0f} s')
  indexes = {}
  for storage in _STORAGES.value:
    if storage == 'flat':
      index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif storage in ('fp16', 'sq8'):
      kind = faiss.ScalarQuantizer.QT_fp16 if storage == 'fp16' else faiss.ScalarQuantizer.QT_8bit
      index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, kind,
                                            faiss.METRIC_INNER_PRODUCT)
    elif storage == 'pq':
      index = faiss.IndexIVFPQ(quantizer, dim, nlist, _PQ_BYTES.value, 8,
                               faiss.METRIC_INNER_PRODUCT)
    else:
      raise app.UsageError(f'unknown storage {storage}')
    index.train(sample)  # The quantizer is trained already: this trains the row codec only.
    for start in range(0, len(data), _CHUNK):
      rows = np.ascontiguousarray(data[start:start + _CHUNK])
      if storage == 'pq':  # PQ codes residuals, which add_preassigned does not compute.
        index.add(rows)
      else:
        ivf_tools.add_preassigned(index, rows, assignments[start:start + _CHUNK])
    timing.print_line(f'  nlist {nlist}, {storage}: built in {time.perf_counter() - started:.0f} s')
    index.parallel_mode = 0
    indexes[storage] = index
  return indexes


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
  return float(np.mean([len(np.intersect1d(a, b)) / len(b) for a, b in zip(found, truth)]))


def _timed(side: _Side, queries: np.ndarray, threads: int, k: int):
  def run() -> timing.Sample:
    faiss.omp_set_num_threads(threads)
    started = time.perf_counter()
    for query in queries:
      side.search(query[None], k)
    return timing.Sample(len(queries), time.perf_counter() - started)
  return run


def _ms(samples) -> list:
  return [1000 / sample.rate for sample in samples]


def _sweep(data, queries, k) -> None:
  sizes = [int(size) for size in _SWEEP.value if int(size) <= len(data)]
  if not sizes:
    return
  timing.print_line(f'\nflat alone, 1 thread, by index size (target {_TARGET_MS.value:g} ms):')
  sides = {}
  for size in sizes:
    flat = faiss.IndexFlatIP(data.shape[1])
    flat.add(np.ascontiguousarray(data[:size]))
    sides[f'{size:,} rows'] = _timed(_Side('flat', flat), queries[:_TIMED_QUERIES.value], 1, k)
  samples = timing.interleave(sides, _ROUNDS.value)
  for name, side_samples in samples.items():
    timing.print_line(f'  {name:>14}: {timing.spread(_ms(side_samples), unit=" ms/query")}')


def main(argv) -> None:
  del argv
  k = _K.value
  with tempfile.TemporaryDirectory(dir=_WORK_DIR.value) as work_dir:
    started = time.perf_counter()
    data, queries = _make_rows(os.path.join(work_dir, 'global.npy'), _ROWS.value, _DIM.value)
    timing.print_line(f'{len(data):,} rows of {data.shape[1]}-d, {_CENTRES.value:,} centres in '
                      f'{_GROUPS.value} groups: written in {time.perf_counter() - started:.0f} s')
    flat = faiss.IndexFlatIP(data.shape[1])
    for start in range(0, len(data), _CHUNK):
      flat.add(np.ascontiguousarray(data[start:start + _CHUNK]))
    faiss.omp_set_num_threads(os.cpu_count())
    truth = flat.search(queries, k)[1]
    # Where a side's memory is reported, the flat copy is what today's reader holds.
    sides = [_Side('flat', flat)]
    rng = np.random.default_rng(_SEED.value + 1)
    for nlist in (int(value) for value in _NLISTS.value):
      for storage, index in _ivf_indexes(data, nlist, rng).items():
        for nprobe in (int(value) for value in _NPROBES.value):
          sides.append(_Side(f'ivf{nlist}-{storage}/p{nprobe}', index, nprobe,
                             data if storage == 'pq' else None))
    faiss.omp_set_num_threads(1)
    recalls = {side.name: _recall(side.search(queries, k), truth) for side in sides}
    threads = [int(value) for value in _THREADS.value]
    timed = {}
    for side in sides:
      count = _FLAT_QUERIES.value if side.name == 'flat' else _TIMED_QUERIES.value
      timed[side.name] = _timed(side, queries[:count], 1, k)
    # More threads: on flat, and on the first IVF side that reaches 0.95 recall.
    first_good = next((side for side in sides[1:] if recalls[side.name] >= 0.95), None)
    for count in (value for value in threads if value != 1):
      for side in [sides[0]] + ([first_good] if first_good else []):
        queries_per_round = _FLAT_QUERIES.value if side.name == 'flat' else _TIMED_QUERIES.value
        timed[f'{side.name}@t{count}'] = _timed(side, queries[:queries_per_round], count, k)
    samples = timing.interleave(timed, _ROUNDS.value)
    by_name = {side.name: side for side in sides}
    timing.print_line(f'\nsingle-query search, k={k}, {_ROUNDS.value} rounds, ms/query median '
                      f'(range); speed against flat (1 thread) in the same rounds:')
    timing.print_line(f'  {"side":<22} {"ms/query":<22} {"× flat":<20} recall@{k}  memory')
    for name, side_samples in samples.items():
      side = by_name[name.split('@')[0]]
      speed = timing.spread(timing.ratios(side_samples, samples['flat']), unit='x')
      timing.print_line(f'  {name:<22} {timing.spread(_ms(side_samples)):<22} {speed:<20} '
                        f'{recalls[side.name]:.3f}      {_memory(side.index) / 1e6:,.0f} MB')
    for count in (value for value in threads if value != 1):
      for name in [key for key in samples if key.endswith(f'@t{count}')]:
        base = name.split('@')[0]
        slowdown = [one.rate / many.rate for one, many in zip(samples[base], samples[name])]
        timing.print_line(f'  {name}: {timing.spread(slowdown, unit="x")} the time of 1 thread')
    _sweep(data, queries, k)
    timing.print_line(f'\n{timing.load_note()}; median ms/query of flat: '
                      f'{statistics.median(_ms(samples["flat"])):.1f}')


if __name__ == '__main__':
  app.run(main)
