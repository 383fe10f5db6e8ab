"""The run engine: pipeline semantics, concurrency, crashes, cancel, backlog, reporting."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import numpy as np
import pandas as pd
import pytest

from nbproc import protocol
from nbproc.cluster import DROP, Cluster
from nbproc.engine import Engine, Metadata, run_local
from nbproc.protocol import LogLevel, RunConfig, Statistics, Status


class RecordingReporter:
    """Records every reporter call in order (a real implementation, not a mock)."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    def report(self, run_id: int, status: Status, statistics: Statistics, final: bool) -> None:
        with self._lock:
            self.events.append(("report", run_id, Status(status), statistics, final))

    def log(self, run_id: int, level: LogLevel, message: str) -> None:
        with self._lock:
            self.events.append(("log", run_id, LogLevel(level), message))

    def cache_save(self, value: Any, expiry_minutes: float = 0) -> str:
        with self._lock:
            key = f"k{len(self.cache) + 1}"
            self.cache[key] = value
        return key

    def cache_load(self, key: str) -> Any:
        with self._lock:
            return self.cache[key]

    def of(self, run_id: int) -> list[tuple[Any, ...]]:
        with self._lock:
            return [e for e in self.events if e[1] == run_id]

    def finals(self, run_id: int) -> list[tuple[Any, ...]]:
        return [e for e in self.of(run_id) if e[0] == "report" and e[4]]


def wait_for(cond, timeout: float = 5.0, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return cond()


@pytest.fixture
def reporter() -> RecordingReporter:
    return RecordingReporter()


@pytest.fixture
def engine(reporter):
    eng = Engine(reporter, progress_interval=0.05, stop_grace=2.0)
    yield eng
    eng.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("nbproc-")]


def gen_range(n):
    def extract(h, m):
        yield from range(n)

    return extract


def push_range(n):
    def extract(h, m, out):
        for i in range(n):
            if not out.push(i):
                return

    return extract


def submit_wait(engine, cluster, run_id=1, timeout=10, **kw):
    run = engine.submit(cluster, run_id, **kw)
    run.wait(timeout)
    return run


# ---------------------------------------------------------------------------------------------
# data flow


@pytest.mark.parametrize("extract", [gen_range(5000), push_range(5000)])
def test_complete_and_push_loads_every_item_once(engine, extract):
    seen = collections.Counter()
    lock = threading.Lock()

    def load(h, m, x):
        with lock:
            seen[x] += 1

    c = Cluster(
        "c",
        extract,
        lambda h, m, x: x * 2,
        load,
        on_load="CompleteAndPush",
        t_functions=3,
        l_functions=3,
    )
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    assert seen == collections.Counter(x * 2 for x in range(5000))
    s = run.statistics()
    assert (s.total_over_et, s.total_over_tl, s.total_processed, s.total_dropped) == (5000,) * 3 + (
        0,
    )


def test_drops_are_counted(engine):
    c = Cluster(
        "d",
        gen_range(100),
        lambda h, m, x: DROP if x % 10 == 0 else x,  # drops 10
        verify_et=lambda x: x % 2 == 0 or x == 5,  # drops 49 odd ones except 5
        verify_tl=lambda x: x != 4,  # drops 1
    )
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    s = run.statistics()
    assert s.total_over_et == 100
    assert s.total_dropped == 60
    assert s.total_over_tl == s.total_processed == 40
    assert sorted(run.result) == sorted(
        x for x in range(100) if (x % 2 == 0 or x == 5) and x % 10 and x != 4
    )


def test_wait_and_push_builds_dataframe_from_records(engine):
    batches = []

    def load(h, m, df):
        batches.append(df)
        return df["y"].sum()

    c = Cluster("w", gen_range(1000), lambda h, m, x: {"x": x, "y": x * 2}, load)
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    assert len(batches) == 1 and isinstance(batches[0], pd.DataFrame)
    assert list(batches[0].columns) == ["x", "y"] and len(batches[0]) == 1000
    assert batches[0]["x"].tolist() == list(range(1000))  # 1+1 workers keep the order
    assert run.result == sum(x * 2 for x in range(1000))
    assert run.statistics().total_processed == 1000


def test_wait_and_push_concatenates_dataframe_chunks(engine):
    df = pd.DataFrame({"a": np.arange(25_000), "b": np.ones(25_000)})

    def extract(h, m):
        for i in range(0, len(df), 10_000):
            yield df.iloc[i : i + 10_000]

    c = Cluster("f", extract, lambda h, m, d: d.assign(c=d["a"] * 2))
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    out = run.result
    assert isinstance(out, pd.DataFrame) and len(out) == 25_000
    assert out["c"].tolist() == (df["a"] * 2).tolist()
    assert out.index.tolist() == list(range(25_000))


def test_wait_and_push_non_tabular_items_give_a_list(engine):
    got = []
    c = Cluster("l", gen_range(10), lambda h, m, x: str(x), lambda h, m, b: got.append(b))
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    assert got == [[str(i) for i in range(10)]]


def test_wait_and_push_namedtuples_and_empty(engine):
    Row = collections.namedtuple("Row", "k v")
    run = submit_wait(engine, Cluster("n", gen_range(3), lambda h, m, x: Row(x, -x)))
    assert list(run.result.columns) == ["k", "v"] and run.result["v"].tolist() == [0, -1, -2]
    run = submit_wait(engine, Cluster("e", gen_range(0)), run_id=2)
    assert (
        run.status == Status.COMPLETED and isinstance(run.result, pd.DataFrame) and run.result.empty
    )


def test_plain_extract_may_return_items(engine):
    c = Cluster("r", lambda h, m, out: [1, 2, 3], lambda h, m, x: x + 1)
    run = submit_wait(engine, c)
    assert run.result == [2, 3, 4]


def test_complete_and_push_result_is_last_load_value(engine):
    total = [0]

    def load(h, m, x):
        total[0] += x
        return total[0]

    run = submit_wait(engine, Cluster("s", gen_range(100), None, load, on_load="CompleteAndPush"))
    assert run.result == sum(range(100))


def test_metadata_and_helper(engine, reporter):
    seen = {}

    def extract(h, m, out):
        seen["missing"] = m.get("nope")
        seen["limit"] = m["limit"]
        with pytest.raises(KeyError):
            m["nope"]
        key = h.save_to_cache({"a": 1})
        seen["cached"] = h.load_from_cache(key)
        seen["ids"] = (h.run_id, h.cluster, h.should_stop(), h.stopping)
        h.log("hello")
        h.warning("careful")
        out.push(1)

    run = submit_wait(engine, Cluster("meta", extract), run_id=7, metadata={"limit": "3"})
    assert run.status == Status.COMPLETED, run.error
    assert seen == {
        "missing": "",
        "limit": "3",
        "cached": {"a": 1},
        "ids": (7, "meta", False, False),
    }
    assert [(lv, msg) for _, lv, msg in run.logs] == [("normal", "hello"), ("warning", "careful")]
    logs = [e for e in reporter.of(7) if e[0] == "log"]
    assert [(e[2], e[3]) for e in logs] == [
        (LogLevel.NORMAL, "hello"),
        (LogLevel.WARNING, "careful"),
    ]
    assert isinstance(Metadata({"a": "b"}), collections.abc.Mapping)


# ---------------------------------------------------------------------------------------------
# concurrency


def test_transform_workers_really_run_in_parallel(engine):
    idents = set()

    def transform(h, m, x):
        idents.add(threading.get_ident())
        time.sleep(0.02)
        return x

    c = Cluster("t3", gen_range(30), transform, t_functions=3, max_t_functions=3)
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    assert len(idents) == 3
    assert run.statistics().transform_routines == 3


def test_slow_load_grows_load_workers_and_counts_breaches(engine):
    def load(h, m, x):
        time.sleep(0.005)

    c = Cluster(
        "grow",
        gen_range(300),
        None,
        load,
        on_load="CompleteAndPush",
        l_threshold=1,
        l_growth=2,
        max_l_functions=8,
    )
    run = submit_wait(engine, c, timeout=20)
    assert run.status == Status.COMPLETED, run.error
    s = run.statistics()
    assert s.load_routines > 1 and s.load_routines <= 8
    assert s.tl_threshold_breaches >= 1
    assert s.total_processed == 300


def test_config_overrides_worker_counts(engine):
    idents = set()

    def load(h, m, x):
        idents.add(threading.get_ident())
        time.sleep(0.01)

    c = Cluster("cfg", gen_range(20), None, load, on_load="CompleteAndPush", max_l_functions=4)
    cfg = RunConfig(l_channels=4, tl_threshold=100)
    run = submit_wait(engine, c, config=cfg)
    assert run.statistics().load_routines == 4 and len(idents) == 4


def test_slow_load_back_pressures_extract(engine):
    ahead = []

    def extract(h, m, out):
        for i in range(400):
            out.push(i)
            s = h._run.statistics()
            ahead.append(s.total_over_et - s.total_processed)

    def load(h, m, x):
        time.sleep(0.001)

    c = Cluster("bp", extract, None, load, on_load="CompleteAndPush", max_l_functions=1)
    run = submit_wait(engine, c, timeout=20)
    assert run.status == Status.COMPLETED, run.error
    assert max(ahead) < 100  # channels are bounded: extract cannot run far ahead


def test_trickling_stream_flows(engine):
    loaded = threading.Event()

    def extract(h, m, out):
        out.push(1)
        assert loaded.wait(5), "a single pushed item must reach load without more pushes"
        out.push(2)

    c = Cluster("trickle", extract, None, lambda h, m, x: loaded.set(), on_load="CompleteAndPush")
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error


# ---------------------------------------------------------------------------------------------
# hooks, crashes, cancel


def test_hooks_run_in_order(engine):
    calls = []
    c = Cluster(
        "hooks",
        lambda h, m, out: calls.append("extract") or out.push(1),
        lambda h, m, x: calls.append("transform") or x,
        lambda h, m, b: calls.append("load"),
        setup=lambda h, m: calls.append("setup"),
        teardown=lambda h, m: calls.append("teardown"),
    )
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    assert calls == ["setup", "extract", "transform", "load", "teardown"]


def test_crash_do_nothing(engine, reporter):
    torn = []

    def transform(h, m, x):
        if x == 50:
            raise ValueError("bad item 50")
        return x

    c = Cluster(
        "boom",
        gen_range(100),
        transform,
        lambda h, m, x: None,
        on_load="CompleteAndPush",
        teardown=lambda h, m: torn.append(1),
    )
    run = submit_wait(engine, c, run_id=3)
    assert run.status == Status.CRASHED
    assert "ValueError: bad item 50" in run.error and "Traceback" in run.error
    assert torn == [1]
    events = reporter.of(3)
    fatal = [e for e in events if e[0] == "log" and e[2] == LogLevel.FATAL]
    assert fatal and "bad item 50" in fatal[0][3]
    assert events[-1][0] == "report" and events[-1][2] == Status.CRASHED and events[-1][4]
    assert len(reporter.finals(3)) == 1
    assert run.snapshot().error == "ValueError: bad item 50"


def test_engine_survives_a_crash(engine):
    bad = Cluster("bad", gen_range(10), lambda h, m, x: 1 / 0)
    good = Cluster("good", gen_range(10), lambda h, m, x: x)
    assert submit_wait(engine, bad, 1).status == Status.CRASHED
    assert submit_wait(engine, good, 2).status == Status.COMPLETED
    assert submit_wait(engine, Cluster("ex", lambda h, m, o: 1 / 0), 3).status == Status.CRASHED
    assert submit_wait(engine, Cluster("su", gen_range(1), setup=lambda h, m: 1 / 0), 4).status == (
        Status.CRASHED
    )
    assert submit_wait(engine, good, 5).status == Status.COMPLETED


def test_restart_recovers_from_transient_failure(engine):
    attempts = []

    def extract(h, m):
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("flaky source")
        yield from range(10)

    c = Cluster("flaky", extract, on_crash="Restart", max_restarts=5)
    run = submit_wait(engine, c)
    assert run.status == Status.COMPLETED, run.error
    assert run.restarts == 2 and len(attempts) == 3
    assert run.result == list(range(10))
    assert run.statistics().total_processed == 10  # a fresh attempt, fresh counters


def test_restart_gives_up_after_the_limit(engine, reporter):
    setups = []
    c = Cluster(
        "dead",
        lambda h, m, out: 1 / 0,
        on_crash="Restart",
        max_restarts=2,
        setup=lambda h, m: setups.append(1),
    )
    run = submit_wait(engine, c, run_id=9)
    assert run.status == Status.CRASHED
    assert run.restarts == 2 and len(setups) == 3
    assert "ZeroDivisionError" in run.error
    assert len(reporter.finals(9)) == 1


def test_config_on_crash_overrides_cluster(engine):
    c = Cluster("oc", lambda h, m, out: 1 / 0, on_crash="Restart", max_restarts=2)
    run = submit_wait(engine, c, config=RunConfig(on_crash=protocol.OnCrash.DO_NOTHING))
    assert run.status == Status.CRASHED and run.restarts == 0


def test_cancel_stops_push_and_runs_teardown(engine, reporter):
    pushed = threading.Event()
    result = {}
    torn = []

    def extract(h, m, out):
        i = 0
        while out.push(i):
            i += 1
            pushed.set()
        result["push_false_at"] = i
        result["stopping"] = h.should_stop()

    c = Cluster(
        "cancel",
        extract,
        None,
        lambda h, m, x: time.sleep(0.001),
        on_load="CompleteAndPush",
        teardown=lambda h, m: torn.append(1),
    )
    run = engine.submit(c, 11)
    assert pushed.wait(5)
    assert engine.cancel(11)
    assert run.wait(5) == Status.CANCELLED
    assert result["stopping"] is True and torn == [1]
    assert len(reporter.finals(11)) == 1 and reporter.finals(11)[0][2] == Status.CANCELLED
    assert not engine.cancel(11)


def test_cancel_stops_a_generator_and_slow_workers(engine):
    started = threading.Event()

    def extract(h, m):
        i = 0
        while True:
            yield i
            i += 1

    def transform(h, m, x):
        started.set()
        time.sleep(0.01)
        return x

    run = engine.submit(Cluster("gen", extract, transform, t_functions=2), 1)
    assert started.wait(5)
    t0 = time.monotonic()
    run.cancel()
    assert run.wait(5) == Status.CANCELLED
    assert time.monotonic() - t0 < 2
    assert run.result is None  # WaitAndPush never loads a cancelled batch


def test_extract_ignoring_stop_is_abandoned(reporter):
    eng = Engine(reporter, stop_grace=0.2)
    release = threading.Event()

    def extract(h, m, out):
        out.push(1)
        release.wait(10)

    try:
        run = eng.submit(Cluster("stuck", extract), 1)
        assert wait_for(lambda: run.status == Status.ACTIVE)
        run.cancel()
        assert run.wait(3) == Status.CANCELLED
        assert any("abandoned" in msg for _, _, msg in run.logs)
    finally:
        release.set()
        eng.shutdown()


def test_teardown_failure_crashes_the_run(engine):
    run = submit_wait(engine, Cluster("td", gen_range(3), teardown=lambda h, m: 1 / 0))
    assert run.status == Status.CRASHED and "ZeroDivisionError" in run.error


# ---------------------------------------------------------------------------------------------
# engine: backlog, lookup, results, listeners, shutdown


def test_backlog_runs_fifo_and_completes_all(reporter):
    eng = Engine(reporter, max_active=4)
    order = []
    lock = threading.Lock()
    active = [0]
    peak = [0]

    def setup(h, m):
        with lock:
            order.append(h.run_id)
            active[0] += 1
            peak[0] = max(peak[0], active[0])

    def teardown(h, m):
        with lock:
            active[0] -= 1

    def extract(h, m, out):
        time.sleep(0.01)
        out.push(h.run_id)

    c = Cluster("q", extract, setup=setup, teardown=teardown)
    try:
        runs = [eng.submit(c, i) for i in range(50)]
        assert all(r.status in (Status.CREATED, Status.ACTIVE) for r in runs)
        for r in runs:
            assert r.wait(20) == Status.COMPLETED, r.error
        assert peak[0] <= 4
        # FIFO: the dispatcher starts runs in submission order; threads started together may
        # reach setup in any order, but never more than max_active ahead
        assert [r.start_order for r in runs] == list(range(1, 51))
        assert sorted(order) == list(range(50))
        assert all(abs(pos - rid) < 4 for pos, rid in enumerate(order))
        assert all(len(reporter.finals(i)) == 1 for i in range(50))
    finally:
        eng.shutdown()


def test_submit_is_fast_and_runs_no_user_code(engine):
    caller = threading.get_ident()
    where = []
    c = Cluster("fast", lambda h, m, out: where.append(threading.get_ident()))
    t0 = time.perf_counter()
    run = engine.submit(c, 1)
    assert time.perf_counter() - t0 < 0.05
    run.wait(5)
    assert where and where[0] != caller


def test_get_runs_and_results_retention(reporter):
    eng = Engine(reporter, keep_results=2)
    try:
        c = Cluster("keep", gen_range(3))
        runs = []
        for i in (1, 2, 3):
            runs.append(eng.submit(c, i))
            runs[-1].wait(5)
        again = eng.submit(c, 1)
        again.wait(5)
        assert eng.get(1) is again and eng.get(42) is None
        assert eng.runs()[0] is again and eng.runs()[-1] is runs[0]
        assert runs[0].result is None and runs[0].result_evicted
        assert runs[2].result == [0, 1, 2] and again.result == [0, 1, 2]
    finally:
        eng.shutdown()


def test_listeners_see_status_changes_and_errors_are_ignored(engine):
    seen = []

    def bad(run):
        raise RuntimeError("listener bug")

    unsubscribe = engine.add_listener(lambda r: seen.append((r.run_id, r.status)))
    engine.add_listener(bad)
    run = submit_wait(engine, Cluster("lst", gen_range(2)), run_id=5)
    assert run.status == Status.COMPLETED
    assert wait_for(lambda: (5, Status.COMPLETED) in seen)
    assert [s for _, s in seen][:2] == [Status.CREATED, Status.ACTIVE]
    unsubscribe()
    n = len(seen)
    submit_wait(engine, Cluster("lst", gen_range(2)), run_id=6)
    assert len(seen) == n


def test_shutdown_cancels_everything_and_joins_threads(reporter):
    eng = Engine(reporter, max_active=2)

    def extract(h, m, out):
        while out.push(1):
            time.sleep(0.001)

    c = Cluster(
        "forever", extract, None, lambda h, m, x: None, mode="Stream", on_load="CompleteAndPush"
    )
    runs = [eng.submit(c, i) for i in range(5)]
    assert wait_for(lambda: runs[0].status == Status.ACTIVE)
    eng.shutdown(timeout=3)
    eng.shutdown()  # idempotent
    assert all(r.status == Status.CANCELLED for r in runs)
    assert all(len(reporter.finals(i)) == 1 for i in range(5))
    assert not [t for t in threading.enumerate() if t.name.startswith("nbproc-")]
    with pytest.raises(RuntimeError):
        eng.submit(c, 99)


# ---------------------------------------------------------------------------------------------
# reporting and statistics


def test_reporter_call_order(engine, reporter):
    def extract(h, m, out):
        h.log("start")
        for i in range(5):
            out.push(i)
            time.sleep(0.04)
        h.log("end")

    run = submit_wait(
        engine, Cluster("order", extract, None, lambda h, m, x: None, on_load="CompleteAndPush"), 4
    )
    assert run.status == Status.COMPLETED
    events = reporter.of(4)
    assert events[0][0] == "report" and events[0][2] == Status.ACTIVE and not events[0][4]
    progress = [e for e in events[1:-1] if e[0] == "report"]
    assert progress and all(e[2] == Status.ACTIVE and not e[4] for e in progress)
    assert [e[3] for e in events if e[0] == "log"] == ["start", "end"]
    assert events[-1][0] == "report" and events[-1][4] and events[-1][2] == Status.COMPLETED
    assert len(reporter.finals(4)) == 1


def test_statistics_are_json_safe_with_numpy_and_pandas_items(engine):
    def extract(h, m):
        for i in range(2000):
            yield {"v": np.float64(i) if i % 7 else np.nan, "t": pd.Timestamp("2024-01-01")}

    run = submit_wait(engine, Cluster("js", extract, lambda h, m, r: {**r, "i": np.int64(1)}))
    assert run.status == Status.COMPLETED, run.error
    stats = run.statistics()
    text = protocol.dumps(stats.to_json())
    back = protocol.Statistics.parse(protocol.loads(text))
    assert back.total_processed == 2000
    for value in vars(stats).values():
        if isinstance(value, protocol.ChannelTiming):
            assert all(type(v) is int for v in vars(value).values())
        else:
            assert type(value) is int
    assert stats.et_channel.max_ns >= stats.et_channel.median_ns >= stats.et_channel.min_ns
    assert stats.max_total_ns >= stats.med_total_ns >= stats.min_total_ns > 0


def test_snapshot_is_cheap_and_complete(engine):
    run = submit_wait(
        engine, Cluster("snap", gen_range(100), lambda h, m, x: DROP if x < 10 else x)
    )
    snap = run.snapshot()
    assert (snap.extracted, snap.transformed, snap.loaded, snap.dropped) == (100, 90, 90, 10)
    assert snap.status == Status.COMPLETED and snap.t_workers == 1 and snap.l_workers == 1
    assert snap.elapsed >= 0 and snap.rate >= 0 and snap.error is None and snap.restarts == 0


def test_stream_runs_until_cancelled_and_reports_progress(engine, reporter):
    loaded = []

    def extract(h, m, out):
        i = 0
        while not h.should_stop():
            out.push(i)
            i += 1
            time.sleep(0.001)

    c = Cluster(
        "stream",
        extract,
        None,
        lambda h, m, x: loaded.append(x),
        mode="Stream",
        on_load="CompleteAndPush",
    )
    run = engine.submit(c, 8)
    assert wait_for(lambda: len(loaded) > 50)
    assert wait_for(lambda: len([e for e in reporter.of(8) if e[0] == "report"]) >= 3)
    assert run.status == Status.ACTIVE and run.snapshot().rate > 0
    run.cancel()
    assert run.wait(5) == Status.CANCELLED
    assert loaded == sorted(loaded)
    assert run.statistics().total_processed == len(loaded)


def test_stream_without_load_keeps_only_recent_items(engine, monkeypatch):
    import nbproc.engine as eng_mod

    monkeypatch.setattr(eng_mod, "STREAM_KEEP_ITEMS", 100)

    def extract(h, m, out):
        i = 0
        while out.push(i):
            i += 1

    run = engine.submit(Cluster("sk", extract, mode="Stream", on_load="CompleteAndPush"), 1)
    assert wait_for(lambda: run.statistics().total_processed > 20_000)
    run.cancel()
    run.wait(5)
    assert 100 <= len(run.result) < 100 + eng_mod.MAX_BATCH
    assert run.result == sorted(run.result)


def test_run_local():
    run = run_local(Cluster("loc", gen_range(5), lambda h, m, x: x * x), timeout=10)
    assert run.status == Status.COMPLETED and run.result == [0, 1, 4, 9, 16]
