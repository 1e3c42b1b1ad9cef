"""Stratified split on worked examples."""

import collections

import pytest

from tf_landmarks import splits
from tf_landmarks.splits import Singletons


def _classes(landmark_ids, indices):
  return collections.Counter(landmark_ids[i] for i in indices)


def test_every_class_keeps_a_training_image_and_labels_are_contiguous():
  landmark_ids = [5] * 10 + [9] * 2 + [2] * 3 + [7]
  split = splits.stratified_split(landmark_ids, 0.5, seed=0)
  assert set(_classes(landmark_ids, split.train)) == {2, 5, 7, 9}
  assert split.label_of_landmark == {2: 0, 5: 1, 7: 2, 9: 3}
  assert sorted(split.train + split.validation) == list(range(len(landmark_ids)))
  assert not set(split.train) & set(split.validation)
  # Class 5 (10 images, f=0.5) sends exactly 5 to validation; class 9 (2 images) at most 1.
  assert _classes(landmark_ids, split.validation)[5] == 5
  assert _classes(landmark_ids, split.validation)[9] <= 1


def test_validation_share_is_the_fraction_overall_even_for_tiny_classes():
  landmark_ids = [c for c in range(2000) for _ in range(3)]  # 2000 classes of 3 images.
  split = splits.stratified_split(landmark_ids, 0.1, seed=1)
  share = len(split.validation) / len(landmark_ids)
  assert 0.08 < share < 0.12  # Plain rounding would give 0 (3 * 0.1 rounds to 0).


def test_same_seed_same_split_other_seed_other_split():
  landmark_ids = [c % 50 for c in range(1000)]
  first = splits.stratified_split(landmark_ids, 0.2, seed=3)
  again = splits.stratified_split(landmark_ids, 0.2, seed=3)
  other = splits.stratified_split(landmark_ids, 0.2, seed=4)
  assert first.validation == again.validation
  assert first.validation != other.validation


@pytest.mark.parametrize('policy,singleton_in_train,duplicated,classes', [
    (Singletons.TRAIN, True, [], 2),
    (Singletons.DUPLICATE, True, [2], 2),
    (Singletons.DROP, False, [], 1),
])
def test_singleton_policies(policy, singleton_in_train, duplicated, classes):
  landmark_ids = [1, 1, 8]  # Class 8 has a single image (index 2).
  split = splits.stratified_split(landmark_ids, 0.5, seed=0, singletons=policy)
  # Class 1 (two images, f=0.5) always sends one image to each side.
  assert len(split.validation) == 1 and split.validation[0] in (0, 1)
  assert (2 in split.train) == singleton_in_train
  assert split.duplicated == duplicated
  assert len(split.label_of_landmark) == classes
  assert (2 in split.dropped) == (not singleton_in_train)


def test_min_images_per_class_drops_small_classes_with_reason():
  landmark_ids = [1, 1, 1, 2, 2, 3]
  split = splits.stratified_split(landmark_ids, 0.0, seed=0, min_images_per_class=3)
  assert split.label_of_landmark == {1: 0}
  assert sorted(split.dropped) == [3, 4, 5]
  assert 'min_images_per_class=3' in split.dropped[3]


def test_zero_fraction_puts_everything_in_train():
  split = splits.stratified_split([1, 1, 2], 0.0, seed=0, singletons=Singletons.DUPLICATE)
  assert split.train == [0, 1, 2] and split.validation == [] and split.duplicated == []


@pytest.mark.parametrize('fraction,minimum', [(1.0, 1), (-0.1, 1), (0.1, 0)])
def test_bad_arguments_raise(fraction, minimum):
  with pytest.raises(ValueError):
    splits.stratified_split([1, 1], fraction, seed=0, min_images_per_class=minimum)
