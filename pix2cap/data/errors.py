class DatasetError(ValueError):
    """A dataset file that cannot be used. The message starts with the file's path and says
    what is wrong with it, so a user can fix the data without reading a traceback.

    ``DatasetError(path, problem)`` is the normal form. ``DatasetError(message)`` (one argument)
    is accepted too, because torch's DataLoader re-raises a worker's exception by calling its
    class with the formatted message; this keeps the type across worker processes.
    """

    def __init__(self, path, problem: str | None = None):
        self.path = str(path)
        self.problem = problem
        super().__init__(self.path if problem is None else f"{self.path}: {problem}")
