r"""tfl-predict: recognise and retrieve landmarks in test photos with an export (tfl-export).

Examples:
  tfl-predict --export=exports/demo --output_dir=predictions/demo
  tfl-predict --export=exports/real --test_csv=../shared/data/landmarks-real/test.csv \
      --image_dir=../shared/data/landmarks-real/images --verify_top_k=8 \
      --output_dir=predictions/real
  tfl-predict --export=gs://b/exports/gldv2 --test_records=gs://b/records/gldv2_test \
      --first_stage=knn --output_dir=gs://b/predictions/gldv2
  tfl-predict --export=exports/demo --output_dir=predictions/demo_beam --runner=beam \
      --beam_pipeline_options=--direct_num_workers=2,--direct_running_mode=multi_processing

Classifies each query (or looks up its nearest index images, --first_stage), verifies the best
landmarks with local features and RANSAC against their index images, and writes recognition.csv
and retrieval.csv (Kaggle's formats), recognition_unverified.csv (first stage only, for
comparison), predictions.jsonl (everything about each query) and predict.log (per-query timing).
Re-running the same command continues where an interrupted run stopped.
"""

from tf_landmarks import predict
from tf_landmarks import recognizer
from tf_landmarks.cli import common

common.define_flags(predict.PredictConfig)
common.define_flags(recognizer.RecognizerSettings)


def main() -> int:
  result = predict.predict(common.from_flags(predict.PredictConfig),
                           common.from_flags(recognizer.RecognizerSettings))
  counts, seconds = result['counts'], result['seconds_per_query']
  output_dir = common.FLAGS.output_dir
  print(f'Wrote {output_dir}: {counts["queries"]} queries, {counts["predictions"]} predictions '
        f'({counts["verified"]} verified), {counts["unusable"]} unusable images')
  print(f'  per query: median {seconds["median"] * 1000:.0f} ms, 90th percentile '
        f'{seconds["p90"] * 1000:.0f} ms (predict.log has each query)' +
        (f'; this run: {seconds["wall"] * 1000:.0f} ms of wall time per query'
         if seconds['wall'] is not None else ''))
  for kind, name in result['submissions'].items():
    if name:
      print(f'  {kind}: {output_dir}/{name}')
  return 0


def run():
  common.run(main, resume_hint=common.RERUN)


if __name__ == '__main__':
  run()
