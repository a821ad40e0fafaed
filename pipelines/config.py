"""Typed configuration: nested frozen dataclasses, presets and ``--set section.field=value``.

A pipeline's config is a frozen dataclass whose fields are themselves frozen dataclasses (one per
section). Overrides are strings from the command line; they are parsed against the field's type
annotation, so a typo or a wrong type fails before any work starts, with the valid keys or values.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin


class ConfigError(ValueError):
    """A bad override: unknown key, wrong type or out-of-range value."""


def _fields(cls_or_obj) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls_or_obj)}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cfg) -> list[str]:
    """All dotted keys of a config, e.g. ``["data.num_train", "proposals.mode", ...]``."""
    keys = []
    for name, value in ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)):
        if dataclasses.is_dataclass(value):
            keys += [f"{name}.{k}" for k in valid_keys(value)]
        else:
            keys.append(name)
    return keys


def describe_keys(cfg) -> list[tuple[str, str, str]]:
    """``(key, type, value)`` for every dotted key of ``cfg`` (``paperline list PIPELINE``)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += [(f"{f.name}.{k}", t, v) for k, t, v in describe_keys(value)]
        else:
            hint = _hints(type(cfg))[f.name]
            kind = getattr(hint, "__name__", None) if get_origin(hint) is None else None
            out.append((f.name, kind or str(hint).replace("typing.", ""), repr(value)))
    return out


def unknown_key(full: str, root) -> ConfigError:
    """An unknown ``--set`` key: the closest keys (``svm.c`` → ``svm.C``) and the keys of its
    section, not all ≈ 70 keys on one line (issue 22)."""
    import difflib

    keys = valid_keys(root)
    lower = {k.lower(): k for k in keys}
    close = [lower[full.lower()]] if full.lower() in lower else []
    close = close or difflib.get_close_matches(full, keys, n=3, cutoff=0.6)
    section = full.partition(".")[0]
    same = [k for k in keys if k.startswith(section + ".")]
    msg = f"unknown key {full!r}"
    if close:
        msg += f" (did you mean {' or '.join(close)}?)"
    if same:
        msg += f"; keys of {section}: {', '.join(k.partition('.')[2] for k in same)}"
    else:
        sections = list(dict.fromkeys(k.partition(".")[0] for k in keys))
        msg += f"; sections: {', '.join(sections)}"
    return ConfigError(msg + " (`paperline list PIPELINE` shows every key)")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``annotation`` (int, float, bool, str, Literal, tuple, Optional)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{key}: {text!r} is not one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", "") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(text, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is tuple:
        items = [t.strip() for t in text.strip("()[]").split(",") if t.strip()]
        elem = args[0] if args else str
        return tuple(parse_value(t, elem, key) for t in items)
    if annotation is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
        if not math.isfinite(value):  # no knob means inf or nan; the range checks would pass it
            raise ConfigError(f"{key}: expected a finite number, got {text!r}")
        return value
    if annotation is str:
        return text
    raise ConfigError(f"{key}: cannot parse values of type {annotation!r}")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Accept a Python value (from a preset) or a string (from the CLI) for a field."""
    if isinstance(value, str) and annotation is not str:
        return parse_value(value, annotation, key)
    if get_origin(annotation) is tuple and isinstance(value, list):
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    return value


def apply_overrides(cfg, overrides: Mapping[str, Any], _prefix: str = "", _root=None):
    """Return a copy of ``cfg`` with dotted-key overrides applied (validated, type-checked)."""
    root = cfg if _root is None else _root
    grouped: dict[str, dict[str, Any]] = {}
    changes: dict[str, Any] = {}
    fields = _fields(cfg)
    hints = _hints(type(cfg))
    for key, value in overrides.items():
        full = _prefix + key
        head, _, rest = key.partition(".")
        if head not in fields:
            raise unknown_key(full, root)
        sub = getattr(cfg, head)
        if dataclasses.is_dataclass(sub):
            if not rest:
                raise ConfigError(
                    f"{full!r} is a section; set one of its fields, e.g. {full}.<field>"
                )
            grouped.setdefault(head, {})[rest] = value
        elif rest:
            raise unknown_key(full, root)
        else:
            changes[head] = _coerce(value, hints[head], full)
    for head, sub_overrides in grouped.items():
        changes[head] = apply_overrides(
            getattr(cfg, head), sub_overrides, f"{_prefix}{head}.", root
        )
    try:
        return dataclasses.replace(cfg, **changes)
    except (ValueError, TypeError) as e:  # __post_init__ range checks
        raise ConfigError(str(e)) from None


def parse_set_args(pairs: list[str]) -> dict[str, str]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": "1", "c": "x"}``; malformed items are errors."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def check(condition: bool, message: str) -> None:
    """Range check for ``__post_init__``: raises ValueError with the field and expectation."""
    if not condition:
        raise ValueError(message)


# Dataset paths: a pipeline's steps(cfg) checks that its real data is there (exit 2 naming the key,
# before Ray starts, issue 20). `paperline submit` validates a config on the client for a cluster
# whose nodes hold the data, so there only the keys are checked, not the local disk.
_LOCAL_DATA = contextvars.ContextVar("paperline_local_data", default=True)


def data_paths_are_local() -> bool:
    """Whether steps(cfg) should check dataset paths on this machine's disk."""
    return _LOCAL_DATA.get()


@contextlib.contextmanager
def remote_data_paths():
    """Within this block steps(cfg) checks dataset keys but not their paths (``paperline submit``)."""
    token = _LOCAL_DATA.set(False)
    try:
        yield
    finally:
        _LOCAL_DATA.reset(token)
