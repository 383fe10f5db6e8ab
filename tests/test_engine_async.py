"""``async def`` user functions run on the engine's own loop thread, never the caller's."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from nbproc.cluster import DROP, Cluster
from nbproc.engine import Engine
from nbproc.protocol import Status


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.005)
    return cond()


@pytest.fixture
def engine():
    eng = Engine(progress_interval=0.05)
    yield eng
    eng.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("nbproc-")]


def test_async_generator_transform_and_load(engine):
    threads = set()
    loaded = []

    async def extract(h, m):
        for i in range(200):
            if i % 50 == 0:
                await asyncio.sleep(0)
            yield i

    async def transform(h, m, x):
        threads.add(threading.current_thread().name)
        await asyncio.sleep(0)
        return DROP if x % 2 else x

    async def load(h, m, x):
        threads.add(threading.current_thread().name)
        loaded.append(x)

    c = Cluster("a", extract, transform, load, on_load="CompleteAndPush", t_functions=2)
    run = engine.submit(c, 1)
    assert run.wait(10) == Status.COMPLETED, run.error
    assert sorted(loaded) == list(range(0, 200, 2))
    assert threads == {"nbproc-async"}
    assert run.statistics().total_dropped == 100


def test_async_extract_with_out_and_async_hooks(engine):
    calls = []

    async def setup(h, m):
        calls.append("setup")

    async def extract(h, m, out):
        for i in range(100):
            await out.apush(i)
        out.push(100)

    async def load(h, m, df):
        calls.append(("load", len(df)))
        return len(df)

    async def teardown(h, m):
        calls.append("teardown")

    run = engine.submit(Cluster("b", extract, None, load, setup=setup, teardown=teardown), 2)
    assert run.wait(10) == Status.COMPLETED, run.error
    assert calls == ["setup", ("load", 101), "teardown"]
    assert run.result == 101


def test_async_crash_and_cancel(engine):
    async def bad(h, m, x):
        raise KeyError("missing")

    run = engine.submit(Cluster("c", lambda h, m, out: out.push(1), bad), 3)
    assert run.wait(10) == Status.CRASHED and "KeyError" in run.error

    started = threading.Event()

    async def forever(h, m, out):
        started.set()
        while True:
            await asyncio.sleep(0.01)

    run = engine.submit(Cluster("d", forever), 4)
    assert started.wait(5)
    assert wait_for(lambda: run.status == Status.ACTIVE)
    run.cancel()
    assert run.wait(5) == Status.CANCELLED
