"""A small declarative validator for the YAML files in `graphs/` and `configs/`.

A *section* is a frozen dataclass whose fields are declared with `spec(...)`: the default, a one-line
doc, and the constraints (`choices`, `min`/`max`, a regex `pattern`). The field's annotation is its
type: `int`, `float`, `str`, `bool`, `X | None`, `list[X]`, `dict[str, str]`, `dict[str, Any]` or
another section. A section may add cross-field rules in a `_problems()` method that yields
`(field, message)` pairs.

`build(cls, data, where=...)` turns a parsed YAML mapping into a section instance (defaults filled
in), and `check_partial(cls, data, where=...)` checks a *partial* mapping (a file that will be merged
with others, or a per-pool override) without filling defaults or running cross-field rules.

Every problem raises `ConfigError` with ONE line: `<file>: <dotted.path>: <what is wrong> (<allowed>)`.
`where` maps a dotted path to the file label shown in the message, so that merged settings name the
file that set the offending value.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Callable, Iterator

from dynamo_dwdp.errors import ConfigError

REQUIRED: Any = dataclasses.MISSING
"""Default marker for a key that must be present."""

DNS_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
DNS_LABEL_TEXT = "a DNS label: 1-63 chars of a-z, 0-9 and '-', starting and ending with a letter or digit"
QUANTITY = r"[0-9]+(\.[0-9]+)?([KMGTPE]i?|[mk])?"
QUANTITY_TEXT = "a Kubernetes quantity such as 8Gi, 512Mi or 2"
SEMVER = r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
SEMVER_TEXT = "MAJOR.MINOR.PATCH, e.g. 1.6.1"

Where = Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class Spec:
    """Constraints and documentation of one field (kept in the dataclass field's metadata)."""

    doc: str = ""
    choices: tuple[Any, ...] = ()
    min: float | None = None
    max: float | None = None
    pattern: str | None = None
    pattern_text: str = ""
    internal: bool = False  # not a YAML key (e.g. the file a section was read from)


def spec(default: Any = REQUIRED, *, doc: str, choices: tuple[Any, ...] = (), min: float | None = None,
         max: float | None = None, pattern: str | None = None, pattern_text: str = "",
         factory: Callable[[], Any] | None = None) -> Any:
    """Declare a section field: default (or `REQUIRED`), one-line doc and constraints."""
    meta = {"spec": Spec(doc=doc, choices=tuple(choices), min=min, max=max, pattern=pattern,
                         pattern_text=pattern_text)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    if isinstance(default, (list, dict)):
        frozen_default = default
        return dataclasses.field(default_factory=lambda: type(frozen_default)(frozen_default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any = "") -> Any:
    """A field that is not read from YAML (bookkeeping such as the source file)."""
    return dataclasses.field(default=default, compare=False, repr=False,
                             metadata={"spec": Spec(internal=True)})


def fail(where: Where | str, path: str, message: str) -> typing.NoReturn:
    """Raise the one-line ConfigError `<file>: <path>: <message>`."""
    label = where(path) if callable(where) else where
    raise ConfigError(f"{label}: {path or 'top level'}: {message}")


# ----------------------------------------------------------------------------------------------
# introspection


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def fields_of(cls: type) -> dict[str, tuple[Any, Spec, dataclasses.Field]]:
    """Public (YAML) fields of a section: name -> (resolved type, Spec, dataclass field)."""
    cached = cls.__dict__.get("_schema_fields")
    if cached is not None:
        return cached
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        s = f.metadata.get("spec", Spec())
        if s.internal:
            continue
        out[f.name] = (hints[f.name], s, f)
    setattr(cls, "_schema_fields", out)
    return out


def _split_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def describe_type(tp: Any) -> str:
    tp, nullable = _split_optional(tp)
    origin = typing.get_origin(tp)
    if tp is bool:
        text = "true or false"
    elif tp is int:
        text = "an integer"
    elif tp is float:
        text = "a number"
    elif tp is str:
        text = "a string"
    elif origin is list:
        text = f"a list of {describe_type(typing.get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    elif origin is dict or tp is dict:
        text = "a mapping"
    elif is_section(tp):
        text = "a mapping"
    else:
        text = str(tp)
    return f"{text} or null" if nullable else text


def _got(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{text} ({kind})"


def join_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def allowed_text(s: Spec, tp: Any) -> str:
    """The 'allowed values' part of a message, from the field's constraints."""
    base, nullable = _split_optional(tp)
    if s.choices:
        text = ", ".join(str(c) for c in s.choices)
        return f"{text}, or null" if nullable else text
    if s.pattern_text:
        return s.pattern_text
    parts = [describe_type(tp)]
    if s.min is not None and s.max is not None:
        parts.append(f"{_num(s.min)}..{_num(s.max)}")
    elif s.min is not None:
        parts.append(f">= {_num(s.min)}")
    elif s.max is not None:
        parts.append(f"<= {_num(s.max)}")
    return " ".join(parts)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# ----------------------------------------------------------------------------------------------
# validation


def _check_value(value: Any, tp: Any, s: Spec, path: str, where: Where, partial: bool) -> Any:
    base, nullable = _split_optional(tp)
    if value is None:
        if nullable:
            return None
        fail(where, path, f"must not be null (allowed: {allowed_text(s, tp)})")
    origin = typing.get_origin(base)
    if is_section(base):
        if not isinstance(value, dict):
            fail(where, path, f"expected a mapping, got {_got(value)}")
        return _mapping(base, value, path, where, partial)
    if origin is list:
        if not isinstance(value, list):
            fail(where, path, f"expected {describe_type(tp)}, got {_got(value)}")
        (item_tp,) = typing.get_args(base)
        return [_check_value(v, item_tp, s if not is_section(item_tp) else Spec(), join_path(path, i), where,
                             partial) for i, v in enumerate(value)]
    if origin is dict or base is dict:
        if not isinstance(value, dict):
            fail(where, path, f"expected a mapping, got {_got(value)}")
        args = typing.get_args(base)
        val_tp = args[1] if args else Any
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                fail(where, path, f"keys must be strings, got {_got(k)}")
            out[k] = v if val_tp is Any else _check_value(v, val_tp, Spec(), join_path(path, k), where, partial)
        return out
    if base is bool:
        if not isinstance(value, bool):
            fail(where, path, f"expected true or false, got {_got(value)}")
    elif base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(where, path, f"expected an integer, got {_got(value)} (allowed: {allowed_text(s, tp)})")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(where, path, f"expected a number, got {_got(value)} (allowed: {allowed_text(s, tp)})")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            fail(where, path, f"expected a string, got {_got(value)} (allowed: {allowed_text(s, tp)})")
    if s.choices and value not in s.choices:
        fail(where, path, f"{value!r} is not one of {', '.join(str(c) for c in s.choices)}")
    if s.min is not None and value < s.min or s.max is not None and value > s.max:
        fail(where, path, f"{value!r} is out of range (allowed: {allowed_text(s, tp)})")
    if s.pattern is not None and not re.fullmatch(s.pattern, value):
        fail(where, path, f"{value!r} is not {s.pattern_text or 'valid'}")
    return value


def _unknown_key(cls: type, key: Any, path: str, where: Where) -> typing.NoReturn:
    names = list(fields_of(cls))
    hint = difflib.get_close_matches(str(key), names, n=1)
    did_you_mean = f"did you mean '{hint[0]}'? " if hint else ""
    fail(where, join_path(path, str(key)),
         f"unknown key '{key}' ({did_you_mean}allowed: {', '.join(names)})")


def _mapping(cls: type, data: dict, path: str, where: Where, partial: bool) -> Any:
    fields = fields_of(cls)
    for key in data:
        if key not in fields:
            _unknown_key(cls, key, path, where)
    values = {}
    for name, (tp, s, f) in fields.items():
        fpath = join_path(path, name)
        if name in data:
            values[name] = _check_value(data[name], tp, s, fpath, where, partial)
        elif not partial and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(where, fpath, f"missing required key (allowed: {allowed_text(s, tp)})")
    if partial:
        return values
    obj = cls(**values)
    problems = getattr(obj, "_problems", None)
    if problems is not None:
        for field, message in problems():
            fail(where, join_path(path, field) if field else path, message)
    return obj


def build(cls: type, data: Any, *, where: Where | str, path: str = "") -> Any:
    """Validate a full mapping and return the section instance (defaults filled in)."""
    w = where if callable(where) else (lambda _p, _w=where: _w)
    if not isinstance(data, dict):
        fail(w, path, f"expected a mapping, got {_got(data)}")
    return _mapping(cls, data, path, w, partial=False)


def check_partial(cls: type, data: Any, *, where: Where | str, path: str = "") -> dict:
    """Check keys, types and per-field constraints of a partial mapping; return it (checked)."""
    w = where if callable(where) else (lambda _p, _w=where: _w)
    if not isinstance(data, dict):
        fail(w, path, f"expected a mapping, got {_got(data)}")
    return _mapping(cls, data, path, w, partial=True)


def to_dict(obj: Any) -> Any:
    """A section instance back to plain YAML data (internal fields left out)."""
    if is_section(type(obj)):
        return {name: to_dict(getattr(obj, name)) for name in fields_of(type(obj))}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    """`override` on top of `base`: mappings merge key by key, everything else (lists too) replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def leaf_paths(data: Any, path: str = "") -> Iterator[str]:
    """Dotted paths of every leaf (and every mapping) in parsed YAML data, for provenance."""
    if isinstance(data, dict):
        if path:
            yield path
        for k, v in data.items():
            yield from leaf_paths(v, join_path(path, str(k)))
    else:
        yield path


def document(cls: type, indent: str = "") -> str:
    """Human-readable reference of a section (used by docs/tests): `key: type = default  # doc`."""
    lines = []
    for name, (tp, s, f) in fields_of(cls).items():
        base, _ = _split_optional(tp)
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(to_dict(f.default_factory()))
        else:
            default = "(required)"
        lines.append(f"{indent}{name}: {allowed_text(s, tp)} = {default}  # {s.doc}")
        if is_section(base):
            lines.append(document(base, indent + "  "))
    return "\n".join(lines)
