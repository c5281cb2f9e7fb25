"""Dataclass configs: defaults < YAML file < command-line flags, with typos caught by name.

One helper for every command: a config class is a plain dataclass whose fields carry a `help`
string; `add_arguments` turns the fields into `--kebab-case` flags and `resolve` merges the layers
and checks names and types, so a misspelt key is a one-line error with a suggestion.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any

from baselines.infra import UserError, atomic_write_text

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(UserError, ValueError):
    """A config file or flag that names an unknown key or holds a value of the wrong type."""


def option(default, help: str, **kwargs):
    """A dataclass field with its `--help` text."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _optional(kind: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`; (kind, False) otherwise."""
    args = typing.get_args(kind)
    if (typing.get_origin(kind) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return kind, False


def _element(kind: Any) -> Any | None:
    """The element type of `tuple[X, ...]` / `tuple[X, X]`, else None."""
    if typing.get_origin(kind) is tuple:
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        if args and all(a == args[0] for a in args):
            return args[0]
    return None


def _scalar(name: str, value, kind: type, source: str):
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {name!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")


def _coerce(name: str, value, kind: Any, source: str):
    kind, optional = _optional(kind)
    if value is None and optional:
        return None
    element = _element(kind)
    if element is not None:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name!r} must be a list, got {value!r}")
        return tuple(_scalar(name, v, element, source) for v in value)
    if typing.get_origin(kind) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {name!r} must be a mapping, got {value!r}")
        return dict(value)
    return _scalar(name, value, kind, source)


def from_dict(cls, values: dict, source: str = "config"):
    """An instance of `cls` from `values`; unknown keys and wrong types are errors."""
    kinds = _field_types(cls)
    unknown = [k for k in values if k not in kinds]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(kinds), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{source}: unknown key {key!r}{hint}")
    return cls(**{k: _coerce(k, v, kinds[k], source) for k, v in values.items()})


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def preset_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset shipped in `baselines/configs/`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset (presets: {names})")


def read_yaml(name_or_path: str) -> dict:
    import yaml  # here, not at the top: building the parser (and --help) needs no YAML

    path = preset_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return values


def _flag_parser(kind: type, name: str):
    """argparse `type=` for one scalar: numbers and strings as argparse reads them, with a clear error."""
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def _checked(parse):
    """A field's own flag parser, its ValueError shown by argparse as the message it carries."""
    def checked(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    checked.__name__ = getattr(parse, "__name__", "value")
    return checked


def _list_parser(element: type, allowed: tuple | None):
    """`a,b,c` -> a tuple of `element`s (each one of `allowed` when given)."""
    def parse(text: str) -> tuple:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        try:
            parsed = tuple(element(v) for v in values)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {element.__name__} values, got {text!r}") from None
        bad = [v for v in parsed if allowed and v not in allowed]
        if bad or not parsed:
            shown = f"; choose from {', '.join(map(str, allowed))}" if allowed else ""
            raise argparse.ArgumentTypeError(f"bad value(s) {bad or text!r}{shown}")
        return parsed
    return parse


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                  defaults: dict[str, Any] | None = None) -> None:
    """One `--flag` per field of the dataclass `cls`; flags not given leave the value alone.

    Field metadata: `help`, `choices`, and `parse` (a function of the flag text, for special syntax such
    as `--layers all`). `tuple[X, ...]` fields take comma lists, `X | None` fields take X, bools take
    `--flag/--no-flag`. The help shows the default the run will really use (`defaults` overrides the
    dataclass's, for protocols whose preset changes it).
    """
    kinds = _field_types(cls)
    shown = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, _ = _optional(kinds[f.name])
        default = shown.get(f.name, f.default if f.default is not dataclasses.MISSING else
                            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "")
        element = _element(kind)
        if choices and element is not None:  # a scalar's choices show in its usage, `--method {mocov2,densecl}`
            text += f" (comma list of: {', '.join(map(str, choices))})"
        if "default:" not in text:
            text += f" (default: {_show(default)})"
        common = dict(default=argparse.SUPPRESS, help=text, dest=f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif "parse" in f.metadata:
            parser.add_argument(flag, type=_checked(f.metadata["parse"]), metavar=f.name.upper(), **common)
        elif element is not None:
            parser.add_argument(flag, type=_list_parser(element, choices), metavar="A,B,...", **common)
        elif typing.get_origin(kind) is dict:
            continue  # mappings are set from a config file, not a flag
        else:
            parser.add_argument(flag, type=_flag_parser(kind, f.name), metavar=None if choices else f.name.upper(),
                                choices=choices, **common)


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "none"
    return repr(value)


def resolve(cls, config_file: str | None, args: argparse.Namespace | dict | None = None):
    """Defaults, then the YAML file (a path or preset name), then explicit command-line values."""
    values = read_yaml(config_file) if config_file else {}
    source = str(preset_path(config_file)) if config_file else "config"
    config = from_dict(cls, values, source)
    overrides = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    overrides = {k: v for k, v in overrides.items() if k in _field_types(cls)}
    return dataclasses.replace(config, **overrides)


def write_yaml(config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
