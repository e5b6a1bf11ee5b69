"""Command-line options generated from the library's Settings dataclasses (letter.settings), so a
setting's default, help text and range are written once, in the dataclass."""
import dataclasses

import click
from click.core import ParameterSource

from letter.config import PRESETS, named_preset
from letter.errors import LetterError, SettingError
from letter.settings import default_of, field_type
from letter.utils import read_mapping_file


class ListOf(click.ParamType):
    """A comma-separated list: '2048,1024,512' ('title, description': spaces around a value dropped)."""

    def __init__(self, element: type):
        self.element = element
        self.name = f"{element.__name__},..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [self.element(v.strip()) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"expected comma-separated {self.element.__name__} values, got {value!r}", param, ctx)


def _flag(cls, name: str) -> str:
    """The command-line option of the settings field `name` of `cls` (its `flag`, else its name)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return "--" + (field.metadata.get("flag") or name).replace("_", "-")


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _range_type(kind: type, meta: dict) -> click.ParamType:
    """click's IntRange/FloatRange of a field's bounds (plain int/float without bounds)."""
    if meta.get("low") is None and meta.get("high") is None:
        return kind
    cls = click.IntRange if kind is int else click.FloatRange
    return cls(min=meta["low"], max=meta["high"], min_open=meta["low_open"], max_open=meta["high_open"])


def settings_options(cls, exclude: tuple[str, ...] = (), check_ranges: bool = False):
    """Decorator: one --option per field of `cls` (a letter.settings.Settings dataclass), named
    after the field or its `flag`. Options default to None ("not given"), so values from --config
    FILE or the dataclass stay unless given. check_ranges: click checks bounds when parsing (a usage
    error naming the option), for commands without --config; with --config the Settings check them
    after merging, so a value from the file and one from an option get the same message."""

    def decorate(command):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in exclude or not f.metadata.get("cli", True):
                continue
            kind, element = field_type(cls, f)
            flag = _flag(cls, f.name)
            ranged = check_ranges and kind in (int, float)  # click then shows the range itself
            described = f.metadata["help"] if ranged else cls.describe(f.name)
            help_text = f"{described}  [default: {_shown(default_of(cls, f))}]"
            if kind is bool:
                option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
            elif kind is list:
                option = click.option(flag, f.name, type=ListOf(element), default=None, help=help_text)
            elif f.metadata.get("choices"):
                option = click.option(flag, f.name, type=click.Choice([str(c) for c in f.metadata["choices"]]),
                                      default=None, help=help_text)
            else:
                option = click.option(flag, f.name, type=_range_type(kind, f.metadata) if ranged else kind,
                                      default=None, help=help_text)
            command = option(command)
        return command

    return decorate


def preset_option(command):
    """--preset NAME: start from a named preset of letter.config.PRESETS (before --config and the options)."""
    return click.option("--preset", "preset", type=click.Choice(sorted(PRESETS)), default=None,
                        help="Start from a named preset (cpu: the recipe sized for a CPU, see `letter config show "
                             "--preset cpu`); --config and the options given override it.")(command)


config_file_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), default=None,
    help="YAML/JSON file of these settings (the option names with _); options given here override it.")


def settings_from_options(cls, options: dict, config_file: str | None = None, preset: str | None = None):
    """The settings: the dataclass defaults, then the preset's section, then the --config file, then the
    options given. Removes the fields' keys from `options`; validates: a bad value is one line naming where
    it came from (the option, the --config file or the preset)."""
    source = {}  # field -> where its value came from
    values = {}
    if preset:
        section = named_preset(preset).get(cls.section, {})
        values = cls.from_dict(section, validate=False).to_dict()
        source.update(dict.fromkeys(section, f"--preset {preset}"))
    if config_file:
        read = read_mapping_file(config_file)
        values.update(read)
        source.update(dict.fromkeys(read, f"--config {config_file}"))
        try:
            values = cls.from_dict(values, validate=False).to_dict()
        except LetterError as e:
            raise LetterError(f"--config {config_file}: {e}") from None
    for f in dataclasses.fields(cls):
        given = options.pop(f.name, None)
        if given is not None:
            values[f.name] = given
            source[f.name] = _flag(cls, f.name)
    try:
        settings = cls.from_dict(values)
    except SettingError as e:
        where = source.get(e.setting)
        if where is None:
            raise
        raise LetterError(f"{where}: {e}") from None
    for selector, unused in getattr(cls, "UNUSED_BY", {}).items():  # options this choice would silently ignore
        value = getattr(settings, selector)
        refuse_ignored(unused.get(value, ()), f"is not used with {_flag(cls, selector)} {value}")
    return settings


overwrite_option = click.option("--overwrite", is_flag=True,
                                help="Replace the output already there (refused otherwise).")


def given_options(*names: str) -> list[str]:
    """The flags (e.g. --max-length) of the parameters `names` given on the command line, in order
    (none outside a command: the library's callers give no options)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    return [flags[n] for n in names if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE]


def refuse_ignored(names, why: str) -> None:
    """A usage error naming the first of the parameters `names` given on the command line: options
    that would be silently ignored in this combination (`why`, e.g. "applies to --mode mean-pool only")."""
    given = given_options(*names)
    if given:
        raise click.UsageError(f"{given[0]} {why}")
