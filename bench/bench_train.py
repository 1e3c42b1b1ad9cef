r"""Training speed: our loop against Keras fit, bottleneck epochs, input starvation, precision.

Every comparison runs the library's own loop, `train.make_multi_step` over `train.make_train_step`
with the optimizer of `train.make_optimizer` and the loss of `train.make_loss`, under the strategy
of `distribute.make_strategy('default')`, as `train.train` does. Models are built with random
weights (`--weights=none`): the values do not change the work of a step. Each comparison first
makes one untimed call per side (tracing, XLA compilation), then runs its sides interleaved over
rounds (bench/timing.py), every side running untimed warm-up steps before its timed steps in each
round, and reports images/s, CPU milliseconds per image (this process, tf.data threads included)
and the per-round ratios as median (min–max):

  loop        Our loop against Keras `model.fit` on one device: the same model (--loop_backbone and
              a softmax head), optimizer, loss and batches (--cached_batches of
              `make_dataset(..., backbone=None)` held in memory, so that the input pipeline is not
              what is measured), XLA off on both. Ours with steps_per_call 1 and --steps_per_call
              against fit (steps_per_execution 1). Target: ours ≥ 0.95× fit.
  bottleneck  An epoch of the bottleneck stage (the softmax head trained on
              `bottleneck.feature_dataset` of cached features) against an epoch through the frozen
              base (the same head on the frozen backbone, images from `make_dataset`), the same
              number of examples, for each of --bottleneck_backbones. Target: ≥ 50× faster. The
              one-off feature caching (`bottleneck.cache_features`) is reported beside it.
  pipeline    The train step of --pipeline_backbone fed by the live training pipeline against the
              same model and step fed from --cached_batches of its batches held in memory.
              Target: ≤ 1.05× the time (the pipeline must not starve training).
  precision   ResNet50 training images/s at each of --precision_sizes (128 px by default; 224 px
              adds ~1.5 minutes), float32 and mixed_bfloat16 (`distribute.set_precision`, reset to
              float32 after), XLA off and on, on batches held in memory; ratios against float32
              without XLA. No target: recorded as measured.

Without --records_dir the repository's synthetic set (configs/synthetic_*.flags) is generated and
built into a temporary folder with `tfl-synth` and `tfl-build-records`, and deleted at the end.

Usage (from the repository root):
  .venv/bin/python bench/bench_train.py                      # all four, ~3 min (7 under load)
  .venv/bin/python bench/bench_train.py --comparisons=loop,pipeline --rounds=7
  .venv/bin/python bench/bench_train.py --comparisons=precision --precision_sizes=128,224
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Sequence, Tuple

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app
from absl import flags
import keras
import tensorflow as tf

import timing
from tf_landmarks import bottleneck
from tf_landmarks import data
from tf_landmarks import distribute
from tf_landmarks import errors
from tf_landmarks import records as records_lib
from tf_landmarks import train
from tf_landmarks.models import backbones
from tf_landmarks.models import classifier
from tf_landmarks.models import heads

COMPARISONS = ('loop', 'bottleneck', 'pipeline', 'precision')
_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')

_RECORDS_DIR = flags.DEFINE_string(
    'records_dir', None, 'A tfl-build-records output folder; default: the synthetic set, built '
    'into a temporary folder.')
_COMPARISONS = flags.DEFINE_list('comparisons', list(COMPARISONS),
                                 f'Comparisons to run: {", ".join(COMPARISONS)}.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds of the bottleneck and pipeline '
                               'comparisons.', lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 128, 'Image side of the loop, bottleneck and '
                                   'pipeline comparisons, px.', lower_bound=32)
_CACHED_BATCHES = flags.DEFINE_integer('cached_batches', 8, 'Batches held in memory where a side '
                                       'is fed from memory.', lower_bound=1)
_LOOP_BACKBONE = flags.DEFINE_enum('loop_backbone', 'tiny', list(backbones.BACKBONES),
                                   'Backbone of the loop comparison.')
_LOOP_BATCH_SIZE = flags.DEFINE_integer('loop_batch_size', 32, 'Batch of the loop comparison.',
                                        lower_bound=1)
_STEPS_PER_CALL = flags.DEFINE_integer(
    'steps_per_call', 8, 'Loop comparison: steps_per_call of our second side; also the warm-up '
    'steps of every side and round.', lower_bound=2)
_LOOP_STEPS = flags.DEFINE_integer('loop_steps', 32, 'Loop comparison: timed steps per side and '
                                   'round.', lower_bound=1)
_LOOP_ROUNDS = flags.DEFINE_integer(
    'loop_rounds', 15, 'Interleaved rounds of the loop comparison: its sides are short, and many '
    'short rounds pair them more closely on a noisy machine.', lower_bound=1)
_BOTTLENECK_BACKBONES = flags.DEFINE_list('bottleneck_backbones', ['resnet50', 'tiny'],
                                          'Backbones of the bottleneck comparison.')
_BOTTLENECK_BATCH_SIZE = flags.DEFINE_integer('bottleneck_batch_size', 32,
                                              'Batch of the bottleneck comparison.', lower_bound=1)
_EPOCH_EXAMPLES = flags.DEFINE_integer(
    'epoch_examples', 0, 'Bottleneck comparison: examples per epoch; 0: the train split (set it '
    'on a large split, whose frozen-base epoch would take hours).', lower_bound=0)
_PIPELINE_BACKBONE = flags.DEFINE_enum('pipeline_backbone', 'resnet50', list(backbones.BACKBONES),
                                       'Backbone of the pipeline comparison.')
_PIPELINE_BATCH_SIZE = flags.DEFINE_integer('pipeline_batch_size', 16,
                                            'Batch of the pipeline comparison.', lower_bound=1)
_PIPELINE_STEPS = flags.DEFINE_integer('pipeline_steps', 6, 'Pipeline comparison: timed steps per '
                                       'side and round.', lower_bound=1)
_PRECISION_SIZES = flags.DEFINE_list('precision_sizes', ['128'],
                                     'Image sides of the precision comparison, px.')
_PRECISION_BATCH_SIZE = flags.DEFINE_integer('precision_batch_size', 8,
                                             'Batch of the precision comparison.', lower_bound=1)
_PRECISION_STEPS = flags.DEFINE_integer('precision_steps', 2, 'Precision comparison: timed steps '
                                        'per side and round.', lower_bound=1)
_PRECISION_ROUNDS = flags.DEFINE_integer('precision_rounds', 3, 'Interleaved rounds of the '
                                         'precision comparison.', lower_bound=1)

flags.register_validator('comparisons', lambda names: set(names) <= set(COMPARISONS),
                         f'--comparisons takes some of {", ".join(COMPARISONS)}')
flags.register_validator('bottleneck_backbones',
                         lambda names: set(names) <= set(backbones.BACKBONES),
                         f'--bottleneck_backbones takes some of {", ".join(backbones.BACKBONES)}')
flags.register_validator('precision_sizes',
                         lambda sizes: all(size.strip().isdigit() for size in sizes),
                         '--precision_sizes takes whole numbers of pixels, e.g. 128,224')


def _now() -> Tuple[float, float]:
  """Wall clock and this process's CPU time (every thread: training and tf.data alike)."""
  return time.perf_counter(), time.process_time()


def _sample_since(start: Tuple[float, float], items: int) -> timing.Sample:
  wall, cpu = start
  return timing.Sample(items, time.perf_counter() - wall, time.process_time() - cpu)


def _train_config(records: records_lib.Records, batch_size: int) -> train.TrainConfig:
  """The training defaults: SGD with momentum, cosine schedule, cross-entropy."""
  return train.TrainConfig(records_dir=records.path, batch_size=batch_size)


def _build_classifier(strategy: tf.distribute.Strategy, backbone: str, image_size: int,
                      num_classes: int, policy: str = 'float32') -> classifier.LandmarkClassifier:
  """Backbone + softmax head as `train.train` builds them, random weights, variables created."""
  distribute.set_precision(policy)
  try:
    keras.utils.set_random_seed(0)
    with strategy.scope():
      built = backbones.build(backbone, image_size, 'none')
      model = classifier.LandmarkClassifier(built.model, heads.build_head('softmax', num_classes),
                                            backbone)
      model(tf.zeros([1, image_size, image_size, 3], tf.uint8))
  finally:
    # Layers keep the policy they were built under; everything built later is float32 again.
    distribute.set_precision('float32')
  return model


def _train_batches(records: records_lib.Records, image_size: int,
                   batch_size: int) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
  """The training pipeline as `train.train` feeds it (uint8 batches), as a dataset function."""
  return lambda context: data.make_dataset(
      records, 'train', training=True, batch_size=batch_size,
      config=data.InputConfig(image_size=image_size), backbone=None, seed=0, input_context=context)


def _in_memory(dataset: tf.data.Dataset,
               count: int) -> Callable[[tf.distribute.InputContext], tf.data.Dataset]:
  """`count` batches of `dataset` cached in memory and repeated, as a dataset function."""
  cached = dataset.take(count).cache()
  for _ in cached:  # One full pass completes the cache: every later pass reads memory only.
    pass
  repeated = cached.repeat()
  return lambda context: repeated


class _Loop:
  """Our loop as `train.train` runs it: one compiled multi-step over make_train_step.

  Args:
    strategy: the training strategy.
    trained: the model or head trained.
    records: the records build (class counts for the loss).
    batch_size: the global batch.
    steps_per_call: train steps per call, as --steps_per_call.
    jit_compile: XLA-compile the forward and backward pass.
    policy: the precision `trained` was built under (loss scaling for mixed_float16).
  """

  def __init__(self, strategy: tf.distribute.Strategy, trained, records: records_lib.Records,
               batch_size: int, steps_per_call: int = 1, jit_compile: bool = False,
               policy: str = 'float32'):
    config = _train_config(records, batch_size)
    with strategy.scope():
      optimizer = distribute.wrap_optimizer(train.make_optimizer(config, steps_per_epoch=100),
                                            policy)
      optimizer.build(trained.trainable_variables)
    loss_fn = train.make_loss(config, records.class_counts, epoch=0)
    self._multi_step = train.make_multi_step(strategy, train.make_train_step(
        trained, optimizer, loss_fn, batch_size, jit_compile))
    self._strategy = strategy
    self.batch_size, self.steps_per_call = batch_size, steps_per_call

  def iterator(self, dataset_fn: Callable[[tf.distribute.InputContext], tf.data.Dataset]):
    """An iterator over a distributed dataset, as `train.train` makes it."""
    return iter(self._strategy.distribute_datasets_from_function(dataset_fn))

  def run(self, iterator, steps: int) -> None:
    """Runs `steps` train steps, `steps_per_call` per call (fewer in the last call)."""
    done = 0
    while done < steps:
      count = min(self.steps_per_call, steps - done)
      # .numpy() as in train.train: the host reads the totals after every call.
      self._multi_step(iterator, tf.constant(count)).numpy()
      done += count

  def first_call(self, iterator) -> float:
    """Seconds of the first call on `iterator`: tracing, compilation and one call's steps."""
    start = time.perf_counter()
    self.run(iterator, self.steps_per_call)
    return time.perf_counter() - start

  def timed(self, iterator, warmup_steps: int, steps: int) -> timing.Sample:
    """`warmup_steps` untimed steps, then `steps` timed ones."""
    self.run(iterator, warmup_steps)
    start = _now()
    self.run(iterator, steps)
    return _sample_since(start, steps * self.batch_size)


class _FitClock(keras.callbacks.Callback):
  """Times the steps of one fit call after its first `warmup_steps` (iterator start-up excluded).

  Steps run synchronously in TensorFlow's default eager mode, so the time at the end of a batch is
  the time its step finished.
  """

  def __init__(self, warmup_steps: int, total_steps: int):
    super().__init__()
    self._warmup_steps, self._total_steps = warmup_steps, total_steps
    self.start, self.end = None, None

  def on_train_batch_end(self, batch, logs=None):
    if batch == self._warmup_steps - 1:
      self.start = _now()
    elif batch == self._total_steps - 1:
      self.end = _now()


class _Fit:
  """Keras `fit` on a compiled LandmarkClassifier: our optimizer and loss, XLA off like ours."""

  def __init__(self, strategy: tf.distribute.Strategy, records: records_lib.Records,
               backbone: str, image_size: int, batch_size: int, dataset: tf.data.Dataset):
    config = _train_config(records, batch_size)
    loss_fn = train.make_loss(config, records.class_counts, epoch=0)
    self._model = _build_classifier(strategy, backbone, image_size, records.num_classes)
    with strategy.scope():
      # Keras averages the per-example losses over the batch, as our step does over the global
      # batch; both also count correct top-1 predictions.
      self._model.compile(optimizer=train.make_optimizer(config, steps_per_epoch=100),
                          loss=lambda labels, logits: loss_fn(labels, logits, None),
                          metrics=['sparse_categorical_accuracy'], jit_compile=False)
    self._dataset, self.batch_size = dataset, batch_size

  def first_call(self) -> float:
    """Seconds of a first one-step fit: tracing and one step."""
    start = time.perf_counter()
    self._model.fit(self._dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    return time.perf_counter() - start

  def timed(self, warmup_steps: int, steps: int) -> timing.Sample:
    """One fit call of `warmup_steps + steps` steps; the last `steps` are timed."""
    clock = _FitClock(warmup_steps, warmup_steps + steps)
    self._model.fit(self._dataset, epochs=1, steps_per_epoch=warmup_steps + steps, verbose=0,
                    shuffle=False, callbacks=[clock])
    wall, cpu = clock.start
    end_wall, end_cpu = clock.end
    return timing.Sample(steps * self.batch_size, end_wall - wall, end_cpu - cpu)


def _against_target(values: Sequence[float], target: float, at_least: bool) -> str:
  """'target ≥ 0.95x: met' from the median; says when the range straddles the target."""
  median = statistics.median(values)
  met = median >= target if at_least else median <= target
  text = f'target {"≥" if at_least else "≤"} {target:g}x: {"met" if met else "NOT met"}'
  if min(values) < target < max(values):
    text += ' (the range straddles it)'
  return text


def _side_lines(samples: Dict[str, Sequence[timing.Sample]],
                labels: Dict[str, str]) -> list[str]:
  width = max(len(label) for label in labels.values())
  return [f'  {labels[name]:<{width}}  {timing.describe(side)}' for name, side in samples.items()]


def _first_calls(seconds: Dict[str, float]) -> str:
  return '  first call (tracing, compilation, one call): ' + ', '.join(
      f'{name} {value:.1f} s' for name, value in seconds.items())


def compare_loop(strategy: tf.distribute.Strategy, records: records_lib.Records) -> None:
  """Our loop against Keras fit, same model, optimizer, loss and in-memory batches."""
  backbone, size, batch = _LOOP_BACKBONE.value, _IMAGE_SIZE.value, _LOOP_BATCH_SIZE.value
  per_call, steps, rounds = _STEPS_PER_CALL.value, _LOOP_STEPS.value, _LOOP_ROUNDS.value
  dataset_fn = _in_memory(_train_batches(records, size, batch)(None), _CACHED_BATCHES.value)
  loops, iterators, first = {}, {}, {}
  for count in (1, per_call):
    name = f'ours x{count}'
    loops[name] = _Loop(strategy, _build_classifier(strategy, backbone, size, records.num_classes),
                        records, batch, steps_per_call=count)
    iterators[name] = loops[name].iterator(dataset_fn)
    first[name] = loops[name].first_call(iterators[name])
  fit = _Fit(strategy, records, backbone, size, batch, dataset_fn(None))
  first['fit'] = fit.first_call()

  load_at_start = timing.load_note()
  sides = {name: lambda name=name: loops[name].timed(iterators[name], per_call, steps)
           for name in loops}
  sides['fit'] = lambda: fit.timed(per_call, steps)
  samples = timing.interleave(sides, rounds)

  labels = {'ours x1': 'ours, steps_per_call=1', f'ours x{per_call}':
            f'ours, steps_per_call={per_call}', 'fit': 'Keras fit, steps_per_execution=1'}
  lines = [f'loop: {backbone} backbone + softmax head, {size} px, batch {batch}, '
           f'{_CACHED_BATCHES.value} make_dataset batches in memory, XLA off; {rounds} rounds of '
           f'{steps} timed steps per side after {per_call} warm-up steps, median (range):']
  lines += _side_lines(samples, labels)
  for name in loops:
    values = timing.ratios(samples[name], samples['fit'])
    lines.append(f'  {name + "/fit":<12}  {timing.spread(values, unit="x")}  '
                 f'{_against_target(values, 0.95, at_least=True)}')
  lines.append(_first_calls(first))
  lines.append(f'  {load_at_start} at the start, {timing.load_note()} at the end')
  timing.print_line('\n'.join(lines))


def compare_bottleneck(strategy: tf.distribute.Strategy, records: records_lib.Records,
                       work_dir: str) -> None:
  """A bottleneck epoch (head on cached features) against an epoch through the frozen base."""
  size, batch = _IMAGE_SIZE.value, _BOTTLENECK_BATCH_SIZE.value
  examples = _EPOCH_EXAMPLES.value or records.num_examples('train')
  steps = max(1, examples // batch)
  for backbone in _BOTTLENECK_BACKBONES.value:
    model = _build_classifier(strategy, backbone, size, records.num_classes)
    backbones.freeze(model.backbone, backbone, 'all')
    start = time.perf_counter()
    cached = bottleneck.cache_features(
        model.backbone, backbone, records, 'train', size, model.head.needs_spatial,
        os.path.join(work_dir, f'features-{backbone}-{size}'), progress=False)
    cache_seconds = time.perf_counter() - start
    with strategy.scope():
      top = heads.build_head('softmax', records.num_classes)
      top(tf.zeros([1, *cached.shape]))
    frozen_loop = _Loop(strategy, model, records, batch)
    frozen_iterator = frozen_loop.iterator(_train_batches(records, size, batch))
    top_loop = _Loop(strategy, top, records, batch)
    top_iterator = top_loop.iterator(
        lambda context: bottleneck.feature_dataset(cached, True, batch, 0, context))
    first = {'frozen base': frozen_loop.first_call(frozen_iterator),
             'bottleneck': top_loop.first_call(top_iterator)}

    load_at_start = timing.load_note()
    samples = timing.interleave({
        'frozen': lambda: frozen_loop.timed(frozen_iterator, 1, steps),
        'bottleneck': lambda: top_loop.timed(top_iterator, 1, steps),
    }, _ROUNDS.value)
    values = timing.ratios(samples['bottleneck'], samples['frozen'])
    epoch_seconds = {side: statistics.median(sample.seconds for sample in runs)
                     for side, runs in samples.items()}
    labels = {'frozen': 'frozen-base epoch', 'bottleneck': 'bottleneck epoch'}
    lines = [f'bottleneck: {backbone} backbone (frozen) + softmax head, {size} px, batch {batch}, '
             f'epochs of {steps} steps ({steps * batch} examples); {_ROUNDS.value} rounds, one '
             'warm-up step per side and round, median (range):']
    lines += _side_lines(samples, labels)
    lines.append(f'  epoch time: frozen base {epoch_seconds["frozen"]:.2f} s, bottleneck '
                 f'{epoch_seconds["bottleneck"]:.3f} s')
    lines.append(f'  bottleneck/frozen  {timing.spread(values, digits=0, unit="x")}  '
                 f'{_against_target(values, 50, at_least=True)}')
    lines.append(f'  one-off feature caching of the {cached.examples} train images: '
                 f'{cache_seconds:.1f} s ({cache_seconds / epoch_seconds["frozen"]:.1f} '
                 'frozen-base epochs)')
    lines.append(_first_calls(first))
    lines.append(f'  {load_at_start} at the start, {timing.load_note()} at the end')
    timing.print_line('\n'.join(lines))


def compare_pipeline(strategy: tf.distribute.Strategy, records: records_lib.Records) -> None:
  """One model and train step, fed by the live pipeline and by the same batches in memory."""
  backbone, size, batch = _PIPELINE_BACKBONE.value, _IMAGE_SIZE.value, _PIPELINE_BATCH_SIZE.value
  steps = _PIPELINE_STEPS.value
  loop = _Loop(strategy, _build_classifier(strategy, backbone, size, records.num_classes), records,
               batch)
  batches = _train_batches(records, size, batch)
  iterators = {'pipeline': loop.iterator(batches),
               'memory': loop.iterator(_in_memory(batches(None), _CACHED_BATCHES.value))}
  first = {name: loop.first_call(iterator) for name, iterator in iterators.items()}

  load_at_start = timing.load_note()
  samples = timing.interleave(
      {name: lambda iterator=iterator: loop.timed(iterator, 1, steps)
       for name, iterator in iterators.items()}, _ROUNDS.value)
  values = timing.ratios(samples['memory'], samples['pipeline'])
  labels = {'pipeline': 'fed by make_dataset',
            'memory': f'fed from {_CACHED_BATCHES.value} batches in memory'}
  lines = [f'pipeline: {backbone} backbone + softmax head trained from scratch, {size} px, batch '
           f'{batch}; {_ROUNDS.value} rounds of {steps} timed steps per side after one warm-up '
           'step, median (range):']
  lines += _side_lines(samples, labels)
  lines.append(f'  pipeline/memory time  {timing.spread(values, unit="x")}  '
               f'{_against_target(values, 1.05, at_least=False)}')
  lines.append(_first_calls(first))
  lines.append(f'  {load_at_start} at the start, {timing.load_note()} at the end')
  timing.print_line('\n'.join(lines))


def compare_precision(strategy: tf.distribute.Strategy, records: records_lib.Records) -> None:
  """ResNet50 images/s with float32 / mixed_bfloat16 and XLA off / on, at each size."""
  batch, steps = _PRECISION_BATCH_SIZE.value, _PRECISION_STEPS.value
  settings = {'float32': ('float32', False), 'float32+XLA': ('float32', True),
              'bfloat16': ('mixed_bfloat16', False), 'bfloat16+XLA': ('mixed_bfloat16', True)}
  for size in (int(text) for text in _PRECISION_SIZES.value):
    dataset_fn = _in_memory(_train_batches(records, size, batch)(None), _CACHED_BATCHES.value)
    loops, iterators, first = {}, {}, {}
    for name, (policy, jit_compile) in settings.items():
      model = _build_classifier(strategy, 'resnet50', size, records.num_classes, policy)
      loops[name] = _Loop(strategy, model, records, batch, jit_compile=jit_compile, policy=policy)
      iterators[name] = loops[name].iterator(dataset_fn)
      first[name] = loops[name].first_call(iterators[name])

    load_at_start = timing.load_note()
    samples = timing.interleave(
        {name: lambda name=name: loops[name].timed(iterators[name], 1, steps) for name in settings},
        _PRECISION_ROUNDS.value)
    lines = [f'precision: resnet50 + softmax head trained from scratch, {size} px, batch {batch}, '
             f'batches in memory; {_PRECISION_ROUNDS.value} rounds of {steps} timed steps per side '
             'after one warm-up step, median (range), no target:']
    lines += _side_lines(samples, {name: name for name in settings})
    for name in list(settings)[1:]:
      values = timing.ratios(samples[name], samples['float32'])
      lines.append(f'  {name + "/float32":<20}  {timing.spread(values, unit="x")}')
    lines.append(_first_calls(first))
    lines.append(f'  {load_at_start} at the start, {timing.load_note()} at the end')
    timing.print_line('\n'.join(lines))


def _run_tool(name: str, arguments: Sequence[str]) -> None:
  """Runs console script `name` of this environment.

  Raises:
    RuntimeError: it is not installed, or it failed (the message ends with its last lines).
  """
  command = shutil.which(name, path=os.path.dirname(sys.executable))
  if command is None:
    raise RuntimeError(f'{name} is not installed beside this Python (pip install -e .); or pass '
                       '--records_dir')
  result = subprocess.run([command, *arguments], capture_output=True, text=True, check=False)
  if result.returncode != 0:
    tail = '\n'.join((result.stdout + result.stderr).strip().splitlines()[-5:])
    raise RuntimeError(f'{name} exited with {result.returncode}:\n{tail}')


def build_synthetic_records(work_dir: str) -> str:
  """Generates the repository's synthetic set into `work_dir` and builds its records there.

  Returns:
    The records folder.
  """
  images_dir, records_dir = os.path.join(work_dir, 'synthetic'), os.path.join(work_dir, 'records')
  _run_tool('tfl-synth', [f'--flagfile={_CONFIGS_DIR}/synthetic_data.flags',
                          f'--output_dir={images_dir}', '--noprogress'])
  _run_tool('tfl-build-records', [
      f'--flagfile={_CONFIGS_DIR}/synthetic_records.flags',
      f'--train_csv={images_dir}/train.csv', f'--test_csv={images_dir}/test.csv',
      f'--image_dir={images_dir}/images', f'--output_dir={records_dir}', '--noprogress'])
  return records_dir


def main(argv):
  del argv
  # Every side compiles its own loop on purpose; TensorFlow would warn about "retracing".
  tf.get_logger().setLevel('ERROR')
  timing.print_line(f'start: {timing.load_note()}')
  with tempfile.TemporaryDirectory(prefix='bench_train_') as work_dir:
    try:
      records = records_lib.load(_RECORDS_DIR.value or build_synthetic_records(work_dir))
    except (errors.UserError, RuntimeError) as error:
      print(f'bench_train: error: {error}', file=sys.stderr)
      return 2
    strategy = distribute.make_strategy('default')
    runs = {'loop': lambda: compare_loop(strategy, records),
            'bottleneck': lambda: compare_bottleneck(strategy, records, work_dir),
            'pipeline': lambda: compare_pipeline(strategy, records),
            'precision': lambda: compare_precision(strategy, records)}
    for name in COMPARISONS:
      if name in _COMPARISONS.value:
        try:
          runs[name]()
        except errors.UserError as error:  # E.g. an image size the backbone refuses.
          timing.print_line(f'{name}: failed, {error}')
  timing.print_line(f'end: {timing.load_note()}')
  return 0


if __name__ == '__main__':
  app.run(main)
