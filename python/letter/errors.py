"""User-facing errors and warnings: the CLI prints their message (no traceback; an error exits with
status 1), with the arguments and settings they name shown as the invoked command's options."""


class LetterError(Exception):
    """Bad input or a failed precondition the user can fix (a file, a setting, a shape). `names`:
    the arguments or settings the message names as words ("no text_emb given ..."); the CLI shows
    each as the invoked command's option of that name ("no --text-emb given ..."). `literal`: the
    start of the message that holds the user's value (see input_error), shown as is even where it is
    spelled like one of `names` (a folder called `data`)."""

    def __init__(self, message: str = "", *names: str, literal: str = ""):
        super().__init__(message)
        self.names, self.literal = names, literal


class DataError(LetterError, ValueError):
    """A data file is malformed or inconsistent; the message names the file and key."""


class SettingError(LetterError, ValueError):
    """A bad value of a setting (a Settings field or a library function's argument). The library
    names the setting: "num_beams must be >= 10, got 5" (with `section`, "data.synthetic: ..."); the
    CLI names the option it came from: "--beams must be >= 10, got 5" (letter.cli.errors maps
    `setting` and the `others` named in `problem` to the command's parameters of those names;
    `literal`, the start of `problem` that holds the user's value, is shown as is)."""

    def __init__(self, setting: str, problem: str, *others: str, section: str | None = None, literal: str = ""):
        text = self.naming(setting, problem)
        super().__init__(f"{section}: {text}" if section else text, setting, *others, literal=literal)
        self.setting, self.problem, self.others, self.section = setting, problem, others, section

    @staticmethod
    def naming(name: str, problem: str) -> str:
        """'device' + "'tpu': not a device name", 'history' + ': unknown item id(s) x' -> one line."""
        return f"{name}{problem}" if problem.startswith(":") else f"{name} {problem}"


class LetterWarning(UserWarning):
    """A warning about the user's input; `names` as in LetterError (the CLI prints it as one
    "warning: ..." line naming the command's options)."""

    def __init__(self, message: str, *names: str):
        super().__init__(message)
        self.names = names


def input_error(what: str, value, problem: str, *others: str) -> LetterError:
    """The error "WHAT VALUE: problem" about an input: `what` is the argument it came from
    ("run_dir", shown by the CLI as the command's option, e.g. --model) or words ("the dataset");
    empty: "VALUE: problem". `others`: further arguments the problem names. An argument gives a
    SettingError, so the CLI replaces `what` only where it names the input, not the same word in the
    problem ("tokenizer /x: ..., not a tokenizer run folder"). VALUE is shown as given, even when
    it is spelled like one of `others` (a folder called `resume`)."""
    if what.isidentifier():
        return SettingError(what, f"{value}: {problem}", *others, literal=str(value))
    shown = f"{what} {value}" if what else str(value)
    return LetterError(f"{shown}: {problem}", *others, literal=shown)
