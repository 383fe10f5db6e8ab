"""An asyncio event loop on its own daemon thread.

nbproc must answer the core while a notebook cell is busy for minutes, so its server never runs
on the kernel's loop (and never through ``nest_asyncio``). This is the small piece that owns such
a loop: start it, run coroutines on it from any other thread, stop it and join the thread.
Modelled on dask.distributed's ``LoopRunner``: startup errors surface in the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThreadError(RuntimeError):
    """A synchronous call was made in a way that would deadlock or cannot be served."""


class LoopThread:
    """Owns one event loop running on one daemon thread."""

    def __init__(self, name: str = "nbproc-loop") -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise LoopThreadError(f"{self.name} is not running")
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def start(self) -> None:
        """Start the thread and return once its loop is running."""
        if self.running:
            return
        ready = threading.Event()
        loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            try:
                loop.run_forever()
            finally:
                _cancel_leftovers(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait()

    def run(
        self, coro_fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, timeout: float | None = 30
    ) -> T:
        """Run ``coro_fn(*args)`` on the loop and wait for its result in the calling thread.

        Called from the loop's own thread this would wait forever on itself: that raises instead.
        """
        if self.in_loop_thread():
            raise LoopThreadError(
                f"a synchronous nbproc call was made from {self.name}'s own thread, where it would "
                "deadlock; use the async API (await ...) there instead"
            )
        future = self.submit(coro_fn(*args))
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(
                f"{getattr(coro_fn, '__name__', coro_fn)} did not finish in {timeout} s"
            ) from None

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        """Schedule a coroutine on the loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Thread-safe ``call_soon``; a no-op once the loop is closed."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the loop and join its thread (pending tasks are cancelled, not awaited forever)."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if self.in_loop_thread():
            raise LoopThreadError(f"{self.name} cannot stop itself from its own thread")
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None
        self._loop = None


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
