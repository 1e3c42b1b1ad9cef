"""The downloader against a real HTTP(S) server on 127.0.0.1: errors, retries, limits, resume,
address checks (SSRF), IRI handling and the image check of bodies and cached files."""

import collections
import contextlib
import csv
import http.server
import io
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from tf_landmarks import download
from tf_landmarks import ingest
from helpers import jpeg_bytes, pattern_image

IMAGE = jpeg_bytes(64, 48, seed=2)
LARGE = b'x' * 5000
HTML = b'<!DOCTYPE html>\n<html><body><h1>Sorry, this page is gone</h1></body></html>\n'
REFUSED = 'refused: private address {} (pass --download_allow_private_hosts to allow)'


class _Handler(http.server.BaseHTTPRequestHandler):
  hits = collections.Counter()
  requests = []  # (request target, Host header) of every request, in order.

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
    self.requests.append((self.path, self.headers['Host']))
    port = self.server.server_address[1]
    if path.startswith('/ok') or path == '/caf%C3%A9.jpg':
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
    elif path == '/drip_headers':  # The status line and headers, one byte every 0.1 s (~20 s).
      for byte in b'HTTP/1.0 200 OK\r\nX-Padding: ' + b'x' * 200:
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
    elif path == '/redirect_loop':
      self._send(302, headers=[('Location', '/redirect_loop')])
    elif path == '/redirect_elsewhere':  # Another loopback address, which nothing listens on.
      self._send(302, headers=[('Location', f'http://127.0.0.2:{port}/ok')])
    elif path == '/html':
      self._send(200, HTML, headers=[('Content-Type', 'text/html')])
    elif path == '/junk':
      self._send(200, bytes(range(256)) * 4)
    else:
      self._send(404)


class _QuietServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # Clients that give up (timeouts, size limits) break the pipe; that is expected here.


@contextlib.contextmanager
def _serve(httpd):
  """Serves `_Handler` with `httpd` in a thread; gives its port."""
  _Handler.hits = collections.Counter()
  _Handler.requests = []
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  try:
    yield httpd.server_address[1]
  finally:
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server():
  with _serve(_QuietServer(('127.0.0.1', 0), _Handler)) as port:
    yield f'http://127.0.0.1:{port}'


@pytest.fixture
def tls_server(tmp_path):
  """(port, certificate file) of an HTTPS server whose certificate names only 'localhost'."""
  if shutil.which('openssl') is None:
    pytest.skip('the openssl command is needed to make a test certificate')
  cert, key = str(tmp_path / 'cert.pem'), str(tmp_path / 'key.pem')
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                  'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days',
                  '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost'],
                 check=True, capture_output=True)
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert, key)
  httpd = _QuietServer(('127.0.0.1', 0), _Handler)
  httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
  with _serve(httpd) as port:
    yield port, cert


def _download(rows, cache_dir, **kwargs):
  settings = dict(num_threads=4, timeout_s=1.0, max_bytes=4096, retries=2, backoff_s=0.05,
                  allow_private_hosts=True, progress=False)
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
      'drip': ('/drip', 'timeout (attempt exceeded 1 s)'),
      'truncated': ('/truncated', 'truncated body'),
      'large': ('/large', 'too large (5000 > 4096 bytes)'),
      'large2': ('/large_unannounced', 'too large (> 4096 bytes)'),
      'empty': ('/empty', 'empty body'),
      'tofile': ('/redirect_file', "redirect to unsupported url scheme 'file'"),
      'loop': ('/redirect_loop', 'too many redirects (> 10)'),
      'html': ('/html', 'not an image (looks like HTML)'),
      'junk': ('/junk', 'not an image (unrecognised format)'),
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
  assert _Handler.hits['/html'] == 1  # A body that is not an image is final.
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
  report = download.DownloadReport(failures=[
      download.DownloadFailure('a', 'http://h/a', 'http 404'),
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
      download_timeout_s=2, download_allow_private_hosts=True, validation_fraction=0,
      num_workers=1, progress=False))
  assert manifest['splits']['train']['examples'] == 6
  assert manifest['skipped']['by_reason'] == {'download failed: http 404': 1,
                                              'no url to download': 1}
  with open(tmp_path / 'records' / 'downloads' / 'failures.csv') as f:
    assert [row['id'] for row in csv.DictReader(f)] == ['m1']


def test_a_header_drip_is_cut_at_the_time_limit(server, tmp_path):
  start = time.monotonic()
  report = _download([('drip', server + '/drip_headers')], tmp_path, retries=0)
  elapsed = time.monotonic() - start
  assert [f.reason for f in report.failures] == ['timeout (attempt exceeded 1 s)']
  # Near the 1 s limit (with slack for a loaded machine); the server takes ~20 s over its headers.
  assert 0.9 < elapsed < 2.5, elapsed


def test_iri_urls_are_encoded_and_malformed_ones_are_counted(server, tmp_path):
  rows = [('cafe', server + '/café.jpg?q=ü w'), ('spaced', server + '/ok two.jpg'),
          ('bad_ipv6', 'http://[::1/x.jpg'), ('bad_port', 'http://127.0.0.1:99999/x.jpg'),
          ('empty_label', 'http://a..b/x.jpg'), ('space_in_host', 'http://exa mple.com/x.jpg')]
  report = _download(rows, tmp_path)
  assert report.downloaded == 2
  assert {f.image_id: f.reason for f in report.failures} == {
      'bad_ipv6': 'malformed url', 'bad_port': 'malformed url', 'empty_label': 'malformed url',
      'space_in_host': 'malformed url'}
  assert sorted(target for target, _ in _Handler.requests) == [
      '/caf%C3%A9.jpg?q=%C3%BC%20w', '/ok%20two.jpg']
  assert (tmp_path / 'cafe.jpg').read_bytes() == IMAGE


def test_an_unforeseen_error_costs_one_row_not_the_download(server, tmp_path, monkeypatch):
  def broken_write(path, data):
    if path.endswith('unlucky.jpg'):
      raise RuntimeError('disk on fire')
    real_write(path, data)

  real_write = download.files.write_atomically
  monkeypatch.setattr(download.files, 'write_atomically', broken_write)
  report = _download([('unlucky', server + '/ok1'), ('lucky', server + '/ok2')], tmp_path)
  assert report.downloaded == 1
  assert report.failures == [download.DownloadFailure(
      'unlucky', server + '/ok1', 'unexpected error: RuntimeError: disk on fire')]


@pytest.mark.parametrize('address, public', [
    ('127.0.0.1', False), ('127.8.9.10', False), ('::1', False), ('0.0.0.0', False),
    ('::', False), ('10.1.2.3', False), ('172.16.0.1', False), ('172.31.255.254', False),
    ('192.168.1.1', False), ('100.64.0.1', False), ('169.254.169.254', False),
    ('fe80::1', False), ('fc00::1', False), ('fd12:3456::1', False), ('fec0::1', False),
    ('224.0.0.1', False), ('ff02::1', False), ('240.0.0.1', False), ('255.255.255.255', False),
    ('192.0.2.1', False), ('2001:db8::1', False), ('::ffff:127.0.0.1', False),
    ('::ffff:169.254.169.254', False), ('2002:7f00:1::', False), ('64:ff9b::a9fe:a9fe', False),
    ('8.8.8.8', True), ('172.32.0.1', True), ('93.184.216.34', True),
    ('2001:4860:4860::8888', True), ('::ffff:8.8.8.8', True), ('64:ff9b::808:808', True)])
def test_which_addresses_are_public(address, public):
  assert download.is_public_address(address) == public


def test_loopback_and_metadata_addresses_are_refused_by_default(server, tmp_path):
  port = server.rsplit(':', 1)[1]
  rows = [('ip', server + '/ok1'), ('name', f'http://localhost:{port}/ok2'),
          ('decimal', f'http://2130706433:{port}/ok3'),  # 127.0.0.1 written as one number.
          ('unspecified', f'http://0.0.0.0:{port}/ok4'),
          ('metadata', 'http://169.254.169.254/latest/meta-data/')]
  report = _download(rows, tmp_path, allow_private_hosts=False)
  reasons = {f.image_id: f.reason for f in report.failures}
  assert reasons['ip'] == REFUSED.format('127.0.0.1')
  assert reasons['decimal'] == REFUSED.format('127.0.0.1')
  assert reasons['unspecified'] == REFUSED.format('0.0.0.0')
  assert reasons['metadata'] == REFUSED.format('169.254.169.254')
  assert reasons['name'].startswith('refused: private address ')  # 127.0.0.1 or ::1 first.
  assert not _Handler.requests and os.listdir(tmp_path) == []

  allowed = _download(rows[:3], tmp_path, allow_private_hosts=True)
  assert (allowed.downloaded, allowed.failures) == (3, [])


def test_every_redirect_hop_is_checked(server, tmp_path, monkeypatch):
  # Only 127.0.0.1 counts as public here, so the first hop passes and 127.0.0.2 does not.
  monkeypatch.setattr(download, 'is_public_address', lambda address: address == '127.0.0.1')
  rows = [('same_host', server + '/redirect'), ('elsewhere', server + '/redirect_elsewhere')]
  report = _download(rows, tmp_path, allow_private_hosts=False)
  assert report.downloaded == 1
  assert report.failures == [download.DownloadFailure(
      'elsewhere', server + '/redirect_elsewhere', REFUSED.format('127.0.0.2'))]
  assert _Handler.hits['/redirect_elsewhere'] == 1


def test_the_checked_address_is_the_one_connected_to(server, tmp_path, monkeypatch):
  port = server.rsplit(':', 1)[1]
  lookups = []
  real_getaddrinfo = socket.getaddrinfo

  def rebinding_dns(host, *args, **kwargs):
    if host != 'xn--bcher-kva.test':
      return real_getaddrinfo(host, *args, **kwargs)
    lookups.append(host)
    # Passes the check the first time; any later lookup would lead to an internal address.
    return real_getaddrinfo('127.0.0.1' if len(lookups) == 1 else '10.255.255.1', *args, **kwargs)

  monkeypatch.setattr(download.socket, 'getaddrinfo', rebinding_dns)
  monkeypatch.setattr(download, 'is_public_address', lambda address: address == '127.0.0.1')
  report = _download([('idn', f'http://Bücher.test:{port}/ok')], tmp_path,
                     allow_private_hosts=False)
  assert (report.downloaded, report.failures) == (1, [])
  assert lookups == ['xn--bcher-kva.test']  # IDNA-encoded, and resolved exactly once.
  assert _Handler.requests == [('/ok', f'xn--bcher-kva.test:{port}')]


def test_https_checks_the_certificate_against_the_host_name(tls_server, tmp_path, monkeypatch):
  port, cert = tls_server
  monkeypatch.setattr(download, '_TLS_CONTEXT', ssl.create_default_context(cafile=cert))
  rows = [('by_name', f'https://localhost:{port}/ok'), ('by_ip', f'https://127.0.0.1:{port}/ok')]
  report = _download(rows, tmp_path)
  # Connected to 127.0.0.1 both times; only the name the certificate was made for is accepted.
  assert report.downloaded == 1 and (tmp_path / 'by_name.jpg').read_bytes() == IMAGE
  assert [f.image_id for f in report.failures] == ['by_ip']
  assert report.failures[0].reason.startswith('tls certificate error: ')


def test_cached_files_that_are_not_images_are_fetched_again(server, tmp_path):
  # A real JPEG whose header (a 100 KB colour profile) is longer than the sample read first.
  buffer = io.BytesIO()
  pattern_image(32, 32, seed=5).save(buffer, format='JPEG', icc_profile=b'p' * 100_000)
  long_header = buffer.getvalue()
  (tmp_path / 'kept.jpg').write_bytes(long_header)
  (tmp_path / 'page.jpg').write_bytes(HTML)  # An error page kept by an older version.
  (tmp_path / 'gone.jpg').write_bytes(HTML)
  rows = [('kept', server + '/ok-kept'), ('page', server + '/ok-page'),
          ('gone', server + '/missing')]
  report = _download(rows, tmp_path)
  assert (report.downloaded, report.cached) == (1, 1)
  assert report.failures == [download.DownloadFailure('gone', server + '/missing', 'http 404')]
  assert (tmp_path / 'kept.jpg').read_bytes() == long_header
  assert (tmp_path / 'page.jpg').read_bytes() == IMAGE
  assert not (tmp_path / 'gone.jpg').exists()
  assert (_Handler.hits['/ok-kept'], _Handler.hits['/ok-page']) == (0, 1)
