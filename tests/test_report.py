"""The evaluation report: the page's numbers, pictures and mistakes, escaping, the CLI end to end."""

import csv
import html
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tf_landmarks import report
from tf_landmarks import submission
from tf_landmarks.local_features import LocalFeatures
from tf_landmarks.local_features import draw
from helpers import REPO, write_records
from test_plots import PREDICTIONS, SOLUTION, assert_is_a_picture

FIRST_STAGE = {**PREDICTIONS, 'q4': (3, 0.95), 'q6': (2, 0.3)}
TRAIN_COUNTS = {1: 40, 2: 3, 3: 12, 4: 1, 5: 700}


def _features(locations):
  count = len(locations)
  return LocalFeatures(locations=np.asarray(locations, np.float32),
                       descriptors=np.eye(count, 8, dtype=np.float32),
                       scores=np.ones(count, np.float32), scales=np.ones(count, np.float32))


def draw_generated_match(query_id: str, landmark_id: int, png_path: str) -> str:
  """A real match picture of two small generated images (the second a shifted copy)."""
  rng = np.random.default_rng(landmark_id)
  image = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
  points = [[10, 12], [40, 30], [70, 50], [20, 45]]
  draw.draw_matches(image, np.roll(image, 6, axis=1), _features(points),
                    _features([[x + 6, y] for x, y in points]), np.array([[i, i] for i in range(4)]),
                    np.array([True, True, True, False]), png_path, height=120)
  return f'3 inliers vs <b>index</b> image of {query_id}'


def _page(report_dir) -> str:
  return (pathlib.Path(report_dir) / report.INDEX).read_text()


def test_report_holds_the_numbers_the_pictures_and_the_worst_mistakes(tmp_path):
  retrieval_solution = {'q1': ('a', 'b'), 'q2': ('c',)}
  path = report.write_report(
      str(tmp_path / 'report'), recognition_solution=SOLUTION, recognition=PREDICTIONS,
      first_stage_recognition=FIRST_STAGE, retrieval_solution=retrieval_solution,
      retrieval={'q1': ('a', 'x', 'b')}, train_class_counts=TRAIN_COUNTS,
      draw_match=draw_generated_match, sources=[('recognition solution', 'solution.csv')])
  assert path == str(tmp_path / 'report' / report.INDEX)
  page = _page(tmp_path / 'report')
  for predictions in (PREDICTIONS, FIRST_STAGE):
    scores = submission.score_recognition(predictions, SOLUTION)
    assert f'{scores["gap"]:.4f}' in page
    assert f'{scores["gap_landmark_queries_only"]:.4f}' in page
  assert '<th>first stage only</th><th>verified</th>' in page
  assert f'{2 / 3:.4f}' in page  # Macro F1 of the verified predictions (test_submission's example).
  assert f'{(1 + 2 / 3) / 2 / 2:.4f}' in page  # mAP@100: q1 (1 + 2/3) / 2, q2 0, over 2 queries.
  for name in (report.CLASS_FREQUENCY_PNG, report.PRECISION_RECALL_PNG, report.CONFUSION_PNG):
    assert f'<img src="{name}"' in page
    assert_is_a_picture(tmp_path / 'report' / name)
  # The mistakes, most confident first: q2 (landmark 1, it shows 3) and q5 (4; it shows none).
  assert page.index('query <code>q2</code>') < page.index('query <code>q5</code>')
  assert 'prediction on a query without a landmark' in page
  assert page.count('class="mistake"') == 2
  assert '<img src="mistake-001.png"' in page and '<img src="mistake-002.png"' in page
  assert_is_a_picture(tmp_path / 'report' / 'mistake-001.png', min_width=150, min_height=120)
  assert '3 inliers vs &lt;b&gt;index&lt;/b&gt; image of q2' in page
  with open(tmp_path / 'report' / report.PER_CLASS_CSV) as f:
    rows = list(csv.DictReader(f))
  # Most involved first: 3 (3 queries) and 1 (2 queries + 1 wrong prediction), then 2 and 4.
  assert [row['landmark_id'] for row in rows] == ['1', '3', '2', '4']
  assert rows[0] == {'landmark_id': '1', 'test_queries': '2', 'predictions': '2', 'correct': '1',
                     'precision': '0.5', 'recall': '0.5', 'f1': '0.5', 'train_images': '40'}


def test_report_escapes_ids_and_lists_a_mistake_without_its_picture(tmp_path):
  evil = '<script>alert("x")</script>'
  solution = {**SOLUTION, evil: frozenset({2})}
  predictions = {**PREDICTIONS, evil: (3, 0.99)}
  drawn = []

  def cannot_draw(query_id, landmark_id, png_path):
    drawn.append((query_id, landmark_id, pathlib.Path(png_path).name))
    pathlib.Path(png_path).write_bytes(b'half a picture')
    return None

  report.write_report(str(tmp_path), recognition_solution=solution, recognition=predictions,
                      draw_match=cannot_draw, sources=[('submission', f'{evil}.csv')])
  page = _page(tmp_path)
  assert '<script' not in page
  assert html.escape(evil) in page
  # Pictures are named by rank, never by id, and one the drawer gave up on is not kept.
  assert drawn[0] == (evil, 3, 'mistake-001.png')
  assert not list(tmp_path.glob('mistake-*.png'))
  assert page.count('no match picture could be drawn') == len(drawn) == 3


def test_a_report_that_fails_half_way_leaves_no_index(tmp_path):
  report.write_report(str(tmp_path), recognition_solution=SOLUTION, recognition=PREDICTIONS)
  assert (tmp_path / report.INDEX).exists()

  def broken(query_id, landmark_id, png_path):
    raise RuntimeError('the index is unreadable')

  with pytest.raises(RuntimeError):
    report.write_report(str(tmp_path), recognition_solution=SOLUTION, recognition=PREDICTIONS,
                        draw_match=broken)
  assert not (tmp_path / report.INDEX).exists()  # The old page is gone, the new one not written.


def test_report_limits_cap_the_tables(tmp_path):
  solution = {f'q{i}': frozenset({i % 70}) for i in range(300)}
  predictions = {f'q{i}': ((i + i % 2) % 70, 1 - i / 300) for i in range(300)}
  report.write_report(str(tmp_path), recognition_solution=solution, recognition=predictions,
                      limits=report.ReportLimits(mistakes=4, classes=10, confusion_classes=5))
  page = _page(tmp_path)
  assert 'The 10 of 70 landmarks' in page
  assert page.count('class="mistake"') == 4
  assert len((tmp_path / report.PER_CLASS_CSV).read_text().splitlines()) == 71
  report.write_report(str(tmp_path), recognition_solution=solution, recognition=predictions,
                      limits=report.ReportLimits(mistakes=0))
  assert 'Worst mistakes' not in _page(tmp_path)


# --- The command, on a predictions folder in the prediction command's layout. -------------------

# Records labels 0..3 are landmarks 1000..1003 (helpers.write_records).
RECOGNITION_SOLUTION = ('id,landmarks,Usage\nqa,1000,Public\nqb,1001,Public\nqc,,Private\n'
                        'qd,1002,Public\n')
VERIFIED = 'id,landmarks\nqa,1000 0.9\nqb,1003 0.7\nqc,\nqd,1002 0.8\n'
UNVERIFIED = 'id,landmarks\nqa,1000 0.5\nqb,1003 0.6\nqc,1001 0.9\nqd,1001 0.4\n'
RETRIEVAL_SOLUTION = 'id,images\nqa,i1 i2\nqb,i3\nqd,i4\n'
RETRIEVAL = 'id,images\nqa,i1 i2\nqb,i9 i3\nqd,\n'


def _predictions_dir(tmp_path) -> pathlib.Path:
  """A folder as the prediction command writes it, for an index over a small records folder."""
  records_dir = write_records(tmp_path / 'records', {}, class_counts=[30, 4, 1, 2])
  folder = tmp_path / 'predictions'
  folder.mkdir()
  (folder / 'predict.json').write_text(json.dumps(
      {'format': 'tf-landmarks predictions v1', 'records_dir': records_dir, 'finished': True,
       'settings': {'first_stage': 'classifier'}}))
  (folder / 'recognition.csv').write_text(VERIFIED)
  (folder / 'recognition_unverified.csv').write_text(UNVERIFIED)
  (folder / 'retrieval.csv').write_text(RETRIEVAL)
  entries = []
  for row in csv.DictReader(VERIFIED.splitlines()):
    verified = row['landmarks'].split()
    entries.append({'id': row['id'], 'status': 'ok',
                    'prediction': [int(verified[0]), float(verified[1])] if verified else None,
                    'unverified': None, 'candidates': [], 'retrieval': [], 'seconds': 0.1})
  (folder / 'predictions.jsonl').write_text(''.join(json.dumps(e) + '\n' for e in entries))
  (tmp_path / 'recognition_solution.csv').write_text(RECOGNITION_SOLUTION)
  (tmp_path / 'retrieval_solution.csv').write_text(RETRIEVAL_SOLUTION)
  return folder


# The command in a fresh process, with the match-picture module either unavailable (importing it
# fails) or drawing with this file's real picture drawer, which records how it was called.
_RUN_EVALUATE = '''
import functools, sys, types
drawer = sys.argv.pop(1)
sys.argv[0] = 'tfl-evaluate'
if drawer == 'none':
  sys.modules['tf_landmarks.match_pictures'] = None
else:
  sys.path.insert(0, {tests!r})
  import test_report
  calls = open(drawer, 'w')
  def draw_match(predictions_dir, query_id, landmark_id, png_path):
    calls.write(f'{{predictions_dir}} {{query_id}} {{landmark_id}}\\n')
    calls.flush()
    return test_report.draw_generated_match(query_id, landmark_id, png_path)
  sys.modules['tf_landmarks.match_pictures'] = types.SimpleNamespace(
      drawer=lambda predictions_dir, query_ids: functools.partial(draw_match, predictions_dir))
from tf_landmarks.cli import evaluate
evaluate.run()
'''.format(tests=str(REPO / 'tests'))


def _evaluate(drawer, *args):
  return subprocess.run([sys.executable, '-c', _RUN_EVALUATE, drawer, *map(str, args)],
                        capture_output=True, text=True, cwd=REPO, timeout=180)


def test_cli_scores_a_predictions_folder_and_writes_the_report(tmp_path):
  folder = _predictions_dir(tmp_path)
  result = _evaluate('none', f'--predictions_dir={folder}',
                     f'--recognition_solution={tmp_path / "recognition_solution.csv"}',
                     f'--retrieval_solution={tmp_path / "retrieval_solution.csv"}',
                     f'--report_dir={tmp_path / "report"}', f'--output_json={tmp_path / "s.json"}')
  assert result.returncode == 0, result.stderr
  # Verified: qa ✓ .9, qd ✓ .8, qb ✗ .7 → (1 + 1) / 3.
  # First stage: qc ✗ .9, qb ✗ .6, qa ✓ .5, qd ✗ .4 → (1/3) / 3.
  assert 'recognition GAP: first stage (classifier) only 0.1111 → verified 0.6667' in result.stdout
  assert 'retrieval: mAP@100 0.5000' in result.stdout  # qa 1, qb 1/2, qd 0.
  scores = json.loads((tmp_path / 's.json').read_text())
  assert scores['recognition']['gap'] == pytest.approx(2 / 3)
  assert scores['recognition_first_stage']['gap'] == pytest.approx(1 / 9)
  # Verified per class: 1000 (1, 1), 1001 (P none, R 0), 1002 (1, 1); macro F1 over 3 = 2/3.
  assert scores['recognition']['per_class']['macro_f1'] == pytest.approx(2 / 3)
  # The Public leaderboard leaves out qc, the one Private query (which has no landmark, so the
  # Private leaderboard has no GAP): first stage qb ✗ .6, qa ✓ .5, qd ✗ → (1/2) / 3.
  assert scores['recognition_first_stage']['usage'] == {
      'Public': pytest.approx({'gap': 1 / 6, 'gap_landmark_queries_only': 1 / 6,
                               'accuracy_on_landmark_queries': 1 / 3, 'queries': 3,
                               'landmark_queries': 3, 'predictions': 3,
                               'predictions_on_non_landmark_queries': 0})}
  assert '  Public: GAP 0.1667' in result.stdout
  page = (tmp_path / 'report' / 'index.html').read_text()
  assert '0.6667' in page and '0.1111' in page and '0.5000' in page
  assert '<tr><th>GAP, Public</th><td class="n">0.1667</td><td class="n">0.6667</td></tr>' in page
  assert 'no match pictures: no drawer was given' in page
  assert_is_a_picture(tmp_path / 'report' / report.CLASS_FREQUENCY_PNG)
  per_class = list(csv.DictReader((tmp_path / 'report' / report.PER_CLASS_CSV).open()))
  assert {row['landmark_id']: row['train_images'] for row in per_class} == {
      '1000': '30', '1001': '4', '1002': '1', '1003': '2'}


def test_cli_draws_the_mistakes_with_the_prediction_modules_drawer(tmp_path):
  folder = _predictions_dir(tmp_path)
  calls = tmp_path / 'calls.txt'
  result = _evaluate(str(calls), f'--predictions_dir={folder}',
                     f'--recognition_solution={tmp_path / "recognition_solution.csv"}',
                     f'--report_dir={tmp_path / "report"}')
  assert result.returncode == 0, result.stderr
  # The one verified mistake: qb predicted as 1003.
  assert calls.read_text() == f'{folder} qb 1003\n'
  page = (tmp_path / 'report' / 'index.html').read_text()
  assert '<img src="mistake-001.png"' in page and '3 inliers vs' in page
  assert_is_a_picture(tmp_path / 'report' / 'mistake-001.png', min_width=150, min_height=120)


@pytest.mark.parametrize('change,message', [
    ('foreign predict.json', "is not a predictions folder this version reads"),
    ('records without report', '--records_dir is read for the report only'),
    ('bad row', 'line 3: landmarks'),
    ('no solution', 'give both --recognition_submission'),
])
def test_cli_user_mistakes_are_one_line(tmp_path, change, message):
  folder = _predictions_dir(tmp_path)
  args = [f'--predictions_dir={folder}',
          f'--recognition_solution={tmp_path / "recognition_solution.csv"}']
  if change == 'foreign predict.json':
    (folder / 'predict.json').write_text('{"format": "other"}')
  elif change == 'records without report':
    args.append(f'--records_dir={tmp_path / "records"}')
  elif change == 'bad row':
    (folder / 'recognition_unverified.csv').write_text('id,landmarks\nqa,1000 0.5\nqb,high\n')
  else:
    args = [f'--recognition_submission={folder / "recognition.csv"}']
  result = _evaluate('none', *args)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr and 'Traceback' not in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1


def test_cli_notes_an_unreadable_default_records_folder_and_goes_on(tmp_path):
  folder = _predictions_dir(tmp_path)
  shutil.rmtree(tmp_path / 'records')
  result = _evaluate('none', f'--predictions_dir={folder}',
                     f'--recognition_solution={tmp_path / "recognition_solution.csv"}',
                     f'--report_dir={tmp_path / "report"}')
  assert result.returncode == 0, result.stderr
  assert 'note: class-frequency histogram left out' in result.stderr
  assert 'class-frequency histogram left out' in (tmp_path / 'report' / 'index.html').read_text()
  assert not (tmp_path / 'report' / report.CLASS_FREQUENCY_PNG).exists()


def test_cli_writes_the_report_without_match_pictures_when_the_export_is_gone(tmp_path):
  folder = _predictions_dir(tmp_path)
  meta = json.loads((folder / 'predict.json').read_text())
  # As the prediction command records its export, whose folder has since been deleted.
  meta.update(export=str(tmp_path / 'export'),
              queries={'test_csv': None, 'image_dir': None, 'test_records': None})
  (folder / 'predict.json').write_text(json.dumps(meta))
  result = subprocess.run(
      [sys.executable, '-m', 'tf_landmarks.cli.evaluate', f'--predictions_dir={folder}',
       f'--recognition_solution={tmp_path / "recognition_solution.csv"}',
       f'--report_dir={tmp_path / "report"}'], capture_output=True, text=True, cwd=REPO,
      timeout=180)
  assert result.returncode == 0, result.stderr
  assert 'recognition GAP: first stage (classifier) only 0.1111 → verified 0.6667' in result.stdout
  assert result.stderr.strip().splitlines() == [
      f'note: match pictures left out: {tmp_path / "export"} is not a finished export (no '
      'export.json); make one with tfl-export'], result.stderr
  page = (tmp_path / 'report' / 'index.html').read_text()
  assert 'match pictures left out' in page and 'query <code>qb</code>' in page
  assert not list((tmp_path / 'report').glob('mistake-*.png'))


# --- The page as a browser shows it. -----------------------------------------------------------

CHROMIUM = shutil.which('chromium')


def screenshot(page: pathlib.Path, png: pathlib.Path, profile: pathlib.Path) -> None:
  """Renders `page` in headless Chromium, offline, into `png` (1200 × 2000)."""
  subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', f'--user-data-dir={profile}',
                  f'--screenshot={png}', '--window-size=1200,2000', page.resolve().as_uri()],
                 check=True, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason='headless rendering needs Chromium: apt-get install '
                    'chromium (Debian)')
def test_report_renders_in_headless_chromium(tmp_path):
  report.write_report(str(tmp_path / 'report'), recognition_solution=SOLUTION,
                      recognition=PREDICTIONS, first_stage_recognition=FIRST_STAGE,
                      train_class_counts=TRAIN_COUNTS, draw_match=draw_generated_match)
  png = tmp_path / 'screenshot.png'
  screenshot(tmp_path / 'report' / report.INDEX, png, tmp_path / 'profile')
  with Image.open(png) as image:
    assert image.size == (1200, 2000)
    pixels = np.asarray(image.convert('L'))
  # Text in the top band (the title and the scores table) and the pictures further down: a blank
  # or unstyled-failure page would be white there.
  assert (pixels[:300] < 100).mean() > 0.005
  assert (pixels[300:] < 250).mean() > 0.05
  assert len(np.unique(np.asarray(Image.open(png).convert('RGB')).reshape(-1, 3), axis=0)) > 200
