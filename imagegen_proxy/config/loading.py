"""Reading a TOML file, and a validation error told as one line per dotted key."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .base import ConfigError
from .sections import StoreConfig


def _named(loc: tuple[int | str, ...], data: Mapping[str, Any]) -> list[str]:
    """`("keys", 1, "budget_usd")` as `["keys[checkout-bot]", "budget_usd"]` when entry 1
    has a name."""
    parts = [str(part) for part in loc]
    if len(loc) >= 2 and loc[0] in ("keys", "projects", "upstreams") and isinstance(loc[1], int):
        entries = data.get(str(loc[0]))
        entry = entries[loc[1]] if isinstance(entries, list) and loc[1] < len(entries) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name:
            parts[:2] = [f"{loc[0]}[{name}]"]
    return parts


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file's tables, not yet checked; a `ConfigError` naming the file if unreadable."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def store_url_of(path: str | os.PathLike[str]) -> str | None:
    """The `[store] url` of a configuration file, checked alone: the shell commands need
    nothing else of it (no upstream, no secret in the environment)."""
    section = read_toml(path).get("store") or {}
    try:
        return StoreConfig.model_validate(section).url
    except ValidationError as exc:
        raise ConfigError(f"{path}: store.{describe(exc)}") from None


def describe(exc: ValidationError, data: Mapping[str, Any] | None = None) -> str:
    """One line per problem, each naming the dotted key: `openai.read_timeout: ...`; an
    entry of `[[keys]]`, `[[projects]]` or `[[upstreams]]` by its name where it has one
    (`keys[checkout-bot].budget_usd`), else by its place (`keys.1`)."""
    lines = []
    for error in exc.errors():
        loc = error["loc"]
        if error["type"] == "string_for_number":  # raised by the section, for one of its keys
            loc = (*loc, error["ctx"]["field"])
        key = ".".join(str(part) for part in _named(loc, data or {}))
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'")
        else:
            lines.append(f"{key}: {message}" if key else message)
    return "; ".join(lines)
