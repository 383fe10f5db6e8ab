"""Keep run output out of whatever notebook cell happens to be running.

User functions run on nbproc's worker threads while the user keeps working; a ``print`` there
would otherwise land in the unrelated cell that is executing (or in none). While a worker runs
a user function it binds a sink for its thread, and writes to ``sys.stdout`` / ``sys.stderr``
from that thread go to the run's log, a line at a time. Other threads are untouched.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

Sink = Callable[[str, str], None]  # (level, line)

_local = threading.local()
_lock = threading.Lock()


class RoutedStream(io.TextIOBase):
    """Wraps a real stream; writes from a thread with a bound sink go to that sink instead."""

    def __init__(self, original: Any, level: str) -> None:
        self.original = original
        self.level = level

    def write(self, text: str) -> int:
        sink: Sink | None = getattr(_local, "sink", None)
        if sink is None:
            return self.original.write(text)
        buffer = _buffer(self.level)
        buffer.append(text)
        if "\n" in text:
            lines = "".join(buffer).split("\n")
            buffer[:] = [lines.pop()] if lines[-1] else []
            for line in lines:
                if line:
                    sink(self.level, line)
        return len(text)

    def flush(self) -> None:
        if getattr(_local, "sink", None) is None:
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


def _buffer(level: str) -> list[str]:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    return buffers.setdefault(level, [])


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
    """Send this thread's stdout/stderr to ``sink`` while the block runs (flushing partial lines)."""
    previous = getattr(_local, "sink", None)
    _local.sink = sink
    try:
        yield
    finally:
        for level, buffer in (getattr(_local, "buffers", None) or {}).items():
            if buffer and "".join(buffer):
                sink(level, "".join(buffer))
            buffer.clear()
        _local.sink = previous
