"""`[prices."MODEL"]`: what a model's images cost."""

from __future__ import annotations

import datetime
import re
from typing import Any

from pydantic import Field, field_validator

from .base import _Section

_PRICE_KEY = re.compile(r"\d{2,5}x\d{2,5}/[a-z0-9_-]+")


class PriceConfig(_Section):
    """`[prices."MODEL"]`: what a model's images cost, in USD. Token-priced (per 1M tokens,
    with the output tokens of one image by "WIDTHxHEIGHT/quality"), priced per image, or
    `same_as` another model. Over a shipped entry of the same name, the fields given win."""

    same_as: str | None = None
    input_text_per_mtok: float | None = Field(None, ge=0)
    input_image_per_mtok: float | None = Field(None, ge=0)
    output_image_per_mtok: float | None = Field(None, ge=0)
    output_tokens: dict[str, int] = Field(default_factory=dict)
    partial_image_tokens: int = Field(100, ge=0)
    # Text the model writes besides the image (gpt-image-1.5): its price (absent: the image
    # output price) and the tokens of it to reserve per image.
    output_text_per_mtok: float | None = Field(None, ge=0)
    output_text_tokens: int = Field(0, ge=0)
    # The most input tokens one image of an edit can take, reserved against budgets until
    # the upstream reports the real figure. OpenAI publishes no bound: this one is an
    # assumption (an input image is no denser than the dearest output image).
    input_image_tokens: int = Field(6240, ge=0)
    per_image: dict[str, float] = Field(default_factory=dict)
    source: str | None = None  # where the figures come from, and when they were checked
    # When OpenAI shut the model down (or will): `/v1/models` says so, as OpenAI's does.
    shutdown_date: datetime.date | None = None
    # The model OpenAI names in its place, once shut down (see `[limits] retired`).
    replacement: str | None = None

    @field_validator("output_tokens", "per_image")
    @classmethod
    def _keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [key for key in value if _PRICE_KEY.fullmatch(key) is None]
        if bad:
            raise ValueError(f'{bad[0]!r}: keys are "WIDTHxHEIGHT/quality", e.g. "1024x1024/high"')
        if any(number < 0 for number in value.values()):
            raise ValueError("must not be negative")
        return value
