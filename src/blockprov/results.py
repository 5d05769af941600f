"""What commands, the agent's control socket and the HTTP service return: frozen dataclasses, not
dicts. They become dicts only at the edges — ``--json`` (cli/_common.py ``emit``), an HTTP answer
(service/), a control-socket reply (agent/control.py) — by ``to_dict``, the one function that
does it; the far side of a control socket (or of the repository's request queue) rebuilds the
class it expects with ``from_dict``, as errors.py rebuilds an error's class.

Shapes are stable: a part marked ``inline()`` spreads its fields into its parent's dict (a status
made of a cache's part and an agent's part is one flat object, as it always was); a field whose
value is ``None`` and that is marked ``omit_none()`` is left out of the dict, as the dicts these
classes replaced left out what they did not know (an agent of an older version says nothing of
``chunks_from_repository``; a served cache has no ``clean_shutdown``). ``from_dict`` ignores keys
it does not know (a newer agent's) and gives a missing field its default (an older one's).
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")

_OMIT = "omit_none"
_KEY = "key"
_INLINE = "inline"
_SKIP = "skip"


def omit_none(default: Any = None) -> Any:
    """A field left out of ``to_dict``'s answer while it is None (``default`` None unless given)."""
    return dataclasses.field(default=default, metadata={_OMIT: True})


def inline(**kw: Any) -> Any:
    """A dataclass field whose own fields stand in the parent's dict, not under a key of their own
    (a report made of parts keeps one flat shape)."""
    return dataclasses.field(metadata={_INLINE: True}, **kw)


def skip(**kw: Any) -> Any:
    """A field the edges leave out (what only this process needs, a console's tail)."""
    return dataclasses.field(metadata={_SKIP: True}, **kw)


def keyed(key: str, **kw: Any) -> Any:
    """A field whose dict key is not its name (``from``, a Python keyword)."""
    return dataclasses.field(metadata={_KEY: key}, **kw)


@overload
def to_dict(value: DataclassInstance) -> dict[str, Any]: ...


@overload
def to_dict(value: object) -> Any: ...


def to_dict(value: Any) -> Any:
    """``value`` as plain JSON data: a value with a wire format of its own (a manifest, boot files:
    its ``to_dict``) in that format; dataclasses become dicts (field order kept), mappings dicts,
    sequences lists, paths strings, enums their values; anything else as it is."""
    own = getattr(value, "to_dict", None)
    if callable(own) and not isinstance(value, type):
        return own()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.metadata.get(_SKIP):
                continue
            v = getattr(value, f.name)
            if v is None and f.metadata.get(_OMIT):
                continue
            if f.metadata.get(_INLINE):
                if v is not None:
                    out.update(to_dict(v))
                continue
            out[f.metadata.get(_KEY, f.name)] = to_dict(v)
        return out
    if isinstance(value, Mapping):
        return {str(k): to_dict(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_dict(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """An instance of the dataclass ``cls`` from ``to_dict``'s answer (nested dataclasses, lists
    and dicts of them rebuilt by the field types; unknown keys ignored, missing ones defaulted)."""
    hints = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.metadata.get(_INLINE):
            kw[f.name] = _inline(hints[f.name], data)
            continue
        key = f.metadata.get(_KEY, f.name)
        if key in data:
            kw[f.name] = _build(hints[f.name], data[key])
    return cls(**kw)


def _inline(tp: Any, data: Mapping[str, Any]) -> Any:
    """An inline part: built from the parent's keys (the parts of one class have keys of their
    own); an optional one only when any of its keys is there."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:  # X | None
        part = args[0]
        keys = {f.metadata.get(_KEY, f.name) for f in dataclasses.fields(part)}
        return from_dict(part, data) if keys & data.keys() else None
    return from_dict(tp, data)


def _build(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _build(arg, value)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
        return from_dict(tp, value)
    if isinstance(tp, type) and issubclass(tp, PurePath) and isinstance(value, str):
        return tp(value)
    if origin in (list, tuple) and isinstance(value, list):
        args = typing.get_args(tp)
        item = args[0] if args else Any
        built = [_build(item, v) for v in value]
        return tuple(built) if origin is tuple else built
    if origin in (dict, Mapping) and isinstance(value, Mapping):
        args = typing.get_args(tp)
        item = args[1] if len(args) == 2 else Any
        return {k: _build(item, v) for k, v in value.items()}
    return value
