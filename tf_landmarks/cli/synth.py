r"""tfl-synth: writes the built-in synthetic landmark world in the Google Landmarks Kaggle layout.

Examples:
  tfl-synth --flagfile=configs/synthetic_data.flags --output_dir=data/synthetic
  tfl-synth --output_dir=/tmp/big --num_landmarks=500 --num_train_images=20000 --image_size=640

Writes images/<id>.jpg, train.csv, test.csv, recognition_solution.csv and retrieval_solution.csv.
"""

import sys

from absl import app
from absl import flags

from tf_landmarks import synthetic

_DEFAULTS = synthetic.WorldSpec()

_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Destination folder (any tf.io.gfile path).',
                                  required=True)
_SEED = flags.DEFINE_integer('seed', _DEFAULTS.seed, 'Seed of the world: the same seed gives '
                             'byte-identical files.')
_NUM_LANDMARKS = flags.DEFINE_integer('num_landmarks', _DEFAULTS.num_landmarks,
                                      'Landmarks with training images.')
_NUM_UNSEEN = flags.DEFINE_integer('num_unseen_landmarks', _DEFAULTS.num_unseen_landmarks,
                                   'Extra landmarks that appear only among the test queries.')
_NUM_TRAIN = flags.DEFINE_integer('num_train_images', _DEFAULTS.num_train_images,
                                  'Training images, spread over the landmarks with a long tail (the '
                                  'last eighth of the landmarks get 1-2 images).')
_NUM_TEST = flags.DEFINE_integer('num_test_images', _DEFAULTS.num_test_images, 'Test queries.')
_NON_LANDMARK = flags.DEFINE_float('non_landmark_fraction', _DEFAULTS.non_landmark_fraction,
                                   'Share of test queries that show no landmark.')
_UNSEEN = flags.DEFINE_float('unseen_landmark_fraction', _DEFAULTS.unseen_landmark_fraction,
                             'Share of test queries that show a landmark unseen in training (their '
                             'ground truth is "no landmark", as in the Kaggle challenges).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', _DEFAULTS.image_size,
                                   'Long side of the images in pixels; aspect ratios vary.')
_JPEG_QUALITY = flags.DEFINE_integer('jpeg_quality', _DEFAULTS.jpeg_quality, 'JPEG quality.')
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  spec = synthetic.WorldSpec(
      seed=_SEED.value, num_landmarks=_NUM_LANDMARKS.value, num_unseen_landmarks=_NUM_UNSEEN.value,
      num_train_images=_NUM_TRAIN.value, num_test_images=_NUM_TEST.value,
      non_landmark_fraction=_NON_LANDMARK.value, unseen_landmark_fraction=_UNSEEN.value,
      image_size=_IMAGE_SIZE.value, jpeg_quality=_JPEG_QUALITY.value)
  try:
    spec.validate()
  except ValueError as error:
    print(f'tfl-synth: error: {error}', file=sys.stderr)
    return 2
  counts = synthetic.generate(_OUTPUT_DIR.value, spec, progress=_PROGRESS.value)
  print(f'Wrote {_OUTPUT_DIR.value}: {counts["train"]} train images of {spec.num_landmarks} '
        f'landmarks; {counts["queries_known"]} queries of known landmarks, {counts["queries_unseen"]} '
        f'of unseen landmarks, {counts["queries_none"]} without a landmark')
  return 0


def run():
  app.run(main)


if __name__ == '__main__':
  run()
