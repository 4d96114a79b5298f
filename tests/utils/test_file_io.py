import os

import pytest

from pix2cap.utils.file_io import atomic_open, atomic_write_dir, remove_stale_temp_files


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


def test_remove_stale_temp_files_removes_only_what_atomic_writes_leave(tmp_path):
    # The name atomic_open gives its temporary file, as a killed process would leave it.
    with atomic_open(str(tmp_path / "model_0000007.pth"), "wb") as f:
        (leftover,) = [name for name in os.listdir(tmp_path)]
        f.write(b"weights")
    assert leftover.startswith(".model_0000007.pth.") and leftover.endswith(".tmp")
    (tmp_path / leftover).write_bytes(b"half a checkpoint")
    (tmp_path / ".metrics.json.a_b0c9de.tmp").write_text("{")
    kept = ["model.tmp", ".model.pth.tmp", "notes.abcd1234.tmp", ".x.ABCD1234.tmp", "a.pth"]
    for name in kept:
        (tmp_path / name).write_text("keep")
    (tmp_path / ".folder.abcd1234.tmp").mkdir()  # not a file
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".deep.pth.abcd1234.tmp").write_text("not directly in the folder")

    removed = remove_stale_temp_files(str(tmp_path))
    assert removed == sorted(str(tmp_path / n) for n in (leftover, ".metrics.json.a_b0c9de.tmp"))
    assert sorted(os.listdir(tmp_path)) == sorted(
        kept + ["model_0000007.pth", ".folder.abcd1234.tmp", "sub"]
    )
    assert os.listdir(tmp_path / "sub") == [".deep.pth.abcd1234.tmp"]
    assert remove_stale_temp_files(str(tmp_path / "missing")) == []
