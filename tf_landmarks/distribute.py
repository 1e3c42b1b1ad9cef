"""Distribution strategy, XLA and mixed-precision settings of training.

Training is a custom loop with `strategy.run` (Keras 3's `fit` fails under
MultiWorkerMirroredStrategy) that averages per-example losses over the global batch. This module
only picks the strategy and the numeric settings; the loop lives in train.py.
"""

import json
import os
from typing import Optional

import keras
import tensorflow as tf

from tf_landmarks import errors

STRATEGIES = ('default', 'one_device', 'mirrored', 'multi_worker', 'tpu')
JIT_SETTINGS = ('auto', 'true', 'false')
PRECISIONS = ('float32', 'mixed_float16', 'mixed_bfloat16')



class StrategyError(errors.UserError):
  """The strategy cannot be set up here (no TPU, no usable TF_CONFIG); the message says why."""


_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}')


def make_strategy(name: str, tpu: Optional[str] = None) -> tf.distribute.Strategy:
  """Creates the tf.distribute strategy called `name`.

  - default: the current (no-op) strategy; TensorFlow places ops on the first GPU if any.
  - one_device: the first GPU, else the CPU.
  - mirrored: synchronous data parallelism over all local GPUs, else over all logical CPU devices
    (one on an ordinary machine; tests configure several to exercise the cross-replica code).
  - multi_worker: MultiWorkerMirroredStrategy, the cluster read from the TF_CONFIG environment
    variable; every worker runs the same program.
  - tpu: connects to and initialises the TPU system, then TPUStrategy.

  Must be called before any other TensorFlow work that would initialise the runtime when using
  multi_worker or tpu.

  Args:
    name: one of STRATEGIES.
    tpu: for 'tpu': the TPU name or grpc:// address, or 'local' on a TPU VM.

  Returns:
    The strategy.

  Raises:
    StrategyError: an unknown name, multi_worker without a usable TF_CONFIG, or no TPU found.
  """
  if name not in STRATEGIES:
    raise StrategyError(f'unknown strategy {name!r}; choose one of {", ".join(STRATEGIES)}')
  if name == 'default':
    return tf.distribute.get_strategy()
  if name == 'one_device':
    gpus = tf.config.list_logical_devices('GPU')
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else '/cpu:0')
  if name == 'mirrored':
    devices = tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('CPU')
    return tf.distribute.MirroredStrategy([device.name for device in devices])
  if name == 'multi_worker':
    _check_tf_config(os.environ.get('TF_CONFIG', ''))
    return tf.distribute.MultiWorkerMirroredStrategy()
  return _tpu_strategy(tpu)


def _check_tf_config(text: str) -> None:
  """Fails with one clear line unless TF_CONFIG names the workers and this worker's index."""
  if not text.strip():
    raise StrategyError(f'the multi_worker strategy needs the TF_CONFIG environment variable on '
                        f'every worker, e.g. {_TF_CONFIG_EXAMPLE}')
  try:
    config = json.loads(text)
  except json.JSONDecodeError as error:
    raise StrategyError(f'TF_CONFIG is not valid JSON ({error}); expected e.g. '
                        f'{_TF_CONFIG_EXAMPLE}') from None
  cluster = config.get('cluster') if isinstance(config, dict) else None
  task = config.get('task') if isinstance(config, dict) else None
  if not isinstance(cluster, dict) or not any(cluster.get(job) for job in ('chief', 'worker')):
    raise StrategyError(f'TF_CONFIG has no cluster.worker list; expected e.g. '
                        f'{_TF_CONFIG_EXAMPLE}')
  if not isinstance(task, dict) or task.get('type') not in ('chief', 'worker'):
    raise StrategyError(f'TF_CONFIG needs task.type "worker" (or "chief") and task.index; expected '
                        f'e.g. {_TF_CONFIG_EXAMPLE}')
  members = cluster.get(task['type'])
  index = task.get('index')
  if not isinstance(members, list) or not isinstance(index, int) or not 0 <= index < len(members):
    raise StrategyError(f'TF_CONFIG task.index {index!r} does not name one of the cluster\'s '
                        f'{task["type"]} addresses {members!r}')


def _tpu_strategy(tpu: Optional[str]) -> tf.distribute.TPUStrategy:
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, OSError, RuntimeError, tf.errors.OpError) as error:
    # No TPU shows as a ValueError (no name), an OSError (the name's lookup in the GCE metadata
    # server fails off Google Cloud) or an OpError (no TPU kernels in this TensorFlow build).
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise StrategyError(f'no TPU found for tpu={tpu!r} (give the TPU name or grpc:// address, or '
                        f"'local' on a TPU VM): {first_line}") from None
  return tf.distribute.TPUStrategy(resolver)


def _uses_accelerator(strategy: tf.distribute.Strategy) -> bool:
  try:
    devices = strategy.extended.worker_devices
  except RuntimeError:
    # The default strategy has no device list; it runs on the first GPU if there is one.
    return bool(tf.config.list_logical_devices('GPU') or tf.config.list_logical_devices('TPU'))
  return any(tf.DeviceSpec.from_string(device).device_type in ('GPU', 'TPU')
             for device in devices)


def resolve_jit_compile(setting: str, strategy: tf.distribute.Strategy) -> bool:
  """Whether to XLA-compile the train step.

  Args:
    setting: 'true', 'false', or 'auto': on when the strategy's replicas run on GPUs or TPUs, off
      on CPU, where XLA measured slower for training here.
    strategy: the training strategy.

  Returns:
    The jit_compile flag for tf.function.

  Raises:
    ValueError: an unknown setting.
  """
  normalised = str(setting).strip().lower()
  if normalised not in JIT_SETTINGS:
    raise ValueError(f'unknown jit_compile setting {setting!r}; choose one of '
                     f'{", ".join(JIT_SETTINGS)}')
  if normalised == 'auto':
    return _uses_accelerator(strategy)
  return normalised == 'true'


def _check_precision(policy: str) -> None:
  if policy not in PRECISIONS:
    raise ValueError(f'unknown precision {policy!r}; choose one of {", ".join(PRECISIONS)}')


def set_precision(policy: str) -> bool:
  """Sets the global Keras dtype policy (heads stay float32 regardless).

  Args:
    policy: one of PRECISIONS. mixed_bfloat16 suits TPUs and recent GPUs; mixed_float16 older GPUs.

  Returns:
    Whether the loss needs scaling: float16's narrow exponent range lets small gradients underflow
    to zero, so only mixed_float16 needs it (bfloat16 has float32's range).
  """
  _check_precision(policy)
  keras.mixed_precision.set_global_policy(policy)
  return policy == 'mixed_float16'


def wrap_optimizer(optimizer: keras.optimizers.Optimizer,
                   policy: str) -> keras.optimizers.Optimizer:
  """Wraps `optimizer` in a dynamic LossScaleOptimizer when `policy` needs loss scaling.

  In the custom loop, differentiate `optimizer.scale_loss(loss)` (the identity for an unwrapped
  optimizer); `apply_gradients` unscales and skips steps whose gradients are not finite.

  Args:
    optimizer: a Keras optimizer.
    policy: one of PRECISIONS.

  Returns:
    The LossScaleOptimizer, or `optimizer` itself when no scaling is needed or it already scales.
  """
  _check_precision(policy)
  if policy != 'mixed_float16' or isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    return optimizer
  return keras.optimizers.LossScaleOptimizer(optimizer)
