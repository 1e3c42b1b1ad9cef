"""Scoring Kaggle submissions as the Google Landmark challenges do, and the report on them.

`evaluate(EvaluateConfig)` is `tfl-evaluate` (see `tf_landmarks/cli/evaluate.py` for the command's
description): it reads the solutions and submissions (given, or found in a predictions folder,
`predictions.load`), prints the scores, and writes the report (`report.write_report`) with the
match pictures of the worst mistakes (`match_pictures`) and the scores' JSON when asked.
"""

import dataclasses
import json
import sys
from typing import Any, Dict, Optional

from tf_landmarks import errors
from tf_landmarks import files
from tf_landmarks import predictions
from tf_landmarks import records
from tf_landmarks import report
from tf_landmarks import submission
from tf_landmarks.settings import setting


@dataclasses.dataclass
class EvaluateConfig:
  """Everything `evaluate` needs; `tfl-evaluate` defines one flag per field."""
  recognition_submission: Optional[str] = setting(
      None, 'Recognition submission: id,landmarks with "<landmark_id> <confidence>" or empty. '
      'Default with --predictions_dir: its recognition.csv.')
  unverified_recognition_submission: Optional[str] = setting(
      None, 'The same queries scored by the first stage only (before local-feature '
      'verification), shown beside --recognition_submission. Default with --predictions_dir: its '
      'recognition_unverified.csv.')
  recognition_solution: Optional[str] = setting(
      None, 'Recognition solution: id,landmarks[,Usage] (space-separated landmark ids; empty for '
      'no landmark; Usage Public, Private or Ignored).')
  retrieval_submission: Optional[str] = setting(
      None, 'Retrieval submission: id,images with up to 100 index image ids, best first. Default '
      'with --predictions_dir and --retrieval_solution: its retrieval.csv.')
  retrieval_solution: Optional[str] = setting(
      None, 'Retrieval solution: id,images[,Usage] (the relevant index images; None for a query '
      'without any, which is Ignored).')
  predictions_dir: Optional[str] = setting(
      None, 'Output folder of the prediction command (predict.json, recognition.csv, '
      'recognition_unverified.csv, retrieval.csv): the default submissions and records folder; '
      'the report\'s mistakes get match pictures drawn from it.')
  records_dir: Optional[str] = setting(
      None, 'Records folder of the training set, for the report\'s class-frequency histogram and '
      'per-class training counts. Default with --predictions_dir: the one in its predict.json '
      '(left out with a note if it cannot be read).')
  report_dir: Optional[str] = setting(
      None, 'Write an HTML report here: index.html (written last) with the numbers, pictures, '
      'per-class table and worst mistakes, the PNGs beside it, and per_class.csv.')
  report_mistakes: int = setting(
      report.ReportLimits.mistakes, 'Wrong predictions listed in the report, the most confident '
      'first, each with its match picture.', lower=0)
  output_json: Optional[str] = setting(None, 'Also write the scores to this JSON file.')


def _drawer(predictions_dir, query_ids, notes):
  """The match-picture drawer of the mistakes `query_ids` of a predictions folder; None without a
  folder, where the picture module cannot be imported, or where the folder's export cannot be
  opened (noted)."""
  if not predictions_dir:
    return None
  try:
    # Imported here: scoring alone does not need the recognizer and the models it loads.
    from tf_landmarks import match_pictures  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    return match_pictures.drawer(predictions_dir, query_ids)
  except errors.UserError as error:
    # The scores come from the CSVs alone: an export moved or deleted since only costs the pictures.
    notes.append(f'match pictures left out: {error}')
    return None


def _train_class_counts(config, folder, notes):
  """landmark id → training images, from --records_dir or the predictions folder's records."""
  if config.records_dir:
    built = records.load(config.records_dir)
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
          f'queries {board_scores["accuracy_on_landmark_queries"]:.4f}; '
          f'{board_scores["predictions"]} '
          f'predictions for {board_scores["queries"]} queries ({board_scores["landmark_queries"]} '
          f'with a landmark, {board_scores["predictions_on_non_landmark_queries"]} predictions on '
          'queries without one)')
    if board == name:
      print(f'  per class: macro precision {macro["macro_precision"]:.4f}, recall '
            f'{macro["macro_recall"]:.4f}, F1 {macro["macro_f1"]:.4f} over '
            f'{macro["classes_with_test_queries"]} landmarks with test queries')
  return {**scores, 'per_class': macro}


def evaluate(config: EvaluateConfig) -> Dict[str, Any]:
  """Scores, prints and reports as the module docstring says.

  Returns:
    The scores (also written to --output_json).

  Raises:
    errors.UserError: missing or inconsistent settings, unreadable or malformed files.
  """
  folder = predictions.load(config.predictions_dir) if config.predictions_dir else None
  recognition_path = config.recognition_submission or (
      folder.recognition if folder and config.recognition_solution else None)
  unverified_path = config.unverified_recognition_submission or (
      folder.unverified_recognition if folder and recognition_path else None)
  retrieval_path = config.retrieval_submission or (
      folder.retrieval if folder and config.retrieval_solution else None)
  pairs = {'recognition': (recognition_path, config.recognition_solution),
           'retrieval': (retrieval_path, config.retrieval_solution)}
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
  if config.records_dir and not config.report_dir:
    raise errors.UserError('--records_dir is read for the report only: give --report_dir too')
  scores, notes, sources = {}, [], []
  recognition_truth = recognition = unverified = None
  if recognition_path:
    recognition_truth = submission.read_recognition_solution(config.recognition_solution)
    recognition = submission.read_recognition_submission(recognition_path, recognition_truth)
    sources += [('recognition solution', config.recognition_solution),
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
    retrieval_truth = submission.read_retrieval_solution(config.retrieval_solution)
    rankings = submission.read_retrieval_submission(retrieval_path, retrieval_truth)
    sources += [('retrieval solution', config.retrieval_solution),
                ('retrieval submission', retrieval_path)]
    scores['retrieval'] = submission.score_retrieval(rankings, retrieval_truth)
    for board, board_scores in (('retrieval', scores['retrieval']),
                                *scores['retrieval'].get('usage', {}).items()):
      print(f'{board if board == "retrieval" else "  " + board}: mAP@100 '
            f'{board_scores["map@100"]:.4f} over '
            f'{board_scores["queries_with_relevant_images"]} queries with relevant images')
    _print_ignored(retrieval_truth)
  if config.report_dir:
    train_counts = _train_class_counts(config, folder, notes)
    if train_counts is not None:
      sources.append(('records', config.records_dir or folder.records_dir))
    drawer = None
    if recognition is not None and config.report_mistakes:
      mistakes = report.worst_mistakes(recognition, recognition_truth, config.report_mistakes)
      drawer = _drawer(config.predictions_dir, [mistake.query_id for mistake in mistakes], notes)
    page = report.write_report(
        config.report_dir, recognition_solution=recognition_truth, recognition=recognition,
        first_stage_recognition=unverified, retrieval_solution=retrieval_truth,
        retrieval=rankings, train_class_counts=train_counts,
        draw_match=drawer, sources=sources, notes=notes,
        limits=report.ReportLimits(mistakes=config.report_mistakes))
    for note in notes:
      print(f'note: {note}', file=sys.stderr)
    print(f'report: {page}')
  if config.output_json:
    files.write_atomically(config.output_json, json.dumps(scores, indent=1))
  return scores
