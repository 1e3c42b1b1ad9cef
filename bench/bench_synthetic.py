r"""Synthetic-world generation speed on one core, against plain JPEG encoding in the same run.

  generate  tf_landmarks.synthetic.generate: landmark textures, every view rendered and JPEG-encoded,
            files and CSVs written. The process is pinned to one core and OpenCV to one thread.
  encode    the floor: JPEG-encoding already-rendered images of the same sizes, with the same encoder.

Usage (from the repository root):
  .venv/bin/python bench/bench_synthetic.py
  .venv/bin/python bench/bench_synthetic.py --images=2000 --image_size=256

Prints images/s of both and generate/encode; the issue's target is ≥ 100 images/s at 256 px.
"""

import os
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import cv2

from tf_landmarks import images
from tf_landmarks import synthetic

_IMAGES = flags.DEFINE_integer('images', 1000, 'Images to generate (train + test).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 256, 'Long side of the images, px.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs; the best of each side is reported.')


def main(argv):
  del argv
  if hasattr(os, 'sched_setaffinity'):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
  cv2.setNumThreads(1)
  spec = synthetic.WorldSpec(num_landmarks=40, num_unseen_landmarks=8,
                             num_train_images=_IMAGES.value * 4 // 5,
                             num_test_images=_IMAGES.value // 5, image_size=_IMAGE_SIZE.value)
  best = {'generate': 0.0, 'encode': 0.0}
  rendered = []
  for _ in range(_REPEATS.value):
    with tempfile.TemporaryDirectory() as output_dir:
      start = time.perf_counter()
      synthetic.generate(output_dir, spec)
      best['generate'] = max(best['generate'], _IMAGES.value / (time.perf_counter() - start))
      if not rendered:  # Views as generated, decoded back: the encoder's input for the baseline.
        image_dir = os.path.join(output_dir, 'images')
        rendered = [cv2.cvtColor(cv2.imread(os.path.join(image_dir, name)), cv2.COLOR_BGR2RGB)
                    for name in sorted(os.listdir(image_dir))[:50]]
    start = time.perf_counter()
    for index in range(_IMAGES.value):
      images.encode_jpeg(rendered[index % len(rendered)], spec.jpeg_quality)
    best['encode'] = max(best['encode'], _IMAGES.value / (time.perf_counter() - start))
  print(f'{_IMAGES.value} images at {_IMAGE_SIZE.value} px on one core: generate '
        f'{best["generate"]:.0f} img/s, JPEG encoding alone {best["encode"]:.0f} img/s, '
        f'ratio {best["generate"] / best["encode"]:.2f}')


if __name__ == '__main__':
  app.run(main)
