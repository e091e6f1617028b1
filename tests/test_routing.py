"""Which requests the proxy serves, and where it sends them."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest
from conftest import API_VERSION, CLIENT_KEY, UPSTREAM_KEY, HostApp
from double import UpstreamDouble


@pytest.mark.parametrize("prefix", ["/v1", "", "/openai/v1", "/openai"])
def test_every_openai_path_form_reaches_the_openai_upstream(
    proxy: str, upstream: UpstreamDouble, prefix: str
) -> None:
    client = openai.OpenAI(base_url=proxy + prefix, api_key=CLIENT_KEY, max_retries=0)
    result = client.images.generate(model="gpt-image-1", prompt="a red fox", n=2)
    assert len(result.data) == 2
    assert upstream.last.method == "POST"
    assert upstream.last.path == "/v1/images/generations"
    assert upstream.last.json == {"model": "gpt-image-1", "prompt": "a red fox", "n": 2}
    assert upstream.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"


def test_azure_client_reaches_the_azure_deployment(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure=True)
    client = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version="2024-10-21", max_retries=0
    )
    client.images.generate(model="my-dep", prompt="a red fox")
    assert upstream.last.path == "/openai/deployments/my-dep/images/generations"
    assert upstream.last.query == "api-version=2024-10-21"
    assert upstream.last.header("api-key") == UPSTREAM_KEY
    assert upstream.last.header("authorization") is None


def test_azure_deployment_comes_from_the_path_not_the_body(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure=True)
    client = openai.AzureOpenAI(
        azure_endpoint=proxy,
        azure_deployment="dep-from-path",
        api_key=CLIENT_KEY,
        api_version=API_VERSION,
        max_retries=0,
    )
    client.images.generate(model="gpt-image-1", prompt="p")
    assert upstream.last.path == "/openai/deployments/dep-from-path/images/generations"
    assert upstream.last.json["model"] == "gpt-image-1"


def test_azure_form_without_api_version_uses_the_configured_one(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure=True)
    answer = httpx.post(proxy + "/openai/deployments/dep/images/generations", json={"prompt": "p"})
    assert answer.status_code == 200
    assert upstream.last.query == f"api-version={API_VERSION}"


def test_openai_form_goes_to_azure_through_the_deployment_map(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure={"deployments": {"gpt-image-1": "images-prod"}})
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    client.images.generate(model="gpt-image-1", prompt="p")
    assert upstream.last.path == "/openai/deployments/images-prod/images/generations"
    assert upstream.last.query == f"api-version={API_VERSION}"
    client.images.generate(model="unmapped-model", prompt="p")
    assert upstream.last.path == "/openai/deployments/unmapped-model/images/generations"


def test_openai_form_to_azure_needs_a_model_that_names_a_deployment(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(openai=False, azure=True)
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as missing:
        client.images.generate(prompt="p")
    assert missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as invalid:
        client.images.generate(model="../../admin", prompt="p")
    assert invalid.value.param == "model"
    assert upstream.requests == []


def test_azure_form_goes_to_openai_with_the_deployment_as_model(
    proxy: str, upstream: UpstreamDouble
) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version=API_VERSION, max_retries=0
    )
    client.images.generate(model="gpt-image-1", prompt="p")
    assert upstream.last.path == "/v1/images/generations"
    assert upstream.last.query == ""
    assert upstream.last.json == {"model": "gpt-image-1", "prompt": "p"}
    assert upstream.last.header("authorization") == f"Bearer {UPSTREAM_KEY}"

    deployment_client = openai.AzureOpenAI(
        azure_endpoint=proxy,
        azure_deployment="dall-e-3",
        api_key=CLIENT_KEY,
        api_version=API_VERSION,
        max_retries=0,
    )
    deployment_client.images.generate(model="ignored", prompt="p")
    assert upstream.last.json["model"] == "dall-e-3"


@pytest.mark.anyio
async def test_async_clients_work_through_the_proxy(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(azure=True)
    async with openai.AsyncOpenAI(base_url=proxy + "/v1", api_key=CLIENT_KEY) as client:
        result = await client.images.generate(model="gpt-image-1", prompt="p")
    assert result.data and result.data[0].b64_json
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=proxy, api_key=CLIENT_KEY, api_version=API_VERSION
    ) as azure:
        await azure.images.generate(model="dep", prompt="p")
    assert upstream.last.path == "/openai/deployments/dep/images/generations"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_on_proxy_paths_get_405_with_allow(
    proxy: str, upstream: UpstreamDouble, method: str
) -> None:
    for path in ["/v1/images/generations", "/openai/deployments/d/images/generations"]:
        answer = httpx.request(method, proxy + path)
        assert answer.status_code == 405
        assert answer.headers["allow"] == "POST"
        assert answer.json()["error"]["code"] == "method_not_allowed"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/openai/deployments//images/generations",
        "/openai/deployments/a%2Fb/images/generations",
        "/openai/deployments/%2e%2e/images/generations",
        "/openai/deployments/a..b/images/generations",
        "/openai/deployments/dep%0d%0aX-Injected:%201/images/generations",
        "/openai/deployments/dep%00/images/generations",
        "/openai/deployments/" + "d" * 65 + "/images/generations",
    ],
)
def test_bad_deployment_ids_are_refused_and_never_reach_upstream(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, path: str
) -> None:
    proxy = start_proxy(azure=True)
    answer = httpx.post(proxy + path + "?api-version=v1", json={"prompt": "p"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_deployment"
    assert upstream.requests == []


@pytest.mark.parametrize(
    "version", ["", "2024%0d%0aX-Evil:%201", "a b", "x" * 40, "v1%26admin%3D1"]
)
def test_bad_api_versions_are_refused(
    start_proxy: Callable[..., str], upstream: UpstreamDouble, version: str
) -> None:
    proxy = start_proxy(azure=True)
    url = f"{proxy}/openai/deployments/dep/images/generations?api-version={version}"
    answer = httpx.post(url, json={"prompt": "p"})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "api-version"
    assert upstream.requests == []


def test_only_the_checked_api_version_goes_upstream(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(azure=True)
    url = f"{proxy}/openai/deployments/dep/images/generations?api-version=v1&admin=1&x=%0d"
    assert httpx.post(url, json={"prompt": "p"}).status_code == 200
    assert upstream.last.query == "api-version=v1"


def test_other_paths_go_to_the_host_app(proxy: str, upstream: UpstreamDouble) -> None:
    assert httpx.get(proxy + "/hello").text == "host says hello at /hello"
    assert httpx.get(proxy + "/v1/models").text == "host says hello at /v1/models"
    assert httpx.get(proxy + "/v1/images/generations/").status_code == 200
    assert httpx.get(proxy + "/v2/images/generations").status_code == 200
    assert upstream.requests == []


def test_host_websocket_and_lifespan_are_untouched(start_proxy: Callable[..., str]) -> None:
    from websockets.sync.client import connect

    host = HostApp()
    proxy = start_proxy(host, lifespan="on")
    assert host.lifespan_events == ["startup"]
    with connect(proxy.replace("http://", "ws://") + "/ws") as websocket:
        websocket.send("hi")
        assert websocket.recv() == "echo: hi"


def test_mount_prefix_moves_the_proxy_paths(
    start_proxy: Callable[..., str], upstream: UpstreamDouble
) -> None:
    proxy = start_proxy(proxy={"mount_prefix": "/ai"})
    client = openai.OpenAI(base_url=proxy + "/ai/v1", api_key=CLIENT_KEY, max_retries=0)
    client.images.generate(prompt="p")
    assert upstream.last.path == "/v1/images/generations"
    assert httpx.get(proxy + "/v1/images/generations").text.startswith("host says hello")
