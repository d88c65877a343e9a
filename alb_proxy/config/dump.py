"""The model back to plain data, in the YAML shape the loader reads (``parse_config`` inverts it).

Defaults are kept out so a dumped config stays as short as what a person would write; the store
persists this form and ``GET /v1/config`` shows it.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any

from alb_proxy.config.model import Config


def dump_config(config: Config) -> dict[str, Any]:
    result = _dump(config)
    assert isinstance(result, dict)
    result.setdefault("instance", {"name": config.instance.name})
    return result


def _dump(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            default = _default_of(f)
            if default is not dataclasses.MISSING and item == default:
                continue
            out[f.name] = _dump(item)
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_dump(v) for v in value]
    return value


def _default_of(f: dataclasses.Field[Any]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING
