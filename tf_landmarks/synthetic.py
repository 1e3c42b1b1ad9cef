"""The built-in synthetic landmark world, written in the Google Landmarks Kaggle layout.

Each landmark is a small 3-D-ish scene: a textured front plane (facade, tower, arches, dome, bridge or
temple silhouette, with stone courses, windows and ornaments of its own) and a side plane sharing one
edge. A view places both planes with its own perspective, scale, rotation and crop, over a cluttered
background, then changes lighting and colour, blurs, adds noise and occluders. Because every view is a
homography of the same textures, the same physical points reappear in different views of a landmark,
so local-feature matching with RANSAC behaves as it does on real buildings.

Everything is deterministic: an image's random stream depends only on (seed, what it is, its index).
"""

import dataclasses
import hashlib
import math
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from tf_landmarks import errors
from tf_landmarks import images
from tf_landmarks import settings
from tf_landmarks.settings import setting

STYLES = ('facade', 'tower', 'arches', 'dome', 'bridge', 'temple')
_TEXTURE_SIZE = 384
_ASPECTS = ((4, 3), (3, 4), (1, 1), (16, 9), (3, 2), (2, 3))
_URL_PREFIX = 'https://synthetic.tf-landmarks.invalid/'

# Streams of randomness; mixing the kind into the seed keeps them independent.
_LANDMARK, _TRAIN, _QUERY, _SPLIT = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Landmark:
  """A landmark: its id and the RGBA textures of its two planes."""
  landmark_id: int
  style: str
  front: np.ndarray  # uint8 [S, S, 4]; alpha is the silhouette.
  side: np.ndarray  # uint8 [S, S, 4]


@dataclasses.dataclass(frozen=True)
class Query:
  """A test image and what it shows: a known landmark, an unseen landmark, or none."""
  image_id: str
  kind: str  # 'known', 'unseen' or 'none'
  landmark: Optional[int]  # Index into the world's landmarks (unseen ones follow the known ones).


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, index])


def image_id_for(seed: int, stream: int, index: int) -> str:
  """16 hex digits, like Google Landmarks ids, derived from (seed, stream, index)."""
  return hashlib.sha256(f'{seed}/{stream}/{index}'.encode()).hexdigest()[:16]


def _stone_texture(rng: np.random.Generator, size: int, base: np.ndarray) -> np.ndarray:
  """Courses of stone blocks with their own shades and mortar lines: corners everywhere."""
  block_h = int(rng.integers(7, 15))
  block_w = int(rng.integers(block_h + 4, 3 * block_h))
  rows = size // block_h + 1
  cols = size // block_w + 2
  shades = rng.normal(0, 16, (rows, cols, 1)).astype(np.float32)
  yy, xx = np.mgrid[0:size, 0:size]
  row = yy // block_h
  shifted = xx + (row % 2) * (block_w // 2)
  col = shifted // block_w
  texture = base[None, None, :] + shades[row, col]
  mortar = (yy % block_h == 0) | (shifted % block_w == 0)
  texture[mortar] *= 0.55
  return texture


def _draw_windows(rng: np.random.Generator, texture: np.ndarray, top: int, bottom: int,
                  left: int, right: int, arched: bool) -> None:
  """A grid of framed windows, each with its own pane brightness and bars."""
  n_rows = int(rng.integers(2, 5))
  n_cols = int(rng.integers(2, 6))
  cell_h = (bottom - top) / n_rows
  cell_w = (right - left) / n_cols
  frame = np.clip(rng.normal(225, 20, 3), 0, 255)
  for r in range(n_rows):
    for c in range(n_cols):
      if rng.random() < 0.12:
        continue  # A blind window: the grid is not perfectly regular.
      x0 = int(left + c * cell_w + cell_w * 0.25)
      x1 = int(left + (c + 1) * cell_w - cell_w * 0.25)
      y0 = int(top + r * cell_h + cell_h * 0.2)
      y1 = int(top + (r + 1) * cell_h - cell_h * 0.15)
      if x1 - x0 < 4 or y1 - y0 < 6:
        continue
      glass = np.clip(rng.normal(45, 25, 3), 0, 255)
      cv2.rectangle(texture, (x0 - 2, y0 - 2), (x1 + 2, y1 + 2), frame.tolist(), -1)
      cv2.rectangle(texture, (x0, y0), (x1, y1), glass.tolist(), -1)
      if arched:
        radius = (x1 - x0) // 2
        cv2.ellipse(texture, ((x0 + x1) // 2, y0), (radius + 2, radius + 2), 0, 180, 360,
                    frame.tolist(), -1)
        cv2.ellipse(texture, ((x0 + x1) // 2, y0), (radius, radius), 0, 180, 360, glass.tolist(), -1)
      if rng.random() < 0.7:
        cv2.line(texture, ((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1), frame.tolist(), 1)
        cv2.line(texture, (x0, (y0 + y1) // 2), (x1, (y0 + y1) // 2), frame.tolist(), 1)


def _draw_ornaments(rng: np.random.Generator, texture: np.ndarray, count: int) -> None:
  """Unique marks (rosettes, reliefs, signs) that make one landmark's keypoints its own."""
  size = texture.shape[0]
  for _ in range(count):
    colour = np.clip(rng.normal(128, 70, 3), 0, 255).tolist()
    centre = (int(rng.integers(10, size - 10)), int(rng.integers(10, size - 10)))
    shape = rng.integers(0, 4)
    if shape == 0:
      radius = int(rng.integers(5, 18))
      cv2.circle(texture, centre, radius, colour, -1)
      cv2.circle(texture, centre, max(1, radius // 2), (255 - np.array(colour)).tolist(), -1)
    elif shape == 1:
      points = rng.integers(-18, 18, (int(rng.integers(3, 7)), 2)) + np.array(centre)
      cv2.fillPoly(texture, [points.astype(np.int32)], colour)
    elif shape == 2:
      x, y = centre
      w, h = int(rng.integers(10, 40)), int(rng.integers(4, 12))
      cv2.rectangle(texture, (x, y), (x + w, y + h), colour, -1)
      for k in range(int(rng.integers(2, 6))):  # Letters of a sign.
        lx = x + 2 + k * max(2, w // 6)
        cv2.line(texture, (lx, y + 2), (lx + 2, y + h - 2), (255 - np.array(colour)).tolist(), 1)
    else:
      start = (int(rng.integers(0, size)), int(rng.integers(0, size)))
      end = (start[0] + int(rng.integers(-40, 40)), start[1] + int(rng.integers(-40, 40)))
      cv2.line(texture, start, end, colour, int(rng.integers(1, 4)))


def _silhouette(rng: np.random.Generator, style: str, size: int) -> np.ndarray:
  """The alpha mask of a landmark style: roofline, towers, arch openings."""
  alpha = np.zeros((size, size), np.uint8)
  s = size
  if style == 'facade':
    roof = int(s * rng.uniform(0.15, 0.3))
    cv2.rectangle(alpha, (0, roof), (s - 1, s - 1), 255, -1)
    cv2.fillPoly(alpha, [np.array([[0, roof], [s // 2, int(roof * rng.uniform(0, 0.4))],
                                   [s - 1, roof]], np.int32)], 255)
  elif style == 'tower':
    half = int(s * rng.uniform(0.18, 0.28))
    spire = int(s * rng.uniform(0.2, 0.35))
    cv2.rectangle(alpha, (s // 2 - half, spire), (s // 2 + half, s - 1), 255, -1)
    cv2.fillPoly(alpha, [np.array([[s // 2 - half, spire], [s // 2, 0], [s // 2 + half, spire]],
                                  np.int32)], 255)
  elif style == 'arches':
    cv2.rectangle(alpha, (0, int(s * 0.1)), (s - 1, s - 1), 255, -1)
    count = int(rng.integers(3, 6))
    width = s / count
    for k in range(count):
      cx = int((k + 0.5) * width)
      r = int(width * 0.32)
      cv2.rectangle(alpha, (cx - r, int(s * 0.65)), (cx + r, s - 1), 0, -1)
      cv2.ellipse(alpha, (cx, int(s * 0.65)), (r, r), 0, 180, 360, 0, -1)
  elif style == 'dome':
    base = int(s * rng.uniform(0.45, 0.55))
    cv2.rectangle(alpha, (int(s * 0.08), base), (int(s * 0.92), s - 1), 255, -1)
    cv2.ellipse(alpha, (s // 2, base), (int(s * 0.3), int(s * rng.uniform(0.25, 0.4))), 0, 180, 360,
                255, -1)
    cv2.rectangle(alpha, (s // 2 - 6, int(s * 0.02)), (s // 2 + 6, base), 255, -1)
  elif style == 'bridge':
    top = int(s * rng.uniform(0.3, 0.45))
    cv2.rectangle(alpha, (0, top), (s - 1, int(s * 0.8)), 255, -1)
    count = int(rng.integers(2, 5))
    width = s / count
    for k in range(count):
      cx = int((k + 0.5) * width)
      cv2.ellipse(alpha, (cx, int(s * 0.8)), (int(width * 0.4), int(s * 0.25)), 0, 180, 360, 0, -1)
    for k in range(count + 1):  # Towers on the piers.
      x = int(k * width)
      cv2.rectangle(alpha, (max(0, x - 10), int(top * 0.4)), (min(s - 1, x + 10), top), 255, -1)
  else:  # temple
    pediment = int(s * rng.uniform(0.2, 0.3))
    cv2.fillPoly(alpha, [np.array([[0, pediment], [s // 2, int(s * 0.05)], [s - 1, pediment]],
                                  np.int32)], 255)
    cv2.rectangle(alpha, (0, pediment), (s - 1, pediment + 20), 255, -1)
    cv2.rectangle(alpha, (0, s - 24), (s - 1, s - 1), 255, -1)
    count = int(rng.integers(4, 8))
    for k in range(count):
      cx = int((k + 0.5) * s / count)
      cv2.rectangle(alpha, (cx - 9, pediment + 20), (cx + 9, s - 24), 255, -1)
  return alpha


def _plane_texture(rng: np.random.Generator, style: str, base: np.ndarray, size: int,
                   ornaments: int) -> np.ndarray:
  texture = _stone_texture(rng, size, base)
  _draw_windows(rng, texture, int(size * 0.3), int(size * 0.92), int(size * 0.06),
                int(size * 0.94), arched=style in ('arches', 'dome', 'temple') or rng.random() < 0.4)
  _draw_ornaments(rng, texture, ornaments)
  # Weathering: a smooth random stain field unique to this plane. Without it, stone courses and window
  # grids repeat, and a descriptor ratio test cannot tell one block from the next.
  stains = cv2.resize(rng.normal(0, 1, (10, 10, 3)).astype(np.float32), (size, size),
                      interpolation=cv2.INTER_CUBIC)
  texture *= 1 + 0.28 * stains
  texture += rng.normal(0, 5, (size, size, 1)).astype(np.float32)
  return np.clip(texture, 0, 255).astype(np.uint8)


def make_landmark(seed: int, index: int, landmark_id: int) -> Landmark:
  """Builds landmark `index` of the world `seed` (its textures are made once and reused per view)."""
  rng = _rng(seed, _LANDMARK, index)
  style = STYLES[int(rng.integers(len(STYLES)))]
  base = rng.uniform(60, 210, 3).astype(np.float32)
  size = _TEXTURE_SIZE
  front = _plane_texture(rng, style, base, size, ornaments=int(rng.integers(30, 45)))
  side = _plane_texture(rng, 'facade', base * 0.75, size, ornaments=int(rng.integers(15, 25)))
  front_alpha = _silhouette(rng, style, size)
  side_alpha = np.zeros((size, size), np.uint8)
  side_alpha[int(size * rng.uniform(0.25, 0.45)):] = 255
  return Landmark(landmark_id, style, np.dstack([front, front_alpha]), np.dstack([side, side_alpha]))


class _Noise:
  """A precomputed noise field; views take random windows of it (drawing fresh noise per image would
  cost more than the rest of the rendering)."""

  def __init__(self, seed: int, size: int):
    self.size = size
    self.field = np.random.default_rng([seed, 99]).normal(0, 1, (size, size, 3)).astype(np.float32)

  def window(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    y = int(rng.integers(0, self.size - height + 1))
    x = int(rng.integers(0, self.size - width + 1))
    return self.field[y:y + height, x:x + width]


def _background(rng: np.random.Generator, height: int, width: int, indoor: bool) -> np.ndarray:
  """Sky and ground (or walls and floor), with clutter shapes."""
  canvas = np.empty((height, width, 3), np.float32)
  horizon = int(height * rng.uniform(0.55, 0.85))
  if indoor:
    top, bottom = rng.uniform(120, 235, 3), rng.uniform(40, 160, 3)
  else:
    top, bottom = np.array([rng.uniform(150, 230), rng.uniform(170, 230), rng.uniform(210, 255)]), \
        rng.uniform(50, 140, 3)
  ramp = np.linspace(0, 1, horizon, dtype=np.float32)[:, None, None]
  canvas[:horizon] = top * (1 - 0.3 * ramp)
  canvas[horizon:] = bottom
  for _ in range(int(rng.integers(3, 10))):
    colour = rng.uniform(0, 255, 3).tolist()
    x, y = int(rng.integers(0, width)), int(rng.integers(horizon // 2, height))
    w, h = int(rng.integers(5, width // 3)), int(rng.integers(5, height // 3))
    if rng.random() < 0.5:
      cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, -1)
    else:
      cv2.ellipse(canvas, (x, y), (w // 2 + 1, h // 2 + 1), float(rng.uniform(0, 180)), 0, 360,
                  colour, -1)
  return canvas


def _composite(canvas: np.ndarray, rgba: np.ndarray, matrix: np.ndarray) -> None:
  height, width = canvas.shape[:2]
  warped = cv2.warpPerspective(rgba, matrix, (width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
  alpha = warped[:, :, 3:4].astype(np.float32) * (1 / 255)
  canvas *= 1 - alpha
  canvas += warped[:, :, :3].astype(np.float32) * alpha


def _place_landmark(rng: np.random.Generator, canvas: np.ndarray, landmark: Landmark) -> None:
  """Warps both planes of a landmark into the canvas from a random viewpoint."""
  height, width = canvas.shape[:2]
  s = _TEXTURE_SIZE
  source = np.float32([[0, 0], [s, 0], [s, s], [0, s]])
  span = min(width, height) * rng.uniform(0.65, 1.05)  # Size of the front plane.
  cx = width * rng.uniform(0.3, 0.7)
  cy = height * rng.uniform(0.35, 0.6)
  yaw = rng.uniform(-0.35, 0.35)  # Foreshortening: one vertical edge nearer than the other.
  half = span / 2
  left_h, right_h = half * (1 - yaw), half * (1 + yaw)
  front = np.float32([[cx - half * (1 - abs(yaw) * 0.4), cy - left_h],
                      [cx + half * (1 - abs(yaw) * 0.4), cy - right_h],
                      [cx + half * (1 - abs(yaw) * 0.4), cy + right_h],
                      [cx - half * (1 - abs(yaw) * 0.4), cy + left_h]])
  # The side plane recedes from the far edge of the front plane.
  depth = span * rng.uniform(0.3, 0.6) * (0.3 + abs(yaw))
  if yaw >= 0:  # Right edge nearer: the side wall shows on the left.
    edge_top, edge_bottom = front[0], front[3]
    far_top = edge_top + np.float32([-depth, depth * 0.15])
    far_bottom = edge_bottom + np.float32([-depth, -depth * 0.15])
    side = np.float32([far_top, edge_top, edge_bottom, far_bottom])
  else:
    edge_top, edge_bottom = front[1], front[2]
    far_top = edge_top + np.float32([depth, depth * 0.15])
    far_bottom = edge_bottom + np.float32([depth, -depth * 0.15])
    side = np.float32([edge_top, far_top, far_bottom, edge_bottom])
  angle = math.radians(rng.normal(0, 5))
  rotation = np.float32([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
  centre = np.float32([cx, cy])
  front = (front - centre) @ rotation.T + centre
  side = (side - centre) @ rotation.T + centre
  _composite(canvas, landmark.side, cv2.getPerspectiveTransform(source, side))
  _composite(canvas, landmark.front, cv2.getPerspectiveTransform(source, front))


def _distractor(rng: np.random.Generator, canvas: np.ndarray) -> None:
  """Non-landmark content: furniture-like boxes, stripes and checkers on random planes."""
  height, width = canvas.shape[:2]
  for _ in range(int(rng.integers(2, 6))):
    w, h = int(rng.integers(20, 120)), int(rng.integers(20, 120))
    patch = np.empty((h, w, 4), np.uint8)
    patch[:, :, :3] = rng.uniform(0, 255, 3).astype(np.uint8)
    if rng.random() < 0.5:
      period = int(rng.integers(3, 12))
      stripes = (np.arange(w) // period % 2).astype(bool)
      patch[:, stripes, :3] = rng.uniform(0, 255, 3).astype(np.uint8)
    patch[:, :, 3] = 255
    source = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    x, y = rng.uniform(-20, width - 20), rng.uniform(0, height - 20)
    scale = rng.uniform(0.5, 1.8)
    target = source * scale + np.float32([x, y]) + rng.normal(0, 6, (4, 2)).astype(np.float32)
    _composite(canvas, patch, cv2.getPerspectiveTransform(source, target))


def _finish(rng: np.random.Generator, canvas: np.ndarray, noise: _Noise) -> np.ndarray:
  """Occluders, lighting, colour cast, blur and sensor noise; returns uint8 RGB."""
  height, width = canvas.shape[:2]
  for _ in range(int(rng.integers(0, 4))):
    colour = rng.uniform(0, 255, 3).tolist()
    if rng.random() < 0.5:  # A pole or a lamp post.
      x = int(rng.integers(0, width))
      cv2.line(canvas, (x, int(rng.integers(0, height // 2))), (x, height), colour,
               int(rng.integers(1, 5)))
    else:  # A person or a tree in front.
      x, w = int(rng.integers(0, width)), int(rng.integers(width // 20 + 1, width // 7 + 2))
      top = int(height * rng.uniform(0.55, 0.85))
      cv2.rectangle(canvas, (x, top), (x + w, height), colour, -1)
      cv2.circle(canvas, (x + w // 2, top), w // 2 + 1, colour, -1)
  gain = rng.normal(1.0, 0.1, 3).astype(np.float32)
  gradient = np.linspace(rng.uniform(0.75, 1.1), rng.uniform(0.9, 1.25), width, dtype=np.float32)
  canvas *= gain
  canvas *= gradient[None, :, None]
  canvas += rng.normal(0, 10, 3).astype(np.float32)
  if rng.random() < 0.35:
    canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.5, 1.4))
  canvas += noise.window(rng, height, width) * rng.uniform(0, 7)
  return np.clip(canvas, 0, 255).astype(np.uint8)


def _canvas_size(rng: np.random.Generator, image_size: int) -> Tuple[int, int]:
  a, b = _ASPECTS[int(rng.integers(len(_ASPECTS)))]
  if a >= b:
    return round(image_size * b / a), image_size
  return image_size, round(image_size * a / b)


def render(rng: np.random.Generator, image_size: int, noise: _Noise,
           landmark: Optional[Landmark]) -> np.ndarray:
  """One RGB view (uint8 [H, W, 3], long side `image_size`) of `landmark`, or of no landmark."""
  height, width = _canvas_size(rng, image_size)
  indoor = landmark is None and rng.random() < 0.5
  canvas = _background(rng, height, width, indoor)
  if landmark is None:
    _distractor(rng, canvas)
  else:
    _place_landmark(rng, canvas, landmark)
  return _finish(rng, canvas, noise)


def class_sizes(num_landmarks: int, num_images: int, rng: np.random.Generator) -> List[int]:
  """Long-tailed image counts (Zipf-like), each ≥ 1, summing to `num_images`; the last eighth of the
  landmarks get 1–2 images, as in Google Landmarks where many classes have one or two."""
  if num_images < num_landmarks:
    raise ValueError(f'need at least one train image per landmark ({num_images} < {num_landmarks})')
  tail = max(1, num_landmarks // 8) if num_landmarks > 1 else 0
  sizes = [0] * num_landmarks
  for k in range(num_landmarks - tail, num_landmarks):
    sizes[k] = int(rng.integers(1, 3))
  head = num_landmarks - tail
  remaining = num_images - sum(sizes)
  if head == 0 or remaining < head:
    sizes = [1] * num_landmarks
    sizes[0] += num_images - num_landmarks
    return sizes
  weights = 1.0 / np.arange(1, head + 1) ** 1.1
  shares = np.floor(weights / weights.sum() * (remaining - head)).astype(int) + 1
  shares[0] += remaining - int(shares.sum())
  sizes[:head] = shares.tolist()
  return sizes


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """Sizes of a synthetic world; see `generate`. `tfl-synth` defines one flag per field."""
  seed: int = setting(0, 'Seed of the world: the same seed gives byte-identical files.')
  num_landmarks: int = setting(24, 'Landmarks with training images.', lower=1)
  num_unseen_landmarks: int = setting(
      6, 'Extra landmarks that appear only among the test queries.', lower=0)
  num_train_images: int = setting(
      400, 'Training images, spread over the landmarks with a long tail (the last eighth of the '
      'landmarks get 1-2 images).', lower=1)
  num_test_images: int = setting(120, 'Test queries.', lower=0)
  non_landmark_fraction: float = setting(
      0.35, 'Share of test queries that show no landmark.', lower=0.0, upper=1.0)
  unseen_landmark_fraction: float = setting(
      0.15, 'Share of test queries that show a landmark unseen in training (their ground truth is '
      '"no landmark", as in the Kaggle challenges).', lower=0.0, upper=1.0)
  image_size: int = setting(256, 'Long side of the images in pixels; aspect ratios vary.',
                            lower=32, upper=4096)
  jpeg_quality: int = setting(90, 'JPEG quality.', lower=1, upper=100)

  def validate(self) -> None:
    """Raises errors.UserError with a user-facing message for impossible sizes."""
    settings.check(self)
    if self.num_train_images < self.num_landmarks:
      raise errors.UserError(f'--num_train_images ({self.num_train_images}) must be at least '
                             f'--num_landmarks ({self.num_landmarks})')
    if self.non_landmark_fraction + self.unseen_landmark_fraction > 1:
      raise errors.UserError('--non_landmark_fraction + --unseen_landmark_fraction must be at '
                             'most 1')
    if self.unseen_landmark_fraction > 0 and self.num_unseen_landmarks == 0:
      raise errors.UserError('--unseen_landmark_fraction > 0 needs --num_unseen_landmarks >= 1')


def _landmark_ids(spec: WorldSpec) -> List[int]:
  """Sparse, non-contiguous ids as in Google Landmarks (known landmarks first, then unseen)."""
  rng = _rng(spec.seed, _SPLIT, 0)
  total = spec.num_landmarks + spec.num_unseen_landmarks
  return [int(i) for i in rng.choice(np.arange(1000, 1000 + 50 * total), total, replace=False)]


def plan_world(spec: WorldSpec) -> Tuple[List[Tuple[str, int, int]], List[Query]]:
  """Decides every image without rendering: train rows (id, landmark index, view index) and queries."""
  spec.validate()
  rng = _rng(spec.seed, _SPLIT, 1)
  train = []
  for landmark, count in enumerate(class_sizes(spec.num_landmarks, spec.num_train_images, rng)):
    for _ in range(count):
      train.append((image_id_for(spec.seed, _TRAIN, len(train)), landmark, len(train)))
  num_none = round(spec.num_test_images * spec.non_landmark_fraction)
  num_unseen = round(spec.num_test_images * spec.unseen_landmark_fraction)
  kinds = ['none'] * num_none + ['unseen'] * num_unseen + \
          ['known'] * (spec.num_test_images - num_none - num_unseen)
  rng.shuffle(kinds)
  queries = []
  for index, kind in enumerate(kinds):
    if kind == 'known':
      landmark = int(rng.integers(spec.num_landmarks))
    elif kind == 'unseen':
      landmark = spec.num_landmarks + int(rng.integers(spec.num_unseen_landmarks))
    else:
      landmark = None
    queries.append(Query(image_id_for(spec.seed, _QUERY, index), kind, landmark))
  return train, queries


def generate(output_dir: str, spec: WorldSpec, progress: bool = False) -> Dict[str, int]:
  """Writes a synthetic world in the Google Landmarks layout into `output_dir`.

  Files: `images/<16-hex id>.jpg`, `train.csv` (id,url,landmark_id), `test.csv` (id,url), and the
  solutions in the format of Google's scoring code (see `submission`), every query on the Public
  or Private leaderboard: `recognition_solution.csv` (id,landmarks,Usage: empty landmarks for
  non-landmark queries and for landmarks unseen in training) and `retrieval_solution.csv`
  (id,images,Usage: the train images of the query's landmark; `None` and Ignored for a query without
  any). CSVs are written last, each under a temporary name renamed when complete, so a folder with
  `train.csv` has all its images.

  Args:
    output_dir: destination folder (any tf.io.gfile path).
    spec: the world's sizes and seed.
    progress: show a progress bar.

  Returns:
    Counts: train images, and queries of each kind.

  Raises:
    ValueError: impossible sizes (see WorldSpec.validate).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from tf_landmarks import files  # pylint: disable=g-import-not-at-top
  from tf_landmarks import submission  # pylint: disable=g-import-not-at-top
  train, queries = plan_world(spec)
  ids = _landmark_ids(spec)
  landmarks: Dict[int, Landmark] = {}
  noise = _Noise(spec.seed, max(64, spec.image_size))
  image_dir = f'{output_dir.rstrip("/")}/images'
  tf.io.gfile.makedirs(image_dir)

  def write(image_id: str, rng: np.random.Generator, landmark: Optional[int]) -> None:
    if landmark is not None and landmark not in landmarks:
      landmarks[landmark] = make_landmark(spec.seed, landmark, ids[landmark])
    rgb = render(rng, spec.image_size, noise, None if landmark is None else landmarks[landmark])
    with tf.io.gfile.GFile(f'{image_dir}/{image_id}.jpg', 'wb') as f:
      f.write(images.encode_jpeg(rgb, spec.jpeg_quality).jpeg)

  with tqdm.tqdm(total=len(train) + len(queries), unit='img', disable=not progress) as bar:
    for image_id, landmark, view in train:
      write(image_id, _rng(spec.seed, _TRAIN, view), landmark)
      bar.update()
    for index, query in enumerate(queries):
      write(query.image_id, _rng(spec.seed, _QUERY, index), query.landmark)
      bar.update()

  train_by_landmark: Dict[int, List[str]] = {}
  for image_id, landmark, _ in train:
    train_by_landmark.setdefault(landmark, []).append(image_id)
  write_csv = files.write_csv_atomically
  write_csv(f'{output_dir}/test.csv', ('id', 'url'),
            sorted((q.image_id, _URL_PREFIX + q.image_id + '.jpg') for q in queries))
  # Kaggle's leaderboards: a third of each kind of query is Public, the rest Private, in id order so
  # that two queries of training landmarks put one on each (Google's scoring needs both).
  usage = {}
  for kind in ('known', 'unseen', 'none'):
    usage.update((image_id, submission.PUBLIC if i % 3 == 0 else submission.PRIVATE)
                 for i, image_id in enumerate(sorted(q.image_id for q in queries if q.kind == kind)))
  recognition = submission.Solution(
      {q.image_id: frozenset({ids[q.landmark]} if q.kind == 'known' else ()) for q in queries},
      usage)
  retrieval = submission.Solution(
      {q.image_id: tuple(sorted(train_by_landmark[q.landmark])) for q in queries
       if q.kind == 'known'},
      {q.image_id: usage[q.image_id] for q in queries if q.kind == 'known'},
      ignored=[q.image_id for q in queries if q.kind != 'known'])
  submission.write_recognition_solution(f'{output_dir}/recognition_solution.csv', recognition)
  submission.write_retrieval_solution(f'{output_dir}/retrieval_solution.csv', retrieval)
  write_csv(f'{output_dir}/train.csv', ('id', 'url', 'landmark_id'), sorted(
      (image_id, _URL_PREFIX + image_id + '.jpg', ids[landmark]) for image_id, landmark, _ in train))
  counts = {'train': len(train)}
  for kind in ('known', 'unseen', 'none'):
    counts[f'queries_{kind}'] = sum(q.kind == kind for q in queries)
  return counts
