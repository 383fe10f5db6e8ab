"""The one thread that writes to the monitoring panels' widgets.

Why one thread shared by every panel, and not one per panel: the IOPub rate limit that a flood of
widget messages trips is per kernel, not per panel, so the budget has to be enforced where all
panels meet. A user re-running ``%nbproc panel`` five times gets five panels, not five threads all
flushing on their own clock. The thread exists only while some panel is open (it exits when the
last one closes and is started again by the next), so a kernel without panels runs no extra thread.

Why a thread at all: widget state is only pushed to the page when someone calls into the widgets,
and the kernel's main thread is busy running cells (or idle, waiting for a request that never
comes); runs that end while nothing executes must still show up. ipykernel >= 6.29 sends comm
messages from any thread. Engine threads never touch widgets: their listener marks a panel dirty
and pokes this thread, which flushes at most :data:`MAX_FLUSHES_PER_SECOND` times a second however
many events arrive, and only while something changes (active runs are re-read every flush, idle
panels about once a second for the connection state and the cluster list).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

log = logging.getLogger("nbproc.panel")

MAX_FLUSHES_PER_SECOND = 10
IDLE_POLL = 1.0
THREAD_NAME = "nbproc-panel-updater"


class Flushable(Protocol):
    """What the updater needs from a panel."""

    def flush(self) -> None: ...

    def busy(self) -> bool: ...

    @property
    def closed(self) -> bool: ...


class Updater:
    """Flushes registered panels from one daemon thread, rate-limited and coalescing."""

    def __init__(self, interval: float = 1.0 / MAX_FLUSHES_PER_SECOND) -> None:
        self.interval = interval
        self.flushes = 0  # rounds done since creation (tests and benchmarks read it)
        self._panels: list[Flushable] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, panel: Flushable) -> None:
        with self._lock:
            if panel not in self._panels:
                self._panels.append(panel)
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=THREAD_NAME, daemon=True)
                self._thread.start()
        self.poke()

    def remove(self, panel: Flushable) -> None:
        with self._lock:
            if panel in self._panels:
                self._panels.remove(panel)
        self.poke()

    def poke(self) -> None:
        """Ask for a flush soon (thread-safe, never blocks: engine listeners call this)."""
        self._wake.set()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def panels(self) -> list[Flushable]:
        with self._lock:
            return list(self._panels)

    def _main(self) -> None:
        last = 0.0
        while True:
            panels = self._live_panels()
            if panels is None:
                return
            timeout = self.interval if any(_busy(p) for p in panels) else IDLE_POLL
            self._wake.wait(timeout)
            self._wake.clear()
            wait = last + self.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # coalesce: whatever happened meanwhile goes in one flush
            last = time.monotonic()
            for panel in self.panels():
                _flush(panel)
            self.flushes += 1

    def _live_panels(self) -> list[Flushable] | None:
        """The open panels, dropping closed ones; None (and the thread forgotten) when none."""
        with self._lock:
            self._panels = [p for p in self._panels if not p.closed]
            if not self._panels:
                self._thread = None
                return None
            return list(self._panels)


def _busy(panel: Flushable) -> bool:
    try:
        return panel.busy()
    except Exception:  # noqa: BLE001 - a broken panel must not stop the others
        return False


def _flush(panel: Flushable) -> None:
    try:
        panel.flush()
    except Exception:  # noqa: BLE001 - the updater must survive any one panel's failure
        log.exception("nbproc panel: refresh failed")


UPDATER = Updater()
