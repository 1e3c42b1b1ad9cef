r"""Synthetic-world generation speed on one core, against plain JPEG encoding in the same run.

  generate  tf_landmarks.synthetic.generate: landmark textures, every view rendered and JPEG-encoded,
            files and CSVs written. The process is pinned to one core and OpenCV to one thread.
  encode    the floor: JPEG-encoding already-rendered images of the same sizes, with the same encoder.

Usage (from the repository root):
  .venv/bin/python bench/bench_synthetic.py
  .venv/bin/python bench/bench_synthetic.py --images=2000 --image_size=256

Prints images/s of both sides and generate/encode per round as median (range), interleaved over
--rounds; the target is ≥ 100 images/s at 256 px.
"""

import os
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import cv2

import timing
from tf_landmarks import images
from tf_landmarks import synthetic

_IMAGES = flags.DEFINE_integer('images', 1000, 'Images to generate (train + test).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 256, 'Long side of the images, px.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; median and range are reported.',
                               lower_bound=1)


def main(argv):
  del argv
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  cv2.setNumThreads(1)
  spec = synthetic.WorldSpec(num_landmarks=40, num_unseen_landmarks=8,
                             num_train_images=_IMAGES.value * 4 // 5,
                             num_test_images=_IMAGES.value // 5, image_size=_IMAGE_SIZE.value)
  with tempfile.TemporaryDirectory() as output_dir:
    # Views as generated, decoded back: the encoder's input for the baseline.
    synthetic.generate(output_dir, synthetic.WorldSpec(
        num_landmarks=8, num_unseen_landmarks=0, num_train_images=40, num_test_images=10,
        unseen_landmark_fraction=0.0, image_size=_IMAGE_SIZE.value))
    image_dir = os.path.join(output_dir, 'images')
    rendered = [cv2.cvtColor(cv2.imread(os.path.join(image_dir, name)), cv2.COLOR_BGR2RGB)
                for name in sorted(os.listdir(image_dir))]

  def generate():
    with tempfile.TemporaryDirectory() as output_dir:
      return timing.time_call(lambda: synthetic.generate(output_dir, spec), _IMAGES.value)

  def encode():
    return timing.time_call(lambda: [images.encode_jpeg(rendered[i % len(rendered)],
                                                        spec.jpeg_quality)
                                     for i in range(_IMAGES.value)], _IMAGES.value)

  samples = timing.interleave({'generate': generate, 'encode': encode}, _ROUNDS.value)
  timing.print_line(
      f'{_IMAGES.value} images at {_IMAGE_SIZE.value} px on one core, {_ROUNDS.value} rounds, '
      f'median (range):\n'
      f'  generate            {timing.describe(samples["generate"])}  (target >= 100 img/s)\n'
      f'  JPEG encoding alone {timing.describe(samples["encode"])}\n'
      f'  generate/encode     {timing.spread(timing.ratios(samples["generate"], samples["encode"]))}'
      f'\n  {timing.load_note()}')


if __name__ == '__main__':
  app.run(main)
