"""Strict YAML loading into the configuration model.

The model's dataclasses and their type hints are the schema: ``_Reader`` walks the parsed YAML
along them, so a field added to ``model.py`` loads with no change here. Every problem (unknown
key, wrong type, missing key) is collected and raised together in one ``ConfigError``: fixing a
config one error per run is slow. How objects relate to each other is ``rules.py``'s business.

Error paths name list items by their ``id`` or ``name`` when they have one
(``listeners[http-8080].port``) and by index otherwise (``servers[0].port``, ``listeners[2].name``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from collections.abc import Callable, Hashable, Iterable
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from alb_proxy.config.model import Config
from alb_proxy.config.rules import check_config
from alb_proxy.errors import ConfigError, Problem

_MAX_INT = 2**63
"""Bigger integers are typos in a config, and Python refuses to print very large ones."""


def load_config(path: Path, *, check: bool = True) -> Config:
    """Read, parse and validate a config file; every failure is a ``ConfigError``.
    ``check=False`` leaves the rules (``check_config``) to the caller."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not UTF-8 text (byte {exc.start})")]) from exc
    config = parse_config(read_yaml(text, str(path)))
    problems = check_config(config) if check else []
    if problems:
        raise ConfigError(problems)
    return config


def read_yaml(text: str, source: str) -> object:
    """Config text to plain data with the strict loader every config goes through (a file,
    ``ctl apply``, the admin API): duplicate keys and non-plain tags are errors. Messages
    name the line and column, never quote the text."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError([Problem(source, f"{where}{problem}")]) from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        # ValueError: an integer too long to convert; RecursionError: absurdly deep nesting.
        detail = (
            "nested too deeply"
            if isinstance(exc, RecursionError)
            else str(exc)
            if isinstance(exc, ValueError)
            else type(exc).__name__
        )
        raise ConfigError([Problem(source, f"invalid YAML: {detail}")]) from None
    if data is None:
        raise ConfigError([Problem(source, "the file is empty")])
    return data


def parse_config(data: object) -> Config:
    """Build the model from parsed YAML, raising one ``ConfigError`` that lists every problem."""
    reader = _Reader()
    config = reader.read(Config, data, "")
    if reader.problems:
        # Unknown keys alone leave a whole model: its rule problems are reported in the same
        # run rather than after the typo is fixed.
        rules = check_config(config) if isinstance(config, Config) else []
        raise ConfigError(reader.problems + rules)
    assert isinstance(config, Config)
    return config


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys, which PyYAML silently lets the last win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        first_line: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may legitimately be overridden
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports it
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first on line {first_line[key]})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Invalid:
    """A value that could not be read; its problem is already recorded."""


_INVALID = _Invalid()


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


_SCALARS: dict[object, tuple[str, Callable[[object], object | None]]] = {
    # type in the model -> (what the user must write, converter returning None when refused)
    str: ("a string", lambda v: v if isinstance(v, str) else None),
    int: (
        "an integer",
        lambda v: (
            v if isinstance(v, int) and not isinstance(v, bool) and abs(v) < _MAX_INT else None
        ),
    ),
    float: ("a finite number", _number),
    bool: ("true or false", lambda v: v if isinstance(v, bool) else None),
    Path: ("a non-empty path", lambda v: Path(v) if isinstance(v, str) and v else None),
}


def _describe(value: object) -> str:
    """Show a refused value the way the user wrote it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and abs(value) >= _MAX_INT:
        return "an out-of-range integer"
    if isinstance(value, str | int | float):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


@cache
def _fields(cls: type[Any]) -> dict[str, tuple[Any, bool]]:
    """Field name -> (type hint, required) of a model dataclass."""
    hints = get_type_hints(cls)
    return {
        f.name: (
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
        if f.init
    }


def _identity_key(cls: Any) -> str | None:
    """The field that names items of a list of ``cls`` in error paths, if it has one."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    return next((k for k in ("id", "name") if k in _fields(cls)), None)


def _suggest(key: object, fields: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.75) if isinstance(key, str) else []
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Reads parsed YAML into model objects along their type hints, collecting problems."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def _fail(self, path: str, message: str) -> _Invalid:
        self.problems.append(Problem(path, message))
        return _INVALID

    def read(self, hint: Any, value: object, path: str) -> object:
        """Return the model value for ``hint``, or ``_INVALID`` after recording why not."""
        if get_origin(hint) in (Union, types.UnionType):
            (hint,) = (arg for arg in get_args(hint) if arg is not type(None))  # only `X | None`
            return None if value is None else self.read(hint, value, path)
        if get_origin(hint) is tuple:
            return self._list(get_args(hint)[0], value, path)
        if dataclasses.is_dataclass(hint):
            return self._object(hint, value, path)
        if isinstance(hint, type) and issubclass(hint, Enum):
            choices = [member.value for member in hint]
            if isinstance(value, str) and value in choices:
                return hint(value)
            return self._fail(path, f"expected one of {', '.join(choices)}, got {_describe(value)}")
        expected, convert = _SCALARS[hint]
        result = convert(value)
        if result is None:
            return self._fail(path, f"expected {expected}, got {_describe(value)}")
        return result

    def _list(self, item_hint: Any, value: object, path: str) -> object:
        if not isinstance(value, list):
            return self._fail(path, f"expected a list, got {_describe(value)}")
        key = _identity_key(item_hint)
        items = []
        for index, item in enumerate(value):
            label = item.get(key) if key and isinstance(item, dict) else None
            if not (isinstance(label, str) and label):
                label = str(index)
            items.append(self.read(item_hint, item, f"{path}[{label}]"))
        return _INVALID if any(item is _INVALID for item in items) else tuple(items)

    def _object(self, cls: Any, value: object, path: str) -> object:
        if not isinstance(value, dict):
            return self._fail(path, f"expected a mapping, got {_describe(value)}")
        fields = _fields(cls)
        for key in value:
            if key not in fields:
                self._fail(path, f"unknown key {_describe(key)}{_suggest(key, fields)}")
        kwargs: dict[str, object] = {}
        for name, (hint, required) in fields.items():
            sub = f"{path}.{name}" if path else name
            if name in value:
                kwargs[name] = self.read(hint, value[name], sub)
            elif required:
                kwargs[name] = self._fail(sub, "missing required key")
        if any(v is _INVALID for v in kwargs.values()):
            return _INVALID
        return cls(**kwargs)
