r"""The README's picture of tfl-serve's page: a photo uploaded in headless Chromium, screenshotted.

Starts `tfl-serve` on --export, opens its page in headless Chromium (driven over the DevTools pipe,
tests/headless.py), chooses --photo in the page's file input as a user would, waits for the
answer and saves the window as --output. `chromium --headless --screenshot` alone cannot upload a
file, hence the DevTools protocol.

Usage (from the repository root):
  .venv/bin/python bench/serve_screenshot.py --export=exports/demo --photo=photo.jpg \
      --output=bench/serve_page.png -- --first_stage=knn --max_verifications=10
"""

import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_REPO, 'tests'))
import headless  # pylint: disable=wrong-import-position

flags.DEFINE_string('export', None, 'The export to serve.', required=True)
flags.DEFINE_string('photo', None, 'The photo to upload.', required=True)
flags.DEFINE_string('output', 'bench/serve_page.png', 'Where the screenshot goes.')
FLAGS = flags.FLAGS


def main(argv):
  with tempfile.TemporaryDirectory() as folder:
    log_path = os.path.join(folder, 'serve.log')
    with open(log_path, 'w') as log:
      server = subprocess.Popen(
          [sys.executable, os.path.join(_REPO, 'tf_landmarks', 'cli', 'serve.py'),
       f'--export={FLAGS.export}', '--port=0',
           *argv[1:]], stdout=log, stderr=subprocess.STDOUT,
          env={**os.environ, 'PYTHONPATH': _REPO})
      try:
        while True:
          with open(log_path) as f:
            found = re.search(r'at (http://127\.0\.0\.1:\d+/)', f.read())
          if found:
            break
          if server.poll() is not None:
            raise SystemExit(open(log_path).read())
          time.sleep(0.5)
        with headless.Browser(width=1100, height=960) as browser:
          browser.open(found.group(1))
          browser.choose_file('#file', FLAGS.photo)
          browser.wait_for("document.getElementById('answer').dataset.state === 'done'", 300)
          browser.wait_for("document.getElementById('picture').hidden || "
                           "document.getElementById('picture').complete")
          print(browser.evaluate("document.getElementById('answer').textContent + ' | ' + "
                                 "document.getElementById('details').textContent"))
          browser.screenshot(FLAGS.output)
      finally:
        server.terminate()
        server.wait()


if __name__ == '__main__':
  app.run(main)
