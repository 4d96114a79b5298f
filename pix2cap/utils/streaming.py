"""Per-image results streamed to a JSON-lines file, so a killed run loses at most one image and
a rerun continues where it stopped.

A tool's run (``tools/pancap_infer.py``, ``tools/demo.py``, ``tools/eval_pancapscore.py``)
keeps two files:

* ``<name>.jsonl``: one JSON object per finished image, appended as one complete line and
  flushed before the next image starts. A kill can leave only the last line cut short; it is
  dropped when the file is read again (the image is done again).
* a summary JSON, written atomically when the run starts (``"status": "running"``, the
  settings that determine the results) and when it ends (counts, the images that failed).

On a rerun the images already in the ``.jsonl`` are skipped, provided the settings are the
ones the summary recorded; other settings stop the run before any work (mixing results of two
settings in one file would be silent corruption) unless the tool is told to start over. The
final JSON files are then built from the lines, so an interrupted and continued run writes the
same files as an uninterrupted one.

    run = ResumableRun(jsonl, summary, tool="pancap_infer", settings=settings,
                       key=lambda r: r["image_path"], overwrite=args.overwrite)
    todo = [x for x in items if not run.is_done(key_of(x))]   # read-only so far
    with run:                                                 # summary "running", file open
        for x in todo:
            with run.attempt(key_of(x)):                      # an error fails this image only
                run.append(process(x))
    run.finish(total=len(items))                              # summary with the counts
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import IO, Any, Callable, Iterator, Optional

from .cli import OutputPathError, error_message
from .errors import Pix2CapError
from .file_io import atomic_write_json

try:  # POSIX: one writer per file at a time
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no lock)
    fcntl = None

__all__ = [
    "read_json_lines",
    "JsonLinesWriter",
    "ResumableRun",
    "ImagesFailedError",
    "file_identity",
]

logger = logging.getLogger(__name__)


class ImagesFailedError(Pix2CapError, RuntimeError):
    """Some images of a run failed; the others were written. ``str()`` is
    ``"<summary file>: <k> of <n> image(s) failed ...: <first errors>"``."""


def read_json_lines(path: str) -> tuple[list[dict], int, bool]:
    """The complete lines of a JSON-lines file.

    Returns:
        (objects, size of the complete lines in bytes, whether a cut last line was dropped).
        A last line without its newline is what a kill during a write leaves: it is dropped
        even if it happens to parse.

    Raises:
        OutputPathError: a complete line is not a JSON object (the file was not written by
            :class:`JsonLinesWriter`, or was edited).
    """
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    objects = []
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise OutputPathError(path, f"line {number} is not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise OutputPathError(path, f"line {number} is not a JSON object")
        objects.append(obj)
    return objects, end, end < len(data)


class JsonLinesWriter:
    """Append JSON objects to a file, one complete line each, flushed at once.

    ``fsync=True`` also forces each line to disk (survives a power cut, not only a kill).
    """

    def __init__(self, path: str, fsync: bool = False):
        self.path = path
        self.fsync = fsync
        self._file: Optional[IO[str]] = open(path, "a", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._file.close()
                raise OutputPathError(path, "another run is writing to this file") from None

    def write(self, obj: Any) -> Any:
        """Append ``obj`` as one line; returns it as it reads back (tuples become lists, ...)."""
        # allow_nan=False: NaN is not JSON; a line other readers reject must not be written.
        line = json.dumps(obj, ensure_ascii=False, allow_nan=False)
        assert self._file is not None, "the writer is closed"
        self._file.write(line + "\n")  # one write: a kill leaves at most the end of this line
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        return json.loads(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()  # releases the lock
            self._file = None

    def __enter__(self) -> "JsonLinesWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_identity(path: str) -> Optional[dict]:
    """``{"path", "size", "mtime_ns"}`` of a local file (None if it is not one): cheap, and
    tells a rewritten file (a retrained checkpoint at the same path) from the old one."""
    if not path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _describe_differences(then: dict, now: dict, limit: int = 3) -> str:
    keys = [k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)]
    parts = []
    for k in keys[:limit]:
        a, b = then.get(k), now.get(k)
        if isinstance(a, (dict, list)) or isinstance(b, (dict, list)) or k.endswith("_sha256"):
            parts.append(f"{k} changed")
        else:
            parts.append(f"{k}: {a!r} then, {b!r} now")
    if len(keys) > limit:
        parts.append(f"{len(keys) - limit} more")
    return "; ".join(parts)


class ResumableRun:
    """A tool's per-image results in a JSON-lines file, continued after an interruption.

    Constructing it only reads: it checks the files, loads the finished images and compares
    the settings, so a bad output path or changed settings fail before any model is built.
    Entering it (``with run:``) writes the summary (``"status": "running"``) and opens the
    ``.jsonl`` for appending (dropping a line a kill cut short).

    Args:
        jsonl_path: the JSON-lines file.
        summary_path: the run's summary JSON.
        tool: the tool's name, recorded in the summary.
        settings: everything that determines the results (JSON-able); a rerun with other
            settings is refused unless ``overwrite``.
        key: a finished record's image key.
        overwrite: start over: the ``.jsonl``, the summary and ``outputs`` are removed.
        outputs: final files the run builds from the lines (removed by ``overwrite``).
        restart_hint: how the tool's user starts over, for the messages.
    """

    def __init__(
        self,
        jsonl_path: str,
        summary_path: str,
        *,
        tool: str,
        settings: dict,
        key: Callable[[dict], str],
        overwrite: bool = False,
        outputs: tuple[str, ...] = (),
        restart_hint: str = "pass --overwrite to start over",
    ):
        self.jsonl_path = jsonl_path
        self.summary_path = summary_path
        self.tool = tool
        # As it reads back from JSON, so that a comparison with a saved copy is exact.
        self.settings = json.loads(json.dumps(settings))
        self.key = key
        self.overwrite = overwrite
        self.outputs = tuple(outputs)
        self.restart_hint = restart_hint
        self.records: dict[str, dict] = {}  # image key -> finished record (later lines win)
        self.previous = 0  # images finished by earlier runs
        self.failures: list[dict] = []  # {"image", "error"} of this run
        self._failure_types: list[type] = []
        self._valid_bytes: Optional[int] = None  # where to cut a partial last line
        self._writer: Optional[JsonLinesWriter] = None
        if not overwrite and os.path.exists(jsonl_path):
            self._load()

    def _load(self) -> None:
        if not os.path.isfile(self.jsonl_path):
            raise OutputPathError(self.jsonl_path, "is not a file")
        summary = self._read_summary()
        if summary.get("settings") != self.settings:
            raise OutputPathError(
                self.jsonl_path,
                "was written with other settings ("
                + _describe_differences(summary.get("settings") or {}, self.settings)
                + f"); {self.restart_hint}, or choose another output",
            )
        try:
            records, valid, partial = read_json_lines(self.jsonl_path)
        except OutputPathError as e:
            raise OutputPathError(self.jsonl_path, f"{e.problem}; {self.restart_hint}") from None
        for number, record in enumerate(records, start=1):
            try:
                self.records[str(self.key(record))] = record
            except (KeyError, TypeError):
                raise OutputPathError(
                    self.jsonl_path, f"record {number} does not name its image"
                ) from None
        self.previous = len(self.records)
        if partial:
            self._valid_bytes = valid

    def _read_summary(self) -> dict:
        problem = None
        try:
            with open(self.summary_path, "r", encoding="utf-8") as f:
                summary = json.load(f)
        except FileNotFoundError:
            problem = f"{self.summary_path} is missing"
        except (OSError, ValueError) as e:
            problem = f"{self.summary_path} cannot be read ({e})"
        else:
            if not isinstance(summary, dict) or summary.get("tool") != self.tool:
                problem = f"{self.summary_path} is not a {self.tool} summary"
        if problem:
            raise OutputPathError(
                self.jsonl_path,
                f"cannot continue this run: {problem}, so the settings that wrote it are "
                f"unknown; {self.restart_hint}",
            )
        return summary

    def is_done(self, key: str) -> bool:
        return str(key) in self.records

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(str(key))

    # -- writing --------------------------------------------------------------------------------
    def __enter__(self) -> "ResumableRun":
        folder = os.path.dirname(os.path.abspath(self.jsonl_path))
        os.makedirs(folder, exist_ok=True)
        if self.overwrite:
            for path in (self.jsonl_path, self.summary_path, *self.outputs):
                if os.path.isfile(path):
                    os.remove(path)
        self._write_summary("running")
        self._writer = JsonLinesWriter(self.jsonl_path)
        if self._valid_bytes is not None:
            # The writer holds the lock now: cut the line a kill left half-written.
            os.truncate(self.jsonl_path, self._valid_bytes)
            logger.warning(
                "%s: dropped a cut-off last line left by an interrupted run", self.jsonl_path
            )
            self._valid_bytes = None
        if self.previous:
            logger.info(
                "%s: continuing; %d image(s) already done are skipped (%s)",
                self.jsonl_path, self.previous, self.restart_hint,
            )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if exc_type is not None:
            # Ctrl-C or a fatal error: the summary says so (the lines written are kept).
            with contextlib.suppress(OSError):
                self._write_summary("interrupted", records=len(self.records))

    def append(self, record: dict) -> dict:
        """Write one finished image's record; returns it as it reads back from the file."""
        if self._writer is None:
            raise RuntimeError("ResumableRun.append outside `with run:`")
        record = self._writer.write(record)
        self.records[str(self.key(record))] = record
        return record

    @contextlib.contextmanager
    def attempt(self, key: str) -> Iterator[None]:
        """Run one image's work; an ``Exception`` fails that image only: it is logged (the
        traceback at DEBUG level, i.e. into the log file), counted and the run goes on.
        ``KeyboardInterrupt`` and ``SystemExit`` stop the run."""
        try:
            yield
        except Exception as e:  # noqa: BLE001  (one image's failure must not cost the others)
            message = error_message(e)
            # Most messages start with the image's path already; name it once.
            named = message if message.startswith(str(key)) else f"{key}: {message}"
            logger.error("failed: %s", named)
            logger.debug("traceback of the failure on %s", key, exc_info=True)
            self.failures.append({"image": str(key), "error": message})
            self._failure_types.append(type(e))

    def _write_summary(self, status: str, **counts: Any) -> dict:
        summary = {"tool": self.tool, "status": status, **counts, "settings": self.settings}
        atomic_write_json(self.summary_path, summary, indent=2)
        return summary

    def finish(self, total: int, resumed: int, **extra: Any) -> dict:
        """Write the final summary: ``status`` ("complete", or "incomplete" when images
        failed), ``images`` (``total``), ``done``, ``resumed`` (of them, done by earlier runs),
        ``failed`` and ``failures`` (``{"image", "error"}``), and ``extra``."""
        failed = len(self.failures)
        return self._write_summary(
            "incomplete" if failed else "complete",
            images=total,
            done=total - failed,
            resumed=resumed,
            failed=failed,
            failures=self.failures,
            **extra,
        )

    def raise_for_failures(
        self, total: int, input_error: Optional[type] = None, path: Optional[str] = None
    ) -> None:
        """Raise if images failed: ``input_error(path, message)`` when every failure is an
        ``input_error`` (e.g. unreadable images), else :class:`ImagesFailedError`; ``path`` is
        the file that lists them (default: the summary). The message: ``"<k> of <n> image(s)
        failed (the others are written): <first errors>"``."""
        path = path or self.summary_path
        if not self.failures:
            return
        limit = 3
        shown = "; ".join(
            f["error"] if f["error"].startswith(f["image"]) else f"{f['image']}: {f['error']}"
            for f in self.failures[:limit]
        )
        more = len(self.failures) - limit
        message = (
            f"{len(self.failures)} of {total} image(s) failed (the others are written): {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )
        if input_error is not None and all(issubclass(t, input_error) for t in self._failure_types):
            raise input_error(path, message)
        raise ImagesFailedError(path, message)
