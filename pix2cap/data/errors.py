from pix2cap.utils.errors import Pix2CapError

__all__ = ["DatasetError"]


class DatasetError(Pix2CapError, ValueError):
    """A dataset file that cannot be used. The message starts with the file's path and says
    what is wrong with it, so a user can fix the data without reading a traceback.

    ``DatasetError(path, problem)`` is the normal form. ``DatasetError(message)`` (one argument)
    is accepted too, because torch's DataLoader re-raises a worker's exception by calling its
    class with the formatted message; this keeps the type across worker processes. Being a
    :class:`~pix2cap.utils.errors.Pix2CapError`, it is caught with the other input errors.
    """
