"""Frozen dataclass configs with strict (de)serialisation to plain JSON-able dicts."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Self, TypeVar, get_type_hints

from echox.errors import ConfigError

T = TypeVar("T", bound="ConfigBase")


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base for every config: nested configs serialise to dicts, unknown keys are an error."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
        hints = get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown keys {unknown}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            kwargs[name] = _coerce(hints[name], value)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.__name__}: {exc}") from None

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def _coerce(hint: Any, value: Any) -> Any:
    """Turns JSON values back into the declared type: nested configs and tuples."""
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        return hint.from_dict(value)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        configs = [a for a in options if isinstance(a, type) and issubclass(a, ConfigBase)]
        if len(configs) > 1:
            return _first_config_that_fits(configs, value)
        return _coerce(options[0], value) if len(options) == 1 else value
    if origin is tuple and isinstance(value, list):
        items = typing.get_args(hint)
        if len(items) == 2 and items[1] is Ellipsis:
            return tuple(_coerce(items[0], v) for v in value)
        return tuple(_coerce(a, v) for a, v in zip(items, value, strict=False))
    return value


def _first_config_that_fits(options: list[type[ConfigBase]], value: Any) -> ConfigBase:
    """A union of configs (e.g. the two vocoders): the first, in declared order, whose keys and
    checks the value passes."""
    reasons = []
    for option in options:
        try:
            return option.from_dict(value)
        except ConfigError as exc:
            reasons.append(str(exc))
    raise ConfigError("matches none of " + "; ".join(reasons))
