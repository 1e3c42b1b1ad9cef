r"""Latency and throughput of the exported classifier's signatures, in one process.

Sides, interleaved over --rounds rounds (bench/timing.py), median and range, for each batch size
of --batch_sizes (the first images of --images, JPEGs):

  bytes          serving_default on the encoded JPEGs (decoding, checks and crop in the graph)
  floats+decode  predict_images, after this process decodes each JPEG and resizes it to the
                 export's crop input (image_size / 0.875 square), as a client would
  floats         predict_images on images decoded and resized before the timing (the model's
                 own cost: crop, backbone, head)
  bytes_before   serving_default of --before, an export of the same run written by other code
                 (e.g. main's), if given; its outputs are compared with --export's bit for bit

Each sample is --calls calls of one side. The ratios are taken within each round: the targets are
bytes ≤ 1.5× the time of floats+decode for one image, and bytes ≥ 0.8× the images/s of floats for
a batch of 32.

Usage (from the repository root, after `make demo`):
  .venv/bin/python bench/bench_serving.py --export=exports/demo
  .venv/bin/python bench/bench_serving.py --export=/tmp/after --before=/tmp/before --rounds=9
"""

import glob
import json
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

import timing

_EXPORT = flags.DEFINE_string('export', 'exports/demo', 'The export folder (tfl-export) to time.')
_BEFORE = flags.DEFINE_string('before', None, 'Another export of the same run, timed beside it.')
_IMAGES = flags.DEFINE_string('images', 'data/synthetic/images', 'A folder of JPEG images.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '32'], 'Images per call.')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Interleaved rounds.', lower_bound=1)
_CALLS = flags.DEFINE_integer('calls', 8, 'Calls per sample with one image; batches of B images '
                              'make max(1, calls * 4 // B) calls.', lower_bound=1)


def _load(folder):
  """(the loaded SavedModel, serving_default, predict_images, the crop's side) of an export."""
  loaded = tf.saved_model.load(os.path.join(folder, 'classifier', '1'))
  with open(os.path.join(folder, 'export.json')) as f:
    image_size = int(json.load(f)['classifier']['image_size'])
  return (loaded, loaded.signatures['serving_default'], loaded.signatures['predict_images'],
          image_size)


def _client_decode(jpegs, side):
  """What a client of predict_images does: decode, resize to one size, stack."""
  return tf.stack([tf.image.resize(tf.io.decode_jpeg(jpeg, channels=3), [side, side])
                   for jpeg in jpegs])


def _timed(function, calls, items):
  def run():
    for _ in range(calls):
      function()
  return lambda: timing.time_call(run, calls * items)


def main(argv):
  del argv
  paths = sorted(glob.glob(os.path.join(_IMAGES.value, '*.jpg')))
  sizes = [int(size) for size in _BATCH_SIZES.value]
  if len(paths) < max(sizes):
    raise app.UsageError(f'--images={_IMAGES.value} has {len(paths)} JPEGs, fewer than '
                         f'{max(sizes)}')
  jpegs = [open(path, 'rb').read() for path in paths[:max(sizes)]]
  # The loaded objects are kept: their signatures need them alive.
  loaded = _load(_EXPORT.value)
  _, serve, floats, image_size = loaded
  loaded_before = _load(_BEFORE.value) if _BEFORE.value else None
  serve_before = loaded_before[1] if loaded_before else None
  side = int(round(image_size / 0.875))
  timing.print_line(f'start: {timing.load_note()}; {_EXPORT.value}, crop input {side} px')
  for size in sizes:
    batch = tf.constant(jpegs[:size])
    decoded = _client_decode(jpegs[:size], side)
    calls = max(1, _CALLS.value * 4 // size) if size > 1 else _CALLS.value
    sides = {
        'bytes': _timed(lambda: serve(images=batch), calls, size),
        'floats+decode': _timed(
            lambda: floats(images=_client_decode(jpegs[:size], side)), calls, size),
        'floats': _timed(lambda: floats(images=decoded), calls, size),
    }
    if serve_before is not None:
      sides['bytes_before'] = _timed(lambda: serve_before(images=batch), calls, size)
      after, before = serve(images=batch), serve_before(images=batch)
      same = all(np.array_equal(after[name].numpy(), before[name].numpy()) for name in after)
      timing.print_line(f'batch {size}: outputs of --export and --before '
                        f'{"identical bit for bit" if same else "DIFFER"}')
    for run in sides.values():  # Untimed first calls: tracing, the first pipeline set-up.
      run()
    samples = timing.interleave(sides, _ROUNDS.value)
    timing.print_line(f'batch {size}, {calls} calls per sample, {_ROUNDS.value} rounds:')
    for name, values in samples.items():
      ms = [1000 * sample.seconds / calls for sample in values]
      timing.print_line(f'  {name:14} {timing.spread(ms, 1, " ms/call")}, '
                        f'{timing.describe(values)}')
    timing.print_line('  bytes time / floats+decode time: ' + timing.spread(timing.ratios(
        samples['floats+decode'], samples['bytes'])) + ' (target for 1 image ≤ 1.5)')
    timing.print_line('  bytes img/s / floats img/s: ' + timing.spread(
        timing.ratios(samples['bytes'], samples['floats'])) + ' (target for 32 images ≥ 0.8)')
    if serve_before is not None:
      timing.print_line('  bytes_before time / bytes time: ' + timing.spread(
          timing.ratios(samples['bytes'], samples['bytes_before'])))
  timing.print_line(f'end: {timing.load_note()}')


if __name__ == '__main__':
  app.run(main)
