"""tfl-export: the serving SavedModels, checked the ways a user and TF Serving load them."""

import base64
import io
import json
import os
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from tf_landmarks import data
from tf_landmarks import export
from tf_landmarks import exports
from tf_landmarks import files
from tf_landmarks import indexes
from tf_landmarks import runs
from tf_landmarks import records
from tf_landmarks.local_features import delf as delf_features
from tf_landmarks.models import classifier  # pylint: disable=unused-import
from tf_landmarks.models import heads  # pylint: disable=unused-import
from helpers import REPO, trained_world

SAVED_MODEL_CLI = REPO / '.venv' / 'bin' / 'saved_model_cli'


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp('export')
  world = trained_world(root, backend='delf', num_test_images=8, classifier_epochs=1)
  description = export.export(export.ExportConfig(run=world['classifier'], index=world['index'],
                                                  output_dir=str(root / 'export')))
  return {**world, 'export': str(root / 'export'), 'description': description}


@pytest.fixture(scope='module')
def serving(exported):
  loaded = tf.saved_model.load(os.path.join(exported['export'], 'classifier', '1'))
  return loaded, loaded.signatures['serving_default']


def _train_jpegs(world, count=3):
  folder = os.path.join(world['world'], 'images')
  names = sorted(os.listdir(folder))[:count]
  return [open(os.path.join(folder, name), 'rb').read() for name in names]


def _encode(pixels, image_format, **options):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=image_format, **options)
  return buffer.getvalue()


def _claiming_size(jpeg, height, width):
  """The JPEG with its frame header (SOF0) patched to declare another size: a decompression bomb
  in a few kilobytes."""
  frame = jpeg.index(b'\xff\xc0')
  return (jpeg[:frame + 5] + height.to_bytes(2, 'big') + width.to_bytes(2, 'big') +
          jpeg[frame + 9:])


def test_export_folder_has_tf_serving_layout_and_describes_its_parts(exported):
  folder = exported['export']
  for part in ('classifier/1/saved_model.pb', 'classifier/1/assets.extra/label_map.csv',
               'delf/1/saved_model.pb', 'index/index.json', 'export.json'):
    assert os.path.exists(os.path.join(folder, part)), part
  described = exports.load(folder)
  assert described == exported['description']
  written = json.load(open(os.path.join(folder, 'export.json')))
  assert written['classifier']['signatures']['serving_default']['outputs'] == list(
      exports.OUTPUT_NAMES)
  assert described.delf.scales == (0.5, 1.0, 2.0)
  assert described.index.local_features == 'delf'


def test_serving_default_returns_original_landmark_ids_as_the_keras_model_ranks_them(exported,
                                                                                     serving):
  _, serve = serving
  jpegs = _train_jpegs(exported)
  outputs = serve(images=tf.constant(jpegs))
  assert set(outputs) == set(exports.OUTPUT_NAMES)
  landmark_ids = [row[1] for row in records.read_label_map(exported['records'])]
  model = keras.saving.load_model(os.path.join(exported['classifier'], 'model.keras'))
  for position, jpeg in enumerate(jpegs):
    crop = data.eval_crop(tf.io.decode_jpeg(jpeg, channels=3), 64)[tf.newaxis]
    probabilities = tf.nn.softmax(model(crop)).numpy()[0]
    order = np.argsort(-probabilities)[:5]
    np.testing.assert_array_equal(outputs['landmark_ids'][position].numpy(),
                                  [landmark_ids[label] for label in order])
    np.testing.assert_allclose(outputs['scores'][position].numpy(), probabilities[order],
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(outputs['embeddings'][position].numpy(), model.embed(crop)[0],
                               rtol=1e-4, atol=1e-5)
  assert [status.decode() for status in outputs['status'].numpy()] == ['ok'] * len(jpegs)


def test_bad_items_get_a_status_and_no_prediction_without_failing_the_batch(exported, serving):
  _, serve = serving
  good = _train_jpegs(exported, 1)[0]
  pixels = tf.io.decode_jpeg(good).numpy()
  batch = {
      'good': good,
      'not an image': b'GIF89a' + b'\x00' * 64,
      'text': b'hello, this is not an image at all',
      'empty': b'',
      'truncated JPEG': good[:len(good) // 2],
      'PNG of the same pixels': _encode(pixels, 'PNG'),
      '1x1 JPEG': _encode(np.zeros((1, 1, 3), np.uint8), 'JPEG'),
      'JPEG claiming 60000x60000': _claiming_size(good, 60000, 60000),
  }
  outputs = serve(images=tf.constant(list(batch.values())))
  statuses = dict(zip(batch, (status.decode() for status in outputs['status'].numpy())))
  assert statuses == {
      'good': 'ok', 'not an image': 'not a JPEG or PNG image',
      'text': 'not a JPEG or PNG image', 'empty': 'empty',
      'truncated JPEG': 'corrupt or truncated image', 'PNG of the same pixels': 'ok',
      '1x1 JPEG': 'too small (1x1; the shorter side must be at least 32 px)',
      'JPEG claiming 60000x60000': 'more than 100000000 pixels'}
  alone = serve(images=tf.constant([good]))
  for position, (name, status) in enumerate(statuses.items()):
    ids = outputs['landmark_ids'][position].numpy()
    if status == 'ok':
      # Decoded from the same pixels: the same answer as the good image on its own.
      np.testing.assert_array_equal(ids, alone['landmark_ids'][0].numpy(), err_msg=name)
      np.testing.assert_allclose(outputs['scores'][position].numpy(), alone['scores'][0].numpy(),
                                 atol=2e-3, err_msg=name)
    else:
      assert (ids == -1).all() and (outputs['scores'][position].numpy() == 0).all(), name
  only_bad = serve(images=tf.constant([b'', b'junk']))
  assert only_bad['landmark_ids'].shape == (2, 5) and (only_bad['landmark_ids'].numpy() == -1).all()


def test_float_image_signature_matches_the_bytes_signature(exported, serving):
  loaded, serve = serving
  jpeg = _train_jpegs(exported, 1)[0]
  pixels = tf.cast(tf.io.decode_jpeg(jpeg)[tf.newaxis], tf.float32)
  from_floats = loaded.signatures['predict_images'](images=pixels)
  from_bytes = serve(images=tf.constant([jpeg]))
  np.testing.assert_array_equal(from_floats['landmark_ids'], from_bytes['landmark_ids'])
  np.testing.assert_allclose(from_floats['scores'], from_bytes['scores'], atol=1e-5)


def _smooth(height, width, channels=3, seed=0):
  """A photo-like image (blocks blurred by resizing up): JPEG keeps it close, unlike noise."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), channels), np.uint8)
  return np.asarray(Image.fromarray(small.squeeze()).resize((width, height), Image.BILINEAR))


def _capped(pixels, max_side):
  """The records build's long-side cap (area filter, rounded), as the serving graph applies it."""
  size = tf.cast(tf.shape(pixels)[:2], tf.float32)
  scale = min(1.0, max_side / float(tf.reduce_max(size)))
  if scale == 1.0:
    return tf.cast(pixels, tf.float32)
  target = tf.cast(tf.maximum(tf.round(size * scale), 1.0), tf.int32)
  return tf.cast(tf.cast(tf.image.resize(pixels, target, method='area') + 0.5, tf.uint8),
                 tf.float32)


def test_bytes_give_bit_for_bit_the_float_signatures_answer_for_jpegs_and_pngs(exported, serving):
  """Decoding, the long-side cap and the crop in serving_default feed the model the very pixels
  predict_images gets from the decoded, capped image: the same outputs bit for bit, for JPEGs and
  PNGs (grey, RGBA) below and above the cap, alone and in a batch with bad items."""
  loaded, serve = serving
  max_side = exported['description'].classifier.max_image_side
  assert max_side == 128
  images = {
      'JPEG 100x80': _encode(_smooth(100, 80), 'JPEG', quality=90),
      'PNG 100x80': _encode(_smooth(100, 80, seed=1), 'PNG'),
      'JPEG 300x200 (capped)': _encode(_smooth(300, 200, seed=2), 'JPEG', quality=90),
      'PNG 129x128 (capped)': _encode(_smooth(129, 128, seed=3), 'PNG'),
      'grey PNG 40x500 (capped)': _encode(_smooth(40, 500, 1, seed=4), 'PNG'),
      'RGBA PNG 64x96': _encode(_smooth(64, 96, 4, seed=5), 'PNG'),
      'progressive JPEG 200x150 (capped)': _encode(_smooth(200, 150, seed=6), 'JPEG',
                                                   progressive=True),
  }
  alone = {}
  for name, encoded in images.items():
    pixels = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    expected = loaded.signatures['predict_images'](images=_capped(pixels, max_side)[tf.newaxis])
    alone[name] = serve(images=tf.constant([encoded]))
    assert alone[name]['status'].numpy()[0] == b'ok', name
    for output in ('landmark_ids', 'scores', 'embeddings'):
      np.testing.assert_array_equal(alone[name][output].numpy(), expected[output].numpy(),
                                    err_msg=f'{name}: {output}')
  good = list(images.values())
  png_bomb = bytearray(images['PNG 100x80'])
  png_bomb[16:24] = (60000).to_bytes(4, 'big') * 2
  bad = [b'', bytes(png_bomb), b'\x89PNG\r\n\x1a\n\x00\x00', b'\xff\xd8\xff\xe0', good[0][:300]]
  mixed = [bad[0], *good[:3], *bad[1:], *good[3:]]
  outputs = serve(images=tf.constant(mixed))
  statuses = [status.decode() for status in outputs['status'].numpy()]
  assert statuses == ['empty', 'ok', 'ok', 'ok', 'more than 100000000 pixels'] + [
      'corrupt or truncated image'] * 3 + ['ok'] * 4
  rows = [1, 2, 3, 8, 9, 10, 11]
  for row, name in zip(rows, images):
    # A batch of another size may round the last bits differently inside the backbone.
    np.testing.assert_array_equal(outputs['landmark_ids'][row].numpy(),
                                  alone[name]['landmark_ids'][0].numpy(), err_msg=name)
    np.testing.assert_allclose(outputs['embeddings'][row].numpy(),
                               alone[name]['embeddings'][0].numpy(), atol=1e-5, err_msg=name)


def test_the_decoding_pipeline_holds_no_conditional(exported):
  """Each serving_default call sets up its tf.data stage anew, instantiating its functions; with
  the checks and the crop's tf.conds inside, that cost ~200–600 ms per call on the demo's
  classifier, ~10× the model. The stage keeps only what can raise, and no conditional."""
  saved_model = saved_model_pb2.SavedModel()
  with open(os.path.join(exported['export'], 'classifier', '1', 'saved_model.pb'), 'rb') as f:
    saved_model.ParseFromString(f.read())
  graph = saved_model.meta_graphs[0].graph_def
  functions = {function.signature.name: function for function in graph.library.function}
  mapped = [node.attr['f'].func.name for function in functions.values()
            for node in function.node_def if node.op in ('MapDataset', 'ParallelMapDatasetV2')]
  assert mapped
  for name in mapped:
    operations = {node.op for node in functions[name].node_def}
    assert not operations & {'If', 'StatelessIf', 'While', 'StatelessWhile', 'Case'}, operations
    assert len(functions[name].node_def) <= 20, sorted(operations)


def test_tf_serving_rest_body_becomes_the_signature_input(exported, serving):
  _, serve = serving
  jpegs = _train_jpegs(exported, 2)
  body = json.loads(json.dumps(
      {'instances': [{'b64': base64.b64encode(jpeg).decode()} for jpeg in jpegs]}))
  inputs = export.rest_body_to_inputs(body, list(serve.structured_input_signature[1]))
  assert inputs == {'images': jpegs}
  outputs = serve(images=tf.constant(inputs['images']))
  np.testing.assert_array_equal(outputs['landmark_ids'],
                                serve(images=tf.constant(jpegs))['landmark_ids'])
  named = {'instances': [{'images': {'b64': base64.b64encode(jpegs[0]).decode()}}]}
  assert export.rest_body_to_inputs(named, ['images']) == {'images': jpegs[:1]}
  for bad in ({}, {'instances': []}, {'instances': [{'b64': '***'}]}):
    with pytest.raises(ValueError):
      export.rest_body_to_inputs(bad, ['images'])


def test_saved_model_cli_shows_and_runs_both_saved_models(exported, tmp_path):
  """saved_model_cli run loads the TF1 way, as TF Serving's C++ loader does."""
  classifier_dir = os.path.join(exported['export'], 'classifier', '1')
  shown = subprocess.run([str(SAVED_MODEL_CLI), 'show', '--all', '--dir', classifier_dir],
                         capture_output=True, text=True, timeout=120)
  assert shown.returncode == 0, shown.stderr
  assert "signature_def['serving_default']" in shown.stdout
  assert "signature_def['predict_images']" in shown.stdout
  queries = tmp_path / 'queries.npy'
  np.save(queries, np.array([_train_jpegs(exported, 1)[0], b''], dtype=object), allow_pickle=True)
  ran = subprocess.run([str(SAVED_MODEL_CLI), 'run', '--dir', classifier_dir, '--tag_set', 'serve',
                        '--signature_def', 'serving_default', '--inputs', f'images={queries}'],
                       capture_output=True, text=True, timeout=180)
  assert ran.returncode == 0, ran.stderr[-2000:]
  assert "[b'ok' b'empty']" in ran.stdout
  image, scales = tmp_path / 'image.npy', tmp_path / 'scales.npy'
  np.save(image, tf.io.decode_jpeg(_train_jpegs(exported, 1)[0]).numpy())
  np.save(scales, np.array([1.0], np.float32))
  ran = subprocess.run([str(SAVED_MODEL_CLI), 'run', '--dir',
                        os.path.join(exported['export'], 'delf', '1'), '--tag_set', 'serve',
                        '--signature_def', 'serving_default', '--inputs',
                        f'input_image={image};input_scales={scales}', '--input_exprs',
                        'input_max_feature_num=50;input_abs_thres=0.0'],
                       capture_output=True, text=True, timeout=180)
  assert ran.returncode == 0, ran.stderr[-2000:]
  assert 'Result for output key features' in ran.stdout


def test_exported_delf_extracts_what_the_index_was_built_with(exported):
  opened = indexes.load(os.path.join(exported['export'], 'index'))
  delf = exported['description'].delf
  from_export = delf_features.load_saved_model(
      os.path.join(exported['export'], 'delf', '1'), scales=delf.scales,
      max_feature_num=delf.max_feature_num, abs_threshold=delf.abs_threshold)
  in_process = opened.local_extractor()
  image = tf.io.decode_jpeg(_train_jpegs(exported, 1)[0]).numpy()
  a, b = from_export(image), in_process(image)
  np.testing.assert_allclose(a.locations, b.locations, atol=1e-3)
  np.testing.assert_allclose(a.descriptors, b.descriptors, atol=1e-4)


def test_refuses_a_full_folder_an_index_of_another_run_and_a_delf_run(exported, tmp_path):
  with pytest.raises(export.ExportError, match='not empty'):
    export.export(export.ExportConfig(run=exported['classifier'], index=exported['index'],
                                      output_dir=exported['export']))
  with pytest.raises(runs.RunError, match='is a DELF run; --run takes a classifier run'):
    export.export(export.ExportConfig(run=exported['delf'], output_dir=str(tmp_path / 'a')))
  with pytest.raises(runs.RunError, match='is a scratch run, not a DELF run'):
    export.export(export.ExportConfig(run=exported['classifier'], index=exported['index'],
                                      delf_run=exported['classifier'],
                                      output_dir=str(tmp_path / 'b')))
  with pytest.raises(export.ExportError, match='no export.json|not a finished export'):
    exports.load(str(tmp_path))
  alone = export.export(export.ExportConfig(run=exported['classifier'], index='none',
                                            output_dir=str(tmp_path / 'alone')))
  assert alone.index is None and alone.delf is None


# --- Integrity: export.json records every file; a load checks them, and export checks its copy. ---


def _copy_export(exported, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'export'
  shutil.copytree(exported['export'], copy)
  return copy


def test_export_json_records_every_file_it_wrote_or_copied(exported):
  folder = exported['export']
  recorded = exported['description'].checksums
  on_disk = {os.path.relpath(os.path.join(parent, name), folder)
             for parent, _, names in os.walk(folder) for name in names
             if not name.startswith('.') and name != 'export.json'}
  assert set(recorded) == on_disk
  assert 'classifier/1/saved_model.pb' in recorded and 'delf/1/saved_model.pb' in recorded
  assert any(name.startswith('index/shards/') for name in recorded)


@pytest.mark.parametrize('damage', ['flipped index shard byte', 'flipped saved_model byte',
                                    'truncated index shard'])
def test_a_damaged_file_is_named_in_one_line_when_loaded(exported, tmp_path, damage):
  folder = _copy_export(exported, tmp_path)
  exports.load(str(folder), verify=True)
  shard = sorted((folder / 'index' / 'shards').glob('*.descriptors.npy'))[0]
  target = folder / 'classifier' / '1' / 'saved_model.pb' if 'saved_model' in damage else shard
  data_bytes = bytearray(target.read_bytes())
  if damage.startswith('flipped'):
    data_bytes[len(data_bytes) // 2] ^= 0xFF
  else:
    data_bytes = data_bytes[:len(data_bytes) // 2]
  target.write_bytes(bytes(data_bytes))
  os.utime(target, ns=(1, 1))  # Another time: what a copy or an edit leaves.
  with pytest.raises(exports.ExportError) as raised:
    exports.load(str(folder))
  message = str(raised.value)
  assert str(target) in message and '\n' not in message
  assert ('truncated' in message) == damage.startswith('truncated')


def test_verify_hashes_even_when_the_stamp_says_nothing_changed(exported, tmp_path):
  folder = _copy_export(exported, tmp_path)
  exports.load(str(folder))  # A full check: leaves the stamp.
  target = folder / 'classifier' / '1' / 'saved_model.pb'
  stat = target.stat()
  data_bytes = bytearray(target.read_bytes())
  data_bytes[10] ^= 0xFF
  target.write_bytes(bytes(data_bytes))
  os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # Same size and time: stamp matches.
  exports.load(str(folder))
  with pytest.raises(exports.ExportError, match='saved_model.pb is not the file'):
    exports.load(str(folder), verify=True)


def test_a_v1_export_is_read_unverified_and_refused_with_verify(exported, tmp_path):
  folder = _copy_export(exported, tmp_path)
  written = json.load(open(folder / 'export.json'))
  written['format'] = exports.FORMAT_V1
  del written['files']
  (folder / 'export.json').write_text(json.dumps(written))
  loaded = exports.load(str(folder))
  assert loaded.checksums is None and loaded.classifier.path == str(folder / 'classifier' / '1')
  assert loaded.classifier.max_image_side == exported['description'].classifier.max_image_side
  with pytest.raises(exports.ExportError, match='without checksums'):
    exports.load(str(folder), verify=True)


@pytest.mark.parametrize('damage', ['nan', 'truncated'])
def test_export_refuses_to_copy_a_damaged_index_shard(exported, tmp_path, damage):
  import shutil  # pylint: disable=g-import-not-at-top
  index = tmp_path / 'index'
  shutil.copytree(exported['index'], index)
  shard = sorted((index / 'shards').glob('*.descriptors.npy'))[0]
  if damage == 'nan':
    array = np.load(shard)
    array[0, 0] = np.nan
    np.save(shard, array)
  else:
    shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(indexes.LandmarkIndexError) as raised:
    export.export(export.ExportConfig(run=exported['classifier'], index=str(index),
                                      output_dir=str(tmp_path / 'out')))
  assert shard.name in str(raised.value) and '\n' not in str(raised.value)
  # The same size with other bytes (NaN written over a value), or fewer bytes.
  assert ('SHA-256 differs' if damage == 'nan' else 'truncated') in str(raised.value)
  assert not (tmp_path / 'out' / 'export.json').exists()


def test_one_writer_per_export_folder(exported, tmp_path):
  folder = tmp_path / 'taken'
  folder.mkdir()
  with files.exclusive_writer(str(folder), 'tfl-export', export.ExportError):
    with pytest.raises(export.ExportError, match='another tfl-export is writing'):
      export.export(export.ExportConfig(run=exported['classifier'], index='none',
                                        output_dir=str(folder)))
  assert not (folder / 'export.json').exists()
