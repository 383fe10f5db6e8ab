"""Keep run output out of whatever notebook cell happens to be running.

User functions run on nbproc's worker threads while the user keeps working; a ``print`` there
would otherwise land in the unrelated cell that is executing (or in none). While a worker runs
a user function it binds a sink (a context variable, so ``async def`` functions awaited on the
engine's loop carry their run's sink too), and writes to ``sys.stdout`` / ``sys.stderr`` in that
context go to the run's log, a line at a time. Everything else passes straight through.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

Sink = Callable[[str, str], None]  # (level, line)


class _Route:
    """Where one run's output goes, and its partial lines per stream."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.partial: dict[str, str] = {}
        self.lock = threading.Lock()

    def write(self, level: str, text: str) -> None:
        with self.lock:
            pending = self.partial.pop(level, "") + text
            *lines, rest = pending.split("\n")
            if rest:
                self.partial[level] = rest
        for line in lines:
            if line.strip():
                self.sink(level, line)

    def flush_partial(self) -> None:
        with self.lock:
            partial, self.partial = self.partial, {}
        for level, text in partial.items():
            if text.strip():
                self.sink(level, text)


_route: contextvars.ContextVar[_Route | None] = contextvars.ContextVar(
    "nbproc_output_route", default=None
)
_lock = threading.Lock()


class RoutedStream(io.TextIOBase):
    """Wraps a real stream; writes made in a routed context go to that run's log instead."""

    def __init__(self, original: Any, level: str) -> None:
        self.original = original
        self.level = level

    def write(self, text: str) -> int:
        route = _route.get()
        if route is None:
            return self.original.write(text)
        route.write(self.level, text)
        return len(text)

    def flush(self) -> None:
        if _route.get() is None:
            with contextlib.suppress(Exception):
                self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.original, "encoding", "utf-8")

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


def install_output_routing() -> None:
    """Wrap ``sys.stdout`` and ``sys.stderr`` (idempotent)."""
    with _lock:
        if not isinstance(sys.stdout, RoutedStream):
            sys.stdout = RoutedStream(sys.stdout, "normal")
        if not isinstance(sys.stderr, RoutedStream):
            sys.stderr = RoutedStream(sys.stderr, "warning")


def uninstall_output_routing() -> None:
    with _lock:
        if isinstance(sys.stdout, RoutedStream):
            sys.stdout = sys.stdout.original
        if isinstance(sys.stderr, RoutedStream):
            sys.stderr = sys.stderr.original


@contextlib.contextmanager
def routed_to(sink: Sink) -> Iterator[None]:
    """Send output made in this context to ``sink`` while the block runs (then flush partials)."""
    route = _Route(sink)
    token = _route.set(route)
    try:
        yield
    finally:
        _route.reset(token)
        route.flush_partial()
