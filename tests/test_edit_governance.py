"""Edits and variations under the same keys, limits, budgets and records as generations."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from double import UpstreamDouble, error_json, image_body
from support import on_store, until
from test_edits import PNG, form_headers, multipart

KEY = "sk-designer-0123456789"
EDITS = "/v1/images/edits"
# The double's edit usage: 10 text and 290 image tokens in, 272 out (gpt-image-1: $5, $10
# and $40 per 1M tokens).
USAGE = {
    "total_tokens": 572,
    "input_tokens": 300,
    "output_tokens": 272,
    "input_tokens_details": {"text_tokens": 10, "image_tokens": 290},
}
EDIT_COST = 10 * 5 + 290 * 10 + 272 * 40  # micro-USD

# The SDK marks variations (DALL·E 2) deprecated; they are still served.
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def answer_with_usage(n: int = 1) -> Any:
    async def answer(x: Any) -> None:
        body = json.loads(image_body("aW1n", n))
        body["usage"] = USAGE
        data = json.dumps(body).encode()
        await x.start(200, [("content-type", "application/json")])
        await x.body(data, more=False)

    return answer


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="imagegen_proxy.access")
    return lambda: [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "imagegen_proxy.access"
    ]


def keyed(start_proxy: Callable[..., str], **policy: Any) -> str:
    keys = [{"name": "designer", "key": KEY, **policy}]
    return start_proxy(auth={"open": False}, keys=keys, access_log={"enabled": True})


def sdk(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=KEY, max_retries=0)


def edit(proxy: str, **kwargs: Any) -> Any:
    return sdk(proxy).images.edit(image=("a.png", PNG, "image/png"), prompt="p", **kwargs)


def test_an_edit_costs_its_input_image_tokens(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    upstream.answer = answer_with_usage()
    proxy = keyed(start_proxy, budget_usd=5.0)
    edit(proxy, model="gpt-image-1")
    [line] = access()
    assert (line["operation"], line["outcome"], line["images"]) == ("edit", "ok", 1)
    assert line["cost_usd"] == EDIT_COST / 1_000_000
    view = httpx.get(proxy + "/v1/imagegen/budget", headers={"authorization": f"Bearer {KEY}"})
    assert view.json()["key"]["budget"]["spent_usd"] == EDIT_COST / 1_000_000


def test_an_edits_reservation_covers_the_images_it_may_still_carry(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    upstream.answer = answer_with_usage()
    # Worst case of an SDK edit (text first): 16 input images of 6,240 tokens at $10/1M,
    # about $1.00, over this budget; the answer would have cost $0.014.
    proxy = keyed(start_proxy, budget_usd=0.5)
    with pytest.raises(openai.RateLimitError, match="budget"):
        edit(proxy, model="gpt-image-1")
    assert not upstream.requests
    # Files first: the body was read to its end, the one image is all there is to reserve.
    body = multipart(
        ("image", "a.png", PNG), ("prompt", None, b"p"), ("model", None, b"gpt-image-1")
    )
    headers = form_headers(body, authorization=f"Bearer {KEY}")
    answer = httpx.post(proxy + EDITS, content=body, headers=headers)
    assert answer.status_code == 200, answer.text


def test_edits_count_against_image_limits_and_model_lists(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = keyed(start_proxy, images_per_minute=3, denied_models=["dall-e-2"])
    with pytest.raises(openai.PermissionDeniedError):
        edit(proxy, model="dall-e-2")
    edit(proxy, model="gpt-image-1", n=2)
    with pytest.raises(openai.RateLimitError):
        edit(proxy, model="gpt-image-1", n=2)
    assert len(upstream.requests) == 1


def test_a_failed_edit_is_not_charged_and_its_error_passes_through(
    start_proxy: Callable[..., str],
    upstream: UpstreamDouble,
    access: Callable[[], list[dict[str, Any]]],
) -> None:
    error = {
        "message": "Invalid image.",
        "type": "invalid_request_error",
        "param": "image",
        "code": None,
    }
    upstream.answer = error_json(400, error)
    proxy = keyed(start_proxy, budget_usd=5.0)
    with pytest.raises(openai.BadRequestError) as raised:
        edit(proxy, model="gpt-image-1")
    assert raised.value.body == error  # type: ignore[comparison-overlap]
    [line] = access()
    assert (line["outcome"], line["images"], line["cost_usd"]) == ("upstream_error", 0, None)


def test_the_ledger_records_edits_and_variations_by_source(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, tmp_path: Any
) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    proxy = start_proxy(store={"url": url})
    edit(proxy, model="gpt-image-1")
    sdk(proxy).images.create_variation(image=("a.png", PNG, "image/png"), model="dall-e-2")

    async def sources(store: Any) -> list[str]:
        from sqlalchemy import text

        async with store.engine.connect() as connection:
            rows = await connection.execute(text("select source from ledger order by id"))
            return [row[0] for row in rows]

    # The ledger writes its rows every second.
    until(lambda: on_store(url, sources) == ["image.edit", "image.variation"], within=10)
