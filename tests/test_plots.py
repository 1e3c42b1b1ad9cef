"""The evaluation pictures: each PNG is written and decodes, and the numbers drawn are hand-checked."""

import numpy as np
import pytest
from PIL import Image

from tf_landmarks import plots
from tf_landmarks import submission

# q6 shows landmarks 2 and 3, q5 none; q4 abstains, q7 has no prediction at all.
SOLUTION = {'q1': frozenset({2}), 'q2': frozenset({3}), 'q3': frozenset({1}), 'q4': frozenset({3}),
            'q5': frozenset(), 'q6': frozenset({2, 3}), 'q7': frozenset({1})}
PREDICTIONS = {'q1': (2, 0.9), 'q2': (1, 0.8), 'q3': (1, 0.7), 'q4': None, 'q5': (4, 0.6),
               'q6': (3, 0.5)}


def assert_is_a_picture(path, min_width=300, min_height=200):
  """The file is a PNG of a sensible size with more than one colour in it."""
  with Image.open(path) as image:
    assert image.format == 'PNG'
    assert image.width >= min_width and image.height >= min_height, image.size
    pixels = np.asarray(image.convert('RGB'))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_confusion_matrix_counts_every_query_once(tmp_path):
  path = tmp_path / 'confusion.png'
  matrix = plots.confusion_matrix(PREDICTIONS, SOLUTION, str(path), num_classes=2)
  # The two most frequent test landmarks: 3 (q2, q4, q6) and 1 (q3, q7); 2 (q1) is "other" (q6
  # counts under 3, the landmark predicted for it). Rows are the truth, columns the prediction.
  assert matrix.labels == ('3', '1', plots.OTHER_LABEL, plots.NONE_LABEL)
  np.testing.assert_array_equal(matrix.counts, [
      [1, 1, 0, 1],  # q6 → 3, q2 → 1, q4 no prediction.
      [0, 1, 0, 1],  # q3 → 1, q7 no prediction.
      [0, 0, 1, 0],  # q1 (landmark 2) → 2, another landmark.
      [0, 0, 1, 0],  # q5 shows none → 4, another landmark.
  ])
  assert_is_a_picture(path)


def test_precision_recall_curve_is_the_ranking_gap_scores(tmp_path):
  path = tmp_path / 'pr.png'
  first_stage = {**PREDICTIONS, 'q4': (3, 0.95)}
  curves = plots.precision_recall_curve({'first stage only': first_stage, 'verified': PREDICTIONS},
                                        SOLUTION, str(path))
  # Ranked: q1 .9 ✓, q2 .8 ✗, q3 .7 ✓, q5 .6 ✗ (no landmark), q6 .5 ✓; 6 landmark queries.
  verified = curves['verified']
  np.testing.assert_allclose(verified.precision, [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
  np.testing.assert_allclose(verified.recall, [1 / 6, 1 / 6, 2 / 6, 2 / 6, 3 / 6])
  for name, predictions in (('verified', PREDICTIONS), ('first stage only', first_stage)):
    assert curves[name].gap == pytest.approx(
        submission.score_recognition(predictions, SOLUTION)['gap'])
  assert curves['first stage only'].precision[0] == 1.0  # q4 .95 ✓ comes first.
  assert_is_a_picture(path)


def test_precision_recall_curve_of_a_submission_without_predictions(tmp_path):
  curves = plots.precision_recall_curve({'empty': {}}, SOLUTION, str(tmp_path / 'pr.png'))
  assert curves['empty'].gap == 0.0 and curves['empty'].precision.size == 0
  assert_is_a_picture(tmp_path / 'pr.png')


def test_class_frequency_histogram_bins_every_class_with_images(tmp_path):
  path = tmp_path / 'histogram.png'
  counts = [1, 1, 2, 3, 7, 40, 40, 1000, 0]
  edges, per_bin = plots.class_frequency_histogram(counts, str(path))
  assert per_bin.sum() == 8  # The class without images has no place on the log axis.
  assert edges[0] == 1 and edges[-1] > 1000
  assert per_bin[np.searchsorted(edges, 40, side='right') - 1] == 2
  assert per_bin[0] == 2  # The two classes of one image.
  assert_is_a_picture(path)
  with pytest.raises(ValueError, match='no class counts'):
    plots.class_frequency_histogram([], str(tmp_path / 'none.png'))
