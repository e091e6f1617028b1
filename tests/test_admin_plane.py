"""The admin plane through the proxy, as platform teams use it: the official SDK's admin
client makes projects and service-account keys, sets their limits, and reads usage and
costs, while the proxy serves generations with those keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import HostApp, proxy_config
from double import UpstreamDouble
from support import serve, until

from imagegen_proxy import ImageGenProxy

ADMIN = "sk-admin-plane-0123456789"
TOML_KEY = "sk-toml-key-0123456789"


def start(upstream: UpstreamDouble, database: str, **sections: Any) -> Any:
    config = proxy_config(
        upstream,
        auth={"open": False},
        keys=[{"name": "toml-team", "key": TOML_KEY}],
        store={"url": database},
        admin={"key": ADMIN},
        **sections,
    )
    return serve(ImageGenProxy(HostApp().app, config))


@pytest.fixture
def database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/proxy.db"


@pytest.fixture
def proxy(upstream: UpstreamDouble, database: str) -> Iterator[str]:
    with start(upstream, database) as url:
        yield url


def admin(proxy: str) -> Any:
    client = openai.OpenAI(admin_api_key=ADMIN, api_key="unused", base_url=proxy + "/v1")
    return client.with_options(max_retries=0).admin.organization


def generate(proxy: str, key: str, **body: Any) -> int:
    client = openai.OpenAI(base_url=proxy + "/v1", api_key=key, max_retries=0)
    try:
        client.images.generate(prompt="p", **{"model": "dall-e-3", "size": "1024x1024", **body})
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def new_key(org: Any, project: str = "growth", **options: Any) -> tuple[str, str, str]:
    """A project and a service account in it: their ids, and the account's key."""
    made = org.projects.create(name=project)
    account = org.projects.service_accounts.create(made.id, name="checkout-bot", **options)
    return made.id, account.id, account.api_key.value


def test_the_admin_api_opens_only_to_the_admin_key(proxy: str) -> None:
    for key in (TOML_KEY, "sk-forged-0123456789"):
        client = openai.OpenAI(admin_api_key=key, api_key="unused", base_url=proxy + "/v1")
        with pytest.raises(openai.AuthenticationError):
            client.with_options(max_retries=0).admin.organization.projects.list()
    assert generate(proxy, ADMIN) == 401  # and the admin key makes no images


def test_a_service_account_key_made_with_the_sdk_generates_images(proxy: str) -> None:
    org = admin(proxy)
    _, _, key = new_key(org)
    assert generate(proxy, key) == 200


def test_generations_show_in_usage_and_costs(proxy: str) -> None:
    org = admin(proxy)
    project, _, key = new_key(org)
    started = int(time.time()) - 60
    assert generate(proxy, key, n=2) == 200
    assert generate(proxy, TOML_KEY) == 200

    def images() -> dict[str | None, int]:
        page = org.usage.images(start_time=started, bucket_width="1d", group_by=["project_id"])
        return {r.project_id: r.images for bucket in page.data for r in bucket.results}

    until(lambda: images() == {project: 2, None: 1}, within=5.0)  # the ledger writes each second
    page = org.usage.costs(start_time=started, group_by=["project_id"])
    costs = {r.project_id: r.amount.value for bucket in page.data for r in bucket.results}
    assert costs[project] == pytest.approx(0.08)  # 2 dall-e-3 images at $0.04


def test_a_project_spend_limit_set_with_the_sdk_is_a_hard_budget(proxy: str) -> None:
    org = admin(proxy)
    project, _, key = new_key(org)
    org.projects.spend_limit.update(project, currency="USD", interval="month", threshold_amount=4)
    assert generate(proxy, key) == 200  # the key's first use: no cache holds it yet
    assert generate(proxy, key) == 429  # $0.04 spent: the next $0.04 does not fit


def test_model_permissions_and_rate_limits_set_with_the_sdk_are_enforced(proxy: str) -> None:
    org = admin(proxy)
    project, _, key = new_key(org)
    org.projects.model_permissions.update(project, mode="allow_list", model_ids=["dall-e-3"])
    org.projects.rate_limits.update_rate_limit(
        "rl-dall-e-3", project_id=project, max_requests_per_1_minute=2
    )
    assert generate(proxy, key, model="gpt-image-1") == 403  # the key's first use
    assert [generate(proxy, key) for _ in range(3)] == [200, 200, 429]


def test_a_new_project_lists_a_rate_limit_for_each_model_it_may_use(proxy: str) -> None:
    org = admin(proxy)
    project, _, key = new_key(org)
    listed = list(org.projects.rate_limits.list_rate_limits(project))
    served = {"dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5"}
    assert {limit.model for limit in listed} >= served  # the priced models, at least
    assert all(limit.id == "rl-" + limit.model for limit in listed)
    assert all(limit.max_requests_per_1_minute is None for limit in listed)  # unlimited
    org.projects.model_permissions.update(project, mode="allow_list", model_ids=["dall-e-3"])
    [only] = org.projects.rate_limits.list_rate_limits(project)
    assert only.model == "dall-e-3"
    changed = org.projects.rate_limits.update_rate_limit(
        only.id, project_id=project, max_requests_per_1_minute=1
    )
    assert changed.max_requests_per_1_minute == 1
    assert list(org.projects.rate_limits.list_rate_limits(project)) == [changed]
    assert [generate(proxy, key) for _ in range(2)] == [200, 429]


def test_a_pools_models_have_rate_limits_to_list(upstream: UpstreamDouble, database: str) -> None:
    members = [{"kind": "openai", "base_url": upstream.url + "/v1", "api_key": "sk-up"}]
    pool = [{"name": "house", **members[0], "models": ["house-model"]}]
    with start(upstream, database, openai=False, upstreams=pool) as proxy:
        org = admin(proxy)
        project, _, _ = new_key(org)
        listed = [limit.model for limit in org.projects.rate_limits.list_rate_limits(project)]
        assert listed == ["house-model"]


def test_a_deleted_service_accounts_key_is_refused_on_another_process_within_2_s(
    upstream: UpstreamDouble, database: str
) -> None:
    with start(upstream, database) as first, start(upstream, database) as second:
        org = admin(first)
        project, account, key = new_key(org)
        assert generate(second, key) == 200
        org.projects.service_accounts.delete(account, project_id=project)
        # The promise is 2 s; 3 s leaves room for a loaded CI machine's scheduling.
        until(lambda: generate(second, key) == 401, within=3.0)


def test_a_key_made_to_expire_stops_working(proxy: str) -> None:
    org = admin(proxy)
    _, _, key = new_key(org, expires_in_seconds=1)
    assert generate(proxy, key) == 200
    until(lambda: generate(proxy, key) == 401, within=4.0)


def test_the_async_admin_client_works_too(proxy: str) -> None:
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(admin_api_key=ADMIN, api_key="unused", base_url=proxy + "/v1")
        org = client.with_options(max_retries=0).admin.organization
        await org.projects.create(name="alpha")
        await org.projects.create(name="beta")
        return [project.name async for project in org.projects.list(limit=1)]

    assert asyncio.run(main())[:2] == ["alpha", "beta"]  # the SDK follows the pages


def test_without_a_store_the_admin_api_says_so(upstream: UpstreamDouble) -> None:
    config = proxy_config(
        upstream, auth={"open": False}, keys=[{"name": "t", "key": TOML_KEY}], admin={"key": ADMIN}
    )
    with (
        serve(ImageGenProxy(HostApp().app, config)) as proxy,
        pytest.raises(openai.NotFoundError) as missing,
    ):
        admin(proxy).projects.list()
    assert "[store]" in missing.value.message


def test_the_organization_spend_limit_holds_every_key(proxy: str) -> None:
    org = admin(proxy)
    _, _, key = new_key(org)
    limit = org.spend_limit.update(currency="USD", interval="month", threshold_amount=8)
    assert (limit.threshold_amount, limit.enforcement.status) == (8, "enforcing")
    assert org.spend_limit.retrieve().threshold_amount == 8
    # $0.08 for the whole organization: a store key and a [[keys]] key share it. (The
    # proxy's first requests: no cache holds the organization's limits yet.)
    assert generate(proxy, key) == 200
    assert generate(proxy, TOML_KEY) == 200
    assert generate(proxy, TOML_KEY) == 429
    assert org.spend_limit.delete().deleted


def test_the_no_config_mode_keeps_a_ledger_in_an_embedded_store(tmp_path: Path) -> None:
    from test_cli import running

    with running(cwd=tmp_path, lines=7) as (url, banner):
        assert f"Store: {tmp_path / 'imagegen-proxy.db'}" in banner
        assert (tmp_path / "imagegen-proxy.db").exists()  # made on first start
        client = openai.OpenAI(base_url=url + "/v1", api_key="no-key-needed", max_retries=0)
        assert client.images.generate(model="gpt-image-1", prompt="a lighthouse").data
        # On loopback the admin API is open, like the rest of this mode.
        org = openai.OpenAI(admin_api_key="any", api_key="unused", base_url=url + "/v1")
        started = int(time.time()) - 60

        def images() -> int:
            page = org.admin.organization.usage.images(start_time=started, bucket_width="1d")
            return sum(r.images for bucket in page.data for r in bucket.results)

        until(lambda: images() == 1, within=5.0)  # the ledger writes each second


def test_keys_made_through_the_admin_api_have_metric_labels_of_their_own(
    upstream: UpstreamDouble, database: str
) -> None:
    from test_metrics import Delta

    with start(upstream, database, metrics={"enabled": True}) as proxy:
        org = admin(proxy)
        _, first, key = new_key(org)
        made = org.projects.create(name="web")
        other = org.projects.service_accounts.create(made.id, name="checkout-bot")
        delta = Delta()
        assert generate(proxy, key) == 200
        assert generate(proxy, other.api_key.value) == 200
    # Each its own series, labelled by its name and service account: not both "other".
    for account in (first, other.id):
        label = f"checkout-bot_{account}"
        assert (
            delta(
                "imagegen_proxy_images_total",
                key=label,
                project="growth" if account == first else "web",
                model="dall-e-3",
                operation="generation",
            )
            == 1
        )
    assert (
        delta(
            "imagegen_proxy_images_total",
            key="other",
            project="growth",
            model="dall-e-3",
            operation="generation",
        )
        == 0
    )
