"""Reading images, and reading and writing panoptic PNGs, with errors that name the file and
say what is wrong.

Real datasets contain grayscale and RGBA images among RGB ones (COCO has grayscale JPEGs);
they are converted to RGB with a warning instead of crashing a long training run. Files that
are missing, truncated or undecodable raise :class:`DatasetError`, and so do images with more
pixels than a limit (``INPUT.MAX_IMAGE_PIXELS``), checked from the header before anything is
decoded, so a tool can report the file and go on with the next one.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Any, Optional, Union

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pix2cap.structures.panoptic import PanopticResult, id2rgb, rgb2id

from .errors import DatasetError

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "read_image",
    "read_panoptic_png",
    "encode_panoptic_png",
    "read_panoptic_result",
    "check_image_size",
    "num_converted_images",
    "reset_converted_image_count",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Conversions are logged by file name for the first few, then once every N, so a dataset with
# thousands of grayscale images does not flood the log but the count stays visible.
_LOG_FIRST_CONVERSIONS = 10
_LOG_CONVERSION_EVERY_N = 500
_conversion_lock = threading.Lock()
_num_converted = 0

# Channel orders read_image can return.
_SUPPORTED_FORMATS = ("RGB", "BGR")

# read_image's limit unless told otherwise; the default of INPUT.MAX_IMAGE_PIXELS. Below PIL's
# own refusal (2 x PIL.Image.MAX_IMAGE_PIXELS, 179 megapixels unless changed), so the limit a
# user meets is the one the config names. 150 megapixels decode to 450 MB of RGB.
DEFAULT_MAX_IMAGE_PIXELS = 150_000_000


def num_converted_images() -> int:
    """How many non-RGB images (grayscale, RGBA, palette, CMYK, ...) this process converted."""
    return _num_converted


def reset_converted_image_count() -> None:
    """Set the conversion counter back to 0 (useful between evaluation runs and in tests)."""
    global _num_converted
    with _conversion_lock:
        _num_converted = 0


def _note_conversion(path: PathLike, mode: str) -> None:
    global _num_converted
    with _conversion_lock:
        _num_converted += 1
        count = _num_converted
    if count <= _LOG_FIRST_CONVERSIONS or count % _LOG_CONVERSION_EVERY_N == 0:
        logger.warning(
            "%s: image mode %s is not RGB; converted to RGB (%d image(s) converted so far)",
            path,
            mode,
            count,
        )


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.3g}"


def _open_header(path: PathLike, max_pixels: Optional[int]) -> Image.Image:
    """``Image.open`` (reads the header only) with the pixel limits applied before decoding.

    PIL refuses images above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` as possible decompression
    bombs and warns above ``PIL.Image.MAX_IMAGE_PIXELS``; both become a :class:`DatasetError`
    naming the file (the warning only where warnings are errors). With ``max_pixels`` set,
    that limit decides instead of PIL's warning, which is then not shown.
    """
    try:
        with warnings.catch_warnings():
            if max_pixels:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DatasetError(
            path,
            f"refused as a possible decompression bomb: {e} (PIL.Image.MAX_IMAGE_PIXELS = "
            f"{Image.MAX_IMAGE_PIXELS})",
        ) from e
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        image.close()
        raise DatasetError(
            path,
            f"{width}x{height}: {_megapixels(width * height)} megapixels is above the limit "
            f"{_megapixels(max_pixels)} (INPUT.MAX_IMAGE_PIXELS)",
        )
    return image


def _open_and_load(path: PathLike, max_pixels: Optional[int] = None) -> Image.Image:
    """Open an image with PIL and decode all of it, so truncation is detected here; an image
    above ``max_pixels`` (None or 0: only PIL's own limit) is refused before decoding."""
    if not os.path.isfile(path):
        raise DatasetError(path, "file not found")
    # A truncated file must fail, not be padded with grey silently; other code in the process
    # may have flipped this PIL-wide switch.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image = _open_header(path, max_pixels)
        image.load()
    except DatasetError:
        raise  # a refusal that names its reason (DatasetError is a ValueError)
    except UnidentifiedImageError as e:
        raise DatasetError(path, f"not a readable image (corrupt or unknown format): {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncated data as OSError ("image file is truncated") and damaged
        # headers/chunks as OSError, SyntaxError or ValueError depending on the format.
        raise DatasetError(path, f"corrupt or truncated image file: {e}") from e
    return image


def _apply_exif_orientation(image: Image.Image, path: PathLike) -> Image.Image:
    """Rotate/flip the pixels as the EXIF Orientation tag says (as detectron2 does), so the
    array matches the width/height annotation tools saw."""
    try:
        # In place: otherwise PIL returns a full copy even when there is nothing to turn.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as e:  # a broken EXIF block must not make the image unusable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, e)
    return image


def _to_rgb(image: Image.Image, path: PathLike) -> Image.Image:
    """RGB version of any PIL image: gray is replicated, alpha is composited over black."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:4] / 255.0)
        converted = Image.fromarray(np.round(rgb).astype(np.uint8), mode="RGB")
    elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # High bit-depth gray: rescale to 8 bits by the type's range before replicating.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8)
        converted = Image.fromarray(np.repeat(gray[..., None], 3, axis=2), mode="RGB")
    else:  # "L", "1", "CMYK", "YCbCr", "LAB", "HSV"
        converted = image.convert("RGB")
    _note_conversion(path, mode)
    return converted


def read_image(
    path: PathLike,
    format: str = "RGB",
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Read an image file as a uint8 array.

    Args:
        path: image file (JPEG, PNG, ...).
        format: channel order of the result, "RGB" or "BGR".
        max_pixels: refuse images with more pixels than this (``INPUT.MAX_IMAGE_PIXELS``),
            from the file's header, before decoding; None or 0: only PIL's own
            decompression-bomb limit applies.
    Returns:
        uint8 ndarray [H, W, 3], EXIF orientation applied.
    Raises:
        DatasetError: the file is missing, corrupt or truncated, above ``max_pixels``, or
        refused by PIL as a possible decompression bomb; the message starts with the path.
    """
    if format not in _SUPPORTED_FORMATS:
        raise ValueError(f"read_image: format must be one of {_SUPPORTED_FORMATS}, got {format!r}")
    image = _open_and_load(path, max_pixels)
    image = _apply_exif_orientation(image, path)
    image = _to_rgb(image, path)
    array = _rgb_array(image)
    if format == "BGR":
        array = np.ascontiguousarray(array[:, :, ::-1])
    return array


def _rgb_array(image: Image.Image, band_bytes: int = 1 << 20) -> np.ndarray:
    """uint8 [H, W, 3] of an RGB PIL image, copied a band of rows at a time: ``np.asarray``
    joins the whole image into one ``bytes`` first, a second full copy at the peak."""
    width, height = image.size
    array = np.empty((height, width, 3), dtype=np.uint8)
    rows = max(1, band_bytes // max(1, 3 * width))
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        array[top:bottom] = np.asarray(image.crop((0, top, width, bottom)), dtype=np.uint8)
    return array


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_8bit_rgb_png(path: str) -> bool:
    """Whether the file's PNG header says 8-bit truecolour (IHDR bit depth 8, colour type 2).

    OpenCV silently expands palette PNGs to BGR, which would turn palette indices into wrong
    ids; the header tells those apart before decoding."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return False
    # Signature (8 bytes), IHDR length and type (8), width and height (8), bit depth, colour type.
    return (
        len(head) == 26
        and head[:8] == _PNG_SIGNATURE
        and head[12:16] == b"IHDR"
        and (head[24], head[25]) == (8, 2)
    )


def read_panoptic_png(path: PathLike) -> np.ndarray:
    """Read a COCO-style panoptic PNG as segment ids.

    Returns:
        int64 ndarray [H, W], id = R + 256 * G + 256^2 * B (0 is VOID).
    Raises:
        DatasetError: the file is missing, corrupt/truncated, or not an 8-bit RGB PNG (a
        palette or grayscale PNG cannot hold the id encoding, so guessing would mislabel).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(path, "file not found")
    # OpenCV decodes several times faster than PIL; evaluators read one PNG per image.
    bgr = cv2.imread(path, cv2.IMREAD_UNCHANGED) if _is_8bit_rgb_png(path) else None
    if bgr is not None and bgr.dtype == np.uint8 and bgr.ndim == 3 and bgr.shape[2] == 3:
        return rgb2id(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    # OpenCV gives no reason for a failure: PIL names it (corrupt, truncated, wrong mode), and
    # decodes the valid 8-bit RGB files OpenCV reads otherwise (a transparency chunk: BGRA).
    image = _open_and_load(path)
    if image.mode != "RGB":
        raise DatasetError(
            path,
            f"panoptic PNG must be 8-bit RGB (id = R + 256*G + 256^2*B), got mode {image.mode}",
        )
    return rgb2id(np.asarray(image, dtype=np.uint8))


def encode_panoptic_png(ids: np.ndarray, compress_level: int = 1) -> bytes:
    """Segment ids as the bytes of a COCO panoptic PNG.

    Args:
        ids: integer ndarray [H, W] of ids in ``[0, 256^3)``.
        compress_level: zlib level 0-9 (1: fast, larger files).
    Returns:
        The PNG file (8-bit RGB, id = R + 256 * G + 256^2 * B), which :func:`read_panoptic_png`
        reads back to ``ids``.
    Raises:
        ValueError: ``ids`` is not 2-D or holds ids outside ``[0, 256^3)``.
    """
    rgb = id2rgb(ids)
    ok, png = cv2.imencode(
        ".png", rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, int(compress_level)]
    )
    if not ok:
        raise RuntimeError(f"could not encode a {rgb.shape[0]}x{rgb.shape[1]} panoptic PNG")
    return png.tobytes()


def check_image_size(dataset_dict: dict[str, Any], image: np.ndarray) -> None:
    """Check the decoded image against the size in its annotation, filling it in if absent.

    Args:
        dataset_dict: a dataset dict (``file_name``, optional ``height``/``width``); the
            missing size keys are set from the image.
        image: ndarray [H, W, ...].
    Raises:
        DatasetError: the annotation's (height, width) differs from the image's.
    """
    actual_h, actual_w = int(image.shape[0]), int(image.shape[1])
    expected_h = dataset_dict.get("height")
    expected_w = dataset_dict.get("width")
    if expected_h is not None and expected_w is not None:
        if (int(expected_h), int(expected_w)) != (actual_h, actual_w):
            raise DatasetError(
                dataset_dict.get("file_name", "<no file_name>"),
                f"image is {actual_h}x{actual_w} (HxW) but the annotation says "
                f"{int(expected_h)}x{int(expected_w)}; the annotation belongs to another "
                "image, or the image's EXIF orientation rotates it",
            )
    if expected_h is None:
        dataset_dict["height"] = actual_h
    if expected_w is None:
        dataset_dict["width"] = actual_w


def read_panoptic_result(
    dataset_dict: dict[str, Any],
    metadata: Any = None,
    *,
    image_size: tuple[int, int] | None = None,
) -> PanopticResult:
    """The ground truth of a dataset dict as a :class:`PanopticResult`: its panoptic PNG
    (``pan_seg_file_name``) and ``segments_info`` (contiguous ``category_id``; the
    ``description`` of a segment is its caption).

    Args:
        dataset_dict: a dataset dict (see ``pix2cap.data.datasets``).
        metadata: the dataset's :class:`~pix2cap.data.catalog.Metadata` (class names,
            thing/stuff); None names classes ``class <id>``.
        image_size: ``(height, width)`` the PNG must have; default: the dict's ``height`` /
            ``width`` when both are present.
    Raises:
        DatasetError: the dict has no PNG or segments, the PNG cannot be read, its size is
            not the image's, or its segments are inconsistent (a repeated or VOID id).
    """
    file_name = dataset_dict.get("file_name", "<dataset dict without file_name>")
    png = dataset_dict.get("pan_seg_file_name")
    if not png:
        raise DatasetError(file_name, "dataset dict has no 'pan_seg_file_name' to read")
    if "segments_info" not in dataset_dict:
        raise DatasetError(file_name, "dataset dict has no 'segments_info' to read")
    ids = read_panoptic_png(png)
    if image_size is None and dataset_dict.get("height") is not None:
        if dataset_dict.get("width") is not None:
            image_size = (int(dataset_dict["height"]), int(dataset_dict["width"]))
    if image_size is not None and tuple(ids.shape) != tuple(image_size):
        raise DatasetError(
            png,
            f"panoptic PNG is {ids.shape[0]}x{ids.shape[1]} (HxW) but the image "
            f"{file_name} is {image_size[0]}x{image_size[1]}",
        )
    try:
        return PanopticResult.from_panoptic(
            ids, dataset_dict["segments_info"], metadata, caption_key="description"
        )
    except (KeyError, ValueError, TypeError) as e:
        raise DatasetError(png, f"segments_info does not fit the PNG: {e}") from None
