"""The run engine: runs a cluster's extract -> transform -> load pipeline and reports on it.

Design
======

Threads. Each run has a *supervisor* thread (``nbproc-run-<key>``) that calls setup, starts the
pipeline, watches it, runs teardown and sends the reports; an *extract* thread
(``nbproc-r<key>-extract``); ``t`` transform and ``l`` load worker threads
(``nbproc-r<key>-t<i>`` / ``-l<i>``). One engine-wide *dispatcher* thread (``nbproc-dispatch``)
starts queued runs, so :meth:`Engine.submit` only appends to a deque. ``async def`` functions run
on one engine-owned event loop thread (``nbproc-async``), never on the server's or the kernel's
loop; worker threads hand them a whole batch at a time and wait for it.

Batching. Items move between stages in *batches* (lists), not one by one: a queue hand-off costs
microseconds, a list append tens of nanoseconds. Extract appends to a buffer; the buffer becomes a
batch when it holds ``batch size`` items, or when its first item is older than ``flush_after``
(20 ms, done by the supervisor), so a trickling stream still flows. The batch size is adaptive per
channel: the consuming stage measures its cost per item (moving average) and the producer cuts
batches worth about ``TARGET_BATCH_NS`` (2 ms) of the consumer's work, between 1 and
``MAX_BATCH`` (4096) items. A slow transform thus gets batches of one item (so ``t`` workers really
share the work and a cancel waits for at most one item); a fast one gets 4096-item batches (the
cost of a hand-off is mostly waking a thread and moving the GIL, so it must be rare: with 1024
the 1M-int benchmark ran at ~2.2x a plain loop, with 4096 at ~1.5x, 8192 was no better). Until
the first measurement batches hold one item. Transform output keeps the order of its input batch
and is cut to the load stage's preferred size; with one worker per stage, order is preserved end to
end. Stop checks happen per batch, i.e. about every 2 ms of work.

Channels are bounded: ``capacity = max(4, threshold + 2)`` batches, so a slow load back-pressures
transform, which back-pressures extract (``out.push`` blocks), and memory stays flat.

Growth and threshold. The *threshold* counts batches (channel slots), as the Go reference counts
items in its channel slots. Every ``check_interval`` (0.1 s) the supervisor looks at each channel;
a check that finds it holding more than ``threshold`` batches is one *breach*
(``num-et-threshold-breaches`` / ``num-tl-threshold-breaches``). Each breach grows the consuming
stage from N to ``min(cap, N * growth_factor)`` workers, cap = the cluster's ``max_t_functions`` /
``max_l_functions``. Breaches at the cap still count (the count then measures how long the channel
stayed over its threshold, in tenths of a second). Stages never shrink during a run, so the
provisioned count reported is both the current and the peak count.

Statistics (bounded memory, see :mod:`nbproc.stats`). Counters are exact: per-worker integers
added once per batch. Channel wait ("time before pop") is measured once per batch, from the
moment it entered the channel to the moment a worker took it; every item of a batch shares that
wait. min/max are exact over batches, the mean is weighted by items (exact under that sharing), the
median is over a 2048-batch reservoir. Total time is sampled once per batch: the first item of
each extract batch is timestamped when it is pushed, and its total time ends when load returns for
the first item of the corresponding load batch (for WaitAndPush: when the one load call returns).
Items later in a batch are not timed, so the totals slightly over-represent batch heads: with
4096-item batches that is 1 sample per 4096 items. min/max/mean are exact over the samples,
median from a 2048-sample reservoir (about +-2 percentile points). Memory is constant per run.

Results. WaitAndPush collects every transformed item, builds a DataFrame (``pd.concat`` for
DataFrame items, ``pd.DataFrame`` for dicts / records / Series) or a plain list for other items,
and calls ``load`` once; the result is what load returns (the batch when there is no load).
CompleteAndPush calls load per item; the result is the last non-None value load returned; with no
load the items are collected like WaitAndPush (a Stream run keeps only the last
``STREAM_KEEP_ITEMS``). The engine keeps the results of the last ``keep_results`` finished runs.

Crashes. The first exception of any user function stops the attempt (channels aborted, workers
finish their current batch), teardown runs, and the traceback is logged at level fatal and kept in
``run.error``. With ``Restart``, a new attempt starts from scratch (setup, fresh channels and
statistics) after a backoff of 0.1 s doubling up to 5 s, at most ``cluster.max_restarts`` times.
An exception in teardown makes an otherwise completed attempt ``crashed`` (no restart).

Cancel. ``out.push`` returns False, generator extraction stops, an async extract is cancelled,
channels are emptied, workers finish their current batch, teardown runs, status ``cancelled``.
An extract that ignores the stop for ``stop_grace`` seconds is abandoned (its daemon thread is
left behind, a warning is logged) so the run can still finish. Teardown runs even when setup
failed (it should cope with partial setup).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import inspect
import itertools
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .capture import routed_to
from .cluster import DROP, Cluster, is_async
from .loop import LoopThread
from .protocol import (
    ChannelTiming,
    LogLevel,
    Mode,
    OnCrash,
    OnLoad,
    RunConfig,
    Statistics,
    Status,
)
from .reporter import LocalReporter, RunReporter
from .stats import OriginSampler, Sampler
from .threads import PooledThread, ThreadPool

__all__ = ["Engine", "Run", "RunSnapshot", "Helper", "Metadata", "Outbox", "run_local"]

log = logging.getLogger("nbproc.engine")

_ns = time.perf_counter_ns
MAX_BATCH = 4096
TARGET_BATCH_NS = 2_000_000
STREAM_KEEP_ITEMS = 10_000
LOG_LINES = 1000
HISTORY = 500


# ---------------------------------------------------------------------------------------------
# what user functions see


class Metadata(Mapping[str, str]):
    """The run request's metadata: read-only, and ``get`` answers "" for a missing key like the
    Go reference does, so ``m.get("limit")`` never needs a None check."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, default: Any = "") -> Any:  # type: ignore[override]
        return self._data.get(key, default)

    def __repr__(self) -> str:
        return f"Metadata({self._data!r})"


class Helper:
    """The ``h`` every user function gets: logging, the core's cache, the stop flag."""

    def __init__(self, run: Run) -> None:
        self._run = run
        self.run_id = run.run_id
        self.cluster = run.name
        self.module = run.module
        self.key = run.key

    def log(self, msg: Any) -> None:
        self._run._log(LogLevel.NORMAL, str(msg))

    def warning(self, msg: Any) -> None:
        self._run._log(LogLevel.WARNING, str(msg))

    def fatal(self, msg: Any) -> None:
        self._run._log(LogLevel.FATAL, str(msg))

    def save_to_cache(self, value: Any, expiry_minutes: float = 0) -> str:
        return self._run.reporter.cache_save(value, expiry_minutes)

    def load_from_cache(self, key: str) -> Any:
        return self._run.reporter.cache_load(key)

    async def asave_to_cache(self, value: Any, expiry_minutes: float = 0) -> str:
        """For async functions: the blocking cache call runs off the engine loop."""
        return await asyncio.to_thread(self.save_to_cache, value, expiry_minutes)

    async def aload_from_cache(self, key: str) -> Any:
        return await asyncio.to_thread(self.load_from_cache, key)

    @property
    def stopping(self) -> bool:
        return self._run._stop_requested()

    def should_stop(self) -> bool:
        return self._run._stop_requested()

    def __repr__(self) -> str:
        return f"<Helper run {self.run_id} of {self.module}.{self.cluster}>"


# ---------------------------------------------------------------------------------------------
# channels and stages


class Channel:
    """A bounded FIFO of batches between two stages; ``get`` records each batch's wait time."""

    __slots__ = ("capacity", "threshold", "_items", "_lock", "_not_empty", "_not_full")
    __slots__ += ("closed", "aborted", "wait")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.capacity = max(4, threshold + 2)
        self._items: collections.deque[tuple[list, int, int]] = collections.deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self.closed = False
        self.aborted = False
        self.wait = Sampler()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, batch: list, t0: int) -> bool:
        """Block until there is room; False when the channel was aborted (the run stops)."""
        with self._lock:
            while len(self._items) >= self.capacity and not self.aborted:
                self._not_full.wait()
            if self.aborted:
                return False
            self._items.append((batch, t0, _ns()))
            self._not_empty.notify()
            return True

    def get(self) -> tuple[list, int] | None:
        """The next batch and its origin time; None once closed and drained, or aborted."""
        with self._lock:
            while not self._items:
                if self.closed or self.aborted:
                    return None
                self._not_empty.wait()
            batch, t0, put_ns = self._items.popleft()
            self._not_full.notify()
        self.wait.add(_ns() - put_ns, len(batch))
        return batch, t0

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._not_empty.notify_all()

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            self._items.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()


class Outbox:
    """The ``out`` extract pushes to: buffers items and hands them on as batches.

    The buffer list is never replaced, only sliced from the front under a lock, so the
    supervisor can flush a stale buffer while extract keeps appending without losing items.
    """

    def __init__(self, attempt: Attempt) -> None:
        self._attempt = attempt
        self._channel = attempt.et
        self._consumer = attempt.t_stage
        self.buf: list[Any] = []
        self.t0 = 0
        self.size = 1
        self.count = 0
        self._lock = threading.Lock()

    def push(self, item: Any) -> bool:
        """Hand ``item`` to transform; False once the run is stopping (then stop extracting)."""
        buf = self.buf
        if not buf:
            self.t0 = _ns()
        buf.append(item)
        if len(buf) >= self.size:
            return self.flush()
        return True

    async def apush(self, item: Any) -> bool:
        """``push`` for an ``async def`` extract: waits for room without blocking the loop."""
        delay = 0.0005
        while len(self._channel) >= self._channel.capacity and not self._attempt.stopping:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return self.push(item)

    @property
    def stopping(self) -> bool:
        return self._attempt.stopping

    def flush(self, block: bool = True) -> bool:
        """Move the buffer into the channel; False when the run is stopping."""
        if not self._lock.acquire(blocking=block):
            return not self._attempt.stopping
        try:
            return self._flush_locked(block)
        finally:
            self._lock.release()

    def _flush_locked(self, block: bool) -> bool:
        attempt = self._attempt
        buf = self.buf
        n = len(buf)
        ok = True
        if n and not attempt.stopping:
            if not block and len(self._channel) >= self._channel.capacity:
                return True  # the consumer has work queued: no latency to win
            batch = buf[:n]
            del buf[:n]
            ok = self._put(batch)
            if ok:
                self.count += n
        elif attempt.stopping:
            buf.clear()
        self.size = self._consumer.batch_size()
        if attempt.stopping:  # re-checked after the write: a concurrent stop must win
            self.size = 0
            return False
        return ok

    def _put(self, batch: list) -> bool:
        if self._attempt.in_async_loop():
            return self._channel.put_nowait_force(batch, self.t0)
        return self._channel.put(batch, self.t0)

    def flush_if_stale(self, older_than_ns: int) -> None:
        if self.buf and _ns() - self.t0 >= older_than_ns:
            self.flush(block=False)


def _put_nowait_force(self: Channel, batch: list, t0: int) -> bool:
    """Put without blocking even when full: only for an async extract's sync ``push`` on the
    engine loop, where blocking would deadlock the async stages (documented in Outbox)."""
    with self._lock:
        if self.aborted:
            return False
        self._items.append((batch, t0, _ns()))
        self._not_empty.notify()
        return True


Channel.put_nowait_force = _put_nowait_force  # type: ignore[attr-defined]


class Worker:
    """One worker thread's counters: written by that thread only, summed by readers (no lock)."""

    __slots__ = ("n_in", "n_out", "n_drop", "start", "thread")

    def __init__(self) -> None:
        self.n_in = 0
        self.n_out = 0
        self.n_drop = 0
        self.start = 0
        self.thread: PooledThread | None = None


class Stage:
    """The t or l workers of one attempt: start, grow on breaches, measure cost per item."""

    def __init__(
        self, attempt: Attempt, letter: str, body: Callable, start: int, cap: int, factor: int
    ) -> None:
        self.attempt = attempt
        self.letter = letter
        self.body = body
        # The core's config may ask for more workers than the cluster allows: the cluster's cap
        # wins, since it is what keeps a config typo from starting thousands of threads.
        self.start_count = min(start, cap)
        self.cap = cap
        if start > cap:
            attempt.run._log(
                LogLevel.WARNING,
                f"the config asks for {start} {letter}-workers; this cluster allows {cap} "
                f"(max_{letter}_functions): starting {cap}",
            )
        self.factor = factor
        self.workers: list[Worker] = []
        self.cost_ns = 0
        self.breaches = 0
        self.live = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self.workers)

    def start(self) -> None:
        self.spawn(self.start_count)

    def spawn(self, n: int) -> None:
        with self._lock:
            for _ in range(n):
                worker = Worker()
                name = f"nbproc-r{self.attempt.run.key}-{self.letter}{len(self.workers)}"
                worker.thread = self.attempt.run._thread(
                    self.attempt.worker_main, self, worker, name=name
                )
                self.workers.append(worker)
                self.live += 1
                worker.thread.start()

    def exited(self) -> None:
        with self._lock:
            self.live -= 1

    def breach(self) -> None:
        """One threshold breach: count it and grow N -> N * factor (up to the cap)."""
        self.breaches += 1
        target = min(self.cap, self.count * self.factor)
        if target > self.count and not self.attempt.stopping:
            self.spawn(target - self.count)

    def note_cost(self, elapsed_ns: int, n: int) -> None:
        if n:
            per_item = max(1, elapsed_ns // n)
            old = self.cost_ns
            self.cost_ns = per_item if old == 0 else (old * 3 + per_item) // 4

    def batch_size(self) -> int:
        cost = self.cost_ns
        if cost <= 0:
            return 1
        return max(1, min(MAX_BATCH, TARGET_BATCH_NS // cost))

    def alive(self) -> bool:
        return self.live > 0

    def join(self, deadline: float) -> None:
        for w in list(self.workers):
            if w.thread is not None:
                w.thread.join(max(0.0, deadline - time.monotonic()))

    def n_in(self) -> int:
        return sum(w.n_in for w in self.workers)

    def n_out(self) -> int:
        return sum(w.n_out for w in self.workers)

    def n_drop(self) -> int:
        return sum(w.n_drop for w in self.workers)


# ---------------------------------------------------------------------------------------------
# one attempt of a run (a Restart makes a new one)


class _Stop(Exception):
    """Internal: the attempt is stopping; unwind the worker quietly."""


class Attempt:
    """Channels, stages, counters and the crash of one try of a run."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.engine = run._engine
        cfg, cl = run.config, run.cluster
        self.h = run._helper
        self.m = run._meta
        self.stopping = False
        self.failure: str | None = None
        self.failure_exc: BaseException | None = None
        self.wake = threading.Event()
        self.et = Channel(cfg.et_threshold or 2)
        self.tl = Channel(cfg.tl_threshold or 2)
        self.wait_and_push = cfg.on_load == OnLoad.WAIT_AND_PUSH
        self.total = Sampler()
        self.origins = OriginSampler()
        self.collect = self.wait_and_push or cl.load is None
        self.t_stage = Stage(
            self,
            "t",
            self._transform_body(),
            cfg.t_channels or 1,
            cl.max_t_functions,
            cfg.et_growth or 2,
        )
        self.l_stage = Stage(
            self,
            "l",
            self._collect_body if self.collect else self._load_body(),
            cfg.l_channels or 1,
            cl.max_l_functions,
            cfg.tl_growth or 2,
        )
        self.outbox = Outbox(self)
        self.chunks: collections.deque[list] = collections.deque()
        self.kept = 0
        self.processed_final = 0
        self.last_result: Any = None
        self.extract_thread: PooledThread | None = None
        self.extract_done = False
        self.futures: set[concurrent.futures.Future] = set()
        self._flock = threading.Lock()

    # -- control ------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Record the first real failure and stop; later ones (fallout) are only logged."""
        text = "".join(traceback.format_exception(exc))
        if self.failure is None and not self.run._cancel_requested:
            self.failure = text
            self.failure_exc = exc
        elif not isinstance(
            exc, (_Stop, concurrent.futures.CancelledError, asyncio.CancelledError)
        ):
            self.run._log(LogLevel.WARNING, f"while stopping: {text}")
        self.stop()

    def stop(self) -> None:
        if self.stopping:
            self.wake.set()
            return
        with self._flock:
            self.stopping = True
            futures = list(self.futures)
        self.outbox.size = 0
        self.et.abort()
        self.tl.abort()
        for fut in futures:
            fut.cancel()
        self.wake.set()

    def in_async_loop(self) -> bool:
        lt = self.engine._loop_thread
        return lt is not None and lt.in_loop_thread()

    def call(self, fn: Callable, *args: Any) -> Any:
        """Call a user function, awaiting it on the engine loop when it is ``async def``."""
        if not is_async(fn):
            return fn(*args)
        return self.await_on_loop(fn(*args))

    def await_on_loop(self, coro: Any) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self.engine._async_loop())
        with self._flock:
            self.futures.add(fut)
            stopping = self.stopping
        if stopping:  # stop() ran before we registered the future: it could not cancel it
            fut.cancel()
        try:
            return fut.result()
        except concurrent.futures.CancelledError:
            raise _Stop() from None
        finally:
            with self._flock:
                self.futures.discard(fut)

    # -- extract -----------------------------------------------------------------------------
    def extract_main(self) -> None:
        try:
            self._extract()
            if not self.stopping:
                self.outbox.flush()
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - user code: anything is a crash
            if not (self.stopping and isinstance(exc, asyncio.CancelledError)):
                self.fail(exc)
        finally:
            self.extract_done = True
            self.wake.set()

    def _extract(self) -> None:
        fn = self.run.cluster.extract
        h, m, out = self.h, self.m, self.outbox
        args = (h, m, out) if _accepts(fn, 3) else (h, m)
        if inspect.isasyncgenfunction(fn):
            self._drive_async_iter(fn(*args))
        elif inspect.isgeneratorfunction(fn):
            self._drive_iter(fn(*args))
        elif inspect.iscoroutinefunction(fn):
            self.await_on_loop(fn(h, m, out))
        else:
            self._drive_returned(fn(h, m, out))

    def _drive_iter(self, items: Any) -> None:
        """The hot loop of generator extraction (push inlined; stop merges into the size check)."""
        out = self.outbox
        buf = out.buf
        try:
            for item in items:
                if not buf:
                    out.t0 = _ns()
                buf.append(item)
                if len(buf) >= out.size and not out.flush():
                    break
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def _drive_async_iter(self, agen: Any) -> None:
        loop = self.engine._async_loop()
        try:
            while not self.stopping:
                try:
                    item = self.await_on_loop(agen.__anext__())
                except StopAsyncIteration:
                    return
                if not self.outbox.push(item):
                    return
        finally:
            fut = asyncio.run_coroutine_threadsafe(agen.aclose(), loop)
            with contextlib.suppress(BaseException):  # closing is best effort
                fut.result(timeout=1.0)

    def _drive_returned(self, value: Any) -> None:
        """A plain extract may also return its items: a list, tuple or iterator of items, or
        one DataFrame. None and booleans (``return out.push(x)``) mean nothing; any other value
        is ignored with a warning rather than guessed at."""
        if value is None or isinstance(value, bool) or self.stopping:
            return
        if isinstance(value, (list, tuple)) or hasattr(value, "__next__"):
            self._drive_iter(value)
        elif type(value).__name__ == "DataFrame":
            self.outbox.push(value)
        else:
            self.run._log(
                LogLevel.WARNING,
                f"extract returned a {type(value).__name__}, ignored: push or yield items, "
                "or return a list of them",
            )

    # -- workers ------------------------------------------------------------------------------
    def worker_main(self, stage: Stage, worker: Worker) -> None:
        src = self.et if stage is self.t_stage else self.tl
        body = stage.body
        try:
            while True:
                got = src.get()
                if got is None:
                    break
                batch, t0 = got
                worker.start = start = _ns()
                body(worker, batch, t0)
                if stage is self.l_stage:  # transform notes its cost in _emit, before blocking
                    stage.note_cost(_ns() - start, len(batch))
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - user code: anything is a crash
            self.fail(exc)
        finally:
            stage.exited()
            self.wake.set()

    def _transform_body(self) -> Callable[[Worker, list, int], None]:
        cl = self.run.cluster
        tf, v_et, v_tl = cl.transform, cl.verify_et, cl.verify_tl
        h, m = self.h, self.m
        emit = self._emit
        if tf is not None and not is_async(tf) and v_et is None and v_tl is None:

            def fast(worker: Worker, batch: list, t0: int) -> None:
                out: list = []
                app = out.append
                for item in batch:
                    r = tf(h, m, item)
                    if r is not DROP:
                        app(r)
                worker.n_in += len(batch)
                worker.n_drop += len(batch) - len(out)
                emit(worker, out, t0, len(batch))

            return fast

        def general(worker: Worker, batch: list, t0: int) -> None:
            items = batch
            if v_et is not None:
                items = [x for x in items if self.call(v_et, x)]
            if tf is not None and is_async(tf):
                items = self.await_on_loop(_amap(tf, h, m, items))
            elif tf is not None:
                items = [r for r in (tf(h, m, x) for x in items) if r is not DROP]
            if v_tl is not None:
                items = [x for x in items if self.call(v_tl, x)]
            worker.n_in += len(batch)
            worker.n_drop += len(batch) - len(items)
            emit(worker, items, t0, len(batch))

        return general

    def _emit(self, worker: Worker, out: list, t0: int, n_in: int) -> None:
        """Hand transform output to load in chunks the load stage can digest in ~2 ms."""
        self.t_stage.note_cost(_ns() - worker.start, n_in)
        size = self.l_stage.batch_size()
        if len(out) <= size:
            chunks = [out] if out else []
        else:
            chunks = [out[i : i + size] for i in range(0, len(out), size)]
        for i, chunk in enumerate(chunks):
            if not self.tl.put(chunk, t0 if i == 0 else 0):
                raise _Stop()
            worker.n_out += len(chunk)

    def _load_body(self) -> Callable[[Worker, list, int], None]:
        lf = self.run.cluster.load
        h, m = self.h, self.m
        total = self.total
        if is_async(lf):

            def aload(worker: Worker, batch: list, t0: int) -> None:
                r = self.await_on_loop(_aeach(lf, h, m, batch))
                if t0:
                    total.add(_ns() - t0)
                worker.n_in += len(batch)
                if r is not None:
                    self.last_result = r

            return aload

        def load(worker: Worker, batch: list, t0: int) -> None:
            last = lf(h, m, batch[0])
            if t0:
                total.add(_ns() - t0)
            for i in range(1, len(batch)):
                r = lf(h, m, batch[i])
                if r is not None:
                    last = r
            worker.n_in += len(batch)
            if last is not None:
                self.last_result = last

        return load

    def _collect_body(self, worker: Worker, batch: list, t0: int) -> None:
        self.chunks.append(batch)
        if t0:
            self.origins.add(t0)
        worker.n_in += len(batch)
        if self.run.cluster.mode == Mode.STREAM and not self.wait_and_push:
            self._trim_kept(len(batch))

    def _trim_kept(self, n: int) -> None:
        with self._flock:
            self.kept += n
            while self.kept - len(self.chunks[0]) >= STREAM_KEEP_ITEMS:
                self.kept -= len(self.chunks.popleft())

    # -- supervision ---------------------------------------------------------------------------
    def start(self) -> None:
        self.t_stage.start()
        self.l_stage.start()
        name = f"nbproc-r{self.run.key}-extract"
        self.extract_thread = self.run._thread(self.extract_main, name=name)
        self.extract_thread.start()

    def supervise(self) -> None:
        """Close channels as stages finish, flush stale buffers, grow stages, report progress."""
        eng = self.engine
        next_check = time.monotonic() + eng.check_interval
        while True:
            self.wake.clear()
            if self.stopping:
                return
            if self.extract_done and not self.et.closed:
                self.et.close()
            if self.et.closed and not self.t_stage.alive() and not self.tl.closed:
                self.tl.close()
            if self.tl.closed and not self.l_stage.alive():
                return
            self.outbox.flush_if_stale(eng.flush_after_ns)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + eng.check_interval
                self._check_growth()
            self.run._maybe_progress(now)
            self.wake.wait(eng.tick)

    def _check_growth(self) -> None:
        for channel, stage in ((self.et, self.t_stage), (self.tl, self.l_stage)):
            if len(channel) > channel.threshold:
                stage.breach()

    def join(self, deadline: float) -> bool:
        """Wait for every thread of the attempt; False when the extract had to be abandoned."""
        self.t_stage.join(deadline)
        self.l_stage.join(deadline)
        if self.extract_thread is not None:
            self.extract_thread.join(max(0.0, deadline - time.monotonic()))
            if self.extract_thread.is_alive():
                return False
        return True

    def finish_collected(self) -> Any:
        """Build the WaitAndPush batch (or the kept items) and call load once on it."""
        items = list(itertools.chain.from_iterable(self.chunks))
        self.chunks.clear()
        batch = as_batch(items)
        lf = self.run.cluster.load
        if self.wait_and_push and lf is not None:
            result = self.call(lf, self.h, self.m, batch)
        else:
            result = batch
        self.processed_final = len(items)
        return result

    # -- statistics ----------------------------------------------------------------------------
    def statistics(self, total_end: int | None = None) -> Statistics:
        over_et = self.outbox.count
        over_tl = self.t_stage.n_out()
        processed = self.processed_final if self.wait_and_push else self.l_stage.n_in()
        tmin, tmax, tmean, tmed = self.total.summary()
        if self.collect and self.origins.count and total_end is not None:
            tmin, tmax, tmean, tmed = self.origins.summary(total_end)
        return Statistics(
            extract_routines=1 if self.extract_thread is not None else 0,
            transform_routines=self.t_stage.count,
            load_routines=self.l_stage.count,
            et_threshold_breaches=self.t_stage.breaches,
            tl_threshold_breaches=self.l_stage.breaches,
            total_processed=processed,
            total_over_et=over_et,
            total_over_tl=over_tl,
            total_dropped=self.t_stage.n_drop(),
            et_channel=_timing(self.et.wait),
            tl_channel=_timing(self.tl.wait),
            max_total_ns=tmax,
            min_total_ns=tmin,
            avg_total_ns=tmean,
            med_total_ns=tmed,
        )


def _timing(sampler: Sampler) -> ChannelTiming:
    lo, hi, mean, med = sampler.summary()
    return ChannelTiming(min_ns=lo, max_ns=hi, mean_ns=mean, median_ns=med)


async def _amap(fn: Callable, h: Helper, m: Metadata, items: list) -> list:
    out = []
    for item in items:
        r = await fn(h, m, item)
        if r is not DROP:
            out.append(r)
    return out


async def _aeach(fn: Callable, h: Helper, m: Metadata, items: list) -> Any:
    last = None
    for item in items:
        r = await fn(h, m, item)
        if r is not None:
            last = r
    return last


def _accepts(fn: Callable, n: int) -> bool:
    try:
        inspect.signature(fn).bind(*range(n))
        return True
    except TypeError:
        return False
    except ValueError:
        return True


def as_batch(items: list) -> Any:
    """The WaitAndPush batch: a DataFrame when the items are tabular, else the plain list.

    DataFrames are concatenated; dicts, Series, namedtuples, dataclass instances and equal-length
    tuples become rows. An empty run gives an empty DataFrame.
    """
    import pandas as pd

    if not items:
        return pd.DataFrame()
    kinds = {type(x) for x in items}
    if all(issubclass(k, pd.DataFrame) for k in kinds):
        return pd.concat(items, ignore_index=True)
    if all(issubclass(k, Mapping) for k in kinds):
        return pd.DataFrame.from_records([dict(x) for x in items] if kinds != {dict} else items)
    if all(issubclass(k, pd.Series) for k in kinds):
        return pd.DataFrame(items).reset_index(drop=True)
    if len(kinds) == 1 and dataclasses.is_dataclass(next(iter(kinds))):
        return pd.DataFrame([dataclasses.asdict(x) for x in items])
    if all(issubclass(k, tuple) for k in kinds) and len({len(x) for x in items}) == 1:
        return pd.DataFrame.from_records(items, columns=getattr(items[0], "_fields", None))
    return items


# ---------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class RunSnapshot:
    """What a UI polling ~10x/s needs, without touching the reporter or building JSON."""

    key: int
    run_id: int
    module: str
    cluster: str
    status: Status
    extracted: int
    transformed: int
    loaded: int
    dropped: int
    rate: float
    t_workers: int
    l_workers: int
    elapsed: float
    restarts: int
    error: str | None


class Run:
    """One run of a cluster: its status, logs, statistics and result."""

    def __init__(
        self,
        engine: Engine,
        key: int,
        cluster: Cluster,
        run_id: int,
        config: RunConfig,
        metadata: Mapping[str, str],
        reporter: RunReporter | None = None,
    ) -> None:
        self._engine = engine
        # Fixed when the run is created: the core that sent the run is the one to hear about it,
        # even if the processor has moved to another core since.
        self.reporter: RunReporter = reporter if reporter is not None else engine.reporter
        self.key = key
        self.run_id = run_id
        self.cluster = cluster
        self.module = cluster.module
        self.name = cluster.name
        self.config = config
        self._meta = Metadata(metadata)
        self.metadata = dict(self._meta._data)
        self.status = Status.CREATED
        self.created_at = time.time()
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.restarts = 0
        self.start_order: int | None = None  # dispatch sequence number: FIFO made observable
        self.error: str | None = None
        self._result: Any = None
        self.result_evicted = False
        self._logs: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=LOG_LINES)
        self._logs_dropped = 0
        self._log_lock = threading.Lock()
        self._reporting = False
        self._cancel_requested = False
        self._done = threading.Event()
        self._attempt: Attempt | None = None
        self._final_stats: Statistics | None = None
        self._helper = Helper(self)
        self._next_progress = 0.0
        self._rate_samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=8)

    def __repr__(self) -> str:
        return f"<Run {self.run_id} (key {self.key}) {self.module}.{self.name} {self.status.value}>"

    # -- public ---------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def result(self) -> Any:
        return self._result

    @property
    def logs(self) -> list[tuple[float, str, str]]:
        """The newest log lines; a first line says how many older ones were not kept."""
        with self._log_lock:
            lines = list(self._logs)
            dropped = self._logs_dropped
        if dropped:
            first = lines[0][0] if lines else time.time()
            lines.insert(
                0, (first, LogLevel.WARNING.value, f"({dropped:,} earlier log lines not kept)")
            )
        return lines

    def cancel(self) -> None:
        """Stop the run (or drop it from the queue); returns at once, see :meth:`wait`."""
        if self.done:
            return
        self._cancel_requested = True
        attempt = self._attempt
        if attempt is not None:
            attempt.stop()
        self._engine._wake_dispatcher()

    def wait(self, timeout: float | None = None) -> Status:
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.run_id} still {self.status.value} after {timeout} s")
        return self.status

    def statistics(self) -> Statistics:
        if self._final_stats is not None:
            return self._final_stats
        attempt = self._attempt
        return attempt.statistics() if attempt is not None else Statistics()

    def snapshot(self) -> RunSnapshot:
        s = self.statistics()
        now = time.time()
        start = self.started_at
        end = self.ended_at or now
        err = self.error.strip().splitlines()[-1] if self.error else None
        return RunSnapshot(
            key=self.key,
            run_id=self.run_id,
            module=self.module,
            cluster=self.name,
            status=self.status,
            extracted=s.total_over_et,
            transformed=s.total_over_tl,
            loaded=s.total_processed,
            dropped=s.total_dropped,
            rate=self._rate(s.total_processed),
            t_workers=s.transform_routines,
            l_workers=s.load_routines,
            elapsed=max(0.0, end - start) if start else 0.0,
            restarts=self.restarts,
            error=err,
        )

    # -- internals ------------------------------------------------------------------------------
    def _rate(self, loaded: int) -> float:
        samples = list(self._rate_samples)
        if self.done or not samples:
            if self.started_at and self.ended_at and self.ended_at > self.started_at:
                return loaded / (self.ended_at - self.started_at)
            return 0.0
        t_then, n_then = samples[0]
        dt = time.monotonic() - t_then
        if dt < 0.5 or loaded <= n_then:  # too little history: the average since the start
            elapsed = time.time() - (self.started_at or time.time())
            return loaded / elapsed if elapsed > 0 else 0.0
        return (loaded - n_then) / dt

    def _stop_requested(self) -> bool:
        attempt = self._attempt
        return self._cancel_requested or (attempt is not None and attempt.stopping)

    def _log(self, level: LogLevel, message: str) -> None:
        with self._log_lock:
            self._keep_log_line(level.value, message)
            if self._reporting:
                self._engine._safe(self.reporter.log, self.run_id, level, message)

    def _keep_log_line(self, level: str, message: str) -> None:
        """Under ``_log_lock``: keep a line, counting the ones the bounded log pushes out."""
        if len(self._logs) == self._logs.maxlen:
            self._logs_dropped += 1
        self._logs.append((time.time(), level, message))

    def note(self, level: LogLevel | str, message: str) -> None:
        """A log line kept locally only (e.g. that the core never confirmed the final report)."""
        with self._log_lock:
            self._keep_log_line(LogLevel(level).value, message)

    def _thread(self, target: Callable[..., Any], *args: Any, name: str) -> PooledThread:
        """A (pooled) thread for user code: what it prints goes to this run's log, not to a
        random cell."""

        def main() -> None:
            with routed_to(self._printed):
                target(*args)

        return self._engine._pool.thread(main, name=name)

    def _printed(self, level: str, line: str) -> None:
        self._log(LogLevel(level), line)

    def _set_status(self, status: Status) -> None:
        self.status = status
        self._engine._notify(self)

    def _maybe_progress(self, now: float) -> None:
        if now < self._next_progress:
            return
        self._next_progress = now + self._engine.progress_interval
        attempt = self._attempt
        if attempt is not None:
            self._rate_samples.append((now, attempt.statistics().total_processed))
        with self._log_lock:
            if self._reporting:
                self._engine._safe(
                    self.reporter.report,
                    self.run_id,
                    Status.ACTIVE,
                    self.statistics(),
                    False,
                )

    def _finalize(self, status: Status, stats: Statistics) -> None:
        """The single final report, after every log line; then the status flips to terminal."""
        self._final_stats = stats
        with self._log_lock:
            self._reporting = False
        self._engine._safe(self.reporter.report, self.run_id, status, stats, True)
        self.ended_at = time.time()
        self._engine._keep_result(self)
        self._set_status(status)
        self._done.set()

    # -- the supervisor thread --------------------------------------------------------------------
    def _main(self) -> None:
        eng = self._engine
        try:
            if self._cancel_requested:
                self._finalize(Status.CANCELLED, Statistics())
                return
            self.started_at = time.time()
            eng._safe(self.reporter.report, self.run_id, Status.ACTIVE, Statistics(), False)
            with self._log_lock:
                self._reporting = True
            self._next_progress = time.monotonic() + eng.progress_interval
            self._set_status(Status.ACTIVE)
            if self.cluster.mode == Mode.STREAM and self.config.on_load == OnLoad.WAIT_AND_PUSH:
                self._log(
                    LogLevel.WARNING,
                    "WaitAndPush on a Stream run keeps every item until the run ends",
                )
            status, stats = self._attempts()
            self._finalize(status, stats)
        except BaseException as exc:  # noqa: BLE001 - the engine must survive its own bugs
            log.exception("run %s: engine error", self.run_id)
            self.error = "".join(traceback.format_exception(exc))
            if not self.done:
                self._finalize(Status.CRASHED, self.statistics())
        finally:
            eng._run_finished(self)

    def _attempts(self) -> tuple[Status, Statistics]:
        backoff = 0.1
        while True:
            status, stats = self._one_attempt()
            can_restart = (
                status == Status.CRASHED
                and self.config.on_crash == OnCrash.RESTART
                and self.restarts < self.cluster.max_restarts
                and not self._cancel_requested
                and not self._engine._closing
            )
            if not can_restart:
                return status, stats
            self.restarts += 1
            self._log(
                LogLevel.WARNING,
                f"restart {self.restarts}/{self.cluster.max_restarts} in {backoff:.1f} s",
            )
            if self._sleep_unless_cancelled(backoff):
                return Status.CANCELLED, stats
            backoff = min(backoff * 2, 5.0)

    def _sleep_unless_cancelled(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._cancel_requested or self._engine._closing:
                return True
            time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        return False

    def _one_attempt(self) -> tuple[Status, Statistics]:
        att = Attempt(self)
        self._attempt = att
        if self._cancel_requested:
            att.stop()
        cl = self.cluster
        result: Any = None
        end_ns: int | None = None
        try:
            if cl.setup is not None and not att.stopping:
                att.call(cl.setup, att.h, att.m)
            if not att.stopping:
                att.start()
                att.supervise()
            if not att.stopping and att.collect:
                result = att.finish_collected()
                end_ns = _ns()
            elif att.collect and not att.wait_and_push and self._cancel_requested:
                result = att.finish_collected()
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - user code: anything is a crash
            att.fail(exc)
        if att.stopping:
            att.stop()
        if not att.join(time.monotonic() + self._engine.stop_grace):
            self._log(
                LogLevel.WARNING, "extract ignored the stop request; its thread was abandoned"
            )
        teardown_failure = self._teardown(att)
        stats = att.statistics(end_ns)
        if att.failure is not None or (teardown_failure and not self._cancel_requested):
            self.error = att.failure or teardown_failure
            self._log(LogLevel.FATAL, self.error or "")
            return Status.CRASHED, stats
        if self._cancel_requested:
            if result is None and not att.collect:
                result = att.last_result  # a stream ends by cancel: keep what load returned
            if result is not None:
                self._result = result
            return Status.CANCELLED, stats
        if not att.collect:
            result = att.last_result
        self._result = result
        self.error = None
        return Status.COMPLETED, stats

    def _teardown(self, att: Attempt) -> str | None:
        if self.cluster.teardown is None:
            return None
        try:
            att.call(self.cluster.teardown, att.h, att.m)
        except BaseException as exc:  # noqa: BLE001 - user code
            return "".join(traceback.format_exception(exc))
        return None


# ---------------------------------------------------------------------------------------------
# the engine


class Engine:
    """Runs clusters: at most ``max_active`` at once, the rest queued FIFO."""

    def __init__(
        self,
        reporter: RunReporter | None = None,
        max_active: int = 24,
        keep_results: int = 20,
        progress_interval: float = 1.0,
        *,
        history: int = HISTORY,
        check_interval: float = 0.1,
        flush_after: float = 0.02,
        stop_grace: float = 5.0,
    ) -> None:
        self.reporter: RunReporter = reporter if reporter is not None else LocalReporter()
        self.max_active = max(1, max_active)
        self.keep_results = max(0, keep_results)
        self.progress_interval = progress_interval
        self.check_interval = check_interval
        self.flush_after_ns = int(flush_after * 1e9)
        self.tick = min(0.02, flush_after, check_interval)
        self.stop_grace = stop_grace
        self._keys = itertools.count(1)
        self._start_seq = itertools.count(1)
        self._lock = threading.Condition(threading.Lock())
        self._queue: collections.deque[Run] = collections.deque()
        self._announce: collections.deque[Run] = collections.deque()
        self._active: dict[int, PooledThread] = {}
        self._history: collections.deque[Run] = collections.deque(maxlen=max(1, history))
        self._by_id: dict[int, Run] = {}
        self._with_results: collections.deque[Run] = collections.deque()
        self._listeners: list[Callable[[Run], None]] = []
        self._closing = False
        self._loop_thread: LoopThread | None = None
        self._pool = ThreadPool("nbproc-pooled")
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="nbproc-dispatch", daemon=True
        )
        self._dispatcher.start()

    # -- public -----------------------------------------------------------------------------------
    def submit(
        self,
        cluster: Cluster,
        run_id: int,
        config: RunConfig | None = None,
        metadata: Mapping[str, str] | None = None,
        reporter: RunReporter | None = None,
    ) -> Run:
        """Queue a run; never runs user code here and never waits (the dispatcher starts it).

        ``reporter`` (default: the engine's) is who hears about this run."""
        resolved = (config or RunConfig()).with_defaults(cluster.export_config())
        if not resolved.identifier:
            resolved = dataclasses.replace(resolved, identifier=cluster.name)
        with self._lock:
            if self._closing:
                raise RuntimeError("the engine is shut down")
            run = Run(self, next(self._keys), cluster, run_id, resolved, metadata or {}, reporter)
            self._remember(run)
            self._queue.append(run)
            self._announce.append(run)
            self._lock.notify_all()
        return run

    def get(self, run_id: int) -> Run | None:
        with self._lock:
            return self._by_id.get(run_id)

    def runs(self) -> list[Run]:
        with self._lock:
            return list(reversed(self._history))

    def cancel(self, run_id: int) -> bool:
        run = self.get(run_id)
        if run is None or run.done:
            return False
        run.cancel()
        return True

    def add_listener(self, callback: Callable[[Run], None]) -> Callable[[], None]:
        with self._lock:
            self._listeners = [*self._listeners, callback]

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = [cb for cb in self._listeners if cb is not callback]

        return unsubscribe

    def shutdown(self, timeout: float = 2.0) -> None:
        """Cancel every run, join every engine thread (within ``timeout``); idempotent."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closing = True
            queued = list(self._queue)
            self._queue.clear()
            active = [r for r in self._history if not r.done and r not in queued]
            self._lock.notify_all()
        for run in queued:
            run._cancel_requested = True
            run._finalize(Status.CANCELLED, Statistics())
        for run in active:
            run.cancel()
        self._dispatcher.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            threads = list(self._active.values())
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for run in active:
            att = run._attempt
            if att is not None:
                att.join(deadline)
        if self._loop_thread is not None:
            self._loop_thread.stop(max(0.1, deadline - time.monotonic()))
            self._loop_thread = None
        self._pool.shutdown(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- dispatcher ------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        while True:
            with self._lock:
                while not self._has_work():
                    self._lock.wait()
                announce = list(self._announce)
                self._announce.clear()
                start, dropped = self._take_startable()
                stop = self._closing and not self._queue
            for run in announce:
                self._notify(run)
            for run in dropped:
                run._finalize(Status.CANCELLED, Statistics())
            for _run, thread in start:
                thread.start()
            if stop:
                return

    def _has_work(self) -> bool:
        if self._closing or self._announce:
            return True
        if any(r._cancel_requested for r in self._queue):
            return True
        return bool(self._queue) and len(self._active) < self.max_active

    def _take_startable(self) -> tuple[list[tuple[Run, PooledThread]], list[Run]]:
        start: list[tuple[Run, PooledThread]] = []
        dropped = [r for r in self._queue if r._cancel_requested]
        for r in dropped:
            self._queue.remove(r)
        while self._queue and len(self._active) < self.max_active and not self._closing:
            run = self._queue.popleft()
            run.start_order = next(self._start_seq)
            t = run._thread(run._main, name=f"nbproc-run-{run.key}")
            self._active[run.key] = t
            start.append((run, t))
        return start, dropped

    def _wake_dispatcher(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _run_finished(self, run: Run) -> None:
        with self._lock:
            self._active.pop(run.key, None)
            self._lock.notify_all()

    def _keep_result(self, run: Run) -> None:
        """Bounded retention: only the last ``keep_results`` finished runs keep their result."""
        evicted: list[Run] = []
        with self._lock:
            if run._result is not None:
                self._with_results.append(run)
                while len(self._with_results) > self.keep_results:
                    evicted.append(self._with_results.popleft())
        for old in evicted:
            old._result = None
            old.result_evicted = True

    # -- helpers ---------------------------------------------------------------------------------
    def _remember(self, run: Run) -> None:
        if len(self._history) == self._history.maxlen:
            old = self._history[0]
            if self._by_id.get(old.run_id) is old:
                del self._by_id[old.run_id]
        self._history.append(run)
        self._by_id[run.run_id] = run

    def _notify(self, run: Run) -> None:
        for cb in self._listeners:
            try:
                cb(run)
            except Exception:  # noqa: BLE001 - a listener must not break a run
                log.exception("run listener %r failed", cb)

    def _safe(self, fn: Callable, *args: Any) -> None:
        """Reporter calls must not crash a run: a failing core is the reporter's problem."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001
            log.exception("reporter call %s failed", getattr(fn, "__name__", fn))

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = LoopThread("nbproc-async")
                self._loop_thread.start()
            return self._loop_thread.loop


def run_local(
    cluster: Cluster,
    metadata: Mapping[str, str] | None = None,
    config: RunConfig | None = None,
    timeout: float | None = None,
    run_id: int = 1,
) -> Run:
    """Run ``cluster`` on a private engine with no core behind it and wait for the end."""
    engine = Engine(LocalReporter(), max_active=1, keep_results=1)
    try:
        run = engine.submit(cluster, run_id, config, metadata)
        try:
            run.wait(timeout)
        except TimeoutError:
            run.cancel()
            run.wait(engine.stop_grace + 5)
            raise
        return run
    finally:
        engine.shutdown()
