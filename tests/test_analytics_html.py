"""``llm-gateway usage report --html``: one self-contained page, checked in headless Chromium.

The browser test drives the system's Chromium through chromedriver's W3C WebDriver HTTP API
(httpx, already a dependency): it loads the written page from disk and measures the drawn
charts. It skips only when Chromium or its driver is not installed (``.ci/run`` installs
them: ``apt-get install chromium chromium-driver``).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from llm_gateway.cli import main
from usage.analytics.html import CSP, DailyCost, HtmlReport, render_html
from usage.analytics.report import ReportRow

TENANT = uuid.uuid4()
HOSTILE = '<script>window.pwned = 1</script>"&'  # a model name as a caller could store it

# (days ago, provider, model, requests, cost per request): the fixture's traffic.
TRAFFIC: list[tuple[int, str, str, int, Decimal]] = [
    (2, "openai", "gpt-4o", 4, Decimal("0.0035")),
    (2, "groq", "llama-3.3-70b-versatile", 10, Decimal("0.0004")),
    (1, "openai", "gpt-4o", 8, Decimal("0.0035")),
    (1, "openai", "gpt-4o-mini", 20, Decimal("0.0002")),
    (1, "local", HOSTILE, 5, Decimal("0.001")),
    (0, "groq", "llama-3.3-70b-versatile", 30, Decimal("0.0004")),
    (0, "openai", "gpt-4o-mini", 10, Decimal("0.0002")),
]

INSERT = """
INSERT INTO model_usage_stats (id, tenant_id, user_id, provider, model_name, endpoint,
    input_tokens, output_tokens, latency_ms, estimated_cost_usd, status, "timestamp")
SELECT gen_random_uuid(), $1, 'u1', $2, $3, '/chat', 500, 50, 120, $4,
       CASE WHEN g % 5 = 0 THEN 'error' ELSE 'success' END, $5
FROM generate_series(1, $6) AS g
"""


def _at(days_ago: int, now: datetime) -> datetime:
    """Noon UTC ``days_ago`` days back, or a minute ago for today (never in the future)."""
    day = (now - timedelta(days=days_ago)).date()
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    return min(noon, now - timedelta(minutes=1))


@pytest.fixture(scope="module")
def db(pg_dsn: str) -> str:
    async def arrange() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            now = datetime.now(UTC)
            for days_ago, provider, model, n, cost in TRAFFIC:
                await conn.execute(INSERT, TENANT, provider, model, cost, _at(days_ago, now), n)
            await conn.execute(
                "SELECT llm_gateway_refresh_usage_hourly($1, $2)",
                now - timedelta(days=3),
                now + timedelta(hours=1),
            )
        finally:
            await conn.close()

    asyncio.run(arrange())
    return pg_dsn


def _expected_daily(by: str) -> dict[date, dict[str, Decimal]]:
    now = datetime.now(UTC)
    found: dict[date, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for days_ago, provider, model, n, cost in TRAFFIC:
        key = provider if by == "provider" else f"{provider}/{model}"
        found[_at(days_ago, now).date()][key] += cost * n
    return found


@pytest.fixture(scope="module")
def page(db: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("html") / "report.html"
    code = main(
        ["usage", "report", "--dsn", db, "--tenant", str(TENANT), "--since", "7d",
         "--by", "endpoint", "--html", str(path)]
    )  # fmt: skip
    assert code == 0
    return path


# --- the page as text: self-contained, escaped ----------------------------------------------


def test_page_declares_a_csp_that_forbids_every_fetch_and_references_nothing(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in text
    assert CSP.startswith("default-src 'none'; style-src 'unsafe-inline'")
    assert "script-src" not in CSP and "connect-src" not in CSP
    # Nothing for the browser to fetch: no URL at all, no script, stylesheet link or CSS url().
    assert not re.search(r"https?:|//[a-z]", text, re.I)
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b|url\(|@import", text, re.I)


def test_every_value_from_the_ledger_is_escaped(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert HOSTILE not in text and "<script" not in text
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;&quot;&amp;" in text


def test_an_empty_window_renders_a_page_saying_so() -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    empty = HtmlReport(
        scope="all tenants",
        since=now - timedelta(days=7),
        generated_at=now,
        cost_by_provider=(),
        cost_by_model=(),
        tables=(("provider", ()),),
    )
    text = render_html(empty)
    assert "No usage in this window" in text and "<svg" not in text


def test_html_writes_a_file_and_says_where(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "r.html"
    assert main(["usage", "report", "--dsn", db, "--tenant", str(TENANT), "--html", str(path)]) == 0
    assert str(path) in capsys.readouterr().out and path.read_text().startswith("<!doctype html>")
    bad = tmp_path / "no-such-dir" / "r.html"
    assert main(["usage", "report", "--dsn", db, "--html", str(bad)]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_rows_render_with_totals() -> None:
    rows = (
        ReportRow("a", 3, 30, 3, Decimal("0.5"), 1),
        ReportRow("b", 1, 10, 1, Decimal("0.25"), 0),
    )
    now = datetime(2026, 1, 10, tzinfo=UTC)
    text = render_html(HtmlReport("t", now, now, (), (), (("model", rows),)))
    total = re.search(r"<tfoot>(.*?)</tfoot>", text, re.S)
    assert total is not None and "0.75" in total[1] and ">4<" in total[1]


def test_more_series_than_colours_fold_the_smallest_into_the_rest() -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    day = now.date()
    points = tuple(
        DailyCost(day, f"p/m{i}", Decimal(100 - i), 1) for i in range(9)
    )  # m0 costs most
    rows = (ReportRow("p/m0", 9, 9, 9, Decimal(864), 0),)
    text = render_html(HtmlReport("t", now, now, points, points, (("model", rows),)))
    names = re.findall(r'<span class="name">([^<]*)</span><span class="num">\$([\d.,]+)', text)
    assert [n for n, _ in names[:7]] == [*(f"p/m{i}" for i in range(6)), "(the rest)"]
    assert names[6][1] == f"{sum(100 - i for i in range(6, 9)):.2f}"


# --- the page in a real browser --------------------------------------------------------------


class Browser:
    """A headless Chromium session through chromedriver (W3C WebDriver over HTTP)."""

    def __init__(self, chromium: str, driver: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/status").json()["value"]["ready"]:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("chromedriver did not start within 60 s")
            time.sleep(0.1)
        options = {
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1600"],
        }
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}}
        self.session = self._call("POST", "/session", caps)["sessionId"]

    def _call(self, method: str, path: str, body: object = None) -> Any:
        reply = self.http.request(method, path, json=body)
        value = reply.json()["value"]
        assert reply.status_code == 200, value
        return value

    def open(self, path: Path) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": path.as_uri()})

    def run(self, script: str) -> Any:
        return self._call(
            "POST", f"/session/{self.session}/execute/sync", {"script": script, "args": []}
        )

    def close(self) -> None:
        try:
            self._call("DELETE", f"/session/{self.session}")
        finally:
            self.http.close()
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "Chromium or chromedriver not found on PATH: apt-get install chromium chromium-driver"
            " (.ci/run installs them)"
        )
    b = Browser(chromium, driver)
    try:
        yield b
    finally:
        b.close()


MEASURE = """
return [...document.querySelectorAll('figure svg')].map(svg => {
  const box = svg.getBoundingClientRect();
  return {
    label: [...svg.getAttribute('aria-labelledby').split(' ')]
      .map(id => document.getElementById(id).textContent).join(' '),
    width: box.width, height: box.height,
    series: [...svg.querySelectorAll('g[data-series]')].map(g => ({
      name: g.dataset.series,
      bars: [...g.querySelectorAll('rect')].map(r => {
        const b = r.getBoundingClientRect();
        return {day: r.dataset.day, width: b.width, height: b.height,
                tip: r.querySelector('title').textContent};
      }),
    })),
    legend: [...svg.closest('figure').querySelectorAll('.legend li .name')]
      .map(e => e.textContent),
  };
});
"""


@pytest.mark.parametrize(("index", "by"), [(0, "provider"), (1, "model")])
def test_charts_render_one_stacked_bar_per_day_scaled_to_cost(
    browser: Browser, page: Path, index: int, by: str
) -> None:
    browser.open(page)
    charts = browser.run(MEASURE)
    assert len(charts) == 2
    chart = charts[index]
    assert f"per {by}" in chart["label"]
    assert chart["width"] > 600 and chart["height"] > 200
    expected = _expected_daily(by)
    keys = {k for per_day in expected.values() for k in per_day}
    assert {s["name"] for s in chart["series"]} == keys == set(chart["legend"])
    # One visible segment per (day, series) with cost; each day's stack is as tall as its cost
    # relative to the costliest day.
    heights: dict[str, float] = defaultdict(float)
    for series in chart["series"]:
        days_with_cost = {d.isoformat() for d, per in expected.items() if series["name"] in per}
        assert {b["day"] for b in series["bars"]} == days_with_cost
        for bar in series["bars"]:
            assert bar["width"] > 5 and bar["height"] > 0.5
            assert bar["tip"].startswith(f"{bar['day']} · {series['name']}: $")
            heights[bar["day"]] += bar["height"]
    top = max(sum(per.values()) for per in expected.values())
    tallest = max(heights.values())
    for day, per in expected.items():
        ratio = float(sum(per.values()) / top)
        assert heights[day.isoformat()] / tallest == pytest.approx(ratio, abs=0.01)


def test_page_loads_nothing_runs_no_script_and_shows_the_tables(
    browser: Browser, page: Path
) -> None:
    browser.open(page)
    state = browser.run(
        """return {
          resources: performance.getEntriesByType('resource').map(e => e.name),
          pwned: window.pwned === 1,
          scripts: document.scripts.length,
          lang: document.documentElement.lang,
          tables: [...document.querySelectorAll('table')].map(t => ({
            caption: t.caption.textContent, rows: t.tBodies[0].rows.length,
            visible: t.getBoundingClientRect().height > 0})),
          legend: [...document.querySelectorAll('.legend .name')].map(e => e.textContent),
        };"""
    )
    assert state["resources"] == [] and not state["pwned"] and state["scripts"] == 0
    assert state["lang"] == "en"
    assert f"local/{HOSTILE}" in state["legend"]  # shown as text, not run
    captions = [t["caption"] for t in state["tables"]]
    assert all(c.startswith("Cost, tokens and errors by ") for c in captions)
    rows = {t["caption"].rsplit(" ", 1)[-1]: t["rows"] for t in state["tables"]}
    days = {_at(d, datetime.now(UTC)).date() for d, *_ in TRAFFIC}
    assert rows == {"day": len(days), "provider": 3, "model": 4, "endpoint": 1}
    assert all(t["visible"] for t in state["tables"])
