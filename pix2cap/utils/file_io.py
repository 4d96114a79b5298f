"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Everything pix2cap writes for users (checkpoints, predictions, results, generated data,
pictures) goes through here: the data is written to a temporary file in the target folder,
flushed to disk, then moved over the target with ``os.replace`` (atomic on POSIX and Windows
within one file system). On any error the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import IO, Any, Callable, Iterator

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_dir",
    "remove_stale_temp_files",
]

# atomic_open's temporary files: ".<target name>." + 8 characters from tempfile's alphabet
# (a-z, 0-9, _) + ".tmp", next to the target.
_TEMP_SUFFIX = ".tmp"
_TEMP_FILE_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


@contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` when the block ends cleanly.

    ``mode`` is "w" (text) or "wb" (binary). Missing parent folders are created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', not {mode!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=_TEMP_SUFFIX, dir=folder
    )
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str, obj: Any, **json_kwargs: Any) -> None:
    """``json.dump(obj)`` to ``path`` atomically (the text is built before the file is opened,
    so an object that cannot be serialised leaves nothing behind)."""
    atomic_write_text(path, json.dumps(obj, **json_kwargs))


def atomic_write_dir(path: str, write_fn: Callable[[str], None]) -> None:
    """Write a whole folder: ``write_fn(tmp)`` fills a temporary sibling folder, which then
    takes the place of ``path`` (an existing folder is moved aside first and removed after).

    A reader sees the old folder or the new one complete; between the two renames ``path``
    is briefly absent. When ``write_fn`` raises, the temporary folder is removed and
    ``path`` is untouched. Missing parent folders are created.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        write_fn(tmp)
        if os.path.isdir(path):
            # A fresh unused name to move the old folder to (mkdtemp reserves it; os.replace
            # needs it absent).
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temp_files(folder: str) -> list[str]:
    """Remove the temporary files that interrupted atomic writes left in ``folder``.

    A process killed (SIGKILL, power loss) between creating ``atomic_open``'s temporary file
    and moving it into place leaves ``.<target>.<8 random characters>.tmp`` behind, possibly
    as large as a checkpoint. Only regular files of exactly that form directly in ``folder``
    are removed, so call this when no other process is writing there (e.g. as a run starts).

    Returns:
        the removed paths, sorted; ``[]`` when ``folder`` does not exist.
    """
    if not os.path.isdir(folder):
        return []
    removed = []
    for entry in os.scandir(folder):
        if _TEMP_FILE_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.remove(entry.path)
            except FileNotFoundError:  # gone meanwhile: nothing left to remove
                continue
            removed.append(entry.path)
    return sorted(removed)
