"""Errors raised by dataset readers and the artifact store."""

from __future__ import annotations


class DatasetError(ValueError):
    """A dataset file is missing, malformed or inconsistent.

    The message always starts with the offending path (and key, where there is one) so that a
    user can go straight to the file: ``"<path>: <what was expected>"``.
    """

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # two arguments: Ray pickles it back to the driver (issue 22: before,
        # the driver got "UnserializableException: Failed to deserialize exception")
        return (type(self), (self.path, self.problem))
