"""Derive command-line flags from typed config dataclasses, so a flag and a field never disagree.

A field whose type is itself a dataclass is a section: its fields become flags too (flat:
``--servers``, not ``--ps.servers``), listed under the section's title in ``--help`` (the
first line of its docstring). ``field(metadata={"flag": "checkpoint-dir"})`` names a field's
flag when its name alone would be ambiguous (``CheckpointConfig.dir``). Flag names must be
unique across sections; a clash is a TypeError when the parser is built.

    @dataclass
    class TrainConfig:
        lr: float = field(default=0.1, metadata={"help": "learning rate"})
        amp: bool = False
        optimizer: Literal["sgd", "adam"] = "sgd"

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)      # --lr, --amp/--no-amp, --optimizer
    cfg = dataclass_from_args(TrainConfig, parser.parse_args())
    to_argv(cfg)  # ['--lr=0.1', '--no-amp', '--optimizer=sgd'] -- what the launcher passes on

Supported field types: int, float, str, bool, pathlib.Path, Literal[...] of ints or of strs,
and Optional[X] / X | None of any of them. Anything else raises TypeError when the parser is
built, not when a user happens to pass the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import types
import typing
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")

_SCALARS: tuple[type, ...] = (int, float, str, bool, pathlib.Path)


@dataclasses.dataclass(frozen=True)
class _FlagSpec:
    """How one dataclass field maps to a flag: the scalar type, its choices, nullability."""

    scalar: type
    choices: tuple[Any, ...] | None
    optional: bool


def flag_meta(text: str, flag: str | None = None) -> dict[str, str]:
    """A field's metadata: its help, and its flag's name when the field's own would be
    ambiguous (``field(default=None, metadata=flag_meta("...", flag="checkpoint-dir"))``)."""
    return {"help": text} if flag is None else {"help": text, "flag": flag}


def at_least(value: int | None, least: int, flag: str) -> None:
    """A config's check of an optional count: ValueError naming ``--flag`` below ``least``."""
    if value is not None and value < least:
        raise ValueError(f"--{flag} must be at least {least}, got {value}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _spec(cls: type, name: str, hint: Any) -> _FlagSpec:
    optional = False
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"{cls.__name__}.{name}: only `X | None` unions are supported")
        optional, hint = True, args[0]
        origin = typing.get_origin(hint)
    choices = None
    if origin is Literal:
        choices = typing.get_args(hint)
        kinds = {type(c) for c in choices}
        # bool is excluded: type=bool would turn the string "False" into True.
        if len(kinds) != 1 or next(iter(kinds)) not in (int, str):
            raise TypeError(f"{cls.__name__}.{name}: Literal choices must be all int or all str")
        hint = next(iter(kinds))
    if hint not in _SCALARS:
        raise TypeError(f"{cls.__name__}.{name}: unsupported field type {hint!r}")
    return _FlagSpec(hint, choices, optional)


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _specs(
    cls: type, exclude: typing.AbstractSet[str]
) -> dict[str, tuple[dataclasses.Field[Any], _FlagSpec]]:
    """The leaf fields of ``cls`` (not sections), by flag name without the dashes."""
    if not _is_section(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    # get_type_hints resolves string annotations (from __future__ import annotations).
    hints = typing.get_type_hints(cls)
    return {
        _dest(f): (f, _spec(cls, f.name, hints[f.name]))
        for f in dataclasses.fields(cls)
        if f.init and f.name not in exclude and not _is_section(hints[f.name])
    }


def _sections(cls: type) -> dict[str, type]:
    """The fields of ``cls`` whose type is a dataclass: name -> that type."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)
            if f.init and _is_section(hints[f.name])}


def _dest(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag", f.name)).replace("-", "_")


def _all_dests(cls: type, exclude: typing.AbstractSet[str], seen: dict[str, str],
               where: str) -> None:
    for dest in _specs(cls, exclude):
        if dest in seen:
            raise TypeError(f"flag {_flag(dest)} is defined twice: in {seen[dest]} and {where}")
        seen[dest] = where
    for name, sub in _sections(cls).items():
        _all_dests(sub, exclude, seen, f"{where}.{name}")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls: type, *, exclude: typing.AbstractSet[str] = frozenset()
) -> None:
    """Add one ``--flag-name`` per init field of dataclass ``cls`` to ``parser``.

    Booleans become ``--flag`` / ``--no-flag``; ``Literal`` types become choices; optional
    types take the inner type. Help comes from ``field(metadata={"help": ...})`` and gets
    " (default: X)" appended unless it already says "(default"; defaults come from the field
    default; a field without a default becomes a required flag.

    Args:
        parser: the parser (or argument group's parser) to extend.
        cls: a dataclass type.
        exclude: field names that get no flag (they keep their dataclass default).

    Raises:
        TypeError: if ``cls`` is not a dataclass, a field has an unsupported type, or two
            fields (in any sections) would make the same flag.
    """
    _all_dests(cls, exclude, {}, cls.__name__ if isinstance(cls, type) else repr(cls))
    _add_arguments(parser, cls, exclude)


def _add_arguments(parser: Any, cls: type, exclude: typing.AbstractSet[str]) -> None:
    for name, (f, spec) in _specs(cls, exclude).items():
        default = _default(f)
        kwargs: dict[str, Any] = {"dest": name}
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        # argparse %-formats help strings, so a literal "%" in a field's help must be doubled.
        help_text = str(f.metadata.get("help", "")).replace("%", "%%")
        # A help text that already explains its default ("default: the workload's") keeps it.
        if default is not dataclasses.MISSING and "(default" not in help_text:
            help_text = f"{help_text} (default: %(default)s)".strip()
        if spec.scalar is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = spec.scalar
            kwargs["metavar"] = spec.scalar.__name__.upper()
            if spec.choices is not None:
                kwargs["choices"] = spec.choices
                kwargs["metavar"] = "{" + ",".join(str(c) for c in spec.choices) + "}"
        action = parser.add_argument(_flag(name), **kwargs)
        # Set after creation: BooleanOptionalAction (Python < 3.14) appends its own default.
        action.help = help_text
    for sub in _sections(cls).values():
        doc = (sub.__doc__ or sub.__name__).strip().splitlines()[0]
        group = parser.add_argument_group(doc.rstrip("."))
        _add_arguments(group, sub, exclude)


def config_from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    """:func:`dataclass_from_args` for a command's main: a refused value is a user's error
    (one line, exit 2), not a traceback."""
    from .exits import UserError

    try:
        return dataclass_from_args(cls, namespace)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def dataclass_from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    """Build ``cls`` from the values that :func:`add_dataclass_arguments` parsed.

    Fields absent from ``namespace`` (excluded ones) keep their dataclass defaults; other
    attributes of ``namespace`` (a sub-command, another config's flags) are ignored.

    Args:
        cls: the dataclass type the flags were derived from.
        namespace: the result of ``parser.parse_args()``.

    Returns:
        ``cls(**fields)``.

    Raises:
        ValueError: whatever ``cls.__post_init__`` raises, unchanged.
    """
    if not _is_section(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    sections = _sections(cls)
    kwargs: dict[str, Any] = {name: dataclass_from_args(sub, namespace)
                              for name, sub in sections.items()}
    for f in dataclasses.fields(cls):
        if f.init and f.name not in sections and hasattr(namespace, _dest(f)):
            kwargs[f.name] = getattr(namespace, _dest(f))
    return cls(**kwargs)


def to_argv(obj: Any, *, exclude: typing.AbstractSet[str] = frozenset()) -> list[str]:
    """Return the flags that rebuild ``obj`` through :func:`add_dataclass_arguments`.

    Every field is written out, so a worker's command line documents its whole config.
    Values use the ``--flag=value`` form so that a string starting with "-" stays a value.

    Args:
        obj: a dataclass instance.
        exclude: field names to leave out (those excluded from the parser).

    Returns:
        The argv list, in field order.

    Raises:
        TypeError: if ``obj`` is not a dataclass instance or a field type is unsupported.
        ValueError: if a field is None but does not default to None (no flag says None).
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a dataclass instance, got {obj!r}")
    argv: list[str] = []
    for name, (f, spec) in _specs(type(obj), exclude).items():
        value = getattr(obj, f.name)
        flag = _flag(name)
        if value is None:
            if not spec.optional or _default(f) is not None:
                raise ValueError(f"{flag} is None; only fields defaulting to None may be None")
            continue
        if spec.scalar is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif spec.scalar is float:
            argv.append(f"{flag}={float(value)!r}")  # repr: the shortest exact round trip
        else:
            argv.append(f"{flag}={value}")
    for name in _sections(type(obj)):
        argv += to_argv(getattr(obj, name), exclude=exclude)
    return argv
