"""Strategies on CPU (one device, two logical devices, two worker processes), XLA resolution and
the mixed-precision policy."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import types

import keras
import pytest
import tensorflow as tf

from tf_landmarks import distribute
from tf_landmarks import errors
from helpers import REPO


def _fake_strategy(*devices):
  return types.SimpleNamespace(extended=types.SimpleNamespace(worker_devices=devices))


@pytest.fixture
def restore_policy():
  previous = keras.mixed_precision.global_policy()
  yield
  keras.mixed_precision.set_global_policy(previous)


def test_local_strategies_on_cpu():
  assert distribute.make_strategy('default') is tf.distribute.get_strategy()
  one_device = distribute.make_strategy('one_device')
  assert one_device.num_replicas_in_sync == 1
  assert one_device.extended.worker_devices[0].endswith('CPU:0')
  # Without GPUs, mirrored spans the logical CPU devices: one in this process.
  assert distribute.make_strategy('mirrored').num_replicas_in_sync == len(
      tf.config.list_logical_devices('CPU'))


def test_unknown_strategy_lists_the_names():
  with pytest.raises(ValueError, match='default, one_device, mirrored, multi_worker, tpu'):
    distribute.make_strategy('horovod')
  assert distribute.STRATEGIES == ('default', 'one_device', 'mirrored', 'multi_worker', 'tpu')


@pytest.mark.parametrize('tf_config,message', [
    (None, 'needs the TF_CONFIG environment variable'),
    ('{"cluster": ', 'not valid JSON'),
    ('{"task": {"type": "worker", "index": 0}}', 'no cluster.worker list'),
    ('{"cluster": {"worker": ["a:1"]}}', 'needs task.type'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', 'task.index 1'),
])
def test_multi_worker_without_a_usable_tf_config_fails_clearly(tf_config, message, monkeypatch):
  if tf_config is None:
    monkeypatch.delenv('TF_CONFIG', raising=False)
  else:
    monkeypatch.setenv('TF_CONFIG', tf_config)
  with pytest.raises(ValueError, match=message):
    distribute.make_strategy('multi_worker')


@pytest.mark.parametrize('tpu', [None, 'no-such-tpu.invalid'])
def test_tpu_without_a_tpu_fails_clearly(tpu):
  # A user error (one line from the commands), whether no name is given or the name's lookup
  # fails (an OSError from the GCE metadata server off Google Cloud).
  with pytest.raises(errors.UserError, match=f"no TPU found for tpu={tpu!r}.*'local' on a TPU VM"):
    distribute.make_strategy('tpu', tpu)


def test_train_with_strategy_tpu_and_no_tpu_is_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'tf_landmarks.cli.train', f'--records_dir={tmp_path}',
       f'--workdir={tmp_path / "run"}', '--strategy=tpu'], capture_output=True, text=True,
      cwd=REPO, timeout=120)
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      'train.py: error: no TPU found for tpu=None'), result.stderr[-3000:]


def _run_python(script, env=None, timeout=120):
  return subprocess.run([sys.executable, '-c', textwrap.dedent(script)], capture_output=True,
                        text=True, cwd=REPO, timeout=timeout,
                        env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', **(env or {})})


def test_mirrored_over_two_logical_cpus_sums_across_replicas():
  # Logical devices must be configured before TensorFlow initialises, hence a fresh process.
  result = _run_python('''
      import tensorflow as tf
      cpu = tf.config.list_physical_devices('CPU')[0]
      tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
      from tf_landmarks import distribute
      strategy = distribute.make_strategy('mirrored')

      @tf.function
      def step():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.cast(replica + 1, tf.float32) * 10.0  # 10 on replica 0, 20 on replica 1.

      total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step), axis=None)
      print('TOTAL', float(total), strategy.num_replicas_in_sync)

      # A head built in the strategy's scope trains per replica on its half of the global batch.
      from tf_landmarks.models import heads, losses
      with strategy.scope():
        head = heads.build_head('arcface', 3, embedding_dim=4, class_counts=[5, 2, 1],
                                dynamic_margin=True)
        head.build((None, 2, 2, 8))
      features = tf.random.uniform([4, 2, 2, 8])
      labels = tf.constant([0, 1, 2, 0])
      dataset = strategy.experimental_distribute_dataset(
          tf.data.Dataset.from_tensors((features, labels)))

      @tf.function
      def train_step(batch):
        features, labels = batch
        with tf.GradientTape() as tape:
          logits = head(features, labels=labels, training=True)
          loss = tf.reduce_sum(losses.cross_entropy(labels, logits)) / 4.0  # Global batch.
        gradients = tape.gradient(loss, head.trainable_variables)
        return loss, tf.add_n([tf.reduce_sum(tf.abs(g)) for g in gradients])

      loss, gradient_size = strategy.run(train_step, args=(next(iter(dataset)),))
      shares = strategy.experimental_local_results(loss)
      gradient_size = strategy.reduce(tf.distribute.ReduceOp.SUM, gradient_size, axis=None)
      print('HEAD', len(shares), all(float(s) > 0 for s in shares), float(gradient_size) > 0)
  ''')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'TOTAL 30.0 2' in result.stdout
  assert 'HEAD 2 True True' in result.stdout


def _free_ports(count):
  sockets = [socket.socket() for _ in range(count)]
  for sock in sockets:
    sock.bind(('127.0.0.1', 0))
  ports = [sock.getsockname()[1] for sock in sockets]
  for sock in sockets:
    sock.close()
  return ports


def test_multi_worker_two_processes_agree_on_a_cross_replica_sum():
  workers = [f'127.0.0.1:{port}' for port in _free_ports(2)]
  script = textwrap.dedent('''
      import tensorflow as tf
      from tf_landmarks import distribute
      strategy = distribute.make_strategy('multi_worker')

      @tf.function
      def step():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return tf.cast(replica + 1, tf.float32) * 10.0

      total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step), axis=None)
      print('TOTAL', float(total), strategy.num_replicas_in_sync)
  ''')
  processes = []
  for index in range(2):
    tf_config = json.dumps({'cluster': {'worker': workers},
                            'task': {'type': 'worker', 'index': index}})
    processes.append(subprocess.Popen(
        [sys.executable, '-c', script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_CONFIG': tf_config}))
  outputs = []
  try:
    for process in processes:
      outputs.append(process.communicate(timeout=120))
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
        process.communicate()
  for process, (stdout, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-2000:]
    # One replica per worker: 10 + 20 on both.
    assert 'TOTAL 30.0 2' in stdout, stdout + stderr[-2000:]


def test_jit_compile_resolution():
  cpu = distribute.make_strategy('one_device')
  assert distribute.resolve_jit_compile('true', cpu) is True
  assert distribute.resolve_jit_compile('False', cpu) is False
  assert distribute.resolve_jit_compile('auto', cpu) is False
  assert distribute.resolve_jit_compile('auto', tf.distribute.get_strategy()) is False
  gpu = _fake_strategy('/job:localhost/replica:0/task:0/device:GPU:0')
  tpu = _fake_strategy('/job:worker/replica:0/task:0/device:TPU:0')
  assert distribute.resolve_jit_compile('auto', gpu) is True
  assert distribute.resolve_jit_compile('auto', tpu) is True
  with pytest.raises(ValueError, match='auto, true, false'):
    distribute.resolve_jit_compile('yes', cpu)


@pytest.mark.parametrize('policy,needs_scaling', [
    ('mixed_float16', True), ('mixed_bfloat16', False), ('float32', False)])
def test_precision_policy_and_loss_scaling(policy, needs_scaling, restore_policy):
  assert distribute.set_precision(policy) is needs_scaling
  assert keras.mixed_precision.global_policy().name == policy
  optimizer = keras.optimizers.SGD(0.1)
  wrapped = distribute.wrap_optimizer(optimizer, policy)
  assert isinstance(wrapped, keras.optimizers.LossScaleOptimizer) is needs_scaling
  if not needs_scaling:
    assert wrapped is optimizer
  assert distribute.wrap_optimizer(wrapped, policy) is wrapped


def test_unknown_precision_fails_clearly(restore_policy):
  with pytest.raises(ValueError, match='float32, mixed_float16, mixed_bfloat16'):
    distribute.set_precision('float16')
  with pytest.raises(ValueError, match='float32, mixed_float16, mixed_bfloat16'):
    distribute.wrap_optimizer(keras.optimizers.SGD(), 'int8')
