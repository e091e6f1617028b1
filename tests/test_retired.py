"""Models OpenAI has shut down: refused before they wait in line when bound for OpenAI's own
API, naming their replacement; and `/v1/models`, answered outside a pool too."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import API_VERSION, CLIENT_KEY, HostApp, proxy_config
from double import UpstreamDouble
from support import serve

from imagegen_proxy import ImageGenProxy, ProxyConfig
from imagegen_proxy.server.app import create_app

KEY = "sk-checkout-bot-0123456789"


def sdk(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)


def as_openai(proxy: ImageGenProxy) -> ImageGenProxy:
    """The proxy, its one upstream (the double, on loopback) taken for OpenAI's own API:
    what `[openai] base_url = "https://api.openai.com/v1"` makes it, without the network."""
    for target in proxy.upstreams.targets:
        target.is_openai_api = True
    return proxy


@pytest.fixture
def openai_proxy(upstream: UpstreamDouble) -> Iterator[Callable[..., str]]:
    with contextlib.ExitStack() as stack:

        def start(**sections: Any) -> str:
            config = proxy_config(upstream, **sections)
            return stack.enter_context(serve(as_openai(ImageGenProxy(HostApp().app, config))))

        yield start


@pytest.mark.parametrize(
    ("model", "day", "instead"),
    [
        ("gpt-image-1", "2026-10-23", "gpt-image-2.5-sunburst"),
        ("gpt-image-1.5", "2026-12-01", "gpt-image-2.6-sunburst"),
        ("dall-e-3", "2026-05-12", "gpt-image-2.5-sunburst"),
    ],
)
def test_a_shut_down_model_is_refused_naming_its_replacement(
    openai_proxy: Callable[..., str], upstream: UpstreamDouble, model: str, day: str, instead: str
) -> None:
    proxy = openai_proxy()
    with pytest.raises(openai.NotFoundError) as refused:
        sdk(proxy).images.generate(model=model, prompt="p")
    error = refused.value
    assert (error.code, error.param) == ("model_not_found", "model")
    assert day in error.message and instead in error.message
    assert not upstream.requests


def test_an_edit_of_a_shut_down_model_is_refused_before_its_upload_goes_up(
    openai_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = openai_proxy()
    with pytest.raises(openai.NotFoundError):
        sdk(proxy).images.edit(
            image=("a.png", b"png", "image/png"), prompt="p", model="gpt-image-1"
        )
    assert not upstream.requests


def test_todays_models_and_unknown_ones_pass(
    openai_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = openai_proxy()
    for model in ("gpt-image-2", "gpt-image-2.6-sunburst", "my-fine-tune"):
        assert sdk(proxy).images.generate(model=model, prompt="p").data
    assert [r.json["model"] for r in upstream.requests] == [
        "gpt-image-2",
        "gpt-image-2.6-sunburst",
        "my-fine-tune",
    ]


def test_retired_pass_sends_them_on(
    openai_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = openai_proxy(limits={"retired": "pass"})
    assert sdk(proxy).images.generate(model="gpt-image-1", prompt="p").data
    assert upstream.last.json["model"] == "gpt-image-1"


def test_other_services_keep_their_own_models(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    # An OpenAI-compatible service that is not OpenAI's API (here the double), and an Azure
    # deployment named like the model: OpenAI's dates are not theirs.
    proxy = start_proxy(azure=True)
    assert sdk(proxy).images.generate(model="gpt-image-1", prompt="p").data
    azure = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0
    )
    assert azure.images.generate(model="gpt-image-1", prompt="p").data
    assert [r.path for r in upstream.requests] == [
        "/v1/images/generations",
        "/openai/deployments/gpt-image-1/images/generations",
    ]


def test_the_default_upstream_is_openais_api() -> None:
    config = ProxyConfig.model_validate({"auth": {"open": True}, "openai": {"api_key": "sk-x"}})
    [target] = ImageGenProxy(HostApp().app, config).upstreams.targets
    assert target.is_openai_api
    other = config.model_copy(
        update={"openai": config.openai.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})}
    )
    assert not ImageGenProxy(HostApp().app, other).upstreams.targets[0].is_openai_api


def test_models_are_the_host_apps_when_embedded_without_a_pool(proxy: str) -> None:
    answer = httpx.get(proxy + "/v1/models")
    assert answer.text == "host says hello at /v1/models"


def test_list_models_answers_outside_a_pool(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    keys = [
        {"name": "all", "key": CLIENT_KEY},
        {"name": "one", "key": KEY, "models": ["gpt-image-2"]},
    ]
    proxy = start_proxy(proxy={"list_models": True}, auth={"open": False}, keys=keys)
    listed = {model.id: model for model in sdk(proxy).models.list()}
    assert {"gpt-image-2", "gpt-image-2.6-sunburst", "gpt-image-1"} <= set(listed)
    # Its upstream is not OpenAI's API: what OpenAI shut down is listed, dated.
    assert getattr(listed["gpt-image-1"], "shutdown_date", None) == "2026-10-23"
    only = openai.OpenAI(base_url=proxy + "/v1", api_key=KEY).models.list()
    assert [model.id for model in only] == ["gpt-image-2"]
    assert not upstream.requests


def test_models_bound_for_openai_leave_out_what_it_shut_down() -> None:
    # Listing goes nowhere upstream: OpenAI's real address is safe to configure here.
    config = ProxyConfig.model_validate(
        {"auth": {"open": True}, "openai": {"api_key": "sk-x"}, "proxy": {"list_models": True}}
    )
    with serve(ImageGenProxy(HostApp().app, config)) as proxy:
        listed = [model.id for model in sdk(proxy).models.list()]
    assert "gpt-image-2.6-sunburst" in listed and "gpt-image-2" in listed
    assert not {"gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini", "dall-e-3"} & set(listed)


def test_the_bundled_proxy_lists_its_models(upstream: UpstreamDouble) -> None:
    with serve(create_app(proxy_config(upstream))) as proxy:
        listed = [model.id for model in sdk(proxy).models.list()]
    assert "gpt-image-2.6-sunburst" in listed
