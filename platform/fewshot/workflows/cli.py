"""Command lines from the workflows' options classes (tyro), with a YAML config file.

``parse(AddClassesOptions)`` builds every flag from the dataclass tree (names with dashes,
each field's docstring as its help, choices from ``Literal`` types, ``--x/--no-x`` for
booleans) and reads ``--config-file my.yaml`` first, so the file supplies defaults and the
flags given beside it win. The file holds the same names as the flags (``num_workers: 2`` or
``num-workers: 2``), flat or grouped (``train: {lr: 1e-3}``); an unknown key is an error that
lists the known ones. Every options class declares ``config_file`` so ``--help`` lists it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import tyro
import yaml

from fewshot.workflows.options import split_names

T = TypeVar("T")


class ConfigFileError(ValueError):
    """A config file that cannot be read or names an unknown option."""


def _key(name: str) -> str:
    return str(name).replace("-", "_")


def _groups(cls: type) -> dict[str, type]:
    """Fields of ``cls`` that are option groups (dataclasses themselves)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        if dataclasses.is_dataclass(base):
            out[f.name] = base
    return out


def _coerce(value: Any, default: Any) -> Any:
    if isinstance(default, tuple) and isinstance(value, str):
        return split_names(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def with_mapping(options: T, data: Mapping[str, Any], where: str = "config file") -> T:
    """``options`` with the values of ``data`` (flat or grouped keys) replaced."""
    groups = _groups(type(options))
    leaves = {f.name: g for g, cls in groups.items() for f in dataclasses.fields(cls)}
    own = {f.name for f in dataclasses.fields(options) if f.name not in groups}
    changes: dict[str, Any] = {}
    group_changes: dict[str, dict[str, Any]] = {g: {} for g in groups}
    unknown = []
    for raw, value in data.items():
        key = _key(raw)
        if key in groups:
            if not isinstance(value, Mapping):
                raise ConfigFileError(f"{where}: {raw!r} is a group of options; give a mapping")
            names = {f.name for f in dataclasses.fields(groups[key])}
            for sub, v in value.items():
                if _key(sub) not in names:
                    unknown.append(f"{raw}.{sub}")
                else:
                    group_changes[key][_key(sub)] = v
        elif key in own:
            changes[key] = _coerce(value, getattr(options, key))
        elif key in leaves:
            group_changes[leaves[key]][key] = value
        else:
            unknown.append(raw)
    if unknown:
        known = sorted(own | set(leaves))
        raise ConfigFileError(f"{where}: unknown option(s) {unknown}; known: {known}")
    for g, vals in group_changes.items():
        if vals:
            current = getattr(options, g)
            vals = {k: _coerce(v, getattr(current, k)) for k, v in vals.items()}
            changes[g] = dataclasses.replace(current, **vals)
    try:
        return dataclasses.replace(options, **changes)
    except (TypeError, ValueError) as err:
        raise ConfigFileError(f"{where}: {err}") from None


def read_config_file(cls: type[T], path: str | Path) -> T:
    """Default options of ``cls`` with a YAML file's values applied."""
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigFileError(f"config file {path}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise ConfigFileError(f"config file {path}: expected a mapping of option names to values")
    return with_mapping(cls(), data, where=f"config file {path}")


def parse(cls: type[T], argv: Sequence[str] | None = None, *, prog: str | None = None,
          description: str | None = None) -> T:
    """Parse ``argv`` into ``cls`` (``--config-file`` first, then the flags); exits 2 with a
    message on a bad flag or config file, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config-file", "--config_file", dest="config_file", default=None)
    known, _ = pre.parse_known_args(argv)
    default = None
    if known.config_file:
        try:
            default = read_config_file(cls, known.config_file)
        except ConfigFileError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
    return tyro.cli(cls, args=argv, default=default, prog=prog, description=description)
