"""Command-line flags from a config dataclass, and the dataclass back from the parsed flags.

Each config (LoopConfig, Stage1Config, VLPOConfig) declares its fields with :func:`opt`, which
keeps the flag's help text, its fixed values and the flag name in the field's metadata. The
dataclass is then the one place a setting is named, defaulted and described: a new field with
``opt(...)`` is a new flag, and :func:`config_from_args` reads it back without a hand-written
mapping that could drift from it.

A config that contains another one (VLPOConfig holds the training loop's LoopConfig) declares
that field with :func:`nested`: the outer command gets the flags of the inner fields it names,
each with the inner field's own name, help and choices and the default of the outer config's
inner instance; the inner dataclass keeps its own checks.

The parsed namespace keeps argparse's own attribute names (``--out`` lands in ``args.out``),
so code that reads the namespace directly sees the same names as with hand-written flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Iterable

__all__ = ["opt", "nested", "flag_name", "add_config_arguments", "config_from_args"]


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


def nested(factory: Callable[[], Any], flags: Iterable[str]) -> Any:
    """A config field holding another config dataclass, ``factory()`` by default (the outer
    config's defaults for it). flags: the inner fields the outer command exposes, in this
    order; the others keep the value ``factory()`` gives them."""
    return dataclasses.field(default_factory=factory, metadata={"nested": tuple(flags)})


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    """The namespace attribute argparse derives from the flag name."""
    return flag_name(f)[2:].replace("-", "_")


def _negated(f: dataclasses.Field, default: Any) -> bool:
    return default is True and flag_name(f).startswith("--no-")


def _value_type(cls: type, f: dataclasses.Field) -> type:
    """The field's annotated type with ``| None`` dropped (``int | None`` parses as int)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{cls.__name__}.{f.name}: expected one type besides None, got {hint}")
        hint = args[0]
    return hint


@dataclasses.dataclass(frozen=True)
class _Flag:
    field: dataclasses.Field  # the field that declares the flag (an inner one for a nested config)
    kind: type                # its value type
    default: Any              # the default the command shows and uses
    outer: str | None = None  # the nested field it belongs to (None: a field of the config itself)


def _flags(cls: type, skip: Iterable[str]) -> list[_Flag]:
    """The flags of ``cls``'s fields in declaration order, a nested config's where it is declared."""
    skip, out = set(skip), []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        inner_names = f.metadata.get("nested")
        if inner_names is not None:
            inner = f.default_factory()
            by_name = {g.name: g for g in dataclasses.fields(inner)}
            missing = [n for n in inner_names if n not in by_name or by_name[n].metadata.get("help") is None]
            if missing:
                raise TypeError(f"{cls.__name__}.{f.name}: {type(inner).__name__} has no flag field {missing}")
            out += [_Flag(by_name[n], _value_type(type(inner), by_name[n]), getattr(inner, n), f.name)
                    for n in inner_names]
        elif f.metadata.get("help") is not None:
            out.append(_Flag(f, _value_type(cls, f), f.default))
    return out


def add_config_arguments(p: argparse.ArgumentParser | Any, cls: type, *, skip: Iterable[str] = (),
                         show_default: bool = False) -> None:
    """Add one flag per field of the dataclass ``cls`` declared with :func:`opt` (and per named
    inner field of one declared with :func:`nested`; ``skip``: field names the caller adds
    itself). show_default: append "(default X)" to each help that has a value to show (not a
    switch, not None)."""
    for fl in _flags(cls, skip):
        f, kind, default = fl.field, fl.kind, fl.default
        help_ = f.metadata["help"]
        if f.metadata.get("debug"):
            help_ = argparse.SUPPRESS
        elif show_default and default is not None and not (kind is bool and (_negated(f, default) or default is False)):
            help_ += f" (default {default})"
        if kind is bool:
            if _negated(f, default) or default is False:
                # a switch: --x sets True, --no-x sets False (read back inverted)
                p.add_argument(flag_name(f), action="store_true", help=help_)
            else:  # --x / --no-x (type=bool would read "False" as True)
                p.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, default=default, help=help_)
            continue
        p.add_argument(flag_name(f), type=kind, default=default, choices=f.metadata.get("choices"), help=help_)


def config_from_args(cls: type, args: argparse.Namespace, *, skip: Iterable[str] = (), **overrides: Any) -> Any:
    """The dataclass ``cls`` from the namespace :func:`add_config_arguments` filled; fields in
    ``overrides`` (and those without a flag) take the given value (or their default). A nested
    config is its default instance with the flagged inner fields replaced."""
    values: dict[str, Any] = {}
    inner: dict[str, dict[str, Any]] = {}
    for fl in _flags(cls, set(skip) | set(overrides)):
        v = getattr(args, _dest(fl.field))
        v = (not v) if _negated(fl.field, fl.default) else v
        if fl.outer is None:
            values[fl.field.name] = v
        else:
            inner.setdefault(fl.outer, {})[fl.field.name] = v
    for f in dataclasses.fields(cls):
        if f.name in inner:
            values[f.name] = dataclasses.replace(f.default_factory(), **inner[f.name])
    return cls(**values, **overrides)
