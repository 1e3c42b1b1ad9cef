"""SavedModels for serving: the classifier (encoded bytes in, landmark ids out), DELF, the index.

`export(ExportConfig)` writes, into `--output_dir` (the folder's names and format, and its
reading, are `tf_landmarks/exports.py`'s):

  classifier/1/          TF Serving's layout (model base path `classifier`, version 1). Signatures:
    serving_default      images: tf.string [B], encoded JPEG or PNG bytes (TF Serving's REST API
                         takes them as {"b64": …}) → landmark_ids int64 [B, k] (the ORIGINAL
                         landmark ids, best first), scores float32 [B, k] (softmax
                         probabilities), embeddings float32 [B, E] (the L2-normalised global
                         descriptor the index searches with) and status tf.string [B]: "ok", or why
                         the item got no prediction (landmark_ids -1, scores 0, embeddings 0).
    predict_images       images: float32 [B, H, W, 3] RGB in [0, 255], any size → the same
                         outputs but status.
                         The preprocessing (long side capped as the records build did, the
                         evaluation crop, the backbone's normalisation) and the label map are in
                         the graph: the model needs nothing else. assets.extra/label_map.csv is a
                         copy for people.
  delf/1/                with a DELF index: the DELF extraction SavedModel (DELF's signature names,
                         `local_features.delf.export_saved_model`) with the index's PCA in its graph.
  index/                 a copy of the index (`tfl-build-index`): global descriptors and local
                         features of the index images.
  export.json            written LAST (the mark of a finished export): what each part is, the runs
                         and checksums they came from, the signatures, the extraction settings
                         queries need to match the index, and the size and SHA-256 of every file
                         above, verified when the export is loaded.

The index is checked as it is copied: a truncated or damaged array, or one holding NaN, is refused
(one line naming the file), so the checksums never vouch for a broken copy. One `tfl-export`
writes a folder at a time (`files.exclusive_writer`).

Bad items never fail a batch: every item is checked before decoding (empty, over
`max_image_bytes`, not JPEG/PNG by its magic bytes, more than `max_image_pixels` by its header),
decoding runs in a `tf.data` pipeline whose errors are dropped (`ignore_errors`), so a truncated or
corrupt image simply does not come out of it, and images whose shorter side is below the records
build's `min_image_side` (a 1×1 image) are refused after decoding. Each refused item gets its
reason in `status`.
"""

import base64
import binascii
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_landmarks import data
from tf_landmarks import exports
from tf_landmarks import files
from tf_landmarks import images as images_lib
from tf_landmarks import indexes
from tf_landmarks import records as records_lib
from tf_landmarks import runs
from tf_landmarks import models
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.models import classifier as classifier_lib
from tf_landmarks.models import delf as delf_model
from tf_landmarks.settings import setting

# What became of a checked item in serve_bytes; one that fails to decode does not come out of the
# tf.data stage at all (-1).
_DECODED, _TOO_SMALL, _TOO_MANY_PIXELS = 0, 1, 2
_JPEG_MAGIC = b'\xff\xd8\xff'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# One error for the stage and the artifact it writes.
ExportError = exports.ExportError


@dataclasses.dataclass
class ExportConfig:
  """Everything `export` needs; `tfl-export` defines one flag per field."""
  run: Optional[str] = setting(
      None, 'The classifier run (tfl-train) to serve: its model.keras, label map and image size.',
      required=True)
  output_dir: Optional[str] = setting(
      None, 'The export folder, e.g. exports/<name>: classifier/1/, delf/1/, index/, export.json.',
      required=True)
  index: Optional[str] = setting(
      None, 'The index (tfl-build-index) of --run to ship beside the classifier; default '
      '<run>/index if it exists. "none" exports the classifier alone.')
  delf_run: Optional[str] = setting(
      None, 'The DELF run to export (tfl-train --mode=delf); default: the one the index was built '
      'with. It must be that one: the index\'s features come from it.')
  top_k: int = setting(5, 'Landmarks returned per image, best first.', lower=1)
  max_image_bytes: int = setting(
      images_lib.MAX_FILE_BYTES, 'Encoded images longer than this many bytes are refused.',
      lower=1)
  max_image_pixels: int = setting(
      100_000_000, 'Images with more pixels than this (read from the JPEG/PNG header, before '
      'decoding) are refused: a small file can declare a huge image.', lower=1)
  overwrite: bool = setting(False, 'Replace an export already in --output_dir.', runtime=True)


# --- The classifier SavedModel ---------------------------------------------------------------


class _ClassifierModule(tf.Module):
  """The serving graph of a `LandmarkClassifier`: decoding, checks, crop, model, label map.

  A `tf.data` pipeline started inside a signature is set up anew on every call: its functions are
  instantiated and optimised each time, at a cost that grows with what they hold (~200–600 ms per
  call when the pipeline checked, decoded, capped and cropped with nested `tf.cond`s). So the
  pipeline holds only what can raise (reading a JPEG header, decoding), with no `tf.cond` and
  tf.data's graph rewrites off; the checks that cannot raise run before it on the whole batch at
  once, and the resizing and cropping after it, in a loop of the signature's own graph, set up once
  at load.
  """

  def __init__(self, model: classifier_lib.LandmarkClassifier, landmark_ids: Sequence[int], *,
               image_size: int, max_image_side: int, min_image_side: int, top_k: int,
               max_image_bytes: int, max_image_pixels: int):
    super().__init__(name='landmark_classifier')
    self.model = model
    self.model_variables = models.tracked_variables(model)
    self.landmark_ids = tf.constant(np.asarray(landmark_ids, np.int64))
    self._image_size = int(image_size)
    self._max_image_side = int(max_image_side)
    self._min_image_side = int(min_image_side)
    self._top_k = min(int(top_k), len(landmark_ids))
    self._max_image_bytes = int(max_image_bytes)
    self._max_image_pixels = int(max_image_pixels)
    # Read and decoded in place of an item that must not be (a PNG has no JPEG header; an image
    # declaring too many pixels is not decoded): tf.where on the bytes instead of a tf.cond.
    self._stand_in_jpeg = tf.io.encode_jpeg(tf.zeros([1, 1, 3], tf.uint8)).numpy()

  def _outputs(self, crops: tf.Tensor) -> Dict[str, tf.Tensor]:
    """landmark_ids, scores and embeddings of uint8 evaluation crops [N, S, S, 3]."""
    features = self.model.features(crops, training=False)
    logits = tf.cast(self.model.head(features, training=False), tf.float32)
    scores, labels = tf.math.top_k(tf.nn.softmax(logits), k=self._top_k)
    embeddings = tf.cast(self.model.head.embed(features), tf.float32)
    return {'landmark_ids': tf.gather(self.landmark_ids, labels), 'scores': scores,
            'embeddings': embeddings}

  def _cap_long_side(self, image: tf.Tensor) -> tf.Tensor:
    """Shrinks (area filter) so that the long side is at most the records build's, as ingest did."""
    if not self._max_image_side:
      return image
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = tf.minimum(1.0, self._max_image_side / tf.reduce_max(size))
    target = tf.cast(tf.maximum(tf.round(size * scale), 1.0), tf.int32)
    return tf.cond(scale < 1.0,
                   lambda: tf.cast(tf.image.resize(image, target, method='area') + 0.5, tf.uint8),
                   lambda: image)

  @staticmethod
  def _stage_options() -> tf.data.Options:
    """Options of the decoding stage: tf.data's graph rewrites and autotuning off.

    They run each time the stage starts, which is on every call, and a one-map pipeline over a
    request's items has nothing for them to gain.
    """
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    return options

  def _decode(self, position: tf.Tensor, encoded: tf.Tensor, jpeg_header: tf.Tensor,
              too_many_png_pixels: tf.Tensor):
    """(position, too many pixels?, image) of one checked item, in the tf.data stage: a corrupt
    JPEG header or a corrupt image raises, and the stage drops the item.

    As few operations as can be: each one costs ~0.1–0.2 ms of set-up per call. jpeg_header is the
    item, or a stand-in JPEG for a PNG (whose pixels were counted outside).
    """
    jpeg_shape = tf.image.extract_jpeg_shape(jpeg_header, output_type=tf.int64)
    too_many = too_many_png_pixels | (tf.reduce_prod(jpeg_shape[:2]) > self._max_image_pixels)
    image = tf.io.decode_image(tf.where(too_many, self._stand_in_jpeg, encoded), channels=3,
                               expand_animations=False)
    return position, too_many, image

  def _decode_and_crop(self, images: tf.Tensor, checked: tf.Tensor, is_png: tf.Tensor):
    """Decodes the checked items and crops those usable.

    Returns:
      codes int32 [B] (_DECODED, _TOO_SMALL, _TOO_MANY_PIXELS, or -1: failed to decode), sizes
      int32 [B, 2] (height, width of the decoded items) and the evaluation crops of the items
      coded _DECODED, in batch order.
    """
    count = tf.shape(images)[0]
    lengths = tf.strings.length(images)
    # The PNG header's IHDR: width and height as big-endian uint32 at bytes 16..23, read for the
    # whole batch at once (zeros past the end of a short item, whose decoding then fails).
    header = tf.strings.substr(images, tf.minimum(lengths, 16), tf.fill([count], 8)) + b'\0' * 8
    values = tf.cast(tf.io.decode_raw(tf.strings.substr(header, 0, 8), tf.uint8), tf.int64)
    big_endian = tf.constant([2**24, 2**16, 2**8, 1], tf.int64)
    png_pixels = (tf.reduce_sum(values[:, :4] * big_endian, axis=1) *
                  tf.reduce_sum(values[:, 4:] * big_endian, axis=1))
    stage = tf.data.Dataset.from_tensor_slices(tuple(
        tf.boolean_mask(value, checked) for value in (
            tf.range(count), images, tf.where(is_png, self._stand_in_jpeg, images),
            is_png & (png_pixels > self._max_image_pixels))))
    stage = stage.map(self._decode).ignore_errors().with_options(self._stage_options())
    items = iter(stage)
    side = self._image_size

    def step(done, positions, codes, sizes, crops):
      item = items.get_next_as_optional()

      def take():
        position, too_many, image = item.get_value()
        size = tf.shape(image)[:2]
        code = tf.where(too_many, _TOO_MANY_PIXELS,
                        tf.where(tf.reduce_min(size) < self._min_image_side, _TOO_SMALL,
                                 _DECODED))
        usable_crops = tf.cond(
            code == _DECODED,
            lambda: crops.write(crops.size(),
                                data.eval_crop(self._cap_long_side(image), side)),
            lambda: crops)
        return (False, positions.write(positions.size(), position),
                codes.write(codes.size(), code), sizes.write(sizes.size(), size), usable_crops)

      return tf.cond(item.has_value(), take,
                     lambda: (True, positions, codes, sizes, crops))

    def array(dtype, shape):
      return tf.TensorArray(dtype, size=0, dynamic_size=True, element_shape=shape)

    _, positions, codes, sizes, crops = tf.while_loop(
        lambda done, *_: ~done, step,
        (False, array(tf.int32, []), array(tf.int32, []), array(tf.int32, [2]),
         array(tf.uint8, [side, side, 3])))
    rows = positions.stack()[:, tf.newaxis]
    return (tf.tensor_scatter_nd_update(tf.fill([count], -1), rows, codes.stack()),
            tf.tensor_scatter_nd_update(tf.zeros([count, 2], tf.int32), rows, sizes.stack()),
            crops.stack())

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=exports.BYTES_INPUT)])
  def serve_bytes(self, images):
    """Landmarks of a batch of encoded images; see the module docstring."""
    count = tf.shape(images)[0]
    lengths = tf.strings.length(images)
    magic = tf.strings.substr(images, 0, 8)
    is_png = magic == _PNG_MAGIC
    known_format = tf.logical_or(tf.strings.substr(magic, 0, 3) == _JPEG_MAGIC, is_png)
    checked = (lengths > 0) & (lengths <= self._max_image_bytes) & known_format
    codes, sizes, usable_crops = self._decode_and_crop(images, checked, is_png)
    usable = codes == _DECODED
    count_usable = tf.shape(usable_crops)[0]
    # Convolutions on an empty batch fail on CPU (oneDNN); a batch of only bad items runs one
    # blank crop instead, whose outputs are dropped.
    blank = tf.zeros([1, self._image_size, self._image_size, 3], tf.uint8)
    outputs = self._outputs(tf.cond(count_usable > 0, lambda: usable_crops, lambda: blank))
    outputs = {name: value[:count_usable] for name, value in outputs.items()}
    rows = tf.where(usable)
    fills = {'landmark_ids': tf.constant(-1, tf.int64), 'scores': tf.constant(0.0),
             'embeddings': tf.constant(0.0)}
    result = {}
    for name, value in outputs.items():
      shape = tf.concat([[count], tf.shape(value)[1:]], axis=0)
      result[name] = tf.tensor_scatter_nd_update(tf.fill(shape, fills[name]), rows, value)
    size_text = tf.strings.as_string(sizes[:, 0]) + 'x' + tf.strings.as_string(sizes[:, 1])
    status = tf.fill([count], 'corrupt or truncated image')
    status = tf.where(codes == _TOO_MANY_PIXELS,
                      f'more than {self._max_image_pixels} pixels', status)
    status = tf.where(codes == _TOO_SMALL,
                      'too small (' + size_text + f'; the shorter side must be at least '
                      f'{self._min_image_side} px)', status)
    status = tf.where(~known_format, 'not a JPEG or PNG image', status)
    status = tf.where(lengths > self._max_image_bytes,
                      f'more than {self._max_image_bytes} bytes', status)
    status = tf.where(lengths == 0, 'empty', status)
    result['status'] = tf.where(usable, exports.OK, status)
    return result

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32,
                                              name=exports.BYTES_INPUT)])
  def serve_images(self, images):
    """Landmarks of a batch of float RGB images in [0, 255] (any size, cropped here)."""
    pixels = tf.clip_by_value(images, 0.0, 255.0)
    return self._outputs(data.eval_crop(pixels, self._image_size))


def save_classifier(model: classifier_lib.LandmarkClassifier, landmark_ids: Sequence[int],
                    path: str, *, image_size: int, max_image_side: int, min_image_side: int,
                    top_k: int, max_image_bytes: int = images_lib.MAX_FILE_BYTES,
                    max_image_pixels: int = 100_000_000) -> None:
  """Saves the classifier's serving SavedModel (signatures in the module docstring) at `path`.

  Args:
    model: the trained classifier.
    landmark_ids: the original landmark id of each label 0..C-1 (the records' label map).
    path: the SavedModel folder (a TF Serving version folder, e.g. classifier/1).
    image_size: the crop the model was trained and validated on.
    max_image_side: the long-side cap of the records build (0: none).
    min_image_side: images with a shorter side below this get no prediction.
    top_k: landmarks returned per image.
    max_image_bytes: longer encoded images are refused.
    max_image_pixels: images declaring more pixels are refused before decoding.
  """
  module = _ClassifierModule(model, landmark_ids, image_size=image_size,
                             max_image_side=max_image_side, min_image_side=min_image_side,
                             top_k=top_k, max_image_bytes=max_image_bytes,
                             max_image_pixels=max_image_pixels)
  tf.saved_model.save(module, path, signatures={
      exports.SERVING_SIGNATURE: module.serve_bytes.get_concrete_function(),
      exports.IMAGES_SIGNATURE: module.serve_images.get_concrete_function()})


# --- TF Serving's REST format ----------------------------------------------------------------


def rest_body_to_inputs(body: Mapping[str, Any], input_names: Sequence[str]) -> Dict[str, Any]:
  """The signature inputs TF Serving makes of a REST `predict` body in the row ("instances") format.

  As TF Serving does: with a single input, each instance is that input's value; with several,
  each instance is an object of input name → value. A value `{"b64": "<base64>"}` is decoded to
  bytes. Instances are stacked into one batch per input.

  Args:
    body: the parsed JSON body, e.g. {"instances": [{"b64": "..."}, ...]}.
    input_names: the signature's input names.

  Returns:
    Input name → list of values (bytes for b64 values), one per instance.

  Raises:
    ValueError: a body TF Serving would refuse (no instances, an instance missing an input, bad
      base64).
  """
  instances = body.get('instances') if isinstance(body, Mapping) else None
  if not isinstance(instances, list) or not instances:
    raise ValueError('the body needs a non-empty "instances" list')

  def value(item):
    if isinstance(item, Mapping) and set(item) == {'b64'}:
      try:
        return base64.b64decode(item['b64'], validate=True)
      except (binascii.Error, TypeError):
        raise ValueError('a "b64" value is not valid base64') from None
    return item

  inputs: Dict[str, List[Any]] = {name: [] for name in input_names}
  for instance in instances:
    if len(input_names) == 1 and not (isinstance(instance, Mapping) and
                                      set(instance) == set(input_names)):
      inputs[input_names[0]].append(value(instance))
      continue
    if not isinstance(instance, Mapping) or set(instance) != set(input_names):
      raise ValueError(f'each instance must name the inputs {", ".join(input_names)}')
    for name in input_names:
      inputs[name].append(value(instance[name]))
  return inputs


# --- The whole export ------------------------------------------------------------------------


def _copy_tree(source: str, target: str) -> None:
  """Copies a folder recursively with tf.io.gfile (local or gs://), but its lock and stamps."""
  for folder, _, names in tf.io.gfile.walk(source):
    relative = folder[len(source):].lstrip('/')
    destination = files.join(target, relative) if relative else target
    tf.io.gfile.makedirs(destination)
    for name in names:
      if not name.startswith('.'):
        tf.io.gfile.copy(files.join(folder, name), files.join(destination, name), overwrite=True)


def _resolve_index(config: ExportConfig, model_sha256: str) -> Optional[indexes.Index]:
  if config.index == 'none':
    return None
  path = config.index or files.join(config.run, 'index')
  if not config.index and not tf.io.gfile.exists(files.join(path, indexes.INDEX_JSON)):
    return None
  opened = indexes.load(path)
  expected = opened.metadata.get('run_model_sha256')
  if expected != model_sha256:
    raise ExportError(f'the index {path} was built from another model than '
                      f'{config.run}/model.keras (its global descriptors would not match); '
                      f'rebuild it with tfl-build-index --run={config.run}')
  return opened


def _prepare_output(config: ExportConfig) -> None:
  """Empties --output_dir (with --overwrite) but its lock, held by this export."""
  output_dir = config.output_dir
  if not [name for name in tf.io.gfile.listdir(output_dir) if name.rstrip('/') != files.LOCK_FILE]:
    return
  if not config.overwrite:
    raise ExportError(f'--output_dir={output_dir} is not empty; choose another folder or pass '
                      '--overwrite')
  files.clear_folder(output_dir)


def export(config: ExportConfig) -> exports.Export:
  """Writes the export described in the module docstring (one `tfl-export` per folder at a time).

  Returns:
    The export, as `exports.load` reads it back.

  Raises:
    ExportError, indexes.LandmarkIndexError, records.RecordsError: unusable runs, index or output
      folder, with a message for the user.
  """
  if not config.run or not config.output_dir:
    raise ExportError('give --run=<classifier run> and --output_dir=<export folder>')
  run = runs.load_classifier_run(config.run, 'run')
  model = run.load_model(classifier_lib.LandmarkClassifier)
  label_map = records_lib.read_label_map(config.run)
  if len(label_map) != run.num_classes:
    raise ExportError(f'{config.run}/{records_lib.LABEL_MAP} lists {len(label_map)} classes, the '
                      f'run was trained on {run.num_classes}; train the run again')
  build = records_lib.load_manifest(run.records_dir).get('config', {})
  model_sha256 = run.model_sha256()
  opened_index = _resolve_index(config, model_sha256)
  backend = opened_index.metadata['local']['backend'] if opened_index else None
  delf_run = config.delf_run
  if backend == 'delf':
    delf_run = delf_run or opened_index.metadata['delf_run']
    if runs.load_delf_run(delf_run).model_sha256() != \
        opened_index.metadata.get('delf_model_sha256'):
      raise ExportError(f'--delf_run={delf_run} is not the DELF model the index was built with '
                        f'({opened_index.metadata["delf_run"]}); its features would not match')
  elif delf_run:
    raise ExportError('--delf_run needs an index with DELF features (tfl-build-index '
                      '--local_features=delf); this export has ' +
                      (f'a {backend} index' if backend else 'no index'))

  output_dir = config.output_dir
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise ExportError(f'--output_dir={output_dir} is a file, not a folder')
  tf.io.gfile.makedirs(output_dir)
  with files.exclusive_writer(output_dir, 'tfl-export', ExportError):
    _prepare_output(config)
    return _write(config, run, model, label_map, build, model_sha256, opened_index, delf_run)


def _write(config: ExportConfig, run: runs.Run, model, label_map, build: dict, model_sha256: str,
           opened_index: Optional[indexes.Index], delf_run: Optional[str]) -> exports.Export:
  """Writes the parts into the emptied --output_dir, then export.json."""
  output_dir = config.output_dir
  classifier_path = exports.classifier_path(output_dir)
  landmark_ids = [landmark_id for _, landmark_id, _ in label_map]
  max_image_side = int(build.get('max_image_size') or 0)
  min_image_side = int(build.get('min_image_side') or images_lib.MIN_IMAGE_SIDE)
  # Queries given as files must be prepared as the index images were: the cap above and this.
  jpeg_quality = int(build.get('jpeg_quality') or images_lib.JPEG_QUALITY)
  save_classifier(model, landmark_ids, classifier_path, image_size=run.image_size,
                  max_image_side=max_image_side, min_image_side=min_image_side,
                  top_k=config.top_k, max_image_bytes=config.max_image_bytes,
                  max_image_pixels=config.max_image_pixels)
  tf.io.gfile.makedirs(files.join(classifier_path, 'assets.extra'))
  tf.io.gfile.copy(files.join(config.run, records_lib.LABEL_MAP),
                   files.join(classifier_path, 'assets.extra', records_lib.LABEL_MAP))
  classifier = exports.ClassifierPart(
      path=classifier_path, run=config.run, run_model_sha256=model_sha256,
      backbone=run.backbone, head=run.metadata.get('head'), image_size=run.image_size,
      num_classes=run.num_classes, top_k=min(config.top_k, run.num_classes),
      max_image_side=max_image_side, min_image_side=min_image_side, jpeg_quality=jpeg_quality,
      max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels)
  delf = index = None
  if opened_index is not None:
    local = opened_index.metadata['local']
    if local['backend'] == 'delf':
      delf_path = exports.delf_path(output_dir)
      delf_features.export_saved_model(
          runs.load_delf_run(delf_run).load_model(delf_model.DelfModel), delf_path,
          pca=opened_index.pca())
      delf = exports.DelfPart(
          path=delf_path, run=delf_run,
          delf_model_sha256=opened_index.metadata['delf_model_sha256'],
          scales=tuple(local['delf_scales']), max_feature_num=local['max_features'],
          abs_threshold=local['delf_abs_threshold'], pca=bool(local['pca']))
    index_path = exports.index_path(output_dir)
    _copy_tree(opened_index.path, index_path)
    # The copy is checked in full (every file's digest, no NaN or infinity) before export.json's
    # checksums vouch for it: a damaged index must not be exported as if it were whole.
    indexes.load(index_path, verify=True)
    counts = opened_index.metadata['counts']
    index = exports.IndexPart(path=index_path, source=opened_index.path,
                              local_features=local['backend'], images=counts['images'],
                              landmarks=counts['landmarks'],
                              global_dim=opened_index.metadata['global']['dim'])
  return exports.write(output_dir, classifier=classifier, delf=delf, index=index,
                       records_dir=run.records_dir)
