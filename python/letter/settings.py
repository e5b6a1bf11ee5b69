"""The one config pattern of every trainer: a dataclass whose fields carry their help text, range
and resume rule, with to_dict / from_dict / validate.

    @dataclass
    class CFConfig(Settings):
        section = "cf"
        dim: int = setting(32, "Hidden size.", low=1)

`validate()` checks every field's type (ints are ints, floats are finite), range and choices and
then the class's own cross-field rules (`check()`), raising one LetterError that names the field.
The CLI builds its command-line options from the same fields (cli/options.py), so a default is written once.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from letter.errors import LetterError, SettingError
from letter.utils import read_mapping_file

_MISSING = dataclasses.MISSING


def setting(default: Any, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, choices: tuple | None = None,
            may_change_on_resume: bool = False, cli: bool = True, flag: str | None = None):
    """A Settings field. `low`/`high` bound the value (or each list element), `*_open` excludes the
    bound; `may_change_on_resume` marks fields a resumed run may change (epochs, batch size for
    evaluation...); `cli=False` keeps it out of the generated command-line options; `flag` names
    its option when that is not the field's name (num_beams: beams)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices, "may_change_on_resume": may_change_on_resume, "cli": cli, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def nested(cls, help: str):
    """A Settings field holding another Settings (a sub-section, e.g. data.synthetic); given as a
    mapping in files, validated by `cls`; not a command-line option."""
    return dataclasses.field(default_factory=cls, metadata={"help": help, "cli": False, "nested": True})


def field_type(cls, f: dataclasses.Field) -> tuple[type, type | None]:
    """(base type, element type for lists) of a field, from its annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    origin = typing.get_origin(hint)
    if origin is list:
        return list, typing.get_args(hint)[0]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], None
    return hint, None


def _bound_text(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"  # 4294967295, not 4.29497e+09


def _range_text(meta: dict) -> str:
    parts = []
    if meta["low"] is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {_bound_text(meta['low'])}")
    if meta["high"] is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {_bound_text(meta['high'])}")
    return " and ".join(parts)


class Settings:
    """Base of CFConfig, TokenizerConfig, RecConfig (and the LC-Rec settings): see the module doc."""

    section = "settings"  # the name used in error messages and the pipeline config section

    # -- conversion ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, validate: bool = True):
        """cls(**values) with unknown keys and wrong types reported as one-line LetterErrors."""
        if not isinstance(values, dict):
            raise LetterError(f"{cls.section}: expected a mapping of setting -> value, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LetterError(f"{cls.section}: unknown setting(s) {unknown}; known: {sorted(known)}")
        obj = cls(**values)
        return obj.validate() if validate else obj

    @classmethod
    def from_file(cls, path: str):
        """Read a .json or YAML file of this class's fields."""
        return cls.from_dict(read_mapping_file(path))

    def replace(self, **changes):
        """A copy with `changes` applied (None values are ignored), validated."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None}).validate()

    # -- validation ---------------------------------------------------------------------------
    def validate(self):
        """Check every field (type, finiteness, range, choices), then `check()`; returns self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, element = field_type(type(self), f)
            if kind is list:
                if not isinstance(value, (list, tuple)) or not value:
                    self.fail(f.name, f"must be a non-empty list, got {value!r}")
                value = [self._coerce(f, element, v) for v in value]
                setattr(self, f.name, value)
                for v in value:
                    self._check_range(f, v)
            elif f.metadata.get("nested"):
                setattr(self, f.name, value.validate() if isinstance(value, kind) else kind.from_dict(value))
            else:
                value = self._coerce(f, kind, value)
                setattr(self, f.name, value)
                self._check_range(f, value)
        self.check()
        return self

    def check(self) -> None:
        """Cross-field rules of a subclass (raise with self.fail)."""

    def fail(self, name: str, message: str):
        raise SettingError(name, message, section=self.section)

    def _coerce(self, f: dataclasses.Field, kind: type, value):
        """The value as `kind`, or a LetterError naming the field. bool is not an int here, and an
        int is accepted for a float field."""
        if kind is bool:
            if not isinstance(value, bool):
                self.fail(f.name, f"must be true or false, got {value!r}")
            return value
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    return int(value)
                self.fail(f.name, f"must be an integer, got {value!r}")
            return value
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(f.name, f"must be a number, got {value!r}")
            if not math.isfinite(value):
                self.fail(f.name, f"must be a finite number, got {value!r}")
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                self.fail(f.name, f"must be a string, got {value!r}")
            return value
        return value

    def _check_range(self, f: dataclasses.Field, value) -> None:
        meta = f.metadata
        if meta.get("choices") is not None and value not in meta["choices"]:
            self.fail(f.name, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        low, high = meta.get("low"), meta.get("high")
        bad_low = low is not None and (value <= low if meta["low_open"] else value < low)
        bad_high = high is not None and (value >= high if meta["high_open"] else value > high)
        if bad_low or bad_high:
            self.fail(f.name, f"must be {_range_text(meta)}, got {value!r}")

    # -- resume -------------------------------------------------------------------------------
    @classmethod
    def fixed_on_resume(cls) -> list[str]:
        """Fields a resumed run must share with the checkpoint."""
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("may_change_on_resume")]

    # -- help ---------------------------------------------------------------------------------
    @classmethod
    def describe(cls, name: str) -> str:
        """The field's help text followed by its range (as the CLI shows it)."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        rng = _range_text(f.metadata)
        return f.metadata["help"] + (f" ({rng})" if rng else "")


def default_of(cls, f: dataclasses.Field):
    return f.default_factory() if f.default is _MISSING else f.default
