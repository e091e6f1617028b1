"""What an image costs: the shipped table, the configuration over it, the reservation made
before a request goes upstream and the cost read from the answer's usage, in micro-USD."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from typing import Any

import pytest

from imagegen_proxy.config import ConfigError, PriceConfig, ProxyConfig
from imagegen_proxy.governance.pricing import Price, Prices, shipped_prices, usd
from imagegen_proxy.wire.request import ImageGenerationBody, ImageRequest
from imagegen_proxy.wire.sse import EventScanner
from imagegen_proxy.wire.usage import Usage, tokens_in

PROMPT = "A gray tabby cat hugging an otter with an orange scarf"
TOKEN_MODELS = ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"]


def request(model: str | None = "gpt-image-1", **body: Any) -> ImageRequest:
    fields = {"prompt": PROMPT, "model": model, **body}
    return ImageRequest(form="openai", body=ImageGenerationBody.model_validate(fields))


def price(model: str, prices: Prices | None = None) -> Price:
    found = (prices or Prices()).get(model)
    assert found is not None
    return found


def prices_from(table: dict[str, Any]) -> Prices:
    """Prices over the shipped table, from `[prices]` as a configuration file gives it."""
    return Prices(ProxyConfig.from_mapping({"prices": table}).prices)


def usage(text: int, output: int, image: int = 0) -> dict[str, Any]:
    """A `usage` object as the Images API writes it."""
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"image_tokens": image, "text_tokens": text},
        "output_tokens": output,
        "total_tokens": text + image + output,
    }


def json_answer(spent: dict[str, Any]) -> bytes:
    """The tail of a JSON answer: the Images API pretty-prints it, `usage` last."""
    answer = {
        "created": 1757776209,
        "background": "opaque",
        "data": [{"b64_json": "iVBORw0KGgo" * 50}],
        "output_format": "png",
        "quality": "high",
        "size": "1024x1024",
        "usage": spent,
    }
    return json.dumps(answer, indent=2).encode()[-4096:]


def completed_event(spent: dict[str, Any]) -> bytes:
    data = {
        "type": "image_generation.completed",
        "b64_json": "iVBORw0KGgo" * 50,
        "created_at": 1757776209,
        "size": "1024x1536",
        "quality": "medium",
        "background": "opaque",
        "output_format": "png",
        "usage": spent,
    }
    return b"event: image_generation.completed\ndata: " + json.dumps(data).encode() + b"\n\n"


def flat(output_tokens: dict[str, int]) -> Price:
    """A model whose estimate is its output tokens alone: one micro-dollar a token."""
    entry = PriceConfig(
        input_text_per_mtok=0,
        input_image_per_mtok=0,
        output_image_per_mtok=1,
        output_tokens=output_tokens,
    )
    return price("flat", Prices({"flat": entry}, shipped={}))


# Costs from usage


def test_gpt_image_1_costs_its_text_input_and_output_tokens_from_a_json_answer() -> None:
    spent = tokens_in(json_answer(usage(text=50, output=4160)))
    assert spent is not None
    assert price("gpt-image-1").cost(request(size="1024x1024", quality="high"), spent) == (
        50 * 5 + 4160 * 40
    )


def test_streamed_completed_events_are_priced_together() -> None:
    # n=2, 1024x1536 medium with two partial images each: 1584 + 2 x 100 output tokens.
    scanner = EventScanner(finals=2)
    for _ in range(2):
        scanner.feed(completed_event(usage(text=20, output=1584 + 200)))
    assert scanner.done
    asked = request(size="1024x1536", quality="medium", n=2, stream=True, partial_images=2)
    assert price("gpt-image-1").cost(asked, scanner.usage) == 2 * (20 * 5 + 1784 * 40)


def test_input_image_tokens_cost_the_image_input_price() -> None:
    spent = tokens_in(json_answer(usage(text=40, image=960, output=272)))
    assert spent is not None
    assert price("gpt-image-1").spent(spent) == 40 * 5 + 960 * 10 + 272 * 40


def test_input_tokens_without_details_count_as_text() -> None:
    spent = tokens_in(b'"usage": {"input_tokens": 30, "output_tokens": 272, "total_tokens": 302}}')
    assert spent == Usage(tokens=302, input_tokens=30, output_tokens=272)
    assert price("gpt-image-1").spent(spent) == 30 * 5 + 272 * 40


def test_gpt_image_1_mini_costs_its_own_token_prices() -> None:
    spent = Usage(input_tokens=12, input_text_tokens=12, output_tokens=272)
    assert price("gpt-image-1-mini").spent(spent) == 12 * 2 + 272 * 8  # 2176: $0.002176


def test_gpt_image_1_5_costs_its_own_token_prices() -> None:
    spent = Usage(input_tokens=58, input_text_tokens=48, input_image_tokens=10, output_tokens=6208)
    assert price("gpt-image-1.5").spent(spent) == 48 * 5 + 10 * 8 + 6208 * 32


def test_gpt_image_1_5_prices_the_text_it_writes_at_the_text_output_price() -> None:
    details = {"output_tokens_details": {"image_tokens": 272, "text_tokens": 209}}
    spent = tokens_in(json_answer({**usage(text=48, output=481), **details}))
    assert spent is not None and spent.output_text_tokens == 209
    assert price("gpt-image-1.5").spent(spent) == 48 * 5 + 272 * 32 + 209 * 10


def test_gpt_image_1_5_reserves_the_text_it_writes_for_each_image() -> None:
    low = request("gpt-image-1.5", size="1024x1024", quality="low", n=2, prompt="p")
    assert price("gpt-image-1.5").estimate(low) == 2 * (272 * 32 + 256 * 10 + (1 + 16) * 5)


def test_costs_round_up_to_the_next_micro_dollar() -> None:
    # 3 image input tokens at $2.50 per 1M: 7.5 micro-dollars.
    spent = Usage(input_tokens=3, input_image_tokens=3)
    assert price("gpt-image-1-mini").spent(spent) == 8


@pytest.mark.parametrize("spent", [None, Usage(), Usage(requests=1, images=1)])
def test_without_token_counts_the_reservation_stands(spent: Usage | None) -> None:
    asked = request(size="1024x1024", quality="low")
    gpt_image_1 = price("gpt-image-1")
    assert gpt_image_1.cost(asked, spent) == gpt_image_1.estimate(asked)


@pytest.mark.parametrize(
    ("size", "quality", "dollars"),
    [
        ("1024x1024", "standard", 0.04),
        ("1024x1792", "standard", 0.08),
        ("1792x1024", "standard", 0.08),
        ("1024x1024", "hd", 0.08),
        ("1024x1792", "hd", 0.12),
        ("1792x1024", "hd", 0.12),
        (None, None, 0.04),  # DALL·E's defaults: 1024x1024, standard
        ("1792x1024", None, 0.08),
    ],
)
def test_dall_e_3_costs_its_price_per_image(
    size: str | None, quality: str | None, dollars: float
) -> None:
    asked = request("dall-e-3", size=size, quality=quality)
    dall_e_3 = price("dall-e-3")
    assert dall_e_3.cost(asked, None) == dall_e_3.estimate(asked) == round(dollars * 1_000_000)


@pytest.mark.parametrize(
    ("size", "micros"),
    [("256x256", 16_000), ("512x512", 18_000), ("1024x1024", 20_000), (None, 20_000)],
)
def test_dall_e_2_costs_its_price_per_image_and_size(size: str | None, micros: int) -> None:
    assert price("dall-e-2").cost(request("dall-e-2", size=size, n=3), None) == 3 * micros


def test_a_model_priced_per_image_ignores_usage() -> None:
    asked = request("dall-e-3", size="1024x1024", quality="hd")
    assert price("dall-e-3").cost(asked, Usage(input_tokens=50, output_tokens=9999)) == 80_000


# The reservation


@pytest.mark.parametrize("model", TOKEN_MODELS)
@pytest.mark.parametrize("partial_images", [0, 3])
def test_the_estimate_covers_the_cost_at_every_size_and_quality(
    model: str, partial_images: int
) -> None:
    entry = shipped_prices()[model]
    prompt_tokens = len(PROMPT.encode()) + 6  # at most a token a byte, and the API's 6
    for key, tokens in entry.output_tokens.items():
        size, quality = key.split("/")
        for n in (1, 4):
            asked = request(
                model, size=size, quality=quality, n=n, stream=True, partial_images=partial_images
            )
            output = tokens + partial_images * 100
            spent = Usage(
                input_tokens=n * prompt_tokens,
                input_text_tokens=n * prompt_tokens,
                output_tokens=n * output,
            )
            assert price(model).estimate(asked) >= price(model).cost(asked, spent), (key, n)


def test_each_streamed_partial_image_adds_100_output_tokens_per_image() -> None:
    table = {"1024x1024/low": 272}
    plain = flat(table).estimate(request(size="1024x1024", quality="low", n=2, stream=True))
    with_partials = flat(table).estimate(
        request(size="1024x1024", quality="low", n=2, stream=True, partial_images=3)
    )
    assert plain == 2 * 272
    assert with_partials == 2 * (272 + 3 * 100)


def test_partial_images_cost_nothing_without_streaming() -> None:
    table = {"1024x1024/low": 272}
    assert flat(table).estimate(request(size="1024x1024", quality="low", partial_images=3)) == 272


@pytest.mark.parametrize(
    ("size", "quality", "tokens"),
    [
        ("1024x1024", "high", 4160),
        ("1024x1024", "auto", 4160),  # the dearest quality at that size
        ("1024x1024", None, 4160),
        ("1536x1024", "ultra", 6208),
        ("auto", "low", 408),  # the dearest size at that quality
        (None, "medium", 1584),
        ("4096x4096", "high", 6240),
        (None, None, 6240),  # the dearest of all
        ("auto", "auto", 6240),
    ],
)
def test_an_unknown_size_or_quality_reserves_the_dearest_it_could_be(
    size: str | None, quality: str | None, tokens: int
) -> None:
    gpt_image_1 = flat(dict(shipped_prices()["gpt-image-1"].output_tokens))
    assert gpt_image_1.estimate(request(size=size, quality=quality)) == tokens


def test_the_prompt_is_reserved_at_a_token_a_byte_for_each_image() -> None:
    entry = PriceConfig(
        input_text_per_mtok=1,
        input_image_per_mtok=0,
        output_image_per_mtok=0,
        output_tokens={"1024x1024/low": 272},
    )
    text_only = price("text", Prices({"text": entry}, shipped={}))
    overhead = 16  # the API adds 6 tokens to every prompt; the reservation allows 16
    assert text_only.estimate(request(prompt="héllo wörld", n=2)) == 2 * (13 + overhead)


def test_an_estimate_for_gpt_image_1_reserves_images_and_prompt() -> None:
    asked = request(size="1024x1024", quality="high", prompt="a cat")
    assert price("gpt-image-1").estimate(asked) == 4160 * 40 + (5 + 16) * 5


# The table and the configuration


def test_the_shipped_table_loads_and_names_a_source_for_every_entry() -> None:
    shipped = shipped_prices()
    # OpenAI's models; each other provider's test module checks its own.
    assert set(shipped) >= {
        "gpt-image-2",
        "gpt-image-2-2026-04-21",
        "gpt-image-2.5-flare",
        "gpt-image-2.5-flare-2026-09-08",
        "gpt-image-2.5-sunburst",
        "gpt-image-2.5-sunburst-2026-09-08",
        "gpt-image-2.6-flare",
        "gpt-image-2.6-sunburst",
        "gpt-image-1",
        "gpt-image-1-mini",
        "gpt-image-1.5",
        "dall-e-3",
        "dall-e-2",
        "stable-image-ultra",
        "ultra",
        "stable-image-core",
        "core",
        "sd3.5-large",
        "sd3.5-large-turbo",
        "sd3.5-medium",
        "amazon.nova-canvas-v1:0",
        "flux-pro-1.1",
        "flux-pro-1.1-ultra",
        "flux-kontext-pro",
        "flux-kontext-max",
        "flux-dev",
        "flux-2-pro",
        "flux-2-max",
        "flux-2-flex",
        "flux-2-klein-4b",
        "flux-2-klein-9b",
    }
    assert all(entry.source for entry in shipped.values())
    assert resources.files("imagegen_proxy.governance").joinpath("prices.toml").is_file()
    assert all(Prices().get(model) is not None for model in shipped)


@pytest.mark.parametrize(
    "model",
    ["gpt-image-2", "gpt-image-2.5-flare", "gpt-image-2.5-sunburst", "gpt-image-2.6-flare"],
)
def test_the_gpt_image_2_family_costs_what_its_usage_says(model: str) -> None:
    # 5.00 text and 8.00 image input, 30.00 image output per 1M tokens: a dollar per 1M
    # tokens is a micro-dollar per token.
    spent = Usage(input_tokens=58, input_text_tokens=48, input_image_tokens=10, output_tokens=7034)
    assert price(model).spent(spent) == 48 * 5 + 10 * 8 + 7034 * 30
    assert price(model) == price("gpt-image-2.6-sunburst") or model == "gpt-image-2"


def test_gpt_image_2_prices_its_text_output_apart() -> None:
    spent = Usage(input_tokens=48, input_text_tokens=48, output_tokens=472, output_text_tokens=200)
    assert price("gpt-image-2").spent(spent) == 48 * 5 + 272 * 30 + 200 * 10


def test_the_new_qualities_reserve_more_than_high() -> None:
    high, xhigh, top = (
        price("gpt-image-2.6-sunburst").estimate(request("gpt-image-2.6-sunburst", quality=q))
        for q in ("high", "xhigh", "max")
    )
    assert high < xhigh < top
    assert xhigh >= 2 * 7034 * 30  # twice high's 1024x1024 output at least


def test_retired_models_keep_their_prices_and_carry_their_shutdown_date() -> None:
    prices = Prices()
    assert prices.get("gpt-image-1") is not None
    assert str(prices.shutdown_date("gpt-image-1")) == "2026-10-23"
    assert str(prices.shutdown_date("gpt-image-1.5")) == "2026-12-01"
    assert prices.shutdown_date("gpt-image-2.6-sunburst") is None
    # Not inherited: a deployment priced like a retired model is not retired with it.
    deployment = prices_from({"img-eastus": {"same_as": "gpt-image-1"}})
    assert deployment.shutdown_date("img-eastus") is None


def test_no_model_or_an_unknown_one_has_no_price() -> None:
    assert Prices().get(None) is None
    assert Prices().get("gpt-image-9") is None


def test_the_configuration_overrides_a_shipped_field_and_keeps_the_others() -> None:
    prices = prices_from({"gpt-image-1": {"output_image_per_mtok": 50}})
    spent = Usage(input_tokens=50, input_text_tokens=50, output_tokens=4160)
    assert price("gpt-image-1", prices).spent(spent) == 50 * 5 + 4160 * 50
    assert price("gpt-image-1-mini", prices) == price("gpt-image-1-mini")


def test_a_model_only_in_the_configuration_stands_alone() -> None:
    prices = prices_from({"flux-pro": {"per_image": {"1024x1024/standard": 0.05}}})
    assert price("flux-pro", prices).cost(request("flux-pro"), None) == 50_000


def test_the_configuration_may_price_a_shipped_model_per_image_instead() -> None:
    prices = prices_from({"gpt-image-1": {"per_image": {"1024x1024/high": 0.2}}})
    asked = request(size="1024x1024", quality="high")
    assert price("gpt-image-1", prices).cost(asked, Usage(output_tokens=4160)) == 200_000


def test_a_deployment_is_priced_like_the_model_it_names_with_same_as() -> None:
    prices = prices_from({"images-prod": {"same_as": "gpt-image-1"}})
    assert price("images-prod", prices) == price("gpt-image-1")


def test_same_as_follows_a_chain_and_keeps_the_fields_set_along_it() -> None:
    prices = prices_from(
        {
            "eu-images": {"same_as": "gpt-image-1", "output_image_per_mtok": 44},
            "eu-images-2": {"same_as": "eu-images"},
        }
    )
    spent = Usage(input_tokens=10, output_tokens=272)
    assert price("eu-images-2", prices).spent(spent) == 10 * 5 + 272 * 44


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"my-dep": {"same_as": "gpt-image-9"}},
            "prices.my-dep.same_as: no price for 'gpt-image-9'",
        ),
        (
            {"a": {"same_as": "b"}, "b": {"same_as": "a"}},
            "prices.a.same_as: 'a' -> 'b' -> 'a' is a cycle",
        ),
        ({"a": {"same_as": "a"}}, "prices.a.same_as: 'a' -> 'a' is a cycle"),
        (
            {
                "half": {
                    "input_text_per_mtok": 5,
                    "output_image_per_mtok": 40,
                    "output_tokens": {"1024x1024/low": 272},
                }
            },
            "prices.half: priced per token, but input_image_per_mtok unset",
        ),
        (
            {
                "both": {
                    "input_text_per_mtok": 5,
                    "input_image_per_mtok": 10,
                    "output_image_per_mtok": 40,
                    "output_tokens": {"1024x1024/low": 272},
                    "per_image": {"1024x1024/standard": 0.04},
                }
            },
            "prices.both: priced both per token and per_image",
        ),
        ({"empty": {"source": "nowhere"}}, "prices.empty: no price"),
        (
            {"gpt-image-1": {"output_tokens": {}}},
            "prices.gpt-image-1: priced per token, but output_tokens unset",
        ),
    ],
)
def test_a_bad_table_is_refused_with_its_key_named(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        prices_from(table)
    assert str(refused.value).startswith(message)


def test_a_bad_size_and_quality_key_is_refused_by_the_configuration() -> None:
    with pytest.raises(ConfigError) as refused:
        ProxyConfig.from_mapping({"prices": {"m": {"output_tokens": {"1024/high": 100}}}})
    assert "prices.m.output_tokens: '1024/high': keys are \"WIDTHxHEIGHT/quality\"" in str(
        refused.value
    )


# Dollars and usage


def test_micro_dollars_print_as_exact_dollars_with_cents_at_least() -> None:
    assert usd(40_000) == "0.04"
    assert usd(20_000_000) == "20.00"
    assert usd(19_984_000) == "19.984"
    assert usd(2_176) == "0.002176"
    assert usd(1_234_567) == "1.234567"
    assert usd(0) == "0.00"
    assert usd(-1) == "-0.000001"


def test_usage_adds_and_subtracts_every_field() -> None:
    """`Usage.__add__` spells its fields out (it runs for every request): none is left out."""
    count = len(dataclasses.fields(Usage))
    one, other = Usage(*range(1, count + 1)), Usage(*range(10, 10 * count + 1, 10))
    assert one + other == Usage(*range(11, 11 * count + 1, 11))
    assert other - one == Usage(*range(9, 9 * count + 1, 9))
    assert one + one - one == one
    assert one - one == Usage()


def test_usage_reads_the_input_token_details() -> None:
    spent = tokens_in(json_answer(usage(text=40, image=960, output=272)))
    assert spent == Usage(
        tokens=1272,
        input_tokens=1000,
        output_tokens=272,
        input_text_tokens=40,
        input_image_tokens=960,
    )
