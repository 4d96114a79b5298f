"""The command-line helpers of the tools: config from arguments, image inputs."""

import os
from argparse import Namespace

import pytest

from pix2cap.engine.defaults import collect_image_files, setup_cfg


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


def test_collect_image_files_from_files_folders_and_patterns(tmp_path):
    a = _touch(tmp_path / "imgs" / "a.png")
    b = _touch(tmp_path / "imgs" / "B.JPG")
    _touch(tmp_path / "imgs" / "notes.txt")
    (tmp_path / "imgs" / "sub.jpg").mkdir()  # a folder named like an image is not one
    c = _touch(tmp_path / "more" / "c.jpeg")
    folder = str(tmp_path / "imgs")
    assert collect_image_files([folder]) == [b, a]  # sorted by name, as given (not absolute)
    # Files are taken as given and a path named twice is kept once, in first-seen order.
    assert collect_image_files([c, folder, a]) == [c, b, a]
    assert collect_image_files([str(tmp_path / "*" / "*.jp*g")]) == [
        os.path.join(str(tmp_path), "more", "c.jpeg")
    ]
    assert collect_image_files([folder], extensions=(".txt",)) == [
        os.path.join(folder, "notes.txt")
    ]


def test_collect_image_files_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png: no such file or folder"):
        collect_image_files([str(tmp_path / "nowhere.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: folder holds no .png/.jpg/.jpeg image"):
        collect_image_files([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match=r"\*.png: pattern matches no"):
        collect_image_files([str(tmp_path / "empty" / "*.png")])


def test_setup_cfg_applies_the_file_and_the_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("SEED: 7\n")
    cfg = setup_cfg(Namespace(config_file=str(config), opts=["OUTPUT_DIR", "/tmp/x"]))
    assert (cfg.SEED, cfg.OUTPUT_DIR) == (7, "/tmp/x")
    assert setup_cfg(Namespace(config_file="", opts=[])).SEED == setup_cfg(
        Namespace(config_file="", opts=None)
    ).SEED
