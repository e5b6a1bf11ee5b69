"""How library errors reach the user: one line, no traceback, naming the command's options."""
import re
import warnings

import click

from letter.errors import LetterError, LetterWarning, SettingError


def file_system_message(e: OSError) -> str:
    """One line for a file-system error (permission, name too long, disk full, read-only...) naming
    the path: the writers' atomic temporary files are already gone when it arrives."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    reason = e.strerror or type(e).__name__
    return f"{paths}: {reason}" if paths else f"file system error: {reason}"


def option_names(command: click.Command | None) -> dict[str, str]:
    """The command's options (and arguments) by the names the library may give them: the
    parameter's name ({"run_dir": "--model", "data_path": "DATA_PATH"}), else the option's own
    ({"data": "--data"} for data_path)."""
    params = getattr(command, "params", ())
    names = {p.name: p.opts[0] if isinstance(p, click.Option) else p.human_readable_name for p in params}
    for p in params:
        if not isinstance(p, click.Option):
            continue
        for opt in p.opts:
            names.setdefault(opt.lstrip("-").replace("-", "_"), opt)
    return names


def with_options(text: str, names, flags: dict[str, str], literal: str = "") -> str:
    """`text` with each of `names` the command has an option for shown as that option. Only whole
    words outside paths are replaced ("out_dir" yes, "/tmp/out_dir" or "out_dir.json" no), and none
    in `literal`, the start of `text` holding the user's value (a folder called `data`)."""
    if literal and text.startswith(literal):
        return literal + with_options(text[len(literal):], names, flags)
    for name in names:
        if name in flags:
            text = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w/-]|\.\w)", flags[name], text)
    return text


def setting_message(e: SettingError, command: click.Command | None) -> str:
    """The library's message about a setting, with the setting (and the others its problem names)
    replaced by `command`'s option of that name: "num_beams must be >= 10" -> "--beams must be >= 10".
    A setting the command has no option for keeps the library's words (the others are still mapped)."""
    flags = option_names(command)
    problem = with_options(e.problem, e.others, flags, e.literal)
    if e.setting not in flags:
        text = SettingError.naming(e.setting, problem)
        return f"{e.section}: {text}" if e.section else text
    return SettingError.naming(flags[e.setting], problem)


def letter_message(e: LetterError, command: click.Command | None) -> str:
    """A library error's one line, naming `command`'s options where it names their parameters."""
    if isinstance(e, SettingError):
        return setting_message(e, command)
    return with_options(str(e), e.names, option_names(command), e.literal)


def _show_warning(command, show_other):
    """warnings.showwarning for the command that `command()` returns: a LetterWarning is one
    "warning: ..." line on stderr naming the command's options; other warnings as Python shows them."""

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(message, LetterWarning):
            click.echo(f"warning: {with_options(str(message), message.names, option_names(command()))}", err=True)
        else:
            show_other(message, category, filename, lineno, file, line)

    return show


def check_environment() -> None:
    """LetterError for a bad $LETTER_BACKEND or $LETTER_ISA: every op call refuses them, so a command
    is refused before it writes anything rather than stopped at its first op call."""
    from letter_ext._backend import check_env_isa, env_backend

    try:
        env_backend()
        check_env_isa()
    except ValueError as e:
        raise LetterError(str(e)) from None


class LetterGroup(click.Group):
    """Turns LetterError (bad input the user can fix) and file-system errors into a one-line click
    error, no traceback, and LetterWarning into a "warning: ..." line; both name the invoked
    command's options where the library names their parameters."""

    def invoke(self, ctx):
        def command():  # the subcommand, known once the arguments are parsed
            return self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None

        try:
            if ctx.parent is None and not {"-h", "--help"} & set(ctx.args):  # help needs no working environment
                check_environment()
            with warnings.catch_warnings():
                warnings.simplefilter("always", LetterWarning)  # every time, not once per place
                warnings.showwarning = _show_warning(command, warnings.showwarning)
                return super().invoke(ctx)
        except LetterError as e:
            raise click.ClickException(letter_message(e, command())) from e
        except EOFError as e:  # click would print a bare "Aborted!" for it
            raise click.ClickException(f"unexpected end of a file or of the input ({e or 'EOFError'})") from e
        except OSError as e:
            raise click.ClickException(file_system_message(e)) from e
