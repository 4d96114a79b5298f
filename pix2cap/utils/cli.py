"""What every command-line tool in ``tools/`` shares: one-line errors and output-path checks.

Error convention (README, "Interrupted runs and errors"): a tool that fails prints one line on stderr,
``error: <message>`` -- for pix2cap's own exceptions the message is ``<file>: <problem>`` --
and exits 1. The traceback goes to the tool's log file when it has one (``OUTPUT_DIR/log.txt``)
and to the console with ``--verbose``. Usage errors exit 2 (argparse's own, and
:class:`UsageError`); Ctrl-C exits 130 with one line. Only the ``__main__`` entry is guarded:
``tool.main(...)`` called from Python raises as before.

    if __name__ == "__main__":
        args = get_parser().parse_args()
        main_guard(main, args)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

from .errors import Pix2CapError

__all__ = [
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "UsageError",
    "OutputPathError",
    "add_verbose_flag",
    "error_message",
    "main_guard",
    "check_output_dir",
    "check_output_file",
]

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's code for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

class UsageError(SystemExit):
    """A command line that argparse accepts but the tool cannot run (e.g. a flag that needs
    another one). Exits 2 under :func:`main_guard`; a :class:`SystemExit`, so code that calls a
    tool's ``main`` and expects ``SystemExit`` still sees one. ``UsageError("<message>")``."""


class OutputPathError(Pix2CapError, ValueError):
    """An output path a tool cannot write (or may not overwrite, or continue); ``str()`` is
    ``"<path>: <problem>"``."""


def add_verbose_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--verbose``: on an error, print the traceback too (before the one-line message)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="on an error, print the full traceback as well as the one-line message",
    )
    return parser


def _own_exception(exc: BaseException) -> bool:
    """Exceptions defined in pix2cap carry a ``<file>: <problem>`` message by design."""
    return any(cls.__module__.split(".")[0] == "pix2cap" for cls in type(exc).__mro__)


# Built-in types whose message says enough on its own (it names the file or the value).
_PLAIN_TYPES = (ValueError, LookupError, OSError)
_PLAIN_NAMES = {cls.__name__ for cls in (ValueError, KeyError, IndexError, OSError,
                                         FileNotFoundError, PermissionError, IsADirectoryError,
                                         NotADirectoryError, UnicodeDecodeError)}


def _from_formatted_traceback(text: str) -> Optional[str]:
    """The one-line message of the original exception in a message that carries a formatted
    traceback (torch re-raises a DataLoader worker's or a spawned process's exception so);
    None when ``text`` has none."""
    if "Traceback (most recent call last)" not in text:
        return None
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    # The last line of a formatted traceback is "module.Type: message" (or just the type).
    name, sep, rest = last.partition(": ")
    if " " in name or not name.replace(".", "").replace("_", "").isalnum():
        return last
    short = name.rsplit(".", 1)[-1]
    if not sep:
        return short
    return rest if name.startswith("pix2cap.") or short in _PLAIN_NAMES else f"{short}: {rest}"


def error_message(exc: BaseException) -> str:
    """The one-line form of ``exc``: its message, newlines folded.

    * pix2cap's exceptions, ``ValueError``, ``LookupError``: the message as it is (they name
      the file and the problem); a ``KeyError``'s key without the quotes ``str()`` adds.
    * ``OSError`` with a file name: ``"<file>: <strerror>"``.
    * Other types (``RuntimeError``, ``TypeError``, ...): ``"<Type>: <message>"``, since the
      message alone may not say what kind of failure it was.
    * A message that carries a formatted traceback is cut to the original exception's line.
    """
    if isinstance(exc, OSError) and exc.filename is not None and not _own_exception(exc):
        text = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc)
    original = _from_formatted_traceback(text)
    if original is not None:
        return original
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    if not text:
        return type(exc).__name__
    if _own_exception(exc) or isinstance(exc, _PLAIN_TYPES) or isinstance(exc, SystemExit):
        return text
    return f"{type(exc).__name__}: {text}"


def _log_files() -> list[logging.FileHandler]:
    """The log files the run set up (``setup_logger(OUTPUT_DIR)`` on the pix2cap logger)."""
    return [h for h in logging.getLogger("pix2cap").handlers if isinstance(h, logging.FileHandler)]


def _report(exc: BaseException, message: str, verbose: bool) -> None:
    """The traceback to the log file(s) and, with ``verbose``, to stderr; then the line."""
    for handler in _log_files():
        record = logging.LogRecord(
            "pix2cap", logging.ERROR, __file__, 0, "error: %s", (message,),
            (type(exc), exc, exc.__traceback__),
        )
        handler.handle(record)
        handler.flush()
    sys.stdout.flush()  # the log lines printed so far come before the error
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"error: {message}", file=sys.stderr, flush=True)


def _wants_verbose(args: Sequence[Any]) -> bool:
    """``--verbose`` from the first argument: a parsed namespace or an argv list."""
    if not args:
        return "--verbose" in sys.argv[1:]
    first = args[0]
    if isinstance(first, argparse.Namespace):
        return bool(getattr(first, "verbose", False))
    if isinstance(first, (list, tuple)):
        return "--verbose" in first
    return False


def main_guard(
    main: Callable[..., Any], *args: Any, verbose: Optional[bool] = None, **kwargs: Any
) -> NoReturn:
    """Run ``main(*args, **kwargs)`` as a command-line entry point and exit.

    Exits 0 when ``main`` returns (an ``int`` it returns is the exit status). On an exception
    it prints ``error: <message>`` (:func:`error_message`) on stderr and exits 1; the
    traceback goes to the log files of the ``pix2cap`` logger and, with ``verbose``, to
    stderr. ``verbose=None`` reads ``--verbose`` from the first argument (a parsed namespace or
    an argv list) or from ``sys.argv``.

    ``SystemExit`` keeps its meaning: an ``int`` code (argparse's 2 after its usage message,
    ``--help``'s 0) passes through; a message (``raise SystemExit("...")``) is printed as
    ``error: <message>`` with status 1, or 2 for a :class:`UsageError`. Ctrl-C exits 130.
    """
    if verbose is None:
        verbose = _wants_verbose(args)
    try:
        status = main(*args, **kwargs)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            raise
        _report(e, error_message(e), verbose)
        sys.exit(EXIT_USAGE if isinstance(e, UsageError) else EXIT_ERROR)
    except KeyboardInterrupt as e:
        _report(e, "interrupted", verbose)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001  (every failure becomes one line; the type is kept)
        _report(e, error_message(e), verbose)
        sys.exit(EXIT_ERROR)
    sys.exit(status if isinstance(status, int) and not isinstance(status, bool) else 0)


def _write_failure(folder: str) -> Optional[str]:
    """Why a file cannot be created in ``folder`` (None if it can): the probe file is created
    and removed, since ``os.access`` says yes to root even where the file system refuses."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".pix2cap_write_test.", dir=folder)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.remove(probe)
    return None


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_dir(path: str) -> None:
    """Fail now, before any work, if ``path`` cannot be used as an output folder: it is a file,
    or it (or, when it does not exist yet, its nearest existing parent) is not writable.
    Nothing is left behind.

    Raises:
        OutputPathError: naming the path and the problem.
    """
    if not path:
        raise OutputPathError(path, "the output folder name is empty")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise OutputPathError(path, "the output folder is a file")
        failure = _write_failure(path)
        if failure:
            raise OutputPathError(path, f"the output folder is not writable ({failure})")
        return
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise OutputPathError(path, f"cannot create the output folder: {existing} is a file")
    failure = _write_failure(existing)
    if failure:
        raise OutputPathError(
            path, f"cannot create the output folder: {existing} is not writable ({failure})"
        )


def check_output_file(path: str, overwrite: bool = False) -> None:
    """Fail now, before any work, if the result file ``path`` cannot be written: it is a
    folder, it exists and ``overwrite`` is false, or its folder cannot be created or written.
    Nothing is created.

    Raises:
        OutputPathError: naming the path and the problem.
    """
    if not path:
        raise OutputPathError(path, "the output file name is empty")
    if os.path.isdir(path):
        raise OutputPathError(path, "the output file is a folder")
    if os.path.exists(path) and not overwrite:
        raise OutputPathError(path, "the output file exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    check_output_dir(folder)
