"""User-facing errors: the CLI prints their message (no traceback) and exits with status 1."""


class LetterError(Exception):
    """Bad input or a failed precondition the user can fix (a file, a flag, a shape)."""


class SettingError(LetterError):
    """A bad value of one setting: "SECTION: FIELD PROBLEM". The CLI adds where the value came
    from (the option, the --config file, the preset)."""

    def __init__(self, section: str, field: str, problem: str):
        super().__init__(f"{section}: {field} {problem}")
        self.field = field


class DataError(LetterError, ValueError):
    """A data file is malformed or inconsistent; the message names the file and key."""
