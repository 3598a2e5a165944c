"""Command-line flags from a config dataclass, and the dataclass back from the parsed flags.

Each config (LoopConfig, Stage1Config, VLPOConfig) declares its fields with :func:`opt`, which
keeps the flag's help text, its fixed values and the flag name in the field's metadata. The
dataclass is then the one place a setting is named, defaulted and described: a new field with
``opt(...)`` is a new flag, and :func:`config_from_args` reads it back without a hand-written
mapping that could drift from it.

The parsed namespace keeps argparse's own attribute names (``--out`` lands in ``args.out``),
so code that reads the namespace directly sees the same names as with hand-written flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Iterable

__all__ = ["opt", "flag_name", "add_config_arguments", "config_from_args"]


def opt(default: Any, help: str | None, *, choices: tuple | None = None, flag: str | None = None,
        debug: bool = False) -> Any:
    """A config field whose flag is generated from it.

    help: the flag's help text; ``None`` for a field with no flag (it keeps its default).
    choices: the fixed set of values the flag accepts.
    flag: the flag name when it is not ``--`` + the field name with ``-`` for ``_``. A bool
        field that defaults to True and is named ``--no-x`` is a switch that sets it False.
    debug: a working flag hidden from ``--help`` (argparse.SUPPRESS).
    """
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "flag": flag, "debug": debug})


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    """The namespace attribute argparse derives from the flag name."""
    return flag_name(f)[2:].replace("-", "_")


def _negated(f: dataclasses.Field) -> bool:
    return f.default is True and flag_name(f).startswith("--no-")


def _value_type(cls: type, f: dataclasses.Field) -> type:
    """The field's annotated type with ``| None`` dropped (``int | None`` parses as int)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{cls.__name__}.{f.name}: expected one type besides None, got {hint}")
        hint = args[0]
    return hint


def _flag_fields(cls: type, skip: Iterable[str]) -> list[dataclasses.Field]:
    skip = set(skip)
    return [f for f in dataclasses.fields(cls) if f.name not in skip and f.metadata.get("help") is not None]


def add_config_arguments(p: argparse.ArgumentParser | Any, cls: type, *, skip: Iterable[str] = (),
                         show_default: bool = False) -> None:
    """Add one flag per field of the dataclass ``cls`` declared with :func:`opt` (``skip``:
    field names the caller adds itself). show_default: append "(default X)" to each help."""
    for f in _flag_fields(cls, skip):
        help_ = f.metadata["help"] + (f" (default {f.default})" if show_default else "")
        if f.metadata.get("debug"):
            help_ = argparse.SUPPRESS
        flag, kind = flag_name(f), _value_type(cls, f)
        if kind is bool:
            if _negated(f) or f.default is False:
                # a switch: --x sets True, --no-x sets False (read back inverted)
                p.add_argument(flag, action="store_true", help=help_)
            else:  # --x / --no-x (type=bool would read "False" as True)
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        p.add_argument(flag, type=kind, default=f.default, choices=f.metadata.get("choices"), help=help_)


def config_from_args(cls: type, args: argparse.Namespace, *, skip: Iterable[str] = (), **overrides: Any) -> Any:
    """The dataclass ``cls`` from the namespace :func:`add_config_arguments` filled; fields in
    ``overrides`` (and those without a flag) take the given value (or their default)."""
    values = {}
    for f in _flag_fields(cls, set(skip) | set(overrides)):
        v = getattr(args, _dest(f))
        values[f.name] = (not v) if _negated(f) else v
    return cls(**values, **overrides)
