"""Fetches the url column of a Google Landmarks CSV into a resumable on-disk cache.

Every URL and every response is untrusted: only http(s) is fetched (redirects included), bodies are
bounded in bytes and each attempt in wall time (a server that drips one byte a second cannot hold a
thread forever), and ids are checked before they become file names. Files are written under a
temporary name and renamed when complete, so the cache never holds a half image that a later run would
take for finished; a re-run skips ids already in the cache.
"""

import concurrent.futures
import dataclasses
import http.client
import io
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterable, List, Tuple

import tensorflow as tf
import tqdm

from tf_landmarks import csv_io
from tf_landmarks import files

USER_AGENT = 'tf-landmarks/0.1 (landmark dataset builder)'
_ALLOWED_SCHEMES = ('http', 'https')
_READ_SIZE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class DownloadFailure:
  """A row that could not be fetched, with a short human-readable reason."""
  image_id: str
  url: str
  reason: str


@dataclasses.dataclass
class DownloadReport:
  """Outcome of `download_images`: fetched now, found in the cache, failed."""
  downloaded: int = 0
  cached: int = 0
  failures: List[DownloadFailure] = dataclasses.field(default_factory=list)


class _Failed(Exception):
  """One attempt failed; `retry` says whether another attempt may succeed."""

  def __init__(self, reason: str, retry: bool):
    super().__init__(reason)
    self.reason = reason
    self.retry = retry


def cached_path(cache_dir: str, image_id: str) -> str:
  """Where the image of `image_id` is kept (the flat `<id>.jpg` layout the builder reads)."""
  return os.path.join(cache_dir, f'{image_id}.jpg')


def _check_url(url: str) -> None:
  parts = urllib.parse.urlsplit(url)
  if parts.scheme.lower() not in _ALLOWED_SCHEMES:
    raise _Failed(f'unsupported url scheme {parts.scheme or "(none)"!r}', retry=False)
  if not parts.hostname:
    raise _Failed('url has no host', retry=False)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
  """Follows redirects only to http(s): a redirect to file:// or ftp:// must not read local files."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    scheme = urllib.parse.urlsplit(newurl).scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
      raise _Failed(f'redirect to unsupported url scheme {scheme!r}', retry=False)
    return super().redirect_request(req, fp, code, msg, headers, newurl)


# Only the handlers we need: no file:, ftp: or data: handlers at all.
_OPENER = urllib.request.OpenerDirector()
for _handler in (urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                 urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                 _HttpOnlyRedirects()):
  _OPENER.add_handler(_handler)


def _fetch_once(url: str, timeout_s: float, max_bytes: int) -> bytes:
  """One attempt; raises _Failed."""
  deadline = time.monotonic() + timeout_s
  request = urllib.request.Request(url, headers={'User-Agent': USER_AGENT})
  try:
    with _OPENER.open(request, timeout=timeout_s) as response:
      declared = response.headers.get('Content-Length')
      declared = int(declared) if declared and declared.isdigit() else None
      if declared is not None and declared > max_bytes:
        raise _Failed(f'too large ({declared} > {max_bytes} bytes)', retry=False)
      body = io.BytesIO()
      while True:
        if time.monotonic() > deadline:
          raise _Failed(f'timeout (transfer exceeded {timeout_s:g} s)', retry=True)
        # read1 returns after one receive, so the deadline is checked while a server drips bytes.
        chunk = response.read1(_READ_SIZE)
        if not chunk:
          break
        body.write(chunk)
        if body.tell() > max_bytes:
          raise _Failed(f'too large (> {max_bytes} bytes)', retry=False)
  except _Failed:
    raise
  except urllib.error.HTTPError as error:
    if 300 <= error.code < 400:  # urllib refuses some redirects itself (e.g. to file:).
      scheme = urllib.parse.urlsplit(error.url or '').scheme
      raise _Failed(f'redirect to unsupported url scheme {scheme!r}', retry=False) from None
    raise _Failed(f'http {error.code}', retry=error.code >= 500 or error.code == 429) from None
  except http.client.IncompleteRead as error:
    raise _Failed(f'truncated body (got {len(error.partial)} bytes, '
                  f'{error.expected} missing)', retry=True) from None
  except (socket.timeout, TimeoutError):
    raise _Failed('timeout', retry=True) from None
  except urllib.error.URLError as error:
    if isinstance(error.reason, (socket.timeout, TimeoutError)):
      raise _Failed('timeout', retry=True) from None
    raise _Failed(f'connection error: {error.reason}', retry=True) from None
  except (OSError, http.client.HTTPException) as error:
    raise _Failed(f'connection error: {type(error).__name__}: {error}', retry=True) from None
  data = body.getvalue()
  if declared is not None and len(data) < declared:
    raise _Failed(f'truncated body (got {len(data)} of {declared} bytes)', retry=True)
  if not data:
    raise _Failed('empty body', retry=False)
  return data


def _download_one(image_id: str, url: str, cache_dir: str, timeout_s: float, max_bytes: int,
                  retries: int, backoff_s: float) -> None:
  """Fetches one image into the cache, retrying transient failures with exponential backoff."""
  _check_url(url)
  for attempt in range(retries + 1):
    try:
      data = _fetch_once(url, timeout_s, max_bytes)
      break
    except _Failed as failure:
      if not failure.retry or attempt == retries:
        raise
      # Jitter spreads retries of many threads hitting the same overloaded server.
      time.sleep(backoff_s * 2 ** attempt * random.uniform(1.0, 1.25))
  files.write_atomically(cached_path(cache_dir, image_id), data)


def download_images(rows: Iterable[Tuple[str, str]], cache_dir: str, *, num_threads: int = 16,
                    timeout_s: float = 30.0, max_bytes: int = 50 * 2**20, retries: int = 3,
                    backoff_s: float = 1.0, progress: bool = True) -> DownloadReport:
  """Downloads `(image_id, url)` rows into `cache_dir/<id>.jpg`.

  Args:
    rows: ids and http(s) URLs; a repeated id is fetched once.
    cache_dir: the cache (any tf.io.gfile path); ids already there are not fetched again.
    num_threads: concurrent downloads.
    timeout_s: limit of one attempt, connection and whole transfer included.
    max_bytes: larger bodies are rejected (by Content-Length, and while reading).
    retries: extra attempts after timeouts, connection errors, truncated bodies, HTTP 5xx and 429.
      Other 4xx answers are final.
    backoff_s: wait before the first retry; doubles each time.
    progress: show a progress bar on stderr.

  Returns:
    Counts of fetched and cached ids, and every failure with its reason.
  """
  tf.io.gfile.makedirs(cache_dir)
  report = DownloadReport()
  pending, seen = [], set()
  for image_id, url in rows:
    if image_id in seen:
      continue
    seen.add(image_id)
    if not csv_io.is_safe_image_id(image_id):
      report.failures.append(DownloadFailure(image_id, url, 'unsafe image id'))
    elif tf.io.gfile.exists(cached_path(cache_dir, image_id)):
      report.cached += 1
    else:
      pending.append((image_id, url))

  bar = tqdm.tqdm(total=len(pending), unit='img', desc='download', disable=not progress)
  queue = iter(pending)
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    in_flight = {}

    def submit_next() -> None:
      row = next(queue, None)
      if row is not None:
        in_flight[pool.submit(_download_one, *row, cache_dir, timeout_s, max_bytes, retries,
                              backoff_s)] = row

    # A bounded window of futures keeps memory flat for CSVs of millions of rows.
    for _ in range(4 * num_threads):
      submit_next()
    while in_flight:
      done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        image_id, url = in_flight.pop(future)
        try:
          future.result()
          report.downloaded += 1
        except _Failed as failure:
          report.failures.append(DownloadFailure(image_id, url, failure.reason))
        except (OSError, tf.errors.OpError) as error:  # The cache itself could not be written.
          report.failures.append(DownloadFailure(image_id, url, f'cache write failed: {error}'))
        bar.update()
        submit_next()
  bar.close()
  return report


def write_failure_report(report: DownloadReport, path: str) -> None:
  """Writes the failures as CSV `id,url,reason` (temporary name, renamed when complete)."""
  files.write_csv_atomically(path, ['id', 'url', 'reason'],
                             ((f.image_id, f.url, f.reason) for f in report.failures))
