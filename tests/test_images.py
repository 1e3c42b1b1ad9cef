"""Image fixing on ingest: orientation, colour, resizing, file reading, every way an image fails."""

import hashlib
import io
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageCms

from tf_landmarks import images
from helpers import REPO, jpeg_bytes, pattern_image


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
  assert (prepared.width, prepared.height) == (300, 200) and not prepared.unchanged
  assert _decode(prepared).size == (300, 200)


def test_small_enough_rgb_jpeg_passes_through_unchanged():
  data = jpeg_bytes(200, 100)
  prepared = images.prepare_image(data, max_side=640)
  # The size is the stored one, not that of the 1/8-scale decode that checked the file.
  assert prepared.jpeg == data and (prepared.width, prepared.height) == (200, 100)
  assert prepared.unchanged


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
                                      ('P', 'PNG'), ('LA', 'PNG'), ('I;16', 'PNG'),
                                      ('RGB', 'WEBP')])
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


def _textured_jpeg(progressive=False):
  """A noisy 160x120 JPEG: photo-like scan data, in which damage lands as it would in a photo."""
  noise = np.random.default_rng(7).integers(-40, 41, size=(120, 160, 3))
  pixels = np.clip(np.asarray(pattern_image(160, 120, seed=7), np.int16) + noise, 0, 255)
  return _encode(Image.fromarray(pixels.astype(np.uint8)), 'JPEG', quality=90,
                 progressive=progressive)


def _full_decode_accepts(data):
  try:
    Image.open(io.BytesIO(data)).load()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


@pytest.mark.parametrize('progressive', [False, True])
def test_pass_through_check_rejects_what_a_full_decode_rejects(progressive):
  data = _textured_jpeg(progressive)
  assert images.prepare_image(data).unchanged  # The 1/8-scale check is the path under test.
  rng = np.random.default_rng(int(progressive))
  scan = data.index(b'\xff\xda') + 20  # Past the (first) scan header.
  damaged = [data[:end] for end in range(0, len(data), len(data) // 64)] + [data[:-2]]
  num_truncated = len(damaged)
  for _ in range(150):  # 1–64 bytes of the scan overwritten with noise.
    length = int(rng.integers(1, 65))
    start = int(rng.integers(scan, len(data) - 2 - length))
    damaged.append(data[:start] + rng.bytes(length) + data[start + length:])
  accepted = []
  for copy in damaged:
    try:
      accepted.append(images.prepare_image(copy).jpeg == copy)
    except images.ImageError as error:
      assert str(error).startswith(('corrupt or truncated', 'empty file', 'not a readable image'))
      accepted.append(False)
  assert accepted == [_full_decode_accepts(copy) for copy in damaged]
  assert not any(accepted[:num_truncated])
  # libjpeg shrugs off most noise in entropy-coded data (a full decode too): both verdicts occur.
  overwritten = accepted[num_truncated:]
  assert overwritten.count(False) >= 10 and overwritten.count(True) >= 50


@pytest.mark.parametrize('damage', ['marker in the scan', 'truncated progressive'])
def test_damaged_jpeg_needing_no_change_is_rejected(damage):
  data = _textured_jpeg(progressive=damage == 'truncated progressive')
  middle = (data.index(b'\xff\xda') + len(data)) // 2
  if damage == 'marker in the scan':  # A second start-of-frame where entropy-coded data should be.
    data = data[:middle] + b'\xff\xc0' + data[middle + 2:]
  else:
    data = data[:middle]
  with pytest.raises(images.ImageError, match='corrupt or truncated'):
    images.prepare_image(data)


def test_file_lookup_tries_candidates_and_reports_missing(tmp_path):
  (tmp_path / 'b.jpg').write_bytes(jpeg_bytes(64, 64))
  found = images.prepare_image_file([str(tmp_path / 'a.jpg'), str(tmp_path / 'b.jpg')], 0, 90)
  assert (found.width, found.height) == (64, 64)
  with pytest.raises(images.ImageError, match='missing image file'):
    images.prepare_image_file([str(tmp_path / 'nope.jpg')], 0, 90)


def test_chunk_worker_names_unchanged_files_when_asked(tmp_path):
  unchanged, large = jpeg_bytes(64, 64), jpeg_bytes(400, 200)
  (tmp_path / 'nested').mkdir()
  (tmp_path / 'nested' / 'a.jpg').write_bytes(unchanged)
  (tmp_path / 'large.jpg').write_bytes(large)
  (tmp_path / 'bad.jpg').write_bytes(unchanged[:-300])
  path_lists = [[str(tmp_path / 'a.jpg'), str(tmp_path / 'nested' / 'a.jpg')],
                [str(tmp_path / 'large.jpg')], [str(tmp_path / 'bad.jpg')]]
  named, resized, bad = images.prepare_image_files(path_lists, 100, 90, name_unchanged_files=True)
  assert named == images.UnchangedFile(str(tmp_path / 'nested' / 'a.jpg'), len(unchanged),
                                       hashlib.sha256(unchanged).hexdigest(), 64, 64)
  assert isinstance(resized, images.PreparedImage) and (resized.width, resized.height) == (100, 50)
  assert bad.startswith('corrupt or truncated')
  assert images.read_unchanged(named) == unchanged
  # Without the option, the bytes themselves come back.
  assert images.prepare_image_files(path_lists[:1], 100, 90)[0].jpeg == unchanged


@pytest.mark.parametrize('change', ['rewritten', 'same size, other bytes', 'grown', 'removed',
                                    'fifo'])
def test_unchanged_file_read_again_must_hold_the_checked_bytes(tmp_path, change):
  path = tmp_path / 'a.jpg'
  path.write_bytes(jpeg_bytes(64, 64, seed=1))
  named = images.prepare_image_files([[str(path)]], 0, 90, name_unchanged_files=True)[0]
  path.unlink()
  if change == 'rewritten':
    path.write_bytes(jpeg_bytes(64, 64, seed=2))
  elif change == 'same size, other bytes':
    path.write_bytes(bytes(named.num_bytes))
  elif change == 'grown':
    path.write_bytes(jpeg_bytes(64, 64, seed=1) + b'\0')
  elif change == 'fifo':
    if not hasattr(os, 'mkfifo'):
      pytest.skip('needs FIFOs')
    os.mkfifo(path)
  outcome = _within_seconds(10, images.read_unchanged, named)
  assert isinstance(outcome, images.ImageError)
  assert str(outcome) == f'{path} changed or disappeared after it was checked'


def test_chunk_worker_returns_reasons_instead_of_raising(tmp_path):
  (tmp_path / 'good.jpg').write_bytes(jpeg_bytes(64, 64))
  (tmp_path / 'bad.jpg').write_bytes(b'')
  results = images.prepare_image_files(
      [[str(tmp_path / 'good.jpg')], [str(tmp_path / 'bad.jpg')], [str(tmp_path / 'gone.jpg')]],
      0, 90)
  assert isinstance(results[0], images.PreparedImage)
  assert results[1:] == ['empty file', 'missing image file']


def test_distorted_copy_is_deterministic_same_size_and_different():
  data = jpeg_bytes(128, 96, seed=5)
  first, again = images.distorted_copy(data, seed=1), images.distorted_copy(data, seed=1)
  assert first.jpeg == again.jpeg and (first.width, first.height) == (128, 96)
  difference = np.abs(np.asarray(_decode(first), np.float32) -
                      np.asarray(Image.open(io.BytesIO(data)), np.float32)).mean()
  assert difference > 2


def _within_seconds(seconds, function, *args):
  """Runs `function`; fails the test, instead of hanging it, if the call blocks."""
  outcome = []
  def run():
    try:
      outcome.append(function(*args))
    except Exception as error:  # pylint: disable=broad-except
      outcome.append(error)
  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  thread.join(seconds)
  assert outcome, f'still blocked after {seconds} s'
  return outcome[0]


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='needs FIFOs')
def test_fifo_is_refused_without_blocking(tmp_path):
  os.mkfifo(tmp_path / 'id.jpg')
  results = _within_seconds(10, images.prepare_image_files, [[str(tmp_path / 'id.jpg')]], 0, 90)
  assert results == ['not a regular file']


@pytest.mark.skipif(not hasattr(os, 'mkfifo'), reason='needs FIFOs')
def test_fifo_swapped_in_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
  regular = tmp_path / 'regular.jpg'
  regular.write_bytes(jpeg_bytes())
  os.mkfifo(tmp_path / 'id.jpg')
  real_stat = os.stat
  # The race: the path is a regular file when checked and a FIFO when opened.
  monkeypatch.setattr(images.os, 'stat', lambda _, **kwargs: real_stat(regular, **kwargs))
  results = _within_seconds(10, images.prepare_image_files, [[str(tmp_path / 'id.jpg')]], 0, 90)
  assert results == ['not a regular file']


@pytest.mark.skipif(not os.path.exists('/dev/zero'), reason='needs /dev/zero')
def test_link_to_a_device_and_a_folder_are_not_regular_files(tmp_path):
  (tmp_path / 'zero.jpg').symlink_to('/dev/zero')
  (tmp_path / 'folder.jpg').mkdir()
  results = images.prepare_image_files(
      [[str(tmp_path / 'zero.jpg')], [str(tmp_path / 'folder.jpg')]], 0, 90)
  assert results == ['not a regular file'] * 2


def test_link_to_a_regular_file_is_followed(tmp_path):
  (tmp_path / 'real.jpg').write_bytes(jpeg_bytes(64, 64))
  (tmp_path / 'link.jpg').symlink_to(tmp_path / 'real.jpg')
  prepared = images.prepare_image_file([str(tmp_path / 'link.jpg')], 0, 90)
  assert prepared.jpeg == jpeg_bytes(64, 64)


def test_files_over_the_size_limit_are_refused_before_decoding(tmp_path):
  data = jpeg_bytes(64, 64)
  (tmp_path / 'a.jpg').write_bytes(data)
  assert images.prepare_image_files([[str(tmp_path / 'a.jpg')]], 0, 90,
                                    max_file_bytes=len(data) - 1) == [
      f'file too large ({len(data)} > {len(data) - 1} bytes)']
  assert images.prepare_image_file([str(tmp_path / 'a.jpg')], 0, 90,
                                   max_file_bytes=len(data)).jpeg == data
  assert images.MAX_FILE_BYTES == 50 * 1024 * 1024


@pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs /proc')
def test_no_more_than_the_limit_is_read_when_the_size_lies(tmp_path):
  # /proc files are regular files of size 0 with content: only reading can find their length.
  (tmp_path / 'status.jpg').symlink_to('/proc/self/status')
  assert images.prepare_image_files([[str(tmp_path / 'status.jpg')]], 0, 90, max_file_bytes=10) == [
      'file too large (more than 10 bytes)']


def test_remote_paths_are_checked_with_the_gfile_size_and_type(tmp_path):
  data = jpeg_bytes(64, 64)
  (tmp_path / 'a.jpg').write_bytes(data)
  (tmp_path / 'folder.jpg').mkdir()
  url = f'file://{tmp_path}'  # A scheme, so read through tf.io.gfile like gs://.
  results = images.prepare_image_files(
      [[f'{url}/a.jpg'], [f'{url}/folder.jpg'], [f'{url}/missing.jpg', f'{url}/a.jpg']], 0, 90,
      max_file_bytes=len(data) - 1)
  assert results == [f'file too large ({len(data)} > {len(data) - 1} bytes)', 'not a regular file',
                     f'file too large ({len(data)} > {len(data) - 1} bytes)']
  assert images.prepare_image_file([f'{url}/a.jpg'], 0, 90).jpeg == data


def test_module_does_not_import_tensorflow():
  code = 'import sys, tf_landmarks.images; sys.exit("tensorflow" in sys.modules)'
  assert subprocess.run([sys.executable, '-c', code], cwd=REPO, check=False).returncode == 0


@pytest.mark.parametrize('size,max_side,outcome', [
    ((40, 5000), 640, 'image too small (5x640 after resizing to 640 px < 32 px)'),
    ((5000, 40), 640, 'image too small (640x5 after resizing to 640 px < 32 px)'),
    ((64, 600), 300, (32, 300)),
    ((40, 5000), 0, (40, 5000)),
])
def test_shorter_side_is_checked_after_resizing(size, max_side, outcome):
  data = _encode(pattern_image(*size, seed=2), 'PNG')
  if isinstance(outcome, str):
    with pytest.raises(images.ImageError) as error:
      images.prepare_image(data, max_side=max_side)
    assert str(error.value) == outcome
  else:
    prepared = images.prepare_image(data, max_side=max_side)
    assert (prepared.width, prepared.height) == outcome


def test_resized_rotated_jpeg_has_the_displayed_orientation():
  exif = Image.Exif()
  exif[0x0112] = 6
  data = _encode(pattern_image(1200, 800, seed=3), 'JPEG', quality=95, exif=exif.tobytes())
  prepared = images.prepare_image(data, max_side=300)
  assert (prepared.width, prepared.height) == (200, 300) == _decode(prepared).size


def _tiff(pixels):
  return _encode(Image.fromarray(pixels), 'TIFF')


@pytest.mark.parametrize('pixels,expected', [
    (np.full((40, 40), 0.5, np.float32), 128),  # [0, 1] floats are scaled.
    (np.full((40, 40), 1.0, np.float32), 255),
    (np.full((40, 40), 100.0, np.float32), 100),  # Others are clipped to [0, 255].
    (np.full((40, 40), 1e6, np.float32), 255),
    (np.full((40, 40), -3.0, np.float32), 0),
    (np.full((40, 40), np.nan, np.float32), 0),
    (np.full((40, 40), 100, np.int32), 100),  # 32-bit integers by their range: 8 bits,
    (np.full((40, 40), 0x8000, np.int32), 128),  # 16 bits,
    (np.full((40, 40), 2**30, np.int32), 128),  # or the whole positive int32 range.
    (np.full((40, 40), -5, np.int32), 0),
])
def test_float_and_32_bit_images_map_sensibly_to_8_bits(pixels, expected):
  decoded = np.asarray(_decode(images.prepare_image(_tiff(pixels))), np.float32)
  assert decoded.shape == (40, 40, 3)
  assert abs(decoded.mean() - expected) <= 1


def test_nan_pixels_become_black_and_the_rest_keeps_its_scale():
  pixels = np.full((40, 40), 0.8, np.float32)
  pixels[:20] = np.nan
  decoded = np.asarray(_decode(images.prepare_image(_tiff(pixels))), np.float32)[..., 0]
  assert decoded[:16].max() <= 3 and abs(decoded[24:].mean() - 204) <= 2


# A few ICC v2 profiles written here, so the tests need no profile files.

def _s15_fixed16(*values):
  return struct.pack(f'>{len(values)}i', *(round(value * 65536) for value in values))


def _icc_profile(device_class, colour_space, pcs, tags):
  """A minimal ICC v2 profile; `tags` maps tag signatures to encoded tag data."""
  table_end = 128 + 4 + 12 * len(tags)
  table, data = b'', b''
  for signature, body in tags.items():
    table += signature + struct.pack('>II', table_end + len(data), len(body))
    data += body + b'\0' * (-len(body) % 4)
  header = struct.pack('>I4sI4s4s4s12s4s', table_end + len(data), b'', 0x02100000, device_class,
                       colour_space, pcs, b'', b'acsp')
  header = header.ljust(68, b'\0') + _s15_fixed16(0.9642, 1.0, 0.8249)  # D50, the PCS white.
  return header.ljust(128, b'\0') + struct.pack('>I', len(tags)) + table + data


def _description(text):
  ascii_text = text.encode() + b'\0'
  return b'desc\0\0\0\0' + struct.pack('>I', len(ascii_text)) + ascii_text + b'\0' * 78


def _xyz(*values):
  return b'XYZ \0\0\0\0' + _s15_fixed16(*values)


def _gamma(value):
  return b'curv\0\0\0\0' + struct.pack('>IH', 1, round(value * 256))


# Adobe RGB (1998): its primaries as D50-adapted XYZ columns, and its gamma.
ADOBE_RGB_COLUMNS = np.array([[0.6097, 0.2053, 0.1492], [0.3111, 0.6257, 0.0632],
                              [0.0195, 0.0609, 0.7446]])
ADOBE_RGB_GAMMA = 563 / 256
# sRGB's primaries as D50-adapted XYZ columns (IEC 61966-2-1 with Bradford adaptation).
SRGB_COLUMNS = np.array([[0.4361, 0.3851, 0.1431], [0.2225, 0.7169, 0.0606],
                         [0.0139, 0.0971, 0.7141]])


def _adobe_rgb_profile():
  columns = ADOBE_RGB_COLUMNS.T
  return _icc_profile(b'mntr', b'RGB ', b'XYZ ', {
      b'desc': _description('Adobe RGB (1998) test'), b'wtpt': _xyz(0.9642, 1.0, 0.8249),
      b'rXYZ': _xyz(*columns[0]), b'gXYZ': _xyz(*columns[1]), b'bXYZ': _xyz(*columns[2]),
      b'rTRC': _gamma(ADOBE_RGB_GAMMA), b'gTRC': _gamma(ADOBE_RGB_GAMMA),
      b'bTRC': _gamma(ADOBE_RGB_GAMMA)})


# Lab (D50) of a coated-paper print for each combination of full inks (cyan, magenta, yellow); any
# with black ink is black.
PRINT_LAB = {(0, 0, 0): (95, 0, 3), (1, 0, 0): (55, -37, -50), (0, 1, 0): (48, 74, -3),
             (0, 0, 1): (89, -5, 93), (1, 1, 0): (24, 22, -46), (1, 0, 1): (50, -65, 27),
             (0, 1, 1): (47, 68, 48), (1, 1, 1): (20, 0, 0)}


def _cmyk_profile():
  """A printer profile whose lookup table (two points per ink) is `PRINT_LAB`."""
  grid = b''
  for cyan in (0, 1):
    for magenta in (0, 1):
      for yellow in (0, 1):
        for black in (0, 1):
          lightness, a, b = (0, 0, 0) if black else PRINT_LAB[cyan, magenta, yellow]
          grid += struct.pack('>3H', round(lightness / 100 * 0xFF00), round((a + 128) * 256),
                              round((b + 128) * 256))
  identity_matrix = _s15_fixed16(1, 0, 0, 0, 1, 0, 0, 0, 1)  # Used only with an XYZ input.
  table = (b'mft2\0\0\0\0' + struct.pack('>4B', 4, 3, 2, 0) + identity_matrix
           + struct.pack('>2H', 2, 2)  # Two entries per input and output curve: straight lines.
           + struct.pack('>8H', *(0, 0xFFFF) * 4) + grid + struct.pack('>6H', *(0, 0xFFFF) * 3))
  return _icc_profile(b'prtr', b'CMYK', b'Lab ', {
      b'desc': _description('Coated print test'), b'wtpt': _xyz(0.9642, 1.0, 0.8249),
      b'A2B0': table})


def _srgb_encode(linear):
  linear = np.clip(linear, 0, 1)
  return 255 * np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)


def _lab_to_srgb(lightness, a, b):
  """Lab (D50) to sRGB, computed here independently of LittleCMS."""
  fy = (lightness + 16) / 116
  f = np.array([fy + a / 500, fy, fy - b / 200])
  xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * [0.9642, 1.0, 0.8249]
  return _srgb_encode(np.linalg.solve(SRGB_COLUMNS, xyz))


def _solid_colour(prepared):
  pixels = np.asarray(_decode(prepared), np.float32)
  return pixels.reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize('max_side', [0, 48])
def test_wide_gamut_rgb_profile_is_converted_to_srgb(max_side):
  colour = (200, 120, 60)
  data = _encode(Image.new('RGB', (64, 64), colour), 'JPEG', quality=95,
                 icc_profile=_adobe_rgb_profile())
  prepared = images.prepare_image(data, max_side=max_side)
  assert prepared.jpeg != data
  linear = (np.array(colour) / 255) ** ADOBE_RGB_GAMMA
  expected = _srgb_encode(np.linalg.solve(SRGB_COLUMNS, ADOBE_RGB_COLUMNS @ linear))
  assert np.abs(_solid_colour(prepared) - expected).max() <= 4
  assert np.abs(expected - colour).max() > 20  # The conversion matters for this colour.


@pytest.mark.parametrize('inks', [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 255, 255, 0),
                                  (255, 0, 255, 0), (255, 255, 255, 0)])
def test_cmyk_jpeg_with_profile_gets_the_profile_colours(inks):
  data = _encode(Image.new('CMYK', (64, 64), inks), 'JPEG', quality=95, icc_profile=_cmyk_profile())
  expected = _lab_to_srgb(*PRINT_LAB[tuple(ink // 255 for ink in inks[:3])])
  assert np.abs(_solid_colour(images.prepare_image(data)) - expected).max() <= 4


@pytest.mark.parametrize('inks,expected', [((0, 0, 0, 0), 255), ((0, 0, 0, 255), 0)])
def test_cmyk_jpeg_with_profile_keeps_paper_white_and_black_ink(inks, expected):
  data = _encode(Image.new('CMYK', (64, 64), inks), 'JPEG', quality=95, icc_profile=_cmyk_profile())
  assert np.abs(_solid_colour(images.prepare_image(data)) - expected).max() <= 3


@pytest.mark.parametrize('inks,expected', [
    ((255, 0, 0, 0), (0, 255, 255)), ((0, 255, 0, 0), (255, 0, 255)), ((0, 0, 0, 0), (255,) * 3),
    ((0, 0, 0, 255), (0, 0, 0))])
def test_cmyk_jpeg_without_profile_has_plausible_colours(inks, expected):
  # Pillow writes CMYK JPEGs inverted with an Adobe marker, as Photoshop does.
  data = _encode(Image.new('CMYK', (64, 64), inks), 'JPEG', quality=95)
  assert np.abs(_solid_colour(images.prepare_image(data)) - expected).max() <= 3


def test_srgb_profile_needs_no_conversion_and_jpeg_passes_through():
  srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile('sRGB')).tobytes()
  data = _encode(pattern_image(80, 60, seed=4), 'JPEG', quality=95, icc_profile=srgb)
  assert images.prepare_image(data).jpeg == data


@pytest.mark.parametrize('profile', [b'not a profile', _cmyk_profile()[:200], _cmyk_profile()])
def test_broken_or_mismatched_profile_is_ignored(profile):
  # The CMYK profile is whole, but an RGB image cannot use it.
  source = pattern_image(80, 60, seed=4)
  data = _encode(source, 'PNG', icc_profile=profile)
  decoded = np.asarray(_decode(images.prepare_image(data)), np.float32)
  assert np.abs(decoded - np.asarray(source, np.float32)).mean() < 3


def test_encode_jpeg_takes_pillow_images_and_rgb_arrays_alike():
  source = pattern_image(50, 30, seed=6)
  from_image = images.encode_jpeg(source, 85)
  from_array = images.encode_jpeg(np.asarray(source), 85)
  assert from_image == from_array and (from_array.width, from_array.height) == (50, 30)
  decoded = np.asarray(_decode(from_array), np.float32)
  assert np.abs(decoded - np.asarray(source, np.float32)).mean() < 3
