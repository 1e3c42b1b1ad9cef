r"""evaluate_pairs: how well a local-feature backend tells same-landmark image pairs from the rest.

Examples:
  python -m tf_landmarks.cli.evaluate_pairs --backend=sift --data_dir=data/synthetic
  python -m tf_landmarks.cli.evaluate_pairs --backend=sift \
      --data_dir=../shared/data/landmarks-real --max_pairs_per_kind=0
  python -m tf_landmarks.cli.evaluate_pairs --backend=delf --delf_run=runs/demo_delf \
      --data_dir=data/synthetic --max_pairs_per_kind=400
  python -m tf_landmarks.cli.evaluate_pairs --backend=sift --data_dir=my_photos \
      --pairs_csv=my_photos/pairs.csv --max_pairs_per_kind=0

Scores pairs of images of a folder in the Google Landmarks layout (train.csv, test.csv,
recognition_solution.csv, images/), or the pairs --pairs_csv lists, by the inliers of geometric
verification, and prints the inlier distribution of each pair kind, the ROC AUCs of same-landmark
pairs against the rest, and how many pairs each inlier threshold accepts
(tf_landmarks/local_features/evaluate.py).
"""

from absl import flags

from tf_landmarks.cli import common
from tf_landmarks.local_features import evaluate
from tf_landmarks.local_features import ransac

_BACKEND = flags.DEFINE_enum('backend', 'sift', sorted(evaluate.BACKENDS), 'Local-feature backend.')
_DELF_RUN = flags.DEFINE_string('delf_run', None, 'For --backend=delf: a run of tfl-train '
                                '--mode=delf.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Folder in the Google Landmarks layout '
                                '(train.csv, test.csv, recognition_solution.csv, images/); with '
                                '--pairs_csv only its images/<id>.jpg are read.', required=True)
_PAIRS_CSV = flags.DEFINE_string(
    'pairs_csv', None, 'Score these pairs instead of those of the folder\'s CSVs: a CSV with the '
    'columns id_a,id_b,same (image ids of --data_dir/images/; same: 1 for two images of one '
    'landmark, 0 for different landmarks).')
_MAX_FEATURES = flags.DEFINE_integer('max_features', 1000, 'Features per image.', lower_bound=1)
_MAX_SIDE = flags.DEFINE_integer('max_side', 0, 'Downscale larger images to this longer side '
                                 'before extraction; 0: never.', lower_bound=0)
_RATIO = flags.DEFINE_float('ratio', 0.8, "Lowe's ratio test; 0: off.", lower_bound=0,
                            upper_bound=1)
_MAX_DISTANCE = flags.DEFINE_float('max_distance', 0, 'Descriptor distance bound; 0: none.',
                                   lower_bound=0)
_MUTUAL = flags.DEFINE_boolean('mutual', True, 'Keep only mutual nearest neighbours.')
_RESIDUAL_THRESHOLD = flags.DEFINE_float('residual_threshold', 10.0, 'RANSAC inlier distance in '
                                         'pixels.', lower_bound=0.1)
_MAX_TRIALS = flags.DEFINE_integer('max_trials', 1000, 'RANSAC trials.', lower_bound=1)
_METHOD = flags.DEFINE_enum('method', 'ransac', sorted(ransac.METHODS), 'Robust fit.')
_MAX_PAIRS_PER_KIND = flags.DEFINE_integer('max_pairs_per_kind', 2000, 'Sample each pair kind '
                                           'down to this many pairs; 0: all.', lower_bound=0)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the pair sampling and of RANSAC.')
_INLIER_THRESHOLD = flags.DEFINE_multi_integer(
    'inlier_threshold', [6, 8, 10, 15, 20], 'Report the share of pairs accepted at this many '
    'inliers (repeat the flag for several).')


def main() -> int:
  backend_fn = evaluate.BACKENDS[_BACKEND.value](_MAX_FEATURES.value, _MAX_SIDE.value or None,
                                                 _DELF_RUN.value)
  settings = evaluate.VerifySettings(
      ratio=_RATIO.value or None, max_distance=_MAX_DISTANCE.value or None, mutual=_MUTUAL.value,
      residual_threshold=_RESIDUAL_THRESHOLD.value, max_trials=_MAX_TRIALS.value,
      method=_METHOD.value, seed=_SEED.value)
  listed = f' (pairs of {_PAIRS_CSV.value})' if _PAIRS_CSV.value else ''
  print(f'{_DATA_DIR.value}{listed}: backend {_BACKEND.value}, {_MAX_FEATURES.value} features, '
        f'ratio {settings.ratio}, distance bound {settings.max_distance}, mutual {settings.mutual}, '
        f'{settings.method} {settings.residual_threshold:g} px / {settings.max_trials} trials')
  evaluation = evaluate.evaluate_folder(_DATA_DIR.value, backend_fn, settings,
                                        _MAX_PAIRS_PER_KIND.value, _SEED.value, _PAIRS_CSV.value)
  for line in evaluate.report_lines(evaluation.scores, _INLIER_THRESHOLD.value):
    print(line)
  if evaluation.skipped_rows or evaluation.failures:
    example = next(iter(evaluation.failures.items()), None)
    print(f'skipped: {evaluation.skipped_rows} unusable CSV rows, {len(evaluation.failures)} '
          'unreadable images' + (f' (e.g. {example[0]}: {example[1]})' if example else ''))
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
