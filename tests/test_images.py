"""Image fixing on ingest: orientation, colour modes, resizing and every way an image can be bad."""

import io

import numpy as np
import pytest
from PIL import Image

from tf_landmarks import images
from conftest import jpeg_bytes, pattern_image


def _decode(prepared):
  image = Image.open(io.BytesIO(prepared.jpeg))
  assert image.format == 'JPEG'
  return image


def _encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def test_large_jpeg_is_downsized_keeping_aspect():
  prepared = images.prepare_image(jpeg_bytes(1200, 800), max_side=300)
  assert (prepared.width, prepared.height) == (300, 200)
  assert _decode(prepared).size == (300, 200)


def test_small_enough_rgb_jpeg_passes_through_unchanged():
  data = jpeg_bytes(200, 100)
  prepared = images.prepare_image(data, max_side=640)
  assert prepared.jpeg == data and (prepared.width, prepared.height) == (200, 100)


def test_never_upscales():
  prepared = images.prepare_image(_encode(pattern_image(100, 80, 0), 'PNG'), max_side=640)
  assert (prepared.width, prepared.height) == (100, 80)


def test_exif_orientation_is_applied():
  source = pattern_image(120, 60, seed=3)
  exif = Image.Exif()
  exif[0x0112] = 6  # Rotate 90° clockwise to display.
  prepared = images.prepare_image(_encode(source, 'JPEG', quality=95, exif=exif.tobytes()))
  assert (prepared.width, prepared.height) == (60, 120)
  expected = np.asarray(source.transpose(Image.Transpose.ROTATE_270), dtype=np.float32)
  assert np.abs(np.asarray(_decode(prepared), dtype=np.float32) - expected).mean() < 4


@pytest.mark.parametrize('mode,fmt', [('L', 'JPEG'), ('CMYK', 'JPEG'), ('RGBA', 'PNG'),
                                      ('P', 'PNG'), ('LA', 'PNG'), ('I;16', 'PNG'), ('RGB', 'WEBP')])
def test_any_mode_becomes_rgb(mode, fmt):
  source = pattern_image(80, 60, seed=1).convert(mode if mode != 'I;16' else 'L')
  if mode == 'I;16':
    source = Image.fromarray(np.asarray(source, dtype=np.uint16) * 256)
  prepared = images.prepare_image(_encode(source, fmt))
  decoded = _decode(prepared)
  assert decoded.mode == 'RGB' and decoded.size == (80, 60)
  if mode == 'I;16':  # 16-bit values are scaled down, not clipped to white.
    assert np.asarray(decoded).mean() < 250


def test_transparency_is_composited_on_white():
  transparent = Image.new('RGBA', (40, 40), (255, 0, 0, 0))
  decoded = np.asarray(_decode(images.prepare_image(_encode(transparent, 'PNG'))))
  assert decoded.min() > 240


@pytest.mark.parametrize('data,reason', [
    (b'', 'empty file'),
    (b'definitely not an image', 'not a readable image'),
    (jpeg_bytes(400, 300)[:900], 'corrupt or truncated image'),
    (jpeg_bytes(20, 200), 'image too small (20x200 < 32 px)'),
])
def test_bad_images_raise_with_reason(data, reason):
  with pytest.raises(images.ImageError) as error:
    images.prepare_image(data, max_side=256)
  assert str(error.value).startswith(reason)


def test_truncated_image_is_rejected_even_without_resize():
  with pytest.raises(images.ImageError, match='corrupt or truncated'):
    images.prepare_image(jpeg_bytes(400, 300)[:-2000])


def test_file_lookup_tries_candidates_and_reports_missing(tmp_path):
  (tmp_path / 'b.jpg').write_bytes(jpeg_bytes(64, 64))
  found = images.prepare_image_file([str(tmp_path / 'a.jpg'), str(tmp_path / 'b.jpg')], 0, 90)
  assert (found.width, found.height) == (64, 64)
  with pytest.raises(images.ImageError, match='missing image file'):
    images.prepare_image_file([str(tmp_path / 'nope.jpg')], 0, 90)


def test_chunk_worker_returns_reasons_instead_of_raising(tmp_path):
  (tmp_path / 'good.jpg').write_bytes(jpeg_bytes(64, 64))
  (tmp_path / 'bad.jpg').write_bytes(b'')
  results = images.prepare_image_files(
      [[str(tmp_path / 'good.jpg')], [str(tmp_path / 'bad.jpg')], [str(tmp_path / 'gone.jpg')]], 0, 90)
  assert isinstance(results[0], images.PreparedImage)
  assert results[1:] == ['empty file', 'missing image file']


def test_distorted_copy_is_deterministic_same_size_and_different():
  data = jpeg_bytes(128, 96, seed=5)
  first, again = images.distorted_copy(data, seed=1), images.distorted_copy(data, seed=1)
  assert first.jpeg == again.jpeg and (first.width, first.height) == (128, 96)
  difference = np.abs(np.asarray(_decode(first), np.float32) -
                      np.asarray(Image.open(io.BytesIO(data)), np.float32)).mean()
  assert difference > 2
