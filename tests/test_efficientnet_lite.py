"""EfficientNet-Lite: the legacy-checkpoint reader, the Keras port, ImageNet weights offline."""

import collections
import hashlib
import io
import os
import pickle
import socket
import struct
import sys
import types

import numpy as np
import pytest
import skimage
from PIL import Image

from tf_landmarks import errors
from tf_landmarks.models import backbones
from tf_landmarks.models import efficientnet_lite
from tf_landmarks.models import torch_checkpoint

LITE0 = efficientnet_lite.VARIANTS['efficientnet_lite0']
# Blocks of Lite0 that start a stride-2 stage (the first blocks of stages 2, 3, 4 and 6): the
# architecture, which a state dict does not record.
LITE0_STRIDE2_BLOCKS = (1, 3, 5, 11)


@pytest.fixture(scope='module')
def lite0_state():
  return torch_checkpoint.read_state_dict(LITE0.checkpoint.locate(), LITE0.checkpoint.sha256)


@pytest.fixture(scope='module')
def lite0_classifier(lite0_state):
  """Lite0 with its 1000-class ImageNet head, any input size."""
  model = efficientnet_lite.build(LITE0, (None, None, 3), include_top=True)
  efficientnet_lite.assign_state_dict(model, LITE0, lite0_state)
  return model


def _skimage_photo(name, size):
  path = os.path.join(os.path.dirname(skimage.__file__), 'data', name)
  image = Image.open(path).convert('RGB').resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.float32)


# --- The checkpoint reader -------------------------------------------------------------------

def test_the_packaged_checkpoint_is_the_expected_state_dict(lite0_state):
  # Figures of the throw-away port: 296 entries, 49 counters, 4,694,024 numbers.
  assert len(lite0_state) == 296
  counters = [key for key in lite0_state if key.endswith('num_batches_tracked')]
  assert len(counters) == 49
  assert sum(v.size for k, v in lite0_state.items() if k not in counters) == 4_694_024
  assert lite0_state['_conv_stem.weight'].shape == (32, 3, 3, 3)
  assert lite0_state['_blocks.15._depthwise_conv.weight'].shape == (1152, 1, 3, 3)
  assert lite0_state['_fc.weight'].dtype == np.float32


def _legacy_checkpoint(state_pickle: bytes, storages=()) -> bytes:
  """A legacy-format file: magic, protocol, system info, `state_pickle`, keys, raw storages."""
  stream = io.BytesIO()
  for header in (0x1950a86a20f9469cfc6c, 1001, {'protocol_version': 1001, 'little_endian': True}):
    pickle.dump(header, stream, protocol=2)
  stream.write(state_pickle)
  pickle.dump([key for key, _ in storages], stream, protocol=2)
  for _, array in storages:
    stream.write(struct.pack('<q', array.size) + array.astype('<f4').tobytes())
  return stream.getvalue()


class _Exploit:
  """Unpickles to a call of os.system: what a hostile checkpoint would carry."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def test_a_pickle_naming_any_other_global_is_refused_before_it_runs(tmp_path):
  marker = tmp_path / 'pwned'
  payload = _legacy_checkpoint(pickle.dumps(collections.OrderedDict(w=_Exploit(marker)), 2))
  path = tmp_path / 'hostile.pth'
  path.write_bytes(payload)
  with pytest.raises(torch_checkpoint.CheckpointError,
                     match=r'names (posix|os)\.system, which a plain state dict does not use'):
    torch_checkpoint.read_state_dict(str(path), hashlib.sha256(payload).hexdigest())
  assert not marker.exists()


def test_a_changed_checkpoint_is_refused_by_its_hash(tmp_path):
  original = open(LITE0.checkpoint.locate(), 'rb').read()
  tampered = bytearray(original)
  tampered[-100] ^= 0x01  # One bit of one weight.
  path = tmp_path / 'tampered.pth'
  path.write_bytes(bytes(tampered))
  with pytest.raises(torch_checkpoint.CheckpointError) as caught:
    torch_checkpoint.read_state_dict(str(path), LITE0.checkpoint.sha256)
  message = str(caught.value)
  assert 'not the expected 579344248a93' in message and '\n' not in message


def test_a_cut_short_or_foreign_file_is_a_one_line_error(tmp_path):
  original = open(LITE0.checkpoint.locate(), 'rb').read()
  for name, payload, expected in [
      ('short.pth', original[:len(original) // 2], 'truncated or damaged'),
      ('zip.pth', b'PK\x03\x04' + b'\0' * 100, 'not a legacy PyTorch state dict'),
      ('empty.pth', b'', 'not a legacy PyTorch state dict'),
  ]:
    path = tmp_path / name
    path.write_bytes(payload)
    with pytest.raises(torch_checkpoint.CheckpointError, match=expected):
      torch_checkpoint.read_state_dict(str(path), hashlib.sha256(payload).hexdigest())
  with pytest.raises(torch_checkpoint.CheckpointError, match='cannot read checkpoint'):
    torch_checkpoint.read_state_dict(str(tmp_path / 'missing.pth'), LITE0.checkpoint.sha256)


def _fake_torch(monkeypatch):
  """Modules named like PyTorch's, so that pickle writes the globals a real checkpoint names."""
  torch, utils = types.ModuleType('torch'), types.ModuleType('torch._utils')

  class FloatStorage:  # pylint: disable=too-few-public-methods
    pass

  def _rebuild_tensor_v2(*args):
    raise AssertionError('never called while pickling')

  FloatStorage.__module__, FloatStorage.__qualname__ = 'torch', 'FloatStorage'
  _rebuild_tensor_v2.__module__ = 'torch._utils'
  _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
  torch.FloatStorage, torch._utils = FloatStorage, utils
  utils._rebuild_tensor_v2 = _rebuild_tensor_v2
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)
  return FloatStorage, _rebuild_tensor_v2


def test_tensors_are_read_with_their_offsets_and_strides(tmp_path, monkeypatch):
  float_storage, rebuild = _fake_torch(monkeypatch)

  class Storage:
    def __init__(self, key, array):
      self.key, self.array = key, array

  class Tensor:
    def __init__(self, storage, offset, size, stride):
      self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
      return rebuild, self.args

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ('storage', float_storage, obj.key, 'cpu', obj.array.size, None)
      return None

  storage = Storage('0', np.arange(8, dtype=np.float32))
  # A transposed 3×2 view at offset 2, and a plain vector sharing the same storage.
  state = collections.OrderedDict(w=Tensor(storage, 2, (3, 2), (1, 3)),
                                  v=Tensor(storage, 0, (4,), (1,)))
  stream = io.BytesIO()
  Pickler(stream, protocol=2).dump(state)
  payload = _legacy_checkpoint(stream.getvalue(), [('0', storage.array)])
  path = tmp_path / 'small.pth'
  path.write_bytes(payload)
  tensors = torch_checkpoint.read_state_dict(str(path), hashlib.sha256(payload).hexdigest())
  np.testing.assert_array_equal(tensors['w'], [[2, 5], [3, 6], [4, 7]])
  np.testing.assert_array_equal(tensors['v'], [0, 1, 2, 3])

  # The same tensor reaching past its storage is refused, not read from the next one.
  state = collections.OrderedDict(w=Tensor(storage, 5, (3, 2), (1, 3)))
  stream = io.BytesIO()
  Pickler(stream, protocol=2).dump(state)
  payload = _legacy_checkpoint(stream.getvalue(), [('0', storage.array)])
  path.write_bytes(payload)
  with pytest.raises(torch_checkpoint.CheckpointError, match='reaches outside its storage'):
    torch_checkpoint.read_state_dict(str(path), hashlib.sha256(payload).hexdigest())


# --- The Keras port --------------------------------------------------------------------------

def _same_pad(x, kernel, stride):
  """TensorFlow's 'same' padding of an HWC map: the odd pixel goes after."""
  side = x.shape[0]
  out = -(-side // stride)
  total = max((out - 1) * stride + kernel - side, 0)
  before = total // 2
  return np.pad(x, ((before, total - before), (before, total - before), (0, 0))), out


def _conv(x, weight, stride=1):
  """Convolution by the checkpoint's OIHW kernel, in float64."""
  kernel = weight.shape[2]
  padded, out = _same_pad(x, kernel, stride)
  y = np.zeros((out, out, weight.shape[0]))
  for i in range(kernel):
    for j in range(kernel):
      patch = padded[i:i + stride * out:stride, j:j + stride * out:stride]
      y += patch @ weight[:, :, i, j].T.astype(np.float64)
  return y


def _depthwise(x, weight, stride):
  """Depthwise convolution by the checkpoint's (C, 1, H, W) kernel."""
  kernel = weight.shape[2]
  padded, out = _same_pad(x, kernel, stride)
  y = np.zeros((out, out, weight.shape[0]))
  for i in range(kernel):
    for j in range(kernel):
      y += padded[i:i + stride * out:stride, j:j + stride * out:stride] * weight[:, 0, i, j]
  return y


def _bn(x, state, name):
  scale = state[f'{name}.weight'] / np.sqrt(state[f'{name}.running_var'].astype(np.float64) + 1e-3)
  return (x - state[f'{name}.running_mean']) * scale + state[f'{name}.bias']


def _relu6(x):
  return np.clip(x, 0, 6)


def _reference_logits(image, state):
  """Lite0's forward pass written from the checkpoint's raw tensors alone (numpy, float64)."""
  x = _relu6(_bn(_conv(image.astype(np.float64), state['_conv_stem.weight'], 2), state, '_bn0'))
  for block in range(16):
    prefix = f'_blocks.{block}.'
    inputs = x
    if f'{prefix}_expand_conv.weight' in state:
      x = _relu6(_bn(_conv(x, state[f'{prefix}_expand_conv.weight']), state, f'{prefix}_bn0'))
    stride = 2 if block in LITE0_STRIDE2_BLOCKS else 1
    x = _relu6(_bn(_depthwise(x, state[f'{prefix}_depthwise_conv.weight'], stride), state,
                   f'{prefix}_bn1'))
    x = _bn(_conv(x, state[f'{prefix}_project_conv.weight']), state, f'{prefix}_bn2')
    if stride == 1 and x.shape == inputs.shape:
      x = x + inputs
  x = _relu6(_bn(_conv(x, state['_conv_head.weight']), state, '_bn1'))
  return x.mean(axis=(0, 1)) @ state['_fc.weight'].T.astype(np.float64) + state['_fc.bias']


@pytest.mark.parametrize('size', [64, 72])
def test_the_port_equals_a_numpy_forward_pass_over_the_checkpoint(lite0_state, lite0_classifier,
                                                                   size):
  # 72 is not a multiple of 16: the strided layers see odd sides and pad symmetrically.
  image = (_skimage_photo('coffee.png', size) - 127.0) / 128.0
  expected = _reference_logits(image, lite0_state)
  actual = lite0_classifier(image[None], training=False).numpy()[0]
  assert np.abs(actual - expected).max() <= 1e-4


@pytest.mark.parametrize('photo, classes', [
    ('coffee.png', {967}),  # espresso
    ('chelsea.png', {281, 282, 283, 284, 285}),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
])
def test_photos_shipped_with_scikit_image_classify_as_they_should(lite0_classifier, photo, classes):
  images = backbones.preprocess(_skimage_photo(photo, 224)[None], 'efficientnet_lite0')
  assert int(np.argmax(lite0_classifier(images, training=False))) in classes


def test_lite2_checkpoint_fits_its_scaled_architecture():
  lite2 = efficientnet_lite.VARIANTS['efficientnet_lite2']
  assert [stage.repeats for stage in lite2.stages()] == [1, 3, 3, 4, 4, 5, 1]
  state = torch_checkpoint.read_state_dict(lite2.checkpoint.locate(), lite2.checkpoint.sha256)
  model = efficientnet_lite.build(lite2, (None, None, 3), include_top=True)
  efficientnet_lite.assign_state_dict(model, lite2, state)  # Every tensor used, every shape equal.
  images = backbones.preprocess(_skimage_photo('coffee.png', 260)[None], 'efficientnet_lite2')
  assert int(np.argmax(model(images, training=False))) == 967


def test_a_checkpoint_of_another_network_does_not_load(lite0_state):
  lite2 = efficientnet_lite.VARIANTS['efficientnet_lite2']
  model = efficientnet_lite.build(lite2, (64, 64, 3))
  with pytest.raises(torch_checkpoint.CheckpointError, match='not an efficientnet_lite2'):
    efficientnet_lite.assign_state_dict(model, lite2, lite0_state)


# --- --weights=imagenet, offline ---------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
  """No network: every socket connection fails, as on a machine without one."""

  def refuse(*args, **kwargs):
    raise OSError('network is unreachable (test)')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


def test_imagenet_weights_are_converted_once_into_the_keras_cache_offline(
    tmp_path, monkeypatch, offline, lite0_classifier):
  monkeypatch.setenv('KERAS_HOME', str(tmp_path / 'keras'))
  built = backbones.build('efficientnet_lite0', 96, 'imagenet')
  [converted] = (tmp_path / 'keras' / 'models').iterdir()
  assert converted.name == 'efficientnet_lite0_57934424_notop.weights.h5'
  assert built.weights == 'imagenet'
  assert built.source_sha256 == LITE0.checkpoint.sha256
  assert built.weights_sha256 == hashlib.sha256(converted.read_bytes()).hexdigest()
  np.testing.assert_array_equal(built.model.get_layer('block6_4_dwconv').kernel.numpy(),
                                lite0_classifier.get_layer('block6_4_dwconv').kernel.numpy())

  def no_second_conversion(*args, **kwargs):
    raise AssertionError('converted again')

  monkeypatch.setattr(torch_checkpoint, 'read_state_dict', no_second_conversion)
  again = backbones.build('efficientnet_lite0', 128, 'imagenet')
  assert again.weights_sha256 == built.weights_sha256


def test_a_damaged_converted_file_is_converted_again(tmp_path, monkeypatch):
  monkeypatch.setenv('KERAS_HOME', str(tmp_path))
  cached = tmp_path / 'models' / 'efficientnet_lite0_57934424_notop.weights.h5'
  cached.parent.mkdir()
  cached.write_bytes(b'not an hdf5 file')
  built = backbones.build('efficientnet_lite0', 64, 'imagenet')
  assert built.weights_sha256 == hashlib.sha256(cached.read_bytes()).hexdigest()
  assert cached.stat().st_size > 10_000_000


def test_a_missing_package_is_a_user_error(monkeypatch):
  missing = efficientnet_lite.PackagedCheckpoint('no_such_weights_package', 'x.pth', '0' * 64)
  with pytest.raises(errors.UserError, match='need the package no-such-weights-package'):
    missing.locate()


def test_freeze_until_takes_the_lite_blocks():
  built = backbones.build('efficientnet_lite0', 64, 'none')
  frozen = backbones.freeze(built.model, 'efficientnet_lite0', 'block4')
  names = [layer.name for layer in built.model.layers]
  assert names[frozen - 1] == 'block4_3_add'
  assert not built.model.get_layer('block4_1_dwconv').trainable
  assert built.model.get_layer('block5_1_dwconv').trainable
  assert backbones.get('efficientnet_lite0').blocks == (
      'stem', 'block1', 'block2', 'block3', 'block4', 'block5', 'block6', 'block7', 'top')
