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
import typing
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config file or flag that names an unknown key or holds a value of the wrong type."""


def option(default, help: str, **kwargs):
    """A dataclass field with its `--help` text."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(name: str, value, kind: type, source: str):
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
    raise ConfigError(f"{source}: {name!r} must be {kind.__name__}, got {value!r}")


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
    path = preset_path(name_or_path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    return values


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--flag` per field; flags not given on the command line leave the value alone."""
    kinds = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        kind = kinds[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(
                flag, type=kind, default=argparse.SUPPRESS, help=help_text, metavar=f.name.upper(),
                choices=f.metadata.get("choices"),
            )


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
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    os.replace(tmp, path)
