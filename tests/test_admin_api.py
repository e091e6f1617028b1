"""The Admin API over the store, driven by the official SDK's admin client (sync and async)
against a real server on loopback, on a SQLite store."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from postgres_server import create_database
from starlette.applications import Starlette
from starlette.routing import Mount
from support import on_store, serve

from imagegen_proxy.admin.api import admin_routes
from imagegen_proxy.governance.auth import Principal
from imagegen_proxy.store import Store

ProjectsAPI = Any  # client.admin.organization.projects


class Admin:
    """A served admin API: its base URL, the SDK's clients for it, and its store's keys."""

    def __init__(self, url: str, store_url: str) -> None:
        self.url = url
        self.store_url = store_url
        self.client = openai.OpenAI(
            admin_api_key="sk-admin-x", api_key="unused", base_url=url + "/v1", max_retries=0
        )
        self.projects: ProjectsAPI = self.client.admin.organization.projects

    def async_projects(self) -> ProjectsAPI:
        client = openai.AsyncOpenAI(
            admin_api_key="sk-admin-x", api_key="unused", base_url=self.url + "/v1", max_retries=0
        )
        return client.admin.organization.projects

    def find(self, key: str) -> Principal | None:
        """Whom the store says `key` is, if it works now (what the proxy asks)."""
        digest = hashlib.sha256(key.encode()).digest()
        found: Principal | None = on_store(self.store_url, lambda store: store.find(digest))
        return found

    def post(self, path: str, content: bytes | str) -> httpx.Response:
        return httpx.post(self.url + "/v1/organization" + path, content=content)


@pytest.fixture
def admin(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Admin]:
    """The API on a SQLite store; `indirect` "postgresql": on a PostgreSQL one."""
    if getattr(request, "param", "sqlite") == "sqlite":
        store_url = f"sqlite:///{tmp_path}/s.db"
    else:
        store_url = create_database(request.getfixturevalue("postgres_url"))
    on_store(store_url, lambda store: store.upgrade())
    store = Store(store_url)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        await store.aclose()

    app = Starlette(
        routes=[Mount("/v1/organization", routes=admin_routes(store))], lifespan=lifespan
    )
    with serve(app) as url:
        yield Admin(url, store_url)


# What differs between the databases (upserts, joins, ordering) runs on both.
ON_BOTH_DATABASES = pytest.mark.parametrize("admin", ["sqlite", "postgresql"], indirect=True)


def listed_order(made: list[Any]) -> list[str]:
    """The ids of `made` in list order: by creation second, then by id (the store's project
    ids are random, so projects made within a second list in the order of their ids)."""
    return [item.id for item in sorted(made, key=lambda item: (item.created_at, item.id))]


def service_account_key(admin: Admin, project_id: str, **options: Any) -> tuple[str, str]:
    """A new service account's id and its key."""
    account = admin.projects.service_accounts.create(project_id, name="bot", **options)
    return account.id, account.api_key.value


# --- projects ------------------------------------------------------------------------------


def test_a_created_project_is_active_and_retrieved_by_id(admin: Admin) -> None:
    before = int(time.time())
    project = admin.projects.create(name="growth")
    assert project.object == "organization.project"
    assert project.id.startswith("proj_") and project.name == "growth"
    assert project.status == "active" and project.archived_at is None
    assert project.created_at >= before
    assert admin.projects.retrieve(project.id) == project


def test_projects_are_listed_without_archived_ones_unless_asked(
    admin: Admin,
) -> None:
    first = admin.projects.create(name="first")
    second = admin.projects.create(name="second")
    admin.projects.archive(first.id)
    assert [p.id for p in admin.projects.list()] == [second.id]
    every = {p.id: p.status for p in admin.projects.list(include_archived=True)}
    assert every == {first.id: "archived", second.id: "active"}


@ON_BOTH_DATABASES
def test_a_modified_project_keeps_the_limits_it_was_not_told_to_change(admin: Admin) -> None:
    project = admin.projects.create(
        name="growth", extra_body={"limits": {"requests_per_minute": 10, "images_per_day": 50}}
    )
    changed = admin.projects.update(
        project.id,
        name="growth-eu",
        extra_body={"limits": {"requests_per_minute": None, "max_concurrent": 2}},
    )
    assert changed.name == "growth-eu"
    assert changed.model_extra == {"limits": {"images_per_day": 50, "max_concurrent": 2}}
    assert admin.projects.retrieve(project.id) == changed


def test_an_archived_projects_keys_stop_working(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    _, key = service_account_key(admin, project.id)
    assert admin.find(key) is not None
    archived = admin.projects.archive(project.id)
    assert archived.status == "archived" and archived.archived_at is not None
    assert admin.find(key) is None


def test_an_archived_project_cannot_be_changed(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    admin.projects.archive(project.id)
    with pytest.raises(openai.BadRequestError, match="archived"):
        admin.projects.update(project.id, name="again")
    with pytest.raises(openai.BadRequestError, match="archived"):
        admin.projects.service_accounts.create(project.id, name="bot")


def test_two_active_projects_cannot_share_a_name(admin: Admin) -> None:
    admin.projects.create(name="growth")
    other = admin.projects.create(name="other")
    with pytest.raises(openai.BadRequestError, match="exists already"):
        admin.projects.create(name="growth")
    with pytest.raises(openai.BadRequestError, match="exists already"):
        admin.projects.update(other.id, name="growth")


# --- pagination ----------------------------------------------------------------------------


def test_a_list_pages_by_limit_and_after_and_says_whether_more_follow(admin: Admin) -> None:
    ids = listed_order([admin.projects.create(name=f"p{i}") for i in range(5)])
    page = admin.projects.list(limit=2)
    assert [p.id for p in page.data] == ids[:2]
    assert (page.first_id, page.last_id, page.has_more) == (ids[0], ids[1], True)
    last = admin.projects.list(limit=2, after=ids[2])
    assert [p.id for p in last.data] == ids[3:] and last.has_more is False
    assert admin.projects.list(after=ids[4]).data == []


@ON_BOTH_DATABASES
def test_the_sdks_auto_pagination_iterates_every_item(admin: Admin) -> None:
    ids = listed_order([admin.projects.create(name=f"p{i}") for i in range(7)])
    assert [p.id for p in admin.projects.list(limit=3)] == ids


def test_the_default_page_is_twenty_items(admin: Admin) -> None:
    for i in range(21):
        admin.projects.create(name=f"p{i}")
    page = admin.projects.list()
    assert len(page.data) == 20 and page.has_more is True


@pytest.mark.anyio
async def test_the_async_client_creates_and_pages_through_everything(admin: Admin) -> None:
    projects = admin.async_projects()
    project = await projects.create(name="growth")
    made = [await projects.service_accounts.create(project.id, name=f"b{i}") for i in range(5)]
    listed = [account.id async for account in projects.service_accounts.list(project.id, limit=2)]
    assert listed == [account.id for account in made]


# --- service accounts ----------------------------------------------------------------------


def test_a_new_service_accounts_key_is_shown_once_and_works(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    account = admin.projects.service_accounts.create(project.id, name="checkout")
    assert account.object == "organization.project.service_account"
    assert account.id.startswith("svc_acct_") and account.role == "member"
    key = account.api_key
    assert key.object == "organization.project.service_account.api_key"
    assert key.value.startswith("sk-igp-") and key.expires_at is None
    principal = admin.find(key.value)
    assert principal is not None and principal.project is not None
    assert principal.project.name == "growth"
    retrieved = admin.projects.service_accounts.retrieve(account.id, project_id=project.id)
    assert "api_key" not in retrieved.model_dump()  # never shown again
    listed = admin.projects.api_keys.retrieve(key.id, project_id=project.id)
    assert key.value not in listed.model_dump_json() and listed.redacted_value.endswith(
        key.value[-4:]
    )


def test_a_service_accounts_key_expires_in_the_seconds_asked(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    account = admin.projects.service_accounts.create(
        project.id, name="short", expires_in_seconds=3600
    )
    # Never before the seconds asked: the end is rounded up to a whole second.
    assert 0 <= account.api_key.expires_at - account.api_key.created_at - 3600 <= 1
    listed = admin.projects.api_keys.retrieve(account.api_key.id, project_id=project.id)
    assert listed.expires_at == account.api_key.expires_at


def test_a_service_account_alone_has_no_key(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    account = admin.projects.service_accounts.create(
        project.id, name="later", create_service_account_only=True
    )
    assert account.api_key is None and account.role == "none"
    assert list(admin.projects.api_keys.list(project.id)) == []


def test_service_accounts_are_listed_in_creation_order_within_their_project(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    other = admin.projects.create(name="other")
    made = [admin.projects.service_accounts.create(project.id, name=n) for n in ("a", "b")]
    admin.projects.service_accounts.create(other.id, name="c")
    listed = list(admin.projects.service_accounts.list(project.id))
    assert [(a.id, a.name, a.role) for a in listed] == [(a.id, a.name, "member") for a in made]
    found = admin.projects.service_accounts.retrieve(made[1].id, project_id=project.id)
    assert (found.id, found.name, found.created_at) == (made[1].id, "b", made[1].created_at)
    with pytest.raises(openai.NotFoundError):
        admin.projects.service_accounts.retrieve(made[0].id, project_id=other.id)


@ON_BOTH_DATABASES
def test_a_deleted_service_account_is_gone_and_its_key_stops_working(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    account_id, key = service_account_key(admin, project.id)
    deleted = admin.projects.service_accounts.delete(account_id, project_id=project.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (
        account_id,
        True,
        "organization.project.service_account.deleted",
    )
    assert admin.find(key) is None
    assert list(admin.projects.service_accounts.list(project.id)) == []
    assert list(admin.projects.api_keys.list(project.id)) == []
    with pytest.raises(openai.NotFoundError):
        admin.projects.service_accounts.retrieve(account_id, project_id=project.id)


# --- a project's API keys ------------------------------------------------------------------


@ON_BOTH_DATABASES
def test_a_projects_keys_are_listed_with_their_owning_service_account(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    account = admin.projects.service_accounts.create(project.id, name="checkout")
    on_store(admin.store_url, lambda store: store.create_key("cli-made", project=project.id))
    keys = list(admin.projects.api_keys.list(project.id))
    assert [k.object for k in keys] == ["organization.project.api_key"] * 2
    owned, cli_made = sorted(keys, key=lambda k: k.owner.type is None)
    assert owned.id == account.api_key.id and owned.owner_project_access == "active"
    assert owned.owner.type == "service_account" and owned.owner.service_account is not None
    assert (owned.owner.service_account.id, owned.owner.service_account.name) == (
        account.id,
        "checkout",
    )
    assert cli_made.name == "cli-made" and cli_made.owner.type is None
    assert admin.projects.api_keys.retrieve(owned.id, project_id=project.id) == owned


def test_a_deleted_key_stops_working_and_its_service_account_stays(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    account = admin.projects.service_accounts.create(project.id, name="checkout")
    deleted = admin.projects.api_keys.delete(account.api_key.id, project_id=project.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (
        account.api_key.id,
        True,
        "organization.project.api_key.deleted",
    )
    assert admin.find(account.api_key.value) is None
    with pytest.raises(openai.NotFoundError):
        admin.projects.api_keys.retrieve(account.api_key.id, project_id=project.id)
    assert admin.projects.service_accounts.retrieve(account.id, project_id=project.id)


# --- rate limits, model permissions, spend limit -------------------------------------------


@ON_BOTH_DATABASES
def test_a_models_rate_limit_is_made_by_its_first_update_and_then_changed(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    rate_limits = admin.projects.rate_limits
    made = rate_limits.update_rate_limit(
        "rl-gpt-image-1", project_id=project.id, max_requests_per_1_minute=5
    )
    assert (made.id, made.object, made.model) == (
        "rl-gpt-image-1",
        "project.rate_limit",
        "gpt-image-1",
    )
    assert (made.max_requests_per_1_minute, made.max_images_per_1_minute) == (5, None)
    changed = rate_limits.update_rate_limit(
        "rl-gpt-image-1", project_id=project.id, max_images_per_1_minute=20
    )
    assert (changed.max_requests_per_1_minute, changed.max_images_per_1_minute) == (5, 20)
    rate_limits.update_rate_limit("rl-dall-e-3", project_id=project.id, max_images_per_1_minute=2)
    listed = list(rate_limits.list_rate_limits(project.id))
    assert [r.id for r in listed] == ["rl-dall-e-3", "rl-gpt-image-1"]
    assert listed[1] == changed


def test_rate_limits_page_backwards_before_an_id(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    rate_limits = admin.projects.rate_limits
    for model in ("a", "b", "c"):
        rate_limits.update_rate_limit(f"rl-{model}", project_id=project.id)
    page = rate_limits.list_rate_limits(project.id, before="rl-c", limit=1)
    assert [r.id for r in page.data] == ["rl-b"] and page.has_more is True
    assert [r.id for r in rate_limits.list_rate_limits(project.id, before="rl-b")] == ["rl-a"]


def test_an_allow_list_is_the_projects_models(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    _, key = service_account_key(admin, project.id)
    permissions = admin.projects.model_permissions
    set_ = permissions.update(project.id, mode="allow_list", model_ids=["gpt-image-1", "dall-e-3"])
    assert (set_.object, set_.mode, set_.api_model_ids) == (
        "project.model_permissions",
        "allow_list",
        ["dall-e-3", "gpt-image-1"],
    )
    assert permissions.retrieve(project.id) == set_
    principal = admin.find(key)
    assert principal is not None and principal.project is not None
    assert principal.project.policy.models == frozenset({"dall-e-3", "gpt-image-1"})
    assert principal.project.policy.denied_models is None


def test_a_deny_list_is_the_projects_denied_models(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    _, key = service_account_key(admin, project.id)
    permissions = admin.projects.model_permissions
    permissions.update(project.id, mode="allow_list", model_ids=["gpt-image-1"])
    set_ = permissions.update(project.id, mode="deny_list", model_ids=["dall-e-2"])
    assert (set_.mode, set_.api_model_ids) == ("deny_list", ["dall-e-2"])
    principal = admin.find(key)
    assert principal is not None and principal.project is not None
    assert principal.project.policy.models is None
    assert principal.project.policy.denied_models == frozenset({"dall-e-2"})


def test_deleted_model_permissions_allow_every_model(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    permissions = admin.projects.model_permissions
    permissions.update(project.id, mode="allow_list", model_ids=["gpt-image-1"])
    deleted = permissions.delete(project.id)
    assert (deleted.object, deleted.deleted) == ("project.model_permissions.deleted", True)
    read = permissions.retrieve(project.id)
    assert (read.mode, read.api_model_ids) == ("deny_list", [])
    assert admin.projects.retrieve(project.id).model_extra == {"limits": {}}


def test_a_spend_limit_is_the_projects_monthly_budget_until_deleted(admin: Admin) -> None:
    project = admin.projects.create(name="growth")
    _, key = service_account_key(admin, project.id)
    spend = admin.projects.spend_limit
    assert spend.retrieve(project.id).enforcement.status == "inactive"
    set_ = spend.update(project.id, currency="USD", interval="month", threshold_amount=2550)
    assert (set_.object, set_.threshold_amount, set_.currency, set_.interval) == (
        "project.spend_limit",
        2550,
        "USD",
        "month",
    )
    assert set_.enforcement.status == "enforcing"
    assert spend.retrieve(project.id) == set_
    principal = admin.find(key)
    assert principal is not None and principal.project is not None
    assert principal.project.policy.budget_usd == 25.5
    deleted = spend.delete(project.id)
    assert (deleted.object, deleted.deleted) == ("project.spend_limit.deleted", True)
    read = spend.retrieve(project.id)
    assert (read.threshold_amount, read.enforcement.status) == (0, "inactive")


# --- the gateway's own limits ----------------------------------------------------------------


@ON_BOTH_DATABASES
def test_limits_travel_in_extra_body_to_the_project_and_the_service_accounts_key(
    admin: Admin,
) -> None:
    project = admin.projects.create(
        name="growth", extra_body={"limits": {"images_per_minute": 30, "budget_usd": 100}}
    )
    assert project.model_extra == {"limits": {"images_per_minute": 30, "budget_usd": 100.0}}
    account = admin.projects.service_accounts.create(
        project.id,
        name="bot",
        extra_body={"limits": {"requests_per_minute": 6, "models": ["gpt-image-1"]}},
    )
    own = {"requests_per_minute": 6, "models": ["gpt-image-1"]}
    assert account.model_extra is not None and account.model_extra["limits"] == own
    retrieved = admin.projects.service_accounts.retrieve(account.id, project_id=project.id)
    assert retrieved.model_extra == {"limits": own}
    principal = admin.find(account.api_key.value)
    assert principal is not None and principal.project is not None
    assert principal.policy.requests_per_minute == 6
    assert principal.policy.models == frozenset({"gpt-image-1"})
    assert principal.project.policy.images_per_minute == 30


# --- refusals --------------------------------------------------------------------------------


def unknown_id_calls(projects: ProjectsAPI, real: str) -> list[Callable[[], Any]]:
    return [
        lambda: projects.retrieve("proj_nope"),
        lambda: projects.update("proj_nope", name="x"),
        lambda: projects.archive("proj_nope"),
        lambda: projects.service_accounts.create("proj_nope", name="x"),
        lambda: projects.service_accounts.list("proj_nope"),
        lambda: projects.service_accounts.retrieve("svc_acct_nope", project_id=real),
        lambda: projects.service_accounts.delete("svc_acct_nope", project_id=real),
        lambda: projects.api_keys.list("proj_nope"),
        lambda: projects.api_keys.retrieve("key_nope", project_id=real),
        lambda: projects.api_keys.delete("key_nope", project_id=real),
        lambda: projects.rate_limits.list_rate_limits("proj_nope"),
        lambda: projects.rate_limits.update_rate_limit("no-prefix", project_id=real),
        lambda: projects.model_permissions.retrieve("proj_nope"),
        lambda: projects.spend_limit.delete("proj_nope"),
    ]


def test_every_unknown_id_is_a_404_in_openais_envelope(admin: Admin) -> None:
    real = admin.projects.create(name="growth").id
    for call in unknown_id_calls(admin.projects, real):
        with pytest.raises(openai.NotFoundError) as caught:
            call()
        error = caught.value
        assert error.type == "invalid_request_error" and error.code is None
        assert isinstance(error.body, dict) and set(error.body) == {
            "message",
            "type",
            "param",
            "code",
        }


BAD_REQUESTS: dict[str, tuple[Callable[[ProjectsAPI, str], Any], str | None]] = {
    "empty name": (lambda p, real: p.create(name=""), "name"),
    "name not a string": (lambda p, real: p.create(name="x", extra_body={"name": 5}), "name"),
    "unsupported argument": (lambda p, real: p.create(name="x", geography="eu"), "geography"),
    "unknown limit": (
        lambda p, real: p.create(name="x", extra_body={"limits": {"rpm": 1}}),
        "limits.rpm",
    ),
    "limit out of range": (
        lambda p, real: p.update(real, extra_body={"limits": {"requests_per_minute": 0}}),
        "limits.requests_per_minute",
    ),
    "page too long": (lambda p, real: p.list(limit=101), "limit"),
    "page length not a number": (lambda p, real: p.list(extra_query={"limit": "x"}), "limit"),
    "unknown cursor": (lambda p, real: p.list(after="proj_nope"), "after"),
    "no lifetime": (
        lambda p, real: p.service_accounts.create(real, name="x", expires_in_seconds=0),
        "expires_in_seconds",
    ),
    "key options without a key": (
        lambda p, real: p.service_accounts.create(
            real, name="x", create_service_account_only=True, expires_in_seconds=60
        ),
        None,
    ),
    "no requests a minute": (
        lambda p, real: p.rate_limits.update_rate_limit(
            "rl-gpt-image-1", project_id=real, max_requests_per_1_minute=0
        ),
        "max_requests_per_1_minute",
    ),
    "a limit the gateway does not keep": (
        lambda p, real: p.rate_limits.update_rate_limit(
            "rl-gpt-image-1", project_id=real, max_tokens_per_1_minute=10
        ),
        "max_tokens_per_1_minute",
    ),
    "unknown mode": (
        lambda p, real: p.model_permissions.update(real, mode="both", model_ids=[]),
        "mode",
    ),
    "another currency": (
        lambda p, real: p.spend_limit.update(
            real, currency="EUR", interval="month", threshold_amount=100
        ),
        "currency",
    ),
    "a budget of more than a billion dollars": (
        lambda p, real: p.update(real, extra_body={"limits": {"budget_usd": 1e308}}),
        "limits.budget_usd",
    ),
    "a spend limit of more than a billion dollars": (
        lambda p, real: p.spend_limit.update(
            real, currency="USD", interval="month", threshold_amount=10**11 + 1
        ),
        "threshold_amount",
    ),
    "amount as a string": (
        lambda p, real: p.spend_limit.update(
            real, currency="USD", interval="month", threshold_amount="100"
        ),
        "threshold_amount",
    ),
}


@pytest.mark.parametrize(("call", "param"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_request_is_a_400_that_names_the_parameter(
    admin: Admin, call: Callable[[ProjectsAPI, str], Any], param: str | None
) -> None:
    real = admin.projects.create(name="growth").id
    with pytest.raises(openai.BadRequestError) as caught:
        call(admin.projects, real)
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert caught.value.message and caught.value.code is None


@ON_BOTH_DATABASES
def test_text_the_database_cannot_keep_is_refused_rather_than_failing(admin: Admin) -> None:
    real = admin.projects.create(name="growth").id
    with pytest.raises(openai.BadRequestError) as caught:
        admin.projects.create(name="a\x00b")
    assert caught.value.param == "name" and "control characters" in caught.value.message
    with pytest.raises(openai.BadRequestError):
        admin.projects.service_accounts.create(real, name="x" * 161)
    with pytest.raises(openai.NotFoundError):
        admin.projects.retrieve("proj_\x00")
    with pytest.raises(openai.NotFoundError):
        admin.projects.api_keys.retrieve("key_" + "0" * 100, project_id=real)
    with pytest.raises(openai.NotFoundError):
        admin.projects.rate_limits.update_rate_limit("rl-" + "m" * 201, project_id=real)
    with pytest.raises(openai.BadRequestError):
        admin.projects.rate_limits.update_rate_limit(
            "rl-gpt-image-1", project_id=real, max_requests_per_1_minute=2**63
        )
    with pytest.raises(openai.BadRequestError):
        admin.projects.spend_limit.update(
            real, currency="USD", interval="month", threshold_amount=10**400
        )


@pytest.mark.parametrize("number", [b"Infinity", b"-Infinity", b"NaN", b"1e400"])
def test_a_budget_that_is_not_a_finite_number_is_refused_and_nothing_is_saved(
    admin: Admin, number: bytes
) -> None:
    # The SDK cannot send these (its JSON encoder refuses them); other clients can.
    body = b'{"name": "x", "limits": {"budget_usd": ' + number + b"}}"
    answer = admin.post("/projects", body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "limits.budget_usd" and "finite" in error["message"]
    assert list(admin.projects.list()) == []  # nothing half-made that lists as a 500 later


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", '{"name": "\u00e9"'.encode()])
def test_a_body_that_is_not_a_json_object_is_a_400(admin: Admin, body: bytes) -> None:
    answer = admin.post("/projects", body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"


def test_a_method_the_path_does_not_take_is_a_405_in_openais_envelope(admin: Admin) -> None:
    answer = httpx.delete(admin.url + "/v1/organization/projects")
    assert answer.status_code == 405 and answer.headers["allow"] == "GET, POST"
    assert answer.json()["error"]["code"] == "method_not_allowed"
