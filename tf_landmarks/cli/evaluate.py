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

import json
import sys

from absl import flags

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import records
from tf_landmarks import report
from tf_landmarks import submission
from tf_landmarks.cli import common

_RECOGNITION_SUBMISSION = flags.DEFINE_string(
    'recognition_submission', None, 'Recognition submission: id,landmarks with "<landmark_id> '
    '<confidence>" or empty. Default with --predictions_dir: its recognition.csv.')
_UNVERIFIED_RECOGNITION_SUBMISSION = flags.DEFINE_string(
    'unverified_recognition_submission', None, 'The same queries scored by the first stage only '
    '(before local-feature verification), shown beside --recognition_submission. Default with '
    '--predictions_dir: its recognition_unverified.csv.')
_RECOGNITION_SOLUTION = flags.DEFINE_string(
    'recognition_solution', None, 'Recognition solution: id,landmarks[,Usage] (space-separated '
    'landmark ids; empty for no landmark; Usage Public, Private or Ignored).')
_RETRIEVAL_SUBMISSION = flags.DEFINE_string(
    'retrieval_submission', None, 'Retrieval submission: id,images with up to 100 index image '
    'ids, best first. Default with --predictions_dir and --retrieval_solution: its retrieval.csv.')
_RETRIEVAL_SOLUTION = flags.DEFINE_string(
    'retrieval_solution', None, 'Retrieval solution: id,images[,Usage] (the relevant index images; '
    'None for a query without any, which is Ignored).')
_PREDICTIONS_DIR = flags.DEFINE_string(
    'predictions_dir', None, 'Output folder of the prediction command (predict.json, '
    'recognition.csv, recognition_unverified.csv, retrieval.csv): the default submissions and '
    'records folder; the report\'s mistakes get match pictures drawn from it.')
_RECORDS_DIR = flags.DEFINE_string(
    'records_dir', None, 'Records folder of the training set, for the report\'s class-frequency '
    'histogram and per-class training counts. Default with --predictions_dir: the one in its '
    'predict.json (left out with a note if it cannot be read).')
_REPORT_DIR = flags.DEFINE_string(
    'report_dir', None, 'Write an HTML report here: index.html (written last) with the numbers, '
    'pictures, per-class table and worst mistakes, the PNGs beside it, and per_class.csv.')
_REPORT_MISTAKES = flags.DEFINE_integer(
    'report_mistakes', report.ReportLimits.mistakes, 'Wrong predictions listed in the report, the '
    'most confident first, each with its match picture.', lower_bound=0)
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Also write the scores to this JSON file.')


def _drawer(predictions_dir, notes):
  """The match-picture drawer of a predictions folder; None without a folder, where the prediction
  module cannot be imported, or where the folder's export cannot be opened (noted)."""
  if not predictions_dir:
    return None
  try:
    # Imported here: scoring alone does not need the prediction module and the models it loads.
    from tf_landmarks import predict  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    return predict.match_drawer(predictions_dir)
  except errors.UserError as error:
    # The scores come from the CSVs alone: an export moved or deleted since only costs the pictures.
    notes.append(f'match pictures left out: {error}')
    return None


def _train_class_counts(folder, notes):
  """landmark id → training images, from --records_dir or the predictions folder's records."""
  if _RECORDS_DIR.value:
    built = records.load(_RECORDS_DIR.value)
  elif folder and folder.records_dir:
    try:
      built = records.load(folder.records_dir)
    except errors.UserError as error:
      # Only a default: the prediction may have run where its records folder lives.
      notes.append(f'class-frequency histogram left out: {error}')
      return None
  else:
    return None
  return dict(zip(built.landmark_ids, built.class_counts))


def _print_ignored(solution):
  """Says how many test images the solution lists without scoring them (its Ignored rows)."""
  if solution.ignored:
    print(f'  {len(solution.ignored)} Ignored queries are not scored')


def _print_recognition(name, scores, per_class):
  """Prints the scores of all scored queries, their per-class means, then each leaderboard's."""
  macro = per_class.macro_averages()
  for board, board_scores in ((name, scores), *scores.get('usage', {}).items()):
    print(f'{board if board == name else "  " + board}: GAP {board_scores["gap"]:.4f} (landmark '
          f'queries only {board_scores["gap_landmark_queries_only"]:.4f}), accuracy on landmark '
          f'queries {board_scores["accuracy_on_landmark_queries"]:.4f}; {board_scores["predictions"]} '
          f'predictions for {board_scores["queries"]} queries ({board_scores["landmark_queries"]} '
          f'with a landmark, {board_scores["predictions_on_non_landmark_queries"]} predictions on '
          'queries without one)')
    if board == name:
      print(f'  per class: macro precision {macro["macro_precision"]:.4f}, recall '
            f'{macro["macro_recall"]:.4f}, F1 {macro["macro_f1"]:.4f} over '
            f'{macro["classes_with_test_queries"]} landmarks with test queries')
  return {**scores, 'per_class': macro}


def main() -> int:
  folder = (submission.open_predictions_folder(_PREDICTIONS_DIR.value)
            if _PREDICTIONS_DIR.value else None)
  recognition_path = _RECOGNITION_SUBMISSION.value or (
      folder.recognition if folder and _RECOGNITION_SOLUTION.value else None)
  unverified_path = _UNVERIFIED_RECOGNITION_SUBMISSION.value or (
      folder.unverified_recognition if folder and recognition_path else None)
  retrieval_path = _RETRIEVAL_SUBMISSION.value or (
      folder.retrieval if folder and _RETRIEVAL_SOLUTION.value else None)
  pairs = {'recognition': (recognition_path, _RECOGNITION_SOLUTION.value),
           'retrieval': (retrieval_path, _RETRIEVAL_SOLUTION.value)}
  for task, (submitted, solution) in pairs.items():
    if bool(submitted) != bool(solution):
      where = f' (or --predictions_dir holding {task}.csv)' if not submitted else ''
      raise errors.UserError(f'give both --{task}_submission{where} and --{task}_solution')
  if not any(submitted for submitted, _ in pairs.values()):
    raise errors.UserError('give --recognition_submission and --recognition_solution, and/or the '
                           'retrieval pair (or --predictions_dir and the solutions)')
  if unverified_path and not recognition_path:
    raise errors.UserError('--unverified_recognition_submission is scored beside '
                           '--recognition_submission: give that and --recognition_solution too')
  if _RECORDS_DIR.value and not _REPORT_DIR.value:
    raise errors.UserError('--records_dir is read for the report only: give --report_dir too')
  scores, notes, sources = {}, [], []
  recognition_truth = recognition = unverified = None
  if recognition_path:
    recognition_truth = submission.read_recognition_solution(_RECOGNITION_SOLUTION.value)
    recognition = submission.read_recognition_submission(recognition_path, recognition_truth)
    sources += [('recognition solution', _RECOGNITION_SOLUTION.value),
                ('recognition submission', recognition_path)]
    if unverified_path:
      unverified = submission.read_recognition_submission(unverified_path, recognition_truth)
      sources.append(('first-stage recognition submission', unverified_path))
      stage = f'first stage ({folder.first_stage}) only' if folder and folder.first_stage \
          else 'first stage only'
      scores['recognition_first_stage'] = _print_recognition(
          f'recognition, {stage}',
          submission.score_recognition(unverified, recognition_truth),
          submission.per_class_recognition(unverified, recognition_truth))
    scores['recognition'] = _print_recognition(
        'recognition', submission.score_recognition(recognition, recognition_truth),
        submission.per_class_recognition(recognition, recognition_truth))
    _print_ignored(recognition_truth)
    if unverified_path:
      before, after = scores['recognition_first_stage'], scores['recognition']
      print(f'recognition GAP: {stage} {before["gap"]:.4f} → verified '
            f'{after["gap"]:.4f} (landmark queries only {before["gap_landmark_queries_only"]:.4f} '
            f'→ {after["gap_landmark_queries_only"]:.4f})')
  retrieval_truth = rankings = None
  if retrieval_path:
    retrieval_truth = submission.read_retrieval_solution(_RETRIEVAL_SOLUTION.value)
    rankings = submission.read_retrieval_submission(retrieval_path, retrieval_truth)
    sources += [('retrieval solution', _RETRIEVAL_SOLUTION.value),
                ('retrieval submission', retrieval_path)]
    scores['retrieval'] = submission.score_retrieval(rankings, retrieval_truth)
    for board, board_scores in (('retrieval', scores['retrieval']),
                                *scores['retrieval'].get('usage', {}).items()):
      print(f'{board if board == "retrieval" else "  " + board}: mAP@100 '
            f'{board_scores["map@100"]:.4f} over '
            f'{board_scores["queries_with_relevant_images"]} queries with relevant images')
    _print_ignored(retrieval_truth)
  if _REPORT_DIR.value:
    train_counts = _train_class_counts(folder, notes)
    if train_counts is not None:
      sources.append(('records', _RECORDS_DIR.value or folder.records_dir))
    drawer = _drawer(_PREDICTIONS_DIR.value, notes) \
        if recognition is not None and _REPORT_MISTAKES.value else None
    page = report.write_report(
        _REPORT_DIR.value, recognition_solution=recognition_truth, recognition=recognition,
        first_stage_recognition=unverified, retrieval_solution=retrieval_truth,
        retrieval=rankings, train_class_counts=train_counts,
        draw_match=drawer, sources=sources, notes=notes,
        limits=report.ReportLimits(mistakes=_REPORT_MISTAKES.value))
    for note in notes:
      print(f'note: {note}', file=sys.stderr)
    print(f'report: {page}')
  if _OUTPUT_JSON.value:
    files.write_atomically(_OUTPUT_JSON.value, json.dumps(scores, indent=1))
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
