"""tfl-serve: the REST API, bad input, parallel requests, the page in Chromium and SIGTERM."""

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests
from PIL import Image

from tf_landmarks import export
from tf_landmarks import submission
import headless
from helpers import REPO, trained_world

NAME = 'export'


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  root = tmp_path_factory.mktemp('serve')
  built = trained_world(root, backend='sift')
  export.export(export.ExportConfig(run=built['classifier'], index=built['index'],
                                    output_dir=str(root / NAME)))
  return {**built, 'root': root, 'export': str(root / NAME)}


class _Server:
  """A `tfl-serve` process on a free port, its log read as it goes."""

  def __init__(self, export_dir, log_path, *flags):
    self.log_path = log_path
    self._log = open(log_path, 'w')
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'tf_landmarks.cli.serve', f'--export={export_dir}', '--port=0',
         '--verify_top_k=5', *flags], stdout=self._log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      found = re.search(r'at http://127\.0\.0\.1:(\d+)/', self.log())
      if found:
        self.port = int(found.group(1))
        self.url = f'http://127.0.0.1:{self.port}'
        return
      assert self.process.poll() is None, self.log()
      time.sleep(0.2)
    raise TimeoutError(self.log())

  def log(self) -> str:
    with open(self.log_path) as f:
      return f.read()

  def predict(self, instances, **extra):
    return requests.post(f'{self.url}/v1/models/{NAME}:predict',
                         json={'instances': instances, **extra}, timeout=120)

  def stop(self):
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    self._log.close()


@pytest.fixture(scope='module')
def server(world):
  running = _Server(world['export'], world['root'] / 'serve.log', '--threads=3',
                    '--channel_timeout=2', '--max_request_bytes=4000000', '--max_batch=8')
  yield running
  running.stop()


def _b64(data: bytes) -> dict:
  return {'b64': base64.b64encode(data).decode()}


def _test_images(world):
  """(query id, image bytes, true landmarks) of the world's test photos."""
  truth = submission.read_recognition_solution(
      os.path.join(world['world'], 'recognition_solution.csv'))
  images = []
  for image_id in sorted(truth):
    with open(os.path.join(world['world'], 'images', f'{image_id}.jpg'), 'rb') as f:
      images.append((image_id, f.read(), truth[image_id]))
  return images


def _assert_healthy(server):
  assert requests.get(f'{server.url}/healthz', timeout=30).json() == {'status': 'ok'}


def test_a_rest_client_gets_verified_landmarks(world, server):
  status = requests.get(f'{server.url}/v1/models/{NAME}', timeout=30)
  assert status.status_code == 200
  assert status.json()['model_version_status'][0]['state'] == 'AVAILABLE'
  _assert_healthy(server)
  images = _test_images(world)
  response = server.predict([_b64(data) for _, data, _ in images[:8]], retrieval=True)
  assert response.status_code == 200, response.text
  predictions = response.json()['predictions']
  assert len(predictions) == len(images[:8])
  verified = [(prediction, truth) for prediction, (_, _, truth) in zip(predictions, images)
              if prediction['verified']]
  assert verified, predictions
  for prediction, truth in verified:
    assert prediction['status'] == 'ok' and prediction['score'] >= 1.0
    assert prediction['landmark_id'] in truth
    assert prediction['inliers'] >= 15 and prediction['index_image']
    assert prediction['candidates'] and prediction['retrieval']
  assert all('retrieval' not in p for p in server.predict([_b64(images[0][1])]).json()[
      'predictions'])


def _bomb_png() -> bytes:
  """A 20000 × 20000 black PNG: a few tens of kilobytes that would decode to 1.2 GB."""
  buffer = io.BytesIO()
  Image.new('1', (20000, 20000)).save(buffer, format='PNG')
  return buffer.getvalue()


def _raw_request(port, head: bytes, body: bytes = b'', timeout=30) -> bytes:
  with socket.create_connection(('127.0.0.1', port), timeout=timeout) as connection:
    connection.sendall(head + body)
    reply = b''
    try:
      while True:
        chunk = connection.recv(65536)
        if not chunk:
          break
        reply += chunk
    except (ConnectionResetError, socket.timeout):
      pass
  return reply


def test_bad_input_gets_4xx_or_a_status_and_the_service_keeps_answering(world, server):
  good = _test_images(world)[0][1]
  response = server.predict([_b64(good), _b64(b'this is not an image'), _b64(_bomb_png()),
                             {'b64': '%%% not base64'}, {'image': 'wrong key'}, _b64(b'')])
  assert response.status_code == 200, response.text
  first, not_image, bomb, not_b64, wrong_key, empty = response.json()['predictions']
  assert first['status'] == 'ok'
  assert 'not a readable image' in not_image['status'] and 'landmark_id' not in not_image
  assert 'decompression bomb' in bomb['status']
  assert 'base64' in not_b64['status'] and 'b64' in wrong_key['status']
  assert empty['status'] == 'empty file'
  url = f'{server.url}/v1/models/{NAME}:predict'
  for body in (b'', b'{"instances": [', b'[1, 2]', b'{"instances": []}', b'\xff\xfe'):
    response = requests.post(url, data=body, timeout=30)
    assert response.status_code == 400 and response.json()['error'], body
  too_many = server.predict([_b64(good)] * 9)
  assert too_many.status_code == 400 and 'at most 8' in too_many.json()['error']
  assert requests.get(f'{server.url}/v1/models/other', timeout=30).status_code == 404
  # 50 MB announced: refused on the headers, before the body is read.
  head = (f'POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: '
          f'application/json\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n').encode()
  reply = _raw_request(server.port, head, b'{"instances": [' + b' ' * 65536)
  assert reply.startswith(b'HTTP/1.1 413'), reply[:200]
  # 50 MB sent chunked, with no length to refuse it by: cut off at the limit.
  chunk = b' ' * (1024 * 1024)
  chunked = b''.join(b'%x\r\n%s\r\n' % (len(chunk), chunk) for _ in range(50)) + b'0\r\n\r\n'
  head = (f'POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\n'
          'Transfer-Encoding: chunked\r\n\r\n').encode()
  try:
    reply = _raw_request(server.port, head, chunked)
  except (BrokenPipeError, ConnectionResetError):
    reply = b'HTTP/1.1 413 (closed while sending)'
  assert reply.startswith(b'HTTP/1.1 413'), reply[:200]
  _assert_healthy(server)
  assert server.predict([_b64(good)]).json()['predictions'][0]['status'] == 'ok'
  assert server.process.poll() is None


def test_a_slow_client_holds_no_worker_and_is_cut_off(world, server):
  good = _b64(_test_images(world)[0][1])
  body = json.dumps({'instances': [good]}).encode()
  head = (f'POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: '
          f'application/json\r\nContent-Length: {len(body)}\r\n\r\n').encode()
  # More trickling clients than worker threads (3): none of them may hold one.
  slow = [socket.create_connection(('127.0.0.1', server.port), timeout=30) for _ in range(5)]
  for connection in slow:
    connection.sendall(head + body[:10])
  started = time.monotonic()
  for i in range(6):
    for connection in slow:
      connection.sendall(body[10 + i:11 + i])  # A byte each, within --channel_timeout.
    assert server.predict([good]).status_code == 200
    time.sleep(0.5)
  assert time.monotonic() - started < 60
  # Stalled: --channel_timeout=2 closes them (an empty read, or a reset).
  for connection in slow:
    connection.settimeout(15)
    try:
      assert connection.recv(1024) == b''
    except ConnectionResetError:
      pass
    connection.close()
  _assert_healthy(server)


def test_concurrent_requests_are_all_answered(world, server):
  images = _test_images(world)

  def ask(i):
    _, data, _ = images[i % len(images)]
    return server.predict([_b64(data)])

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    responses = list(pool.map(ask, range(24)))
  assert all(r.status_code == 200 and r.json()['predictions'][0]['status'] == 'ok'
             for r in responses)
  # One log line per request, with its time.
  lines = [line for line in server.log().splitlines() if ':predict 200 1 instances' in line]
  assert len(lines) >= 24 and all(re.search(r' \d+ ms$', line) for line in lines)


@pytest.mark.skipif(headless.CHROMIUM is None, reason='the page test needs Chromium')
def test_the_page_uploads_a_photo_and_shows_the_match(world, server, tmp_path):
  images = _test_images(world)
  with headless.Browser() as browser:
    browser.open(f'{server.url}/')
    for image_id, data, truth in images:
      photo = tmp_path / f'{image_id}.jpg'
      photo.write_bytes(data)
      browser.choose_file('#file', str(photo))
      browser.wait_for("document.getElementById('answer').dataset.state === 'done'")
      answer = browser.evaluate("document.getElementById('answer').textContent")
      if answer.startswith('Landmark '):
        assert int(answer.split()[1]) in truth, (image_id, answer)
        details = browser.evaluate("document.getElementById('details').textContent")
        assert 'inliers with index image' in details
        assert browser.wait_for("!document.getElementById('picture').hidden && "
                                "document.getElementById('picture').naturalWidth") > 64
        break
      assert answer == 'No landmark recognised', answer
      browser.evaluate("document.getElementById('answer').dataset.state = ''")
    else:
      pytest.fail('no test photo was recognised on the page')
    photo = tmp_path / 'not_a_photo.jpg'
    photo.write_bytes(b'not a photo')
    browser.evaluate("document.getElementById('answer').dataset.state = ''")
    browser.choose_file('#file', str(photo))
    browser.wait_for("document.getElementById('answer').dataset.state === 'done'")
    assert browser.evaluate("document.getElementById('answer').textContent").startswith(
        'Cannot read this photo: not a readable image')


def test_sigterm_answers_the_requests_received_then_stops_with_one_line(world, tmp_path):
  running = _Server(world['export'], tmp_path / 'serve.log', '--threads=1')
  try:
    assert requests.get(f'{running.url}/healthz', timeout=30).status_code == 200
    images = [_b64(data) for _, data, _ in _test_images(world)][:16]
    body = json.dumps({'instances': images}).encode()
    head = (f'POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
            f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n').encode()
    # Four requests in flight or queued behind the one worker when SIGTERM comes.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      replies = [pool.submit(_raw_request, running.port, head, body, 120) for _ in range(4)]
      time.sleep(1.0)
      running.process.send_signal(signal.SIGTERM)
      for reply in replies:
        assert reply.result().startswith(b'HTTP/1.1 200'), reply.result()[:200]
        assert reply.result().count(b'"status": "ok"') == len(images)
    assert running.process.wait(timeout=60) == 143
    last = running.log().strip().splitlines()[-1]
    assert last.endswith(': terminated (SIGTERM)'), last
    assert 'Traceback' not in running.log()
  finally:
    running.stop()


def test_an_unusable_export_ends_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'tf_landmarks.cli.serve', f'--export={tmp_path}', '--port=0'],
      capture_output=True, text=True, timeout=120, env={**os.environ, 'PYTHONPATH': str(REPO)})
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('serve.py: error: '), result.stderr
