"""What every section shares: `ConfigError`, the strict `_Section`, keys from the environment."""

from __future__ import annotations

import functools
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A configuration mistake, with a message meant for the person who made it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_strings_for_numbers(cls, data: Any) -> Any:
        """A number or a switch written as a string (`requests_per_minute = "3"`) is a
        mistake, not something to convert: TOML, JSON and the forms all have numbers."""
        if isinstance(data, Mapping):
            for name, value in data.items():
                if isinstance(value, str) and name in cls.model_fields:
                    wanted = _scalars(cls, name)
                    if wanted:
                        raise PydanticCustomError(
                            "string_for_number",
                            "{wanted}, not the string {shown}",
                            {"field": name, "wanted": " or ".join(wanted), "shown": repr(value)},
                        )
        return data


@functools.cache
def _scalars(section: type[BaseModel], name: str) -> tuple[str, ...]:
    """What a field takes of number and boolean, if it takes no string: ("a number",)."""
    kinds = typing.get_args(annotation := section.model_fields[name].annotation) or (annotation,)
    if str in kinds or Path in kinds:
        return ()
    said = {int: "a number", float: "a number", bool: "true or false"}
    return tuple(dict.fromkeys(said[kind] for kind in kinds if kind in said))


def _from_env(data: dict[str, Any], env_key: str, key: str) -> dict[str, Any]:
    """Read `data[env_key]`'s variable into `data[key]`, once, at start-up: a missing
    variable fails loudly there rather than on the first request."""
    name = data.get(env_key)
    if not isinstance(name, str):
        return data
    if data.get(key) is not None:
        raise ValueError(f"set {key} or {env_key}, not both")
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"environment variable {name} is not set")
    return {**data, key: value}
