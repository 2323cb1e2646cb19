"""Errors a user can cause: caught at the entry point and printed as one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty),
    for quoting a library's error inside a one-line ``error:``."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """A problem the user can fix (bad path, malformed file, bad config key).

    The message must be one line that names the file, row or key to fix.
    """


class BrodenFormatError(UserError):
    """A Broden-format directory is missing a file or holds a malformed entry."""


class StoreMismatchError(UserError):
    """An existing store was made from other inputs (another model or dataset)."""


class UnsafePathError(BrodenFormatError):
    """A path in a Broden file would leave the dataset's images/ folder."""


class UnknownLabelError(BrodenFormatError):
    """A label number absent from label.csv, or from the c_<category>.csv it must be in."""


class MissingFileError(BrodenFormatError):
    """A file that index.csv refers to does not exist."""


class SizeMismatchError(BrodenFormatError):
    """An image or label plane whose size differs from the one index.csv gives."""
