"""JSON from outside, checked once on the way in, so that nothing stored can break a later read.

Python's ``json`` accepts more than any later reader of the value can bear (issue 27): ``NaN``
and ``Infinity`` (a later ``json.dumps(allow_nan=False)`` or a browser refuses them), ``1e400``
(read as ``inf``), integers of thousands of digits (SQLite, PostgreSQL and a console's arithmetic
refuse them; beyond 4,300 digits ``str()`` itself raises), lone surrogates (``"\\ud800"``: a valid
JSON escape that no UTF-8 encoder takes, so every answer that carries the value again fails) and
nesting deep enough to exhaust the recursion limit of whoever walks the value next, and an object
naming one key twice (the last one won without a word: ``{"policy": "restore", "policy": "keep"}``,
where another reader of the same text might take the first). A value is
checked here once, where it enters — an HTTP body (service/routes/common.py ``json_of``), a
manifest (manifest.py), the agent's control socket (agent/control.py) — and every reader after
that can trust its shape.

Pure: no I/O. The bounds are generous for real values and refuse only what nothing legitimate
sends: numbers within ±2^63 (a 64-bit integer, what the catalog stores), finite floats, strings of
Unicode text, at most ``MAX_DEPTH`` levels of nesting.
"""

from __future__ import annotations

import json
import math
from typing import Any

from blockprov.errors import UsageError

MAX_DEPTH = 32  # levels of arrays/objects: agent info and request args use three or four
INT_LIMIT = 1 << 63  # |n| < 2^63: a SQLite / PostgreSQL BIGINT


def _parse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


class _TwiceNamed(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):  # the usual case costs one dict and a comparison
        seen: set[str] = set()
        for k, _v in pairs:
            if k in seen:
                raise _TwiceNamed(k)
            seen.add(k)
    return d


def loads(raw: bytes | bytearray | memoryview | str, what: str = "the body") -> Any:
    """The value of the JSON text ``raw``, or a ``UsageError`` naming ``what``."""
    if isinstance(raw, memoryview):
        raw = bytes(raw)
    try:
        # Integers past 4,300 digits are refused by int() itself (ValueError); the rest by ``check``.
        value = json.loads(raw, parse_constant=_parse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:  # the decoder recurses: "[[[[…" a thousand deep
        raise UsageError(f"{what} is nested too deeply") from None
    except _TwiceNamed as e:
        raise UsageError(f"{what} names {str(e)[:40]!r} twice in one object") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not UTF-8 text") from None
    except ValueError as e:
        raise UsageError(f"{what} is not JSON: {e}") from None
    check(value, what)
    return value


def text_problem(s: str) -> str | None:
    """Why ``s`` cannot be stored and shown again as text (None: it can). A NUL is text: stored as
    JSON it is the escape ``\\u0000`` (where a column holds raw text, its writer refuses NUL)."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (not Unicode text)"
    return None


def check(value: Any, what: str = "the value") -> None:
    """Refuse (``UsageError``) a value that could not be stored and read back as JSON: see the
    module docstring. Walks iteratively: depth is counted, never recursed."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        t = type(v)
        if t is list or t is tuple:
            if depth >= MAX_DEPTH:
                raise UsageError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
            if v and all(type(x) is int for x in v):  # a long list of numbers (a profile): one pass
                if min(v) <= -INT_LIMIT or max(v) >= INT_LIMIT:
                    raise UsageError(f"{what}: an integer is out of range (at most 2^63 - 1)")
                continue
            stack.extend((item, depth + 1) for item in v)
        elif t is dict:
            if depth >= MAX_DEPTH:
                raise UsageError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
            for k, item in v.items():
                if type(k) is not str:
                    raise UsageError(f"{what}: an object key is not a string")
                why = text_problem(k)
                if why is not None:
                    raise UsageError(f"{what}: an object key {why}")
                stack.append((item, depth + 1))
        else:
            _check_scalar(v, what)


def _check_scalar(v: Any, what: str) -> None:
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, str):
        why = text_problem(v)
        if why is not None:
            raise UsageError(f"{what}: a string {why}")
    elif isinstance(v, int):
        if not -INT_LIMIT < v < INT_LIMIT:
            raise UsageError(f"{what}: an integer is out of range (at most 2^63 - 1)")
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise UsageError(f"{what}: a number is out of range")
    else:
        raise UsageError(f"{what}: a {type(v).__name__} is not a JSON value")


def dumps(value: Any, what: str = "the value") -> str:
    """``value`` as compact JSON text, checked first (what the catalog stores)."""
    check(value, what)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
