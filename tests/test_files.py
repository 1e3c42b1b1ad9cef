"""files.py: the folder lock and the recorded checksums every artifact uses."""

import os

import pytest

from tf_landmarks import errors
from tf_landmarks import files


class _Damaged(errors.UserError):
  pass


def test_a_second_writer_of_a_folder_is_refused_until_the_first_ends(tmp_path):
  with files.exclusive_writer(str(tmp_path), 'tfl-train', _Damaged):
    with pytest.raises(_Damaged, match=f'another tfl-train is writing to {tmp_path}'):
      with files.exclusive_writer(str(tmp_path), 'tfl-train', _Damaged):
        pass
  with files.exclusive_writer(str(tmp_path), 'tfl-train', _Damaged):
    pass  # Released.


def _artifact(tmp_path):
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'a.bin').write_bytes(b'abcdef')
  (tmp_path / 'sub' / 'b.bin').write_bytes(b'123')
  return files.checksums(str(tmp_path), ['a.bin', 'sub/b.bin'])


def _verify(tmp_path, expected, full=False):
  files.verify_checksums(str(tmp_path), expected, what='the index', hint='rebuild it',
                         error=_Damaged, full=full)


def test_checksums_record_size_and_digest(tmp_path):
  expected = _artifact(tmp_path)
  assert expected['sub/b.bin'] == {
      'bytes': 3, 'sha256': 'a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3'}
  _verify(tmp_path, expected)


def test_a_missing_or_resized_file_is_named(tmp_path):
  expected = _artifact(tmp_path)
  (tmp_path / 'a.bin').write_bytes(b'abc')
  with pytest.raises(_Damaged, match=r'a.bin has 3 bytes, the index recorded 6 .*; rebuild it'):
    _verify(tmp_path, expected)
  (tmp_path / 'a.bin').unlink()
  with pytest.raises(_Damaged, match=r'a.bin is missing from the index; rebuild it'):
    _verify(tmp_path, expected)


def test_a_changed_byte_is_found_and_a_verified_folder_is_not_hashed_again(tmp_path):
  expected = _artifact(tmp_path)
  _verify(tmp_path, expected)  # Leaves the stamp.
  path = tmp_path / 'a.bin'
  stat = path.stat()
  path.write_bytes(b'abcdeX')
  # Same size, new modification time: hashed again.
  with pytest.raises(_Damaged, match=r'a.bin is not the file the index was written with'):
    _verify(tmp_path, expected)
  # With the old time put back, only a full check sees it (that is what the stamp saves).
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  _verify(tmp_path, expected)
  with pytest.raises(_Damaged, match=r'a.bin is not the file the index was written with'):
    _verify(tmp_path, expected, full=True)


def test_checksums_taken_when_writing_leave_the_stamp_of_a_full_check(tmp_path):
  (tmp_path / 'a.bin').write_bytes(b'abcdef')
  expected = files.checksums(str(tmp_path), ['a.bin'], stamp=True)
  stat = (tmp_path / 'a.bin').stat()
  (tmp_path / 'a.bin').write_bytes(b'abcdeX')
  os.utime(tmp_path / 'a.bin', ns=(stat.st_atime_ns, stat.st_mtime_ns))
  _verify(tmp_path, expected)  # The stamp says nothing changed: not hashed again.
  with pytest.raises(_Damaged, match=r'a.bin is not the file the index was written with'):
    _verify(tmp_path, expected, full=True)
