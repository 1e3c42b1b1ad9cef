"""The report's match pictures: a query beside the index image it was verified against.

`drawer(predictions_dir, query_ids)` opens a finished predictions folder and its export (a
`recognizer.Recognizer` with the prediction's settings) once, reads the images of the queries to
draw in one pass over the queries (an index image is read from the records at the place the index
recorded), and returns the `report.DrawMatch` that draws each picture. Opening everything first lets a folder whose export has since been moved
or deleted be reported once, instead of failing half-way through the report.
"""

import dataclasses
from typing import Dict, Iterable, Optional

from tf_landmarks import exports
from tf_landmarks import files
from tf_landmarks import predictions
from tf_landmarks import queries as queries_lib
from tf_landmarks.recognizer import Recognizer
from tf_landmarks.recognizer import RecognizerSettings


@dataclasses.dataclass(frozen=True)
class _Opened:
  """What drawing needs: the journal, the recognizer and the queries' JPEGs."""
  entries: Dict[str, dict]
  recognizer: Recognizer
  query_jpegs: Dict[str, bytes]

  def draw(self, query_id: str, landmark_id: int, png_path: str) -> Optional[str]:
    """Draws the query next to the index image of `landmark_id` it was verified against.

    The index image is the one recorded for that landmark in the query's journal entry, or the
    landmark's first index image if it was not verified.

    Returns:
      A caption ("<inliers> inliers / <matches> matches with index image <id>"), or None when the
      query, its image or the index image cannot be found.
    """
    entry = self.entries.get(query_id)
    jpeg = self.query_jpegs.get(query_id)
    if entry is None or entry.get('status') != 'ok' or jpeg is None:
      return None
    recorded = next((candidate['index_image'] for candidate in entry['candidates']
                     if candidate['landmark_id'] == landmark_id and candidate['index_image']),
                    None)
    picture = self.recognizer.match_picture(jpeg, landmark_id, recorded)
    if picture is None:
      return None
    files.write_atomically(png_path, picture.png)
    return (f'{picture.inliers} inliers / {picture.matches} matches with index image '
            f'{picture.index_image} (landmark {landmark_id})')


def drawer(predictions_dir: str, query_ids: Iterable[str]):
  """The `report.DrawMatch` of the mistakes `query_ids` of one predictions folder.

  Args:
    predictions_dir: a finished `tfl-predict` output folder.
    query_ids: the queries whose pictures will be drawn; their images are read now, in one pass.

  Returns:
    draw(query_id, landmark_id, png_path) -> caption or None.

  Raises:
    predictions.PredictionsError, exports.ExportError, indexes.LandmarkIndexError: the folder,
      its export or the export's index cannot be opened, or the export has no index (or one too
      old) to draw matches from.
  """
  folder = predictions.load(predictions_dir)
  if not folder.export or folder.queries is None:
    raise predictions.PredictionsError(f'{predictions_dir} names no export to draw matches with')
  export = exports.load(folder.export)
  if export.index is None:
    raise predictions.PredictionsError(f'{predictions_dir} names no export with an index to draw '
                                       'matches with')
  names = {field.name for field in dataclasses.fields(RecognizerSettings)}
  recognition = RecognizerSettings(**{key: value for key, value in folder.settings.items()
                                      if key in names})
  recognizer = Recognizer(export, recognition)
  if not recognizer.index.has_checksums:
    raise predictions.PredictionsError(f'the index of {folder.export} was built by an older '
                                       'version, which did not record where its images are '
                                       'stored; rebuild it to draw match pictures')
  wanted = set(query_ids)
  jpegs = {}
  if wanted:
    _, read_queries, _ = queries_lib.open_queries(
        export, test_csv=folder.queries.get('test_csv'), image_dir=folder.queries.get('image_dir'),
        test_records=folder.queries.get('test_records'))
    for image_id, query in read_queries(wanted.__contains__):
      if query is not None and query.jpeg is not None:
        jpegs[image_id] = query.jpeg
        if len(jpegs) == len(wanted):
          break
  return _Opened(folder.entries(), recognizer, jpegs).draw
