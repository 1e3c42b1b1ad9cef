"""Fetches the url column of a Google Landmarks CSV into a resumable on-disk cache.

Every URL, every DNS answer and every response is untrusted:

* URLs: only http(s) is fetched, redirects included. Non-ASCII paths and queries are percent-encoded
  as UTF-8 and international host names IDNA-encoded (IRI to URI); a URL that cannot be parsed is a
  failed row ('malformed url').
* Addresses (SSRF): a CSV could point the builder at a cloud VM's metadata service or at services on
  the internal network. Each host is resolved once, its addresses are checked (`is_public_address`)
  and the connection goes to exactly the checked address, so a second DNS answer (rebinding) cannot
  slip through; the Host header, TLS SNI and certificate check still use the host name. Every
  redirect hop is checked again. `allow_private_hosts` lifts the check (tests, internal mirrors).
* Time: each attempt, redirects, TLS handshake and headers included, is bounded in wall time by a
  watchdog that shuts its sockets down at the deadline. Socket timeouts alone bound each receive, so
  a server dripping one header byte a second could otherwise hold a thread indefinitely. Name
  resolution is bounded by the system resolver's own timeouts.
* Bodies: bounded in bytes, and kept only if Pillow recognises them as an image (an HTML error page
  served with status 200 is a failed row, not a cached '.jpg').

Ids are checked before they become file names. Files are written under a temporary name and renamed
when complete, so the cache never holds a half image that a later run would take for finished. A
re-run skips ids whose cached file is a readable image and fetches again those whose file is not
(e.g. an error page kept by an older version). Whatever goes wrong with one row is a failure with a
short reason in the report, never an exception that ends the download.
"""

import concurrent.futures
import contextlib
import dataclasses
import http.client
import io
import ipaddress
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Iterable, List, Optional, Tuple, Union

import tensorflow as tf
import tqdm
from PIL import Image

from tf_landmarks import csv_io
from tf_landmarks import files

USER_AGENT = 'tf-landmarks/0.1 (landmark dataset builder)'
_ALLOWED_SCHEMES = ('http', 'https')
_DEFAULT_PORTS = {'http': 80, 'https': 443}
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 10
_READ_SIZE = 64 * 1024
# Enough for the header of nearly every image (one JPEG APP segment is at most 64 KB); a cached file
# whose header is longer (big ICC profiles) is judged on the whole file.
_CACHE_SAMPLE_BYTES = 64 * 1024
# Kept as they are when percent-encoding a path or query: RFC 3986 reserved characters, and '%' so
# that URLs already encoded are not encoded twice.
_PATH_SAFE = "/:@!$&'()*+,;=%~"
_QUERY_SAFE = _PATH_SAFE + '?'
_HOST_NAME = re.compile(r'^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_.])?$')
_NAT64_PREFIX = ipaddress.ip_network('64:ff9b::/96')
_TLS_CONTEXT = ssl.create_default_context()

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


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


@dataclasses.dataclass(frozen=True)
class _Settings:
  timeout_s: float
  max_bytes: int
  retries: int
  backoff_s: float
  allow_private_hosts: bool


@dataclasses.dataclass(frozen=True)
class _Target:
  """A parsed, ASCII-only http(s) URL."""
  scheme: str
  host: str  # IDNA-encoded name, or an IP address without brackets.
  port: int
  path: str  # Percent-encoded path and query: what goes on the request line.

  @property
  def netloc(self) -> str:
    """The Host header: host, with brackets for IPv6, and the port unless it is the default."""
    host = f'[{self.host}]' if ':' in self.host else self.host
    return host if self.port == _DEFAULT_PORTS[self.scheme] else f'{host}:{self.port}'

  @property
  def url(self) -> str:
    return f'{self.scheme}://{self.netloc}{self.path}'


class _Deadline:
  """Bounds one attempt in wall time: at the deadline, shuts down every connection it watches.

  A shut-down connection makes the blocked receive return at once, so the attempt ends near the
  limit whatever the server does (drips header bytes, stalls the TLS handshake...). The watchdog
  acts on duplicates of the sockets that it alone closes: shutting down a socket that the attempt
  has just closed could hit an unrelated connection that reused its file descriptor.
  """

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s
    self._end = time.monotonic() + timeout_s
    self._lock = threading.Lock()
    self._sockets = []
    self._finished = False
    self.expired = False
    self._timer = threading.Timer(timeout_s, self._expire)
    self._timer.daemon = True
    self._timer.start()

  def failure(self) -> _Failed:
    return _Failed(f'timeout (attempt exceeded {self.timeout_s:g} s)', retry=True)

  def remaining(self) -> float:
    """Seconds left; raises the timeout failure when none are."""
    left = self._end - time.monotonic()
    if left <= 0 or self.expired:
      raise self.failure()
    return left

  def watch(self, sock: socket.socket) -> None:
    """Puts the connection of `sock` (connected yet or not, TLS or not) under the deadline."""
    with self._lock:
      self._sockets.append(sock.dup())

  def finish(self) -> None:
    """Stops the watchdog and closes its duplicates."""
    with self._lock:
      self._finished = True
      for sock in self._sockets:
        sock.close()
    self._timer.cancel()

  def _expire(self) -> None:
    with self._lock:
      if self._finished:
        return
      # Set before the shutdown: any read that returns early because of it sees the flag afterwards.
      self.expired = True
      for sock in self._sockets:
        with contextlib.suppress(OSError):  # Not connected yet: connect has its own timeout.
          sock.shutdown(socket.SHUT_RDWR)


def cached_path(cache_dir: str, image_id: str) -> str:
  """Where the image of `image_id` is kept (the flat `<id>.jpg` layout the builder reads)."""
  return files.join(cache_dir, f'{image_id}.jpg')


def is_public_address(address: str) -> bool:
  """Whether the downloader may connect to `address` without `allow_private_hosts`.

  Refused: loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), shared (100.64/10),
  link-local (169.254/16, where cloud metadata services live, and fe80::/10), multicast, reserved,
  unspecified and documentation ranges. IPv4 addresses embedded in IPv6 (::ffff:a.b.c.d, 6to4,
  NAT64) are judged as the IPv4 address they reach.

  Args:
    address: an IPv4 or IPv6 address, as DNS resolution returns it.

  Returns:
    True only for globally routable unicast addresses.

  Raises:
    ValueError: `address` is not an IP address.
  """
  return _is_public(ipaddress.ip_address(address))


def _is_public(ip: IPAddress) -> bool:
  if isinstance(ip, ipaddress.IPv6Address):
    if ip.ipv4_mapped is not None:
      return _is_public(ip.ipv4_mapped)
    if ip in _NAT64_PREFIX:
      return _is_public(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None and not _is_public(ip.sixtofour):
      return False
    if ip.is_site_local:  # Deprecated fec0::/10, which `is_global` does not exclude.
      return False
  # `is_global` alone lets multicast through; the other flags guard against its exact ranges
  # differing between Python versions.
  return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback
                               or ip.is_link_local or ip.is_reserved or ip.is_unspecified)


def _ascii_host(host: str) -> str:
  """An IP literal as it is, a name IDNA-encoded; raises ValueError (UnicodeError) if impossible."""
  with contextlib.suppress(ValueError):
    return str(ipaddress.ip_address(host))
  name = host.encode('idna').decode('ascii').lower()
  if not _HOST_NAME.match(name):  # Keeps spaces, '%' or control characters out of the Host header.
    raise ValueError(f'invalid host name {host!r}')
  return name


def _parse_url(url: str, base: Optional[str] = None) -> _Target:
  """Checks `url` (joined to `base` for a redirect) and turns it into an ASCII-only target."""
  try:
    parts = urllib.parse.urlsplit(urllib.parse.urljoin(base, url) if base else url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _ALLOWED_SCHEMES:
      raise _Failed(f'unsupported url scheme {parts.scheme or "(none)"!r}', retry=False)
    if not parts.hostname:
      raise _Failed('url has no host', retry=False)
    port = _DEFAULT_PORTS[scheme] if parts.port is None else parts.port
    path = urllib.parse.quote(parts.path, safe=_PATH_SAFE) or '/'
    if parts.query:
      path += '?' + urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
    return _Target(scheme, _ascii_host(parts.hostname), port, path)
  except ValueError:  # Bad IPv6 brackets, port out of range, unencodable host or path...
    raise _Failed('malformed url', retry=False) from None


def _checked_addresses(target: _Target, allow_private_hosts: bool) -> List[Tuple[int, tuple]]:
  """Resolves the host once; returns `(family, sockaddr)` of the addresses it may connect to."""
  try:
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
  except socket.gaierror as error:
    raise _Failed(f'host not found: {target.host}',
                  retry=error.errno == socket.EAI_AGAIN) from None
  addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
  if allow_private_hosts:
    return addresses
  allowed = [(family, sockaddr) for family, sockaddr in addresses if is_public_address(sockaddr[0])]
  if not allowed:
    raise _Failed(f'refused: private address {addresses[0][1][0]} '
                  '(pass --download_allow_private_hosts to allow)', retry=False)
  return allowed


def _connect(target: _Target, deadline: _Deadline, allow_private_hosts: bool) -> socket.socket:
  """A socket connected to a checked address of the target (TLS started for https)."""
  last_error = None
  for family, sockaddr in _checked_addresses(target, allow_private_hosts):
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
      deadline.watch(sock)
      sock.settimeout(deadline.remaining())
      sock.connect(sockaddr)
      return _start_tls(sock, target, deadline) if target.scheme == 'https' else sock
    except BaseException as error:
      sock.close()
      if not isinstance(error, OSError):
        raise
      last_error = error  # Try the host's next address, as browsers do.
  raise last_error


def _start_tls(sock: socket.socket, target: _Target, deadline: _Deadline) -> ssl.SSLSocket:
  # SNI and the certificate check use the host name, not the address connected to.
  tls_sock = _TLS_CONTEXT.wrap_socket(sock, server_hostname=target.host,
                                      do_handshake_on_connect=False)
  try:
    tls_sock.do_handshake()  # Bounded too: the deadline already watches the connection.
  except BaseException:
    tls_sock.close()
    raise
  return tls_sock


def _read_body(response: http.client.HTTPResponse, deadline: _Deadline, max_bytes: int) -> bytes:
  declared = response.getheader('Content-Length')
  declared = int(declared) if declared and declared.isdigit() else None
  if declared is not None and declared > max_bytes:
    raise _Failed(f'too large ({declared} > {max_bytes} bytes)', retry=False)
  body = io.BytesIO()
  while True:
    deadline.remaining()
    chunk = response.read1(_READ_SIZE)
    if not chunk:
      break
    body.write(chunk)
    if body.tell() > max_bytes:
      raise _Failed(f'too large (> {max_bytes} bytes)', retry=False)
  # The end may have been the watchdog's shutdown rather than the server's: then it is not the end.
  deadline.remaining()
  data = body.getvalue()
  if declared is not None and len(data) < declared:
    raise _Failed(f'truncated body (got {len(data)} of {declared} bytes)', retry=True)
  if not data:
    raise _Failed('empty body', retry=False)
  return data


def _redirect_location(response: http.client.HTTPResponse) -> str:
  location = response.getheader('Location')
  if not location:
    raise _Failed(f'http {response.status} without a Location header', retry=False)
  # http.client decodes headers as Latin-1; servers that send raw non-ASCII mean UTF-8.
  with contextlib.suppress(UnicodeError):
    location = location.encode('latin-1').decode('utf-8')
  return location


def _follow_redirects(target: _Target, deadline: _Deadline, settings: _Settings) -> bytes:
  """GETs `target`, following redirects; each hop is a new, checked connection."""
  for _ in range(_MAX_REDIRECTS + 1):
    connection = http.client.HTTPConnection(target.host, target.port)
    with contextlib.closing(connection):
      connection.sock = _connect(target, deadline, settings.allow_private_hosts)
      connection.request('GET', target.path, headers={
          'Host': target.netloc, 'User-Agent': USER_AGENT, 'Connection': 'close'})
      with connection.getresponse() as response:
        if response.status in _REDIRECT_CODES:
          location = _redirect_location(response)
          try:
            target = _parse_url(location, base=target.url)
          except _Failed as failure:
            raise _Failed(f'redirect to {failure.reason}', retry=False) from None
          continue
        if not 200 <= response.status < 300:
          raise _Failed(f'http {response.status}',
                        retry=response.status >= 500 or response.status == 429)
        return _read_body(response, deadline, settings.max_bytes)
  raise _Failed(f'too many redirects (> {_MAX_REDIRECTS})', retry=False)


def _network_failure(error: Exception) -> _Failed:
  if isinstance(error, http.client.IncompleteRead):
    return _Failed(f'truncated body (got {len(error.partial)} bytes, {error.expected} missing)',
                   retry=True)
  if isinstance(error, ssl.SSLCertVerificationError):
    return _Failed(f'tls certificate error: {error.verify_message}', retry=False)
  return _Failed(f'connection error: {type(error).__name__}: {error}', retry=True)


def _fetch_once(target: _Target, settings: _Settings) -> bytes:
  """One attempt, redirects included, within `settings.timeout_s`; raises _Failed."""
  deadline = _Deadline(settings.timeout_s)
  try:
    return _follow_redirects(target, deadline, settings)
  except (OSError, http.client.HTTPException) as error:
    # After the watchdog's shutdown, errors (EOF, reset, bad status line) are just its echo.
    if deadline.expired or isinstance(error, TimeoutError):
      raise deadline.failure() from None
    raise _network_failure(error) from None
  finally:
    deadline.finish()


def _image_problem(data: bytes) -> Optional[str]:
  """Why `data` is not an image Pillow can open (format and size from the header only), or None."""
  try:
    Image.open(io.BytesIO(data)).close()
  except Image.DecompressionBombError:
    return 'not a usable image (too many pixels to decode)'
  except Exception:  # pylint: disable=broad-except
    # Pillow's format plugins raise many types on junk (OSError, SyntaxError, struct.error...).
    head = data[:1024].lstrip(b'\xef\xbb\xbf \t\r\n').lower()
    looks_like_html = head.startswith(b'<!doctype html') or b'<html' in head
    return f'not an image ({"looks like HTML" if looks_like_html else "unrecognised format"})'
  return None


def _cached_image_problem(path: str) -> Optional[str]:
  """Like `_image_problem` for a cached file, reading only its start in the common case."""
  with tf.io.gfile.GFile(path, 'rb') as f:
    head = f.read(_CACHE_SAMPLE_BYTES)
    problem = _image_problem(head)
    if problem is not None and len(head) == _CACHE_SAMPLE_BYTES:
      problem = _image_problem(head + f.read())  # The header may just be longer than the sample.
  return problem


def _is_cached(path: str) -> bool:
  """Whether `path` holds a readable image; a file that is not one (an error page) is removed."""
  try:
    if _cached_image_problem(path) is None:
      return True
  except tf.errors.NotFoundError:
    return False
  tf.io.gfile.remove(path)
  return False


def _download_one(image_id: str, url: str, cache_dir: str, settings: _Settings) -> bool:
  """Makes sure the image is in the cache; True if it was fetched now, False if already there."""
  path = cached_path(cache_dir, image_id)
  try:
    if _is_cached(path):
      return False
  except (OSError, tf.errors.OpError) as error:
    raise _Failed(f'cache read failed: {error}', retry=False) from None
  target = _parse_url(url)
  for attempt in range(settings.retries + 1):
    try:
      data = _fetch_once(target, settings)
      break
    except _Failed as failure:
      if not failure.retry or attempt == settings.retries:
        raise
      # Jitter spreads retries of many threads hitting the same overloaded server.
      time.sleep(settings.backoff_s * 2 ** attempt * random.uniform(1.0, 1.25))
  problem = _image_problem(data)
  if problem is not None:
    raise _Failed(problem, retry=False)
  try:
    files.write_atomically(path, data)
  except (OSError, tf.errors.OpError) as error:
    raise _Failed(f'cache write failed: {error}', retry=False) from None
  return True


def download_images(rows: Iterable[Tuple[str, str]], cache_dir: str, *, num_threads: int = 16,
                    timeout_s: float = 30.0, max_bytes: int = 50 * 2**20, retries: int = 3,
                    backoff_s: float = 1.0, allow_private_hosts: bool = False,
                    progress: bool = True) -> DownloadReport:
  """Downloads `(image_id, url)` rows into `cache_dir/<id>.jpg`.

  Each row either lands in the cache or becomes a `DownloadFailure` with a short reason (malformed
  url, refused address, http status, timeout, not an image...); no error of one row is raised.

  Args:
    rows: ids and http(s) URLs (non-ASCII ones are percent-encoded); a repeated id is fetched once.
    cache_dir: the cache (any tf.io.gfile path). Ids whose cached file is a readable image are not
      fetched again; a cached file that is not an image is deleted and fetched again.
    num_threads: concurrent downloads.
    timeout_s: wall-time limit of one attempt: DNS-checked connection, TLS, headers, body and
      redirects together.
    max_bytes: larger bodies are rejected (by Content-Length, and while reading).
    retries: extra attempts after timeouts, connection errors, truncated bodies, HTTP 5xx and 429.
      Other 4xx answers, refused addresses and bodies that are not images are final.
    backoff_s: wait before the first retry; doubles each time.
    allow_private_hosts: also fetch from loopback, private, link-local, multicast and reserved
      addresses, which are refused by default (see `is_public_address`) so that a CSV cannot make
      the builder reach internal services.
    progress: show a progress bar on stderr.

  Returns:
    Counts of fetched and cached ids, and every failure with its reason.
  """
  tf.io.gfile.makedirs(cache_dir)
  settings = _Settings(timeout_s, max_bytes, retries, backoff_s, allow_private_hosts)
  report = DownloadReport()
  pending, seen = [], set()
  for image_id, url in rows:
    if image_id in seen:
      continue
    seen.add(image_id)
    if csv_io.is_safe_image_id(image_id):
      pending.append((image_id, url))
    else:
      report.failures.append(DownloadFailure(image_id, url, 'unsafe image id'))

  bar = tqdm.tqdm(total=len(pending), unit='img', desc='download', disable=not progress)
  queue = iter(pending)
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    in_flight = {}

    def submit_next() -> None:
      row = next(queue, None)
      if row is not None:
        in_flight[pool.submit(_download_one, *row, cache_dir, settings)] = row

    # A bounded window of futures keeps memory flat for CSVs of millions of rows.
    for _ in range(4 * num_threads):
      submit_next()
    while in_flight:
      done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        image_id, url = in_flight.pop(future)
        _record(report, image_id, url, future)
        bar.update()
        submit_next()
  bar.close()
  return report


def _record(report: DownloadReport, image_id: str, url: str,
            future: concurrent.futures.Future) -> None:
  """Counts the outcome of one row's future in `report`."""
  try:
    fetched = future.result()
  except _Failed as failure:
    report.failures.append(DownloadFailure(image_id, url, failure.reason))
  except Exception as error:  # pylint: disable=broad-except
    # An error nobody foresaw (a library bug, an odd input) must cost this row, not the build.
    report.failures.append(DownloadFailure(image_id, url,
                                           f'unexpected error: {type(error).__name__}: {error}'))
  else:
    if fetched:
      report.downloaded += 1
    else:
      report.cached += 1


def write_failure_report(report: DownloadReport, path: str) -> None:
  """Writes the failures as CSV `id,url,reason` (temporary name, renamed when complete)."""
  files.write_csv_atomically(path, ['id', 'url', 'reason'],
                             ((f.image_id, f.url, f.reason) for f in report.failures))
