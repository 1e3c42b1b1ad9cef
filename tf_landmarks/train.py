"""Training of landmark classifiers: scratch, bottleneck and fine-tune, under any tf.distribute strategy.

One custom loop serves every strategy (Keras 3's `fit` fails under MultiWorkerMirroredStrategy):
`make_train_step` builds the per-replica step (forward, per-example loss averaged over the GLOBAL
batch, gradients, update), `make_multi_step` runs several of them per `tf.function` call (what
keeps TPUs busy) with `strategy.run`, and `train` drives epochs, validation (top-1, top-5, GAP),
checkpoints and the run folder.

Modes:
- scratch: backbone and head trained end to end.
- bottleneck: the backbone is frozen and run once over train and validation (`bottleneck.py`); the
  head trains on the cached features, many epochs in seconds.
- finetune: the head of a bottleneck run (`--init_from`) on its backbone, the lower blocks frozen
  (`--freeze_until`), frozen BatchNorm layers in inference mode, augmentation on.
- delf: DELF local features (`models/delf.py`) on a classifier run's backbone (`--init_from`):
  `--delf_stage=attention` trains the attention head on the frozen backbone (stop-gradient),
  `--delf_stage=descriptor` first fine-tunes the local-feature layers on classification.

The run folder (`--workdir`) holds everything later stages need: `checkpoints/` (latest and best),
`tensorboard/`, and what `runs.write` writes at the end: `model.keras`, `backbone.weights.h5` and
`head.weights.npz` (`delf.weights.h5` for DELF), a copy of `label_map.csv`, and `run.json` (last)
describing the model, its weights and their checksums, and its metrics. One `tfl-train` at a time
writes a workdir (a lock), and a start that fails before its first checkpoint removes the workdir it
created.
"""

import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import tempfile
import time
import zipfile
from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf

from tf_landmarks import bottleneck
from tf_landmarks import data
from tf_landmarks import distribute
from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import metrics
from tf_landmarks import records as records_lib
from tf_landmarks import runs
from tf_landmarks import settings
from tf_landmarks.models import backbones
from tf_landmarks.models import classifier
from tf_landmarks.models import delf
from tf_landmarks.models import heads
from tf_landmarks.models import losses
from tf_landmarks.runs import Mode
from tf_landmarks.settings import setting

# Set in what `train` returns when --resume found the run already finished (not in run.json).
ALREADY_FINISHED = 'already_finished'
# Training has diverged when a step's loss is not finite or exceeds this many times ln(classes),
# the cross-entropy of a uniform guess: the loss of an untrained classifier (ArcFace and LDAM
# margins add a few units), which a run that learns stays below.
DIVERGENCE_FACTOR = 1000.0


class TrainError(errors.UserError):
  """The run cannot start or go on; the message says what to change."""


class TrainingDiverged(TrainError):
  """The loss (or the validation outputs) became non-finite or exploded; see `divergence_bound`."""


def divergence_bound(num_classes: int) -> float:
  """The largest step loss a run may show before it counts as diverged (`DIVERGENCE_FACTOR`)."""
  return DIVERGENCE_FACTOR * max(math.log(max(num_classes, 1)), 1.0)


@dataclasses.dataclass
class TrainConfig:
  """Everything `train` needs besides the input pipeline's `data.InputConfig`."""
  records_dir: Optional[str] = setting(
      None, 'Records folder from tfl-build-records; its label map, class counts and manifest '
      'come with it.', required=True)
  workdir: Optional[str] = setting(
      None, 'The run folder: checkpoints, TensorBoard logs, model.keras, run.json.', required=True,
      runtime=True)
  mode: Mode = setting(
      Mode.SCRATCH, 'scratch: train everything; bottleneck: frozen base, cached features, train '
      'the head; finetune: a bottleneck run\'s head (--init_from) with the upper blocks unfrozen; '
      'delf: DELF attention (or descriptor) training on a classifier run\'s backbone.')
  backbone: str = setting('resnet50', 'Backbone (tf_landmarks/models/backbones.py).',
                          choices=tuple(backbones.BACKBONES))
  weights: str = setting(
      '', 'Backbone weights: imagenet (Keras cache ~/.keras/models or $KERAS_HOME, else '
      'downloaded), none, or a .weights.h5 path (e.g. <run>/backbone.weights.h5). Default: none '
      'for scratch, imagenet for bottleneck, the --init_from run\'s for finetune.')
  head: str = setting('softmax', 'Classification head (tf_landmarks/models/heads.py).',
                      choices=tuple(heads.HEADS))
  embedding_dim: int = setting(512, 'Embedding size of the gem and arcface heads.', lower=8)
  dropout: float = setting(0.0, 'Dropout rate in the head.', lower=0.0, upper=0.9)
  arcface_scale: float = setting(30.0, 'ArcFace logit scale s.', lower=1.0)
  arcface_margin: float = setting(0.3, 'ArcFace angular margin m (radians).', lower=0.0, upper=1.0)
  subcenters: int = setting(1, 'ArcFace sub-centres per class (3 in the GLD 2020 winners).', lower=1)
  dynamic_margin: bool = setting(
      False, 'ArcFace margins per class from class frequency (larger for rare classes).')
  bilinear_channels: int = setting(
      -1, 'Bilinear head: channels after a 1x1 reduction; -1: 256 when the backbone has more than '
      '512 channels; 0: no reduction.', lower=-1)
  loss: str = setting('cross_entropy', 'cross_entropy, or ldam (label-distribution-aware margins '
                      'from the class counts).', choices=('cross_entropy', 'ldam'))
  label_smoothing: float = setting(0.0, 'Label smoothing of the cross-entropy.', lower=0.0,
                                   upper=0.5)
  ldam_max_margin: float = setting(0.5, 'LDAM: the margin of the rarest class.', lower=0.0)
  ldam_scale: float = setting(30.0, 'LDAM: logit scale.', lower=1.0)
  drw_epoch: int = setting(
      0, 'LDAM deferred re-weighting: from this epoch on, class-balanced loss weights (0: never).',
      lower=0)
  triplet_weight: float = setting(
      0.0, 'Weight of an added triplet loss on the head\'s embeddings (0: off).', lower=0.0)
  triplet_margin: float = setting(0.2, 'Triplet loss margin.', lower=0.0)
  triplet_mining: str = setting('batch_hard', 'Triplet mining in the batch.',
                                choices=losses.MINING_MODES)
  optimizer: str = setting('sgd', 'sgd (with momentum), adam or adamw.',
                           choices=('sgd', 'adam', 'adamw'))
  learning_rate: float = setting(0.01, 'Peak learning rate (after warm-up).', lower=0.0)
  momentum: float = setting(0.9, 'SGD momentum.', lower=0.0, upper=1.0)
  weight_decay: float = setting(0.0, 'Decoupled weight decay.', lower=0.0)
  warmup_epochs: float = setting(0.0, 'Linear warm-up from 0 over this many epochs.', lower=0.0)
  schedule: str = setting('cosine', 'Learning-rate decay after warm-up.',
                          choices=('cosine', 'step', 'constant'))
  decay_epochs: int = setting(30, 'Step schedule: multiply by --decay_factor every this many '
                              'epochs.', lower=1)
  decay_factor: float = setting(0.1, 'Step schedule factor.', lower=0.0, upper=1.0)
  clip_norm: float = setting(0.0, 'Clip gradients to this global norm (0: no clipping).', lower=0.0)
  epochs: int = setting(10, 'Epochs to train.', lower=1)
  batch_size: int = setting(64, 'Global batch size (split over replicas and workers).', lower=1)
  steps_per_epoch: int = setting(0, 'Steps per epoch; 0: one pass over the train split.', lower=0)
  steps_per_call: int = setting(
      1, 'Train steps per tf.function call: more keeps TPUs busy between host round trips.',
      lower=1)
  strategy: str = setting('default', 'tf.distribute strategy.', choices=distribute.STRATEGIES)
  tpu: Optional[str] = setting(None, 'TPU name or address for --strategy=tpu ("local" on a TPU VM).',
                               runtime=True)
  jit_compile: str = setting('auto', 'XLA-compile the train step: auto is on for GPU/TPU, off on '
                             'CPU (measured slower there).', choices=distribute.JIT_SETTINGS)
  mixed_precision: str = setting('float32', 'Compute precision (heads stay float32).',
                                 choices=distribute.PRECISIONS)
  init_from: Optional[str] = setting(
      None, 'Finetune: the bottleneck run whose head (and, by default, backbone weights) to start '
      'from. DELF: the classifier run whose backbone weights to use, or a DELF run to continue '
      'from (e.g. the descriptor stage before the attention stage).')
  delf_stage: str = setting(
      'attention', 'DELF: attention (train the attention head on the frozen backbone) or '
      'descriptor (fine-tune the local-feature layers on classification first).',
      choices=('attention', 'descriptor'))
  delf_reduced_dim: int = setting(
      0, 'DELF: > 0 adds an autoencoder reducing descriptors to this many channels (DELF: 128).',
      lower=0)
  freeze_until: str = setting(
      '', 'Finetune: freeze the backbone up to and including this block or layer (e.g. conv4 for '
      'ResNet50, block4 or 15 for VGG16); "all" freezes the whole backbone.')
  allow_random_top: bool = setting(
      False, 'Finetune without --init_from: allow a randomly initialised head on a pretrained base '
      '(its large early gradients damage the pretrained weights).')
  feature_cache_dir: Optional[str] = setting(
      None, 'Bottleneck feature cache; default: feature_cache beside the workdir.', runtime=True)
  seed: int = setting(0, 'Seed of initialisation, data order and augmentation.')
  deterministic: bool = setting(
      False, 'Bit-for-bit reproducible training: TensorFlow op determinism, a fixed data order '
      'and seeded augmentation; the same settings and --seed give the same weights, and a resumed '
      'run the weights of an uninterrupted one. Costs some speed (BUILD_NOTES.md).')
  keep_checkpoints: int = setting(3, 'Latest checkpoints kept.', lower=1, runtime=True)
  checkpoint_every_steps: int = setting(
      1000, 'Steps between checkpoints within an epoch (one is also written at every epoch end '
      'and when the run is interrupted).', lower=1, runtime=True)
  log_every_steps: int = setting(50, 'Steps between progress lines and TensorBoard points.',
                                 lower=1, runtime=True)
  resume: bool = setting(False, 'Continue the unfinished run in --workdir from its last '
                         'checkpoint (same settings).', runtime=True)
  overwrite: bool = setting(False, 'Replace a run already in --workdir.', runtime=True)
  progress: bool = setting(True, 'Show progress bars and lines.', runtime=True)


def make_train_step(model: Callable, optimizer: keras.optimizers.Optimizer,
                    loss_fn: Callable, global_batch_size: int,
                    jit_compile: bool = False) -> Callable:
  """The per-replica train step, for `strategy.run` (or a plain call without a strategy).

  Args:
    model: a Keras model or layer called as model(inputs, labels=labels, training=True) → logits.
    optimizer: a Keras optimizer (wrapped in LossScaleOptimizer for float16).
    loss_fn: (labels, logits, inputs) → per-example losses [B].
    global_batch_size: the batch over all replicas: per-example losses are summed and divided by
      it, so that the gradients the optimizer sums over replicas are those of the global mean.
    jit_compile: XLA-compile the forward and backward pass (the update stays outside XLA, where
      cross-replica reductions are supported by every strategy).

  Returns:
    step(inputs, labels) → float32 [3]: this replica's (loss share, correct top-1, examples).
  """

  def forward_backward(inputs, labels):
    with tf.GradientTape() as tape:
      logits = model(inputs, labels=labels, training=True)
      loss = tf.nn.compute_average_loss(loss_fn(labels, logits, inputs),
                                        global_batch_size=global_batch_size)
      if model.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
      scaled = optimizer.scale_loss(loss)
    gradients = tape.gradient(scaled, model.trainable_variables)
    hard_labels = labels if labels.shape.rank == 1 else tf.argmax(labels, axis=-1, output_type=tf.int32)
    correct = tf.reduce_sum(tf.cast(
        tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), hard_labels), tf.float32))
    return gradients, tf.stack([loss, correct, tf.cast(tf.shape(labels)[0], tf.float32)])

  compiled = tf.function(forward_backward, jit_compile=jit_compile) if jit_compile else \
      forward_backward

  def step(inputs, labels):
    gradients, stats = compiled(inputs, labels)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return stats

  return step


def make_multi_step(strategy: tf.distribute.Strategy, step: Callable) -> Callable:
  """Runs `num_steps` replica steps per call.

  Returns:
    multi_step(iterator, num_steps) → float32 [4]: the summed step losses, correct top-1 and
    examples, and the largest step loss (a NaN shows in the sum).
  """

  @tf.function
  def multi_step(iterator, num_steps):
    totals, worst = tf.zeros([3]), tf.constant(-np.inf, tf.float32)
    for _ in tf.range(num_steps):
      inputs, labels = next(iterator)
      stats = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(step, args=(inputs, labels)),
                              axis=None)
      totals += stats
      worst = tf.maximum(worst, stats[0])
    return tf.concat([totals, worst[tf.newaxis]], axis=0)

  return multi_step


def make_evaluator(strategy: tf.distribute.Strategy, model: Callable) -> Callable:
  """Returns evaluate(distributed dataset) → {'top1', 'top5', 'gap', 'examples', 'non_finite'}.

  Each replica computes softmax top-5 labels and scores of its share; they are gathered to the
  host, padding (label −1) dropped, and scored with `metrics.gap` (every validation image shows a
  landmark, so M is the number of images). Images whose scores are not finite (a diverged model)
  are counted in 'non_finite' and scored as wrong answers with confidence 0.
  """

  def replica_step(inputs, labels):
    probabilities = tf.nn.softmax(tf.cast(model(inputs, training=False), tf.float32))
    scores, indices = tf.math.top_k(probabilities, k=min(5, probabilities.shape[-1]))
    return indices, scores, labels

  @tf.function
  def gathered(batch):
    outputs = strategy.run(replica_step, args=batch)
    return tuple(strategy.gather(output, axis=0) for output in outputs)

  def evaluate(dataset) -> Dict[str, float]:
    indices, scores, labels = [], [], []
    for batch in dataset:
      batch_indices, batch_scores, batch_labels = (t.numpy() for t in gathered(batch))
      keep = batch_labels >= 0
      indices.append(batch_indices[keep])
      scores.append(batch_scores[keep])
      labels.append(batch_labels[keep])
    indices, scores = np.concatenate(indices), np.concatenate(scores)
    labels = np.concatenate(labels)
    finite = np.isfinite(scores).all(axis=1)
    indices = np.where(finite[:, None], indices, -1)
    predictions = {i: (int(indices[i, 0]), float(scores[i, 0]) if finite[i] else 0.0)
                   for i in range(len(labels))}
    truth = {i: int(label) for i, label in enumerate(labels)}
    return {'top1': float(np.mean(indices[:, 0] == labels)),
            'top5': float(np.mean((indices == labels[:, None]).any(axis=1))),
            'gap': metrics.gap(predictions, truth), 'examples': int(len(labels)),
            'non_finite': int(np.sum(~finite))}

  return evaluate


class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up to the peak rate, then cosine, step or constant."""

  def __init__(self, peak: float, warmup_steps: int, total_steps: int, schedule: str,
               decay_steps: int, decay_factor: float):
    self.peak, self.warmup_steps, self.total_steps = peak, warmup_steps, max(total_steps, 1)
    self.schedule, self.decay_steps, self.decay_factor = schedule, decay_steps, decay_factor

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    warmup = tf.cast(self.warmup_steps, tf.float32)
    after = tf.maximum(step - warmup, 0.0)
    if self.schedule == 'cosine':
      span = tf.maximum(tf.cast(self.total_steps, tf.float32) - warmup, 1.0)
      rate = 0.5 * self.peak * (1.0 + tf.cos(math.pi * tf.minimum(after / span, 1.0)))
    elif self.schedule == 'step':
      rate = self.peak * self.decay_factor ** tf.floor(after / self.decay_steps)
    else:
      rate = tf.constant(self.peak, tf.float32)
    return tf.where(step < warmup, self.peak * (step + 1.0) / tf.maximum(warmup, 1.0), rate)

  def get_config(self):
    return {'peak': self.peak, 'warmup_steps': self.warmup_steps, 'total_steps': self.total_steps,
            'schedule': self.schedule, 'decay_steps': self.decay_steps,
            'decay_factor': self.decay_factor}


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
  """The optimizer with its warm-up and decay schedule (not yet wrapped for loss scaling)."""
  schedule = WarmupDecay(config.learning_rate, round(config.warmup_epochs * steps_per_epoch),
                         config.epochs * steps_per_epoch, config.schedule,
                         config.decay_epochs * steps_per_epoch, config.decay_factor)
  common = dict(learning_rate=schedule, global_clipnorm=config.clip_norm or None,
                weight_decay=config.weight_decay or None)
  if config.optimizer == 'sgd':
    return keras.optimizers.SGD(momentum=config.momentum, **common)
  if config.optimizer == 'adam':
    return keras.optimizers.Adam(**common)
  return keras.optimizers.AdamW(**{**common, 'weight_decay': config.weight_decay})


def make_loss(config: TrainConfig, class_counts, epoch: int) -> Callable:
  """(labels, logits, inputs) → per-example losses, for `make_train_step`; depends on the epoch
  only for LDAM's deferred re-weighting."""
  if config.loss == 'ldam':
    margins = losses.ldam_margins(class_counts, config.ldam_max_margin)
    weights = (losses.drw_class_weights(class_counts)
               if config.drw_epoch and epoch >= config.drw_epoch else None)
    base = lambda labels, logits: losses.ldam_loss(labels, logits, margins, config.ldam_scale,
                                                   weights)
  else:
    base = lambda labels, logits: losses.cross_entropy(labels, logits, config.label_smoothing)
  return lambda labels, logits, inputs: base(labels, logits)


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
  resolver = getattr(strategy, 'cluster_resolver', None)
  if resolver is None or not resolver.task_type:
    return True
  if resolver.task_type == 'chief':
    return True
  return resolver.task_type == 'worker' and resolver.task_id == 0 and \
      'chief' not in resolver.cluster_spec().as_dict()


def _write_dir(workdir: str, strategy: tf.distribute.Strategy) -> str:
  """Where this worker writes checkpoints and logs: the workdir for the chief, a fresh scratch
  folder for the others (every worker must take part in saving a checkpoint, but only the chief's
  copy is kept; all restore from the chief's)."""
  if _is_chief(strategy):
    return workdir
  resolver = strategy.cluster_resolver
  return tempfile.mkdtemp(prefix=f'tfl-{resolver.task_type}-{resolver.task_id}-')


def _resolve_weights(config: TrainConfig, init_run: Optional[runs.Run]) -> str:
  if config.weights:
    return config.weights
  if init_run is not None:
    return files.join(config.init_from, runs.BACKBONE_WEIGHTS)
  return 'none' if config.mode == Mode.SCRATCH else 'imagenet'


def _check_config(config: TrainConfig, input_config: data.InputConfig, weights: str,
                  init_run: Optional[runs.Run], records: records_lib.Records) -> None:
  settings.check(config)
  settings.check(input_config)
  if config.mode == Mode.FINETUNE and init_run is None and weights != 'none' and \
      not config.allow_random_top:
    raise TrainError('--mode=finetune on pretrained weights needs --init_from=<bottleneck run> '
                     '(a random head\'s early gradients damage the pretrained base); pass '
                     '--allow_random_top to do it anyway')
  if config.mode == Mode.BOTTLENECK and weights == 'none':
    raise TrainError('--mode=bottleneck trains a head on a frozen base: give it trained weights '
                     '(--weights=imagenet or a .weights.h5 path), not none')
  if config.mode not in (Mode.FINETUNE, Mode.DELF) and (config.init_from or config.freeze_until):
    raise TrainError('--init_from and --freeze_until belong to --mode=finetune or delf')
  if config.mode == Mode.DELF:
    if init_run is None and weights == 'none':
      raise TrainError('--mode=delf attends over a trained backbone: give --init_from=<classifier '
                       'run> or --weights')
    if config.triplet_weight > 0 or config.loss != 'cross_entropy':
      raise TrainError('--mode=delf trains with cross-entropy only (no --loss=ldam or triplet)')
  if init_run is not None:
    keys = ('backbone', 'num_classes') if config.mode == Mode.DELF else (
        'backbone', 'head', 'num_classes')
    for key in keys:
      mine = {'backbone': config.backbone, 'head': config.head,
              'num_classes': records.num_classes}[key]
      if init_run.metadata[key] != mine:
        raise TrainError(f'--init_from={config.init_from} has {key} {init_run.metadata[key]!r}, this run '
                         f'{mine!r}')
    # A head (or a whole attention-stage DELF model) carries its classes over: class i must be
    # the same landmark, not merely the class count the same.
    carries_classes = config.mode != Mode.DELF or (
        (init_run.metadata.get('delf') or {}).get('stage') == 'attention')
    if carries_classes and init_run.landmark_ids() != records.landmark_ids:
      raise TrainError(f'--init_from={config.init_from} was trained on another label map than '
                       f'--records_dir={records.path} (the same {records.num_classes} classes, '
                       'other landmark ids): its classes would name the wrong landmarks')
  if config.mode == Mode.BOTTLENECK and input_config.mixup_alpha > 0:
    raise TrainError('--mixup_alpha needs images; the bottleneck stage trains on cached features')
  train_examples = records.num_examples('train')
  if config.batch_size > train_examples:
    raise TrainError(f'--batch_size={config.batch_size} is larger than the train split of '
                     f'{records.path} ({train_examples} examples); lower --batch_size')


def _head_options(config: TrainConfig) -> dict:
  if config.head == 'softmax':
    return {'dropout': config.dropout}
  if config.head == 'gem':
    return {'embedding_dim': config.embedding_dim, 'dropout': config.dropout}
  if config.head == 'arcface':
    return {'embedding_dim': config.embedding_dim, 'dropout': config.dropout,
            'scale': config.arcface_scale, 'margin': config.arcface_margin,
            'subcenters': config.subcenters, 'dynamic_margin': config.dynamic_margin}
  if config.head == 'bilinear':
    channels = None if config.bilinear_channels < 0 else config.bilinear_channels
    return {'reduce_channels': channels, 'dropout': config.dropout}
  return {}


def _prepare_workdir(config: TrainConfig, fingerprint: dict) -> bool:
  """Checks or clears --workdir (a folder this process holds the lock of) as --resume and
  --overwrite say, and marks the run started.

  Returns:
    True when --resume finds the run finished with the same settings: there is nothing to do.
  """
  workdir = config.workdir
  finished = runs.is_finished(workdir)
  started = runs.is_started(workdir)
  if (finished or started) and config.overwrite:
    files.clear_folder(workdir)
    finished = started = False
  failure = runs.failure_of(workdir) if finished else None
  if failure is not None:
    raise TrainError(f'{workdir} holds a failed run ({failure}); use another --workdir or '
                     '--overwrite to start again')
  if finished and not config.resume:
    raise TrainError(f'{workdir} holds a finished run; use another --workdir or --overwrite')
  if started and not config.resume:
    raise TrainError(f'{workdir} holds an unfinished run; pass --resume to continue it from its '
                     'last checkpoint, or --overwrite to start again')
  if started:
    with tf.io.gfile.GFile(files.join(workdir, runs.CONFIG_JSON)) as f:
      previous = json.load(f)
    changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
    if changed:
      raise TrainError(f'{workdir} holds a run with other settings ({", ".join(changed)}); '
                       'use --overwrite to start again')
    return finished
  files.write_atomically(files.join(workdir, runs.CONFIG_JSON), json.dumps(fingerprint, indent=1))
  return False


def _pad_to(batch_size: int):
  """Pads a partial evaluation batch to `batch_size` with label −1, so that shapes stay static
  (which TPUs need) and every replica gets a batch."""

  def pad(inputs, labels):
    missing = batch_size - tf.shape(labels)[0]
    paddings = [[0, missing]] + [[0, 0]] * (len(inputs.shape) - 1)
    return (tf.pad(inputs, paddings), tf.pad(labels, [[0, missing]], constant_values=-1))

  return pad


class _Progress:
  """Progress lines with rate and ETA, and TensorBoard scalars (chief only)."""

  def __init__(self, enabled: bool, writer, total_steps: int, start_step: int):
    self.enabled, self.writer = enabled, writer
    self.total_steps, self.start_step = total_steps, start_step
    self.started = time.monotonic()

  def log(self, step: int, epoch: int, totals: np.ndarray, learning_rate: float,
          images_per_second: float) -> None:
    loss, accuracy = totals[0] / max(totals[3], 1), totals[1] / max(totals[2], 1)
    if self.writer is not None:
      with self.writer.as_default(step=step):
        tf.summary.scalar('train/loss', loss)
        tf.summary.scalar('train/accuracy', accuracy)
        tf.summary.scalar('train/learning_rate', learning_rate)
        tf.summary.scalar('train/images_per_second', images_per_second)
    if self.enabled:
      done = step - self.start_step
      remaining = (time.monotonic() - self.started) / max(done, 1) * (self.total_steps - step)
      print(f'epoch {epoch + 1} step {step}/{self.total_steps}: loss {loss:.4f} accuracy '
            f'{accuracy:.3f} lr {learning_rate:.2e} {images_per_second:.0f} img/s ETA '
            f'{datetime.timedelta(seconds=round(remaining))}', flush=True)


def _build_models(config: TrainConfig, records: records_lib.Records, built, image_size: int,
                  init_run: Optional[runs.Run]):
  """The model of `config.mode` on the built backbone, initialised and frozen as the mode says.

  Returns:
    (model, head): the whole model (what model.keras holds) and its head (None for DELF).
  """
  dummy = tf.zeros([1, image_size, image_size, 3], tf.uint8)
  if config.mode == Mode.DELF:
    if config.delf_stage == 'descriptor':
      backbones.freeze(built.model, config.backbone, config.freeze_until)
    model = delf.build_delf(config.backbone, built.model, records.num_classes,
                            stage=config.delf_stage, reduced_dim=config.delf_reduced_dim)
    model(dummy)
    # From a descriptor-stage run only the backbone (its weights file) carries over: its
    # attention head never trained. An attention-stage run is continued whole.
    if init_run is not None and (init_run.metadata.get('delf') or {}).get('stage') == 'attention':
      if init_run.metadata['delf']['reduced_dim'] != config.delf_reduced_dim:
        raise TrainError(f'--init_from={config.init_from} reduces descriptors to '
                         f'{init_run.metadata["delf"]["reduced_dim"]} channels, this run to '
                         f'{config.delf_reduced_dim}')
      model.load_weights(_local_copy(files.join(config.init_from, runs.DELF_WEIGHTS)))
    return model, None
  head = heads.build_head(config.head, records.num_classes, class_counts=records.class_counts,
                          **_head_options(config))
  model = classifier.LandmarkClassifier(built.model, head, config.backbone)
  model(dummy)  # Builds every variable now, inside the strategy's scope.
  if init_run is not None:
    _load_head_weights(head, files.join(config.init_from, runs.HEAD_WEIGHTS))
  if config.mode == Mode.BOTTLENECK:
    backbones.freeze(built.model, config.backbone, 'all')
  elif config.mode == Mode.FINETUNE:
    backbones.freeze(built.model, config.backbone, config.freeze_until)
  return model, head


def _input_functions(config: TrainConfig, input_config: data.InputConfig,
                     records: records_lib.Records, built, head):
  """What trains and its inputs: (trained, train_fn(seed, skip) → dataset_fn, eval_fn).

  The bottleneck stage trains the head on cached features; every other mode trains on images.
  The dataset functions take the `tf.distribute.InputContext` of each input pipeline; `skip` is
  the number of global batches to pass over (where a resumed --deterministic run stopped).
  """
  global_batch, image_size = config.batch_size, input_config.image_size
  if config.mode == Mode.BOTTLENECK:
    cache_root = config.feature_cache_dir or files.join(
        os.path.dirname(os.path.abspath(config.workdir)) if not files.is_remote(config.workdir)
        else config.workdir.rsplit('/', 1)[0], 'feature_cache')
    key = bottleneck.cache_key(records, config.backbone, built.weights_sha256, image_size,
                               head.needs_spatial)
    cached = {split: bottleneck.cache_features(built.model, config.backbone, records, split,
                                               image_size, head.needs_spatial,
                                               files.join(cache_root, key), progress=config.progress)
              for split in ('train', 'validation') if records.num_examples(split)}

    def train_fn(seed, skip):
      # Every pipeline gives one batch per replica it feeds at each step; features parse cheaply.
      return lambda context: bottleneck.feature_dataset(
          cached['train'], True, global_batch, seed, context).skip(
              skip * context.num_replicas_in_sync // context.num_input_pipelines)

    def eval_fn(context):
      return bottleneck.feature_dataset(cached['validation'], False, global_batch,
                                        input_context=context).map(
                                            _pad_to(context.get_per_replica_batch_size(global_batch)))
    return head, train_fn, eval_fn

  def train_fn(seed, skip):
    return lambda context: data.make_dataset(
        records, 'train', training=True, batch_size=global_batch, config=input_config,
        backbone=None, seed=seed, deterministic=config.deterministic, input_context=context,
        skip=skip)

  def eval_fn(context):
    return data.make_dataset(records, 'validation', training=False, batch_size=global_batch,
                             config=input_config, backbone=None, input_context=context).map(
                                 _pad_to(context.get_per_replica_batch_size(global_batch)))
  return None, train_fn, eval_fn


def train(config: TrainConfig, input_config: data.InputConfig) -> dict:
  """Trains as `config.mode` says and writes the run folder; see the module docstring.

  The chief holds the workdir's lock (`files.exclusive_writer`) from its first check to run.json;
  the other workers of a multi-worker run write only their own scratch folders.

  Returns:
    The run description (also written to `<workdir>/run.json`). With `config.resume` and a run
    already finished in the workdir (same settings), nothing is trained or written: its run.json,
    with `ALREADY_FINISHED` set.

  Raises:
    TrainError, records.RecordsError, runs.RunError: unusable settings, inputs or workdir (message
      for the user).
  """
  config = dataclasses.replace(config, mode=Mode(config.mode))
  strategy = distribute.make_strategy(config.strategy, config.tpu)  # First: it may set up the runtime.
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  records = records_lib.load(config.records_dir)
  init_run = runs.load(config.init_from, 'init_from') if config.init_from else None
  weights = _resolve_weights(config, init_run)
  _check_config(config, input_config, weights, init_run, records)
  fingerprint = {**settings.fingerprint(config), **settings.fingerprint(input_config),
                 'records_created': records.manifest.get('created')}
  workdir = config.workdir
  if not _is_chief(strategy):
    # The others only read the chief's checkpoints. They stop too when the run is finished, rather
    # than wait in training steps for a chief that has returned.
    if config.resume and runs.is_finished(workdir):
      return {**runs.load(workdir, 'workdir').metadata, ALREADY_FINISHED: True}
    return _train(config, input_config, strategy, records, init_run, weights, chief=False)
  if tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
    raise TrainError(f'--workdir={workdir} is a file, not a folder')
  created = not tf.io.gfile.exists(workdir)
  tf.io.gfile.makedirs(workdir)
  with files.exclusive_writer(workdir, 'tfl-train', TrainError):
    try:
      if _prepare_workdir(config, fingerprint):
        return {**runs.load(workdir, 'workdir').metadata, ALREADY_FINISHED: True}
      return _train(config, input_config, strategy, records, init_run, weights, chief=True)
    except BaseException:
      # A start that failed before a checkpoint or a run.json leaves nothing worth resuming: a
      # folder it created would only look like a started run. A folder that was there is kept.
      if created and not _has_results(workdir):
        tf.io.gfile.rmtree(workdir)
      raise


def _has_results(workdir: str) -> bool:
  """Whether the workdir holds something worth keeping: a checkpoint or a run.json."""
  return runs.is_finished(workdir) or bool(
      tf.train.latest_checkpoint(files.join(workdir, 'checkpoints')))


def _train(config: TrainConfig, input_config: data.InputConfig, strategy, records, init_run,
           weights: str, chief: bool) -> dict:
  """Builds, trains and writes the run, in a prepared workdir (the chief's) or scratch folder."""
  write_dir = _write_dir(config.workdir, strategy)
  loss_scaling = distribute.set_precision(config.mixed_precision)
  jit_compile = distribute.resolve_jit_compile(config.jit_compile, strategy)
  keras.utils.set_random_seed(config.seed)

  with strategy.scope():
    built = backbones.build(config.backbone, input_config.image_size, weights)
    model, head = _build_models(config, records, built, input_config.image_size, init_run)
  features_head, train_fn, eval_fn = _input_functions(config, input_config, records, built, head)
  trained = features_head or model
  steps_per_epoch = config.steps_per_epoch or max(1, records.num_examples('train') //
                                                  config.batch_size)
  with strategy.scope():
    optimizer = make_optimizer(config, steps_per_epoch)
    optimizer = distribute.wrap_optimizer(optimizer, config.mixed_precision) if loss_scaling \
        else optimizer
    optimizer.build(trained.trainable_variables)
    step_counter = tf.Variable(0, dtype=tf.int64, trainable=False, name='step')
  # Random layers' (dropout's) generator states are variables outside the model's weights: saved
  # too, so that a resumed run draws the masks an uninterrupted one would.
  weight_ids = {id(weight) for weight in trained.weights}
  checkpoint = tf.train.Checkpoint(
      model=trained, optimizer=optimizer, step=step_counter,
      random_state=[v for v in trained.variables if id(v) not in weight_ids])
  history_path = files.join(config.workdir, 'history.json')
  history = []
  latest = tf.train.latest_checkpoint(files.join(config.workdir, 'checkpoints'))  # The chief's.
  if latest:
    checkpoint.restore(latest).assert_existing_objects_matched()
    if tf.io.gfile.exists(history_path):
      with tf.io.gfile.GFile(history_path) as f:
        history = json.load(f)
  # After a restart a --deterministic run's data stream passes over the batches already trained
  # on, to continue exactly; otherwise it is reseeded with the step, which continues the run's
  # distribution without replaying them (and without reading them again).
  done = int(step_counter.numpy())
  train_input = train_fn(config.seed, done) if config.deterministic else train_fn(
      config.seed + done, 0)
  loop = _Loop(config, strategy, records, trained, optimizer, checkpoint, step_counter, write_dir,
               chief, jit_compile, steps_per_epoch, history, history_path)
  eval_dataset = (strategy.distribute_datasets_from_function(eval_fn)
                  if records.num_examples('validation') else None)
  try:
    loop.run(iter(strategy.distribute_datasets_from_function(train_input)), eval_dataset)
  except TrainingDiverged as error:
    if chief:
      runs.write_failed(config.workdir, {
          'mode': config.mode.value, 'backbone': config.backbone, 'records_dir': records.path,
          'final': history[-1] if history else None,
          'settings': {**settings.as_dict(config), **settings.as_dict(input_config)}}, str(error))
    else:
      tf.io.gfile.rmtree(write_dir)
    raise
  if loop.best_manager.latest_checkpoint:  # The run's result is its best validation epoch.
    checkpoint.restore(loop.best_manager.latest_checkpoint).assert_existing_objects_matched()
  if not chief:
    tf.io.gfile.rmtree(write_dir)
  return _finish(config, input_config, records, model, head, built, weights, history, chief)


class _Loop:
  """Epochs of `--steps_per_call` steps, progress, validation, checkpoints (latest and best)."""

  def __init__(self, config: TrainConfig, strategy, records, trained, optimizer, checkpoint,
               step_counter, write_dir: str, chief: bool, jit_compile: bool, steps_per_epoch: int,
               history: list, history_path: str):
    self.config, self.strategy, self.records = config, strategy, records
    self.trained, self.optimizer, self.jit_compile = trained, optimizer, jit_compile
    self.checkpoint, self.step_counter = checkpoint, step_counter
    self.chief, self.steps_per_epoch = chief, steps_per_epoch
    self.history, self.history_path = history, history_path
    self.manager = tf.train.CheckpointManager(checkpoint, files.join(write_dir, 'checkpoints'),
                                              max_to_keep=config.keep_checkpoints)
    self.best_manager = tf.train.CheckpointManager(
        checkpoint, files.join(write_dir, 'checkpoints', 'best'), max_to_keep=1)
    self.writer = (tf.summary.create_file_writer(files.join(write_dir, 'tensorboard'))
                   if chief else None)
    self.multi_steps = {}  # One compiled loop per loss (LDAM re-weighting switches it once).
    self.evaluate = make_evaluator(strategy, trained)
    self.loss_bound = divergence_bound(records.num_classes)

  def _multi_step(self, epoch: int) -> Callable:
    config = self.config
    key = bool(config.loss == 'ldam' and config.drw_epoch and epoch >= config.drw_epoch)
    if key not in self.multi_steps:
      loss_fn = make_loss(config, self.records.class_counts, epoch)
      if config.triplet_weight > 0:
        loss_fn = _with_triplet(loss_fn, self.trained, config)
      self.multi_steps[key] = make_multi_step(self.strategy, make_train_step(
          self.trained, self.optimizer, loss_fn, config.batch_size, self.jit_compile))
    return self.multi_steps[key]

  def run(self, train_iterator, eval_dataset) -> None:
    start_step = int(self.step_counter.numpy())
    try:
      self._epochs(train_iterator, eval_dataset, start_step)
    except (KeyboardInterrupt, errors.Terminated):
      # Between two tf.function calls the state is consistent: keep what was trained so far.
      if int(self.step_counter.numpy()) > start_step:
        self.manager.save(checkpoint_number=int(self.step_counter.numpy()))
      raise

  def _epochs(self, train_iterator, eval_dataset, start_step: int) -> None:
    config, steps_per_epoch = self.config, self.steps_per_epoch
    total_steps = config.epochs * steps_per_epoch
    progress = _Progress(config.progress and self.chief, self.writer, total_steps, start_step)
    best = max((entry['validation']['top1'] for entry in self.history
                if entry.get('validation')), default=-1.0)
    step = start_step
    while step < total_steps:
      epoch = step // steps_per_epoch
      multi_step = self._multi_step(epoch)
      epoch_end = (epoch + 1) * steps_per_epoch
      totals = np.zeros(4)  # Σ step losses, correct, examples, steps
      tick, tick_step = time.monotonic(), step
      while step < epoch_end:
        count = min(config.steps_per_call, epoch_end - step,
                    config.log_every_steps - step % config.log_every_steps,
                    config.checkpoint_every_steps - step % config.checkpoint_every_steps)
        try:
          summed = multi_step(train_iterator, tf.constant(count)).numpy()
        except tf.errors.DataLossError:  # tf.data's message does not say which file.
          raise records_lib.RecordsError(
              records_lib.find_corrupt_shard(self.records.files('train'))) from None
        self._check_loss(summed[0], summed[3], step, count)
        totals += [summed[0], summed[1], summed[2], count]
        step += count
        self.step_counter.assign(step)
        if step % config.log_every_steps == 0 or step == epoch_end:
          seconds = time.monotonic() - tick
          progress.log(step, epoch, totals, float(self.optimizer.learning_rate.numpy()),
                       (step - tick_step) * config.batch_size / max(seconds, 1e-9))
          tick, tick_step = time.monotonic(), step
        if step % config.checkpoint_every_steps == 0 and step < epoch_end:
          self.manager.save(checkpoint_number=step)
      entry = {'epoch': epoch + 1, 'step': step, 'loss': totals[0] / max(totals[3], 1),
               'accuracy': totals[1] / max(totals[2], 1)}
      if eval_dataset is not None:
        entry['validation'] = self._validate(eval_dataset, epoch, step)
        if entry['validation']['top1'] > best:
          best = entry['validation']['top1']
          self.best_manager.save(checkpoint_number=step)
      self.history.append(entry)
      self.manager.save(checkpoint_number=step)
      if self.chief:
        files.write_atomically(self.history_path, json.dumps(self.history, indent=1))

  def _diverged(self, where: str, what: str) -> TrainingDiverged:
    """The one-line error; the weights are not saved (checkpoints hold only finite losses)."""
    kept = self.manager.latest_checkpoint
    kept = (f'the last good checkpoint (step {kept.rsplit("-", 1)[1]}) is kept' if kept else
            'no checkpoint was written')
    return TrainingDiverged(f'training diverged {where}: {what}; {kept}; lower --learning_rate')

  def _check_loss(self, total: float, worst: float, step: int, count: int) -> None:
    """Raises TrainingDiverged when a step of the last call had a non-finite or exploded loss."""
    if math.isfinite(total) and worst <= self.loss_bound:
      return
    where = f'at step {step + 1}' if count == 1 else f'in steps {step + 1}-{step + count}'
    what = (f'loss {total / count:.3g}' if not math.isfinite(total) else
            f'loss {worst:.3g}, above {self.loss_bound:.3g} ({DIVERGENCE_FACTOR:g} x ln of '
            f'{self.records.num_classes} classes)')
    raise self._diverged(where, what)

  def _validate(self, eval_dataset, epoch: int, step: int) -> Dict[str, float]:
    scores = self.evaluate(eval_dataset)
    non_finite = scores.pop('non_finite')
    if non_finite:
      raise self._diverged(f'by step {step}', f'the validation outputs of {non_finite} of '
                           f'{scores["examples"]} images are not finite')
    if self.writer is not None:
      with self.writer.as_default(step=step):
        for name in ('top1', 'top5', 'gap'):
          tf.summary.scalar(f'validation/{name}', scores[name])
    if self.config.progress and self.chief:
      print(f'epoch {epoch + 1}: validation top-1 {scores["top1"]:.3f} top-5 {scores["top5"]:.3f} '
            f'GAP {scores["gap"]:.3f} ({scores["examples"]} images)', flush=True)
    return scores


def _local_copy(path: str) -> str:
  """A local file with the contents of `path` (Keras loads weights from local files only)."""
  if not files.is_remote(path):
    return path
  local = os.path.join(tempfile.mkdtemp(prefix='tfl-weights-'), os.path.basename(path))
  tf.io.gfile.copy(path, local)
  return local


def _load_head_weights(head, path: str) -> None:
  """Sets the head's weights from a run's head.weights.npz.

  Raises:
    TrainError: the file is damaged (a v1 run's files are not checked on load) or does not fit.
  """
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      stored = np.load(io.BytesIO(f.read()))
      arrays = [stored[f'arr_{i}'] for i in range(len(stored.files))]
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise TrainError(f'{path} is damaged ({reason}); train that run again') from None
  expected = [tuple(w.shape) for w in head.get_weights()]
  if [tuple(a.shape) for a in arrays] != expected:
    raise TrainError(f'{path} does not fit this head (shapes {[a.shape for a in arrays]}, '
                     f'expected {expected})')
  head.set_weights(arrays)


def _with_triplet(loss_fn: Callable, trained, config: TrainConfig) -> Callable:
  """Adds the weighted triplet loss on the head's embeddings of the same batch."""
  head = trained.head if isinstance(trained, classifier.LandmarkClassifier) else trained
  embed = trained.embed if isinstance(trained, classifier.LandmarkClassifier) else head.embed

  def combined(labels, logits, inputs):
    hard = labels if labels.shape.rank == 1 else tf.argmax(labels, axis=-1, output_type=tf.int32)
    return loss_fn(labels, logits, inputs) + config.triplet_weight * losses.triplet_loss(
        hard, embed(inputs), config.triplet_margin, config.triplet_mining)

  return combined


def _weights_digest(model: keras.Model) -> str:
  """SHA-256 of the model's trainable weights in order: names what training produced. Equal on
  every worker of a multi-worker run (their updates are all-reduced; BatchNorm moving statistics,
  left out, follow each worker's own batches)."""
  digest = hashlib.sha256()
  for weight in model.trainable_weights:
    digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
  return digest.hexdigest()


def _run_metadata(config: TrainConfig, input_config: data.InputConfig,
                  records: records_lib.Records, model: keras.Model, head, built, weights: str,
                  history: list) -> dict:
  """What run.json records besides what `runs.write` (or `runs.write_failed`) adds: what was
  trained on what, from which weights, its scores and every setting."""
  return {
      'mode': config.mode.value, 'backbone': config.backbone, 'image_size': input_config.image_size,
      'preprocessing': backbones.get(config.backbone).preprocessing,
      'head': None if head is None else config.head,
      'head_config': None if head is None else head.get_config(),
      'delf': None if head is not None else {
          'stage': config.delf_stage, 'reduced_dim': config.delf_reduced_dim,
          'local_feature_layer': backbones.get(config.backbone).local_feature_layer},
      'loss': config.loss, 'num_classes': records.num_classes,
      'records_dir': records.path, 'weights': weights, 'weights_sha256': built.weights_sha256,
      'weights_source_sha256': built.source_sha256,
      'init_from': config.init_from,
      'trained_weights_digest': _weights_digest(model),
      'final': history[-1] if history else None,
      'best': max((e for e in history if e.get('validation')),
                  key=lambda e: e['validation']['top1'], default=None),
      'settings': {**settings.as_dict(config), **settings.as_dict(input_config)},
  }


def _finish(config: TrainConfig, input_config: data.InputConfig, records: records_lib.Records,
            model: keras.Model, head, built, weights: str, history: list,
            chief: bool) -> dict:
  """Writes the finished run through `runs.write` (the chief only); returns its description."""
  run = _run_metadata(config, input_config, records, model, head, built, weights, history)
  if not chief:
    return run
  parts = [(runs.MODEL_FILE, model.save), (runs.BACKBONE_WEIGHTS, built.model.save_weights)]
  parts.append((runs.DELF_WEIGHTS, model.save_weights) if head is None else
               (runs.HEAD_WEIGHTS, lambda path: np.savez(path, *head.get_weights())))
  return runs.write(config.workdir, run, parts, records.path)
