"""The library's own error types: what a user can fix, said in one line with what to do.

The ``hsface`` command prints these as a single line (``--debug`` shows the traceback); any other
exception is a bug and keeps its traceback. Each type also subclasses the builtin a caller would
catch without knowing hsface (``ValueError`` for bad input, ``OSError`` for unreachable services).
"""


class HSFaceError(Exception):
    """Base of every error hsface raises on purpose; its message says what to do."""


class InvalidInputError(HSFaceError, ValueError):
    """An argument or input (vectors, images, counts, settings) is unusable as given."""


class HubUnreachableError(HSFaceError, OSError):
    """The Hugging Face Hub could not be reached (offline, network down, repo missing or private)."""


class MissingInputError(HSFaceError, FileNotFoundError):
    """A file, folder or model named as input does not exist where it was looked for."""


def looks_like_a_path(name: str) -> bool:
    """Whether ``name`` was meant as a local path (a Hub repo id never starts like this)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..")
