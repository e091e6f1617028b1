"""What an image costs, in micro-USD: the price table (the shipped `prices.toml` under the
configuration's `[prices]`), the worst case reserved before a request goes upstream, and
what it cost once it is answered.

A dollar per 1M tokens is a micro-dollar per token, so token prices need no scaling. Every
figure is held in millionths of a micro-dollar (`SCALE`), exact for any price written with up
to 12 decimals of a dollar (finer ones round up, once, at start-up), so each request's
arithmetic is on integers; only a total is rounded, up, to the micro-dollar.
"""

from __future__ import annotations

import functools
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from fractions import Fraction
from importlib import resources
from typing import TYPE_CHECKING

from ..config import ConfigError, PriceConfig, ProxyConfig
from ..wire.errors import ProxyError

if TYPE_CHECKING:
    from ..wire.request import ImageRequest
    from ..wire.usage import Usage
    from .auth import Principal

logger = logging.getLogger("imagegen_proxy")

MICROS = 1_000_000
# What the API adds to every prompt: 6 tokens measured on /images/generations, with room.
PROMPT_OVERHEAD_TOKENS = 16
# What DALL·E makes when a request names no size or quality.
_PER_IMAGE_DEFAULTS = ("1024x1024", "standard")
_TOKEN_FIELDS = (
    "input_text_per_mtok",
    "input_image_per_mtok",
    "output_image_per_mtok",
    "output_tokens",
)
SCALE = 1_000_000  # prices are held in micro-USD * SCALE


def usd(micros: int) -> str:
    """`micros` as dollars, exact, for headers and logs: "0.04", "20.00", "0.002176"."""
    sign = "-" if micros < 0 else ""
    dollars, rest = divmod(abs(micros), MICROS)
    return f"{sign}{dollars}.{f'{rest:06d}'.rstrip('0').ljust(2, '0')}"


@dataclass(frozen=True, slots=True)
class _ImagePrices:
    """What one image costs by size and quality, with the dearest per size, per quality and
    overall at hand: a size or quality the table lacks costs the most it could."""

    exact: Mapping[tuple[str, str], int]
    by_size: Mapping[str, int]
    by_quality: Mapping[str, int]
    dearest: int

    @classmethod
    def of(cls, table: Mapping[str, int]) -> _ImagePrices:
        exact: dict[tuple[str, str], int] = {}
        by_size: dict[str, int] = {}
        by_quality: dict[str, int] = {}
        for key, micros in table.items():
            size, quality = key.split("/", 1)
            exact[size, quality] = micros
            by_size[size] = max(micros, by_size.get(size, micros))
            by_quality[quality] = max(micros, by_quality.get(quality, micros))
        return cls(exact, by_size, by_quality, max(exact.values()))

    def at(self, size: str | None, quality: str | None) -> int:
        """One image of `size` and `quality`; None, "auto" or a value not in the table is
        unknown."""
        if size is not None and size in self.by_size:
            if quality is not None and quality in self.by_quality:
                return self.exact.get((size, quality), self.dearest)
            return self.by_size[size]
        if quality is not None and quality in self.by_quality:
            return self.by_quality[quality]
        return self.dearest


@dataclass(frozen=True, slots=True)
class Price:
    """One model's prices, resolved, in micro-USD: per token (`text_in`, `image_in`,
    `image_out`), with `images` the output of one image at `image_out`; or, when
    `per_image`, `images` the price of one image."""

    images: _ImagePrices
    per_image: bool = False
    text_in: int = 0
    image_in: int = 0
    image_out: int = 0
    partial_image: int = 0  # one streamed partial image
    text_out: int = 0  # a token of text written besides the image
    text_per_image: int = 0  # the text output reserved for one image
    input_image: int = 0  # the most one input image (edits) costs

    def estimate(self, request: ImageRequest) -> int:
        """The most `request` can cost, known before it is sent: its dearest images, their
        partial images when streamed, its prompt at one token a byte, and for an edit its
        input images at `input_image_tokens` each (billed, as the prompt, per image made)."""
        one = self._image(request)
        if not self.per_image:
            one += self.text_per_image
            one += request.partial_images * self.partial_image
            # Each of the n images is billed its own prompt, and input images.
            one += (len(request.prompt.encode()) + PROMPT_OVERHEAD_TOKENS) * self.text_in
            one += request.input_images * self.input_image
        return _micros(request.images * one)

    def cost(self, request: ImageRequest, usage: Usage | None) -> int:
        """What `request` cost: the tokens `usage` reports, or the estimate when it reports
        none (the upstream may have billed them); per image, from the request alone."""
        if self.per_image:
            return _micros(request.images * self._image(request))
        if usage is None or usage.input_tokens + usage.output_tokens == 0:
            return self.estimate(request)
        return self.spent(usage)

    def spent(self, usage: Usage) -> int:
        """What the tokens of `usage` cost; input not split into text and image is text."""
        image = usage.input_image_tokens
        text = max(usage.input_text_tokens, usage.input_tokens - image)
        written = usage.output_text_tokens
        micros = (
            text * self.text_in
            + image * self.image_in
            + max(0, usage.output_tokens - written) * self.image_out
            + written * self.text_out
        )
        return _micros(micros)

    def _image(self, request: ImageRequest) -> int:
        size, quality = request.size, request.quality
        if self.per_image:
            size = _PER_IMAGE_DEFAULTS[0] if size is None else size
            quality = _PER_IMAGE_DEFAULTS[1] if quality is None else quality
        return self.images.at(size, quality)


class Prices:
    """Every model's `Price`: the shipped table (`prices.toml`) under `overrides` (the
    configuration's `[prices]`), resolved and checked once.

    For a model in both, the fields `overrides` sets win, unless it prices the model another
    way (`same_as`, or per image over per token and back): then it replaces the shipped
    entry. An entry with `same_as` is priced like its target, with its own fields over the
    target's. Every mistake is a `ConfigError` naming `prices.MODEL`.
    """

    def __init__(
        self,
        overrides: Mapping[str, PriceConfig] | None = None,
        *,
        shipped: Mapping[str, PriceConfig] | None = None,
    ) -> None:
        table = dict(shipped_prices() if shipped is None else shipped)
        for model, entry in (overrides or {}).items():
            base = table.get(model)
            table[model] = entry if base is None or _replaces(base, entry) else _over(base, entry)
        self._prices = {model: _price(model, _resolve(model, table)) for model in table}
        # An entry's own, never inherited through same_as: an Azure deployment priced like
        # a retired OpenAI model is not retired with it.
        self._shutdown = {model: entry.shutdown_date for model, entry in table.items()}
        self._replacement = {model: entry.replacement for model, entry in table.items()}
        self._unpriced_seen: set[str] = set()  # the unpriced models warned of, once each

    @property
    def models(self) -> list[str]:
        """Every model with a price."""
        return sorted(self._prices)

    def reserve(
        self, principal: Principal, request: ImageRequest, unpriced: str
    ) -> tuple[Price | None, int]:
        """The request's price and the worst-case cost to reserve against its budgets (0
        without a budget): a budget is never spent on a model whose price is unknown,
        unless `[limits] unpriced = "allow"` says so."""
        price = self.get(request.model)
        if not principal.budgeted:
            return price, 0
        if price is not None:
            return price, price.estimate(request)
        if unpriced == "deny":
            raise ProxyError(
                403,
                f"The model {request.model!r} has no price, and this key spends on a budget: "
                "name a priced model (or ask the operator to add its price).",
                param="model",
                code="model_not_priced",
            )
        if request.model not in self._unpriced_seen and len(self._unpriced_seen) < 1000:
            self._unpriced_seen.add(str(request.model))
            logger.warning("model %r has no price: served on a budget at no cost", request.model)
        return None, 0

    def check_retired(self, request: ImageRequest, openai_only: bool) -> None:
        """Refuse a model OpenAI has shut down when every upstream it may go to is OpenAI's
        own API (`openai_only`: an Azure deployment keeps its own dates, another
        OpenAI-compatible service its own models), naming the model put in its place."""
        day = None if request.model is None else self.shutdown_date(request.model)
        if day is None or day > datetime.now(UTC).date() or not openai_only:
            return
        model = str(request.model)
        instead = self.replacement(model)
        message = f"The model '{model}' was shut down on {day.isoformat()}"
        message += f": use {instead} instead." if instead else "."
        raise ProxyError(404, message, param="model", code="model_not_found")

    def shutdown_date(self, model: str) -> date | None:
        """When OpenAI shut `model` down, or will; None if no date is announced."""
        return self._shutdown.get(model)

    def shut_down(self, model: str | None, today: date) -> date | None:
        """`model`'s shutdown date if it is `today` or before: it is no longer served."""
        day = None if model is None else self._shutdown.get(model)
        return day if day is not None and day <= today else None

    def replacement(self, model: str) -> str | None:
        """The model OpenAI names in the place of `model`, once it is shut down."""
        return self._replacement.get(model)

    def get(self, model: str | None) -> Price | None:
        """The price of `model`; None for no model or one without a price."""
        return None if model is None else self._prices.get(model)


@functools.cache
def shipped_prices() -> Mapping[str, PriceConfig]:
    """The price table shipped with the package, checked like a configuration."""
    text = resources.files(__package__).joinpath("prices.toml").read_text(encoding="utf-8")
    return ProxyConfig.from_mapping(tomllib.loads(text), source="prices.toml").prices


def _replaces(base: PriceConfig, entry: PriceConfig) -> bool:
    """Whether `entry` prices its model another way than `base` rather than amending it."""
    given = entry.model_fields_set
    if "same_as" in given:
        return True
    if "per_image" in given:
        return not base.per_image
    return bool(base.per_image) and not given.isdisjoint(_TOKEN_FIELDS)


def _over(base: PriceConfig, entry: PriceConfig) -> PriceConfig:
    return base.model_copy(update={name: getattr(entry, name) for name in entry.model_fields_set})


def _resolve(
    model: str, table: Mapping[str, PriceConfig], chain: tuple[str, ...] = ()
) -> PriceConfig:
    entry = table[model]
    target = entry.same_as
    if target is None:
        return entry
    chain = (*chain, model)
    if target in chain:
        loop = " -> ".join(repr(name) for name in (*chain[chain.index(target) :], target))
        raise ConfigError(f"prices.{target}.same_as: {loop} is a cycle")
    if target not in table:
        raise ConfigError(f"prices.{model}.same_as: no price for {target!r}")
    own = entry.model_fields_set - {"same_as"}
    return _resolve(target, table, chain).model_copy(
        update={name: getattr(entry, name) for name in own}
    )


def _price(model: str, entry: PriceConfig) -> Price:
    missing = [name for name in _TOKEN_FIELDS if getattr(entry, name) in (None, {})]
    per_token = len(missing) < len(_TOKEN_FIELDS)
    if per_token and entry.per_image:
        raise ConfigError(f"prices.{model}: priced both per token and per_image: keep one")
    if entry.per_image:
        table = {key: _scaled(dollars, MICROS) for key, dollars in entry.per_image.items()}
        return Price(_ImagePrices.of(table), per_image=True)
    text = entry.input_text_per_mtok
    image = entry.input_image_per_mtok
    out = entry.output_image_per_mtok
    if text is None or image is None or out is None or not entry.output_tokens:
        if per_token:
            raise ConfigError(f"prices.{model}: priced per token, but {', '.join(missing)} unset")
        raise ConfigError(
            f"prices.{model}: no price: set {', '.join(_TOKEN_FIELDS)}; or per_image; or same_as"
        )
    image_out = _scaled(out)
    written = entry.output_text_per_mtok
    text_out = image_out if written is None else _scaled(written)
    return Price(
        _ImagePrices.of({key: tokens * image_out for key, tokens in entry.output_tokens.items()}),
        text_in=_scaled(text),
        image_in=_scaled(image),
        image_out=image_out,
        partial_image=entry.partial_image_tokens * image_out,
        text_out=text_out,
        text_per_image=entry.output_text_tokens * text_out,
        input_image=entry.input_image_tokens * _scaled(image),
    )


def _scaled(value: float, unit: int = 1) -> int:
    """`value` (USD, or USD per 1M tokens: micro-USD per token) * `unit` in micro-USD *
    SCALE. From the decimal written in the table, not the binary float nearest to it."""
    return math.ceil(Fraction(repr(value)) * unit * SCALE)


def _micros(scaled: int) -> int:
    """Micro-USD * SCALE to micro-USD, rounded up."""
    return -(-scaled // SCALE)
