"""Shared test builders: small images, CSV + image folders, records folders, the real-photo set."""

import csv
import importlib
import io
import os
import pathlib
import sys
from typing import Dict, Sequence, Tuple

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tf_landmarks import ingest
from tf_landmarks import records
from tf_landmarks import schema

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / 'shared' / 'data' / 'landmarks-real'

requires_real_data = pytest.mark.skipif(
    not (REAL_DATA / 'train.csv').exists(),
    reason=f'the real-photo set is not at {REAL_DATA} (clone the project with ../shared beside it)')

# Google's GLDv2 scoring code (tensorflow/models, DELF), the judge of our scores and of the files we
# write; `official_scoring(name)` imports one of its modules.
OFFICIAL_SCORING = REPO.parent / 'shared' / 'reference' / 'gldv2_scoring'
OFFICIAL_SCORING_PACKAGE = 'delf.python.datasets.google_landmarks_dataset'

requires_official_scoring = pytest.mark.skipif(
    not (OFFICIAL_SCORING / 'delf').is_dir(),
    reason=f'Google\'s GLDv2 scoring code is not at {OFFICIAL_SCORING} (clone the project with '
           '../shared beside it)')


def official_scoring(name: str):
  """The module `name` (metrics, dataset_file_io, …) of Google's scoring code."""
  if str(OFFICIAL_SCORING) not in sys.path:
    sys.path.insert(0, str(OFFICIAL_SCORING))
  return importlib.import_module(f'{OFFICIAL_SCORING_PACKAGE}.{name}')


GOOD_ROWS = [(f'good{i:02d}', 100 + i % 3) for i in range(18)]


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
  """A smooth random-coloured RGB image (JPEG-friendly, so pixel round trips stay within tolerance)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def jpeg_bytes(width: int = 96, height: int = 64, seed: int = 0, quality: int = 95) -> bytes:
  buffer = io.BytesIO()
  pattern_image(width, height, seed).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def flat_jpeg(colour, width: int = 80, height: int = 60) -> bytes:
  """A JPEG of one flat colour (crops and flips keep it, so tests can tell classes apart)."""
  buffer = io.BytesIO()
  Image.new('RGB', (width, height), colour).save(buffer, format='JPEG', quality=95)
  return buffer.getvalue()


def write_dataset(root, rows, extra_files=None, sizes=None):
  """Writes images/<id>.jpg for every (id, landmark_id) row and a train.csv listing them."""
  image_dir = root / 'images'
  image_dir.mkdir(parents=True, exist_ok=True)
  for index, (image_id, _) in enumerate(rows):
    width, height = (sizes or {}).get(image_id, (96, 72))
    (image_dir / f'{image_id}.jpg').write_bytes(jpeg_bytes(width, height, seed=index))
  for name, data in (extra_files or {}).items():
    (image_dir / name).write_bytes(data)
  with open(root / 'train.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', 'url', 'landmark_id'])
    for image_id, landmark_id in rows:
      writer.writerow([image_id, f'http://example.invalid/{image_id}.jpg', landmark_id])
  return image_dir


def config_for(root, **overrides) -> ingest.BuildConfig:
  """A small, fast build of the dataset `write_dataset` wrote under `root`."""
  settings = dict(output_dir=str(root / 'records'), train_csv=str(root / 'train.csv'),
                  image_dir=str(root / 'images'), validation_fraction=0.25, max_image_size=64,
                  examples_per_shard=7, num_workers=1, progress=False)
  settings.update(overrides)
  return ingest.BuildConfig(**settings)


def read_split(output_dir, split) -> Dict[str, dict]:
  """All examples of a split as a dict id → parsed numpy fields (decoded image under 'pixels')."""
  paths = sorted(tf.io.gfile.glob(os.path.join(output_dir, f'{split}-*-of-*')))
  examples = {}
  for record in tf.data.TFRecordDataset(paths):
    parsed = {k: v.numpy() for k, v in schema.parse_example(record).items()}
    parsed['pixels'] = tf.io.decode_jpeg(parsed[schema.ENCODED]).numpy()
    examples[parsed[schema.ID].decode()] = parsed
  return examples


def write_records(root, split_examples: Dict[str, Sequence[Tuple[str, bytes, int]]],
                  class_counts: Sequence[int], shards_per_split: int = 1) -> str:
  """A finished records folder written directly (no image processing): the readers' fixture.

  Args:
    root: the folder to create.
    split_examples: per split, (image id, JPEG bytes, label) triples; label -1 for test.
    class_counts: training images per label, for the label map (landmark id = 1000 + label).
    shards_per_split: examples are dealt round-robin into this many shards.

  Returns:
    The folder's path.
  """
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  splits = {}
  for split in records.SPLITS:
    examples = list(split_examples.get(split, ()))
    count = min(shards_per_split, len(examples))
    shards = []
    for shard in range(count):
      name = records.shard_name(split, shard, count)
      part = examples[shard::count]
      with tf.io.TFRecordWriter(str(root / name)) as writer:
        for image_id, jpeg, label in part:
          height, width = Image.open(io.BytesIO(jpeg)).size[::-1]
          writer.write(schema.make_example(
              image_id, jpeg, height, width, label,
              1000 + label if label >= 0 else schema.NO_LABEL).SerializeToString())
      shards.append({'file': name, 'examples': len(part), 'bytes': (root / name).stat().st_size})
    splits[split] = {'examples': len(examples), 'shards': shards}
  records.write_label_map(str(root), ((label, 1000 + label, count)
                                      for label, count in enumerate(class_counts)))
  records.write_manifest(str(root), {'num_classes': len(class_counts), 'splits': splits,
                                     'config': {'max_image_size': 0}, 'dropped_classes': 0,
                                     'skipped': {'total': 0, 'by_reason': {}, 'rows': []}})
  return str(root)


def synthetic_records(root, num_landmarks: int, num_train_images: int, num_test_images: int = 4,
                      examples_per_shard: int = 64, **build) -> pathlib.Path:
  """A small synthetic world (128 px, seed 3) built into `root/records` (96 px): training fixtures."""
  from tf_landmarks import synthetic  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  synthetic.generate(str(root / 'world'), synthetic.WorldSpec(
      seed=3, num_landmarks=num_landmarks, num_unseen_landmarks=1,
      num_train_images=num_train_images, num_test_images=num_test_images, image_size=128))
  settings = dict(output_dir=str(root / 'records'), train_csv=str(root / 'world' / 'train.csv'),
                  image_dir=str(root / 'world' / 'images'), validation_fraction=0.2,
                  max_image_size=96, examples_per_shard=examples_per_shard, num_workers=1,
                  progress=False)
  settings.update(build)
  ingest.build_records(ingest.BuildConfig(**settings))
  return root / 'records'


def trained_world(root, backend: str = 'sift', num_landmarks: int = 5,
                  num_train_images: int = 50, num_test_images: int = 16,
                  classifier_epochs: int = 2) -> Dict[str, str]:
  """A synthetic world with its records (test split included), a tiny classifier and an index.

  With backend 'delf' a DELF run is trained on the classifier and the index uses its features
  (three scales, 16-d PCA, to stay quick). The prediction and export tests' fixture.

  Returns:
    Paths: 'world' (the CSVs and images), 'records', 'classifier', 'delf' (or None), 'index'.
  """
  from tf_landmarks import data  # pylint: disable=g-import-not-at-top
  from tf_landmarks import train  # pylint: disable=g-import-not-at-top
  from tf_landmarks import index_builder  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(root)
  world = root / 'world'
  synthetic_records(root, num_landmarks, num_train_images, num_test_images,
                    examples_per_shard=32, max_image_size=128, test_csv=str(world / 'test.csv'))

  def run(name, **overrides):
    settings = dict(records_dir=str(root / 'records'), workdir=str(root / name), backbone='tiny',
                    weights='none', head='softmax', batch_size=16, epochs=classifier_epochs,
                    optimizer='adam', learning_rate=0.003, progress=False)
    settings.update(overrides)
    train.train(train.TrainConfig(**settings), data.InputConfig(image_size=64))
    return str(root / name)

  classifier = run('classifier')
  delf = run('delf', mode=train.Mode.DELF, weights='', init_from=classifier, epochs=1) \
      if backend == 'delf' else None
  index_settings = dict(run=classifier, local_features=backend, output_dir=str(root / 'index'),
                        split='train+validation', progress=False)
  if delf:
    index_settings.update(delf_run=delf, delf_scales='0.5,1,2', pca_dim=16)
  index_builder.build_index(index_builder.IndexConfig(**index_settings))
  return {'world': str(world), 'records': str(root / 'records'), 'classifier': classifier,
          'delf': delf, 'index': str(root / 'index')}
