"""The console in a real browser: headless Chromium from the system packages, driven by
Playwright, against the bundled command (a store, the embedded mock upstream, an admin key).

Screenshots of every page go to `$IMAGEGEN_CONSOLE_SHOTS` (default: a temporary folder
the run prints); the README's two are its `overview.png` and `playground.png`, copied to
`docs/console-overview.png` and `docs/console-playground.png`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from otlp_receiver import otlp_http
from support import on_store
from test_cli import running

from imagegen_proxy.console.throttle import SignInThrottle
from imagegen_proxy.generation import Generation
from imagegen_proxy.observe.activity import LATEST, Activity
from imagegen_proxy.store import Store
from imagegen_proxy.store.ledger import usage_lines

playwright = pytest.importorskip("playwright.sync_api")

ADMIN = "sk-admin-console-0123456789"
CONFIG_KEY = "sk-config-bot-0123456789"
PAGES = ["/", "/spend", "/spend.csv", "/keys", "/requests", "/requests/pxy_x.json", "/playground"]
# Generous: a page of the console answers in milliseconds, a mock generation in a second.
WAIT_MS = 30_000


@dataclass
class Console:
    url: str  # the proxy
    base: str  # the console
    store: str
    banner: str
    shots: Path


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    folder = tmp_path_factory.mktemp("console")
    config = folder / "proxy.toml"
    store = f"sqlite:///{folder}/proxy.db"
    config.write_text(
        f'[admin]\nkey = "{ADMIN}"\n'
        f'[store]\nurl = "{store}"\ncache_seconds = 0\n'
        "[mock]\ndelay = 0.2\n"  # partial images a moment apart, as real ones are
        f'[storage]\nurl = "{(folder / "images").as_uri()}"\n'  # kept images: thumbnails
        # The configuration's own, listed beside the store's (read-only).
        '[[projects]]\nname = "config-team"\nimages_per_day = 100\n'
        f'[[keys]]\nname = "config-bot"\nkey = "{CONFIG_KEY}"\nproject = "config-team"\n'
        'budget_usd = 3\nbudget_period = "week"\nmodels = ["gpt-image-1"]\n'
    )
    shots = Path(os.environ.get("IMAGEGEN_CONSOLE_SHOTS") or folder / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    print(f"console screenshots: {shots}")
    with otlp_http() as collector:  # traced: the Requests page shows the trace ids
        with config.open("a") as settings:
            settings.write(f'[tracing]\nenabled = true\nendpoint = "{collector.url}"\n')
        with running("--config", str(config)) as (url, banner):
            yield Console(url, url + "/console", store, banner, shots)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as driver:
        # As root, in a closed network: no sandbox, and no calls home at start-up.
        launched = driver.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def sign_in(page: Any, console: Console) -> None:
    page.goto(console.base + "/")
    page.fill("#key", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Overview')")


def ledger_micros(console: Console, start: int, end: int) -> int:
    """What the ledger says was spent in [start, end), read in a thread of its own (an
    event loop beside Playwright's)."""

    async def total(store: Store) -> int:
        return sum(line.cost_micros for line in await usage_lines(store, start, end))

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return int(pool.submit(on_store, console.store, total).result())


def create_key(page: Any, console: Console, name: str, project: str | None = None) -> str:
    """A key made through the Projects and keys page; the key as shown once."""
    page.goto(console.base + "/keys")
    form = page.locator("#new-key-form")
    form.locator("input[name=name]").fill(name)
    if project is not None:
        form.locator("select[name=project]").select_option(label=project)
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#new-key, [role=alert]")
    assert page.locator("[role=alert]").count() == 0, page.locator("[role=alert]").inner_text()
    secret = str(page.locator("#new-key").input_value())
    assert secret.startswith("sk-")
    return secret


def test_signed_out_every_page_sends_you_to_sign_in(console: Console, page: Any) -> None:
    with httpx.Client(follow_redirects=False) as client:
        for path in PAGES:
            answer = client.get(console.base + path)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/console/signin?next=/console")
        for path in ["/keys/new", "/keys/projects", "/keys/key_x/revoke", "/signout"]:
            answer = client.post(console.base + path, data={"name": "x", "csrf": "x"})
            assert answer.status_code in (303, 403), path
            assert answer.status_code == 403 or "/signin" in answer.headers["location"]
    page.goto(console.base + "/keys")
    assert page.locator("h1").inner_text() == "Sign in"
    assert "/console/signin?next=/console/keys" in page.url


def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(
    console: Console, page: Any
) -> None:
    page.goto(console.base + "/")
    page.fill("#key", "sk-not-the-admin-key")
    page.click("button[type=submit]")
    assert page.locator("[role=alert]").inner_text() == "That is not the admin key."
    page.fill("#key", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector("h1:text('Overview')")
    [cookie] = page.context.cookies()
    assert cookie["name"] == "imagegen_console"
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["path"] == "/console" and ADMIN not in cookie["value"]
    page.click("text=Sign out")
    page.wait_for_selector("h1:text('Sign in')")
    page.goto(console.base + "/spend")
    assert page.locator("h1").inner_text() == "Sign in"


def test_a_form_post_without_the_token_is_refused(console: Console, page: Any) -> None:
    sign_in(page, console)
    for form in ({"name": "forged"}, {"name": "forged", "csrf": "made-up"}):
        answer = page.request.post(console.base + "/keys/projects", form=form)
        assert answer.status == 403
        assert "stale or forged" in answer.text()
    page.goto(console.base + "/keys")
    assert page.locator("#projects tr[data-project=forged]").count() == 0
    headers = page.request.get(console.base + "/keys").headers
    assert headers["cache-control"] == "no-store" and headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_the_operators_journey(console: Console, page: Any) -> None:
    started = int(datetime.now(UTC).timestamp())
    sign_in(page, console)
    page.goto(console.base + "/keys")
    new = page.locator("#new-project")
    page.click("text=New project")
    new.locator("input[name=name]").fill("growth")
    new.locator("input[name=budget_usd]").fill("5")
    new.locator("button[type=submit]").click()
    page.wait_for_selector("#projects tr[data-project=growth]")
    secret = create_key(page, console, "checkout-bot", project="growth")
    page.screenshot(path=console.shots / "keys.png", full_page=True)
    page.goto(console.base + "/keys")
    assert secret not in page.content()  # shown once: masked after
    assert page.locator("#keys tr[data-key=checkout-bot]").get_attribute("data-state") == "active"

    sdk = openai.OpenAI(base_url=console.url + "/v1", api_key=secret, max_retries=0)
    ids = []
    for n, size in ((1, "1024x1024"), (2, "1024x1536")):
        raw = sdk.images.with_raw_response.generate(
            model="gpt-image-1", prompt="a lighthouse", n=n, size=size
        )
        assert len(raw.parse().data or []) == n
        ids.append(raw.headers["x-imagegen-request-id"])
    for request_id in ids:  # the ledger writes in the background: this waits for it
        line = page.request.get(f"{console.base}/requests/{request_id}.json").json()
        assert line["images"] in (1, 2) and line["cost_usd"] > 0

    page.goto(console.base + "/")
    assert int(page.locator("#today-images").inner_text()) >= 3
    assert int(page.locator("#today-requests").inner_text()) >= 2
    assert page.locator("#in-flight").inner_text() == "0"
    assert page.locator("#upstreams tr[data-upstream=openai] .state").inner_text() == "up"
    page.screenshot(path=console.shots / "overview.png", full_page=True)

    today = str(datetime.now(UTC).date())
    page.goto(f"{console.base}/spend?start={today}&end={today}&by=project")
    day = started - started % 86400
    spent = ledger_micros(console, day, day + 86400)
    chart = page.locator("figure.chart svg")
    assert int(chart.get_attribute("data-total-micros")) == spent > 0
    assert int(page.locator("#spend-total").get_attribute("data-micros")) == spent
    bars = page.locator("rect.bar[data-series=growth]")
    assert sum(int(bars.nth(i).get_attribute("data-micros")) for i in range(bars.count())) > 0
    page.screenshot(path=console.shots / "spend.png", full_page=True)
    download = page.request.get(f"{console.base}/spend.csv?start={today}&end={today}&by=key")
    rows = list(csv.DictReader(io.StringIO(download.text())))
    assert round(sum(float(row["cost_usd"]) for row in rows) * 1_000_000) == spent
    assert "checkout-bot" in {row["key"] for row in rows}

    page.goto(console.base + "/requests?key=checkout-bot")
    assert page.locator("#requests tbody tr").count() == 2
    page.click(f"#requests a[href*='{ids[0]}']")
    assert page.locator("#requests tbody tr").count() == 1
    assert page.locator(f"#requests tr[id='{ids[0]}']").count() == 1
    page.goto(console.base + "/requests?key=checkout-bot")
    page.screenshot(path=console.shots / "requests.png", full_page=True)

    page.goto(console.base + "/keys")
    page.locator("#keys tr[data-key=checkout-bot] button:text('Revoke')").click()
    page.wait_for_selector("#keys tr[data-key=checkout-bot][data-state=revoked]")
    with pytest.raises(openai.AuthenticationError):
        sdk.images.generate(prompt="after the revocation")


def test_the_playground_paints_a_partial_image_before_the_final_one(
    console: Console, page: Any
) -> None:
    sign_in(page, console)
    secret = create_key(page, console, "playground")
    page.goto(console.base + "/playground")
    offered = page.locator("select[name=model] option").all_inner_texts()
    assert "gpt-image-2.6-sunburst" in offered and "gpt-image-1" not in offered  # shut down
    assert page.locator("select[name=model]").input_value() == "gpt-image-2.6-sunburst"
    page.fill("input[name=key]", secret)
    page.select_option("select[name=partial_images]", "2")
    page.click("button:text('Generate')")
    page.wait_for_selector("#events li[data-kind=completed]")
    kinds = page.locator("#events li").evaluate_all("items => items.map(i => i.dataset.kind)")
    assert kinds == ["partial", "partial", "completed"]
    image = page.locator("#image")
    assert image.get_attribute("data-kind") == "final"
    assert image.evaluate("img => img.complete && img.naturalWidth") > 0
    page.wait_for_selector("#cost:text('Cost: ')")  # exact: "$0.04356"
    assert float(page.locator("#cost").get_attribute("data-cost-usd")) > 0
    page.screenshot(path=console.shots / "playground.png", full_page=True)


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("budget_usd", "inf", "finite"),
        ("budget_usd", "1e308", "less than or equal"),
        ("requests_per_minute", "1e308", "less than or equal"),
        ("expires_days", "1e12", "lifetime"),
        ("expires_days", "-1", "lifetime"),
    ],
)
def test_numbers_the_store_cannot_keep_are_refused_on_the_keys_page(
    console: Console, page: Any, field: str, value: str, said: str
) -> None:
    sign_in(page, console)
    page.goto(console.base + "/keys")
    form = page.locator("#new-key-form")
    form.locator("input[name=name]").fill(f"hostile-{field}")
    box = form.locator(f"input[name={field}]")
    box.evaluate("input => { input.type = 'text'; }")  # what a hand-made POST can send
    box.fill(value)
    form.locator("button[type=submit]").click()
    page.wait_for_selector("#new-key, [role=alert]")
    assert said in page.locator("[role=alert]").inner_text()
    listing = page.goto(console.base + "/keys")
    assert listing is not None and listing.status == 200  # no row was saved to break it
    assert f"hostile-{field}" not in page.content()


def signin_from(console: Console, address: str, key: str) -> httpx.Response:
    """A sign-in posted from the loopback `address` (each test its own: the console's
    other tests sign in from 127.0.0.1)."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, follow_redirects=False) as client:
        form = client.get(console.base + "/signin").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        return client.post(console.base + "/signin", data={"key": key, "csrf": csrf[1]})


def test_wrong_keys_at_sign_in_are_slowed_per_address_without_locking_others_out(
    console: Console,
) -> None:
    answers = [signin_from(console, "127.0.0.3", f"sk-guess-{i}") for i in range(5)]
    assert [answer.status_code for answer in answers] == [401] * 5
    slowed = signin_from(console, "127.0.0.3", ADMIN)  # even the right key waits its turn
    assert slowed.status_code == 429 and "Too many wrong keys" in slowed.text
    assert 1 <= int(slowed.headers["retry-after"]) <= 60
    assert signin_from(console, "127.0.0.4", ADMIN).status_code == 303  # the operator


def test_the_no_config_mode_opens_the_console_on_loopback(tmp_path: Path) -> None:
    with running(cwd=tmp_path, lines=7) as (url, banner):
        assert f"the console: {url}/console/ (open on loopback)" in banner
        overview = httpx.get(url + "/console/")
        assert overview.status_code == 200 and "<h1>Overview</h1>" in overview.text
        assert "Sign out" not in overview.text


def test_the_sign_in_throttle_lets_an_address_try_again_as_its_window_slides() -> None:
    now = [1000.0]
    throttle = SignInThrottle(lambda: now[0])
    for _ in range(4):
        throttle.failed("10.0.0.1")
    assert throttle.wait("10.0.0.1") == 0  # four wrong keys: a fifth try is allowed
    throttle.failed("10.0.0.1")
    assert throttle.wait("10.0.0.1") == 60.0 and throttle.wait("10.0.0.2") == 0
    now[0] += 30
    assert throttle.wait("10.0.0.1") == 30.0
    now[0] += 30.5
    assert throttle.wait("10.0.0.1") == 0  # slowed, never locked out
    throttle.failed("10.0.0.1")
    throttle.succeeded("10.0.0.1")
    assert throttle.wait("10.0.0.1") == 0


# --- layout at 1,280 px, exact amounts, everything listed -------------------------------

FITS = """() => {
  const page = document.documentElement;
  const over = [...document.querySelectorAll("table")].filter(
    (table) => table.getBoundingClientRect().right > page.clientWidth + 0.5
      || table.scrollWidth > table.parentElement.clientWidth + 0.5).map((table) => table.id);
  // A date, a model, a code or a figure on one line: never broken mid-word or wrapped.
  const lines = (cell) => {
    const range = document.createRange();
    range.selectNodeContents(cell);
    return new Set([...range.getClientRects()].filter((r) => r.width > 0)
      .map((r) => Math.round(r.bottom))).size;
  };
  const broken = [...document.querySelectorAll("td.when, td.model, td.number, table code")]
    .filter((cell) => lines(cell) > 1).map((cell) => cell.textContent.trim());
  return {width: page.scrollWidth, window: page.clientWidth, over, broken};
}"""


def dollars_shown(text: str) -> int:
    """ "$1,234.04356" as micro-USD, exactly."""
    whole, _, fraction = text.strip().removeprefix("$").replace(",", "").partition(".")
    assert len(fraction) <= 6, text
    return int(whole) * 1_000_000 + int(fraction.ljust(6, "0"))


def test_every_page_fits_1280_px_shows_exact_amounts_and_lists_every_limit(
    console: Console, page: Any
) -> None:
    failed: list[str] = []
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else 0)
    sign_in(page, console)
    admin = openai.OpenAI(
        admin_api_key=ADMIN, api_key="unused", base_url=console.url + "/v1", max_retries=0
    )
    projects = admin.admin.organization.projects
    project = projects.create(name="layout")
    projects.model_permissions.update(
        project.id, mode="allow_list", model_ids=["gpt-image-1", "gpt-image-1-mini"]
    )
    projects.rate_limits.update_rate_limit(
        "rl-gpt-image-1", project_id=project.id, max_requests_per_1_minute=50
    )
    projects.rate_limits.update_rate_limit(
        "rl-gpt-image-1-mini", project_id=project.id, max_images_per_1_minute=7
    )
    secret = create_key(page, console, "a-rather-long-key-name-for-the-layout-test", "layout")
    sdk = openai.OpenAI(base_url=console.url + "/v1", api_key=secret, max_retries=0)
    for size, quality in (("1024x1024", "low"), ("1536x1024", "medium"), ("1024x1536", "high")):
        sdk.images.generate(model="gpt-image-1", prompt="a lighthouse", size=size, quality=quality)
    with pytest.raises(openai.PermissionDeniedError) as refused:  # not in the allow-list
        sdk.images.generate(model="dall-e-3", prompt="a lighthouse")
    refused_id = refused.value.response.headers["x-request-id"]  # the proxy's own
    page.request.get(f"{console.base}/requests/{refused_id}.json")  # flushes the ledger

    for path in ("/", "/spend", "/keys", "/requests", "/requests?key=" + secret[:3], "/playground"):
        page.goto(console.base + path)
        fits = page.evaluate(FITS)
        assert fits["width"] <= fits["window"], (path, fits)  # no horizontal scroll
        assert fits["over"] == [] and fits["broken"] == [], (path, fits)
    assert failed == []  # the favicon too: no 404 behind any page

    # Requests: every cost exact to the micro-dollar; the refusal listed, with its kind.
    page.goto(console.base + "/requests?key=a-rather-long-key-name-for-the-layout-test")
    costs = page.locator("#requests td.cost")
    assert costs.count() == 3
    for i in range(3):
        cell = costs.nth(i)
        assert dollars_shown(cell.inner_text()) == int(cell.get_attribute("data-micros"))
    row = page.locator(f"#refused tr[id='refused-{refused_id}']")
    assert row.get_attribute("data-kind") == "rejected: model_not_allowed"

    # Spend: the rows add up to the total shown, to the digit.
    today = str(datetime.now(UTC).date())
    page.goto(f"{console.base}/spend?start={today}&end={today}&by=key")
    shown = [
        dollars_shown(text)
        for text in page.locator("#spend tbody td[data-micros]").all_inner_texts()
    ]
    total = page.locator("#spend-total")
    assert (
        sum(shown) == dollars_shown(total.inner_text()) == int(total.get_attribute("data-micros"))
    )
    chart = page.locator("figure.chart svg").bounding_box()
    card = page.locator("figure.chart").bounding_box()
    assert chart is not None and card is not None and chart["width"] >= card["width"] - 20

    # The Overview's error counts lead to the requests behind them.
    page.goto(console.base + "/")
    page.click("#errors tr[data-kind='rejected: model_not_allowed'] a")
    page.wait_for_selector("#kind")
    kinds = page.locator("#refused tbody tr").evaluate_all("rows => rows.map(r => r.dataset.kind)")
    assert kinds and set(kinds) == {"rejected: model_not_allowed"}
    assert page.locator(f"#refused tr[id='refused-{refused_id}']").count() == 1

    # Projects and keys: permissions, per-model limits, and the configuration's entries.
    page.goto(console.base + "/keys")
    listed = page.locator("#projects tr[data-project=layout] td.limits")
    assert "only gpt-image-1, gpt-image-1-mini" in listed.inner_text()
    assert listed.locator(".per-model[data-model=gpt-image-1]").inner_text() == (
        "gpt-image-1: 50 requests/min"
    )
    assert listed.locator(".per-model[data-model=gpt-image-1-mini]").inner_text() == (
        "gpt-image-1-mini: 7 images/min"
    )
    configured = page.locator("#configured")
    assert configured.locator("tr[data-configured-project=config-team] td.limits").inner_text() == (
        "100 images/day"
    )
    bot = configured.locator("tr[data-configured-key=config-bot]")
    assert bot.locator("td.limits").inner_text() == "$3.00 a week · only gpt-image-1"
    assert CONFIG_KEY not in page.content()
    page.screenshot(path=console.shots / "keys-listed.png", full_page=True)


def test_the_latest_refusals_are_kept_one_by_one_newest_first_and_bounded() -> None:
    activity = Activity(clock=lambda: 1_800_000_000.0)
    for i in range(LATEST + 50):
        generation = Generation(
            form="openai", key=f"k{i}", model="gpt-image-1", prompt="secret prompt"
        )
        generation.outcome, generation.error, generation.status = (
            "limited",
            "rate_limit_exceeded",
            429,
        )
        activity.ended(generation)
    ok = Generation(form="openai", key="fine")
    activity.ended(ok)  # an answered request is not one of them
    latest = activity.latest()
    assert len(latest) == LATEST
    assert [one.key for one in latest[:2]] == [f"k{LATEST + 49}", f"k{LATEST + 48}"]
    assert {one.kind for one in latest} == {"limited: rate_limit_exceeded"}
    assert "secret prompt" not in repr(latest)
    assert activity.errors() == [("limited: rate_limit_exceeded", LATEST + 50)]


def test_requests_show_the_kept_images(page: Any, console: Console) -> None:
    sdk = openai.OpenAI(base_url=console.url + "/v1", api_key=CONFIG_KEY, max_retries=0)
    made = sdk.images.with_raw_response.generate(
        model="gpt-image-1", prompt="a lighthouse", size="64x64", response_format="url"
    )
    request_id = made.headers["x-imagegen-request-id"]
    sign_in(page, console)
    page.request.get(f"{console.base}/requests/{request_id}.json")  # flushes the ledger
    page.goto(f"{console.base}/requests?request_id={request_id}")
    thumb = page.locator(f"tr[id='{request_id}'] img.thumb")
    thumb.wait_for()
    # Loaded, not blocked (the console's CSP admits the store's origin) nor broken.
    page.wait_for_function(
        "(img) => img.complete && img.naturalWidth > 0", arg=thumb.element_handle()
    )
    assert thumb.get_attribute("src").startswith(console.url + "/v1/imagegen/files/")


def test_requests_show_their_trace_and_are_found_by_it(page: Any, console: Console) -> None:
    trace_id = "5b8efff798038103d269b633813fc60c"
    sdk = openai.OpenAI(base_url=console.url + "/v1", api_key=CONFIG_KEY, max_retries=0)
    made = sdk.images.with_raw_response.generate(
        model="gpt-image-1",
        prompt="a lighthouse",
        size="64x64",
        extra_headers={"traceparent": f"00-{trace_id}-eee19b7ec3c1b174-01"},
    )
    request_id = made.headers["x-imagegen-request-id"]
    sign_in(page, console)
    found = page.request.get(f"{console.base}/requests/{request_id}.json").json()
    assert found["trace_id"] == trace_id
    page.goto(f"{console.base}/requests?request_id={request_id}")
    link = page.locator(f"tr[id='{request_id}'] div.trace a")
    assert link.get_attribute("title") == trace_id  # the whole id; the page shows its start
    link.click()  # to that trace's requests
    page.wait_for_url(f"**/requests?trace_id={trace_id}")
    rows = page.locator("#requests tbody tr")
    assert rows.count() == 1 and rows.first.get_attribute("id") == request_id
    assert page.locator("input[name='trace_id']").input_value() == trace_id
