"""Reusable daemon threads for run code.

A run uses a handful of threads (its supervisor, extract, and each worker), and a processor that
gets hundreds of small runs would create and destroy them by the thousand, all while its server
competes with them for the GIL. :class:`ThreadPool` keeps finished threads parked for a while and
hands them the next target, behind a ``threading.Thread``-like handle (``start``, ``join``,
``is_alive``, ``name``), so the engine's code does not change shape. A pooled thread renames
itself after the job it runs, so thread listings and profilers still say what it is doing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

IDLE_SECONDS = 10.0  # a parked thread exits after this long without work


class PooledThread:
    """A job for the pool, used like a ``threading.Thread``."""

    def __init__(
        self, pool: ThreadPool, target: Callable[..., Any], args: tuple, name: str
    ) -> None:
        self._pool = pool
        self._target = target
        self._args = args
        self.name = name
        self._started = False
        self._done = threading.Event()
        self.ident: int | None = None

    def start(self) -> None:
        if self._started:
            raise RuntimeError("threads can only be started once")
        self._started = True
        self._pool._dispatch(self)

    def join(self, timeout: float | None = None) -> None:
        if not self._started:
            raise RuntimeError("cannot join thread before it is started")
        self._done.wait(timeout)

    def is_alive(self) -> bool:
        return self._started and not self._done.is_set()

    def _run(self) -> None:
        current = threading.current_thread()
        self.ident = current.ident
        parked_name, current.name = current.name, self.name
        try:
            self._target(*self._args)
        finally:
            current.name = parked_name
            self._done.set()


class _Parked:
    """One parked thread: where its next job is handed over."""

    def __init__(self) -> None:
        self.job: PooledThread | None = None
        self.wake = threading.Event()


class ThreadPool:
    """Daemon threads that run one job at a time and wait ``idle`` seconds for the next."""

    def __init__(self, name: str = "nbproc-pooled", idle: float = IDLE_SECONDS) -> None:
        self.name = name
        self.idle = idle
        self._lock = threading.Lock()
        self._parked: list[_Parked] = []
        self._threads: set[threading.Thread] = set()
        self._count = 0
        self._closed = False

    def thread(self, target: Callable[..., Any], *args: Any, name: str) -> PooledThread:
        return PooledThread(self, target, args, name)

    def _dispatch(self, job: PooledThread) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the thread pool is shut down")
            slot = self._parked.pop() if self._parked else None
            if slot is None:
                self._count += 1
                slot = _Parked()
                thread = threading.Thread(
                    target=self._main, args=(slot,), name=f"{self.name}-{self._count}", daemon=True
                )
                self._threads.add(thread)
            else:
                thread = None
            slot.job = job
            slot.wake.set()
        if thread is not None:
            thread.start()

    def _main(self, slot: _Parked) -> None:
        try:
            while True:
                if not slot.wake.wait(self.idle):
                    with self._lock:
                        if slot.wake.is_set():  # handed a job as the wait timed out
                            continue
                        self._parked.remove(slot)
                        return
                slot.wake.clear()
                job, slot.job = slot.job, None
                if job is None:  # shutdown
                    return
                job._run()
                with self._lock:
                    if self._closed:
                        return
                    self._parked.append(slot)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def shutdown(self, timeout: float = 2.0) -> None:
        """Wake and end the parked threads; join every thread (busy ones up to ``timeout``)."""
        with self._lock:
            self._closed = True
            parked, self._parked = self._parked, []
            threads = list(self._threads)
        for slot in parked:
            slot.job = None
            slot.wake.set()
        for thread in threads:
            thread.join(timeout)
