"""The HTML usage report (``llm-gateway usage report --html``): one self-contained page.

Charts are inline SVG drawn here, in Python: the page has no script, stylesheet, font or
image to fetch, and its Content-Security-Policy (:data:`CSP`) makes the browser refuse any
fetch at all. Every value from the ledger (model names, tags, user ids) is HTML-escaped.

:func:`build_html_report` gathers the data: the tables come from
:func:`usage.analytics.report.usage_report`; the daily cost per provider and per model from
:func:`daily_costs`, which reads the same rollups the report does. :func:`render_html` is
pure: an :class:`HtmlReport` in, the page out.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from html import escape
from typing import TYPE_CHECKING, Final, Literal

from .report import Grouping, ReportRow, daily_sql, report_args, usage_report

if TYPE_CHECKING:
    import asyncpg

__all__ = ["CSP", "DailyCost", "HtmlReport", "build_html_report", "daily_costs", "render_html"]

#: No fetch of any kind; inline styles only (no script is allowed to run either).
CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"

# Paul Tol's "bright" scheme: distinct for the common colour-vision deficiencies.
_PALETTE: Final = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377")
_OTHER_COLOUR: Final = "#BBBBBB"
_OTHER: Final = "(the rest)"  # parentheses: no provider or model is named so
_W, _H = 1000, 300  # chart viewBox
_LEFT, _RIGHT, _TOP, _BOTTOM = 76, 12, 14, 34


@dataclass(frozen=True, slots=True)
class DailyCost:
    """Cost and requests of one provider (or ``provider/model``) on one UTC day."""

    day: date
    key: str
    cost_usd: Decimal
    requests: int


@dataclass(frozen=True, slots=True)
class HtmlReport:
    """Everything the page shows; ``tables`` pairs each grouping with its report rows."""

    scope: str
    since: datetime
    generated_at: datetime
    cost_by_provider: tuple[DailyCost, ...]
    cost_by_model: tuple[DailyCost, ...]
    tables: tuple[tuple[Grouping, tuple[ReportRow, ...]], ...]


async def daily_costs(
    pool: asyncpg.Pool[asyncpg.Record],
    *,
    since: datetime,
    by: Literal["provider", "model"],
    tenant_id: uuid.UUID | str | None = None,
    user_id: str | None = None,
) -> list[DailyCost]:
    """Cost per UTC day and provider (or model) since ``since``, from the rollup the report
    reads for the same scope (:func:`~usage.analytics.report.daily_sql`)."""
    sql = daily_sql(by, tenant=tenant_id is not None, user=user_id is not None)
    rows = await pool.fetch(sql, *report_args(since, tenant_id, user_id))
    return [DailyCost(r["day"], r["key"], r["cost_usd"] or Decimal(0), r["requests"]) for r in rows]


async def build_html_report(
    pool: asyncpg.Pool[asyncpg.Record],
    *,
    since: datetime,
    by: Grouping = "day",
    tenant_id: uuid.UUID | str | None = None,
    user_id: str | None = None,
    now: datetime | None = None,
) -> HtmlReport:
    """The report's data: tables by day, provider and model (and ``by``), the daily series."""
    scope = f"tenant {tenant_id}" if tenant_id is not None else "all tenants"
    if user_id is not None:
        scope += f", user {user_id}"
    groupings: list[Grouping] = ["day", "provider", "model"]
    if by not in groupings:
        groupings.append(by)
    tables = [
        (
            g,
            tuple(
                await usage_report(pool, since=since, by=g, tenant_id=tenant_id, user_id=user_id)
            ),
        )
        for g in groupings
    ]
    return HtmlReport(
        scope=scope,
        since=since,
        generated_at=now or datetime.now(UTC),
        cost_by_provider=tuple(
            await daily_costs(
                pool, since=since, by="provider", tenant_id=tenant_id, user_id=user_id
            )
        ),
        cost_by_model=tuple(
            await daily_costs(pool, since=since, by="model", tenant_id=tenant_id, user_id=user_id)
        ),
        tables=tuple(tables),
    )


# --- rendering -------------------------------------------------------------------------------


def _money(value: Decimal | float, places: int) -> str:
    return f"${value:,.{places}f}"


def _places(value: Decimal) -> int:
    """Decimals that show ``value``: cents from a dollar up, more for fractions of a cent."""
    return 2 if value >= 1 else 4 if value >= Decimal("0.01") else 6


def _ticks(top: float) -> tuple[float, list[float], int]:
    """A round axis maximum over ``top``, its ticks and the decimals their labels need."""
    raw = top / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    count = math.ceil(top / step - 1e-9)
    decimals = max(0, -math.floor(math.log10(step))) + (1 if step / magnitude == 2.5 else 0)
    return step * count, [step * i for i in range(count + 1)], min(decimals, 8)


def _chart(ident: str, what: str, series: Sequence[DailyCost], first: date, last: date) -> str:
    """A stacked bar chart (one bar per UTC day) with its legend, as a ``<figure>``."""
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for point in series:
        totals[point.key] += point.cost_usd
    ranked = [k for k, v in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0])) if v > 0]
    shown = ranked if len(ranked) <= len(_PALETTE) + 1 else ranked[: len(_PALETTE)]
    colour = {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(shown)}
    group = {k: (k if k in colour else _OTHER) for k in ranked}
    colour[_OTHER] = _OTHER_COLOUR
    names = [*shown, *([_OTHER] if len(shown) < len(ranked) else [])]
    cells: dict[tuple[date, str], tuple[Decimal, int]] = defaultdict(lambda: (Decimal(0), 0))
    for p in series:
        if p.key in group:
            cost, requests = cells[p.day, group[p.key]]
            cells[p.day, group[p.key]] = (cost + p.cost_usd, requests + p.requests)
    day_total = {
        d: sum((cells[d, n][0] for n in names if (d, n) in cells), Decimal(0)) for d in days
    }
    grand = sum(day_total.values(), Decimal(0))
    top, ticks, decimals = _ticks(float(max(day_total.values())))
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    slot = plot_w / len(days)
    bar_w = max(1.0, min(slot * 0.72, 48.0))

    def y(value: float) -> float:
        return _TOP + plot_h - value / top * plot_h

    out = [
        f'<svg id="{ident}" viewBox="0 0 {_W} {_H}" role="img"'
        f' aria-labelledby="{ident}-title {ident}-desc">',
        f'<title id="{ident}-title">Daily cost per {escape(what)}</title>',
        f'<desc id="{ident}-desc">Stacked bars, one per UTC day from {first} to {last};'
        f" {escape(_money(grand, _places(grand)))} in all. The table below holds the figures."
        "</desc>",
        '<g class="axis">',
    ]
    for t in ticks:
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(t):.1f}" y2="{y(t):.1f}"/>'
            f'<text x="{_LEFT - 8}" y="{y(t) + 4:.1f}" text-anchor="end">'
            f"{escape(_money(t, decimals))}</text>"
        )
    every = math.ceil(len(days) / 12)
    for i, d in enumerate(days):
        if (len(days) - 1 - i) % every == 0:  # the last day always labelled
            x = _LEFT + slot * (i + 0.5)
            out.append(
                f'<text x="{x:.1f}" y="{_H - _BOTTOM + 20}" text-anchor="middle">'
                f"{d:%b} {d.day}</text>"
            )
    out.append("</g>")
    base = dict.fromkeys(days, 0.0)
    for n in names:
        out.append(f'<g data-series="{escape(n)}" fill="{colour[n]}">')
        for i, d in enumerate(days):
            cost, requests = cells.get((d, n), (Decimal(0), 0))
            if cost <= 0:
                continue
            height = float(cost) / top * plot_h
            base[d] += height
            x = _LEFT + slot * i + (slot - bar_w) / 2
            label = f"{d} · {n}: {_money(cost, _places(cost))} ({requests:,} requests)"
            out.append(
                f'<rect data-day="{d}" x="{x:.2f}" y="{_TOP + plot_h - base[d]:.2f}"'
                f' width="{bar_w:.2f}" height="{height:.2f}"><title>{escape(label)}</title></rect>'
            )
        out.append("</g>")
    out.append(f'<line class="base" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y(0)}" y2="{y(0)}"/>')
    out.append("</svg>")
    legend = [
        f'<li><span class="swatch" style="background:{colour[n]}"></span>'
        f'<span class="name">{escape(n)}</span><span class="num">'
        f"{escape(_money(s, _places(s)))}</span></li>"
        for n in names
        for s in [sum((cells[d, n][0] for d in days if (d, n) in cells), Decimal(0))]
    ]
    return (
        f'<figure aria-labelledby="{ident}-cap"><figcaption id="{ident}-cap">Cost per day by'
        f" {escape(what)}</figcaption>{''.join(out)}"
        f'<ul class="legend" aria-label="{escape(what)} totals">{"".join(legend)}</ul></figure>'
    )


_COLUMNS: Final = ("Requests", "Input tokens", "Output tokens", "Cost (USD)", "Errors")


def _table(grouping: Grouping, rows: Sequence[ReportRow]) -> str:
    # Enough decimals for the smallest cost, so that none shows as zero.
    places = _places(min((r.cost_usd for r in rows if r.cost_usd > 0), default=Decimal(1)))
    head = "".join(f'<th scope="col" class="num">{c}</th>' for c in _COLUMNS)
    body = [
        f'<tr><th scope="row">{escape(r.key or "(none)")}</th><td>{r.requests:,}</td>'
        f"<td>{r.input_tokens:,}</td><td>{r.output_tokens:,}</td>"
        f"<td>{escape(_money(r.cost_usd, places))}</td><td>{r.errors:,}</td></tr>"
        for r in rows
    ]
    foot = ""
    if rows and grouping != "tag":  # a row may carry several tags: no total for tags
        cost = sum((r.cost_usd for r in rows), Decimal(0))
        foot = (
            f'<tfoot><tr><th scope="row">Total</th><td>{sum(r.requests for r in rows):,}</td>'
            f"<td>{sum(r.input_tokens for r in rows):,}</td>"
            f"<td>{sum(r.output_tokens for r in rows):,}</td>"
            f"<td>{escape(_money(cost, _places(cost)))}</td>"
            f"<td>{sum(r.errors for r in rows):,}</td></tr></tfoot>"
        )
    empty = "" if rows else f'<tr><td colspan="{len(_COLUMNS) + 1}">No rows</td></tr>'
    return (
        f"<table><caption>Cost, tokens and errors by {grouping}</caption>"
        f'<thead><tr><th scope="col">{grouping.capitalize()}</th>{head}</tr></thead>'
        f"<tbody>{''.join(body)}{empty}</tbody>{foot}</table>"
    )


def _cards(rows: Sequence[ReportRow]) -> str:
    cost = sum((r.cost_usd for r in rows), Decimal(0))
    requests = sum(r.requests for r in rows)
    errors = sum(r.errors for r in rows)
    rate = f"{errors / requests:.1%} of requests" if requests else "no requests"
    cards = [
        ("Cost", _money(cost, _places(cost)), "priced requests"),
        ("Requests", f"{requests:,}", "attempts in the ledger"),
        ("Tokens", f"{sum(r.input_tokens for r in rows):,} in",
         f"{sum(r.output_tokens for r in rows):,} out"),
        ("Errors", f"{errors:,}", rate),
    ]  # fmt: skip
    return "".join(
        f'<div class="card"><dt>{escape(a)}</dt><dd class="big">{escape(b)}</dd>'
        f'<dd class="small">{escape(c)}</dd></div>'
        for a, b, c in cards
    )


_STYLE: Final = """
:root{--fg:#1d2330;--muted:#5b6475;--bg:#f6f7f9;--panel:#fff;--line:#dde1e8;--grid:#e8ebf0;
--accent:#2b5a9e}
@media (prefers-color-scheme:dark){:root{--fg:#e6e9ef;--muted:#a3acbb;--bg:#14171c;
--panel:#1d2128;--line:#343a45;--grid:#2a2f38;--accent:#8fb4ec}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);line-height:1.45;
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1180px;margin:0 auto;padding:28px 24px 48px}
header{border-bottom:3px solid var(--accent);padding-bottom:12px;margin-bottom:20px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 10px}
.meta{color:var(--muted);margin:0}
dl.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:14px;margin:0 0 8px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:10px;padding:12px 16px}
.card dt{color:var(--muted);font-size:13px;text-transform:uppercase;letter-spacing:.04em}
.card dd{margin:0}.big{font-size:24px;font-weight:650;font-variant-numeric:tabular-nums}
.small{color:var(--muted);font-size:13px}
figure{background:var(--panel);border:1px solid var(--line);border-radius:10px;margin:0 0 16px;
padding:14px 16px}
figcaption{font-weight:600;margin-bottom:6px}
svg{display:block;width:100%;height:auto}
svg text{fill:var(--muted);font-size:12px;font-variant-numeric:tabular-nums}
.axis line{stroke:var(--grid)}.base{stroke:var(--muted)}
svg rect{stroke:var(--panel);stroke-width:.6}
.legend{list-style:none;margin:8px 0 0;padding:0;display:flex;flex-wrap:wrap;gap:6px 20px;
font-size:13px}
.legend li{display:flex;align-items:center;gap:6px}
.swatch{width:12px;height:12px;border-radius:3px;display:inline-block}
.legend .num{color:var(--muted);font-variant-numeric:tabular-nums}
.empty{background:var(--panel);border:1px dashed var(--line);border-radius:10px;padding:24px}
table{width:100%;border-collapse:collapse;background:var(--panel);border:1px solid var(--line);
border-radius:10px;margin:0 0 18px;font-variant-numeric:tabular-nums;font-size:14px}
caption{text-align:left;font-weight:600;padding:0 0 6px}
th,td{padding:6px 12px;border-bottom:1px solid var(--grid);text-align:right;white-space:nowrap}
th[scope=row],thead th:first-child{text-align:left;font-weight:500;white-space:normal;
word-break:break-all}
thead th{color:var(--muted);font-weight:600;font-size:13px;border-bottom:1px solid var(--line)}
tbody tr:nth-child(even){background:color-mix(in srgb,var(--grid) 35%,transparent)}
tfoot th,tfoot td{font-weight:650;border-top:2px solid var(--line);border-bottom:0}
footer{color:var(--muted);font-size:13px;margin-top:24px}
@media (max-width:760px){dl.cards{grid-template-columns:repeat(2,1fr)}}
"""


def render_html(report: HtmlReport) -> str:
    """The page for ``report``: a summary, the two charts, then the tables."""
    first = report.since.astimezone(UTC).date()
    last = max(report.generated_at.astimezone(UTC).date(), first)
    by_provider = next((rows for g, rows in report.tables if g == "provider"), None)
    summary_rows = by_provider or (report.tables[0][1] if report.tables else ())
    has_cost = any(p.cost_usd > 0 for p in report.cost_by_provider)
    if has_cost:
        charts = _chart("cost-provider", "provider", report.cost_by_provider, first, last)
        charts += _chart("cost-model", "model", report.cost_by_model, first, last)
    else:
        charts = '<p class="empty">No usage in this window with a known cost: nothing to chart.</p>'
    if not any(rows for _, rows in report.tables):
        charts = '<p class="empty">No usage in this window.</p>'
    window = f"{report.since.astimezone(UTC):%Y-%m-%d %H:%M} UTC to {last}"
    title = f"LLM usage report, {report.scope}"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="referrer" content="no-referrer"><title>{escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><main>"
        f'<header><h1>LLM usage report</h1><p class="meta">{escape(report.scope.capitalize())}'
        f" · {escape(window)} · generated {report.generated_at.astimezone(UTC):%Y-%m-%d %H:%M}"
        " UTC</p></header>"
        f'<section aria-label="Summary"><dl class="cards">{_cards(summary_rows)}</dl></section>'
        f'<section aria-labelledby="h-charts"><h2 id="h-charts">Cost over time</h2>{charts}'
        "</section>"
        f'<section aria-labelledby="h-tables"><h2 id="h-tables">Breakdown</h2>'
        f"{''.join(_table(g, rows) for g, rows in report.tables)}</section>"
        "<footer>Costs leave out requests without a known price. Days are UTC. Served from the"
        " usage rollups, refreshed every few minutes by maintenance; the latest minutes may be"
        " missing.</footer></main></body></html>\n"
    )
