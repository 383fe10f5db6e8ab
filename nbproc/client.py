"""The processor's side of the conversation with a core (PROTOCOL.md section 1).

One :class:`CoreClient` per connected core, living on the processor's event loop with one
``aiohttp.ClientSession``. It keeps the processor registered whatever the core does (restarts,
dropped registrations, the module-409 bug of section 4) and delivers every run's final report
exactly once, after the run's log lines, or says loudly that it could not.

The engine calls the :class:`~nbproc.reporter.RunReporter` methods from worker threads; they hop
onto the loop with ``call_soon_threadsafe`` and never block, except the two cache calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .loop import LoopThread
from .protocol import (
    CacheEntry,
    CacheSave,
    CoreAnswer,
    CoreError,
    LogLevel,
    LogLine,
    ModuleConfig,
    ModuleRegistration,
    ProcessorAddress,
    ProtocolError,
    Statistics,
    Status,
    SupervisorReport,
    dumps,
    loads,
)

log = logging.getLogger("nbproc.client")

JSON_HEADERS = {"Content-Type": "application/json"}
PROGRESS_SETTLE_SECONDS = 0.05  # short runs send one report (the final), not two
MAX_PENDING_LOG_LINES = 2000  # per run: a print-happy loop must not queue unbounded POST /log


class CoreUnavailable(ConnectionError):
    """The core could not be reached, timed out, or failed (5xx): worth retrying later."""


class ConnectionState:
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


@dataclass
class _Outbox:
    """What is still to be told to the core about one run, in order."""

    run_id: int
    epoch: int
    lines: deque[LogLine] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_LOG_LINES))
    overflow: int = 0  # lines dropped because the core could not keep up
    progress: SupervisorReport | None = None
    final: SupervisorReport | None = None
    task: asyncio.Task[None] | None = None


class CoreClient:
    """Registers a processor and its modules with one core and reports its runs.

    ``modules`` is called (on the loop) to learn which modules the processor offers right now;
    call :meth:`modules_changed` whenever that answer changes.
    """

    def __init__(
        self,
        core_url: str,
        address: ProcessorAddress,
        modules: Callable[[], list[ModuleConfig]],
        loop_thread: LoopThread,
        *,
        timeout: float = 5.0,
        heartbeat: float = 3.0,
        max_backoff: float = 5.0,
        on_state: Callable[[str], None] | None = None,
        on_lost_report: Callable[[CoreClient, int, str], None] | None = None,
    ) -> None:
        self.core_url = core_url.rstrip("/")
        self.address = address
        self._modules = modules
        self._loop_thread = loop_thread
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._heartbeat = heartbeat
        self._max_backoff = max_backoff
        self._on_state = on_state
        self._on_lost_report = on_lost_report
        self.state = ConnectionState.CONNECTING
        self.last_error = ""
        self.epoch = 0  # bumped each time the core turns out to have forgotten us (a restart)
        self._registered: dict[str, ModuleConfig] = {}
        self._session: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._connected: asyncio.Event | None = None
        self._registration_lock: asyncio.Lock | None = None
        self._outboxes: dict[int, _Outbox] = {}
        self._finals_in_flight: dict[int, int] = {}  # run id -> final reports not yet settled
        self._finals_lock = threading.Lock()

    # -- lifecycle (on the loop) -------------------------------------------------------------
    async def start(self) -> None:
        """Open the session and start keeping the registration alive (returns at once)."""
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._wake = asyncio.Event()
        self._connected = asyncio.Event()
        self._registration_lock = asyncio.Lock()
        self._supervisor = asyncio.create_task(self._supervise(), name="nbproc-core-supervisor")

    async def wait_connected(self, timeout: float) -> bool:
        assert self._connected is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        return self._connected.is_set()

    async def close(self, deregister: bool = True, flush_timeout: float = 1.0) -> None:
        """Flush pending final reports briefly, deregister, close the session."""
        pending = [
            o.task for o in self._outboxes.values() if o.task is not None and not o.task.done()
        ]
        if pending and self.state == ConnectionState.CONNECTED:
            await asyncio.wait(pending, timeout=flush_timeout)
        self._set_state(ConnectionState.STOPPED)
        tasks = [t for t in [self._supervisor, *pending] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for outbox in self._outboxes.values():
            if outbox.final is not None:
                self._report_lost(outbox, "the processor stopped before the core confirmed it")
        self._outboxes.clear()
        if deregister and self._session is not None and self.epoch > 0:
            with contextlib.suppress(CoreError, CoreUnavailable):
                await self._call("DELETE", "/processor", params=self.address.query(), timeout=1.0)
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- registration --------------------------------------------------------------------------
    def modules_changed(self) -> None:
        """Thread-safe: the processor's modules changed; bring the core up to date soon."""
        self._loop_thread.call_soon(self._wake_supervisor)

    async def sync_now(self) -> bool:
        """Bring the core up to date right now (so a provision sent next finds the change).

        Returns False when the core cannot be reached; the supervisor keeps retrying then.
        """
        if self.state != ConnectionState.CONNECTED:
            self._wake_supervisor()
            return False
        try:
            await self._sync()
        except (CoreUnavailable, CoreError, ProtocolError) as exc:
            self.last_error = str(exc)
            self._wake_supervisor()
            return False
        return True

    def _wake_supervisor(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _supervise(self) -> None:
        """Register, then keep checking; on any failure re-register with backoff."""
        backoff = 0.1
        while self.state != ConnectionState.STOPPED:
            try:
                await self._sync()
                self._set_state(ConnectionState.CONNECTED)
                backoff = 0.1
                await self._sleep_or_wake(self._heartbeat)
            except asyncio.CancelledError:
                raise
            except (CoreUnavailable, CoreError, ProtocolError) as exc:
                self.last_error = str(exc)
                if self.state == ConnectionState.CONNECTED:
                    log.warning("lost the core at %s (%s); reconnecting", self.core_url, exc)
                self._set_state(
                    ConnectionState.RECONNECTING if self.epoch else ConnectionState.CONNECTING
                )
                await self._sleep_or_wake(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    async def _sleep_or_wake(self, seconds: float) -> None:
        assert self._wake is not None
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the event fires, and the supervisor would outlive close().
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _sync(self) -> None:
        """Make the core's view of this processor match ours; idempotent, so it doubles as a
        heartbeat: ``POST /processor`` answering 409 means the core still knows us."""
        assert self._registration_lock is not None
        async with self._registration_lock:
            if await self._register_processor():
                self._forget_registrations()
            desired = {m.name: m for m in self._modules()}
            for name in [n for n in self._registered if n not in desired]:
                await self._unregister_module(name)
            for module in desired.values():
                await self._sync_module(module)

    async def _register_processor(self) -> bool:
        """True when the core did not know us (first time, or it restarted)."""
        try:
            await self._call("POST", "/processor", self.address)
        except CoreError as exc:
            if exc.status == 409:
                return False
            raise
        self.epoch += 1
        if self.epoch > 1:
            log.warning(
                "the core at %s had forgotten this processor; registered again", self.core_url
            )
        return True

    def _forget_registrations(self) -> None:
        self._registered.clear()

    async def _sync_module(self, module: ModuleConfig) -> None:
        current = self._registered.get(module.name)
        if current is not None and current != module:
            await self._unregister_module(module.name)
            current = None
        try:
            await self._call("POST", "/module", ModuleRegistration(self.address, module))
        except CoreError as exc:
            if exc.status != 409:
                raise
            if current is None:
                # We think it is not registered, the core thinks it is: a stale registration or
                # the core bug of PROTOCOL.md section 4. Start over with a clean processor entry.
                await self._reregister_processor()
                await self._call("POST", "/module", ModuleRegistration(self.address, module))
        self._registered[module.name] = module

    async def _reregister_processor(self) -> None:
        with contextlib.suppress(CoreError):
            await self._call("DELETE", "/processor", params=self.address.query())
        await self._call("POST", "/processor", self.address)
        self._forget_registrations()

    async def _unregister_module(self, name: str) -> None:
        params = {**self.address.query(), "module": name}
        with contextlib.suppress(CoreError):  # already gone is fine
            await self._call("DELETE", "/module", params=params)
        self._registered.pop(name, None)

    # -- run reports (RunReporter, thread-safe) -----------------------------------------------------
    def report(self, run_id: int, status: Status, statistics: Statistics, final: bool) -> None:
        report = SupervisorReport(run_id, status, statistics)
        if final:
            with self._finals_lock:  # noted here, in the caller's thread: see final_pending
                self._finals_in_flight[run_id] = self._finals_in_flight.get(run_id, 0) + 1
        self._loop_thread.call_soon(self._enqueue, run_id, "final" if final else "progress", report)

    def log(self, run_id: int, level: LogLevel, message: str) -> None:
        line = LogLine(run_id, str(level), message)
        self._loop_thread.call_soon(self._enqueue, run_id, "log", line)

    def final_pending(self, run_id: int) -> bool:
        """Whether run ``run_id``'s final report is still on its way to the core (any thread)."""
        with self._finals_lock:
            return run_id in self._finals_in_flight

    def _final_settled(self, run_id: int) -> None:
        with self._finals_lock:
            left = self._finals_in_flight.get(run_id, 0) - 1
            if left > 0:
                self._finals_in_flight[run_id] = left
            else:
                self._finals_in_flight.pop(run_id, None)

    def _enqueue(self, run_id: int, kind: str, item: Any) -> None:
        if self.state == ConnectionState.STOPPED:
            if kind == "final":
                self._final_settled(run_id)
                if self._on_lost_report is not None:
                    message = (
                        f"run {run_id} ended {item.status}, but the processor had disconnected "
                        f"from {self.core_url}, the core that sent the run: not reported"
                    )
                    log.warning(message)
                    self._on_lost_report(self, run_id, message)
            return
        outbox = self._outboxes.get(run_id)
        if outbox is None:
            outbox = self._outboxes[run_id] = _Outbox(run_id, self.epoch)
        if kind == "log":
            if len(outbox.lines) == outbox.lines.maxlen:
                outbox.overflow += 1
            outbox.lines.append(item)
        elif kind == "progress":
            outbox.progress = item  # only the newest progress matters
        else:
            outbox.final = item
        if outbox.task is None or outbox.task.done():
            outbox.task = asyncio.create_task(self._drain(outbox), name=f"nbproc-report-{run_id}")

    async def _drain(self, outbox: _Outbox) -> None:
        """Send one run's messages in order: log lines, newest progress, then the final report."""
        while outbox.lines or outbox.progress is not None or outbox.overflow:
            if outbox.overflow:
                skipped, outbox.overflow = outbox.overflow, 0
                note = f"{skipped} log lines not sent to the core (too many too fast; the run's log in the processor keeps the newest)"
                await self._send_best_effort(
                    "POST", "/log", LogLine(outbox.run_id, "warning", note)
                )
            elif outbox.lines:
                await self._send_best_effort("POST", "/log", outbox.lines.popleft())
            else:
                if outbox.final is None:
                    # a run that is about to end replaces this report with its final one
                    await asyncio.sleep(PROGRESS_SETTLE_SECONDS)
                progress, outbox.progress = outbox.progress, None
                if progress is not None and outbox.final is None:
                    await self._send_best_effort("PUT", "/supervisor", progress)
        if outbox.final is not None:
            try:
                await self._deliver_final(outbox)
            finally:
                self._final_settled(outbox.run_id)
            self._outboxes.pop(outbox.run_id, None)

    async def _send_best_effort(self, method: str, path: str, body: Any) -> None:
        """Progress and log lines: one try; a newer progress report or the final supersedes."""
        try:
            await self._call(method, path, body)
        except (CoreError, CoreUnavailable) as exc:
            log.debug("%s %s not delivered: %s", method, path, exc)
            if isinstance(exc, CoreUnavailable):
                self._wake_supervisor()

    async def _deliver_final(self, outbox: _Outbox) -> None:
        """Retry until the core confirms, unless the core that knew the run is gone."""
        assert self._connected is not None and outbox.final is not None
        backoff = 0.1
        while True:
            await self._connected.wait()
            if self.epoch != outbox.epoch:
                self._report_lost(
                    outbox, "the core restarted since the run began and no longer knows it"
                )
                return
            try:
                await self._call("PUT", "/supervisor", outbox.final)
                return
            except CoreError as exc:
                self._report_lost(outbox, f"the core refused it ({exc.description})")
                return
            except CoreUnavailable:
                self._wake_supervisor()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)

    def _report_lost(self, outbox: _Outbox, why: str) -> None:
        assert outbox.final is not None
        status = outbox.final.status
        message = f"run {outbox.run_id} ended {status}, but its final report did not reach {self.core_url}: {why}"
        log.warning(message)
        if self._on_lost_report is not None:
            self._on_lost_report(self, outbox.run_id, message)
        outbox.final = None

    # -- cache (blocking, for user code on worker threads) -------------------------------------------
    def cache_save(self, value: Any, expiry_minutes: float = 0) -> str:
        answer = self._loop_thread.run(
            self._call, "POST", "/cache", CacheSave(value, expiry_minutes)
        )
        if not isinstance(answer.data, str):
            return str(answer.data)
        return answer.data

    def cache_load(self, key: str) -> Any:
        try:
            answer = self._loop_thread.run(self._call, "GET", "/cache", None, {"key": key})
        except CoreError as exc:
            if exc.status == 404:
                raise KeyError(key) from None
            raise
        return CacheEntry.parse(answer.data).data

    # -- HTTP ------------------------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> CoreAnswer:
        """One call to the core's processor endpoint; ``success:false`` raises like a 4xx."""
        if self._session is None:
            raise CoreUnavailable("the client is closed")
        call = f"{method} {path}"
        data = dumps(body) if body is not None else None
        kwargs: dict[str, Any] = {"params": params, "data": data, "headers": JSON_HEADERS}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._session.request(method, self.core_url + path, **kwargs) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise CoreUnavailable(f"{call}: {type(exc).__name__}: {exc}") from None
        if status >= 500:
            raise CoreUnavailable(f"{call}: core answered {status}: {text[:200]}")
        try:
            answer = CoreAnswer.parse(loads(text))
        except ProtocolError as exc:
            raise CoreError(call, status, f"unreadable answer ({exc}): {text[:200]}") from None
        if status >= 400 or not answer.success:
            raise CoreError(call, status, answer.description)
        return answer

    def _set_state(self, state: str) -> None:
        if self._connected is not None:
            if state == ConnectionState.CONNECTED:
                self._connected.set()
            else:
                self._connected.clear()
        if state != self.state:
            self.state = state
            if self._on_state is not None:
                self._on_state(state)
