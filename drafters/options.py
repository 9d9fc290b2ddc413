"""How every drafter takes its options: one rule, one helper.

The rule. A drafter's constructor takes its options as keyword arguments, and only so: ``SuffixDrafter(decay=0.9)``,
exactly what ``make_drafter(name, **options)``, ``speculation.drafter_options`` in a config file and the CLI's
``--option key=value`` hand it. Each drafter declares its options as one dataclass (a subclass of
`DrafterOptions`) and builds it with `build_options(Options, options)`, which
- refuses a name the dataclass does not have, listing the ones it has
  ("unknown suffix drafter option 'bogus'; known options: decay, ...");
- copies what it is given (deeply: the nested option dicts of the composite drafter too), so the caller's mapping
  is never changed by the drafter or by anything it later does with its options;
- validates: each dataclass checks its own rules in `validate`, then every value is checked against the field's
  annotation (an int option takes an int, not True or 2.5; an int is accepted where a float is, and widened).

There is no config-object parameter beside the keywords, so nothing can be silently dropped between the two: a
dataclass instance in hand becomes keywords with `as_options` (``SuffixDrafter(**as_options(cfg))``).

A field whose default is itself a dataclass (the suffix drafter's `tree`) is a group: its fields are options under
their own names, flat (``min_prob=0.1``, not ``tree={...}``), as the CLI and config files spell them.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from typing import Any, ClassVar, Mapping, TypeVar

T = TypeVar("T", bound="DrafterOptions")


class UnknownOptionError(ValueError, TypeError):
    """An option name the drafter does not have. A TypeError too, as Python's own unexpected keyword argument is."""


class DrafterOptions:
    """Base of every drafter's options dataclass: `drafter` names it in messages, `validate` checks its rules."""

    drafter: ClassVar[str] = "drafter"  # as messages call it: "{drafter} drafter option ..."

    def __post_init__(self) -> None:
        _widen(self)
        self.validate()
        _check_types(self, self.drafter)

    def validate(self) -> None:
        """The dataclass's own rules (ranges, relations between options); raise ValueError naming the option.
        Runs before the type check, so a rule may give its own message for a value of the wrong type."""


def _is_group(f: dataclasses.Field) -> bool:
    return f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory)


def option_names(options_type: type) -> list[str]:
    """The option names a drafter with these options takes: its fields, a group's fields in place of the group."""
    names: list[str] = []
    for f in dataclasses.fields(options_type):
        names.extend(option_names(f.default_factory) if _is_group(f) else [f.name])
    return names


def build_options(options_type: type[T], options: Mapping[str, Any]) -> T:
    """A new, validated `options_type` from keyword options (a copy: `options` is left as it was)."""
    known = option_names(options_type)
    for name in options:
        if name not in known:
            raise UnknownOptionError(
                f"unknown {options_type.drafter} drafter option {name!r}; known options: {', '.join(known)}"
            )
    return _build(options_type, copy.deepcopy(dict(options)))


def _build(cls: type, values: dict[str, Any]):
    kwargs = {}
    for f in dataclasses.fields(cls):
        if _is_group(f):
            kwargs[f.name] = _build(f.default_factory, values)
        elif f.name in values:
            kwargs[f.name] = values.pop(f.name)
    return cls(**kwargs)


def as_options(options: Any) -> dict[str, Any]:
    """A drafter's options dataclass as the keyword options that build it again (groups flattened)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if _is_group(f):
            out.update(as_options(value))
        else:
            out[f.name] = copy.deepcopy(value)
    return out


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _widen(obj: Any) -> None:
    """int -> float where the field is a float; a Mapping -> a dict where it is a dict; groups likewise."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _is_group(f):
            _widen(value)
        elif hints.get(f.name) is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, f.name, float(value))
        elif typing.get_origin(hints.get(f.name)) is dict and isinstance(value, Mapping):
            setattr(obj, f.name, dict(value))


def _conforms(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    hint = origin or hint
    return isinstance(value, hint) if isinstance(hint, type) else True


_ARTICLES = {int: "an int", float: "a number", bool: "a bool (true or false)", str: "a string", dict: "a mapping"}


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    hint = typing.get_origin(hint) or hint
    return _ARTICLES.get(hint, getattr(hint, "__name__", str(hint)))


def _check_types(obj: Any, drafter: str) -> None:
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if _is_group(f):
            _check_types(value, drafter)
        elif f.name in hints and not _conforms(value, hints[f.name]):
            raise ValueError(f"{drafter} drafter option {f.name} must be {_describe(hints[f.name])}, got {value!r}")
