"""HTML fragments for the monitoring panel: pure functions of a snapshot, a run or a processor.

Kept apart from the widgets so that what the page shows can be tested without widgets, and so
that every fragment is small and bounded: the panel re-sends a fragment whenever it changes, so
none may grow with the number of items, log lines or result rows.
"""

from __future__ import annotations

import html
from typing import Any

from .protocol import Statistics, Status

STATUS_COLOURS = {
    Status.CREATED: "#6c757d",
    Status.ACTIVE: "#0d6efd",
    Status.COMPLETED: "#198754",
    Status.CRASHED: "#dc3545",
    Status.CANCELLED: "#b8860b",
    Status.TERMINATED: "#6c757d",
}
CONNECTION_COLOURS = {
    "connected": "#198754",
    "connecting": "#b8860b",
    "reconnecting": "#b8860b",
    "lost": "#dc3545",
    "stopped": "#6c757d",
    "disconnected": "#6c757d",
}
# One stylesheet per panel (sent once): compact tables in the detail area, which the HTML
# widget would otherwise lay out one 28px widget line per table row.
PANEL_CSS = """<style>
.nbproc-detail .widget-html-content { line-height: 1.4; }
.nbproc-detail table { border-collapse: collapse; font-size: 0.95em; }
.nbproc-detail th, .nbproc-detail td { padding: 1px 10px; text-align: right; }
.nbproc-result tbody tr:nth-child(odd) { background: rgba(127, 127, 127, 0.08); }
.nbproc-counters .widget-html-content { line-height: 1.4; }
</style>"""
RESULT_ROWS = 20
RESULT_COLUMNS = 20
RESULT_CELL_CHARS = 80
LOG_LINES = 100
LOG_LINE_CHARS = 1000
TEXT_CHARS = 4000


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def clip(text: str, limit: int) -> str:
    """Cut ``text`` to ``limit`` characters, saying so: a page must never receive megabytes."""
    if len(text) <= limit:
        return text
    return text[:limit] + f"… ({len(text) - limit:,} more characters)"


def clip_middle(text: str, limit: int) -> str:
    """Like :func:`clip` but keeps the end too: a traceback's last line names the error."""
    if len(text) <= limit:
        return text
    head = limit // 3
    tail = limit - head
    return f"{text[:head]}\n… ({len(text) - limit:,} characters cut) …\n{text[-tail:]}"


def number(n: float) -> str:
    return f"{int(n):,}"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def status_html(status: Status) -> str:
    colour = STATUS_COLOURS.get(status, "#6c757d")
    return f'<b style="color:{colour}">{esc(status.value)}</b>'


def connection_state(processor: Any) -> str:
    """The state the header shows: a stopped client of a started processor means *lost*."""
    if not processor.running:
        return "stopped"
    if processor.core is None:
        return "disconnected"
    state = str(processor.connection_state)
    return "lost" if state == "stopped" else state


def header_html(processor: Any, state: str) -> str:
    where = esc(processor.url) if processor.running else "not running"
    core = processor.core
    if core is None:
        core_text = "no core"
    else:
        kind = "embedded core" if processor.embedded_core is not None else "core"
        core_text = f"{kind} {esc(core.processor_url)} (operators: {esc(core.client_url)})"
    colour = CONNECTION_COLOURS.get(state, "#6c757d")
    return (
        f"<b>nbproc</b> processor {where} &rarr; {core_text} "
        f'<span class="nbproc-connection" style="color:{colour};font-weight:bold">'
        f"{esc(state)}</span>"
    )


def counters_html(snap: Any, rate: float | None = None) -> str:
    """The live line of a run row: counters, rate, workers, elapsed (and the error summary).

    ``rate`` overrides the snapshot's (which counts loaded items only, so it reads 0 while a
    WaitAndPush run is still collecting)."""
    parts = [
        f"extracted {number(snap.extracted)}",
        f"transformed {number(snap.transformed)}",
        f"loaded {number(snap.loaded)}",
    ]
    if snap.dropped:
        parts.append(f"dropped {number(snap.dropped)}")
    if snap.status.is_terminal:
        # the engine's figure counts loaded items: 0 for a WaitAndPush run that never loaded
        moved = max(snap.loaded, snap.transformed)
        avg = snap.rate or (moved / snap.elapsed if snap.elapsed > 0 else 0.0)
        parts.append(f"avg {number(avg)} items/s")
    else:
        parts.append(f"{number(snap.rate if rate is None else rate)} items/s")
    parts.append(f"workers t={snap.t_workers} l={snap.l_workers}")
    parts.append(duration(snap.elapsed))
    if snap.restarts:
        parts.append(f"restarts {snap.restarts}")
    text = " · ".join(parts)
    if snap.error:
        text += f' · <span style="color:#dc3545">{esc(clip(snap.error, 200))}</span>'
    return f'<span style="font-family:monospace">{text}</span>'


def statistics_html(stats: Statistics) -> str:
    rows = [
        ("processed", number(stats.total_processed)),
        ("over extract→transform", number(stats.total_over_et)),
        ("over transform→load", number(stats.total_over_tl)),
        ("dropped", number(stats.total_dropped)),
        (
            "workers e/t/l",
            f"{stats.extract_routines}/{stats.transform_routines}/{stats.load_routines}",
        ),
        (
            "threshold breaches et/tl",
            f"{stats.et_threshold_breaches}/{stats.tl_threshold_breaches}",
        ),
        (
            "total time min/med/avg/max",
            " / ".join(
                _ns(v)
                for v in (
                    stats.min_total_ns,
                    stats.med_total_ns,
                    stats.avg_total_ns,
                    stats.max_total_ns,
                )
            ),
        ),
    ]
    cells = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='nbproc-statistics'>{cells}</table>"


def _ns(value: int) -> str:
    if value >= 1_000_000_000:
        return f"{value / 1e9:.2f} s"
    if value >= 1_000_000:
        return f"{value / 1e6:.2f} ms"
    return f"{value / 1e3:.1f} µs"


def logs_html(lines: list[tuple[float, str, str]]) -> str:
    """The last :data:`LOG_LINES` lines, each clipped; older ones are counted, not sent."""
    if not lines:
        return "<i>no log lines</i>"
    shown = lines[-LOG_LINES:]
    import time

    text = "\n".join(
        f"{time.strftime('%H:%M:%S', time.localtime(stamp))} {level:7} "
        f"{clip_middle(str(message), LOG_LINE_CHARS)}"
        for stamp, level, message in shown
    )
    more = len(lines) - len(shown)
    note = f"<i>{more:,} earlier lines not shown</i>" if more else ""
    return f"{note}<pre style='max-height:16em;overflow:auto;margin:0'>{esc(text)}</pre>"


def error_html(error: str | None) -> str:
    if not error:
        return ""
    return (
        "<pre style='color:#dc3545;max-height:20em;overflow:auto;margin:0'>"
        f"{esc(clip_middle(error, TEXT_CHARS))}</pre>"
    )


def result_html(result: Any, evicted: bool = False) -> str:
    """A run's result, truncated: a DataFrame's first rows plus its shape, anything else its repr."""
    if evicted:
        return "<i>result dropped (only the newest results are kept)</i>"
    if result is None:
        return "<i>no result</i>"
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(result, pd.DataFrame):
        return _frame_html(result, pd)
    return f"<pre style='margin:0'>{esc(clip(repr(result), TEXT_CHARS))}</pre>"


def _frame_html(frame: Any, pd: Any) -> str:
    rows, columns = frame.shape
    head = frame.iloc[:RESULT_ROWS, :RESULT_COLUMNS]
    with pd.option_context("display.max_colwidth", RESULT_CELL_CHARS):
        table = head.to_html(max_rows=RESULT_ROWS, max_cols=RESULT_COLUMNS, border=0)
    table = clip(table, 200_000)
    shape = f"{rows:,} rows × {columns:,} columns"
    note = f" (first {min(rows, RESULT_ROWS)} shown)" if rows > RESULT_ROWS else ""
    return f"<div style='overflow:auto;max-height:24em'>{table}</div><i>{shape}{note}</i>"
