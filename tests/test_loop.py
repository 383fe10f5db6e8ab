"""The loop thread: started and stopped cleanly, and never waited on from itself."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nbproc.loop import LoopThread, LoopThreadError


def test_start_run_stop_joins_the_thread():
    lt = LoopThread("nbproc-test-loop")
    lt.start()

    async def where() -> str:
        return threading.current_thread().name

    assert lt.run(where) == "nbproc-test-loop"
    lt.stop()
    assert not any(t.name == "nbproc-test-loop" for t in threading.enumerate())
    lt.stop()  # idempotent


def test_errors_are_raised_in_the_caller():
    lt = LoopThread("nbproc-test-loop")
    lt.start()
    try:

        async def boom() -> None:
            raise OSError("address already in use")

        with pytest.raises(OSError, match="already in use"):
            lt.run(boom)

        async def slow() -> None:
            await asyncio.sleep(10)

        with pytest.raises(TimeoutError, match="did not finish"):
            lt.run(slow, timeout=0.05)
    finally:
        lt.stop()


def test_a_synchronous_call_from_the_loop_thread_raises_instead_of_deadlocking():
    lt = LoopThread("nbproc-test-loop")
    lt.start()
    try:

        async def inner() -> int:
            return 1

        async def outer() -> None:
            lt.run(inner)  # would wait forever on itself

        with pytest.raises(LoopThreadError, match="would deadlock"):
            lt.run(outer)
    finally:
        lt.stop()


def test_pending_tasks_are_cancelled_on_stop():
    lt = LoopThread("nbproc-test-loop")
    lt.start()
    cancelled = threading.Event()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    lt.submit(forever())
    assert started.wait(5)
    lt.stop()
    assert cancelled.is_set()
