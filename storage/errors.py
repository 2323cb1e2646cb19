"""Errors a user can cause: caught at the entry point and printed as one line."""


class UserError(Exception):
    """A problem the user can fix (bad path, malformed file, bad config key).

    The message must be one line that names the file, row or key to fix.
    """


class BrodenFormatError(UserError):
    """A Broden-format directory is missing a file or holds a malformed entry."""


class StoreMismatchError(UserError):
    """An existing store was made from other inputs (another model or dataset)."""
