"""The Spend page's SVG chart: exact totals, stacking, escaping of data, axes and legend."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from imagegen_proxy.console.chart import dollars, stacked_bars

SVG = "{http://www.w3.org/2000/svg}"
DAYS = ["2026-11-28", "2026-11-29", "2026-11-30"]
SERIES = {
    "growth": [1_234_567, 0, 50_000],
    "search": [400_000, 2_000_000, 0],
    "ops": [0, 0, 7],
}
HOSTILE = "<script>alert(1)</script>&\"'"


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def bars(root: ET.Element) -> list[ET.Element]:
    return [rect for rect in root.iter(f"{SVG}rect") if rect.get("class") == "bar"]


def texts(root: ET.Element, cls: str) -> list[ET.Element]:
    return [text for text in root.iter(f"{SVG}text") if text.get("class") == cls]


def test_the_root_carries_size_title_and_the_exact_total() -> None:
    root = parse(stacked_bars(DAYS, SERIES, title="Spend & more", width=800, height=300))
    assert root.get("viewBox") == "0 0 800 300"
    assert (root.get("width"), root.get("height"), root.get("role")) == ("800", "300", "img")
    assert root.findtext(f"{SVG}title") == "Spend & more"
    assert "Spend & more" in (root.get("aria-label") or "")
    total = sum(sum(values) for values in SERIES.values())
    assert root.get("data-total-micros") == str(total) == "3684574"
    assert sum(int(rect.get("data-micros", "")) for rect in bars(root)) == total


def test_one_bar_per_non_zero_value_stacked_in_series_order() -> None:
    root = parse(stacked_bars(DAYS, SERIES))
    found = [(rect.get("data-day"), rect.get("data-series")) for rect in bars(root)]
    expected = [
        (day, name) for i, day in enumerate(DAYS) for name, values in SERIES.items() if values[i]
    ]
    assert sorted(found) == sorted(expected)
    first_day = [rect for rect in bars(root) if rect.get("data-day") == DAYS[0]]
    growth, search = sorted(first_day, key=lambda rect: -float(rect.get("y", "")))
    assert (growth.get("data-series"), search.get("data-series")) == ("growth", "search")
    # Stacked: the upper bar ends where the lower one begins.
    assert float(search.get("y", "")) + float(search.get("height", "")) == pytest.approx(
        float(growth.get("y", "")), abs=0.02
    )
    assert growth.findtext(f"{SVG}title") == "growth · 2026-11-28: $1.234567"


def test_the_tallest_day_is_in_proportion_to_the_top_tick() -> None:
    root = parse(stacked_bars(DAYS, SERIES))
    ticks = [int(tick.get("data-micros", "")) for tick in texts(root, "tick")]
    assert ticks == [0, 500_000, 1_000_000, 1_500_000, 2_000_000]
    grid = [float(line.get("y1", "")) for line in root.iter(f"{SVG}line")]
    assert len(grid) == len(ticks)
    day = [rect for rect in bars(root) if rect.get("data-day") == DAYS[1]]
    assert len(day) == 1  # only "search" spent on the 29th: $2.00, the largest day
    # The $2.00 bar spans exactly from the $0.00 line to the $2.00 line.
    assert float(day[0].get("y", "")) == pytest.approx(grid[-1], abs=0.01)
    bottom = float(day[0].get("y", "")) + float(day[0].get("height", ""))
    assert bottom == pytest.approx(grid[0], abs=0.01)


def test_hostile_names_and_days_are_escaped() -> None:
    days = ["2026-11-28", "<img src=x onerror=alert(1)>"]
    svg = stacked_bars(days, {HOSTILE: [10_000, 20_000], "plain": [5, 0]}, title=HOSTILE)
    assert "<script" not in svg
    assert "<img" not in svg
    root = parse(svg)
    assert root.findtext(f"{SVG}title") == HOSTILE
    assert {rect.get("data-series") for rect in bars(root)} == {HOSTILE, "plain"}
    assert {rect.get("data-day") for rect in bars(root)} == set(days)
    legend = [g for g in root.iter(f"{SVG}g") if g.get("class") == "legend"]
    assert legend[0].get("data-series") == HOSTILE
    assert [text.text for text in texts(root, "day")] == ["11-28", days[1]]


def test_control_characters_cannot_make_the_svg_ill_formed() -> None:
    root = parse(stacked_bars(["d"], {"bad\x00\x1bname": [1_000_000]}))
    assert bars(root)[0].get("data-series") == "bad\ufffd\ufffdname"


def test_nothing_to_show_is_still_a_chart_of_the_same_size() -> None:
    for svg in (stacked_bars([], {}), stacked_bars(DAYS, {"growth": [0, 0, 0]})):
        root = parse(svg)
        assert root.get("viewBox") == "0 0 1200 320"
        assert root.get("data-total-micros") == "0"
        assert [text.text for text in texts(root, "empty")] == ["No spend in this range"]
        assert bars(root) == []
        assert root.findtext(f"{SVG}title") == "Spend per day"


def test_a_month_labels_every_day_turned_to_fit() -> None:
    days = [f"2026-11-{d + 1:02d}" for d in range(30)]
    root = parse(stacked_bars(days, {"growth": [1_000 * (d + 1) for d in range(30)]}))
    labels = texts(root, "day")
    assert [text.text for text in labels] == [day[-5:] for day in days]
    assert all((text.get("transform") or "").startswith("rotate(") for text in labels)


def test_many_days_are_labelled_at_a_steady_step() -> None:
    days = [f"2026-{9 + d // 30:02d}-{d % 30 + 1:02d}" for d in range(90)]
    root = parse(stacked_bars(days, {"growth": [1_000 * (d + 1) for d in range(90)]}))
    labels = [text.text for text in texts(root, "day")]
    assert labels == [day[-5:] for day in days[::2]]  # every other day: none skipped at random
    assert len(bars(root)) == 90


def test_a_few_days_are_labelled_level_and_sub_cent_amounts_are_exact() -> None:
    root = parse(stacked_bars(["mon", "tue"], {"a": [1, 2]}))
    labels = texts(root, "day")
    assert [text.text for text in labels] == ["mon", "tue"]
    assert all(text.get("transform") is None for text in labels)
    legend = [g for g in root.iter(f"{SVG}g") if g.get("class") == "legend"]
    assert [text.text for text in legend[0].iter(f"{SVG}text")] == ["a", "$0.000003"]


@pytest.mark.parametrize(
    "largest", [1, 9_999, 40_000, 100_001, 1_234_567, 49_999_999, 123_456_789, 10**13]
)
def test_ticks_are_round_and_reach_the_largest_day(largest: int) -> None:
    root = parse(
        stacked_bars(["a", "b"], {"x": [largest // 3, largest - largest // 3], "y": [1, 0]})
    )
    ticks = [int(tick.get("data-micros", "")) for tick in texts(root, "tick")]
    assert 4 <= len(ticks) <= 6
    assert ticks[0] == 0
    assert ticks[-1] >= max(largest - largest // 3, largest // 3 + 1)
    step = ticks[1]
    assert ticks == [i * step for i in range(len(ticks))]
    mantissa = step
    while mantissa % 10 == 0:
        mantissa //= 10
    assert mantissa in (1, 2, 25, 5)
    labels = [tick.text or "" for tick in texts(root, "tick")]
    assert labels == [dollars(t) for t in ticks]
    assert [round(float(label.strip("$").replace(",", "")) * 1e6) for label in labels] == ticks


def test_the_legend_lists_each_group_with_its_total_and_a_cycling_colour() -> None:
    series = {f"group {i}": [i * 10_000, 5_000] for i in range(12)}
    root = parse(stacked_bars(["a", "b"], series))
    legend = [g for g in root.iter(f"{SVG}g") if g.get("class") == "legend"]
    assert [g.get("data-series") for g in legend] == list(series)
    totals = [g.findall(f"{SVG}text")[-1].text for g in legend]
    assert totals == [dollars(sum(values)) for values in series.values()]
    fills = [swatch.get("fill") for g in legend for swatch in g.iter(f"{SVG}rect")]
    palette = len(set(fills))
    assert palette >= 8
    assert fills == [fills[i % palette] for i in range(12)]


def test_a_legend_too_long_for_the_chart_says_how_many_more() -> None:
    series = {f"g{i}": [1_000_000] for i in range(40)}
    root = parse(stacked_bars(["a"], series, height=200))
    shown = [g for g in root.iter(f"{SVG}g") if g.get("class") == "legend"]
    more = texts(root, "more")
    assert len(more) == 1
    assert more[0].text == f"+{40 - len(shown)} more"
    assert len(bars(root)) == 40  # the bars are all there all the same


def test_the_output_is_deterministic_and_self_contained() -> None:
    svg = stacked_bars(DAYS, SERIES)
    assert svg == stacked_bars(DAYS, dict(SERIES))
    for banned in ("<script", "href", "<style", "@import", "url("):
        assert banned not in svg
    assert svg.count("http") == 1  # the namespace, nothing to fetch


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.00"),
        (1, "$0.000001"),
        (9_999, "$0.009999"),
        (10_000, "$0.01"),
        (43_560, "$0.04356"),
        (1_234_567, "$1.234567"),
        (12_345_600_000, "$12,345.60"),
        (-2_500_000, "-$2.50"),
    ],
)
def test_dollars(micros: int, text: str) -> None:
    assert dollars(micros) == text


@pytest.mark.parametrize(
    "series",
    [
        {"short": [1, 2]},
        {"long": [1, 2, 3, 4]},
        {"negative": [1, -1, 2]},
        {"float": [1, 0.5, 2]},
        {"bool": [1, True, 2]},
    ],
)
def test_bad_input_is_refused(series: dict[str, list[int]]) -> None:
    with pytest.raises(ValueError, match=next(iter(series))):
        stacked_bars(DAYS, series)
