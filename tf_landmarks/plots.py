"""The evaluation's pictures as PNGs: class imbalance, confusion of the frequent classes, PR curves.

Each function takes plain data, writes one PNG (any `tf.io.gfile` path) and returns the numbers it
drew, so that callers and tests can check them. Figures are drawn on matplotlib's Agg canvas
directly, not through pyplot: no display, no global figure state, safe in any process.
"""

import collections
import dataclasses
import io
from typing import Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

from matplotlib.backends import backend_agg
from matplotlib import colors
from matplotlib import figure
from matplotlib import ticker
import numpy as np

from tf_landmarks import files
from tf_landmarks import metrics
from tf_landmarks import submission

NONE_LABEL = 'none'
OTHER_LABEL = 'other'
_DPI = 100
# Beyond this many rows the counts no longer fit in their cells; the colours still tell.
_MAX_ANNOTATED_CLASSES = 20


def _save(fig: figure.Figure, png_path: str) -> None:
  backend_agg.FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=_DPI)
  files.write_atomically(png_path, buffer.getvalue())


def class_frequency_histogram(class_counts: Sequence[int], png_path: str
                              ) -> Tuple[np.ndarray, np.ndarray]:
  """Histogram of training images per class on log-log axes: the long tail of a landmark set.

  Args:
    class_counts: training images of each class (`records.load(path).class_counts`).
    png_path: the PNG to write.

  Returns:
    (bin_edges [B+1], classes per bin [B]); classes with 0 images (no place on a log axis) are
    left out of the bins and named in the title.

  Raises:
    ValueError: no class counts.
  """
  counts = np.asarray(class_counts, np.int64)
  if counts.size == 0:
    raise ValueError('no class counts to plot')
  shown = counts[counts > 0]
  largest = int(shown.max()) if shown.size else 1
  # Integer edges spaced evenly on the log axis; unique because small counts round together.
  edges = np.unique(np.round(np.logspace(0, np.log10(largest + 1), 40)))
  if edges.size < 2:
    edges = np.array([1.0, 2.0])
  per_bin, _ = np.histogram(shown, bins=edges)
  fig = figure.Figure(figsize=(7, 4))
  axes = fig.add_subplot()
  axes.bar(edges[:-1], per_bin, width=np.diff(edges), align='edge', color='#4a7ab5',
           edgecolor='white', linewidth=0.5)
  axes.set_xscale('log')
  axes.set_yscale('log')
  # Plain numbers: the default 4×10⁰ labels of a short log axis are hard to read. LogFormatter
  # still labels the in-between ticks only when the axis spans few decades.
  for axis in (axes.xaxis, axes.yaxis):
    axis.set_major_formatter(ticker.LogFormatter())
    axis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
  axes.set_xlabel('training images per class')
  axes.set_ylabel('number of classes')
  empty = int((counts == 0).sum())
  title = (f'{counts.size} classes: median {np.median(counts):g} images, max {counts.max()}; '
           f'{int((counts <= 2).sum())} with at most 2')
  axes.set_title(title + (f' ({empty} with none)' if empty else ''), fontsize=10)
  axes.grid(True, which='major', alpha=0.3)
  fig.tight_layout()
  _save(fig, png_path)
  return edges, per_bin


@dataclasses.dataclass(frozen=True)
class ConfusionMatrix:
  """Counts of (true row, predicted column) over the test queries.

  Attributes:
    labels: row and column names: the landmark ids (as text), then OTHER_LABEL (every other
      landmark), then NONE_LABEL (row: no landmark in the query; column: no prediction).
    counts: int64 [L, L].
  """
  labels: Tuple[str, ...]
  counts: np.ndarray


def confusion_matrix(predictions: Mapping[str, submission.Prediction],
                     solution: Mapping[str, FrozenSet[int]], png_path: str,
                     num_classes: int = 15) -> ConfusionMatrix:
  """The confusion matrix of the test solution's most frequent landmarks, drawn row-normalised.

  Every query lands in one cell, so each row sums to its queries. A query showing several
  landmarks counts under one (`submission.scored_landmark`).

  Args:
    predictions: query id → (landmark id, confidence) or None.
    solution: query id → its landmark ids (empty for no landmark).
    png_path: the PNG to write.
    num_classes: how many landmarks get a row and column (the most frequent in `solution`; ties go
      to the smaller id).

  Returns:
    The matrix as drawn.
  """
  truth = {query: submission.scored_landmark(landmarks, predictions.get(query))
           for query, landmarks in solution.items()}
  frequency = collections.Counter(landmark for landmark in truth.values() if landmark is not None)
  top = sorted(frequency, key=lambda landmark: (-frequency[landmark], landmark))[:num_classes]
  position = {landmark: i for i, landmark in enumerate(top)}
  other, none = len(top), len(top) + 1

  def cell(landmark: Optional[int]) -> int:
    return none if landmark is None else position.get(landmark, other)

  counts = np.zeros((len(top) + 2, len(top) + 2), np.int64)
  for query, landmark in truth.items():
    prediction = predictions.get(query)
    counts[cell(landmark), cell(None if prediction is None else prediction[0])] += 1
  labels = (*(str(landmark) for landmark in top), OTHER_LABEL, NONE_LABEL)
  _draw_confusion(counts, labels, png_path)
  return ConfusionMatrix(labels=labels, counts=counts)


def _draw_confusion(counts: np.ndarray, labels: Sequence[str], png_path: str) -> None:
  rows = counts.sum(axis=1, keepdims=True)
  fractions = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
  side = min(10.0, 3.0 + 0.36 * len(labels))
  fig = figure.Figure(figsize=(side + 1.5, side))
  axes = fig.add_subplot()
  image = axes.imshow(fractions, cmap='Blues', norm=colors.Normalize(0, 1))
  fig.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label='fraction of the row')
  ticks = np.arange(len(labels))
  axes.set_xticks(ticks, labels, rotation=60, ha='right', fontsize=8)
  axes.set_yticks(ticks, [f'{label} ({rows[i, 0]})' for i, label in enumerate(labels)],
                  fontsize=8)
  axes.set_xlabel('predicted landmark')
  axes.set_ylabel('true landmark (queries)')
  # Lines fence off the aggregate rows and columns from the per-landmark block.
  for edge in (len(labels) - 2.5, len(labels) - 1.5):
    axes.axhline(edge, color='#888888', linewidth=0.8)
    axes.axvline(edge, color='#888888', linewidth=0.8)
  if len(labels) <= _MAX_ANNOTATED_CLASSES + 2:
    for (row, column), count in np.ndenumerate(counts):
      if count:
        axes.text(column, row, str(count), ha='center', va='center', fontsize=7,
                  color='white' if fractions[row, column] > 0.5 else 'black')
  axes.set_title(f'Confusion of the {len(labels) - 2} most frequent test landmarks', fontsize=10)
  fig.tight_layout()
  _save(fig, png_path)


def precision_recall_curve(submissions: Mapping[str, Mapping[str, submission.Prediction]],
                           solution: Mapping[str, FrozenSet[int]], png_path: str
                           ) -> Dict[str, metrics.GapRanking]:
  """Draws the precision–recall curve of each submission (e.g. first stage only and verified).

  The curve is the ranking GAP scores (`submission.recognition_ranking`): all predictions by
  confidence, precision over the predictions so far, recall over the landmark queries, a
  prediction on a query without a landmark counting as wrong, as on Kaggle.

  Args:
    submissions: name for the legend → predictions (query id → (landmark id, confidence) or None).
    solution: query id → its landmark ids (empty for no landmark).
    png_path: the PNG to write.

  Returns:
    name → its curve, as drawn.
  """
  curves = {name: submission.recognition_ranking(predictions, solution)
            for name, predictions in submissions.items()}
  fig = figure.Figure(figsize=(6, 4.5))
  axes = fig.add_subplot()
  for name, curve in curves.items():
    # Start at recall 0 with the first prediction's precision, so a curve of one point shows
    # (and one of no prediction is a point at 0, still in the legend).
    recall = np.concatenate([[0.0], curve.recall])
    precision = np.concatenate([curve.precision[:1] if curve.precision.size else [0.0],
                                curve.precision])
    axes.step(recall, precision, where='post', linewidth=1.5, label=f'{name} (GAP {curve.gap:.3f})')
  axes.set_xlim(0, 1)
  axes.set_ylim(0, 1.02)
  axes.set_xlabel('recall (of the landmark queries)')
  axes.set_ylabel('precision (of the predictions so far)')
  axes.set_title('Recognition predictions ranked by confidence', fontsize=10)
  axes.grid(True, alpha=0.3)
  if curves:
    axes.legend(loc='lower left', fontsize=9)
  fig.tight_layout()
  _save(fig, png_path)
  return curves
