"""User-facing errors: the CLI prints their message (no traceback) and exits with status 1."""


class LetterError(Exception):
    """Bad input or a failed precondition the user can fix (a file, a flag, a shape)."""


class DataError(LetterError, ValueError):
    """A data file is malformed or inconsistent; the message names the file and key."""


class SettingError(LetterError, ValueError):
    """A bad value of a setting (a Settings field or a library function's argument). The library
    names the setting: "num_beams must be >= 10, got 5" (with `section`, "data.synthetic: ..."); the
    CLI names the option it came from: "--beams must be >= 10, got 5" (letter.cli.main maps
    `setting` and the `others` named in `problem` to the command's parameters of those names)."""

    def __init__(self, setting: str, problem: str, *others: str, section: str | None = None):
        super().__init__(f"{section}: {self.naming(setting, problem)}" if section else self.naming(setting, problem))
        self.setting, self.problem, self.others = setting, problem, others

    @staticmethod
    def naming(name: str, problem: str) -> str:
        """'device' + "'tpu': not a device name", 'history' + ': unknown item id(s) x' -> one line."""
        return f"{name}{problem}" if problem.startswith(":") else f"{name} {problem}"
