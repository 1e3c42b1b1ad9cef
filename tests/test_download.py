"""The downloader against a real HTTP server on 127.0.0.1: errors, retries, limits, resume."""

import collections
import csv
import http.server
import os
import threading
import time

import pytest

from tf_landmarks import download
from tf_landmarks import ingest
from conftest import jpeg_bytes

IMAGE = jpeg_bytes(64, 48, seed=2)
LARGE = b'x' * 5000


class _Handler(http.server.BaseHTTPRequestHandler):
  hits = collections.Counter()

  def log_message(self, *args):  # Keep test output clean.
    pass

  def _send(self, code, body=b'', length=None, headers=()):
    self.send_response(code)
    self.send_header('Content-Length', str(len(body) if length is None else length))
    for key, value in headers:
      self.send_header(key, value)
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self):  # pylint: disable=invalid-name
    path = self.path.split('?')[0]
    self.hits[path] += 1
    if path.startswith('/ok'):
      self._send(200, IMAGE)
    elif path == '/missing':
      self._send(404, b'not found')
    elif path == '/flaky':  # Fails twice, then works.
      self._send(503, b'busy') if self.hits[path] <= 2 else self._send(200, IMAGE)
    elif path == '/always500':
      self._send(500, b'broken')
    elif path == '/slow':
      time.sleep(1.5)
      self._send(200, IMAGE)
    elif path == '/drip':  # Headers at once, then one byte every 0.1 s.
      self.send_response(200)
      self.send_header('Content-Length', str(len(IMAGE)))
      self.end_headers()
      for byte in IMAGE[:40]:
        self.wfile.write(bytes([byte]))
        self.wfile.flush()
        time.sleep(0.1)
    elif path == '/truncated':
      self._send(200, IMAGE[:100], length=len(IMAGE))
      self.close_connection = True
    elif path == '/large':
      self._send(200, LARGE)
    elif path == '/large_unannounced':
      self.send_response(200)
      self.end_headers()  # No Content-Length: the body ends when the connection closes.
      self.wfile.write(LARGE)
      self.close_connection = True
    elif path == '/empty':
      self._send(200, b'')
    elif path == '/redirect':
      self._send(302, headers=[('Location', '/ok-redirected')])
    elif path == '/redirect_file':
      self._send(302, headers=[('Location', 'file:///etc/passwd')])
    else:
      self._send(404)


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # Clients that give up (timeouts, size limits) break the pipe; that is expected here.


@pytest.fixture
def server():
  _Handler.hits = collections.Counter()
  httpd = _QuietServer(('127.0.0.1', 0), _Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()


def _download(rows, cache_dir, **kwargs):
  settings = dict(num_threads=4, timeout_s=1.0, max_bytes=4096, retries=2, backoff_s=0.05,
                  progress=False)
  settings.update(kwargs)
  return download.download_images(rows, str(cache_dir), **settings)


def test_each_failure_mode_has_its_reason_and_good_ones_land(server, tmp_path):
  cases = {
      'good': ('/ok', None),
      'redirected': ('/redirect', None),
      'flaky': ('/flaky', None),
      'missing': ('/missing', 'http 404'),
      'broken': ('/always500', 'http 500'),
      'slow': ('/slow', 'timeout'),
      'drip': ('/drip', 'timeout (transfer exceeded 1 s)'),
      'truncated': ('/truncated', 'truncated body'),
      'large': ('/large', 'too large (5000 > 4096 bytes)'),
      'large2': ('/large_unannounced', 'too large (> 4096 bytes)'),
      'empty': ('/empty', 'empty body'),
      'tofile': ('/redirect_file', "redirect to unsupported url scheme 'file'"),
  }
  rows = [(image_id, server + path) for image_id, (path, _) in cases.items()]
  start = time.monotonic()
  report = _download(rows, tmp_path)
  # Bounded: 3 attempts of ≤1 s for the slow ones, in parallel, plus backoff.
  assert time.monotonic() - start < 8
  reasons = {f.image_id: f.reason for f in report.failures}
  for image_id, (_, expected) in cases.items():
    if expected is None:
      assert (tmp_path / f'{image_id}.jpg').read_bytes() == IMAGE
    else:
      assert reasons[image_id].startswith(expected), (image_id, reasons[image_id])
      assert not (tmp_path / f'{image_id}.jpg').exists()
  assert report.downloaded == 3
  assert _Handler.hits['/flaky'] == 3  # Two 503s retried.
  assert _Handler.hits['/missing'] == 1  # A 404 is final.
  assert _Handler.hits['/always500'] == 3  # 1 + 2 retries.
  assert not [name for name in os.listdir(tmp_path) if '.part-' in name]  # No temp files left.


def test_non_http_urls_and_unsafe_ids_are_rejected_without_network(server, tmp_path):
  rows = [('a', 'file:///etc/passwd'), ('b', 'ftp://example.invalid/x.jpg'), ('c', 'data:,hello'),
          ('d', 'http:///nohost'), ('../evil', server + '/ok'), ('x/y', server + '/ok')]
  report = _download(rows, tmp_path / 'cache')
  reasons = {f.image_id: f.reason for f in report.failures}
  assert reasons == {'a': "unsupported url scheme 'file'", 'b': "unsupported url scheme 'ftp'",
                     'c': "unsupported url scheme 'data'", 'd': 'url has no host',
                     '../evil': 'unsafe image id', 'x/y': 'unsafe image id'}
  assert sum(_Handler.hits.values()) == 0
  assert os.listdir(tmp_path) == ['cache'] and os.listdir(tmp_path / 'cache') == []


def test_second_run_uses_the_cache(server, tmp_path):
  rows = [(f'img{i}', f'{server}/ok{i}') for i in range(10)] + [('img0', f'{server}/ok0')]
  first = _download(rows, tmp_path)
  assert (first.downloaded, first.cached, first.failures) == (10, 0, [])
  hits = sum(_Handler.hits.values())
  second = _download(rows, tmp_path)
  assert (second.downloaded, second.cached) == (0, 10)
  assert sum(_Handler.hits.values()) == hits


def test_failure_report_csv(tmp_path):
  report = download.DownloadReport(failures=[download.DownloadFailure('a', 'http://h/a', 'http 404'),
                                             download.DownloadFailure('b', 'http://h/b', 'timeout')])
  download.write_failure_report(report, str(tmp_path / 'failures.csv'))
  with open(tmp_path / 'failures.csv') as f:
    assert list(csv.reader(f)) == [['id', 'url', 'reason'], ['a', 'http://h/a', 'http 404'],
                                   ['b', 'http://h/b', 'timeout']]


def test_build_records_with_download(server, tmp_path):
  lines = ['id,url,landmark_id'] + [f'g{i},{server}/ok{i},{i % 2}' for i in range(6)] + \
          [f'm1,{server}/missing,0', 'n1,,1']
  (tmp_path / 'train.csv').write_text('\n'.join(lines) + '\n')
  manifest = ingest.build_records(ingest.BuildConfig(
      output_dir=str(tmp_path / 'records'), train_csv=str(tmp_path / 'train.csv'), download=True,
      download_timeout_s=2, validation_fraction=0, num_workers=1, progress=False))
  assert manifest['splits']['train']['examples'] == 6
  assert manifest['skipped']['by_reason'] == {'download failed: http 404': 1, 'no url to download': 1}
  with open(tmp_path / 'records' / 'downloads' / 'failures.csv') as f:
    assert [row['id'] for row in csv.DictReader(f)] == ['m1']
