"""The narrow interface between the run engine and whoever tells the core about runs.

The engine knows nothing about HTTP; the core client knows nothing about workers. The engine
calls these methods from its own threads; implementations must be thread-safe and must not block
on the network except in the two cache calls, which user code calls and waits for on purpose.
"""

from __future__ import annotations

from typing import Any, Protocol

from .protocol import LogLevel, Statistics, Status


class RunReporter(Protocol):
    def report(self, run_id: int, status: Status, statistics: Statistics, final: bool) -> None:
        """Progress (``final=False``, may be coalesced) or the final report (sent exactly once,
        retried until delivered, and after every log line of the run)."""

    def log(self, run_id: int, level: LogLevel, message: str) -> None:
        """A log line of a run; delivered in order, before the run's final report."""

    def cache_save(self, value: Any, expiry_minutes: float = 0) -> str:
        """Store ``value`` in the core's cache and return its key (blocking)."""

    def cache_load(self, key: str) -> Any:
        """The cached value for ``key``; raises KeyError when unknown or expired (blocking)."""


class LocalReporter:
    """A reporter with no core behind it: keeps a local cache so runs work offline."""

    def __init__(self) -> None:
        import itertools
        import threading

        self._cache: dict[str, Any] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()

    def report(self, run_id: int, status: Status, statistics: Statistics, final: bool) -> None:
        pass

    def log(self, run_id: int, level: LogLevel, message: str) -> None:
        pass

    def cache_save(self, value: Any, expiry_minutes: float = 0) -> str:
        with self._lock:
            key = f"local-{next(self._keys)}"
            self._cache[key] = value
        return key

    def cache_load(self, key: str) -> Any:
        with self._lock:
            return self._cache[key]
