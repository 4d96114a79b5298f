"""The base of pix2cap's input errors.

Every error pix2cap raises about something a user gave it -- a dataset file, a checkpoint or
weights file, a config file or override -- derives from :class:`Pix2CapError`, and its message
is one line, ``"<path>: <problem>"``. A program's top level can therefore catch
``Pix2CapError`` alone and print ``error: <message>`` without a traceback::

    try:
        main(args)
    except Pix2CapError as e:
        sys.exit(f"error: {e}")

The subclasses live next to what they are about and keep deriving from ``ValueError`` (and
``FileNotFoundError`` where a file is missing), so older ``except ValueError`` handlers still
catch them:

* ``pix2cap.data.errors.DatasetError``: a dataset file that cannot be used;
* ``pix2cap.checkpoint.CheckpointError``: a checkpoint or weights file that cannot be used,
  with ``CheckpointNotFoundError`` for one that is not on disk (including URLs and model hub
  names, which pix2cap never downloads);
* ``pix2cap.config.ConfigError``: a config file or override that cannot be applied.
"""

from __future__ import annotations

__all__ = ["Pix2CapError"]


class Pix2CapError(Exception):
    """Something a user gave pix2cap cannot be used; ``str(e)`` is ``"<path>: <problem>"``.

    Args:
        path: the file (or, without a file, the setting or input) the problem is about.
        problem: what is wrong, as one sentence a user can act on.

    ``Pix2CapError(message)`` (one argument) is accepted too, because torch's DataLoader
    re-raises a worker's exception by calling its class with the formatted message; ``path``
    is then the whole message and ``problem`` is None.
    """

    def __init__(self, path, problem: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(self.path if problem is None else f"{self.path}: {problem}")

    def __reduce__(self):
        # Pickling (multi-process launch, DataLoader workers) keeps path and problem apart.
        return type(self), (self.path, self.problem)
