import os

import pytest

from pix2cap.utils.file_io import atomic_write_dir


def _write(files):
    def write(folder):
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)

    return write


def _siblings(path):
    return sorted(os.listdir(os.path.dirname(path)))


def test_atomic_write_dir_creates_then_replaces_a_whole_folder(tmp_path):
    out = str(tmp_path / "parent" / "model")
    atomic_write_dir(out, _write({"a.txt": "1", "b.txt": "2"}))
    assert sorted(os.listdir(out)) == ["a.txt", "b.txt"]
    # The new folder replaces the old one entirely: no file of the old one is left.
    atomic_write_dir(out, _write({"c.txt": "3"}))
    assert os.listdir(out) == ["c.txt"]
    # No temporary or moved-aside folder remains beside it.
    assert _siblings(out) == ["model"]


def test_atomic_write_dir_leaves_the_old_folder_when_writing_fails(tmp_path):
    out = str(tmp_path / "model")
    atomic_write_dir(out, _write({"a.txt": "old"}))

    def failing(folder):
        _write({"a.txt": "new"})(folder)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_dir(out, failing)
    with open(os.path.join(out, "a.txt")) as f:
        assert f.read() == "old"
    assert _siblings(out) == ["model"]
    with pytest.raises(RuntimeError):
        atomic_write_dir(str(tmp_path / "never"), failing)
    assert not os.path.exists(tmp_path / "never")
