"""User-facing errors: the CLI prints their message (no traceback) and exits with status 1."""


class LetterError(Exception):
    """Bad input or a failed precondition the user can fix (a file, a flag, a shape)."""


class DataError(LetterError, ValueError):
    """A data file is malformed or inconsistent; the message names the file and key."""
