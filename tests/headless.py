"""Headless Chromium driven over the DevTools protocol (a pipe: no extra package, no open port).

`Browser()` starts Chromium with `--remote-debugging-pipe` (commands on its fd 3, replies and events
on its fd 4, each message JSON ended by a NUL) and opens one page; `call(method, **params)` sends a
command to that page and returns its result. Enough to load a page, put a file into an
`<input type=file>` as a user choosing it would, read the page back and take a screenshot.
"""

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

CHROMIUM = shutil.which('chromium')


class Browser:
  """One headless Chromium with one page; a context manager."""

  def __init__(self, width: int = 1100, height: int = 1000):
    self._profile = tempfile.TemporaryDirectory()
    commands_read, self._commands = os.pipe()
    self._replies, replies_write = os.pipe()

    def pipes_as_fd_3_and_4():
      os.dup2(commands_read, 3)
      os.dup2(replies_write, 4)

    self._process = subprocess.Popen(
        [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
         '--no-first-run', '--disable-background-networking', '--disable-component-update',
         '--disable-sync', '--remote-debugging-pipe', f'--user-data-dir={self._profile.name}',
         f'--window-size={width},{height}', 'about:blank'],
        preexec_fn=pipes_as_fd_3_and_4, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    os.close(commands_read)
    os.close(replies_write)
    self._next_id = 0
    self._buffer = b''
    target = self._send('Target.createTarget', url='about:blank')['targetId']
    self._session = self._send('Target.attachToTarget', targetId=target,
                               flatten=True)['sessionId']

  def _send(self, method: str, session: str = None, **params) -> dict:
    self._next_id += 1
    message = {'id': self._next_id, 'method': method, 'params': params}
    if session:
      message['sessionId'] = session
    os.write(self._commands, json.dumps(message).encode() + b'\0')
    while True:
      while b'\0' not in self._buffer:
        chunk = os.read(self._replies, 1 << 20)
        if not chunk:
          raise RuntimeError('Chromium closed the DevTools pipe')
        self._buffer += chunk
      line, self._buffer = self._buffer.split(b'\0', 1)
      reply = json.loads(line)
      if reply.get('id') == self._next_id:
        if 'error' in reply:
          raise RuntimeError(f'{method}: {reply["error"]}')
        return reply['result']

  def call(self, method: str, **params) -> dict:
    """Sends a DevTools command to the page; its result."""
    return self._send(method, self._session, **params)

  def evaluate(self, expression: str):
    """The value of a JavaScript expression in the page."""
    return self.call('Runtime.evaluate', expression=expression,
                     returnByValue=True)['result'].get('value')

  def wait_for(self, expression: str, timeout: float = 60.0):
    """Polls a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      value = self.evaluate(expression)
      if value:
        return value
      time.sleep(0.1)
    raise TimeoutError(f'{expression} stayed false for {timeout} s')

  def open(self, url: str) -> None:
    self.call('Page.navigate', url=url)
    self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'")

  def choose_file(self, selector: str, path: str) -> None:
    """Puts `path` into the file input `selector`, which fires its change event."""
    root = self.call('DOM.getDocument')['root']['nodeId']
    node = self.call('DOM.querySelector', nodeId=root, selector=selector)['nodeId']
    self.call('DOM.setFileInputFiles', nodeId=node, files=[os.path.abspath(path)])

  def screenshot(self, png_path: str) -> None:
    data = self.call('Page.captureScreenshot', format='png')['data']
    with open(png_path, 'wb') as f:
      f.write(base64.b64decode(data))

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._process.kill()
    self._process.wait()
    os.close(self._commands)
    os.close(self._replies)
    self._profile.cleanup()
