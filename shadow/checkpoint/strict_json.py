"""Strict JSON for the JSON a checkpoint holds (the manifest, `meta.json`, the tensor index `tensors.json`).

Python's `json` accepts what no shadow checkpoint contains and fails on some input with errors other
than `JSONDecodeError`: `NaN`/`Infinity` literals, numbers that overflow to inf, integers too long to
convert (ValueError), duplicate keys (the last one silently wins), nesting deep enough to raise
RecursionError. Here every one of them is a `CheckpointError` that names the file, so a damaged
checkpoint ends in one line, never a traceback.
"""

from __future__ import annotations

import json
import math

from shadow.checkpoint.errors import CheckpointError

MAX_DEPTH = 16  # shadow's own JSON nests 6 deep (tensors.json: tensors[name].chunks[i].offsets[j])
_MAX_INT_DIGITS = 40  # an int64 has at most 20 digits; anything longer is damage


class _Refused(ValueError):
    """Raised from inside the parser's hooks; carries the reason."""


def parse_object(data: bytes, where: str, *, max_bytes: int) -> dict:
    """Parse `data` (the file at `where`) as one JSON object, refusing anything pathological."""
    if len(data) > max_bytes:
        raise CheckpointError(f"{where}: {len(data)} bytes of JSON, more than the {max_bytes} a shadow "
                              "checkpoint writes")
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                           parse_float=_finite_float, parse_int=_short_int)
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where}: not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: not valid JSON (nested more than {MAX_DEPTH} levels deep)") from None
    except ValueError as exc:  # JSONDecodeError, _Refused
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: top level is a JSON {json_type(value)}; expected an object")
    if _depth(value) > MAX_DEPTH:
        raise CheckpointError(f"{where}: not valid JSON (nested more than {MAX_DEPTH} levels deep)")
    return value


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def describe(value) -> str:
    """A parsed value in a few words: its JSON type and text, cut short; one line whatever it holds."""
    if isinstance(value, (list, dict)) and len(value) > 8:  # not worth serializing for a message
        return f"{json_type(value)} of {len(value)} items"
    text = json.dumps(value)
    return f"{json_type(value)} {text if len(text) <= 40 else text[:37] + '...'}"


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str):
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} overflows a 64-bit float")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Refused(f"integer of {len(text)} digits")
    return int(text)


def _depth(value) -> int:
    """Nesting depth, without recursion (the parser already bounded it by the interpreter's limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest
