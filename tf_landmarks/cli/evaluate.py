r"""tfl-evaluate: scores Kaggle submissions as the Google Landmark challenges do.

Examples:
  tfl-evaluate --recognition_submission=submission.csv \
      --recognition_solution=data/synthetic/recognition_solution.csv
  tfl-evaluate --retrieval_submission=retrieval.csv \
      --retrieval_solution=../shared/data/landmarks-real/retrieval_solution.csv

Recognition: GAP (predictions on queries without a landmark count as wrong, as on Kaggle), GAP over
landmark queries only, and accuracy on landmark queries. Retrieval: mAP@100. A malformed or unknown
row is reported with its line number and nothing is scored.
"""

import json

from absl import flags

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import submission
from tf_landmarks.cli import common

_RECOGNITION_SUBMISSION = flags.DEFINE_string(
    'recognition_submission', None, 'Recognition submission: id,landmarks with "<landmark_id> '
    '<confidence>" or empty.')
_RECOGNITION_SOLUTION = flags.DEFINE_string(
    'recognition_solution', None, 'Recognition solution: id,landmarks[,Usage] (space-separated '
    'landmark ids; empty for no landmark).')
_RETRIEVAL_SUBMISSION = flags.DEFINE_string(
    'retrieval_submission', None, 'Retrieval submission: id,images with up to 100 index image '
    'ids, best first.')
_RETRIEVAL_SOLUTION = flags.DEFINE_string(
    'retrieval_solution', None, 'Retrieval solution: id,images[,Usage] (the relevant index images).')
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Also write the scores to this JSON file.')


def main() -> int:
  scores = {}
  pairs = {'recognition': (_RECOGNITION_SUBMISSION.value, _RECOGNITION_SOLUTION.value),
           'retrieval': (_RETRIEVAL_SUBMISSION.value, _RETRIEVAL_SOLUTION.value)}
  for task, (submitted, solution) in pairs.items():
    if bool(submitted) != bool(solution):
      raise errors.UserError(f'give both --{task}_submission and --{task}_solution')
  if not any(submitted for submitted, _ in pairs.values()):
    raise errors.UserError('give --recognition_submission and --recognition_solution, and/or the '
                           'retrieval pair')
  if _RECOGNITION_SUBMISSION.value:
    truth = submission.read_recognition_solution(_RECOGNITION_SOLUTION.value)
    predictions = submission.read_recognition_submission(_RECOGNITION_SUBMISSION.value, truth)
    scores['recognition'] = submission.score_recognition(predictions, truth)
    r = scores['recognition']
    print(f'recognition: GAP {r["gap"]:.4f} (landmark queries only '
          f'{r["gap_landmark_queries_only"]:.4f}), accuracy on landmark queries {r["accuracy_on_landmark_queries"]:.4f}; '
          f'{r["predictions"]} predictions for {r["queries"]} queries '
          f'({r["landmark_queries"]} with a landmark, {r["predictions_on_non_landmark_queries"]} '
          'predictions on queries without one)')
  if _RETRIEVAL_SUBMISSION.value:
    truth = submission.read_retrieval_solution(_RETRIEVAL_SOLUTION.value)
    rankings = submission.read_retrieval_submission(_RETRIEVAL_SUBMISSION.value, truth)
    scores['retrieval'] = submission.score_retrieval(rankings, truth)
    print(f'retrieval: mAP@100 {scores["retrieval"]["map@100"]:.4f} over '
          f'{scores["retrieval"]["queries_with_relevant_images"]} queries with relevant images')
  if _OUTPUT_JSON.value:
    files.write_atomically(_OUTPUT_JSON.value, json.dumps(scores, indent=1))
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
