"""Panoptic PNG reading and writing, and image size limits (pix2cap.data.detection_utils)."""

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from pix2cap.config import get_cfg
from pix2cap.data.detection_utils import (
    DEFAULT_MAX_IMAGE_PIXELS,
    encode_panoptic_png,
    read_image,
    read_panoptic_png,
)
from pix2cap.data.errors import DatasetError
from pix2cap.data.mappers import build_dataset_mapper
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


# -- image size limits ------------------------------------------------------------------------


def _photo(path, height, width):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def test_oversize_image_is_refused_naming_the_file(tmp_path):
    path = _photo(tmp_path / "big.png", 50, 60)  # 3000 pixels
    with pytest.raises(DatasetError, match=r"big\.png: 60x50: 0\.003 megapixels is above the "
                       r"limit 0\.0025 \(INPUT\.MAX_IMAGE_PIXELS\)$") as raised:
        read_image(path, max_pixels=2500)
    assert raised.value.path == str(path)
    # At the limit, and without one, the image is read (and is the same image).
    expected = np.asarray(Image.open(path))
    np.testing.assert_array_equal(read_image(path, max_pixels=3000), expected)
    np.testing.assert_array_equal(read_image(path, max_pixels=None), expected)
    np.testing.assert_array_equal(read_image(path, max_pixels=0), expected)
    assert read_image(path).flags.writeable  # a copy of its own, not PIL's read-only bytes


def test_limit_is_checked_from_the_header_before_decoding(tmp_path):
    # A PNG whose header says 13000 x 12000 (156 megapixels: above the default limit, below
    # PIL's refusal) and whose pixel data stops after a few bytes: refused by its size, not
    # reported as truncated, and its 468 MB are never allocated.
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    path = tmp_path / "huge.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 12000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(bytes(64)))
    )
    with pytest.raises(DatasetError, match=r"huge\.png: 13000x12000: 156 megapixels is above "
                       r"the limit 150 \(INPUT\.MAX_IMAGE_PIXELS\)"):
        read_image(path)


def test_pil_decompression_bomb_is_reported_with_the_path(tmp_path, monkeypatch):
    path = _photo(tmp_path / "bomb.png", 50, 60)
    # PIL refuses above twice its limit, whatever read_image's own limit is.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for limit in (None, 10**6):
        with pytest.raises(DatasetError, match=r"bomb\.png: refused as a possible decompression "
                           r"bomb: Image size \(3000 pixels\) exceeds limit of 2000 pixels"):
            read_image(path, max_pixels=limit)
    # Above PIL's limit but not twice it PIL only warns: where warnings are errors that is a
    # DatasetError too, unless read_image's own limit decides (then PIL's warning is not shown).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DatasetError, match=r"bomb\.png: refused as a possible decompression"):
            read_image(path, max_pixels=None)
        assert read_image(path, max_pixels=10**6).shape == (50, 60, 3)


def test_config_default_is_read_images_default():
    cfg = get_cfg()
    assert cfg.INPUT.MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS == 150_000_000
    # Below PIL's own refusal (2 x its limit), so the limit users meet is the config's.
    assert DEFAULT_MAX_IMAGE_PIXELS < 2 * Image.MAX_IMAGE_PIXELS


def test_mapper_applies_the_config_limit(tmp_path):
    path = _photo(tmp_path / "photo.png", 50, 60)
    cfg = get_cfg()
    cfg.INPUT.MAX_IMAGE_PIXELS = 2000
    mapper = build_dataset_mapper(cfg, is_train=False)
    with pytest.raises(DatasetError, match=r"photo\.png: 60x50: .*INPUT\.MAX_IMAGE_PIXELS"):
        mapper({"file_name": str(path), "image_id": 1})
    cfg.INPUT.MAX_IMAGE_PIXELS = 0
    assert build_dataset_mapper(cfg, is_train=False)({"file_name": str(path)})["height"] == 50
