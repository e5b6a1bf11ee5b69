"""How library errors reach the user: one line, no traceback, naming the command's options."""
import re

import click

from letter.errors import LetterError, SettingError


def file_system_message(e: OSError) -> str:
    """One line for a file-system error (permission, name too long, disk full, read-only...) naming
    the path: the writers' atomic temporary files are already gone when it arrives."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    reason = e.strerror or type(e).__name__
    return f"{paths}: {reason}" if paths else f"file system error: {reason}"


def setting_message(e: SettingError, command: click.Command | None) -> str:
    """The library's message about a setting, with the setting (and the others its problem names)
    replaced by `command`'s option of that name: "num_beams must be >= 10" -> "--beams must be >= 10".
    A setting the command has no option for keeps the library's words."""
    flags = {p.name: p.opts[0] for p in getattr(command, "params", ()) if isinstance(p, click.Option)}
    if e.setting not in flags:
        return str(e)
    problem = e.problem
    for name in e.others:
        if name in flags:
            problem = re.sub(rf"\b{re.escape(name)}\b", flags[name], problem)
    return SettingError.naming(flags[e.setting], problem)


class LetterGroup(click.Group):
    """Turns LetterError (bad input the user can fix) and file-system errors into a one-line click
    error, no traceback; a SettingError names the invoked command's option."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SettingError as e:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            raise click.ClickException(setting_message(e, command)) from e
        except LetterError as e:
            raise click.ClickException(str(e)) from e
        except EOFError as e:  # click would print a bare "Aborted!" for it
            raise click.ClickException(f"unexpected end of a file or of the input ({e or 'EOFError'})") from e
        except OSError as e:
            raise click.ClickException(file_system_message(e)) from e
