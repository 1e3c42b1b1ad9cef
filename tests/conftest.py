"""Shared test helpers: small images made on the fly and the location of the real-photo set."""

import io
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

REPO = pathlib.Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / 'shared' / 'data' / 'landmarks-real'

requires_real_data = pytest.mark.skipif(
    not (REAL_DATA / 'train.csv').exists(),
    reason=f'the real-photo set is not at {REAL_DATA} (clone the project with ../shared beside it)')


def pattern_image(width: int, height: int, seed: int) -> Image.Image:
  """A smooth random-coloured RGB image (JPEG-friendly, so pixel round trips stay within tolerance)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def jpeg_bytes(width: int = 96, height: int = 64, seed: int = 0, quality: int = 95) -> bytes:
  buffer = io.BytesIO()
  pattern_image(width, height, seed).save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()
