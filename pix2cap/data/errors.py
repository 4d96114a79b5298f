class DatasetError(ValueError):
    """A dataset file that cannot be used. The message starts with the file's path and says
    what is wrong with it, so a user can fix the data without reading a traceback."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
