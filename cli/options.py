"""Command-line options generated from the library's Settings dataclasses (letter.settings), so a
setting's default, help text and range are written once, in the dataclass."""
import dataclasses

import click

from letter.config import PRESETS, named_preset
from letter.settings import default_of, field_type
from letter.utils import read_mapping_file


class ListOf(click.ParamType):
    """A comma-separated list: '2048,1024,512'."""

    def __init__(self, element: type):
        self.element = element
        self.name = f"{element.__name__},..."

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [self.element(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"expected comma-separated {self.element.__name__} values, got {value!r}", param, ctx)


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
            flag = "--" + (f.metadata.get("flag") or f.name).replace("_", "-")
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
    options given. Removes the fields' keys from `options`; validates (bad values are one-line LetterErrors)."""
    values = cls.from_dict(named_preset(preset).get(cls.section, {}), validate=False).to_dict() if preset else {}
    if config_file:
        values.update(read_mapping_file(config_file))
        values = cls.from_dict(values, validate=False).to_dict()
    for f in dataclasses.fields(cls):
        given = options.pop(f.name, None)
        if given is not None:
            values[f.name] = given
    return cls.from_dict(values)
