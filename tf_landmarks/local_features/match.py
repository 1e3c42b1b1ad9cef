"""Putative correspondences between two feature sets: exact nearest neighbours plus filters.

Every query descriptor is paired with its nearest index descriptor (Euclidean distance; descriptors
are L2-normalised, so this ranks like cosine similarity), then up to three filters drop pairs that
are unlikely to be the same physical point:

- a distance bound (`max_distance`): DELF's reference matching keeps neighbours closer than 0.8 on
  its 40-d PCA-whitened descriptors; the right bound depends on the descriptor, so there is no
  default;
- Lowe's ratio test (`ratio`): the nearest neighbour must be clearly closer than the second
  nearest, which rejects repetitive texture (windows, tiles) that a bound alone lets through;
- a mutual check (`mutual`): the query feature must also be the index feature's nearest neighbour.

Search structures (`index_kind`):

- 'flat': exact, no training. The right choice for verifying one image against another (about
  1,000 features each) or against a landmark's few index images. Without a `search_index`, it
  computes the query × index matrix of squared distances as |q|² + |x|² − 2·q·x with one BLAS
  matrix product (faiss's `pairwise_distances`) and takes every neighbour the filters need from
  that one matrix: each query row's nearest and second nearest, and each candidate index column's
  nearest query row for the mutual check (no second search). faiss's `IndexFlatL2.search` would
  use BLAS only from 128,000 queries (`distance_compute_blas_threshold`) and otherwise scans with
  its sequential kernel: matching two images' 1,000 40-d DELF descriptors with the ratio test and
  the mutual check took 7.9 ms that way on one thread, 1.6 ms this way (bench/bench_matching.py).
  The expansion rounds differently from that kernel (~1e-6), which can flip a neighbour only on a
  near-tie: on 3,997 DELF pairs of a real index, 2 pairs' matches (1 match each) differed under
  the verification rule (ratio 0.8, mutual). The matrix is built in blocks of index columns of at
  most `MAX_MATRIX_ENTRIES` entries, so matching against many images' concatenated features holds
  ~8 MB of matrix at a time. A given `search_index` ('flat' included) is searched with faiss, as
  the IVF kinds are.
- 'ivf_flat' (`IndexIVFFlat`): k-means cells, searching only `nprobe` of `nlist` of them. Distances
  are exact, so `max_distance` and `ratio` mean what they mean for 'flat', but a true neighbour in
  an unvisited cell is missed (recall < 1). Worth it from about a million index vectors (the
  features of ~1,000 images searched together), where a flat scan is the bottleneck.
- 'ivf_pq' (`IndexIVFPQ`): as 'ivf_flat', with vectors compressed to `pq_bytes` bytes (a 128-d
  float vector is 512 bytes; 16 bytes is 32× smaller). Distances are approximate, which blurs the
  ratio test and the distance bound; use it only when the index's features do not fit in memory
  otherwise (GLDv2's 760k index images × 1,000 features = 390 GB as floats, 12 GB as 16-byte codes).

The IVF kinds need training data: at least `nlist` vectors, and faiss wants about 39 per cell; they
are trained on the index's own descriptors. Build them once with `build_search_index` and pass them
as `search_index` when the same index is searched by many queries.

faiss parallelises searches with OpenMP over all cores; for the small searches of pairwise
verification the thread start-up costs more than it saves, and in a serving process it competes
with TensorFlow. Searches here run on at most `MAX_SEARCH_THREADS` threads; callers that verify
several pairs at once do it from several Python threads (faiss releases the GIL). The flat path's
matrix product follows the same bound: faiss ships an OpenMP build of OpenBLAS, which sizes each
call by the calling thread's OpenMP setting. NumPy's own OpenBLAS (a pthreads build) would not: it
runs every product on all cores unless OPENBLAS_NUM_THREADS is set before import, and on the 2-core
machine this was written on, busy with other work, a 1,000 × 1,000 × 40 product took ~15 ms that
way against ~0.9 ms with OPENBLAS_NUM_THREADS=1, and calling it from 2 or 4 Python threads at once
did not help (~16 ms per call either way). faiss's product on one thread took ~1 ms.
"""

import contextlib
from typing import Iterator, Optional

import faiss
import numpy as np

from tf_landmarks.local_features import LocalFeatures

INDEX_KINDS = ('flat', 'ivf_flat', 'ivf_pq')

MAX_SEARCH_THREADS = 1

# The flat path's distance matrix is computed in blocks of at most this many entries (8 MB of
# float32), so a query matched against many images' concatenated features stays in bounded memory;
# one pair of 1,000-feature images is one block. Blocks that stay in cache are also faster: 1,000
# queries against 60,000 index features took 85–90 ms in blocks of 1–2 M entries, 119 ms in blocks
# of 16 M.
MAX_MATRIX_ENTRIES = 2 * 2**20

_NO_MATCHES = np.zeros((0, 2), np.int64)


@contextlib.contextmanager
def _bounded_threads() -> Iterator[None]:
  """Runs the block with faiss on at most MAX_SEARCH_THREADS threads, then restores the setting."""
  previous = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(min(previous, MAX_SEARCH_THREADS))
  try:
    yield
  finally:
    faiss.omp_set_num_threads(previous)


def _as_faiss_array(descriptors: np.ndarray, what: str) -> np.ndarray:
  descriptors = np.asarray(descriptors)
  if descriptors.ndim != 2:
    raise ValueError(f'{what} descriptors must be [N, D], got shape {descriptors.shape}')
  if descriptors.size and not np.all(np.isfinite(descriptors)):
    raise ValueError(f'{what} descriptors contain NaN or infinite values')
  return np.ascontiguousarray(descriptors, dtype=np.float32)


def build_search_index(descriptors: np.ndarray, index_kind: str = 'flat', *, nlist: int = 1024,
                       nprobe: int = 16, pq_bytes: int = 16, seed: int = 0) -> faiss.Index:
  """A faiss index over `descriptors` (see the module docstring for the kinds and trade-offs).

  Args:
    descriptors: float32 [N, D], N ≥ 1.
    index_kind: 'flat', 'ivf_flat' or 'ivf_pq'.
    nlist: IVF cells; lowered to N // 39 for small sets so every cell gets enough training
      vectors.
    nprobe: IVF cells visited per query (more: higher recall, slower).
    pq_bytes: 'ivf_pq' code size in bytes; must divide D.
    seed: k-means seed of the IVF training, so that the same descriptors give the same index.

  Returns:
    The trained index holding all `descriptors`, row i as id i.

  Raises:
    ValueError: an unknown kind, no descriptors, or `pq_bytes` not dividing D.
  """
  if index_kind not in INDEX_KINDS:
    raise ValueError(f'index_kind must be one of {", ".join(INDEX_KINDS)}, got {index_kind!r}')
  descriptors = _as_faiss_array(descriptors, 'index')
  count, dimension = descriptors.shape
  if count == 0 or dimension == 0:
    raise ValueError(f'cannot build a search index over {count} descriptors of {dimension} dims')
  if index_kind == 'flat':
    index = faiss.IndexFlatL2(dimension)
  else:
    cells = max(1, min(nlist, count // 39))
    quantizer = faiss.IndexFlatL2(dimension)
    if index_kind == 'ivf_flat':
      index = faiss.IndexIVFFlat(quantizer, dimension, cells)
    else:
      if dimension % pq_bytes:
        raise ValueError(f'pq_bytes ({pq_bytes}) must divide the descriptor size ({dimension})')
      index = faiss.IndexIVFPQ(quantizer, dimension, cells, pq_bytes, 8)
    index.cp.seed = seed
    with _bounded_threads():
      index.train(descriptors)
    index.nprobe = min(nprobe, cells)
  with _bounded_threads():
    index.add(descriptors)
  return index


def putative_matches(query: LocalFeatures, index: LocalFeatures, *,
                     max_distance: Optional[float] = None, ratio: Optional[float] = None,
                     mutual: bool = False, index_kind: str = 'flat',
                     search_index: Optional[faiss.Index] = None) -> np.ndarray:
  """Pairs each query feature with its nearest index feature, keeping pairs that pass the filters.

  Args:
    query: the query image's features.
    index: the index image's features (or several images' features concatenated).
    max_distance: keep pairs whose Euclidean descriptor distance is below this; None: no bound.
    ratio: Lowe's ratio test: keep pairs whose nearest distance is below `ratio` × the second
      nearest; None: no test. An index with a single feature has no second neighbour, and its pairs
      pass.
    mutual: also require the query feature to be the nearest neighbour of its index feature (an
      exact search over the query's features, whatever `index_kind`).
    index_kind: how `index.descriptors` are searched when `search_index` is None: 'flat' (one
      distance matrix, see the module docstring; of equally near features the earlier row wins),
      'ivf_flat' or 'ivf_pq' (built with `build_search_index`'s defaults).
    search_index: a faiss index already built over `index.descriptors` (row i as id i), reused
      across queries.

  Returns:
    int64 [M, 2] of (query row, index row), in query row order; [0, 2] if either set is empty or
    nothing passes.

  Raises:
    ValueError: the descriptor sizes differ, a threshold is out of range, or the arguments are
      otherwise inconsistent.
  """
  if max_distance is not None and not max_distance > 0:
    raise ValueError(f'max_distance must be positive, got {max_distance}')
  if ratio is not None and not 0 < ratio <= 1:
    raise ValueError(f'ratio must be in (0, 1], got {ratio}')
  if index_kind not in INDEX_KINDS:
    raise ValueError(f'index_kind must be one of {", ".join(INDEX_KINDS)}, got {index_kind!r}')
  query_descriptors = _as_faiss_array(query.descriptors, 'query')
  index_descriptors = _as_faiss_array(index.descriptors, 'index')
  if len(query_descriptors) == 0 or len(index_descriptors) == 0:
    return _NO_MATCHES.copy()
  if query_descriptors.shape[1] != index_descriptors.shape[1]:
    raise ValueError(f'descriptor sizes differ: query {query_descriptors.shape[1]}, index '
                     f'{index_descriptors.shape[1]}')
  if search_index is None and index_kind == 'flat':
    if query_descriptors.shape[1] == 0:
      # What build_search_index says of the same input on the other kinds.
      raise ValueError(f'cannot build a search index over {len(index_descriptors)} descriptors of '
                       '0 dims')
    query_rows, index_rows = _exact_matches(query_descriptors, index_descriptors, max_distance,
                                            ratio, mutual)
    return np.stack([query_rows, index_rows], axis=1)
  if search_index is None:
    search_index = build_search_index(index_descriptors, index_kind)
  elif (search_index.ntotal, search_index.d) != index_descriptors.shape:
    raise ValueError(f'search_index holds {search_index.ntotal} vectors of {search_index.d} dims, '
                     f'the index features {index_descriptors.shape}')
  neighbours = 2 if ratio is not None else 1
  with _bounded_threads():
    squared, nearest = search_index.search(query_descriptors, neighbours)
  # An IVF search can come back empty (-1) when the visited cells hold no vectors.
  second = None if ratio is None else np.where(nearest[:, 1] >= 0, squared[:, 1], np.inf)
  query_rows = np.flatnonzero((nearest[:, 0] >= 0) &
                              _passes(squared[:, 0], second, max_distance, ratio))
  index_rows = nearest[query_rows, 0].astype(np.int64)
  if mutual and len(query_rows):
    reverse = faiss.IndexFlatL2(query_descriptors.shape[1])
    reverse.add(query_descriptors)
    with _bounded_threads():
      _, back = reverse.search(np.ascontiguousarray(index_descriptors[index_rows]), 1)
    agrees = back[:, 0] == query_rows
    query_rows, index_rows = query_rows[agrees], index_rows[agrees]
  return np.stack([query_rows.astype(np.int64), index_rows], axis=1)


def _passes(first: np.ndarray, second: Optional[np.ndarray], max_distance: Optional[float],
            ratio: Optional[float]) -> np.ndarray:
  """Which nearest neighbours pass the distance bound and the ratio test, from squared distances.

  Args:
    first: squared distance of each query feature to its nearest index feature.
    second: squared distance to the second nearest (+inf where there is none); unused without
      `ratio`.
    max_distance: as `putative_matches`.
    ratio: as `putative_matches`.
  """
  keep = np.ones(len(first), bool)
  if max_distance is not None:
    keep &= first < max_distance * max_distance
  if ratio is not None:
    # Squared distances: d1 < r·d2 ⇔ d1² < r²·d2² for non-negative distances.
    keep &= first < ratio * ratio * second
  return keep


def _exact_matches(query_descriptors: np.ndarray, index_descriptors: np.ndarray,
                   max_distance: Optional[float], ratio: Optional[float],
                   mutual: bool) -> tuple[np.ndarray, np.ndarray]:
  """The flat path of `putative_matches`: every neighbour it needs from one distance matrix.

  The matrix is computed in blocks of at most MAX_MATRIX_ENTRIES entries (all query rows, a run
  of index columns). Each block gives every query row's nearest and second nearest within it,
  merged into the running ones (an earlier column wins a tie, as in a single argmin), and, for
  `mutual`, the reverse nearest (the first query row at the column's minimum) of the index columns
  that can still end up in a match: a query row's final nearest lies in some block, where it was
  that block's nearest and passed the filters on that block's distances (the final second nearest
  is no farther than the block's).

  Returns:
    int64 query rows (ascending) and the index row each is matched with.
  """
  count = len(query_descriptors)
  rows = np.arange(count)
  nearest = np.zeros(count, np.int64)
  first = np.full(count, np.inf, np.float32)
  second = np.full(count, np.inf, np.float32)
  reverse = np.full(len(index_descriptors), -1, np.int64)
  width = max(1, MAX_MATRIX_ENTRIES // count)
  for start in range(0, len(index_descriptors), width):
    with _bounded_threads():
      # |q|² + |x|² − 2·q·x with one sgemm of faiss's BLAS (see the module docstring).
      squared = faiss.pairwise_distances(query_descriptors,
                                         index_descriptors[start:start + width])
    block_nearest = squared.argmin(axis=1)
    block_first = squared[rows, block_nearest]
    block_second = np.full(count, np.inf, np.float32)
    if ratio is not None and squared.shape[1] > 1:
      squared[rows, block_nearest] = np.inf
      block_second = squared.min(axis=1)
      squared[rows, block_nearest] = block_first  # As it was, for the reverse nearest below.
    if mutual:
      candidates = np.unique(block_nearest[_passes(np.maximum(block_first, 0),
                                                   np.maximum(block_second, 0), max_distance,
                                                   ratio)])
      # Rows of the transposed block: the columns' values contiguous for argmin.
      reverse[start + candidates] = squared.T[candidates].argmin(axis=1)
    closer = block_first < first
    second = np.where(closer, np.minimum(first, block_second), np.minimum(second, block_first))
    first = np.where(closer, block_first, first)
    nearest = np.where(closer, start + block_nearest, nearest)
    # Freed before the next block is allocated: one block in memory at a time, not two.
    del squared
  # The expansion can go slightly negative for near-identical vectors; a distance cannot. Only the
  # picked values are clamped: clamping the matrix would only reorder near-identical vectors among
  # themselves, which rounding does anyway.
  query_rows = np.flatnonzero(_passes(np.maximum(first, 0), np.maximum(second, 0), max_distance,
                                      ratio))
  index_rows = nearest[query_rows]
  if mutual:
    agrees = reverse[index_rows] == query_rows
    query_rows, index_rows = query_rows[agrees], index_rows[agrees]
  return query_rows.astype(np.int64), index_rows
