"""The learned backend: DELF keypoints from an image pyramid, in process or as a SavedModel.

For each scale s of the pyramid the image is resized (bilinear, as DELF) to s times its size, the
`DelfModel` gives an L2-normalised descriptor and an attention score per cell of its map, and each
cell's receptive-field box (the registry's `local_feature_receptive_field`) is mapped back to the
original image. Cells whose attention reaches `abs_threshold` are candidates; over all scales the
`max_feature_num` with the highest attention are kept, after an optional greedy non-maximum
suppression of their boxes (`iou_threshold` < 1; DELF's default 1.0 turns it off: the boxes of
neighbouring cells overlap heavily, ResNet50's by 95% along each axis). An optional PCA (fitted on
index descriptors with `fit_pca`, or on a sample of index images with `fit_pca_to_images`) then
shortens the descriptors, with L2 normalisation before and after as in DELF.

One implementation serves both uses: the pyramid, selection and PCA are TensorFlow ops in one
`tf.function` (`_ExtractionModule.extract`), which `DelfExtractor` calls in process and
`export_saved_model` saves as the SavedModel's `serving_default`, with DELF's signature names so
the export can stand in for a DELF model (and `load_saved_model` reads DELF's own exports too):
inputs `input_image` (uint8 [H, W, 3]), `input_scales` (float32 [S]), `input_max_feature_num`
(int32), `input_abs_thres` (float32); outputs `boxes` (float32 [N, 4], (y1, x1, y2, x2) receptive
fields in original pixels), `features` ([N, D]), `scales` ([N], 1 / pyramid scale: DELF's
convention, larger for larger regions) and `scores` ([N], attention).

Large images: the longer side is first capped at `max_side` (default 1024, DELF's
`max_image_size`); the pyramid scales apply to the capped image, so scale 2 of a 4000-pixel photo
costs what it costs at 2048 pixels, not 8000. Locations are still given in the original's pixels.

Coordinates have pixel centres at integers (OpenCV's convention). A resized pixel u maps to the
original's (u + 0.5)·(original side / resized side) − 0.5, the exact inverse of `tf.image.resize`'s
half-pixel sampling, per axis, so rounding a side to whole pixels (or to the backbone's receptive-
field input multiple, 8 for `tiny`) moves no keypoint. DELF divides by the nominal scale instead,
which puts its locations 0.5·(1/s − 1) original pixels off (1.5 pixels at s = 1/4), plus the
rounding of the resized sides.
"""

import dataclasses
import io
import math
import numbers
import os
from typing import Dict, Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_landmarks import files
from tf_landmarks import models
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.models import backbones
from tf_landmarks.models.delf import DelfError
from tf_landmarks.models.delf import DelfModel

DEFAULT_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
DEFAULT_MAX_FEATURE_NUM = 1000
DEFAULT_MAX_SIDE = 1024
INPUT_NAMES = ('input_image', 'input_scales', 'input_max_feature_num', 'input_abs_thres')
OUTPUT_NAMES = ('boxes', 'features', 'scales', 'scores')
# SavedModel's folder for files the graph does not read (TF Serving's convention).
PCA_FILE = 'assets.extra/delf_pca.npz'

_SIGNATURE = (
    tf.TensorSpec([None, None, 3], tf.uint8, name='input_image'),
    tf.TensorSpec([None], tf.float32, name='input_scales'),
    tf.TensorSpec([], tf.int32, name='input_max_feature_num'),
    tf.TensorSpec([], tf.float32, name='input_abs_thres'),
)
# Components whose variance is below this fraction of the first's describe rounding noise.
_MIN_RELATIVE_VARIANCE = 1e-10
_PCA_CHUNK_ROWS = 65536


@dataclasses.dataclass(frozen=True, eq=False)  # Arrays have no truth value to compare by.
class Pca:
  """A PCA of L2-normalised descriptors (see `fit_pca`).

  Attributes:
    mean: float32 [D], the mean of the normalised descriptors.
    components: float32 [dim, D], the principal directions, strongest first.
    variances: float32 [dim], the variance of the descriptors along each direction.
    whiten: whether `apply_pca` divides each projection by its standard deviation.
  """
  mean: np.ndarray
  components: np.ndarray
  variances: np.ndarray
  whiten: bool

  @property
  def dim(self) -> int:
    return int(self.components.shape[0])


def _l2_normalize_rows(rows: np.ndarray) -> np.ndarray:
  # The same floor as tf.math.l2_normalize, so that numpy and graph agree on all-zero rows.
  return rows / np.sqrt(np.maximum(np.sum(rows * rows, axis=1, keepdims=True), 1e-12))


def fit_pca(descriptors, dim: int = 40, whiten: bool = False) -> Pca:
  """Fits a PCA to local descriptors (typically those of the index images).

  The descriptors are L2-normalised first, as `apply_pca` does. The covariance is accumulated in
  float64 over chunks of rows, so a million 1024-d descriptors need 8 MB of covariance, not an
  8 GB float64 copy; its SVD gives the directions. Each direction's sign is fixed (largest
  entry positive) so that a refit on the same data gives the same PCA.

  Args:
    descriptors: [N, D] array of descriptors, N > dim.
    dim: number of components kept (DELF: 40).
    whiten: divide each projection by its standard deviation in `apply_pca`.

  Returns:
    The PCA.

  Raises:
    DelfError: not a finite 2-D array, too few descriptors or directions for `dim`.
  """
  rows = np.asarray(descriptors)
  if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.number):
    raise DelfError(f'PCA needs a numeric [N, D] array of descriptors, got shape {rows.shape}')
  count, depth = rows.shape
  if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not 1 <= dim <= depth:
    raise DelfError(f'PCA dim must be an integer from 1 to the descriptor size {depth}, not '
                    f'{dim!r}')
  if count <= dim:
    raise DelfError(f'a {dim}-d PCA needs more than {dim} descriptors, got {count}')
  total = np.zeros(depth)
  for start in range(0, count, _PCA_CHUNK_ROWS):
    chunk = _l2_normalize_rows(rows[start:start + _PCA_CHUNK_ROWS].astype(np.float64))
    if not np.all(np.isfinite(chunk)):
      raise DelfError('PCA descriptors contain NaN or infinite values')
    total += chunk.sum(axis=0)
  mean = total / count
  covariance = np.zeros((depth, depth))
  for start in range(0, count, _PCA_CHUNK_ROWS):
    centred = _l2_normalize_rows(rows[start:start + _PCA_CHUNK_ROWS].astype(np.float64)) - mean
    covariance += centred.T @ centred
  covariance /= count - 1
  # The covariance is symmetric positive semi-definite: its SVD is its eigendecomposition, with
  # the variances sorted largest first.
  _, variances, directions = np.linalg.svd(covariance)
  variances, directions = variances[:dim], directions[:dim]
  if variances[-1] <= _MIN_RELATIVE_VARIANCE * variances[0]:
    usable = int(np.sum(variances > _MIN_RELATIVE_VARIANCE * variances[0]))
    raise DelfError(f'the descriptors span only {usable} directions, fewer than the PCA dim '
                    f'{dim}; lower the dim or fit on more varied descriptors')
  largest = np.argmax(np.abs(directions), axis=1)
  directions *= np.sign(directions[np.arange(dim), largest])[:, None]
  return Pca(mean.astype(np.float32), directions.astype(np.float32),
             variances.astype(np.float32), bool(whiten))


def fit_pca_to_images(model: DelfModel, images: Iterable[np.ndarray], *, dim: int, whiten: bool,
                      descriptors_per_image: int, scales: Sequence[float] = DEFAULT_SCALES,
                      max_feature_num: int = DEFAULT_MAX_FEATURE_NUM, abs_threshold: float = 0.0,
                      seed: int = 0) -> Pca:
  """`fit_pca` on descriptors of `model` sampled from images: how an index fits its PCA.

  Each image is extracted without PCA (as `DelfExtractor` with the given settings) and gives at
  most `descriptors_per_image` descriptors, drawn at random (seeded) when it has more, so that
  every image weighs alike and the sample stays bounded.

  Args:
    model: the DELF model.
    images: uint8 RGB images [H, W, 3].
    dim: components kept.
    whiten: whiten the projections.
    descriptors_per_image: descriptors kept per image.
    scales: DELF's pyramid scales.
    max_feature_num: features extracted per image, strongest first.
    abs_threshold: DELF's attention threshold.
    seed: of the random draw.

  Raises:
    DelfError: as `fit_pca` (too few or degenerate descriptors).
  """
  extract = DelfExtractor(model, scales=scales, max_feature_num=max_feature_num,
                          abs_threshold=abs_threshold)
  rng = np.random.default_rng(seed)
  samples = [np.zeros((0, model.descriptor_dim), np.float32)]
  for image in images:
    descriptors = extract(image).descriptors
    if len(descriptors) > descriptors_per_image:
      descriptors = descriptors[np.sort(rng.choice(len(descriptors), descriptors_per_image,
                                                   replace=False))]
    samples.append(descriptors)
  return fit_pca(np.concatenate(samples), dim, whiten)


def apply_pca(descriptors, pca: Pca) -> tf.Tensor:
  """Projects descriptors with `pca`: L2-normalise, centre, project, whiten if the PCA says so,
  L2-normalise again (DELF's post-processing).

  Works eagerly and inside a graph (the SavedModel embeds it).

  Args:
    descriptors: [N, D] array or tensor.
    pca: from `fit_pca` or `load_pca`, fitted on D-dimensional descriptors.

  Returns:
    float32 tensor [N, pca.dim], rows of unit length.

  Raises:
    DelfError: the descriptors are not D-dimensional.
  """
  descriptors = tf.cast(descriptors, tf.float32)
  depth = descriptors.shape[-1]
  if descriptors.shape.rank != 2 or depth != pca.mean.shape[0]:
    raise DelfError(f'the PCA was fitted on {pca.mean.shape[0]}-d descriptors; got descriptors of '
                    f'shape {descriptors.shape.as_list()}')
  centred = tf.math.l2_normalize(descriptors, axis=1) - pca.mean
  projected = tf.matmul(centred, pca.components, transpose_b=True)
  if pca.whiten:
    projected /= tf.sqrt(pca.variances)
  return tf.math.l2_normalize(projected, axis=1)


def save_pca(pca: Pca, path: str) -> None:
  """Writes `pca` to an .npz file (mean, components, variances, whiten); any `tf.io.gfile` path."""
  buffer = io.BytesIO()
  np.savez(buffer, mean=pca.mean, components=pca.components, variances=pca.variances,
           whiten=np.array(pca.whiten))
  folder = os.path.dirname(path)
  if folder:
    tf.io.gfile.makedirs(folder)
  files.write_atomically(path, buffer.getvalue())


def load_pca(path: str) -> Pca:
  """Reads a PCA written by `save_pca`.

  Raises:
    DelfError: the file is missing, unreadable, or not such a PCA.
  """
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      content = f.read()
  except tf.errors.OpError as e:
    raise DelfError(f'cannot read PCA file {path}: {e.message}') from None
  try:
    with np.load(io.BytesIO(content), allow_pickle=False) as arrays:
      pca = Pca(arrays['mean'].astype(np.float32), arrays['components'].astype(np.float32),
                arrays['variances'].astype(np.float32), bool(arrays['whiten']))
  except (OSError, ValueError, KeyError) as e:
    raise DelfError(f'{path} is not a PCA file written by save_pca ({e})') from None
  dim, depth = pca.components.shape if pca.components.ndim == 2 else (0, 0)
  if not dim or pca.mean.shape != (depth,) or pca.variances.shape != (dim,):
    raise DelfError(f'{path} holds a PCA of inconsistent shapes (mean {pca.mean.shape}, '
                    f'components {pca.components.shape}, variances {pca.variances.shape})')
  return pca


class _ExtractionModule(tf.Module):
  """The extraction graph: what `DelfExtractor` runs and `export_saved_model` saves.

  The settings DELF's signature has no input for (receptive field, NMS, size cap, PCA) are fixed
  here, at construction.
  """

  def __init__(self, model: DelfModel, pca: Optional[Pca], iou_threshold: float,
               max_side: Optional[int]):
    super().__init__(name='delf_extraction')
    _check_extraction_options(model, pca, iou_threshold, max_side)
    self.model = model
    self.model_variables = models.tracked_variables(model)
    self._receptive_field = backbones.get(model.backbone_name).local_feature_receptive_field
    self._pca = pca
    self._iou_threshold = float(iou_threshold)
    self._max_side = max_side

  def _one_scale(self, pixels, image_size, scale, size_factor, abs_threshold):
    """Candidates of one pyramid scale: boxes [n, 4], descriptors [n, D], scales [n], scores [n].

    Args:
      pixels: float32 [1, H, W, 3], the original image.
      image_size: float32 [2], (H, W).
      scale: the nominal pyramid scale (reported).
      size_factor: the scale times the size cap's factor (applied).
      abs_threshold: the attention a cell needs.
    """
    field = self._receptive_field
    multiple = float(field.input_multiple)
    resized_size = tf.maximum(tf.round(image_size * size_factor * (1.0 / multiple)) * multiple,
                              float(field.stride))
    resized = tf.image.resize(pixels, tf.cast(resized_size, tf.int32), method='bilinear')
    descriptors, attention = self.model.local_outputs(resized)
    descriptors, attention = descriptors[0], attention[0]
    original_per_resized = image_size / resized_size
    map_size = tf.shape(attention)

    def field_edges(axis):
      """First and last resized pixel each cell sees along `axis`, in original pixels."""
      first = tf.cast(tf.range(map_size[axis]) * field.stride - field.padding, tf.float32)
      last = first + (field.size - 1)
      ratio = original_per_resized[axis]
      return (first + 0.5) * ratio - 0.5, (last + 0.5) * ratio - 0.5

    top, bottom = field_edges(0)
    left, right = field_edges(1)
    grid = tf.zeros([map_size[0], map_size[1]])
    boxes = tf.stack([grid + top[:, None], grid + left[None, :],
                      grid + bottom[:, None], grid + right[None, :]], axis=-1)
    keep = attention >= abs_threshold
    scores = tf.boolean_mask(attention, keep)
    return (tf.boolean_mask(boxes, keep), tf.boolean_mask(descriptors, keep),
            tf.fill(tf.shape(scores), scale), scores)

  @tf.function(input_signature=_SIGNATURE)
  def extract(self, input_image, input_scales, input_max_feature_num, input_abs_thres):
    """DELF features of one image; see the module docstring for inputs and outputs."""
    tf.debugging.assert_positive(input_scales, message='input_scales must be positive')
    image_size = tf.cast(tf.shape(input_image)[:2], tf.float32)
    size_cap = 1.0
    if self._max_side:
      size_cap = tf.minimum(1.0, self._max_side / tf.reduce_max(image_size))
    pixels = tf.cast(input_image, tf.float32)[tf.newaxis]
    num_scales = tf.size(input_scales)
    depth = self.model.descriptor_dim

    def collect(element_shape):
      return tf.TensorArray(tf.float32, size=num_scales, infer_shape=False,
                            element_shape=element_shape)

    def body(index, boxes, descriptors, scales, scores):
      scale = input_scales[index]
      found = self._one_scale(pixels, image_size, scale, scale * size_cap, input_abs_thres)
      return (index + 1,) + tuple(
          array.write(index, value)
          for array, value in zip((boxes, descriptors, scales, scores), found))

    _, boxes, descriptors, scales, scores = tf.while_loop(
        lambda index, *_: index < num_scales, body,
        (0, collect([None, 4]), collect([None, depth]), collect([None]), collect([None])))
    boxes, descriptors = boxes.concat(), descriptors.concat()
    scales, scores = scales.concat(), scores.concat()
    count = tf.minimum(tf.maximum(input_max_feature_num, 0), tf.size(scores))
    if self._iou_threshold < 1.0:
      chosen = tf.image.non_max_suppression(boxes, scores, count, self._iou_threshold)
    else:
      chosen = tf.math.top_k(scores, k=count).indices  # Sorted, ties in pyramid order.
    descriptors = tf.gather(descriptors, chosen)
    if self._pca is not None:
      descriptors = apply_pca(descriptors, self._pca)
    # In float64: TensorFlow's float32 division in a graph is off by an ulp (a fast reciprocal),
    # and then 1 / (1 / s) would not give s back.
    inverse_scales = tf.cast(1.0 / tf.cast(tf.gather(scales, chosen), tf.float64), tf.float32)
    return {'boxes': tf.gather(boxes, chosen), 'features': descriptors,
            'scales': inverse_scales, 'scores': tf.gather(scores, chosen)}


def _check_extraction_options(model, pca, iou_threshold, max_side) -> None:
  if not isinstance(model, DelfModel):
    raise DelfError(f'expected a DelfModel (models.delf.build_delf), got {type(model).__name__}')
  if pca is not None and pca.mean.shape[0] != model.descriptor_dim:
    raise DelfError(f'the PCA was fitted on {pca.mean.shape[0]}-d descriptors, the model gives '
                    f'{model.descriptor_dim}-d ones')
  if not isinstance(iou_threshold, numbers.Real) or not 0.0 < iou_threshold <= 1.0:
    raise DelfError(f'iou_threshold must be in (0, 1] (1: no suppression), not {iou_threshold!r}')
  if max_side is not None and (isinstance(max_side, bool)
                               or not isinstance(max_side, numbers.Integral) or max_side < 1):
    raise DelfError(f'max_side must be a positive integer or None, not {max_side!r}')


def _check_request(scales, max_feature_num, abs_threshold) -> np.ndarray:
  """The scales as float32, after checking the per-image settings; raises DelfError."""
  try:
    scales = np.asarray(scales, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise DelfError(f'scales must be a sequence of numbers, not {scales!r}') from None
  if not scales.size or not np.all(np.isfinite(scales)) or np.any(scales <= 0):
    raise DelfError(f'scales must be one or more positive numbers, not {scales.tolist()}')
  if isinstance(max_feature_num, bool) or not isinstance(max_feature_num, numbers.Integral) \
      or not 1 <= max_feature_num < 2**31:
    raise DelfError(f'max_feature_num must be a positive integer, not {max_feature_num!r}')
  if not isinstance(abs_threshold, numbers.Real) or math.isnan(abs_threshold):
    raise DelfError(f'abs_threshold must be a number, not {abs_threshold!r}')
  return scales.astype(np.float32)


def _check_image(image) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise DelfError(f'expected a uint8 RGB image [H, W, 3], got {image.dtype} of shape '
                    f'{image.shape}')
  if min(image.shape[:2]) < 1:
    raise DelfError(f'the image is empty (shape {image.shape})')
  return image


def _to_local_features(outputs: Dict[str, tf.Tensor]) -> LocalFeatures:
  """LocalFeatures from the signature's outputs (ours or DELF's own)."""
  boxes = np.asarray(outputs['boxes'], np.float32).reshape(-1, 4)
  centres_yx = (boxes[:, :2] + boxes[:, 2:]) / 2
  descriptors = np.asarray(outputs['features'], np.float32)
  return LocalFeatures(
      locations=np.ascontiguousarray(centres_yx[:, ::-1]),
      # DELF's own exports give raw features; ours are unit already and stay so.
      descriptors=_l2_normalize_rows(descriptors).astype(np.float32),
      # DELF's scores are [N, 1]; ours [N].
      scores=np.asarray(outputs['scores'], np.float32).reshape(-1),
      scales=(1.0 / np.asarray(outputs['scales'], np.float64)).astype(np.float32).reshape(-1))


class DelfExtractor:
  """Extracts DELF features from one image at a time, in process.

  Args:
    model: a `DelfModel` (its attention trained, for useful keypoints).
    scales: the image pyramid's scales (DELF's seven, 1/4 to 2, by default).
    max_feature_num: keep at most this many features, the highest attention first.
    abs_threshold: keep only cells with attention ≥ this. 0 keeps every cell; models trained
      with DELF's recipe publish their own (DELF's v1 model: 100, DELG's: 175).
    iou_threshold: greedy non-maximum suppression of receptive-field boxes overlapping more than
      this; 1.0 (DELF's default) turns it off.
    max_side: cap on the image's longer side before the pyramid (see the module docstring);
      None: no cap.
    pca: if given, descriptors are projected with it (`apply_pca`).

  Raises:
    DelfError: any setting out of range, or a PCA of another descriptor size.
  """

  def __init__(self, model: DelfModel, *, scales: Sequence[float] = DEFAULT_SCALES,
               max_feature_num: int = DEFAULT_MAX_FEATURE_NUM, abs_threshold: float = 0.0,
               iou_threshold: float = 1.0, max_side: Optional[int] = DEFAULT_MAX_SIDE,
               pca: Optional[Pca] = None):
    self._scales = _check_request(scales, max_feature_num, abs_threshold)
    self._max_feature_num = int(max_feature_num)
    self._abs_threshold = float(abs_threshold)
    self._module = _ExtractionModule(model, pca, iou_threshold, max_side)

  def __call__(self, image: np.ndarray) -> LocalFeatures:
    """The features of a uint8 RGB image [H, W, 3], sorted by attention, strongest first.

    Raises:
      DelfError: not a non-empty uint8 RGB image.
    """
    outputs = self._module.extract(
        tf.constant(_check_image(image)), tf.constant(self._scales),
        tf.constant(self._max_feature_num, tf.int32), tf.constant(self._abs_threshold, tf.float32))
    return _to_local_features(outputs)


def export_saved_model(model: DelfModel, path: str, pca: Optional[Pca] = None, *,
                       iou_threshold: float = 1.0, max_side: Optional[int] = DEFAULT_MAX_SIDE,
                       overwrite: bool = False) -> None:
  """Saves the extraction graph of `model` as a SavedModel with DELF's signature.

  The receptive field, `iou_threshold`, `max_side` and `pca` (as constants) are fixed in the
  graph, since DELF's signature has no inputs for them; the PCA is also written to `PCA_FILE`
  inside the export, for inspection or reuse.

  Args:
    model: the `DelfModel` to export.
    path: the SavedModel folder (any `tf.io.gfile` path).
    pca: optional PCA of the descriptors.
    iou_threshold: as for `DelfExtractor`.
    max_side: as for `DelfExtractor`.
    overwrite: replace a SavedModel already at `path` (its folder is emptied first, so that no
      file of the old export, such as its PCA, survives).

  Raises:
    DelfError: a setting out of range, a PCA of another descriptor size, or a SavedModel already
      at `path` without `overwrite`.
  """
  module = _ExtractionModule(model, pca, iou_threshold, max_side)
  if tf.io.gfile.exists(files.join(path, 'saved_model.pb')):
    if not overwrite:
      raise DelfError(f'{path} already holds a SavedModel; choose another folder or overwrite it')
    tf.io.gfile.rmtree(path)
  tf.saved_model.save(module, path,
                      signatures={'serving_default': module.extract.get_concrete_function()})
  if pca is not None:
    save_pca(pca, files.join(path, PCA_FILE))


class SavedModelExtractor:
  """A SavedModel with DELF's signature as a function image → `LocalFeatures`.

  Made by `load_saved_model`; holds the loaded object, whose variables the signature needs.
  """

  def __init__(self, loaded, signature, request):
    self._loaded = loaded
    self._signature = signature
    self._request = request

  def __call__(self, image: np.ndarray) -> LocalFeatures:
    """The features of a uint8 RGB image [H, W, 3]: box centres as (x, y) locations, unit
    descriptors, pyramid scales, sorted as the SavedModel sorts them (ours: attention, strongest
    first).

    Raises:
      DelfError: not a non-empty uint8 RGB image.
    """
    inputs = (tf.constant(_check_image(image)),) + self._request
    return _to_local_features(self._signature(**dict(zip(INPUT_NAMES, inputs))))


def load_saved_model(path: str, *, scales: Sequence[float] = DEFAULT_SCALES,
                     max_feature_num: int = DEFAULT_MAX_FEATURE_NUM,
                     abs_threshold: float = 0.0) -> SavedModelExtractor:
  """Loads a SavedModel with DELF's signature (from `export_saved_model`, or DELF's own).

  Args:
    path: the SavedModel folder (any `tf.io.gfile` path).
    scales: the pyramid scales fed to it.
    max_feature_num: the feature cap fed to it.
    abs_threshold: the attention threshold fed to it.

  Returns:
    A callable from a uint8 RGB image to its `LocalFeatures`.

  Raises:
    DelfError: bad settings, no SavedModel at `path`, or one without DELF's signature.
  """
  request = (tf.constant(_check_request(scales, max_feature_num, abs_threshold)),
             tf.constant(int(max_feature_num), tf.int32),
             tf.constant(float(abs_threshold), tf.float32))
  try:
    loaded = tf.saved_model.load(path)
  except (OSError, tf.errors.OpError) as e:
    reason = getattr(e, 'message', None) or str(e)
    raise DelfError(f'cannot load a SavedModel from {path}: {reason.splitlines()[0]}') from None
  signature = getattr(loaded, 'signatures', {}).get('serving_default')
  if signature is None:
    raise DelfError(f'the SavedModel at {path} has no serving_default signature')
  inputs = set(signature.structured_input_signature[1])
  outputs = set(signature.structured_outputs)
  if not (set(INPUT_NAMES) <= inputs and set(OUTPUT_NAMES) <= outputs):
    raise DelfError(f'the SavedModel at {path} does not have DELF\'s signature (inputs '
                    f'{sorted(inputs)}, outputs {sorted(outputs)})')
  return SavedModelExtractor(loaded, signature, request)
