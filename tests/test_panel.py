"""The monitoring panel over a real processor, embedded core and engine, with no frontend.

The one fake here is the comm: widgets talk to the page through ``comm.create_comm``, and with no
page, :class:`RecordingComm` stands in and records every message a frontend would receive. From
that record the tests count messages and rebuild the state the page would show.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

import comm
import pandas as pd
import pytest
from comm.base_comm import BaseComm
from support import eventually

from nbproc import widgets_render as render
from nbproc.cluster import Cluster
from nbproc.processor import Processor
from nbproc.widgets import Panel, parse_metadata
from nbproc.widgets_updater import THREAD_NAME, Updater


class RecordingComm(BaseComm):
    """A comm whose messages go to a list instead of a kernel's IOPub socket."""

    record: list[tuple[float, str, str, dict]] = []

    def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
        self.record.append((time.monotonic(), msg_type, self.comm_id, data or {}))


def _panel_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("nbproc-panel")]


@pytest.fixture(autouse=True)
def no_leftover_threads():
    """Updater and action threads end with their panels (other tests count nbproc threads)."""
    yield
    eventually(lambda: not _panel_threads(), timeout=10, what="panel threads to end")


@pytest.fixture
def sent(monkeypatch):
    """Every widget message of the test, as (time, msg_type, comm_id, data)."""
    record: list[tuple[float, str, str, dict]] = []
    monkeypatch.setattr(RecordingComm, "record", record)
    monkeypatch.setattr(comm, "create_comm", lambda *a, **k: RecordingComm(*a, **k))
    return record


@pytest.fixture
def proc():
    processor = Processor().start()
    try:
        yield processor
    finally:
        processor.stop()


@pytest.fixture
def updater():
    """A private updater, so flushes are counted for this test only."""
    return Updater()


@pytest.fixture
def panels(proc, updater):
    made: list[Panel] = []

    def make(**options) -> Panel:
        panel = Panel(proc, updater=updater, **options)
        made.append(panel)
        return panel

    yield make
    for panel in made:
        panel.close()


def register(proc: Processor, cluster: Cluster) -> Cluster:
    """Register and wait until the core offers it (registration is asynchronous)."""
    proc.register(cluster)

    def offered() -> bool:
        try:
            infos = proc._operate(lambda op: op.clusters(cluster.module))
        except Exception:  # noqa: BLE001 - the module is not known yet
            return False
        return any(info.name == cluster.name for info in infos)

    eventually(offered, timeout=10, what=f"the core to offer {cluster.name}")
    return cluster


def numbers(n: int):
    def extract(h, m):
        for i in range(n):
            yield {"i": i}

    return extract


def paced(n: int, seconds: float):
    """``n`` items spread over at least ``seconds`` (a pause every 1,000 items)."""

    def extract(h, m):
        pause = seconds / (n / 1_000)
        for i in range(n):
            if i % 1_000 == 0:
                time.sleep(pause)
            yield {"i": i}

    return extract


def endless(h, m, out):
    i = 0
    while out.push({"i": i}):
        i += 1
        time.sleep(0.0005)


def updates(record, since: float = 0.0) -> list[tuple[float, str, dict]]:
    """State updates (what costs IOPub bandwidth while a run goes), after ``since``."""
    return [
        (t, cid, data["state"])
        for t, kind, cid, data in record
        if kind == "comm_msg" and data.get("method") == "update" and t >= since
    ]


def frontend_state(record) -> dict[str, dict]:
    """The state the page would hold per model, replayed from the messages."""
    state: dict[str, dict] = {}
    for _t, kind, cid, data in record:
        if kind == "comm_open":
            state[cid] = dict(data.get("state", {}))
        elif kind == "comm_msg" and data.get("method") == "update":
            state.setdefault(cid, {}).update(data["state"])
        elif kind == "comm_close":
            state.pop(cid, None)
    return state


def newest_row(panel: Panel) -> dict:
    rows = panel.row_state()
    return rows[0] if rows else {}


def shows(panel: Panel, status: str):
    return lambda: newest_row(panel).get("status") == status


# -- construction ----------------------------------------------------------------------------------


def test_builds_without_a_kernel_and_names_its_parts(proc, panels):
    register(proc, Cluster("Nums", numbers(10)))
    panel = panels()
    assert panel.show() is panel  # no kernel: displays nothing, raises nothing
    assert "nbproc-panel" in panel.widget._dom_classes
    assert "nbproc-connection-connected" in panel.header._dom_classes
    assert proc.url in panel.header.value
    assert proc.core.processor_url in panel.header.value
    row = next(iter(panel._cluster_rows.values()))
    assert "nbproc-cluster-row" in row.box._dom_classes
    assert "notebook/Nums" in row.label.value and "Batch" in row.label.value
    assert "mounted" in row.label.value


def test_cluster_list_follows_registrations(proc, panels, updater):
    panel = panels()
    assert panel.clusters_box.children == (panel.no_clusters,)
    proc.register(Cluster("Late", numbers(1)))
    eventually(lambda: len(panel._cluster_rows) == 1, timeout=5, what="the new cluster's row")
    proc.unregister("Late")
    eventually(lambda: panel.clusters_box.children == (panel.no_clusters,), timeout=5)


# -- the message budget ---------------------------------------------------------------------------------


def test_a_million_item_run_costs_a_bounded_number_of_messages(proc, panels, updater, sent):
    register(proc, Cluster("Million", paced(1_000_000, 2.0)))
    panel = panels()
    start, flushes_before = time.monotonic(), updater.flushes
    run = proc.wait(proc.provision("Million"), timeout=60)
    assert panel.wait_for(lambda p: newest_row(p).get("status") == "completed", timeout=5)
    elapsed, flushes = time.monotonic() - start, updater.flushes - flushes_before
    during = updates(sent, since=start)
    per_second = Counter(int(t - start) for t, _c, _s in during)
    print(
        f"\n1M-item run: {elapsed:.2f} s, {flushes} flushes ({flushes / elapsed:.1f}/s), "
        f"{len(during)} state updates, busiest second {max(per_second.values())} updates"
    )
    assert run.snapshot().loaded == 1_000_000
    assert elapsed >= 2.0
    assert flushes <= elapsed * 10 + 2
    # one run active: its counters line (+ status, cancel, detail when things change)
    assert len(during) <= flushes * 3 + 20
    assert max(per_second.values()) <= 40


def test_final_state_on_the_page_matches_the_run_statistics(proc, panels, sent):
    register(proc, Cluster("Final", numbers(50_000)))
    panel = panels()
    run = proc.wait(proc.provision("Final"), timeout=60)
    eventually(shows(panel, "completed"), timeout=5, what="the completed row")
    stats = run.statistics()
    snap = run.snapshot()
    row = panel._rows[run.key]
    page = frontend_state(sent)
    status, counters = page[row.status.model_id], page[row.counters.model_id]
    assert "nbproc-status-completed" in status["_dom_classes"]
    assert "completed" in status["value"]
    for label, value in (
        ("extracted", stats.total_over_et),
        ("transformed", stats.total_over_tl),
        ("loaded", stats.total_processed),
    ):
        assert f"{label} {value:,}" in counters["value"]
    assert stats.total_processed == 50_000
    assert f"workers t={snap.t_workers} l={snap.l_workers}" in counters["value"]
    assert page[row.cancel.layout.model_id]["display"] == "none"
    detail = page[panel.detail_statistics.model_id]["value"]
    assert f"<td>{stats.total_processed:,}</td>" in detail
    result = page[panel.detail_result.model_id]["value"]
    assert "50,000 rows × 1 columns" in result and "<table" in result


def test_eight_concurrent_million_item_runs_stay_under_the_iopub_limits(
    proc, panels, updater, sent
):
    register(proc, Cluster("Many", numbers(1_000_000)))
    panel = panels()
    start, flushes_before = time.monotonic(), updater.flushes
    ids = [proc.provision("Many") for _ in range(8)]
    runs = [proc.wait(run_id, timeout=240) for run_id in ids]
    assert panel.wait_for(
        lambda p: [r["status"] for r in p.row_state()[:8]] == ["completed"] * 8, timeout=5
    )
    elapsed, flushes = time.monotonic() - start, updater.flushes - flushes_before
    during = updates(sent, since=start)
    windows = Counter(int((t - start) / 3) for t, _c, _s in during)
    window_bytes = Counter()
    for t, _c, state in during:
        window_bytes[int((t - start) / 3)] += len(str(state))
    worst_rate = max(windows.values()) / 3
    worst_bytes = max(window_bytes.values()) / 3
    print(
        f"\n8 x 1M items: {elapsed:.1f} s, {flushes} flushes ({flushes / elapsed:.1f}/s), "
        f"{len(during)} updates ({len(during) / elapsed:.0f}/s), worst 3 s window "
        f"{worst_rate:.0f} msg/s, {worst_bytes / 1000:.1f} kB/s"
    )
    assert all(r.snapshot().loaded == 1_000_000 for r in runs)
    assert flushes <= elapsed * 10 + 2
    # jupyter_server's defaults: 1000 messages/s and 1 MB/s, averaged over 3 s windows
    assert worst_rate < 200
    assert worst_bytes < 100_000


# -- actions ------------------------------------------------------------------------------------------


def test_run_button_provisions_through_the_core_with_metadata(proc, panels):
    seen: list[dict] = []

    def extract(h, m, out):
        seen.append(dict(m))
        out.push({"x": 1})

    register(proc, Cluster("Meta", extract))
    panel = panels()
    row = panel._cluster_rows[("notebook", "Meta")]
    row.metadata.value = "who=panel note='two words'"
    row.run.click()
    eventually(lambda: "provisioned through the core" in panel.message.value, timeout=10)
    eventually(shows(panel, "completed"), timeout=10)
    assert seen == [{"who": "panel", "note": "two words"}]
    record = proc.core_record(proc.runs()[0].run_id)
    assert str(record.status) == "completed"


def test_action_errors_land_in_the_panel_not_in_a_cell(proc, panels):
    register(proc, Cluster("Gone", numbers(1)))
    panel = panels()
    row = panel._cluster_rows[("notebook", "Gone")]
    row.metadata.value = "novalue"
    row.run.click()  # raises nothing
    eventually(lambda: "key=value" in panel.message.value, timeout=5)
    row.metadata.value = ""
    proc.unregister("Gone")
    row.run.click()
    eventually(lambda: "not provisioned: KeyError" in panel.message.value, timeout=10)
    assert "#dc3545" in panel.message.value


def test_cancel_button_cancels_an_active_run(proc, panels):
    register(proc, Cluster("Endless", endless))
    panel = panels()
    run_id = proc.provision("Endless")
    eventually(shows(panel, "active"), timeout=10, what="the active row")
    row = panel._rows[proc.get_run(run_id).key]
    assert row.cancel.layout.display != "none"
    live_rate = re.compile(r" [1-9][\d,]* items/s")  # WaitAndPush: loads nothing until the end
    eventually(lambda: live_rate.search(row.counters.value), what="a live items/s rate")
    row.cancel.click()
    eventually(shows(panel, "cancelled"), timeout=15, what="the cancelled row")
    assert "nbproc-status-cancelled" in row.status._dom_classes
    eventually(lambda: row.cancel.layout.display == "none", timeout=5)


def test_a_crash_shows_its_traceback_and_a_selection_sticks(proc, panels):
    def broken(h, m, out):
        out.push({"x": 1})
        raise ZeroDivisionError("boom in extract")

    register(proc, Cluster("Broken", broken))
    register(proc, Cluster("Fine", numbers(3)))
    panel = panels()
    crashed = proc.wait(proc.provision("Broken"), timeout=30)
    eventually(shows(panel, "crashed"), timeout=5)
    eventually(lambda: "ZeroDivisionError" in panel.detail_error.value, timeout=5)
    assert "boom in extract" in newest_row(panel)["counters"]  # the error summary in the row
    assert "ZeroDivisionError" in panel.detail_logs.value
    panel.select(crashed.key)
    proc.wait(proc.provision("Fine"), timeout=30)
    eventually(shows(panel, "completed"), timeout=5)
    time.sleep(0.3)
    assert "ZeroDivisionError" in panel.detail_error.value  # still the selected, older run
    assert panel._rows[crashed.key].select.button_style == "info"
    panel.select(None)  # follow the newest again
    eventually(lambda: panel.detail_error.value == "", timeout=5)
    assert "3 rows × 1 columns" in panel.detail_result.value


# -- bounds -------------------------------------------------------------------------------------------


def test_rows_are_capped_and_rows_that_scroll_off_are_closed(proc, panels, sent):
    register(proc, Cluster("Tiny", numbers(1)))
    panel = panels(max_rows=3)
    for _ in range(5):
        run = proc.wait(proc.provision("Tiny"), timeout=30)
        eventually(lambda run=run: run.key in panel._rows, timeout=5, what="its row")
    eventually(lambda: "2 older runs not shown" in panel.more_runs.value, timeout=5)
    assert len(panel.runs_box.children) == 3
    assert [r["run_id"] for r in panel.row_state()] == [str(r.run_id) for r in proc.runs()[:3]]
    opened = {cid for _t, kind, cid, _d in sent if kind == "comm_open"}
    closed = {cid for _t, kind, cid, _d in sent if kind == "comm_close"}
    alive = {w.model_id for row in panel._rows.values() for w in _row_models(row)}
    assert alive <= opened - closed
    assert len(closed) >= 2 * 5  # two scrolled-off rows, each several models


def test_a_burst_of_short_runs_is_spread_over_flushes(proc, panels, updater, sent):
    register(proc, Cluster("Burst", numbers(1)))
    panel = panels(max_rows=10)
    start = time.monotonic()
    ids = [proc.provision("Burst") for _ in range(100)]
    for run_id in ids:
        proc.wait(run_id, timeout=30)
    newest = [str(r.run_id) for r in proc.runs()[:10]]
    eventually(lambda: [r["run_id"] for r in panel.row_state()] == newest, timeout=10)
    per_second = Counter(int(t - start) for t, _k, _c, _d in sent if t >= start)
    print(
        f"\n100 runs in {time.monotonic() - start:.1f} s: busiest second {max(per_second.values())} messages"
    )
    assert max(per_second.values()) < 1000  # jupyter_server's default IOPub message rate


def _row_models(row):
    return [row.box, row.select, row.cluster, row.status, row.counters, row.cancel]


def test_results_and_logs_are_rendered_truncated():
    frame = pd.DataFrame({f"c{i}": range(100_000) for i in range(50)})
    frame["text"] = "x" * 10_000
    shown = render.result_html(frame)
    assert "100,000 rows × 51 columns" in shown
    assert len(shown) < 60_000
    assert render.result_html(list(range(1_000_000))).count(",") < 2_000
    lines = [(0.0, "info", "y" * 100_000)] * 5_000
    text = render.logs_html(lines)
    assert "4,900 earlier lines not shown" in text
    assert len(text) < 100 * 1200


def test_nbproc_panel_stays_callable_once_the_widgets_are_imported():
    import nbproc
    import nbproc.widgets

    assert callable(nbproc.panel)
    assert nbproc.widgets.Panel is Panel


def test_parse_metadata():
    assert parse_metadata("") == {}
    assert parse_metadata("a=1 b='x y' c=") == {"a": "1", "b": "x y", "c": ""}
    with pytest.raises(ValueError, match="key=value"):
        parse_metadata("a=1 lonely")


# -- several panels ---------------------------------------------------------------------------------


def test_panels_share_one_updater_thread_and_closing_one_leaves_the_others(proc):
    register(proc, Cluster("Two", numbers(1_000)))
    first, second = Panel(proc), Panel(proc)
    try:
        updaters = [t for t in threading.enumerate() if t.name == THREAD_NAME]
        assert len(updaters) == 1
        first.close()
        assert first.widget.comm is None
        proc.wait(proc.provision("Two"), timeout=30)
        eventually(shows(second, "completed"), timeout=5)
        assert first.row_state() == []
        second.widget.close()  # closed from outside: the panel notices and stops
        eventually(lambda: second.closed, timeout=5)
    finally:
        first.close()
        second.close()
    eventually(
        lambda: not [t for t in threading.enumerate() if t.name == THREAD_NAME],
        timeout=5,
        what="the updater thread to exit with the last panel",
    )


def test_a_panel_follows_its_processor_through_start_stop_and_restart(updater):
    proc = Processor()
    panel = Panel(proc, updater=updater)  # before start: no engine yet, no error
    try:
        assert "nbproc-connection-stopped" in panel.header._dom_classes
        proc.start()
        register(proc, Cluster("Again", numbers(7)))
        first = proc.wait(proc.provision("Again"), timeout=30)
        eventually(shows(panel, "completed"), timeout=5)
        proc.stop()
        eventually(lambda: "nbproc-connection-stopped" in panel.header._dom_classes, timeout=5)
        assert newest_row(panel)["status"] == "completed"  # a stopped engine still has its runs
        proc.start()
        register(proc, Cluster("Again", numbers(9)))
        second = proc.wait(proc.provision("Again"), timeout=30)
        assert second.key == first.key  # a new engine numbers its runs from 1 again
        eventually(lambda: "loaded 9 " in newest_row(panel).get("counters", ""), timeout=5)
        assert len(panel.row_state()) == 1
        assert "nbproc-connection-connected" in panel.header._dom_classes
    finally:
        panel.close()
        proc.stop()


def test_a_stopped_processor_shows_as_such(updater):
    proc = Processor().start()
    panel = Panel(proc, updater=updater)
    try:
        proc.stop()
        eventually(lambda: "nbproc-connection-stopped" in panel.header._dom_classes, timeout=5)
    finally:
        panel.close()
