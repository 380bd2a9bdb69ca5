"""One exception type for every user-facing error, so callers (CLI, server) can report it."""


class PersonamixError(ValueError):
    """Bad input or an unusable model/adapter; the message names the problem."""
