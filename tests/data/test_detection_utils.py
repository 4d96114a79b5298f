"""Panoptic PNG reading and writing (pix2cap.data.detection_utils)."""

import numpy as np
import pytest
from PIL import Image

from pix2cap.data.detection_utils import encode_panoptic_png, read_panoptic_png
from pix2cap.data.errors import DatasetError
from pix2cap.structures import id2rgb

IDS = np.array([[0, 1, 256], [65536, 0xABCDEF, 0xFFFFFF]], dtype=np.int64)


def test_read_panoptic_png(tmp_path):
    Image.fromarray(id2rgb(IDS)).save(tmp_path / "ids.png")
    decoded = read_panoptic_png(tmp_path / "ids.png")
    assert decoded.dtype == np.int64
    np.testing.assert_array_equal(decoded, IDS)
    # A transparency chunk makes OpenCV return BGRA; the file is still 8-bit RGB.
    Image.fromarray(id2rgb(IDS)).save(tmp_path / "trns.png", transparency=(0, 0, 0))
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "trns.png"), IDS)


def test_encode_panoptic_png_round_trip(tmp_path):
    for level in (0, 1, 9):
        path = tmp_path / f"level{level}.png"
        path.write_bytes(encode_panoptic_png(IDS, level))
        np.testing.assert_array_equal(read_panoptic_png(path), IDS)
        with Image.open(path) as image:
            assert image.mode == "RGB"
    (tmp_path / "int32.png").write_bytes(encode_panoptic_png(IDS.astype(np.int32)))
    np.testing.assert_array_equal(read_panoptic_png(tmp_path / "int32.png"), IDS)
    with pytest.raises(ValueError, match=r"\[0, 256\^3\)"):
        encode_panoptic_png(np.array([[1 << 24]]))
    with pytest.raises(ValueError, match="expected an \\[H, W\\] array"):
        encode_panoptic_png(np.zeros((2, 2, 3), dtype=np.int64))


def test_read_panoptic_png_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"missing\.png: file not found"):
        read_panoptic_png(tmp_path / "missing.png")
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "gray.png")
    with pytest.raises(DatasetError, match=r"gray\.png: panoptic PNG must be 8-bit RGB"):
        read_panoptic_png(tmp_path / "gray.png")
    # OpenCV would expand a palette PNG to colours; it must be refused, not read as ids.
    Image.fromarray(id2rgb(IDS)).convert("P").save(tmp_path / "palette.png")
    with pytest.raises(DatasetError, match=r"palette\.png: panoptic PNG must be 8-bit RGB.*mode P"):
        read_panoptic_png(tmp_path / "palette.png")
    Image.fromarray(np.zeros((2, 2, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    with pytest.raises(DatasetError, match=r"rgba\.png: panoptic PNG must be 8-bit RGB.*RGBA"):
        read_panoptic_png(tmp_path / "rgba.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(DatasetError, match=r"junk\.png: not a readable image"):
        read_panoptic_png(tmp_path / "junk.png")
    ids = np.arange(64 * 64, dtype=np.int64).reshape(64, 64)
    data = encode_panoptic_png(ids, 0)
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png: corrupt or truncated"):
        read_panoptic_png(tmp_path / "cut.png")
