"""Who may ask for what: `Policy`, the `[[keys]]` and `[[projects]]`, and the `[admin]` key."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from .base import _from_env, _Section

BudgetPeriod = Literal["day", "week", "month", "total"]


_MAX_COUNT = 2**53  # exact in a float, and far beyond any real limit
_COUNTS = (
    "requests_per_minute",
    "images_per_minute",
    "max_concurrent",
    "images_per_day",
    "tokens_per_day",
)
_MAX_BUDGET_USD = 1e9  # a billion dollars: 1e15 micro-USD, exact in 64 bits


class Policy(_Section):
    """What a client (a key, or a project's keys together) may do; absent limits are
    unlimited."""

    models: frozenset[str] | None = None
    denied_models: frozenset[str] | None = None  # a deny-list, checked after `models`
    # Finite and bounded, whichever way they come (configuration, Admin API, CLI, console):
    # the store and the limiters keep them as 64-bit integers (budgets in micro-USD).
    requests_per_minute: int | None = Field(None, gt=0, le=_MAX_COUNT)
    images_per_minute: int | None = Field(None, gt=0, le=_MAX_COUNT)
    max_concurrent: int | None = Field(None, gt=0, le=_MAX_COUNT)
    images_per_day: int | None = Field(None, gt=0, le=_MAX_COUNT)
    tokens_per_day: int | None = Field(None, gt=0, le=_MAX_COUNT)
    budget_usd: float | None = Field(None, gt=0, le=_MAX_BUDGET_USD, allow_inf_nan=False)
    budget_period: BudgetPeriod = "month"  # calendar periods in UTC; weeks start on Monday

    @property
    def limited(self) -> bool:
        """Whether any count-based limit or a budget is set (the model allow-list is not
        one)."""
        return any(getattr(self, name) is not None for name in _LIMITS)

    def allows(self, model: str) -> bool:
        """Whether the model lists let `model` through."""
        if self.models is not None and model not in self.models:
            return False
        return self.denied_models is None or model not in self.denied_models

    @property
    def budget_micros(self) -> int | None:
        """The budget in millionths of a dollar, the unit every cost is counted in."""
        return None if self.budget_usd is None else round(self.budget_usd * 1_000_000)


# The most each limit may be: what a stored row beyond it is read as (store.stored_policy).
POLICY_BOUNDS: dict[str, float] = {
    **{name: _MAX_COUNT for name in _COUNTS},
    "budget_usd": _MAX_BUDGET_USD,
}

_LIMITS = [
    name for name in Policy.model_fields if name not in ("models", "denied_models", "budget_period")
]


class ProjectConfig(Policy):
    """`[[projects]]`: a group of keys sharing limits and a budget (OpenAI's word for it)."""

    name: str = Field(min_length=1)


class KeyConfig(Policy):
    """`[[keys]]`: one client key, its name, and its policy."""

    name: str = Field(min_length=1)
    project: str | None = None  # a [[projects]] name: its limits apply too
    key: SecretStr | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    key_env: str | None = None
    username: str | None = None
    upstream_api_key: SecretStr | None = None
    upstream_api_key_env: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _resolve_env(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _from_env(data, "key_env", "key")
        return _from_env(data, "upstream_api_key_env", "upstream_api_key")

    @model_validator(mode="after")
    def _one_key(self) -> KeyConfig:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("set exactly one of key, key_sha256 or key_env")
        return self

    @property
    def digest(self) -> bytes:
        """SHA-256 of the key: all the proxy keeps to recognise it."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()


class AdminConfig(_Section):
    """`[admin]`: the operator's key. It unlocks `/healthz` details and `/metrics`."""

    key: SecretStr | None = None
    key_env: str | None = None
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    # The admin API without the admin key: for open mode only (the no-config mode sets it
    # on loopback, like the rest of that mode).
    open: bool = False

    @model_validator(mode="before")
    @classmethod
    def _resolve_env(cls, data: Any) -> Any:
        return _from_env(data, "key_env", "key") if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _one_key(self) -> AdminConfig:
        if self.key is not None and self.key_sha256 is not None:
            raise ValueError("set one of key, key_sha256 or key_env")
        return self

    @property
    def digest(self) -> bytes | None:
        """SHA-256 of the admin key, or None when there is none."""
        if self.key_sha256 is not None:
            return bytes.fromhex(self.key_sha256)
        if self.key is None:
            return None
        return hashlib.sha256(self.key.get_secret_value().encode()).digest()
