"""Reading, fixing and resizing one image on ingest, with Pillow.

This module must not import TensorFlow: the record builder runs it in worker processes, and a worker
that imports TensorFlow takes seconds to start and hundreds of MB of memory. Remote paths (`gs://…`)
are read through `tf.io.gfile`, imported only when such a path shows up.

Every way an image can be unusable raises `ImageError` with a short reason that ends up in the
manifest; nothing else escapes `prepare_image` for bad image content. Files are read only if they
are regular files within a size limit, so a FIFO, a device or a huge file costs a skipped row, not a
hung or exhausted worker.

Prepared images are sRGB: an embedded colour profile of another space (Adobe RGB, Display P3, CMYK…)
is converted with LittleCMS, since the JPEGs written here carry no profile and readers assume sRGB.
"""

import dataclasses
import functools
import hashlib
import io
import os
import random
import stat
import warnings
from typing import List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageCms, ImageEnhance, ImageOps, UnidentifiedImageError

from tf_landmarks import files

# Images whose shorter side is under this are too small to carry a recognisable landmark (and break
# 224-px crops later).
MIN_IMAGE_SIDE = 32

# Quality of re-encoded JPEGs, unless the build says otherwise (--jpeg_quality).
JPEG_QUALITY = 90

# Pillow's own decompression-bomb guard warns at ~89 Mpx; treat that as a reason to skip the row
# rather than spending gigabytes on one image.
Image.MAX_IMAGE_PIXELS = 89_478_485

# Larger image files are refused before reading: the pixel guard above only helps once the whole
# file is in memory, and a path can name anything (a huge file, or a link to /dev/zero).
MAX_FILE_BYTES = 50 * 1024 * 1024


class ImageError(ValueError):
  """The image cannot be used; str(error) is the reason recorded for the row."""


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """An RGB JPEG ready for a shard.

  Attributes:
    jpeg: the JPEG.
    height: its height in pixels.
    width: its width in pixels.
    unchanged: `jpeg` is the source file's bytes, passed through as they were.
  """
  jpeg: bytes
  height: int
  width: int
  unchanged: bool = False


@dataclasses.dataclass(frozen=True)
class UnchangedFile:
  """A checked image file that passes through unchanged, named instead of carried.

  The record builder's workers return this for local files so that the bytes neither cross from a
  worker to the main process nor get staged a second time; the shard pass reads them again with
  `read_unchanged`, which makes sure they are still the bytes that were checked.

  Attributes:
    path: the file.
    num_bytes: its size.
    sha256: hex SHA-256 of its bytes when checked.
    height: image height in pixels.
    width: image width in pixels.
  """
  path: str
  num_bytes: int
  sha256: str
  height: int
  width: int


def _check_file(is_regular: bool, size: int, max_bytes: int) -> None:
  if not is_regular:
    raise ImageError('not a regular file')
  if size > max_bytes:
    raise ImageError(f'file too large ({size} > {max_bytes} bytes)')


def _read_limited(f, size: int, max_bytes: int) -> bytes:
  """Reads a file whose size was found to be `size`, failing beyond `max_bytes`."""
  # Asking for one byte more than the size found tells whether that was all, without the buffer of
  # max_bytes + 1 that asking for the limit would allocate (which costs a third of reading a photo).
  data = f.read(size + 1)
  if len(data) > size:
    # The size was wrong (the file grew, or it is a /proc-like file that reports 0): read on, but
    # never more than one byte past the limit.
    data += f.read(max_bytes + 1 - len(data))
  if len(data) > max_bytes:
    raise ImageError(f'file too large (more than {max_bytes} bytes)')
  return data


def read_bytes(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
  """Reads an image file from a local path or any `tf.io.gfile` URL (gs://, s3://…).

  Only regular files are read (symbolic links are followed), never a FIFO, device or folder: opening
  a FIFO waits for a writer forever, and a device such as /dev/zero never ends.

  Args:
    path: the file.
    max_bytes: larger files are refused without reading them.

  Returns:
    The file's bytes.

  Raises:
    FileNotFoundError: the path does not exist.
    ImageError: not a regular file, or larger than `max_bytes`.
    OSError: the file cannot be read.
  """
  if files.is_remote(path):
    import tensorflow as tf  # Only for remote storage; keeps local workers TensorFlow-free.
    try:
      status = tf.io.gfile.stat(path)
      _check_file(not status.is_directory, status.length, max_bytes)
      with tf.io.gfile.GFile(path, 'rb') as f:
        return _read_limited(f, status.length, max_bytes)
    except tf.errors.NotFoundError:
      raise FileNotFoundError(path) from None
    except tf.errors.OpError as error:
      raise OSError(error.message) from None
  # stat before open: merely opening a FIFO blocks.
  status = os.stat(path)
  _check_file(stat.S_ISREG(status.st_mode), status.st_size, max_bytes)
  # Should the path be swapped for a FIFO after the stat, O_NONBLOCK makes the open return at once
  # and fstat refuses it; regular files ignore the flag.
  flags = os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_BINARY', 0)
  descriptor = os.open(path, flags)
  with open(descriptor, 'rb') as f:
    status = os.fstat(descriptor)
    _check_file(stat.S_ISREG(status.st_mode), status.st_size, max_bytes)
    return _read_limited(f, status.st_size, max_bytes)


def _flatten_transparency(image: Image.Image) -> Image.Image:
  """Composites transparent images on white, as browsers show them; others are returned as is."""
  if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  return image


def _to_8_bit(image: Image.Image) -> Image.Image:
  """Maps 16-bit, 32-bit integer and floating-point grayscale to 8 bits; other modes are unchanged.

  Pillow's own conversion clips these to [0, 255], which turns 16-bit photos white and [0, 1] floats
  black. 'I;16' holds 16-bit samples. 'I' (32-bit) is how Pillow opens 16-bit files of some
  formats, but 32-bit TIFFs hold anything, so the value range decides: up to 255 is kept, up to
  65535 is 16-bit, larger uses the whole positive 32-bit range. Floats within [0, 1] are scaled by
  255, others clipped to [0, 255]; NaN becomes 0. Negative values become 0.
  """
  if image.mode.startswith('I;16'):
    pixels = np.asarray(image) >> 8
  elif image.mode == 'I':
    pixels = np.clip(np.asarray(image), 0, None)
    largest = int(pixels.max(initial=0))
    pixels = pixels >> (0 if largest <= 0xFF else 8 if largest <= 0xFFFF else 23)
  elif image.mode == 'F':
    pixels = np.nan_to_num(np.asarray(image), nan=0.0, posinf=255.0, neginf=0.0)
    if pixels.size and pixels.min() >= 0 and pixels.max() <= 1:
      pixels = pixels * 255
    pixels = np.clip(np.rint(pixels), 0, 255)
  else:
    return image
  return Image.fromarray(pixels.astype(np.uint8))


_SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile('sRGB'))


@functools.lru_cache(maxsize=8)
def _srgb_transform(icc_profile: Optional[bytes],
                    mode: str) -> Optional[ImageCms.ImageCmsTransform]:
  """The conversion of `mode` images with the embedded `icc_profile` to sRGB RGB, if one is needed.

  Cached: photos of one camera or editor share a profile, and building a transform takes
  milliseconds.

  Returns:
    None when there is nothing to convert: no profile, an sRGB one, or a profile that cannot be used
    (unreadable, or for another colour space than `mode`), which is ignored as browsers do.
  """
  if not icc_profile:
    return None
  try:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
    # sRGB profiles differ byte for byte (Adobe's, Apple's, camera makers'), but all say so in their
    # description; converting them would only cost time and the byte-for-byte pass-through.
    if 'srgb' in ImageCms.getProfileDescription(profile).lower():
      return None
    return ImageCms.buildTransform(profile, _SRGB_PROFILE, mode, 'RGB')
  except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
    return None


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
  scale = max_side / max(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, max_side: int = 0, jpeg_quality: int = JPEG_QUALITY,
                  min_side: int = MIN_IMAGE_SIDE) -> PreparedImage:
  """Decodes, orients, converts to sRGB RGB, downsizes and JPEG-encodes one image.

  Colour: an embedded ICC profile other than sRGB is converted to sRGB (CMYK included); an unusable
  profile is ignored. Transparency is composited on white. 16-bit, 32-bit and floating-point images
  are mapped to 8 bits (see `_to_8_bit`).

  Args:
    data: the file's bytes (JPEG, PNG, GIF, WebP, BMP, TIFF… anything Pillow reads).
    max_side: if > 0, the long side is resized down to this (aspect kept; never upscaled).
    jpeg_quality: quality of the re-encoded JPEG.
    min_side: images whose shorter side, after resizing, is smaller are rejected.

  Returns:
    The prepared image. An RGB JPEG that needs no change (no resize, no EXIF rotation, no colour
    profile to convert) is passed through byte for byte, with `unchanged` set.

  Raises:
    ImageError: the bytes are empty, not an image, corrupt or truncated, too small, or too large.
  """
  if not data:
    raise ImageError('empty file')
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      image = Image.open(io.BytesIO(data))
      source_format = image.format
      stored_width, stored_height = image.size
      needs_resize = max_side > 0 and max(stored_width, stored_height) > max_side
      final_width, final_height = (_target_size(stored_width, stored_height, max_side)
                                   if needs_resize else (stored_width, stored_height))
      # Checked on the size that ends up in the record (a 40x5000 panorama would become 5x640), and
      # before decoding, which is then not spent on a rejected image.
      if min(final_width, final_height) < min_side:
        resized = f' after resizing to {max_side} px' if needs_resize else ''
        raise ImageError(f'image too small ({final_width}x{final_height}{resized} < {min_side} px)')
      icc_profile = image.info.get('icc_profile')
      if (source_format == 'JPEG' and image.mode == 'RGB' and not needs_resize and
          image.getexif().get(0x0112, 1) == 1 and _srgb_transform(icc_profile, 'RGB') is None):
        # Re-encoding a JPEG that needs no change only loses quality, so it passes through and is
        # decoded only to find out whether it is whole. At 1/8 scale (asking for 1x1 px gets
        # libjpeg's smallest) libjpeg still entropy-decodes every byte, which is where truncated
        # and corrupt data show, but the inverse DCT and colour conversion shrink to one value per
        # 8x8 block: 0.55 instead of 0.8 ms per 640-px photo. On ~3,000 truncated and damaged
        # copies of real photos, baseline and progressive, it rejected exactly what a full decode
        # rejects (tests/test_images.py checks a sample).
        image.draft('RGB', (1, 1))
        image.load()
        return PreparedImage(jpeg=data, height=stored_height, width=stored_width, unchanged=True)
      if needs_resize and source_format == 'JPEG':
        # Draft mode makes libjpeg decode at 1/2, 1/4 or 1/8 scale directly, never below the size
        # asked for: the single biggest speed-up of ingest when downscaling large photos.
        image.draft('RGB', (final_width, final_height))
      image.load()
      orientation = image.getexif().get(0x0112, 1)
      if orientation != 1:  # exif_transpose would otherwise still copy the whole image.
        image = ImageOps.exif_transpose(image)
      image = _to_8_bit(_flatten_transparency(image))
      if image.mode not in ('RGB', 'L', 'CMYK'):  # The modes whose profiles LittleCMS reads.
        image = image.convert('RGB')
      to_srgb = _srgb_transform(icc_profile, image.mode)
      if to_srgb is not None:
        image = to_srgb.apply(image)
      elif image.mode != 'RGB':
        image = image.convert('RGB')
  except ImageError:
    raise
  except (Image.DecompressionBombWarning, Image.DecompressionBombError):
    raise ImageError('image too large (decompression bomb guard)') from None
  except UnidentifiedImageError:
    raise ImageError('not a readable image') from None
  except Exception as error:  # pylint: disable=broad-except
    # Pillow reports truncated or corrupt data as OSError ('image file is truncated', 'broken data
    # stream'), SyntaxError, and from some plugins struct.error or IndexError: on untrusted files
    # any decoder failure means this row is unusable, never that the build should stop.
    raise ImageError(f'corrupt or truncated image ({type(error).__name__}: {error})') from None

  if needs_resize:
    # EXIF orientations 5-8 swap width and height.
    target = ((final_height, final_width) if orientation in (5, 6, 7, 8)
              else (final_width, final_height))
    if image.size != target:  # Draft mode may already have decoded at exactly this size.
      # Area averaging (Pillow's BOX filter when shrinking, OpenCV's INTER_AREA) is the textbook
      # downscaling filter: no aliasing, and the cheapest of Pillow's antialiasing filters (measured
      # per 320-px draft: box 0.6 ms, bilinear 0.9, bicubic 1.4), which matters when resizing is a
      # quarter of the per-image work.
      image = image.resize(target, Image.Resampling.BOX)
  return encode_jpeg(image, jpeg_quality)


def encode_jpeg(image: Union[Image.Image, np.ndarray], jpeg_quality: int) -> PreparedImage:
  """Encodes an RGB image as a baseline JPEG without metadata.

  The one JPEG encoder of the project (ingest and the synthetic world). Pillow's encoder is the same
  libjpeg-turbo as OpenCV's and, with the versions used here, writes the same bytes as
  `cv2.imencode` at the same quality.

  Args:
    image: an RGB Pillow image, or a uint8 array [height, width, 3] of RGB pixels.
    jpeg_quality: 1–100.

  Returns:
    The JPEG and its size.
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=jpeg_quality)
  return PreparedImage(jpeg=buffer.getvalue(), height=image.height, width=image.width)


def distorted_copy(jpeg: bytes, seed: int, jpeg_quality: int = JPEG_QUALITY) -> PreparedImage:
  """A mildly distorted copy of an image: random crop, flip, small rotation, colour and contrast.

  Used to give a class that has a single image a validation example (one of the Google Landmarks
  pipelines did this) so that validation still covers every class.
  """
  rng = random.Random(seed)
  image = Image.open(io.BytesIO(jpeg)).convert('RGB')
  width, height = image.size
  keep = rng.uniform(0.75, 0.95)
  crop_w, crop_h = max(1, int(width * keep)), max(1, int(height * keep))
  left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
  image = image.crop((left, top, left + crop_w, top + crop_h))
  if rng.random() < 0.5:
    image = ImageOps.mirror(image)
  image = image.rotate(rng.uniform(-10, 10), resample=Image.Resampling.BILINEAR, expand=False)
  image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
  image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
  image = image.resize((width, height), Image.Resampling.BICUBIC)
  return encode_jpeg(image, jpeg_quality)


def image_paths(image_dir: str, image_id: str) -> List[str]:
  """Where an image may be: `<dir>/<id>.jpg`, or DELF's nested `<dir>/a/b/c/<id>.jpg`."""
  flat = files.join(image_dir, f'{image_id}.jpg')
  if len(image_id) < 3:
    return [flat]
  return [flat, files.join(image_dir, image_id[0], image_id[1], image_id[2], f'{image_id}.jpg')]


def _prepare_first_existing(candidate_paths: Sequence[str], max_side: int, jpeg_quality: int,
                            min_side: int, max_file_bytes: int) -> tuple[str, bytes, PreparedImage]:
  """`prepare_image` on the first of `candidate_paths` that exists: (its path, bytes, result)."""
  for path in candidate_paths:
    try:
      data = read_bytes(path, max_file_bytes)
    except FileNotFoundError:
      continue
    except OSError as error:
      raise ImageError(f'unreadable image file ({error.strerror or error})') from None
    return path, data, prepare_image(data, max_side=max_side, jpeg_quality=jpeg_quality,
                                     min_side=min_side)
  raise ImageError('missing image file')


def prepare_image_file(candidate_paths: Sequence[str], max_side: int, jpeg_quality: int,
                       min_side: int = MIN_IMAGE_SIDE,
                       max_file_bytes: int = MAX_FILE_BYTES) -> PreparedImage:
  """`prepare_image` on the first of `candidate_paths` that exists.

  Args:
    candidate_paths: where the image may be, in order of preference.
    max_side: as `prepare_image`.
    jpeg_quality: as `prepare_image`.
    min_side: as `prepare_image`.
    max_file_bytes: larger files are rejected without being read.

  Raises:
    ImageError: none of the paths exists, the file is unreadable, not a regular file or too large,
      or as `prepare_image`.
  """
  return _prepare_first_existing(candidate_paths, max_side, jpeg_quality, min_side,
                                 max_file_bytes)[2]


def prepare_image_files(
    candidate_path_lists: Sequence[Sequence[str]], max_side: int, jpeg_quality: int,
    min_side: int = MIN_IMAGE_SIDE, max_file_bytes: int = MAX_FILE_BYTES,
    name_unchanged_files: bool = False) -> List[Union[PreparedImage, UnchangedFile, str]]:
  """Worker entry point of the record builder: prepares a chunk of images.

  Arguments are as `prepare_image_file`, with one list of candidate paths per image, and:
    name_unchanged_files: return each image that passes through unchanged as an `UnchangedFile`
      instead of its bytes.

  Returns:
    For each image, the PreparedImage, the UnchangedFile or the reason it is unusable.
  """
  results = []
  for candidate_paths in candidate_path_lists:
    try:
      path, data, prepared = _prepare_first_existing(candidate_paths, max_side, jpeg_quality,
                                                     min_side, max_file_bytes)
    except ImageError as error:
      results.append(str(error))
      continue
    if name_unchanged_files and prepared.unchanged:
      results.append(UnchangedFile(path, len(data), hashlib.sha256(data).hexdigest(),
                                   prepared.height, prepared.width))
    else:
      results.append(prepared)
  return results


def read_unchanged(unchanged: UnchangedFile) -> bytes:
  """The bytes of an `UnchangedFile`, read again and checked to be the ones that were prepared.

  Raises:
    ImageError: the file is gone, unreadable, or no longer holds the same bytes.
  """
  changed = ImageError(f'{unchanged.path} changed or disappeared after it was checked')
  try:
    data = read_bytes(unchanged.path, unchanged.num_bytes)
  except FileNotFoundError:
    raise changed from None
  except OSError as error:
    reason = error.strerror or error
    raise ImageError(f'{unchanged.path} is no longer readable ({reason})') from None
  except ImageError:  # Now larger, or no longer a regular file.
    raise changed from None
  if hashlib.sha256(data).hexdigest() != unchanged.sha256:
    raise changed
  return data
