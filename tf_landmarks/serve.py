"""tfl-serve's HTTP service: one photo in, its landmark out, in TF Serving's REST shape.

`App(recognizer, name)` is a WSGI application over one shared `recognizer.Recognizer`:

  POST /v1/models/<name>:predict   {"instances": [{"b64": "<image file, base64>"}, …]}
                                   → {"predictions": [{"status": "ok", "landmark_id": …}, …]}
  GET  /v1/models/<name>           the model's status, as TF Serving reports it
  GET  /healthz                    {"status": "ok"} once the export is loaded
  GET  /                           a page: choose or drop a photo, see the answer and the match

Each prediction is `recognizer.Answer.as_json()` without the retrieval list, which a request asks
for with `"retrieval": true`; `"match_pictures": true` adds the query drawn beside the index image
that verified it (`match_picture`, a base64 PNG). An instance that is not an image (or not base64,
or a decompression bomb…) gets only its own `status`; the others are answered. A request
that is not JSON, holds no instances or more than `--max_batch`, or is larger than
`--max_request_bytes` is refused with a 4xx and {"error": "…"}, as TF Serving does.

`serve(ServeConfig, RecognizerSettings)` runs the app under waitress: its I/O thread buffers each
request whole before a worker thread sees it, so a slow client holds a connection (at most
`--max_connections`, closed after `--channel_timeout` seconds without a byte), never a worker; the
`--threads` workers answer requests in parallel. One log line per request, with its time. SIGTERM
stops accepting connections and lets the requests received be answered first.
"""

import base64
import binascii
import dataclasses
import html
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, TextIO

from werkzeug import exceptions
from werkzeug import routing
from werkzeug import wrappers

from tf_landmarks import errors
from tf_landmarks.recognizer import OK
from tf_landmarks.recognizer import Recognizer
from tf_landmarks.recognizer import RecognizerSettings
from tf_landmarks.settings import setting

MODEL_VERSION = '1'


class ServeError(errors.UserError):
  """The service cannot start as asked; the message says what to change."""


@dataclasses.dataclass
class ServeConfig:
  """Everything `serve` needs besides the recognizer's settings; one flag per field."""
  export: Optional[str] = setting(
      None, 'The export (tfl-export) to answer with: classifier, index and local features.',
      required=True)
  port: int = setting(8501, 'TCP port of the REST API and the page (8501: TF Serving\'s REST '
                      'port).', lower=0, upper=65535)
  host: str = setting('127.0.0.1', 'Address to listen on (0.0.0.0: every interface).')
  model_name: Optional[str] = setting(
      None, 'The <name> of /v1/models/<name>; default: the export folder\'s name.')
  threads: int = setting(4, 'Requests answered in parallel (worker threads sharing the one '
                         'loaded export).', lower=1)
  max_batch: int = setting(16, 'Instances a request may hold.', lower=1)
  max_request_bytes: int = setting(
      32 * 1024 * 1024, 'Largest request body, in bytes; larger requests get 413 before any is '
      'read beyond the limit.', lower=1024)
  max_connections: int = setting(100, 'Open connections at once; more wait to be accepted.',
                                 lower=1)
  channel_timeout: int = setting(30, 'Seconds a connection may stay silent before it is closed '
                                 '(against clients that stall).', lower=1)
  verify: bool = setting(False, 'Hash every file of the export before serving it.')


def _instance_bytes(instance: Any) -> bytes:
  """The image bytes of one instance ({"b64": …}, TF Serving's binary form, or a bare string)."""
  encoded = instance.get('b64') if isinstance(instance, dict) else instance
  if not isinstance(encoded, str):
    raise ValueError('an instance must be {"b64": "<base64 image file>"}')
  try:
    return base64.b64decode(encoded, validate=True)
  except (binascii.Error, ValueError):
    raise ValueError('instance is not valid base64') from None


class App:
  """The WSGI application (see the module docstring).

  Args:
    recognizer: the loaded export, shared by every request.
    name: the model name in the URLs.
    max_batch: instances a request may hold.
    max_request_bytes: the largest body read.
    log: where the per-request lines go.
  """

  def __init__(self, recognizer: Recognizer, name: str, *, max_batch: int = 16,
               max_request_bytes: int = 32 * 1024 * 1024, log: TextIO = sys.stderr):
    self.recognizer = recognizer
    self.name = name
    self.max_batch = max_batch
    self.max_request_bytes = max_request_bytes
    self._log = log
    self._log_lock = threading.Lock()
    self._routes = routing.Map([
        routing.Rule('/', endpoint='page', methods=['GET']),
        routing.Rule('/healthz', endpoint='health', methods=['GET']),
        routing.Rule(f'/v1/models/{name}', endpoint='status', methods=['GET']),
        routing.Rule(f'/v1/models/{name}/versions/{MODEL_VERSION}', endpoint='status',
                     methods=['GET']),
        routing.Rule(f'/v1/models/{name}:predict', endpoint='predict', methods=['POST']),
        routing.Rule(f'/v1/models/{name}/versions/{MODEL_VERSION}:predict', endpoint='predict',
                     methods=['POST'])])

  def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
    started = time.perf_counter()
    request = wrappers.Request(environ)
    items = ''
    try:
      endpoint, _ = self._routes.bind_to_environ(environ).match()
      if endpoint == 'predict':
        response, count = self._predict(request)
        items = f' {count} instances'
      else:
        response = getattr(self, f'_{endpoint}')()
    except exceptions.HTTPException as error:
      response = _json({'error': error.description}, error.code)
    milliseconds = (time.perf_counter() - started) * 1000
    with self._log_lock:
      self._log.write(f'{request.remote_addr} {request.method} {request.path} '
                      f'{response.status_code}{items} {milliseconds:.0f} ms\n')
      self._log.flush()
    return response(environ, start_response)

  def _health(self) -> wrappers.Response:
    return _json({'status': 'ok'})

  def _status(self) -> wrappers.Response:
    return _json({'model_version_status': [
        {'version': MODEL_VERSION, 'state': 'AVAILABLE',
         'status': {'error_code': 'OK', 'error_message': ''}}]})

  def _page(self) -> wrappers.Response:
    page = _PAGE.replace('{{NAME}}', html.escape(self.name)).replace(
        '{{PREDICT}}', json.dumps(f'/v1/models/{self.name}:predict'))
    return wrappers.Response(page, content_type='text/html; charset=utf-8')

  def _predict(self, request: wrappers.Request):
    """(response, instances answered) of a predict request."""
    if (request.content_length or 0) > self.max_request_bytes:
      raise exceptions.RequestEntityTooLarge(
          f'the request is larger than {self.max_request_bytes} bytes')
    body = request.get_data(cache=False)
    if len(body) > self.max_request_bytes:
      raise exceptions.RequestEntityTooLarge(
          f'the request is larger than {self.max_request_bytes} bytes')
    if not body:
      raise exceptions.BadRequest('empty request: send {"instances": [{"b64": …}]}')
    try:
      message = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
      raise exceptions.BadRequest(f'the request is not JSON ({error})') from None
    instances = message.get('instances') if isinstance(message, dict) else None
    if not isinstance(instances, list) or not instances:
      raise exceptions.BadRequest('the request needs "instances": [{"b64": …}, …]')
    if len(instances) > self.max_batch:
      raise exceptions.BadRequest(f'{len(instances)} instances; at most {self.max_batch} per '
                                  'request')
    with_retrieval = message.get('retrieval') is True
    with_pictures = message.get('match_pictures') is True
    datas: List[Optional[bytes]] = []
    problems: Dict[int, str] = {}
    for i, instance in enumerate(instances):
      try:
        datas.append(_instance_bytes(instance))
      except ValueError as error:
        problems[i] = str(error)
        datas.append(None)
    answered = iter(self.recognizer.answer_all([data for data in datas if data is not None]))
    predictions = []
    for i, data in enumerate(datas):
      if data is None:
        predictions.append({'status': problems[i]})
        continue
      answer, jpeg = next(answered)
      if answer.status != OK:
        predictions.append({'status': answer.status})
        continue
      prediction = answer.as_json()
      if not with_retrieval:
        del prediction['retrieval']
      if with_pictures and answer.verified:
        picture = self.recognizer.match_picture(jpeg, answer.landmark_id, answer.index_image)
        prediction['match_picture'] = (None if picture is None else
                                       base64.b64encode(picture.png).decode('ascii'))
      predictions.append(prediction)
    return _json({'predictions': predictions}), len(instances)


def _json(content: dict, status: int = 200) -> wrappers.Response:
  return wrappers.Response(json.dumps(content), status=status, content_type='application/json')


def model_name(config: ServeConfig) -> str:
  """The model's name in the URLs: --model_name, or the export folder's name."""
  return config.model_name or os.path.basename(os.path.normpath(config.export))


def make_server(config: ServeConfig, recognition: RecognizerSettings, log: TextIO = sys.stderr):
  """The waitress server of the export (loaded now), listening but not yet serving.

  Raises:
    exports.ExportError, indexes.LandmarkIndexError, recognizer.RecognizerError: an unusable
      export; ServeError: the port cannot be bound.
  """
  from waitress import server as waitress_server  # pylint: disable=g-import-not-at-top
  recognizer = Recognizer.open(config.export, recognition, verify=config.verify)
  app = App(recognizer, model_name(config), max_batch=config.max_batch,
            max_request_bytes=config.max_request_bytes, log=log)
  try:
    return waitress_server.create_server(
        app, host=config.host, port=config.port, threads=config.threads,
        max_request_body_size=config.max_request_bytes, connection_limit=config.max_connections,
        channel_timeout=config.channel_timeout,
        # Idle connections are looked for this often; waitress's default (30 s) would let a
        # stalled client outlive a short --channel_timeout.
        cleanup_interval=min(30, config.channel_timeout), ident='tfl-serve',
        clear_untrusted_proxy_headers=True)
  except OSError as error:
    raise ServeError(f'cannot listen on {config.host}:{config.port}: '
                     f'{error.strerror or error}') from None


def _finish_requests(server, seconds: float) -> None:
  """Stops accepting connections and runs the I/O loop until the requests received are answered
  and their replies sent (the workers write replies; the loop's thread sends them)."""
  server.accepting = False
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and any(
      channel.requests or channel.total_outbufs_len
      for channel in list(server.active_channels.values())):
    server.asyncore.loop(timeout=0.05, map=server._map, count=1)  # pylint: disable=protected-access


def serve(config: ServeConfig, recognition: RecognizerSettings, log: TextIO = sys.stderr) -> None:
  """Serves until interrupted (Ctrl-C, or SIGTERM raised as `errors.Terminated`).

  On SIGTERM no connection is accepted any more, and the requests already received are answered (for
  up to 30 s) before `errors.Terminated` goes on to the command's one-line exit.
  """
  server = make_server(config, recognition, log)
  log.write(f'tfl-serve: model {model_name(config)} at http://{config.host}:'
            f'{server.effective_port}/ (POST /v1/models/{model_name(config)}:predict)\n')
  log.flush()
  try:
    server.run()
  except errors.Terminated:
    _finish_requests(server, 30)
    raise
  finally:
    server.task_dispatcher.shutdown(cancel_pending=False, timeout=10)
    server.close()


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tf-landmarks: {{NAME}}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 2em; text-align: center; }
#drop.over { background: #eef; }
#answer { font-size: 1.5em; margin: 1em 0 0.3em; }
#details { color: #555; }
#picture { max-width: 100%; margin-top: 1em; }
#preview { max-height: 12em; margin-top: 1em; }
</style></head>
<body>
<h1>Which landmark is this?</h1>
<p>Model <code>{{NAME}}</code>: the classifier proposes landmarks, local features and RANSAC verify
them against the index images.</p>
<div id="drop"><p>Drop a photo here, or <input id="file" type="file" accept="image/*"></p></div>
<img id="preview" alt="" hidden>
<div id="answer" aria-live="polite"></div>
<div id="details"></div>
<img id="picture" alt="the photo beside the matched index image, inlier matches drawn" hidden>
<script>
const predictUrl = {{PREDICT}};
const answer = document.getElementById('answer');
const details = document.getElementById('details');
const picture = document.getElementById('picture');
const preview = document.getElementById('preview');

function show(prediction) {
  picture.hidden = true;
  if (prediction.status !== 'ok') {
    answer.textContent = 'Cannot read this photo: ' + prediction.status;
    details.textContent = '';
  } else if (prediction.landmark_id === null || !prediction.verified) {
    answer.textContent = 'No landmark recognised';
    const guess = prediction.unverified;
    details.textContent = guess ? 'The first stage\\'s best guess, landmark ' + guess[0] +
        ' (confidence ' + guess[1].toFixed(3) + '), was not verified by local features.' : '';
  } else {
    answer.textContent = 'Landmark ' + prediction.landmark_id;
    details.textContent = 'score ' + prediction.score.toFixed(3) + ', verified: ' +
        prediction.inliers + ' inliers with index image ' + prediction.index_image + ' (' +
        (prediction.timing.total * 1000).toFixed(0) + ' ms)';
    if (prediction.match_picture) {
      picture.src = 'data:image/png;base64,' + prediction.match_picture;
      picture.hidden = false;
    }
  }
  answer.dataset.state = 'done';
}

function recognise(file) {
  answer.textContent = 'Recognising…';
  answer.dataset.state = 'busy';
  details.textContent = '';
  picture.hidden = true;
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const reader = new FileReader();
  reader.onload = () => {
    const b64 = reader.result.slice(reader.result.indexOf(',') + 1);
    fetch(predictUrl, {method: 'POST', headers: {'Content-Type': 'application/json'},
                       body: JSON.stringify({instances: [{b64: b64}], match_pictures: true})})
      .then(response => response.json().then(body => {
        if (!response.ok) { throw new Error(body.error || response.statusText); }
        show(body.predictions[0]);
      }))
      .catch(error => { answer.textContent = 'Error: ' + error.message;
                        answer.dataset.state = 'done'; });
  };
  reader.readAsDataURL(file);
}

document.getElementById('file').addEventListener('change', event => {
  if (event.target.files.length) { recognise(event.target.files[0]); }
  event.target.value = '';  // Choosing the same photo again is a change too.
});
const drop = document.getElementById('drop');
drop.addEventListener('dragover', event => { event.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', event => {
  event.preventDefault();
  drop.classList.remove('over');
  if (event.dataTransfer.files.length) { recognise(event.dataTransfer.files[0]); }
});
</script>
</body></html>
"""
