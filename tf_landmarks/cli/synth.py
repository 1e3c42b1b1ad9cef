r"""tfl-synth: writes the built-in synthetic landmark world in the Google Landmarks Kaggle layout.

Examples:
  tfl-synth --flagfile=configs/synthetic_data.flags --output_dir=data/synthetic
  tfl-synth --output_dir=/tmp/big --num_landmarks=500 --num_train_images=20000 --image_size=640

Writes images/<id>.jpg, train.csv, test.csv, recognition_solution.csv and retrieval_solution.csv.
"""

from absl import flags

from tf_landmarks import synthetic
from tf_landmarks.cli import common

_OUTPUT_DIR = flags.DEFINE_string('output_dir', None, 'Destination folder (any tf.io.gfile path).',
                                  required=True)
_PROGRESS = flags.DEFINE_boolean('progress', True, 'Show a progress bar.')
common.define_flags(synthetic.WorldSpec)


def main() -> int:
  spec = common.from_flags(synthetic.WorldSpec)
  spec.validate()
  counts = synthetic.generate(_OUTPUT_DIR.value, spec, progress=_PROGRESS.value)
  print(f'Wrote {_OUTPUT_DIR.value}: {counts["train"]} train images of {spec.num_landmarks} '
        f'landmarks; {counts["queries_known"]} queries of known landmarks, {counts["queries_unseen"]} '
        f'of unseen landmarks, {counts["queries_none"]} without a landmark')
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
