"""Stratified train/validation split and label remapping (pure functions, no I/O).

Google Landmarks is extremely long-tailed: most classes have a handful of images and many have one.
The split is per class, so every class keeps at least one training image, and classes with a single
image follow an explicit policy instead of silently vanishing from validation.
"""

import collections
import dataclasses
import enum
from typing import Dict, List, Sequence

import numpy as np


class Singletons(str, enum.Enum):
  """What to do with classes that have a single image."""
  TRAIN = 'train'  # Keep the image in train; the class is absent from validation.
  DUPLICATE = 'duplicate'  # Keep it in train and put a distorted copy in validation.
  DROP = 'drop'  # Leave the class out altogether.


@dataclasses.dataclass
class Split:
  """Result of `stratified_split`; all index lists point into the input `landmark_ids`.

  Attributes:
    train: indices of training examples.
    validation: indices of validation examples.
    duplicated: indices (also in `train`) whose distorted copy goes to validation.
    label_of_landmark: landmark id → contiguous label 0..C-1, ordered by landmark id.
    dropped: index → reason, for examples left out.
  """
  train: List[int]
  validation: List[int]
  duplicated: List[int]
  label_of_landmark: Dict[int, int]
  dropped: Dict[int, str]


def stratified_split(landmark_ids: Sequence[int], validation_fraction: float, seed: int,
                     singletons: Singletons = Singletons.TRAIN,
                     min_images_per_class: int = 1) -> Split:
  """Splits examples per class into train and validation.

  A class with n ≥ 2 images sends n·f of them to validation on average, rounded up or down at random
  (seeded) so that the validation share is f overall even when most classes are small, and never
  all n: at least one image of every class stays in train.

  Args:
    landmark_ids: the class of each example.
    validation_fraction: f in [0, 1).
    seed: makes the split reproducible.
    singletons: policy for classes with exactly one image (after `min_images_per_class`).
    min_images_per_class: classes with fewer images are dropped.

  Returns:
    The split; labels cover exactly the classes that keep at least one training image.
  """
  if not 0 <= validation_fraction < 1:
    raise ValueError(f'validation_fraction must be in [0, 1), got {validation_fraction}')
  if min_images_per_class < 1:
    raise ValueError(f'min_images_per_class must be >= 1, got {min_images_per_class}')
  members = collections.defaultdict(list)
  for index, landmark_id in enumerate(landmark_ids):
    members[landmark_id].append(index)

  rng = np.random.default_rng(seed)
  split = Split([], [], [], {}, {})
  for landmark_id in sorted(members):
    indices = members[landmark_id]
    if len(indices) < min_images_per_class:
      split.dropped.update(
          (i, f'class too small ({len(indices)} image(s) < min_images_per_class={min_images_per_class})')
          for i in indices)
      continue
    if len(indices) == 1:
      if singletons == Singletons.DROP:
        split.dropped[indices[0]] = 'single-image class dropped (--singletons=drop)'
        continue
      split.train.append(indices[0])
      if singletons == Singletons.DUPLICATE and validation_fraction > 0:
        split.duplicated.append(indices[0])
    else:
      order = rng.permutation(indices).tolist()
      expected = len(order) * validation_fraction
      num_validation = min(len(order) - 1, int(expected + rng.random()))
      split.validation.extend(order[:num_validation])
      split.train.extend(order[num_validation:])
    split.label_of_landmark[landmark_id] = len(split.label_of_landmark)
  split.train.sort()
  split.validation.sort()
  split.duplicated.sort()
  return split
