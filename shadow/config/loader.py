"""Safe YAML → typed dataclass loading with errors that name the file, the full key and the fix.

Shared by job and policy configs. Precedence: command-line `--set` > YAML file > dataclass defaults.
Every problem is collected (not just the first), so `shadow policy check` can print them all.

YAML is read with PyYAML's SafeLoader (no Python objects), with a size cap, and with anchors/aliases
and duplicate keys refused: an alias bomb or a silently overwritten key is never loaded.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf

MAX_CONFIG_BYTES = 256 * 1024  # a job or policy file is a page of YAML; anything larger is a mistake

T = TypeVar("T")


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config: where, which key, what was there and what is expected."""

    source: str
    key: str
    value: Any
    expected: str

    def __str__(self) -> str:
        key = self.key or "<top level>"
        return f"{self.source}: {key}: got {_short(self.value)}, expected {self.expected}"


class ConfigError(ValueError):
    """Raised with every problem found; `str()` gives one line per problem."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses aliases and duplicate keys, and reads `3e-4` as a float (YAML 1.2)."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases (*name) are not allowed in shadow configs", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                is_duplicate = key in seen
            except TypeError:  # a list or mapping used as a key (`? [a, b]`)
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain scalar", key_node.start_mark
                ) from None
            if is_duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where `3e-4` is a string; every config author means a number.
_StrictSafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml_mapping(path: str | os.PathLike, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """Read a YAML file that must hold a mapping; raise ConfigError naming the file otherwise."""
    source = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ConfigError([ConfigProblem(source, "", None, f"a readable file ({exc.strerror})")]) from None
    if size > max_bytes:
        raise ConfigError([ConfigProblem(source, "", f"{size} bytes", f"a file of at most {max_bytes} bytes")])
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(source, "", None, f"a UTF-8 text file ({exc})")]) from None
    return parse_yaml_mapping(text, source)


def parse_yaml_mapping(text: str, source: str) -> dict:
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - strict SafeLoader subclass
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([ConfigProblem(source, "", "invalid YAML", f"valid YAML ({problem}{where})")]) from None
    if data is None:
        raise ConfigError([ConfigProblem(source, "", "an empty file", "a YAML mapping of settings")])
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(source, "", data, "a YAML mapping of settings")])
    return data


def parse_overrides(overrides: list[str]) -> dict:
    """Turn `a.b=c` strings into a nested mapping; values are parsed as YAML scalars."""
    nested: dict = {}
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(ConfigProblem("--set", key, item, "KEY=VALUE with a dotted key, e.g. optim.lr=3e-4"))
            continue
        try:
            value = yaml.load(raw, Loader=_StrictSafeLoader) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(ConfigProblem("--set", key, item, "keys that do not overlap"))
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return nested


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + " or null"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping of names to values"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}.get(
            tp.__name__, tp.__name__
        )
    return str(tp)


def _check_value(tp: Any, value: Any) -> Any:
    """Return `value` converted to `tp`, or raise ValueError. Strict: no silent str→number coercion."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] or X | None
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value)
            except ValueError:
                pass
        raise ValueError(_type_name(tp))
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError(_type_name(tp))
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_value(item_tp, v) for v in value]
    if origin is dict:  # free-form keyword arguments (a model factory's): string keys, YAML values
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(_type_name(tp))
        return value
    if tp is Any:
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ValueError(_type_name(tp)) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(_type_name(tp))
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(_type_name(tp))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if math.isnan(value):
                raise ValueError("a number (not NaN)")
            return value
        raise ValueError(_type_name(tp))
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(_type_name(tp))
    raise ValueError(_type_name(tp))


def _merge(schema: type, base: dict, data: dict, source: str, prefix: str, problems: list[ConfigProblem]):
    """Merge `data` over `base` (both plain dicts shaped like `schema`), collecting problems."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(ConfigProblem(source, full_key, value, f"a known key (unknown key; known: {known})"))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(ConfigProblem(source, full_key, value, "a mapping"))
                continue
            _merge(tp, base[key], value, source, f"{full_key}.", problems)
            continue
        item_tp = _dataclass_items(tp)
        if item_tp is not None:  # a list of mappings (policy `triggers.rules`): each over the item defaults
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                problems.append(ConfigProblem(source, full_key, value, "a list of mappings"))
                continue
            base[key] = []
            for index, item in enumerate(value):
                base[key].append(_defaults_as_dict(item_tp))
                _merge(item_tp, base[key][-1], item, source, f"{full_key}[{index}].", problems)
            continue
        try:
            checked = _check_value(tp, value)
        except ValueError as exc:
            problems.append(ConfigProblem(source, full_key, value, str(exc)))
            continue
        # a mapping is merged key by key, so `--set model.kwargs.n_layer=4` keeps the file's other kwargs
        base[key] = _merged_mapping(base[key], checked) if typing.get_origin(tp) is dict else checked


def _merged_mapping(base: dict, data: dict) -> dict:
    merged = dict(base)
    for key, value in data.items():
        both_mappings = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged_mapping(merged[key], value) if both_mappings else value
    return merged


def _dataclass_items(tp: Any) -> type | None:
    """The item type of `list[SomeDataclass]`, else None."""
    if typing.get_origin(tp) is list:
        args = typing.get_args(tp)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def _defaults_as_dict(schema: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=False)


def build_config(schema: type[T], layers: list[tuple[str, dict]]) -> T:
    """Merge `(source, mapping)` layers over the schema's defaults and validate the result.

    Raises ConfigError listing every problem. A dataclass may define `problems() -> list[(key, value,
    expected)]` for checks across fields (e.g. warn below switch); those are attributed to the last
    layer that set the key, or to the schema defaults.
    """
    merged = _defaults_as_dict(schema)
    problems: list[ConfigProblem] = []
    set_by: dict[str, str] = {}
    for source, data in layers:
        _merge(schema, merged, data, source, "", problems)
        for key in flatten(data):
            set_by[key] = source
    if problems:
        raise ConfigError(problems)
    obj = _instantiate(schema, merged)
    fallback = layers[-1][0] if layers else "defaults"
    for key, value, expected in _semantic_problems(obj, ""):
        problems.append(ConfigProblem(_source_for(key, set_by, fallback), key, value, expected))
    if problems:
        raise ConfigError(problems)
    return obj  # type: ignore[return-value]


def _instantiate(schema: type[T], values: dict) -> T:
    """Build the dataclass from already-validated values.

    Not through OmegaConf: it would resolve `${...}` in string values (reading environment variables
    or failing with a traceback), and a config value is data, never an expression.
    """
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for field in dataclasses.fields(schema):
        value = values[field.name]
        field_type = hints[field.name]
        item_tp = _dataclass_items(field_type)
        if dataclasses.is_dataclass(field_type):
            value = _instantiate(field_type, value)
        elif item_tp is not None:
            value = [_instantiate(item_tp, item) for item in value]
        kwargs[field.name] = value
    return schema(**kwargs)


def flatten(data: dict, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}, keys joined by `sep` after `prefix`; lists are leaves."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _source_for(key: str, set_by: dict[str, str], fallback: str) -> str:
    """The layer that set `key` (or its parent); a cross-field problem on an unset key goes to `fallback`."""
    while key:
        if key in set_by:
            return set_by[key]
        key = key.rpartition(".")[0]
    return fallback


def _semantic_problems(obj: Any, prefix: str) -> list[tuple[str, Any, str]]:
    found = []
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            found.extend(_semantic_problems(value, f"{prefix}{field.name}."))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    found.extend(_semantic_problems(item, f"{prefix}{field.name}[{index}]."))
    check = getattr(obj, "problems", None)
    if callable(check):
        found.extend((f"{prefix}{key}", value, expected) for key, value, expected in check())
    return found


def load_config(schema: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Load `path` (or only defaults when None) with `--set` overrides into a `schema` instance."""
    layers: list[tuple[str, dict]] = []
    if path is not None:
        layers.append((str(path), read_yaml_mapping(path)))
    if overrides:
        layers.append(("--set", parse_overrides(overrides)))
    return build_config(schema, layers)


def to_dict(obj: Any) -> dict:
    """A config dataclass as plain data, enums as their values (what a user writes in YAML)."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def to_yaml(obj: Any) -> str:
    """The effective config as YAML, for logs, artifacts and `shadow policy check`."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
