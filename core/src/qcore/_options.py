"""Typed component options: every quantizer, calibrator, allocator and the pipeline declare an ``Options``
dataclass; ``-o key=value`` strings and YAML values are checked and converted against those fields."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from qcore._errors import QcoreError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A component without options."""


def option_fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of an Options dataclass."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _convert(key: str, value: Any, typ: Any) -> Any:
    origin = get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(typ) if a is not type(None)]
        if (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))) and \
                len(args) < len(get_args(typ)):
            return None
        errors = []
        for a in args:
            try:
                return _convert(key, value, a)
            except QcoreError as exc:
                errors.append(str(exc))
        raise QcoreError(errors[0] if errors else f"option {key}: bad value {value!r}")
    if origin is Literal:
        allowed = get_args(typ)
        for a in allowed:
            if value == a or str(value) == str(a):
                return a
        raise QcoreError(f"option {key}={value!r} is not one of {', '.join(map(str, allowed))}")
    if origin in (tuple, list):
        (inner, *_) = get_args(typ) or (str,)
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [v.strip() if isinstance(v, str) else v for v in items]
        return tuple(_convert(key, v, inner) for v in items if v != "")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise QcoreError(f"option {key}={value!r} is not a boolean (use true or false)")
    if typ in (int, float):
        try:
            if isinstance(value, bool) or (typ is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError  # YAML's `true` is no number
            number = typ(value) if typ is float else int(str(value), 0) if isinstance(value, str) else int(value)
        except (TypeError, ValueError, OverflowError):
            raise QcoreError(f"option {key}={value!r} is not a{'n integer' if typ is int else ' number'}") from None
        if typ is float and not math.isfinite(number):  # NaN passes every `x <= 0` check downstream
            raise QcoreError(f"option {key}={value!r} must be a finite number")
        return number
    if typ is str:
        if isinstance(value, (dict, list, tuple)):
            raise QcoreError(f"option {key}={value!r} must be a single value")
        return str(value)
    return value


def convert_value(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (a string from ``-o`` or a YAML value) to ``typ``, or raise a :class:`QcoreError`."""
    if typ is Path or typ == Path | None:
        if value is None:
            return None
        if not isinstance(value, (str, Path)):
            raise QcoreError(f"{key}={value!r} is not a path")
        return Path(value)
    if typ is Any or typ == dict[str, Any] or typ == dict[str, dict[str, Any]]:
        return value
    return _convert(key, value, typ)


def build_options(cls: type, values: Mapping[str, Any], owner: str = "") -> Any:
    """Instantiate Options dataclass ``cls`` from ``values`` (keys not among its fields are ignored)."""
    fields = option_fields(cls)
    kwargs = {k: _convert(k, v, fields[k]) for k, v in values.items() if k in fields}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, QcoreError) as exc:
        raise QcoreError(f"{owner or cls.__name__} options: {exc}") from None


def check_known(values: Mapping[str, Any], option_classes: Iterable[type]) -> None:
    """Refuse keys that no Options class declares, listing the valid ones."""
    valid: set[str] = set()
    for cls in option_classes:
        valid |= set(option_fields(cls))
    unknown = sorted(set(values) - valid)
    if unknown:
        raise QcoreError(f"unknown option {', '.join(unknown)}; valid options for this method: "
                         f"{', '.join(sorted(valid)) or '(none)'}")


def parse_assignments(items: Iterable[str], flag: str = "-o") -> dict[str, str]:
    """Parse ``key=value`` strings from ``-o`` (or another repeatable ``flag``); ``-`` in keys becomes ``_``."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QcoreError(f"{flag} expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def parse_scalar(text: str) -> bool | int | float | str | None:
    """The Python value a command-line string stands for when no type is declared (``--model-arg``):
    ``true``/``false`` -> bool, ``none``/``null`` -> None, ``32`` -> int, ``0.5``/``1e-3`` -> float, else str."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text, 10)
    except ValueError:
        pass
    if any(c.isdigit() for c in text):  # "nan"/"inf" stay strings; "1e-3", ".5" are numbers
        try:
            return float(text)
        except ValueError:
            pass
    return text


def describe_options(cls: type) -> dict[str, dict[str, Any]]:
    """Field -> {type, default, help} for listings (help is the field's ``metadata['help']``)."""
    out = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        typ = option_fields(cls)[f.name]
        out[f.name] = {"type": typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", ""),
                       "default": default,
                       "help": f.metadata.get("help", "")}
    return out
