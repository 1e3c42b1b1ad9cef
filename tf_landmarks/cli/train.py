r"""tfl-train: trains a landmark classifier from a records folder into a run folder.

Examples:
  tfl-train --flagfile=configs/smoke.flags --records_dir=records/synthetic --workdir=runs/smoke
  tfl-train --flagfile=configs/resnet50_bottleneck.flags --records_dir=gs://b/records/gldv2 \
      --workdir=gs://b/runs/r50_bottleneck
  tfl-train --flagfile=configs/resnet50_finetune.flags --records_dir=gs://b/records/gldv2 \
      --init_from=gs://b/runs/r50_bottleneck --workdir=gs://b/runs/r50_finetune

Modes: scratch (everything trained), bottleneck (frozen base, cached features, the head trained),
finetune (a bottleneck run's head, upper blocks unfrozen). The run folder gets checkpoints,
TensorBoard logs, model.keras, the weights, a copy of the label map and run.json. An interrupted run
(Ctrl-C, SIGTERM, a killed process) continues with --resume; --resume of a finished run does
nothing.
"""

from tf_landmarks import data
from tf_landmarks import train
from tf_landmarks.cli import common

common.define_flags(train.TrainConfig)
common.define_flags(data.InputConfig)


def main() -> int:
  run = train.train(common.from_flags(train.TrainConfig), common.from_flags(data.InputConfig))
  if run.get(train.ALREADY_FINISHED):
    print(f'{common.FLAGS.workdir} holds a finished run: nothing to resume, left as it is')
    return 0
  best, final = run['best'], run['final']
  top = run['head'] or f'DELF {run["delf"]["stage"]} stage'
  print(f'Wrote {common.FLAGS.workdir}: {run["mode"]} {run["backbone"]} + {top}, '
        f'{run["num_classes"]} classes')
  if final:
    print(f'  last epoch {final["epoch"]}: train loss {final["loss"]:.4f}, accuracy '
          f'{final["accuracy"]:.3f}')
  if best:
    v = best['validation']
    print(f'  best validation (epoch {best["epoch"]}, kept): top-1 {v["top1"]:.3f}, top-5 '
          f'{v["top5"]:.3f}, GAP {v["gap"]:.3f}')
  return 0


def run():
  common.run(main, resume_hint=common.RESUME)


if __name__ == '__main__':
  run()
