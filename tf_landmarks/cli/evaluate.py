r"""tfl-evaluate: scores Kaggle submissions as the Google Landmark challenges do, and reports on them.

Examples:
  tfl-evaluate --recognition_submission=submission.csv \
      --recognition_solution=data/synthetic/recognition_solution.csv
  tfl-evaluate --retrieval_submission=retrieval.csv \
      --retrieval_solution=../shared/data/landmarks-real/retrieval_solution.csv
  tfl-evaluate --predictions_dir=predictions/demo \
      --recognition_solution=data/synthetic/recognition_solution.csv \
      --retrieval_solution=data/synthetic/retrieval_solution.csv --report_dir=report

Solutions are read as Google's scoring code reads them: the scores are of all the scored queries
and, for a solution with a Usage column, of the Public and the Private ones apart (Kaggle's two
leaderboards); Ignored queries are not scored. Recognition: GAP (predictions on queries without a
landmark count as wrong, as on Kaggle), GAP over landmark queries only, accuracy on landmark
queries, and per-class precision, recall and F1 (macro averages printed; every class in the
report). Retrieval: mAP@100 (rows for queries the solution does not score are left out). A
malformed row, or a recognition row for a query the solution does not list, is reported with its
line number and nothing is scored. --report_dir writes index.html with the
numbers, the class-frequency histogram, the confusion matrix, the precision-recall curve(s) and the
most confident mistakes with their match pictures (left out, with a note saying why, when the
export named in the predictions folder cannot be opened).
"""

from tf_landmarks import evaluation
from tf_landmarks.cli import common

common.define_flags(evaluation.EvaluateConfig)


def main() -> int:
  evaluation.evaluate(common.from_flags(evaluation.EvaluateConfig))
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
