"""The Grafana dashboard in examples/: every metric it queries exists in the `/metrics` output."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import CLIENT_KEY
from double import UpstreamDouble, error_json
from prometheus_client.parser import text_string_to_metric_families
from support import serve, until
from test_cli import running

DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana" / "imagegen-proxy.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

METRIC = re.compile(r"\bimagegen_proxy_\w+")
SELECTOR = re.compile(r"\b(imagegen_proxy_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)\s*\"")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*(imagegen_proxy_\w+)\s*,\s*(\w+)\s*\)")
# The metrics with a key (and a project) label: every query of them honours the variables.
FILTERED = {
    "imagegen_proxy_requests_total": ("key",),
    "imagegen_proxy_images_total": ("key", "project"),
    "imagegen_proxy_cost_usd_total": ("key", "project"),
    "imagegen_proxy_relayed_bytes_total": ("key",),
    "imagegen_proxy_in_flight": ("key",),
    "imagegen_proxy_limited_total": ("key",),
}


def load() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those nested in (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every target's `expr` and every templating query."""
    found = [
        target["expr"]
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def used_labels(expr: str) -> dict[str, set[str]]:
    """The labels each metric of `expr` must have: its own `{label=~...}` matchers, every
    `by (...)`/`without (...)` label of the expression, and `label_values(metric, label)`."""
    grouping = {
        label.strip()
        for labels in GROUPING.findall(expr)
        for label in labels.split(",")
        if label.strip()
    }
    used: dict[str, set[str]] = {name: set(grouping) for name in METRIC.findall(expr)}
    for name, matchers in SELECTOR.findall(expr):
        used[name] |= set(MATCHER.findall(matchers))
    for name, label in LABEL_VALUES.findall(expr):
        used[name].add(label)
    return used


def wanted() -> dict[str, set[str]]:
    """Every metric (full sample name) the dashboard queries, with the labels it uses."""
    result: dict[str, set[str]] = {}
    for expr in queries(load()):
        for name, labels in used_labels(expr).items():
            result.setdefault(name, set()).update(labels)
    return result


def test_the_dashboard_is_well_formed() -> None:
    dashboard = load()
    assert dashboard["title"] == "imagegen-proxy" and dashboard["uid"] == "imagegen-proxy"
    assert dashboard["time"] == {"from": "now-6h", "to": "now"}
    assert dashboard["refresh"] == "30s"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("key", "project"):
        variable = variables[name]
        assert variable["type"] == "query" and variable["datasource"] == DATASOURCE
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"

    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    for panel in panels:
        assert panel.get("title") and panel.get("description"), panel["id"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["h"] > 0 and grid["y"] >= 0
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            expr = target["expr"]
            assert METRIC.search(expr), expr
            for metric in METRIC.findall(expr):
                for label in FILTERED.get(metric, ()):
                    assert f'{label}=~"${label}"' in expr, expr

    # Every metric the proxy exports has a panel (the scrape test below proves that each
    # of these names, and the labels queried, exist).
    assert set(wanted()) == {
        "imagegen_proxy_requests_total",
        "imagegen_proxy_images_total",
        "imagegen_proxy_cost_usd_total",
        "imagegen_proxy_upstream_ttfb_seconds_bucket",
        "imagegen_proxy_upstream_duration_seconds_bucket",
        "imagegen_proxy_upstream_duration_seconds_count",
        "imagegen_proxy_relayed_bytes_total",
        "imagegen_proxy_in_flight",
        "imagegen_proxy_limited_total",
        "imagegen_proxy_upstream_errors_total",
        "imagegen_proxy_failovers_total",
        "imagegen_proxy_upstream_state",
    }


def test_the_label_extraction_sees_matchers_and_groupings() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (le, upstream) (rate(imagegen_proxy_upstream_ttfb_"
        'seconds_bucket{upstream!="x", key=~"$key"}[$__rate_interval])))'
    )
    assert used_labels(expr) == {
        "imagegen_proxy_upstream_ttfb_seconds_bucket": {"le", "upstream", "key"}
    }
    assert used_labels("label_values(imagegen_proxy_requests_total, key)") == {
        "imagegen_proxy_requests_total": {"key"}
    }


@pytest.fixture
def upstreams() -> Iterator[tuple[UpstreamDouble, UpstreamDouble]]:
    """`busy` answers every request 503; `spare` answers with an image."""
    with contextlib.ExitStack() as stack:
        busy, spare = UpstreamDouble(), UpstreamDouble()
        busy.answer = error_json(
            503, {"message": "busy", "type": "server_error", "param": None, "code": None}
        )
        for double in (busy, spare):
            double.url = stack.enter_context(serve(double))
        yield busy, spare


def scrape_labels(text: str) -> dict[str, set[str]]:
    """Each sample name in a scrape, with the label names its samples carry."""
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def requests_counted(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "imagegen_proxy_requests_total"
    )


def test_every_metric_the_dashboard_queries_is_in_the_scrape(
    upstreams: tuple[UpstreamDouble, UpstreamDouble], tmp_path: Path
) -> None:
    busy, spare = upstreams
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[[projects]]\nname = "growth"\n'
        f'[[keys]]\nname = "team-a"\nkey = "{CLIENT_KEY}"\nproject = "growth"\n'
        "requests_per_minute = 2\n"  # the third request is refused: limited_total
        # busy serves dall-e-2 alone, and is tried first for gpt-image-1.
        f'[[upstreams]]\nname = "busy"\nkind = "openai"\nbase_url = "{busy.url}/v1"\n'
        'api_key = "k"\nmodels = ["gpt-image-1", "dall-e-2"]\n'
        f'[[upstreams]]\nname = "spare"\nkind = "openai"\nbase_url = "{spare.url}/v1"\n'
        'api_key = "k"\npriority = 2\nmodels = ["gpt-image-1"]\n'
        "[metrics]\nenabled = true\n[server]\nops_port = 0\n"
    )
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    with running("--config", str(config), lines=7) as (url, banner), httpx.Client() as client:
        ops = banner.split("Operations (/healthz details, metrics) on ", 1)[1].split()[0]

        def generate(model: str) -> int:
            answer = client.post(
                url + "/v1/images/generations",
                json={"prompt": "p", "model": model},
                headers=headers,
            )
            return answer.status_code

        # busy's 503 fails over to spare, which answers: failovers_total{reason="503"},
        # and spare's image counts in images, cost (gpt-image-1 is priced), bytes, in_flight
        # and the upstream histograms.
        assert generate("gpt-image-1") == 200
        # Only busy serves dall-e-2, so its 503 is the final answer: upstream_errors_total.
        assert generate("dall-e-2") == 503
        # Over requests_per_minute: limited_total.
        assert generate("gpt-image-1") == 429
        assert len(busy.requests) == 2 and len(spare.requests) == 1

        # A request's metrics are recorded just after its response ended: poll until all
        # three are in. Normally at once; 10 s only bounds a stalled proxy.
        scraped = ""

        def all_three_counted() -> bool:
            nonlocal scraped
            scraped = client.get(ops + "/metrics").text
            return requests_counted(scraped) == 3

        until(all_three_counted, within=10)

    exported = scrape_labels(scraped)
    for metric, labels in sorted(wanted().items()):
        assert metric in exported, f"{metric} is not in the scrape"
        missing = labels - exported[metric]
        assert not missing, f"{metric} has no label {sorted(missing)} in the scrape"
