r"""tfl-serve under load on loopback, beside tfl-predict's time per query on the same photos.

Starts `tfl-serve` on --export (a subprocess, --threads workers), warms it up with the same load
for --warmup_seconds, reads its resident memory, then runs --clients concurrent clients for
--seconds: each posts one query photo at a time (`{"instances": [{"b64": …}]}`, photos taken in
turn from the export's test records, --queries of them) and waits for the answer. Reported:
requests/s, p50/p99 latency, errors (a non-200 reply or a prediction without status "ok"; must be
0) and the server's resident memory before, every 10 s during and after. Then `tfl-predict`
answers the same --queries photos (a test CSV over them) with the same recognition settings, and
its ms/query (predict.json's median and its total over the queries) is printed beside.

Usage (from the repository root):
  .venv/bin/python bench/bench_serve.py --export=exports/demo \
      --clients=4 --seconds=60   # the demo's recognition settings are the defaults here
"""

import base64
import concurrent.futures
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
import numpy as np
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tf_landmarks import exports  # pylint: disable=wrong-import-position
from tf_landmarks import queries  # pylint: disable=wrong-import-position

flags.DEFINE_string('export', None, 'The export to serve.', required=True)
flags.DEFINE_integer('clients', 4, 'Concurrent clients.')
flags.DEFINE_integer('seconds', 60, 'How long the clients send.')
flags.DEFINE_integer('warmup_seconds', 15, 'How long the same clients send before the measured '
                     'run (TensorFlow traces its functions and grows its buffers once).')
flags.DEFINE_integer('threads', 4, "tfl-serve's worker threads.")
flags.DEFINE_integer('queries', 48, 'Test photos sent (in turn) and given to tfl-predict.')
flags.DEFINE_string('first_stage', 'knn', 'Recognition settings, as tfl-predict takes them.')
flags.DEFINE_integer('verify_top_k', 3, '')
flags.DEFINE_integer('max_verifications', 10, '')
flags.DEFINE_integer('min_inliers', 15, '')
FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recognition_flags():
  return [f'--first_stage={FLAGS.first_stage}', f'--verify_top_k={FLAGS.verify_top_k}',
          f'--max_verifications={FLAGS.max_verifications}', f'--min_inliers={FLAGS.min_inliers}']


def _rss_mb(pid: int) -> float:
  with open(f'/proc/{pid}/status') as f:
    return int(re.search(r'VmRSS:\s+(\d+) kB', f.read()).group(1)) / 1024


def _photos(folder: str):
  """(id, JPEG) of the first --queries test photos of the export's records."""
  _, read, _ = queries.open_queries(exports.load(FLAGS.export))
  photos = []
  for image_id, query in read(lambda _: True):
    if query.jpeg is not None:
      photos.append((image_id, query.jpeg))
      with open(os.path.join(folder, f'{image_id}.jpg'), 'wb') as f:
        f.write(query.jpeg)
    if len(photos) == FLAGS.queries:
      break
  with open(os.path.join(folder, 'test.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id'])
    writer.writerows([image_id] for image_id, _ in photos)
  return photos


def _start_server(log_path: str):
  log = open(log_path, 'w')
  process = subprocess.Popen(
      [sys.executable, os.path.join(_REPO, 'tf_landmarks', 'cli', 'serve.py'),
       f'--export={FLAGS.export}', '--port=0',
       f'--threads={FLAGS.threads}', *_recognition_flags()],
      stdout=log, stderr=subprocess.STDOUT, env={**os.environ, 'PYTHONPATH': _REPO})
  while True:
    with open(log_path) as f:
      found = re.search(r'at (http://127\.0\.0\.1:\d+)/ \(POST (\S+)\)', f.read())
    if found:
      return process, found.group(1) + found.group(2)
    if process.poll() is not None:
      raise RuntimeError(open(log_path).read())
    time.sleep(0.5)


def _load(url: str, bodies, seconds: float, pid: int):
  """(latencies of the answers, errors, seconds taken, RSS in MB every 10 s)."""
  latencies, errors, lock = [], [], threading.Lock()
  stop = time.monotonic() + seconds
  rss = []

  def sample_rss():
    while time.monotonic() < stop:
      rss.append(_rss_mb(pid))
      time.sleep(min(10.0, max(stop - time.monotonic(), 0.0)))

  def client(number):
    session = requests.Session()
    i = number
    while time.monotonic() < stop:
      started = time.perf_counter()
      try:
        reply = session.post(url, data=bodies[i % len(bodies)],
                             headers={'Content-Type': 'application/json'}, timeout=300)
        ok = reply.status_code == 200 and reply.json()['predictions'][0]['status'] == 'ok'
      except requests.RequestException:
        ok = False
      with lock:
        (latencies if ok else errors).append(time.perf_counter() - started)
      i += FLAGS.clients

  started = time.monotonic()
  sampler = threading.Thread(target=sample_rss)
  sampler.start()
  with concurrent.futures.ThreadPoolExecutor(FLAGS.clients) as pool:
    list(pool.map(client, range(FLAGS.clients)))
  sampler.join()
  return np.array(latencies), len(errors), time.monotonic() - started, rss


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as folder:
    photos = _photos(folder)
    bodies = [json.dumps({'instances': [{'b64': base64.b64encode(jpeg).decode()}]})
              for _, jpeg in photos]
    process, url = _start_server(os.path.join(folder, 'serve.log'))
    try:
      _, warmup_errors, _, _ = _load(url, bodies, FLAGS.warmup_seconds, process.pid)
      rss_before = _rss_mb(process.pid)
      latencies, errors, elapsed, rss = _load(url, bodies, FLAGS.seconds, process.pid)
      rss_after = _rss_mb(process.pid)
    finally:
      process.terminate()
      process.wait()
    output = os.path.join(folder, 'predictions')
    started = time.monotonic()
    subprocess.run([sys.executable, os.path.join(_REPO, 'tf_landmarks', 'cli', 'predict.py'),
                    f'--export={FLAGS.export}',
                    f'--test_csv={folder}/test.csv', f'--image_dir={folder}',
                    f'--output_dir={output}', '--noprogress', *_recognition_flags()],
                   check=True, capture_output=True, env={**os.environ, 'PYTHONPATH': _REPO})
    predict_wall = time.monotonic() - started
    with open(os.path.join(output, 'predict.json')) as f:
      per_query = json.load(f)['seconds_per_query']
  print(f'tfl-serve, {FLAGS.clients} clients x {FLAGS.seconds} s, {FLAGS.threads} threads, '
        f'{len(photos)} photos in turn:')
  p50, p99 = np.percentile(latencies, [50, 99]) * 1000
  print(f'  {len(latencies)} answers, {len(latencies) / elapsed:.2f} requests/s, p50 {p50:.0f} ms, '
        f'p99 {p99:.0f} ms, errors {errors} (warm-up {FLAGS.warmup_seconds} s: {warmup_errors})')
  print(f'  server RSS {rss_before:.0f} MB after the warm-up, {rss_after:.0f} MB after the load; '
        f'every 10 s: {" ".join(f"{mb:.0f}" for mb in rss)} MB')
  print(f'tfl-predict on the same {len(photos)} photos: median {per_query["median"] * 1000:.0f} '
        f'ms/query, {per_query["total"] / len(photos) * 1000:.0f} ms/query over all; '
        f'{predict_wall:.0f} s wall with loading')


if __name__ == '__main__':
  app.run(main)
