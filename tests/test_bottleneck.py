"""The bottleneck stage's feature cache: written once, read back in memory or streamed from disk."""

import numpy as np
import pytest
import tensorflow as tf

from tf_landmarks import bottleneck
from tf_landmarks import data
from tf_landmarks import records as records_lib
from tf_landmarks.models import backbones
from helpers import synthetic_records

BATCH = 4


@pytest.fixture(scope='module')
def cached(tmp_path_factory):
  """The train split's pooled features of a random tiny backbone, in shards of 5 examples."""
  root = tmp_path_factory.mktemp('bottleneck')
  records = records_lib.load(str(synthetic_records(root, num_landmarks=3, num_train_images=24)))
  model = backbones.build('tiny', 64, 'none').model
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(bottleneck, '_EXAMPLES_PER_SHARD', 5)
    split = bottleneck.cache_features(model, 'tiny', records, 'train', 64, spatial=False,
                                      cache_dir=str(root / 'cache'), progress=False)
  assert len(split.files) > 2
  return split


def _examples(dataset, count):
  """The first `count` examples of a batched dataset, each as (feature bytes, label)."""
  out = []
  for features, labels in dataset.unbatch().take(count):
    out.append((features.numpy().tobytes(), int(labels)))
  return out


def test_evaluation_reads_every_example_once_in_order(cached):
  examples = _examples(bottleneck.feature_dataset(cached, False, BATCH), cached.examples + 1)
  assert len(examples) == cached.examples
  assert len(set(examples)) == cached.examples  # Random features: no two examples alike.


@pytest.mark.parametrize('budget', [1 << 40, 1000], ids=['in_memory', 'streamed'])
def test_training_sees_each_example_once_per_epoch(cached, monkeypatch, budget):
  monkeypatch.setattr(data, 'memory_budget', lambda: budget)
  every = set(_examples(bottleneck.feature_dataset(cached, False, BATCH), cached.examples))
  # Whole batches only: three epochs rounded down to batches, then the first two epochs compared.
  batches = 3 * cached.examples // BATCH
  seen = _examples(bottleneck.feature_dataset(cached, True, BATCH, seed=7), batches * BATCH)
  if budget == 1000:
    # A one-example shuffle buffer: the epochs do not mix, and each holds every example once.
    epochs = [seen[:cached.examples], seen[cached.examples:2 * cached.examples]]
    assert [sorted(epoch) for epoch in epochs] == [sorted(every)] * 2
    assert epochs[0] != epochs[1]  # The shards' order is reshuffled every epoch.
  assert set(seen) == every


def test_a_split_larger_than_the_memory_budget_is_streamed_not_cached(cached, monkeypatch):
  cache_calls = []
  original = tf.data.Dataset.cache
  monkeypatch.setattr(tf.data.Dataset, 'cache',
                      lambda self, *a, **k: cache_calls.append(1) or original(self, *a, **k))
  example_bytes = 2 * int(np.prod(cached.shape))
  monkeypatch.setattr(data, 'memory_budget', lambda: 2 * cached.examples * example_bytes // 3)
  bottleneck.feature_dataset(cached, True, BATCH, seed=1)
  assert not cache_calls
  monkeypatch.setattr(data, 'memory_budget', lambda: 4 * cached.examples * (example_bytes + 64))
  bottleneck.feature_dataset(cached, True, BATCH, seed=1)
  assert cache_calls == [1]


def test_the_same_seed_gives_the_same_stream(cached, monkeypatch):
  monkeypatch.setattr(data, 'memory_budget', lambda: 1000)
  first, second = (_examples(bottleneck.feature_dataset(cached, True, BATCH, seed=3), 40)
                   for _ in range(2))
  assert first == second
