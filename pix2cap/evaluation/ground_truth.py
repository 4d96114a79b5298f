"""Ground-truth panoptic PNGs for evaluators: each file decoded once, decoding in threads.

:class:`GroundTruthReader` is shared by the evaluators of one evaluation (``Pix2CapEvaluator``
hands one to its PQ and dense-caption evaluators), so a PNG that both need is decoded once:

* an *entry* per file decodes it at most once, in whichever thread asks first (a prefetching
  worker or an evaluator); later askers wait for that decode or get its result (or its
  exception);
* a small LRU keeps the last ``cache_size`` entries; :meth:`GroundTruthReader.pinned` keeps a
  batch's entries for the duration of a block whatever the batch size, and evaluators keep the
  entries of the images they have queued, so memory stays bounded by a few id maps;
* ``num_workers`` threads decode ahead (:meth:`~GroundTruthReader.prefetch`); PNG decoding
  (Wuffs', or OpenCV's) releases the GIL, so they use other cores while the evaluators count
  in the calling thread. An asker never waits for a queued prefetch: it decodes the file
  itself, and the prefetch, when its turn comes, finds nothing left to do.

The evaluators keep their numpy work (counting, mask encoding) in the calling thread: done in
worker threads as well, it made the PQ evaluation slower on a 2-core machine (measured
with libpng's decoding: 3.22 against 2.76 ms an image on 200 images of 480x640),
as its large temporary arrays went back to the system and faulted in again (glibc's
per-thread arenas).

:func:`read_panoptic_ids` decodes an 8-bit RGB panoptic PNG straight to ``uint32`` ids (one
file read, decoded to RGBA words); anything else goes to
:func:`pix2cap.data.detection_utils.read_panoptic_png`, which gives the same ids or the error.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional

import cv2
import numpy as np

from pix2cap.data.detection_utils import read_panoptic_png

try:  # Wuffs: 2.5x faster than libpng on panoptic PNGs (its inflate), GIL released too
    from pywuffs import ImageDecoderType, PixelFormat
    from pywuffs.aux import ImageDecoder, ImageDecoderConfig
except ImportError:  # platforms without its wheels: OpenCV decodes
    ImageDecoder = None

__all__ = ["GroundTruthEntry", "GroundTruthReader", "default_num_workers", "read_panoptic_ids"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PathLike = str | os.PathLike


def read_panoptic_ids(path: PathLike) -> np.ndarray:
    """The segment ids of a COCO panoptic PNG (``R + 256 G + 256^2 B``, 0 = VOID).

    The same ids as :func:`~pix2cap.data.detection_utils.read_panoptic_png`, as ``uint32``
    (half the memory of int64; every evaluator accepts any integer dtype): the file is read
    once and decoded from memory to RGBA (Wuffs, else OpenCV), which lays each pixel out as a
    little-endian word whose low 24 bits are the id. Files that are not 8-bit RGB PNGs
    (palette, grey, 16-bit), missing, corrupt or truncated files go to ``read_panoptic_png``
    (int64 ids, or its ``DatasetError``).

    Returns:
        uint32 [H, W] (int64 [H, W] from the fallback).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        data = b""
    # IHDR: bit depth 8, colour type 2 (truecolour). Decoders expand palette PNGs silently to
    # RGB (palette indices would become wrong ids), so the header decides, as in
    # read_panoptic_png.
    if (
        len(data) >= 26
        and data[:8] == _PNG_SIGNATURE
        and data[12:16] == b"IHDR"
        and (data[24], data[25]) == (8, 2)
    ):
        rgba = _decode_rgba(data)
        if rgba is not None:
            ids = rgba.view("<u4")[..., 0]
            ids &= 0xFFFFFF  # R + 256 G + 256^2 B + 2^24 * alpha
            return ids
    return read_panoptic_png(path)


_wuffs = threading.local()  # a Wuffs decoder holds state: one per thread


def _decode_rgba(data: bytes) -> Optional[np.ndarray]:
    """uint8 [H, W, 4] RGBA of an 8-bit RGB PNG's bytes, or None where it does not decode
    (corrupt, truncated; the colour channels of a transparency chunk's pixels are kept)."""
    if ImageDecoder is None:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            return None  # BGRA from a transparency chunk: read_panoptic_png reads it
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGBA)
    # pywuffs always decodes with checksums off: a damaged file would give wrong ids
    # silently, so the chunks' CRC-32 are checked here first, as libpng checks them.
    if not _chunks_intact(data):
        return None
    decoder = getattr(_wuffs, "decoder", None)
    if decoder is None:
        config = ImageDecoderConfig()
        config.enabled_decoders = [ImageDecoderType.PNG]
        config.pixel_format = PixelFormat.RGBA_NONPREMUL
        decoder = _wuffs.decoder = ImageDecoder(config)
    result = decoder.decode(data)
    image = result.pixbuf
    if result.error_message or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 4:
        return None
    return image


def _chunks_intact(data: bytes) -> bool:
    """Whether every chunk of a PNG, up to IEND, is whole and matches its CRC-32."""
    view = memoryview(data)
    pos, size = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= size:
        end = pos + 8 + int.from_bytes(view[pos : pos + 4], "big")
        if end + 4 > size:
            return False
        if zlib.crc32(view[pos + 4 : end]) != int.from_bytes(view[end : end + 4], "big"):
            return False
        if view[pos + 4 : pos + 8] == b"IEND":
            return True
        pos = end + 4
    return False


def default_num_workers() -> int:
    """Decoding threads when none are asked for: the cores, at most 4 (decoding one PNG takes
    a few milliseconds; more threads only help a benchmark, not a model-bound evaluation)."""
    return max(1, min(4, os.cpu_count() or 1))


class GroundTruthEntry:
    """One file's ids, decoded at most once, by whichever thread first calls :meth:`result`
    (or a prefetching worker)."""

    __slots__ = ("path", "_reader", "_lock", "_claimed", "_done", "_value", "_error")

    def __init__(self, path: str, reader: "GroundTruthReader"):
        self.path = path
        self._reader = reader
        self._lock = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._value: Optional[np.ndarray] = None
        self._error: Optional[BaseException] = None

    def done(self) -> bool:
        return self._done.is_set()

    def _claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def _decode(self) -> None:
        try:
            self._value = self._reader._read(self.path)
        except BaseException as e:  # kept for every asker, as a Future would
            self._error = e
        finally:
            self._done.set()

    def _prefetch(self) -> None:
        if self._claim():
            self._decode()

    def result(self) -> np.ndarray:
        """The id map (read-only: it is shared); raises the decoding error, if any."""
        if self._claim():
            self._decode()
        else:
            self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class GroundTruthReader:
    """Decodes ground-truth panoptic PNGs for evaluators, each at most once while in use,
    in a small thread pool (module docstring).

    Args:
        num_workers: decoding threads; 0 = every decode in the calling thread, when asked
            for. None: :func:`default_num_workers`.
        cache_size: entries kept besides the pinned ones (each one decoded map).
        read_fn: ``path -> Int[H, W] ids``; default :func:`read_panoptic_ids` (looked up on
            each call, so tests can count reads by patching it).

    The pool is created on first use and shut down by :meth:`close` (evaluators call it at
    the end of ``evaluate``; a later use starts a new one).
    """

    def __init__(
        self,
        num_workers: Optional[int] = None,
        cache_size: int = 4,
        read_fn: Optional[Callable[[str], np.ndarray]] = None,
    ):
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.cache_size = max(0, int(cache_size))
        self._read_fn = read_fn
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, GroundTruthEntry] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self.num_decoded = 0  # files decoded (or failed) since construction

    # ------------------------------------------------------------------------------ entries
    def _read(self, path: str) -> np.ndarray:
        with self._lock:
            self.num_decoded += 1
        ids = (self._read_fn or read_panoptic_ids)(path)
        ids.flags.writeable = False  # shared by evaluators: none may change it
        return ids

    def entry(self, path: PathLike) -> GroundTruthEntry:
        """The entry of ``path`` (cached, or new); hold it to keep its map alive."""
        key = os.fspath(path)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = GroundTruthEntry(key, self)
                self._entries[key] = entry
            self._entries.move_to_end(key)
            self._evict()
        return entry

    def _evict(self) -> None:
        unpinned = [k for k in self._entries if k not in self._pins]
        for key in unpinned[: max(0, len(unpinned) - self.cache_size)]:
            del self._entries[key]

    def read(self, path: PathLike) -> np.ndarray:
        """The ids of ``path`` (read-only ndarray), decoded now unless decoded or decoding."""
        return self.entry(path).result()

    def prefetch(self, paths: Iterable[PathLike]) -> list[GroundTruthEntry]:
        """Start decoding ``paths`` in the pool (nothing happens without workers) and return
        their entries. Keep them pinned (:meth:`pinned`) or hold the entries, or an LRU
        smaller than the batch drops them before use."""
        entries = [self.entry(p) for p in paths]
        if self.num_workers > 0:
            for entry in entries:
                if not entry.done():
                    self._executor().submit(entry._prefetch)
        return entries

    @contextmanager
    def pinned(self, paths: Iterable[PathLike]) -> Iterator[list[GroundTruthEntry]]:
        """Prefetch ``paths`` and keep their entries cached until the block ends (every
        evaluator of a batch then shares one decode per file, whatever the batch size)."""
        keys = [os.fspath(p) for p in paths]
        with self._lock:
            for key in keys:
                self._pins[key] = self._pins.get(key, 0) + 1
        try:
            yield self.prefetch(keys)
        finally:
            with self._lock:
                for key in keys:
                    count = self._pins.get(key, 0) - 1
                    if count > 0:
                        self._pins[key] = count
                    else:
                        self._pins.pop(key, None)
                self._evict()

    # ---------------------------------------------------------------------------------- work
    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.num_workers, thread_name_prefix="pix2cap-gt"
                )
            return self._pool

    def clear(self) -> None:
        """Forget the cached entries (entries held elsewhere stay valid)."""
        with self._lock:
            self._entries.clear()
            self._pins.clear()

    def close(self) -> None:
        """Clear the cache and shut the pool down (waiting for running decodes; queued
        prefetches are dropped: a held entry then decodes when asked). The reader stays
        usable: a later use starts a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.clear()
