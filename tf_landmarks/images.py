"""Reading, fixing and resizing one image on ingest, with Pillow.

This module must not import TensorFlow: the record builder runs it in worker processes, and a worker
that imports TensorFlow takes seconds to start and hundreds of MB of memory. Remote paths (`gs://…`)
are read through `tf.io.gfile`, imported only when such a path shows up.

Every way an image can be unusable raises `ImageError` with a short reason that ends up in the
manifest; nothing else escapes `prepare_image` for bad image content.
"""

import dataclasses
import io
import random
import warnings
from typing import List, Sequence, Union

from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

# Images whose shorter side is under this are too small to carry a recognisable landmark (and break
# 224-px crops later).
MIN_IMAGE_SIDE = 32

# Pillow's own decompression-bomb guard warns at ~89 Mpx; treat that as a reason to skip the row
# rather than spending gigabytes on one image.
Image.MAX_IMAGE_PIXELS = 89_478_485


class ImageError(ValueError):
  """The image cannot be used; str(error) is the reason recorded for the row."""


@dataclasses.dataclass(frozen=True)
class PreparedImage:
  """An RGB JPEG ready for a shard."""
  jpeg: bytes
  height: int
  width: int


def read_bytes(path: str) -> bytes:
  """Reads a file from a local path or any `tf.io.gfile` URL (gs://, s3://…)."""
  if '://' in path:
    import tensorflow as tf  # Only for remote storage; keeps local workers TensorFlow-free.
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        return f.read()
    except tf.errors.NotFoundError:
      raise FileNotFoundError(path) from None
    except tf.errors.OpError as error:
      raise OSError(error.message) from None
  with open(path, 'rb') as f:
    return f.read()


def _to_rgb(image: Image.Image) -> Image.Image:
  """Converts any Pillow mode to RGB; transparency is composited on white as browsers show it."""
  if image.mode == 'RGB':
    return image
  if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    # 16/32-bit grayscale: scale to 8 bits instead of clipping everything to white.
    image = image.point(lambda value: value * (1 / 256)).convert('L')
  return image.convert('RGB')


def _target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
  scale = max_side / max(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


def prepare_image(data: bytes, max_side: int = 0, jpeg_quality: int = 90,
                  min_side: int = MIN_IMAGE_SIDE) -> PreparedImage:
  """Decodes, orients, converts to RGB, downsizes and JPEG-encodes one image.

  Args:
    data: the file's bytes (JPEG, PNG, GIF, WebP, BMP, TIFF… anything Pillow reads).
    max_side: if > 0, the long side is resized down to this (aspect kept; never upscaled).
    jpeg_quality: quality of the re-encoded JPEG.
    min_side: images whose shorter side (after EXIF orientation, before resizing) is smaller are
      rejected.

  Returns:
    The prepared image. An RGB baseline JPEG that needs no change is passed through byte for byte.

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
      if needs_resize and source_format == 'JPEG':
        # Draft mode makes libjpeg decode at 1/2, 1/4 or 1/8 scale directly, never below the size
        # asked for: the single biggest speed-up of ingest when downscaling large photos.
        image.draft('RGB', _target_size(stored_width, stored_height, max_side))
      image.load()
      source_mode = image.mode
      orientation = image.getexif().get(0x0112, 1)
      if orientation != 1:  # exif_transpose would otherwise still copy the whole image.
        image = ImageOps.exif_transpose(image)
      image = _to_rgb(image)
  except ImageError:
    raise
  except (Image.DecompressionBombWarning, Image.DecompressionBombError):
    raise ImageError('image too large (decompression bomb guard)') from None
  except UnidentifiedImageError:
    raise ImageError('not a readable image') from None
  except Exception as error:  # pylint: disable=broad-except
    # Pillow reports truncated or corrupt data as OSError ('image file is truncated', 'broken data
    # stream'), SyntaxError, and from some plugins struct.error or IndexError: on untrusted files any
    # decoder failure means this row is unusable, never that the build should stop.
    raise ImageError(f'corrupt or truncated image ({type(error).__name__}: {error})') from None

  if min(stored_width, stored_height) < min_side:
    raise ImageError(f'image too small ({stored_width}x{stored_height} < {min_side} px)')

  width, height = image.size
  if max_side > 0 and max(width, height) > max_side:
    # Area averaging (Pillow's BOX filter when shrinking, OpenCV's INTER_AREA) is the textbook
    # downscaling filter: no aliasing, and the cheapest of Pillow's antialiasing filters (measured per
    # 320-px draft: box 0.6 ms, bilinear 0.9, bicubic 1.4), which matters when resizing is a quarter
    # of the per-image work.
    image = image.resize(_target_size(width, height, max_side), Image.Resampling.BOX)
  elif source_format == 'JPEG' and source_mode == 'RGB' and orientation == 1 and not needs_resize:
    # Re-encoding an untouched JPEG only loses quality.
    return PreparedImage(jpeg=data, height=height, width=width)
  return encode_jpeg(image, jpeg_quality)


def encode_jpeg(image: Image.Image, jpeg_quality: int) -> PreparedImage:
  """Encodes an RGB Pillow image as JPEG."""
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=jpeg_quality)
  return PreparedImage(jpeg=buffer.getvalue(), height=image.height, width=image.width)


def distorted_copy(jpeg: bytes, seed: int, jpeg_quality: int = 90) -> PreparedImage:
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


def prepare_image_file(candidate_paths: Sequence[str], max_side: int, jpeg_quality: int,
                       min_side: int = MIN_IMAGE_SIDE) -> PreparedImage:
  """`prepare_image` on the first of `candidate_paths` that exists.

  Raises:
    ImageError: none of the paths exists, the file is unreadable, or as `prepare_image`.
  """
  for path in candidate_paths:
    try:
      data = read_bytes(path)
    except FileNotFoundError:
      continue
    except OSError as error:
      raise ImageError(f'unreadable image file ({error.strerror or error})') from None
    return prepare_image(data, max_side=max_side, jpeg_quality=jpeg_quality, min_side=min_side)
  raise ImageError('missing image file')


def prepare_image_files(candidate_path_lists: Sequence[Sequence[str]], max_side: int,
                        jpeg_quality: int, min_side: int = MIN_IMAGE_SIDE
                        ) -> List[Union[PreparedImage, str]]:
  """Worker entry point of the record builder: prepares a chunk of images.

  Returns:
    For each image, the PreparedImage or the reason it is unusable.
  """
  results = []
  for candidate_paths in candidate_path_lists:
    try:
      results.append(prepare_image_file(candidate_paths, max_side, jpeg_quality, min_side))
    except ImageError as error:
      results.append(str(error))
  return results
