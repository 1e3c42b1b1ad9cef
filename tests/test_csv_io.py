"""CSV reading: structural errors raise CsvError, row problems become skipped rows."""

import pytest

from tf_landmarks import csv_io


def _write(tmp_path, text, name='train.csv'):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('image_id,safe', [
    ('0123456789abcdef', True), ('img_01-a.b', True), ('../evil', False), ('a/b', False),
    ('a\\b', False), ('..', False), ('.hidden', False), ('', False), ('x' * 200, False),
    ('a..b', False)])
def test_is_safe_image_id(image_id, safe):
  assert csv_io.is_safe_image_id(image_id) == safe


def test_train_csv_keeps_good_rows_and_explains_bad_ones(tmp_path):
  path = _write(tmp_path, 'id,url,landmark_id\n'
                'aaaa,http://x/a.jpg,1\n'
                'bbbb,http://x/b.jpg,None\n'
                '../etc,http://x/c.jpg,2\n'
                'aaaa,http://x/a2.jpg,3\n'
                ',http://x/e.jpg,4\n'
                'cccc,,-5\n'
                'dddd,,7\n')
  rows, skipped = csv_io.read_train_csv(path)
  assert [(r.image_id, r.landmark_id) for r in rows] == [('aaaa', 1), ('dddd', 7)]
  assert [(s.line, s.reason.split(' ')[0]) for s in skipped] == [
      (3, 'landmark_id'), (4, 'unsafe'), (5, 'duplicate'), (6, 'empty'), (7, 'landmark_id')]


@pytest.mark.parametrize('text,message', [
    ('', 'the file is empty'),
    ('id,url\nabc,http://x\n', 'missing column(s) landmark_id'),
    ('id,url,landmark_id\n', 'no usable rows (it has a header but no rows)'),
    ('id,url,landmark_id\nabc,u,x\n', 'no usable rows (all 1 rows were unusable'),
])
def test_unusable_train_csv_raises_clear_error(tmp_path, text, message):
  with pytest.raises(csv_io.CsvError, match=message.replace('(', r'\(').replace(')', r'\)')):
    csv_io.read_train_csv(_write(tmp_path, text))


def test_missing_file_raises(tmp_path):
  with pytest.raises(csv_io.CsvError, match='file not found'):
    csv_io.read_train_csv(str(tmp_path / 'absent.csv'))


def test_test_csv_needs_only_ids(tmp_path):
  rows, skipped = csv_io.read_test_csv(_write(tmp_path, 'id\nq1\nq2\nq1\n', 'test.csv'))
  assert [r.image_id for r in rows] == ['q1', 'q2'] and rows[0].landmark_id is None
  assert [s.reason for s in skipped] == ['duplicate id']


def test_train_clean_subset_filters_and_relabels(tmp_path):
  clean_path = _write(tmp_path, 'landmark_id,images\n1,aaaa bbbb\n2,cccc\nzz,dddd\n', 'clean.csv')
  clean, skipped = csv_io.read_train_clean_csv(clean_path)
  assert clean == {'aaaa': 1, 'bbbb': 1, 'cccc': 2}
  assert len(skipped) == 1
  rows, _ = csv_io.read_train_csv(_write(tmp_path, 'id,url,landmark_id\naaaa,u1,1\neeee,u2,1\n'
                                         'cccc,u3,2\n'))
  kept, dropped = csv_io.apply_clean_subset(rows, clean, 'train.csv')
  assert sorted((r.image_id, r.url, r.landmark_id) for r in kept) == [
      ('aaaa', 'u1', 1), ('bbbb', '', 1), ('cccc', 'u3', 2)]
  assert [(d.image_id, d.reason) for d in dropped] == [('eeee', 'not in the clean subset')]


@pytest.mark.parametrize('landmark_id,reason', [
    ('99999999999999999999', 'too large'), ('9223372036854775808', 'too large'),
    ('1_0001', 'not a non-negative integer'), ('١٢٣', 'not a non-negative integer'),
    ('+5', 'not a non-negative integer'), ('1 2', 'not a non-negative integer'),
    ('9' * 5000, 'too large')])
def test_landmark_id_must_be_ascii_digits_within_int64(tmp_path, landmark_id, reason):
  path = _write(tmp_path, f'id,landmark_id\ngood,7\nbad,{landmark_id}\n')
  rows, skipped = csv_io.read_train_csv(path)
  assert [(r.image_id, r.landmark_id) for r in rows] == [('good', 7)]
  assert [(s.line, s.image_id) for s in skipped] == [(3, 'bad')]
  assert reason in skipped[0].reason and len(skipped[0].reason) < 120


def test_landmark_id_edges_that_are_accepted(tmp_path):
  path = _write(tmp_path, 'id,landmark_id\n'
                'a, 9223372036854775807 \n'
                'b,0000000000000000000000012\n'
                'c,0\n')
  rows, skipped = csv_io.read_train_csv(path)
  assert [r.landmark_id for r in rows] == [2**63 - 1, 12, 0] and not skipped


def test_utf8_byte_order_mark_is_ignored(tmp_path):
  path = tmp_path / 'train.csv'
  path.write_bytes('\ufeffid,url,landmark_id\naaaa,u,1\n'.encode('utf-8'))
  rows, skipped = csv_io.read_train_csv(str(path))
  assert [(r.image_id, r.landmark_id) for r in rows] == [('aaaa', 1)] and not skipped
  path.write_bytes('\ufeff"id"\nq1\n'.encode('utf-8'))
  assert [r.image_id for r in csv_io.read_test_csv(str(path))[0]] == ['q1']


def test_train_clean_takes_comma_separated_ids_and_skips_rows_without_ids(tmp_path):
  clean_path = _write(tmp_path, 'landmark_id,images\n'
                      '1,aaaa,bbbb cccc\n'
                      '2,"dddd, eeee"\n'
                      '3,\n'
                      '4\n'
                      '5, , ,\n', 'clean.csv')
  clean, skipped = csv_io.read_train_clean_csv(clean_path)
  assert clean == {'aaaa': 1, 'bbbb': 1, 'cccc': 1, 'dddd': 2, 'eeee': 2}
  assert [(s.line, s.reason) for s in skipped] == [
      (4, 'no images listed'), (5, 'no images listed'), (6, 'no images listed')]
