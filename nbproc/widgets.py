"""The monitoring panel: one ipywidgets view of a processor, its clusters and its runs.

Threads. Widgets are written by exactly one thread, the shared updater
(:mod:`nbproc.widgets_updater`), plus the thread that builds the panel (its first paint, before
anything else can see it). The engine calls :meth:`Panel._on_run_event` from its threads: that
only sets a flag and pokes the updater. Button clicks arrive on the kernel's shell thread: they
record what to show (a selection, a message) or start a short-lived action thread for the network
call (provisioning through the core, cancelling), so a slow core never blocks the kernel and an
error lands in the panel's message line instead of a random cell.

Volume. A flush only sets values that changed, each widget inside ``hold_sync`` so several
changes cost one message; a run row has one widget that changes while the run is active (its
counters line), so a flush costs about one message per active run shown. At most
:data:`MAX_RUN_ROWS` rows (the newest runs) exist; rows that scroll off are closed, not hidden.
Results, logs and tracebacks are rendered truncated (see :mod:`nbproc.widgets_render`).

Without a kernel (plain Python, tests) everything is built and updated the same way; ``show()``
just displays nothing.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import ipywidgets as w
from ipywidgets.widgets.widget_string import HTMLStyle

from . import widgets_render as render
from .widgets_updater import IDLE_POLL, UPDATER, Updater

MAX_RUN_ROWS = 50
# A new row opens 7 widget models (and closes as many when it scrolls off): a burst of short runs
# must not turn into thousands of messages in one flush.
NEW_ROWS_PER_FLUSH = 5
RATE_SAMPLES = 11  # about one second of flushes: the window of the live items/s
LOG_REFRESH = 0.5  # seconds between two refreshes of the selected active run's log lines

__all__ = ["Panel", "MAX_RUN_ROWS", "parse_metadata"]


def parse_metadata(text: str) -> dict[str, str]:
    """``"k=v k2='a b'"`` -> ``{"k": "v", "k2": "a b"}``; a word without ``=`` is an error."""
    metadata: dict[str, str] = {}
    for pair in shlex.split(text or ""):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"metadata is key=value pairs separated by spaces, got {pair!r}")
        metadata[key] = value
    return metadata


def _set(widget: w.Widget, **values: Any) -> bool:
    """Set only the traits whose value changed, in one state message; True if anything changed."""
    changed = {k: v for k, v in values.items() if getattr(widget, k) != v}
    if not changed:
        return False
    with widget.hold_sync():
        for name, value in changed.items():
            setattr(widget, name, value)
    return True


def _close_tree(widget: w.Widget | None, keep: frozenset[w.Widget] = frozenset()) -> None:
    """Close a widget with its children, layout and style (each is a model of its own), except
    the shared layouts and styles in ``keep``."""
    if widget is None:
        return
    for child in getattr(widget, "children", ()) or ():
        _close_tree(child, keep)
    for part in ("layout", "style"):
        sub = getattr(widget, part, None)
        if isinstance(sub, w.Widget) and sub not in keep:
            sub.close()
    widget.close()


class _Shared:
    """Layouts and styles that every run row uses: one model each instead of one per row, so a
    row costs 7 comm opens rather than 17 (rows come and go with runs)."""

    def __init__(self) -> None:
        self.row = w.Layout(align_items="center", grid_gap="0.8em")
        self.button = w.Layout(width="auto", min_width="4.5em")
        self.html = w.Layout()
        self.html_style = HTMLStyle()
        self.button_style = w.ButtonStyle()
        self.all = frozenset([self.row, self.button, self.html, self.html_style, self.button_style])

    def html_widget(self, *classes: str, value: str = "") -> w.HTML:
        return w.HTML(value=value, layout=self.html, style=self.html_style, _dom_classes=classes)

    def close(self) -> None:
        for widget in self.all:
            widget.close()


def _nothing() -> None:
    pass


def _spawn(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="nbproc-panel-action", daemon=True).start()


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _html(*classes: str, value: str = "") -> w.HTML:
    return w.HTML(value=value, _dom_classes=classes)


class _RunRow:
    """One run's line: id (selects it), cluster, coloured status, live counters, Cancel."""

    def __init__(self, run: Any, panel: Panel) -> None:
        shared = self.shared = panel.shared
        self.run = run
        self.final = False
        self._samples: deque[tuple[float, int]] = deque(maxlen=RATE_SAMPLES)
        self.select = w.Button(
            description=f"#{run.run_id}",
            tooltip="show this run's logs, statistics and result",
            layout=shared.button,
            style=shared.button_style,
            _dom_classes=("nbproc-select",),
        )
        self.select.on_click(lambda _b: panel.select(run.key))
        self.cluster = shared.html_widget(
            "nbproc-run-cluster", value=render.esc(f"{run.module}/{run.name}")
        )
        self.status = shared.html_widget("nbproc-status")
        self.counters = shared.html_widget("nbproc-counters")
        self.cancel = w.Button(
            description="Cancel",
            button_style="warning",
            layout=w.Layout(width="auto"),  # its own: hidden when the run ends
            style=shared.button_style,
            _dom_classes=("nbproc-cancel",),
        )
        self.cancel.on_click(lambda _b: panel.cancel_run(run))
        self.box = w.HBox(
            [self.select, self.cluster, self.status, self.counters, self.cancel],
            layout=shared.row,
            _dom_classes=("nbproc-run-row", f"nbproc-run-{run.run_id}"),
        )
        self.refresh()

    def refresh(self) -> None:
        """Show the run's current state; a run seen done is final and never read again."""
        done = self.run.done  # read first: once set, everything the snapshot reads is settled
        snap = self.run.snapshot()
        status = snap.status.value
        _set(
            self.status,
            value=render.status_html(snap.status),
            _dom_classes=("nbproc-status", f"nbproc-status-{status}"),
        )
        _set(self.counters, value=render.counters_html(snap, self._rate(snap)))
        if done or snap.status.is_terminal:
            _set(self.cancel.layout, display="none")
        self.final = done

    def _rate(self, snap: Any) -> float | None:
        """Items/s through transform over the last second, as this row saw it (None when done:
        the snapshot's run average is then the right figure)."""
        if snap.status.is_terminal:
            return None
        now = time.monotonic()
        self._samples.append((now, snap.transformed))
        t0, n0 = self._samples[0]
        return (snap.transformed - n0) / (now - t0) if now - t0 > 0.2 else None

    def mark_selected(self, selected: bool) -> None:
        _set(self.select, button_style="info" if selected else "")

    def close(self) -> None:
        _close_tree(self.box, keep=self.shared.all)


class _ClusterRow:
    """One cluster: what it is, a metadata box and a Run button (provisions through the core)."""

    def __init__(self, cluster: Any, panel: Panel) -> None:
        self.cluster = cluster
        self.label = _html("nbproc-cluster")
        self.metadata = w.Text(
            placeholder="metadata: key=value key2=value2",
            layout=w.Layout(width="22em"),
            _dom_classes=("nbproc-metadata",),
        )
        self.run = w.Button(
            description="Run",
            button_style="success",
            tooltip="provision a run through the core, as an operator would",
            layout=w.Layout(width="auto"),
            _dom_classes=("nbproc-run-button",),
        )
        self.run.on_click(lambda _b: panel.provision(self.cluster, self.metadata.value))
        self.box = w.HBox(
            [self.label, self.metadata, self.run],
            layout=w.Layout(align_items="center", grid_gap="0.8em"),
            _dom_classes=("nbproc-cluster-row", f"nbproc-cluster-{cluster.name}"),
        )
        self.update(cluster)

    def update(self, cluster: Any) -> None:
        self.cluster = cluster
        mounted = "mounted" if cluster.mount else "not mounted"
        text = (
            f"<b>{render.esc(cluster.module)}/{render.esc(cluster.name)}</b> · "
            f"{render.esc(cluster.mode.value)} · {render.esc(cluster.on_load.value)} · {mounted}"
        )
        _set(self.label, value=text)

    def close(self) -> None:
        _close_tree(self.box)


class Panel:
    """A live view of one processor; build as many as you like, :meth:`close` the ones you drop."""

    def __init__(
        self, processor: Any, *, updater: Updater = UPDATER, max_rows: int = MAX_RUN_ROWS
    ) -> None:
        self.processor = processor
        self.max_rows = max(1, max_rows)
        self._updater = updater
        self._lock = threading.RLock()
        self._closed = False
        self._runs_dirty = True
        self._message = ""
        self._rows: dict[int, _RunRow] = {}
        self._shown: tuple[int, ...] = ()
        self._cluster_rows: dict[tuple[str, str], _ClusterRow] = {}
        self._selected: int | None = None  # a run key, or None: follow the newest run
        self._detail = _DetailState()
        self._next_idle = 0.0
        self._shown_in: int | None = None
        self._engine: Any = None
        self._unsubscribe: Callable[[], None] = _nothing
        self._build()
        self.flush()
        updater.add(self)

    # -- widgets -------------------------------------------------------------------------------
    def _build(self) -> None:
        self.shared = _Shared()
        self.header = _html("nbproc-header")
        self.message = _html("nbproc-message")
        self.clusters_box = w.VBox(_dom_classes=("nbproc-clusters",))
        self.no_clusters = _html(
            "nbproc-no-clusters", value="<i>no clusters yet: define one with %%cluster NAME</i>"
        )
        self.runs_box = w.VBox(_dom_classes=("nbproc-runs",))
        self.more_runs = _html("nbproc-more-runs")
        self.detail_title = _html("nbproc-detail-title")
        self.detail_statistics = _html("nbproc-statistics")
        self.detail_error = _html("nbproc-traceback")
        self.detail_result = _html("nbproc-result")
        self.detail_logs = _html("nbproc-logs")
        self.detail = w.VBox(
            [
                self.detail_title,
                self.detail_statistics,
                self.detail_error,
                self.detail_result,
                self.detail_logs,
            ],
            _dom_classes=("nbproc-detail",),
        )
        self.widget = w.VBox(
            [
                _html("nbproc-style", value=render.PANEL_CSS),
                self.header,
                self.message,
                _html("nbproc-section", value="<b>Clusters</b>"),
                self.clusters_box,
                _html("nbproc-section", value="<b>Runs</b> (newest first)"),
                self.runs_box,
                self.more_runs,
                _html("nbproc-section", value="<b>Selected run</b>"),
                self.detail,
            ],
            _dom_classes=("nbproc-panel",),
        )

    def show(self) -> Panel:
        """Display the panel in the notebook (nothing happens outside a kernel)."""
        if _in_kernel():
            from IPython import get_ipython
            from IPython.display import display

            display(self.widget)
            self._shown_in = getattr(get_ipython(), "execution_count", None)
        return self

    def _ipython_display_(self) -> None:
        """``nbproc.panel()`` as a cell's last line shows it once, not twice."""
        from IPython import get_ipython

        shell = get_ipython()
        if self._shown_in is not None and self._shown_in == getattr(shell, "execution_count", 0):
            self._shown_in = None
            return
        self.show()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._rows)} runs shown"
        return (
            f"<nbproc Panel of {self.processor.url if self.processor.running else '?'} ({state})>"
        )

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop updating and close every widget of this panel (other panels are unaffected)."""
        with self._lock:
            if self._closed:
                return
            self._shut()

    def _shut(self) -> None:
        """Unsubscribe, leave the updater, close every widget (holding the lock)."""
        self._closed = True
        self._unsubscribe()
        self._unsubscribe = _nothing
        self._updater.remove(self)
        rows = list(self._rows.values()) + list(self._cluster_rows.values())
        self._rows.clear()
        self._cluster_rows.clear()
        for row in rows:
            row.close()
        _close_tree(self.widget)
        _close_tree(self.no_clusters)
        self.shared.close()

    # -- events and actions (any thread) ---------------------------------------------------------------
    def _on_run_event(self, run: Any) -> None:
        """Engine listener, called on engine threads: mark dirty and poke, nothing more."""
        self._runs_dirty = True
        self._updater.poke()

    def select(self, key: int | None) -> None:
        """Show run ``key`` (a run's local key) in the detail area; None follows the newest run."""
        self._selected = key
        self._updater.poke()

    def provision(self, cluster: Any, metadata_text: str = "") -> None:
        """Ask the core for a run of ``cluster``, on an action thread; the outcome is a message."""
        try:
            metadata = parse_metadata(metadata_text)
        except ValueError as exc:
            self._say(f"not provisioned: {exc}", error=True)
            return
        where = f"{cluster.module}/{cluster.name}"
        self._say(f"provisioning {where} through the core…")

        def action() -> None:
            try:
                run_id = self.processor.provision(cluster.name, cluster.module, metadata=metadata)
            except Exception as exc:  # noqa: BLE001 - shown in the panel, never raised in a cell
                self._say(f"{where} not provisioned: {type(exc).__name__}: {exc}", error=True)
            else:
                self._say(f"run {run_id} of {where} provisioned through the core")

        _spawn(action)

    def cancel_run(self, run: Any) -> None:
        """Cancel ``run`` on an action thread (a cancel returns at once; the row follows)."""

        def action() -> None:
            try:
                run.cancel()
            except Exception as exc:  # noqa: BLE001 - shown in the panel
                self._say(f"run {run.run_id} not cancelled: {exc}", error=True)
            else:
                self._say(f"run {run.run_id}: cancelling")

        _spawn(action)

    def _say(self, text: str, error: bool = False) -> None:
        style = ' style="color:#dc3545"' if error else ""
        self._message = f"<span{style}>{render.esc(text)}</span>"
        self._updater.poke()

    # -- flushing (the updater thread) ---------------------------------------------------------
    def busy(self) -> bool:
        """Whether the next flush is due soon: a run is still going or an event is pending."""
        with self._lock:
            return self._runs_dirty or any(not row.final for row in self._rows.values())

    def flush(self) -> None:
        """Bring every widget up to date, sending only what changed."""
        with self._lock:
            if self._closed:
                return
            if self.widget.comm is None:  # someone closed our widget: close the rest, stop
                self._shut()
                return
            self._follow_engine()
            now = time.monotonic()
            idle_due = now >= self._next_idle
            if idle_due:
                self._next_idle = now + IDLE_POLL
                self._refresh_header()
                self._refresh_clusters()
            if idle_due or self.busy():
                self._refresh_runs()
            _set(self.message, value=self._message)
            self._refresh_detail(now, idle_due)

    def _follow_engine(self) -> None:
        """Listen to the processor's current engine: a restarted processor has a new one."""
        try:
            engine = self.processor.engine
        except RuntimeError:  # never started
            engine = None
        if engine is self._engine:
            return
        self._unsubscribe()
        self._engine = engine
        self._unsubscribe = _nothing if engine is None else engine.add_listener(self._on_run_event)
        self._runs_dirty = True
        self._forget_rows()  # run keys restart with each engine

    def _forget_rows(self) -> None:
        rows, self._rows, self._shown = list(self._rows.values()), {}, ()
        if rows:
            self.runs_box.children = ()
        for row in rows:
            row.close()
        self._selected = None
        self._detail.reset(None)

    def _refresh_header(self) -> None:
        state = render.connection_state(self.processor)
        _set(
            self.header,
            value=render.header_html(self.processor, state),
            _dom_classes=("nbproc-header", f"nbproc-connection-{state}"),
        )

    def _refresh_clusters(self) -> None:
        clusters = {c.key: c for c in self.processor.clusters()}
        for key in [k for k in self._cluster_rows if k not in clusters]:
            self._cluster_rows.pop(key).close()
        for key, cluster in clusters.items():
            row = self._cluster_rows.get(key)
            if row is None:
                self._cluster_rows[key] = _ClusterRow(cluster, self)
            elif row.cluster is not cluster:
                row.update(cluster)
        boxes = tuple(self._cluster_rows[k].box for k in sorted(self._cluster_rows))
        boxes = boxes or (self.no_clusters,)
        if boxes != tuple(self.clusters_box.children):
            self.clusters_box.children = boxes

    def _refresh_runs(self) -> None:
        self._runs_dirty = False  # before reading: an event during this flush means another one
        runs = self._engine.runs() if self._engine is not None else []
        shown = runs[: self.max_rows]
        keys = []
        budget = NEW_ROWS_PER_FLUSH
        for run in shown:
            row = self._rows.get(run.key)
            if row is None:
                if not budget:
                    self._runs_dirty = True  # the rest next time: a burst is spread out
                    continue
                budget -= 1
                self._rows[run.key] = _RunRow(run, self)
            elif not row.final:
                row.refresh()
            keys.append(run.key)
        keys = tuple(keys)
        if keys != self._shown:
            self.runs_box.children = tuple(self._rows[k].box for k in keys)
            for key in set(self._rows) - set(keys):
                self._rows.pop(key).close()
            self._shown = keys
        hidden = len(runs) - len(shown)
        _set(self.more_runs, value=f"<i>{hidden:,} older runs not shown</i>" if hidden else "")

    # -- the selected run --------------------------------------------------------------------------
    def _selected_run(self) -> Any:
        if self._selected is not None and self._selected in self._rows:
            return self._rows[self._selected].run
        return self._rows[self._shown[0]].run if self._shown else None

    def _refresh_detail(self, now: float, idle_due: bool) -> None:
        run = self._selected_run()
        state = self._detail
        for key, row in self._rows.items():
            row.mark_selected(run is not None and key == run.key and self._selected is not None)
        if run is None:
            _set(self.detail_title, value="<i>no runs yet</i>")
            return
        if state.key != run.key:
            state.reset(run.key)
        done = run.done
        if not state.final:
            self._show_run_summary(run, done)
        if state.logs_due(now, idle_due or done):
            self._show_logs(run)
        state.final = done

    def _show_run_summary(self, run: Any, done: bool) -> None:
        meta = " ".join(f"{k}={v}" for k, v in (getattr(run, "metadata", None) or {}).items())
        title = (
            f"<b>run #{run.run_id}</b> {render.esc(run.module)}/{render.esc(run.name)} "
            f"{render.status_html(run.status)}"
            + (f" · metadata {render.esc(meta)}" if meta else "")
        )
        _set(self.detail_title, value=title)
        if not done:
            _set(self.detail_statistics, value="")
            _set(self.detail_error, value="")
            _set(self.detail_result, value="<i>the result shows when the run ends</i>")
            return
        _set(self.detail_statistics, value=render.statistics_html(run.statistics()))
        _set(self.detail_error, value=render.error_html(run.error))
        evicted = bool(getattr(run, "result_evicted", False))
        _set(self.detail_result, value=render.result_html(run.result, evicted))

    def _show_logs(self, run: Any) -> None:
        lines = run.logs
        signature = (len(lines), lines[-1] if lines else None)
        if signature != self._detail.log_signature:
            self._detail.log_signature = signature
            _set(self.detail_logs, value=render.logs_html(lines))

    # -- tests and notebooks ---------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[Panel], bool], timeout: float = 10.0) -> bool:
        """Poll ``predicate(self)`` until true (or ``timeout``); lets a notebook wait on the view."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self):
                    return True
            time.sleep(0.02)
        return False

    def row_state(self) -> list[Mapping[str, str]]:
        """What each run row shows (status class and counters text), newest first."""
        with self._lock:
            return [
                {
                    "run_id": str(self._rows[k].run.run_id),
                    "status": self._rows[k].status._dom_classes[-1].removeprefix("nbproc-status-"),
                    "counters": self._rows[k].counters.value,
                }
                for k in self._shown
            ]


class _DetailState:
    """What the detail area last showed, so that it re-renders only on change."""

    def __init__(self) -> None:
        self.reset(None)

    def reset(self, key: int | None) -> None:
        self.key = key
        self.final = False
        self.log_signature: Any = None
        self.next_logs = 0.0

    def logs_due(self, now: float, force: bool) -> bool:
        """Log lines refresh at most every :data:`LOG_REFRESH` s while a run is active."""
        if force or now >= self.next_logs or self.log_signature is None:
            self.next_logs = now + LOG_REFRESH
            return True
        return False
