"""The real-photo set (../shared/data/landmarks-real) copied N times under new ids: benchmark input."""

import csv
import os
import shutil

REAL_DATA = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'landmarks-real')


def replicate_real_set(copies, data_dir, csv_names):
  """Copies the real photos of `csv_names` `copies` times under fresh ids into `data_dir`/images.

  Returns:
    ({csv name: path of its rewritten copy}, image folder, rows of the rewritten CSVs by name).
  """
  image_dir = os.path.join(data_dir, 'images')
  os.makedirs(image_dir)
  paths, rows_by_name = {}, {}
  for name in csv_names:
    with open(os.path.join(REAL_DATA, name), newline='') as f:
      rows = list(csv.DictReader(f))
    copied = []
    for copy in range(copies):
      for row in rows:
        # Real ids are 16 hex digits with distinct tails: two new leading digits keep them unique.
        new_id = f'{copy:02x}{row["id"][2:]}'
        shutil.copyfile(os.path.join(REAL_DATA, 'images', f'{row["id"]}.jpg'),
                        os.path.join(image_dir, f'{new_id}.jpg'))
        copied.append({**row, 'id': new_id})
    paths[name] = os.path.join(data_dir, name)
    with open(paths[name], 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(copied)
    rows_by_name[name] = copied
  return paths, image_dir, rows_by_name
