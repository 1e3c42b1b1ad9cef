r"""tfl-serve: answers photos over HTTP with an export (tfl-export), in TF Serving's REST shape.

Examples:
  tfl-serve --export=exports/demo --port=8501
  tfl-serve --flagfile=configs/demo_predict.flags --export=exports/demo --host=0.0.0.0 --threads=8

  curl -s localhost:8501/v1/models/demo:predict \
      -d "{\"instances\": [{\"b64\": \"$(base64 -w0 photo.jpg)\"}]}"

POST /v1/models/<name>:predict answers {"instances": [{"b64": …}]} with {"predictions": […]} (the
landmark, its score, whether and how local features verified it); GET /v1/models/<name> is the
model's status, GET /healthz the service's, and / a page to try a photo on. <name> is the export
folder's name unless --model_name says otherwise. The recognition flags are tfl-predict's. SIGTERM
stops it after answering the requests already received (one line, exit 143); Ctrl-C at once.
"""

from tf_landmarks import recognizer
from tf_landmarks import serve
from tf_landmarks.cli import common

common.define_flags(serve.ServeConfig)
common.define_flags(recognizer.RecognizerSettings)


def main() -> int:
  serve.serve(common.from_flags(serve.ServeConfig),
              common.from_flags(recognizer.RecognizerSettings))
  return 0


def run():
  common.run(main)


if __name__ == '__main__':
  run()
