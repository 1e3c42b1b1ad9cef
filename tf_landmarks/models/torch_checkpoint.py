"""Reads a PyTorch checkpoint in the legacy (pre-zip) format into numpy arrays, without PyTorch.

Some registry packages ship ImageNet-trained networks only as PyTorch checkpoints; PyTorch itself
is no dependency of ours (its wheel pulls gigabytes of CUDA libraries). The legacy format
(`torch.save(..., _use_new_zipfile_serialization=False)`) is a sequence of pickles:

1. the magic number 0x1950a86a20f9469cfc6c, 2. the protocol version 1001, 3. system information
(`little_endian`, type sizes), 4. the state dict: an OrderedDict of name → tensor, each tensor
rebuilt by `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, …)` around a persistent
id `('storage', storage_type, key, location, numel)`, 5. the list of storage keys; then, per key
in that order, an 8-byte little-endian element count followed by the storage's raw bytes.

A checkpoint is input, and unpickling runs code: `read_state_dict` checks the file's SHA-256
first, and its unpickler resolves only the few globals a state dict needs (anything else is a
`CheckpointError`), so a tampered or unexpected file is refused before any of its objects exist.
"""

import collections
import hashlib
import io
import pickle
import struct
from typing import BinaryIO, Dict, Optional

import numpy as np

from tf_landmarks import errors

_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
_PROTOCOL_VERSION = 1001

# Storage classes a state dict of float weights (and BatchNorm's int64 counters) uses, as dtypes.
_STORAGE_DTYPES = {
    'FloatStorage': np.dtype('<f4'),
    'DoubleStorage': np.dtype('<f8'),
    'HalfStorage': np.dtype('<f2'),
    'LongStorage': np.dtype('<i8'),
    'IntStorage': np.dtype('<i4'),
}


class CheckpointError(errors.UserError):
  """A checkpoint is not the expected file or not a plain legacy PyTorch state dict."""


class _StorageType:
  """Stands for `torch.<X>Storage`: only its dtype matters here."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = _STORAGE_DTYPES[name]


class _TensorRef:
  """A tensor as the state-dict pickle describes it; its data comes later in the file."""

  def __init__(self, storage_key: str, offset: int, size: tuple, stride: tuple):
    self.storage_key, self.offset, self.size, self.stride = storage_key, offset, size, stride


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused_args):
  """What `torch._utils._rebuild_tensor_v2` is resolved to: records where the tensor lives."""
  if not isinstance(storage, str):
    raise CheckpointError('a tensor of the checkpoint does not name a storage')
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only the globals of a plain state dict; refuses every other one."""

  def __init__(self, file: BinaryIO, storages: Optional[Dict[str, tuple]] = None):
    super().__init__(file)
    self._storages = storages

  def find_class(self, module: str, name: str):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return _rebuild_tensor_v2
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointError(f'the checkpoint names {module}.{name}, which a plain state dict does '
                          'not use; refusing to load it')

  def persistent_load(self, pid):
    if self._storages is None:
      raise CheckpointError('the checkpoint has a persistent id outside its state dict')
    # ('storage', type, key, location, numel, view_metadata); views of storages are not used by
    # state dicts saved from a model, so they are refused rather than interpreted.
    if (not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != 'storage'
        or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
        or not isinstance(pid[4], int) or pid[5] is not None):
      raise CheckpointError(f'the checkpoint has an unexpected storage reference {pid!r:.80}')
    _, storage_type, key, _, numel, _ = pid
    known = self._storages.setdefault(key, (storage_type.dtype, numel))
    if known != (storage_type.dtype, numel):
      raise CheckpointError(f'storage {key} of the checkpoint is described two ways')
    return key


def read_state_dict(path: str, sha256: str) -> Dict[str, np.ndarray]:
  """The tensors of legacy PyTorch checkpoint `path`, by name, as numpy arrays.

  Args:
    path: a local file.
    sha256: the hex SHA-256 the file must have; checked before anything is unpickled.

  Returns:
    name → array (float32 weights, int64 counters such as `num_batches_tracked`), in file order.

  Raises:
    CheckpointError: the file is missing, has another hash, names a global a state dict does not
      need, or does not have the legacy layout (one line each).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise CheckpointError(f'cannot read checkpoint {path}: {e.strerror or e}') from None
  # Hashed from the bytes that are parsed, so the file cannot change between check and use.
  actual = hashlib.sha256(data).hexdigest()
  if actual != sha256:
    raise CheckpointError(f'checkpoint {path} has SHA-256 {actual}, not the expected {sha256}: '
                          'it was changed or is another file; reinstall its package')
  try:
    return _parse(io.BytesIO(data), path)
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
          AttributeError, struct.error) as e:
    raise CheckpointError(f'checkpoint {path} is not a legacy PyTorch state dict: '
                          f'{type(e).__name__}: {str(e)[:200]}') from None


def _parse(stream: io.BytesIO, path: str) -> Dict[str, np.ndarray]:
  if _RestrictedUnpickler(stream).load() != _MAGIC_NUMBER:
    raise CheckpointError(f'{path} is not a legacy PyTorch checkpoint (no magic number; the zip '
                          'format of newer PyTorch is not read here)')
  if _RestrictedUnpickler(stream).load() != _PROTOCOL_VERSION:
    raise CheckpointError(f'{path} has a PyTorch protocol version other than {_PROTOCOL_VERSION}')
  system = _RestrictedUnpickler(stream).load()
  if not isinstance(system, dict) or system.get('little_endian') is not True:
    raise CheckpointError(f'{path} was not written on a little-endian machine')
  storages: Dict[str, tuple] = {}
  state = _RestrictedUnpickler(stream, storages).load()
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, _TensorRef) for k, v in state.items()):
    raise CheckpointError(f'{path} holds something other than a state dict of tensors')
  keys = _RestrictedUnpickler(stream).load()
  if not isinstance(keys, list) or sorted(keys) != sorted(storages):
    raise CheckpointError(f'{path}: its storage list does not match its tensors')
  data = {}
  for key in keys:
    dtype, numel = storages[key]
    (count,) = struct.unpack('<q', stream.read(8))
    raw = stream.read(count * dtype.itemsize)
    if count != numel or len(raw) != count * dtype.itemsize:
      raise CheckpointError(f'{path} is truncated or damaged (storage {key})')
    data[key] = np.frombuffer(raw, dtype)
  tensors = {}
  for name, ref in state.items():
    storage = data[ref.storage_key]
    if any(s < 0 for s in ref.size + ref.stride):
      raise CheckpointError(f'tensor {name} of {path} has a negative size or stride')
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if ref.offset < 0 or (0 not in ref.size and last >= storage.size):
      raise CheckpointError(f'tensor {name} of {path} reaches outside its storage')
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], shape=ref.size, strides=[s * itemsize for s in ref.stride],
        writeable=False)
    tensors[name] = np.array(view, dtype=storage.dtype.newbyteorder('='))
  return tensors
