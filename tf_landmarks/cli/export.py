r"""tfl-export: a classifier run (+ its index and DELF run) → SavedModels for serving.

Examples:
  tfl-export --run=runs/demo_finetune --output_dir=exports/demo
  tfl-export --run=gs://b/runs/r50_finetune --index=gs://b/index/gldv2 \
      --output_dir=gs://b/exports/gldv2 --top_k=10

Writes classifier/1/ (TF Serving's layout: serving_default takes encoded image bytes and returns
the top-k original landmark ids and scores, with the preprocessing and the label map inside),
delf/1/ (DELF's extraction SavedModel, for a DELF index), index/ (a copy of the index) and
export.json (written last). Serve the classifier with TensorFlow Serving:

  docker run -p 8501:8501 -v "$PWD/exports/demo/classifier:/models/classifier" \
      -e MODEL_NAME=classifier tensorflow/serving
"""

from tf_landmarks import export
from tf_landmarks.cli import common

common.define_flags(export.ExportConfig)


def main() -> int:
  written = export.export(common.from_flags(export.ExportConfig))
  classifier = written.classifier
  print(f'Wrote {written.path}:')
  print(f'  {classifier.path}: {classifier.backbone} at {classifier.image_size} px, '
        f'{classifier.num_classes} landmarks, top {classifier.top_k} per image')
  if written.delf:
    print(f'  {written.delf.path}: DELF extraction (scales {list(written.delf.scales)}, PCA '
          f'{written.delf.pca})')
  if written.index:
    index = written.index
    print(f'  {index.path}: {index.images} images of {index.landmarks} landmarks, '
          f'{index.local_features} local features')
  else:
    print('  no index: verification and retrieval need one (tfl-build-index, then --index)')
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
