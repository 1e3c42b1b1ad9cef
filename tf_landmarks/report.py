"""The evaluation report: `<report_dir>/index.html` with the scores, the pictures and the worst mistakes.

The page is self-contained apart from the PNGs beside it (no external CSS, scripts or fonts: it must
render offline). Every id comes from untrusted files, so every string is HTML-escaped, and pictures
are named by position (`mistake-003.png`), never by id. index.html is removed first and written
last, so a folder with an index.html holds a complete report. Also written: `per_class.csv`, the
per-class scores of every landmark (the page shows only the most involved ones).
"""

import dataclasses
import datetime
import html
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import tensorflow as tf

from tf_landmarks import files
from tf_landmarks import plots
from tf_landmarks import submission

INDEX = 'index.html'
PER_CLASS_CSV = 'per_class.csv'
CLASS_FREQUENCY_PNG = 'class_frequency.png'
CONFUSION_PNG = 'confusion_matrix.png'
PRECISION_RECALL_PNG = 'precision_recall.png'
_MISTAKE_PNG = 'mistake-{:03d}.png'

# draw_match(query_id, landmark_id, png_path) → a caption for the picture it wrote, or None if it
# could not draw one.
DrawMatch = Callable[[str, int, str], Optional[str]]

Predictions = Mapping[str, submission.Prediction]


@dataclasses.dataclass(frozen=True)
class ReportLimits:
  """How much of a large evaluation the page shows (200k classes do not fit on a page).

  Attributes:
    mistakes: wrong predictions listed (the most confident first), each with a match picture;
      0 leaves the section out.
    classes: rows of the per-class table (all classes are in per_class.csv).
    confusion_classes: landmarks with a row and column in the confusion matrix.
  """
  mistakes: int = 20
  classes: int = 50
  confusion_classes: int = 15


@dataclasses.dataclass(frozen=True)
class Mistake:
  """A wrong prediction: a landmark the query does not show (or a query showing none)."""
  query_id: str
  predicted: int
  confidence: float
  truth: FrozenSet[int]


def worst_mistakes(predictions: Predictions, solution: Mapping[str, FrozenSet[int]],
                   limit: int) -> List[Mistake]:
  """The `limit` wrong predictions with the highest confidence (ties in `predictions` order)."""
  wrong = [Mistake(query, prediction[0], prediction[1], solution[query])
           for query, prediction in predictions.items()
           if prediction is not None and prediction[0] not in solution[query]]
  return sorted(wrong, key=lambda mistake: -mistake.confidence)[:limit]


def _e(value) -> str:
  return html.escape(str(value), quote=True)


def _number(value: float) -> str:
  return f'{value:.4f}'


def _landmarks(landmarks: FrozenSet[int]) -> str:
  return ' '.join(str(landmark) for landmark in sorted(landmarks)) or 'none (no landmark)'


_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif;
       margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.8em; }
.meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #d5d5d5; padding: 0.25em 0.6em; text-align: left; }
th { background: #f1f3f6; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.headline td.n { font-size: 1.1em; font-weight: 600; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #e3e3e3; }
figcaption { color: #555; font-size: 0.9em; }
.figures { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.figures figure { flex: 1 1 460px; }
.mistakes { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 0.8em; }
.mistake { border: 1px solid #e0e0e0; border-radius: 4px; padding: 0.6em 0.8em; }
.mistake .what { font-weight: 600; }
.mistake img { max-width: 100%; display: block; margin-top: 0.4em; }
code { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 0.92em;
       background: #f4f4f4; padding: 0 0.2em; word-break: break-all; }
.note { color: #7a4b00; }
"""


def _scores_table(columns: Sequence[Tuple[str, Dict[str, float],
                                          submission.PerClassRecognition]]) -> str:
  """The recognition numbers, one column per submission (first stage only, verified)."""
  rows = [('GAP (Kaggle: predictions on non-landmark queries count as wrong)', 'gap', _number),
          ('GAP over landmark queries only', 'gap_landmark_queries_only', _number),
          ('accuracy on landmark queries', 'accuracy_on_landmark_queries', _number),
          ('macro precision (classes with test queries)', 'macro_precision', _number),
          ('macro recall', 'macro_recall', _number),
          ('macro F1', 'macro_f1', _number),
          ('predictions', 'predictions', str),
          ('predictions on non-landmark queries', 'predictions_on_non_landmark_queries', str),
          ('landmarks predicted', 'classes_predicted', str)]
  header = ''.join(f'<th>{_e(name)}</th>' for name, _, _ in columns)
  numbers = [{**scores, **per_class.macro_averages()} for _, scores, per_class in columns]
  body = []
  for index, (label, key, show) in enumerate(rows):
    cells = ''.join(f'<td class="n">{_e(show(column[key]))}</td>' for column in numbers)
    css = ' class="headline"' if index < 3 else ''
    body.append(f'<tr{css}><th>{_e(label)}</th>{cells}</tr>')
  return f'<table><tr><th>recognition</th>{header}</tr>{"".join(body)}</table>'


def _leaderboard_table(task: str, columns: Sequence[Tuple[str, Dict[str, Any]]],
                       rows: Sequence[Tuple[str, str, Callable[[Any], str]]]) -> str:
  """The scores of all scored queries and of Kaggle's Public and Private leaderboards apart (the
  solution's Usage), one column per submission of one solution; '' for a solution without Usage."""
  boards = list(columns[-1][1].get('usage', {}))
  if not boards:
    return ''
  header = ''.join(f'<th>{_e(name)}</th>' for name, _ in columns)
  body = []
  for label, key, show in rows:
    for board in ('all', *boards):
      cells = ''.join(
          f'<td class="n">{_e(show((scores if board == "all" else scores["usage"][board])[key]))}'
          '</td>' for _, scores in columns)
      body.append(f'<tr><th>{_e(label)}, {_e(board)}</th>{cells}</tr>')
  return ('<p>Kaggle\'s leaderboards, from the solution\'s Usage: "all" is the Public and Private '
          'queries together; Ignored queries are not scored.</p>'
          f'<table><tr><th>{_e(task)}</th>{header}</tr>{"".join(body)}</table>')


def _per_class_rows(per_class: submission.PerClassRecognition,
                    train_counts: Optional[Mapping[int, int]]) -> List[Tuple]:
  """Every landmark's row, most involved first: its test queries plus its wrong predictions."""
  scores = per_class.scores
  rows = []
  for i, landmark in enumerate(per_class.landmark_ids.tolist()):
    train = '' if train_counts is None else train_counts.get(landmark, 0)
    rows.append((landmark, int(scores.support[i]), int(per_class.predicted[i]),
                 int(per_class.correct[i]), float(scores.precision[i]), float(scores.recall[i]),
                 float(scores.f1[i]), train))
  return sorted(rows, key=lambda row: (-(row[1] + row[2] - row[3]), row[0]))


_PER_CLASS_COLUMNS = ('landmark_id', 'test_queries', 'predictions', 'correct', 'precision',
                      'recall', 'f1', 'train_images')


def _per_class_cells(row: Tuple) -> List[str]:
  landmark, queries, predictions, correct, precision, recall, f1, train = row
  # Undefined ratios (0 in the CSV, as metrics defines them) read as a dash, not as a failure.
  return [str(landmark), str(queries), str(predictions), str(correct),
          _number(precision) if predictions else '–', _number(recall) if queries else '–',
          _number(f1) if queries and predictions else '–', str(train)]


def _per_class_table(rows: Sequence[Tuple], limit: int) -> str:
  header = ''.join(f'<th>{_e(name.replace("_", " "))}</th>' for name in _PER_CLASS_COLUMNS)
  body = ''.join('<tr>' + ''.join(f'<td class="n">{_e(cell)}</td>' for cell in _per_class_cells(row))
                 + '</tr>' for row in rows[:limit])
  shown = min(limit, len(rows))
  return (f'<p>The {shown} of {len(rows)} landmarks involved in the most queries (their test '
          f'queries plus their wrong predictions); every landmark is in '
          f'<a href="{PER_CLASS_CSV}">{PER_CLASS_CSV}</a>. Every prediction counts, whatever its '
          f'confidence; a prediction on a query without a landmark is a false positive of the '
          f'predicted landmark.</p><table><tr>{header}</tr>{body}</table>')


def _mistakes_section(mistakes: Sequence[Mistake], report_dir: str,
                      draw_match: Optional[DrawMatch],
                      train_counts: Optional[Mapping[int, int]]) -> str:
  if not mistakes:
    return '<p>No wrong predictions.</p>'
  parts = [f'<p>The {len(mistakes)} wrong predictions with the highest confidence'
           + ('' if draw_match else ' (no match pictures: no drawer was given)') + '.</p>'
           '<div class="mistakes">']
  for rank, mistake in enumerate(mistakes, start=1):
    picture = ''
    if draw_match is not None:
      name = _MISTAKE_PNG.format(rank)
      path = files.join(report_dir, name)
      caption = draw_match(mistake.query_id, mistake.predicted, path)
      if caption is not None and tf.io.gfile.exists(path):
        picture = (f'<figure><img src="{name}" alt="match picture of query '
                   f'{_e(mistake.query_id)} and landmark {_e(mistake.predicted)}">'
                   f'<figcaption>{_e(caption)}</figcaption></figure>')
      else:
        # Only pictures the page shows stay in the folder.
        if tf.io.gfile.exists(path):
          tf.io.gfile.remove(path)
        picture = '<p class="meta">no match picture could be drawn</p>'
    train = ('' if train_counts is None else
             f' ({train_counts.get(mistake.predicted, 0)} training images)')
    kind = ('prediction on a query without a landmark' if not mistake.truth
            else 'wrong landmark')
    parts.append(
        f'<div class="mistake"><div class="what">{rank}. query <code>{_e(mistake.query_id)}</code>: '
        f'{_e(kind)}</div><div>predicted landmark {_e(mistake.predicted)}{_e(train)} with '
        f'confidence {_e(f"{mistake.confidence:.4g}")}; the query shows '
        f'{_e(_landmarks(mistake.truth))}</div>{picture}</div>')
  return ''.join(parts) + '</div>'


def _figure(name: str, caption: str) -> str:
  return (f'<figure><img src="{name}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption>'
          '</figure>')


def _remove_previous_report(report_dir: str) -> None:
  # index.html goes first: from here until the new one is written the folder is not a report.
  for path in [files.join(report_dir, INDEX),
               *tf.io.gfile.glob(files.join(report_dir, 'mistake-*.png'))]:
    if tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)


def write_report(report_dir: str, *,
                 recognition_solution: Optional[Mapping[str, FrozenSet[int]]] = None,
                 recognition: Optional[Predictions] = None,
                 first_stage_recognition: Optional[Predictions] = None,
                 retrieval_solution: Optional[Mapping[str, Sequence[str]]] = None,
                 retrieval: Optional[Mapping[str, Sequence[str]]] = None,
                 train_class_counts: Optional[Mapping[int, int]] = None,
                 draw_match: Optional[DrawMatch] = None,
                 sources: Sequence[Tuple[str, str]] = (),
                 notes: Sequence[str] = (),
                 limits: ReportLimits = ReportLimits()) -> str:
  """Writes `<report_dir>/index.html` with its pictures and per_class.csv; returns the page's path.

  Args:
    report_dir: the folder (created if needed; a previous report there is replaced).
    recognition_solution: query id → its landmark ids; with `recognition`, the recognition part.
      A `submission.Solution` with Usage adds the Public and Private scores apart.
    recognition: the (verified) recognition submission: query id → (landmark id, confidence) or
      None. Per-class scores, the confusion matrix and the mistakes are of this one.
    first_stage_recognition: the same queries before verification, scored and drawn beside it.
    retrieval_solution: query id → relevant index image ids; with `retrieval`, the mAP@100 (also
      of the Public and Private queries apart, as for recognition).
    retrieval: query id → index image ids, best first.
    train_class_counts: landmark id → training images (for the class-frequency histogram and the
      tables), e.g. from `records.load(path)`.
    draw_match: draws the match picture of a mistake (see `DrawMatch`); None lists mistakes
      without pictures.
    sources: (what, path) of the inputs, listed at the top.
    notes: remarks for the reader (e.g. a picture left out and why).
    limits: how much of a large evaluation the page shows.

  Raises:
    ValueError: a solution is given without its submission or the other way round.
    submission.SubmissionError: a recognition solution without landmark queries.
  """
  if (recognition is None) != (recognition_solution is None) or (
      retrieval is None) != (retrieval_solution is None):
    raise ValueError('give each submission together with its solution')
  if first_stage_recognition is not None and recognition is None:
    raise ValueError('a first-stage submission needs the verified one beside it')
  tf.io.gfile.makedirs(report_dir)
  _remove_previous_report(report_dir)
  generated = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  body = [f'<h1>Landmark recognition and retrieval: evaluation</h1>'
          f'<p class="meta">written {_e(generated)} by tfl-evaluate</p>']
  if sources:
    body.append('<ul class="meta">' + ''.join(f'<li>{_e(what)}: <code>{_e(path)}</code></li>'
                                              for what, path in sources) + '</ul>')
  body.extend(f'<p class="note">{_e(note)}</p>' for note in notes)
  figures = []
  if train_class_counts:
    plots.class_frequency_histogram(list(train_class_counts.values()),
                                    files.join(report_dir, CLASS_FREQUENCY_PNG))
    figures.append(_figure(CLASS_FREQUENCY_PNG, 'Training images per class (log–log): the '
                           'long tail the classifier learns from.'))
  if recognition is not None:
    named = ({'first stage only': first_stage_recognition, 'verified': recognition}
             if first_stage_recognition is not None else {'submission': recognition})
    columns = [(name, submission.score_recognition(predictions, recognition_solution),
                submission.per_class_recognition(predictions, recognition_solution))
               for name, predictions in named.items()]
    _, scores, per_class = columns[-1]
    body.append('<h2>Recognition</h2>'
                f'<p>{scores["queries"]} queries, {scores["landmark_queries"]} of them showing a '
                f'landmark.</p>' + _scores_table(columns) + _leaderboard_table(
                    'recognition', [(name, scores) for name, scores, _ in columns],
                    [('GAP', 'gap', _number),
                     ('GAP over landmark queries only', 'gap_landmark_queries_only', _number),
                     ('accuracy on landmark queries', 'accuracy_on_landmark_queries', _number),
                     ('queries', 'queries', str)]))
    plots.precision_recall_curve(named, recognition_solution,
                                 files.join(report_dir, PRECISION_RECALL_PNG))
    figures.append(_figure(PRECISION_RECALL_PNG, 'Precision–recall of the recognition '
                           'predictions ranked by confidence; the area under the steps is the GAP.'))
    plots.confusion_matrix(recognition, recognition_solution, files.join(report_dir, CONFUSION_PNG),
                           limits.confusion_classes)
    figures.append(_figure(CONFUSION_PNG, 'Confusion matrix of the most frequent test landmarks, '
                           'rows normalised ("other": any other landmark; "none": no landmark in '
                           'the query, or no prediction).'))
  if retrieval is not None:
    retrieval_scores = submission.score_retrieval(retrieval, retrieval_solution)
    body.append('<h2>Retrieval</h2><table class="headline"><tr><th>mAP@100</th>'
                f'<td class="n">{_number(retrieval_scores["map@100"])}</td></tr><tr><th>queries '
                f'with relevant index images</th><td class="n">'
                f'{retrieval_scores["queries_with_relevant_images"]}</td></tr></table>'
                + _leaderboard_table('retrieval', [('submission', retrieval_scores)],
                                     [('mAP@100', 'map@100', _number),
                                      ('queries', 'queries_with_relevant_images', str)]))
  if figures:
    body.append('<h2>Pictures</h2><div class="figures">' + ''.join(figures) + '</div>')
  if recognition is not None:
    rows = _per_class_rows(per_class, train_class_counts)
    files.write_csv_atomically(files.join(report_dir, PER_CLASS_CSV), _PER_CLASS_COLUMNS, rows)
    body.append('<h2>Per-class precision, recall and F1</h2>' + _per_class_table(rows,
                                                                               limits.classes))
    if limits.mistakes:
      body.append('<h2>Worst mistakes</h2>' + _mistakes_section(
          worst_mistakes(recognition, recognition_solution, limits.mistakes), report_dir,
          draw_match, train_class_counts))
  page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
          '<meta name="viewport" content="width=device-width, initial-scale=1">'
          f'<title>tf-landmarks evaluation</title><style>{_STYLE}</style></head><body>'
          + '\n'.join(body) + '</body></html>\n')
  path = files.join(report_dir, INDEX)
  files.write_atomically(path, page)
  return path
