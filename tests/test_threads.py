"""The pool of reusable threads behind the engine's run threads."""

from __future__ import annotations

import threading
import time

import pytest

from nbproc.threads import ThreadPool


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbproc-test-pool")]


def test_threads_are_reused_and_named_after_their_job():
    pool = ThreadPool("nbproc-test-pool")
    seen: list[tuple[int, str]] = []

    def job() -> None:
        seen.append((threading.get_ident(), threading.current_thread().name))

    for i in range(5):
        handle = pool.thread(job, name=f"job-{i}")
        handle.start()
        handle.join(5)
        assert not handle.is_alive()
    assert [name for _, name in seen] == [f"job-{i}" for i in range(5)]
    assert len({ident for ident, _ in seen}) == 1  # one thread did all five, one after another
    pool.shutdown()
    assert pool_threads() == []


def test_concurrent_jobs_get_their_own_threads_and_shutdown_joins_them():
    pool = ThreadPool("nbproc-test-pool")
    gate = threading.Event()
    idents: set[int] = set()

    def job() -> None:
        idents.add(threading.get_ident())
        gate.wait(5)

    handles = [pool.thread(job, name=f"job-{i}") for i in range(3)]
    for h in handles:
        h.start()
    time.sleep(0.05)
    assert all(h.is_alive() for h in handles)
    gate.set()
    for h in handles:
        h.join(5)
    assert len(idents) == 3
    pool.shutdown()
    assert pool_threads() == []
    with pytest.raises(RuntimeError, match="shut down"):
        pool.thread(job, name="late").start()


def test_idle_threads_exit_on_their_own():
    pool = ThreadPool("nbproc-test-pool", idle=0.05)
    handle = pool.thread(lambda: None, name="once")
    handle.start()
    handle.join(5)
    deadline = time.monotonic() + 5
    while pool_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool_threads() == []
    pool.shutdown()


def test_handles_behave_like_threads():
    pool = ThreadPool("nbproc-test-pool")
    handle = pool.thread(lambda: None, name="x")
    with pytest.raises(RuntimeError, match="before it is started"):
        handle.join()
    handle.start()
    with pytest.raises(RuntimeError, match="only be started once"):
        handle.start()
    handle.join(5)
    pool.shutdown()
