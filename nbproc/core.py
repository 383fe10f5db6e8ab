"""An embedded cluster.tools core: the processor endpoint and a client-endpoint subset, in-process.

Demos, Binder and tests need a core when no real one exists. This one speaks exactly the wire
contract of ``shared/PROTOCOL.md`` (sections 1 and 3), including the reference core's quirks that
a processor must cope with (the run request's ``cluster`` is the config name; GET /config and
GET /statistics answer bare JSON), so that processor code never learns which core it talks to.
Where the reference core misbehaves (a terminal report without statistics crashes it) this one
does the correct thing instead.

Decisions where PROTOCOL.md is silent:

* A module's *mounted* flag: the first registration of a module name mounts it when any of its
  exports says ``mount: true``; later registrations only ever mount (an export with
  ``mount: true`` makes its cluster available at once, which needs the module too). Mount flags
  are kept per module name and survive the module's processors going away, so an operator's
  decision is not lost when a processor restarts.
* Stream clusters get one run per processor that registered them, started whenever the module
  and cluster are both mounted and that processor has no unfinished run of the cluster.
* ``POST /config`` creates (409 if the name exists); ``PUT /config`` creates or replaces;
  ``DELETE`` of an unknown config answers 200 ``success: false`` like the reference core's
  other deletes. ``GET /config?module=M`` without ``config`` answers the bare list of configs.
* ``GET /supervisor?id=N`` answers one run record as ``data`` (404 if unknown);
  ``?module=M&cluster=C`` answers a list.

All state lives in plain dataclasses touched only on the core's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from .loop import LoopThread
from .protocol import (
    TERMINAL_STATUSES,
    CacheEntry,
    CacheSave,
    ClusterExport,
    ClusterInfo,
    CoreAnswer,
    LogLine,
    Mode,
    ModuleConfig,
    ModuleInfo,
    ModuleRegistration,
    MountRequest,
    ProcessorAddress,
    ProcessorInfo,
    ProtocolError,
    ProvisionAnswer,
    ProvisionRequest,
    RunConfig,
    RunRecord,
    RunRequest,
    Statistics,
    StatisticsRecord,
    Status,
    SupervisorReport,
    dumps,
    expect_object,
    loads,
)

log = logging.getLogger("nbproc.core")

MAX_BODY = 1024 * 1024  # larger bodies get 413, before any parsing
MAX_LOG_LINES = 10_000  # per run; a chatty stream must not eat the kernel's memory
_JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Refusal(Exception):
    """A request the core understood and refuses: answered as the envelope with ``success: false``.

    ``status`` is the HTTP status; 200 reproduces the reference core's habit of answering some
    failures (unknown supervisor id, deleting something unknown) with HTTP 200.
    """

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


# ---------------------------------------------------------------------------------------------
# state


@dataclass
class ProcessorState:
    """A connected processor and the modules it registered (keyed by module name)."""

    address: ProcessorAddress
    modules: dict[str, ModuleConfig] = field(default_factory=dict)
    failures: int = 0
    last_update: float = field(default_factory=time.time)

    def export(self, module: str, cluster: str) -> ClusterExport | None:
        config = self.modules.get(module)
        if config is None:
            return None
        return next((e for e in config.clusters if e.cluster == cluster), None)


@dataclass
class MountState:
    """Mount flags of one module name and its clusters; outlives the processors that had it."""

    mounted: bool = False
    clusters: dict[str, bool] = field(default_factory=dict)


@dataclass
class RunState:
    run_id: int
    module: str
    cluster: str
    config: RunConfig
    processor: ProcessorAddress
    status: str = Status.CREATED.value
    statistics: Statistics | None = None
    started_ns: int = field(default_factory=time.monotonic_ns)
    reported: bool = False  # the processor has sent a status: provisioning must not overwrite it
    logs: list[LogLine] = field(default_factory=list)

    def record(self) -> RunRecord:
        return RunRecord(
            run_id=self.run_id,
            status=self.status,
            processor=str(self.processor),
            module=self.module,
            cluster=self.cluster,
            config=self.config.identifier,
            statistics=self.statistics,
        )


@dataclass
class CacheItem:
    value: Any
    expires_at: float


@dataclass
class CoreState:
    """Everything the core knows. Pure and synchronous: the HTTP layer only parses and answers."""

    processors: dict[ProcessorAddress, ProcessorState] = field(default_factory=dict)
    mounts: dict[str, MountState] = field(default_factory=dict)
    configs: dict[str, dict[str, RunConfig]] = field(default_factory=dict)
    runs: dict[int, RunState] = field(default_factory=dict)
    statistics: dict[tuple[str, str], list[StatisticsRecord]] = field(default_factory=dict)
    cache: dict[str, CacheItem] = field(default_factory=dict)
    next_run_id: int = 1
    round_robin: dict[tuple[str, str], int] = field(default_factory=dict)

    # -- processors ---------------------------------------------------------------------------

    def add_processor(self, address: ProcessorAddress) -> None:
        if address in self.processors:
            raise Refusal(409, f"processor {address} is already registered")
        self.processors[address] = ProcessorState(address)

    def drop_processor(self, address: ProcessorAddress) -> None:
        """Forget a processor and its module registrations; its runs stay as they are."""
        if self.processors.pop(address, None) is None:
            raise Refusal(200, f"processor {address} is not registered")

    def processor(self, address: ProcessorAddress) -> ProcessorState:
        state = self.processors.get(address)
        if state is None:
            raise Refusal(400, f"processor {address} is not registered")
        return state

    # -- modules ------------------------------------------------------------------------------

    def register_module(self, registration: ModuleRegistration) -> None:
        processor = self.processor(registration.processor)
        module = registration.module
        names = [e.cluster for e in module.clusters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise Refusal(400, f"module {module.name}: duplicate cluster names {duplicates}")
        if module.name in processor.modules:
            raise Refusal(
                409,
                f"module {module.name} is already registered by {processor.address}; "
                "DELETE /module first to update it",
            )
        processor.modules[module.name] = module
        self._remember_mounts(module)
        self._store_default_configs(module)

    def _remember_mounts(self, module: ModuleConfig) -> None:
        mounts = self.mounts.get(module.name)
        if mounts is None:
            mounts = self.mounts[module.name] = MountState()
        if any(e.mount for e in module.clusters):
            mounts.mounted = True
        for export in module.clusters:
            known = mounts.clusters.get(export.cluster, False)
            mounts.clusters[export.cluster] = known or export.mount

    def _store_default_configs(self, module: ModuleConfig) -> None:
        configs = self.configs.setdefault(module.name, {})
        for export in module.clusters:
            if export.cluster not in configs:  # never overwrite: operators may have edited it
                configs[export.cluster] = RunConfig.from_export(export.cluster, export.config)

    def unregister_module(self, address: ProcessorAddress, module: str) -> None:
        processor = self.processors.get(address)
        if processor is None or processor.modules.pop(module, None) is None:
            raise Refusal(200, f"module {module} is not registered by {address}")

    def registrations(self, module: str) -> list[ProcessorState]:
        """Processors that currently have ``module``, in registration order."""
        return [p for p in self.processors.values() if module in p.modules]

    def known_module(self, module: str) -> list[ProcessorState]:
        holders = self.registrations(module)
        if not holders:
            raise Refusal(404, f"module {module} is not registered by any processor")
        return holders

    def module_infos(self) -> list[ModuleInfo]:
        latest: dict[str, ModuleConfig] = {}
        for processor in self.processors.values():
            latest.update(processor.modules)
        return [
            ModuleInfo(name, m.version, m.contact, self.mounts[name].mounted)
            for name, m in latest.items()
        ]

    def cluster_exports(self, module: str) -> dict[str, ClusterExport]:
        exports: dict[str, ClusterExport] = {}
        for processor in self.known_module(module):
            exports.update({e.cluster: e for e in processor.modules[module].clusters})
        return exports

    def cluster_infos(self, module: str) -> list[ClusterInfo]:
        exports = self.cluster_exports(module)
        mounts = self.mounts.get(module, MountState())
        return [
            ClusterInfo(name, mounts.clusters.get(name, False), export.config.mode.value)
            for name, export in exports.items()
        ]

    # -- mounting -----------------------------------------------------------------------------

    def mount(self, request: MountRequest) -> None:
        mounts = self.mounts.get(request.module)
        if mounts is None or not self.registrations(request.module):
            raise Refusal(404, f"module {request.module} is not registered by any processor")
        if not request.cluster:
            mounts.mounted = request.mounted
            return
        if request.cluster not in self.cluster_exports(request.module):
            raise Refusal(404, f"module {request.module} has no cluster {request.cluster}")
        mounts.clusters[request.cluster] = request.mounted

    def available(self, module: str, cluster: str) -> bool:
        mounts = self.mounts.get(module)
        return mounts is not None and mounts.mounted and mounts.clusters.get(cluster, False)

    # -- configs ------------------------------------------------------------------------------

    def config(self, module: str, name: str) -> RunConfig:
        config = self.configs.get(module, {}).get(name)
        if config is None:
            raise Refusal(404, f"module {module} has no config {name}")
        return config

    def save_config(self, module: str, config: RunConfig, replace: bool) -> None:
        configs = self.configs.setdefault(module, {})
        if not replace and config.identifier in configs:
            raise Refusal(409, f"module {module} already has a config {config.identifier}")
        configs[config.identifier] = config

    def delete_config(self, module: str, name: str) -> None:
        if self.configs.get(module, {}).pop(name, None) is None:
            raise Refusal(200, f"module {module} has no config {name}")

    # -- runs ---------------------------------------------------------------------------------

    def plan_run(self, request: ProvisionRequest) -> RunState:
        """Validate an operator's provision request and create its run (status ``created``)."""
        export = self.cluster_exports(request.module).get(request.cluster)
        if export is None:
            raise Refusal(404, f"module {request.module} has no cluster {request.cluster}")
        if export.config.mode == Mode.STREAM:
            raise Refusal(400, f"{request.cluster} is a Stream cluster: the core runs it itself")
        if not self.available(request.module, request.cluster):
            raise Refusal(400, f"{request.module}/{request.cluster} is not mounted")
        config = self.config(request.module, request.config or request.cluster)
        processor = self._next_processor(request.module, request.cluster)
        return self.new_run(request.module, request.cluster, config, processor.address)

    def _next_processor(self, module: str, cluster: str) -> ProcessorState:
        """Round robin over the processors that registered ``module``/``cluster``."""
        holders = [p for p in self.registrations(module) if p.export(module, cluster)]
        turn = self.round_robin.get((module, cluster), 0)
        self.round_robin[(module, cluster)] = turn + 1
        return holders[turn % len(holders)]

    def new_run(
        self, module: str, cluster: str, config: RunConfig, processor: ProcessorAddress
    ) -> RunState:
        run = RunState(self.next_run_id, module, cluster, config, processor)
        self.next_run_id += 1
        self.runs[run.run_id] = run
        return run

    def due_streams(
        self, module: str, processor: ProcessorAddress | None = None, cluster: str | None = None
    ) -> list[RunState]:
        """Create a run for each mounted Stream cluster of ``module`` (of one processor / one
        cluster when given) that has none going. Only what was just registered or mounted is
        considered: a stream an operator cancelled stays stopped until its module changes."""
        going = {
            (r.processor, r.module, r.cluster)
            for r in self.runs.values()
            if r.status not in TERMINAL_STATUSES
        }
        due = []
        for state in list(self.processors.values()):
            if processor is not None and state.address != processor:
                continue
            for name, registered in state.modules.items():
                if name != module:
                    continue
                for export in registered.clusters:
                    key = (state.address, name, export.cluster)
                    if cluster is not None and export.cluster != cluster:
                        continue
                    if (
                        export.config.mode == Mode.STREAM
                        and self.available(name, export.cluster)
                        and key not in going
                    ):
                        config = self.configs.get(name, {}).get(export.cluster)
                        config = config or RunConfig.from_export(export.cluster, export.config)
                        due.append(self.new_run(name, export.cluster, config, state.address))
        return due

    def run(self, run_id: int) -> RunState:
        run = self.runs.get(run_id)
        if run is None:
            raise Refusal(404, f"no run {run_id}")
        return run

    def report(self, report: SupervisorReport) -> None:
        run = self.runs.get(report.run_id)
        if run is None:
            raise Refusal(200, f"no supervisor with id {report.run_id}")
        run.status = report.status
        run.statistics = report.statistics
        run.reported = True
        if report.status in TERMINAL_STATUSES:
            elapsed = time.monotonic_ns() - run.started_ns
            record = StatisticsRecord(time.time(), elapsed, report.statistics)
            self.statistics.setdefault((run.module, run.cluster), []).append(record)

    def log(self, line: LogLine) -> None:
        run = self.runs.get(line.run_id)
        if run is None:
            raise Refusal(400, f"no supervisor with id {line.run_id}")
        if run.status != Status.ACTIVE.value:
            raise Refusal(400, f"run {line.run_id} is {run.status!r}, not 'active': log refused")
        if len(run.logs) < MAX_LOG_LINES:
            run.logs.append(line)

    # -- cache --------------------------------------------------------------------------------

    def cache_save(self, value: Any, lifetime_s: float, now: float) -> str:
        self.cache = {k: v for k, v in self.cache.items() if v.expires_at > now}
        key = uuid.uuid4().hex
        self.cache[key] = CacheItem(value, now + lifetime_s)
        return key

    def cache_load(self, key: str, now: float) -> CacheEntry:
        item = self.cache.get(key)
        if item is None or item.expires_at <= now:
            self.cache.pop(key, None)
            raise Refusal(404, f"no cached value {key!r} (unknown or expired)")
        return CacheEntry(key, item.value)


# ---------------------------------------------------------------------------------------------
# HTTP plumbing


def _answer(data: Any = None, status: int = 200) -> web.Response:
    return _json(CoreAnswer.ok(data).to_json(), status)


def _fail(status: int, description: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(CoreAnswer.fail(description).to_json(), status, headers)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=dumps(value), status=status, content_type=_JSON, headers=headers)


async def _body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or ProtocolError (413 comes from aiohttp itself)."""
    raw = await request.read()
    if not raw.strip():
        raise ProtocolError("body", "empty (a JSON object is required)")
    try:
        value = loads(raw)
    except RecursionError:
        raise ProtocolError("body", "JSON nested too deeply") from None
    return expect_object(value, "body")


def _query(request: web.Request, name: str) -> str:
    value = request.query.get(name, "")
    if not value:
        raise ProtocolError(name, "missing query parameter")
    return value


def _query_int(request: web.Request, name: str) -> int:
    value = _query(request, name)
    if not (value.isascii() and value.isdigit()) or len(value) > 18:
        raise ProtocolError(name, f"expected a non-negative integer query parameter, got {value!r}")
    return int(value)


def _checked(address: ProcessorAddress) -> ProcessorAddress:
    if address.port > 65535:
        raise ProtocolError("port", f"must be <= 65535, got {address.port}")
    return address


def _make_guard(core: EmbeddedCore) -> Callable[[web.Request, Handler], Awaitable[Any]]:
    """Middleware: every failure becomes the JSON envelope; nothing ever escapes as a crash."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refusal as exc:
            return _fail(exc.status, exc.description)
        except ProtocolError as exc:
            return _fail(400, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            return _fail(exc.status, exc.text or exc.reason, headers)
        except asyncio.CancelledError:
            raise
        except ConnectionError:  # the caller hung up mid-request: nothing to answer, no bug
            log.debug("embedded core: %s %s: the client went away", request.method, request.path)
            return _fail(400, "the client closed the connection mid-request")
        except Exception as exc:
            core.internal_errors += 1
            log.exception("embedded core: unexpected error on %s %s", request.method, request.path)
            return _fail(500, f"internal error: {type(exc).__name__}")

    return guard


# ---------------------------------------------------------------------------------------------
# the core


class EmbeddedCore:
    """A core on two loopback ports, run with AppRunner + TCPSite on whatever loop starts it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        client_port: int = 0,
        processor_port: int = 0,
        probe_interval: float = 2.0,
        probe_failures: int = 3,
        default_cache_expiry_minutes: float = 60,
        provision_timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.probe_interval = probe_interval
        self.probe_failures = probe_failures
        self.default_cache_expiry_minutes = default_cache_expiry_minutes
        self.provision_timeout = provision_timeout
        self.clock = clock  # cache expiry only; injectable so tests need not sleep for minutes
        self.state = CoreState()
        self.internal_errors = 0  # handler crashes turned into 500s; tests assert it stays 0
        self._wanted_ports = (client_port, processor_port)
        self._ports: tuple[int, int] | None = None
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both ports and start probing; on a bind error nothing stays open."""
        if self._runners:
            raise RuntimeError("embedded core already started")
        try:
            client = await self._serve(self._client_app(), self._wanted_ports[0])
            processor = await self._serve(self._processor_app(), self._wanted_ports[1])
        except BaseException:
            await self.stop()
            raise
        self._ports = (client, processor)
        connector = aiohttp.TCPConnector(force_close=True)  # probes must not pile up sockets
        self._session = aiohttp.ClientSession(connector=connector)
        self._spawn(self._probe_forever())

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        self._runners.append(runner)
        await web.TCPSite(runner, self.host, port).start()
        return int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Close both ports, cancel probes and pending run requests. Safe to call twice."""
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        self._ports = None

    async def __aenter__(self) -> EmbeddedCore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self) -> ThreadedCore:
        """Run this core on a daemon thread of its own (for synchronous callers)."""
        return ThreadedCore(core=self).start()

    @property
    def client_port(self) -> int:
        return self._bound()[0]

    @property
    def processor_port(self) -> int:
        return self._bound()[1]

    @property
    def client_url(self) -> str:
        return f"http://{self._url_host}:{self.client_port}"

    @property
    def processor_url(self) -> str:
        return f"http://{self._url_host}:{self.processor_port}"

    @property
    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def _bound(self) -> tuple[int, int]:
        if self._ports is None:
            raise RuntimeError("embedded core is not running")
        return self._ports

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- apps ---------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        return web.Application(client_max_size=MAX_BODY, middlewares=[_make_guard(self)])

    def _processor_app(self) -> web.Application:
        app = self._app()
        app.router.add_post("/processor", self._post_processor)
        app.router.add_delete("/processor", self._delete_processor)
        app.router.add_post("/module", self._post_module)
        app.router.add_delete("/module", self._delete_module)
        app.router.add_put("/supervisor", self._put_supervisor)
        app.router.add_post("/log", self._post_log)
        app.router.add_post("/cache", self._post_cache)
        app.router.add_get("/cache", self._get_cache)
        return app

    def _client_app(self) -> web.Application:
        app = self._app()
        app.router.add_get("/processor", self._list_processors)
        app.router.add_get("/module", self._list_modules)
        app.router.add_put("/module", self._mount_module)
        app.router.add_get("/cluster", self._list_clusters)
        app.router.add_put("/cluster", self._mount_cluster)
        app.router.add_get("/config", self._get_config)
        app.router.add_post("/config", self._post_config)
        app.router.add_put("/config", self._put_config)
        app.router.add_delete("/config", self._delete_config)
        app.router.add_post("/supervisor", self._provision)
        app.router.add_get("/supervisor", self._get_runs)
        app.router.add_get("/statistics", self._get_statistics)
        return app

    # -- processor endpoint -------------------------------------------------------------------

    async def _post_processor(self, request: web.Request) -> web.Response:
        self.state.add_processor(_checked(ProcessorAddress.parse(await _body(request))))
        return _answer()

    async def _delete_processor(self, request: web.Request) -> web.Response:
        self.state.drop_processor(ProcessorAddress.from_query(request.query))
        return _answer()

    async def _post_module(self, request: web.Request) -> web.Response:
        registration = ModuleRegistration.parse(await _body(request))
        self.state.register_module(registration)
        self._start_due_streams(registration.module.name, registration.processor)
        return _answer()

    async def _delete_module(self, request: web.Request) -> web.Response:
        address = ProcessorAddress.from_query(request.query)
        self.state.unregister_module(address, _query(request, "module"))
        return _answer()

    async def _put_supervisor(self, request: web.Request) -> web.Response:
        self.state.report(SupervisorReport.parse(await _body(request)))
        return _answer()

    async def _post_log(self, request: web.Request) -> web.Response:
        self.state.log(LogLine.parse(await _body(request)))
        return _answer()

    async def _post_cache(self, request: web.Request) -> web.Response:
        save = CacheSave.parse(await _body(request))
        try:
            dumps(save.value)  # refuse now what could not be answered later
        except (RecursionError, ValueError):
            raise ProtocolError("value", "cannot be stored (nested too deeply)") from None
        minutes = min(save.expiry_minutes or self.default_cache_expiry_minutes, 10**9)
        return _answer(self.state.cache_save(save.value, minutes * 60.0, self.clock()))

    async def _get_cache(self, request: web.Request) -> web.Response:
        return _answer(self.state.cache_load(_query(request, "key"), self.clock()).to_json())

    # -- client endpoint ----------------------------------------------------------------------

    async def _list_processors(self, request: web.Request) -> web.Response:
        infos = [
            ProcessorInfo(
                p.address.host,
                p.address.port,
                "healthy" if p.failures == 0 else f"unreachable ({p.failures} failed probes)",
                p.last_update,
                list(p.modules),
            )
            for p in self.state.processors.values()
        ]
        return _answer([i.to_json() for i in infos])

    async def _list_modules(self, request: web.Request) -> web.Response:
        return _answer([m.to_json() for m in self.state.module_infos()])

    async def _mount_module(self, request: web.Request) -> web.Response:
        mount = MountRequest.parse(await _body(request), need_cluster=False)
        self.state.mount(mount)
        self._start_due_streams(mount.module)
        return _answer()

    async def _list_clusters(self, request: web.Request) -> web.Response:
        infos = self.state.cluster_infos(_query(request, "module"))
        return _answer([c.to_json() for c in infos])

    async def _mount_cluster(self, request: web.Request) -> web.Response:
        mount = MountRequest.parse(await _body(request), need_cluster=True)
        self.state.mount(mount)
        self._start_due_streams(mount.module, cluster=mount.cluster)
        return _answer()

    async def _get_config(self, request: web.Request) -> web.Response:
        module = _query(request, "module")
        if not request.query.get("config"):
            return _json([c.to_json() for c in self.state.configs.get(module, {}).values()])
        return _json(self.state.config(module, _query(request, "config")).to_json())

    async def _post_config(self, request: web.Request) -> web.Response:
        return await self._save_config(request, replace=False)

    async def _put_config(self, request: web.Request) -> web.Response:
        return await self._save_config(request, replace=True)

    async def _save_config(self, request: web.Request, replace: bool) -> web.Response:
        module = _query(request, "module")
        config = RunConfig.parse(await _body(request), "body")
        if not config.identifier:
            raise ProtocolError("body.identifier", "missing (the config's name)")
        self.state.save_config(module, config, replace)
        return _answer()

    async def _delete_config(self, request: web.Request) -> web.Response:
        self.state.delete_config(_query(request, "module"), _query(request, "config"))
        return _answer()

    async def _provision(self, request: web.Request) -> web.Response:
        provision = ProvisionRequest.parse(await _body(request))
        run = self.state.plan_run(provision)
        await self._launch(run, provision.metadata)
        return _answer(ProvisionAnswer(run.cluster, run.run_id).to_json())

    async def _get_runs(self, request: web.Request) -> web.Response:
        if request.query.get("id"):
            return _answer(self.state.run(_query_int(request, "id")).record().to_json())
        module, cluster = _query(request, "module"), _query(request, "cluster")
        runs = [r for r in self.state.runs.values() if (r.module, r.cluster) == (module, cluster)]
        return _answer([r.record().to_json() for r in runs])

    async def _get_statistics(self, request: web.Request) -> web.Response:
        key = (_query(request, "module"), _query(request, "cluster"))
        return _json([s.to_json() for s in self.state.statistics.get(key, [])])

    # -- talking to processors ----------------------------------------------------------------

    async def _launch(self, run: RunState, metadata: dict[str, str]) -> None:
        """POST the run request (reference shape); ``active`` on 200 unless the run reported."""
        request = RunRequest(
            module=run.module,
            cluster=run.config.identifier,  # the reference core's quirk: the config name
            run_id=run.run_id,
            config=run.config,
            metadata=metadata,
        )
        accepted = await self._post_run_request(run.processor, request)
        if run.reported:
            return  # a fast run already said how it went: never overwrite the processor's word
        run.status = Status.ACTIVE.value if accepted else Status.CANCELLED.value

    async def _post_run_request(self, address: ProcessorAddress, request: RunRequest) -> bool:
        timeout = aiohttp.ClientTimeout(total=self.provision_timeout)
        try:
            async with self._client().post(
                f"{address.url}/supervisor",
                data=dumps(request.to_json()),
                headers={"Content-Type": _JSON},
                timeout=timeout,
            ) as response:
                await response.read()
                return response.status == 200
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, timed out, garbage address: all mean "cancelled"
            log.info("run %s: processor %s did not accept it: %r", request.run_id, address, exc)
            return False

    def _start_due_streams(
        self, module: str, processor: ProcessorAddress | None = None, cluster: str | None = None
    ) -> None:
        for run in self.state.due_streams(module, processor, cluster):
            self._spawn(self._launch(run, {}))

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            try:
                await self._probe_round()
            except Exception:
                log.exception("embedded core: probe round failed")

    async def _probe_round(self) -> None:
        addresses = list(self.state.processors)
        results = await asyncio.gather(*(self._probe(a) for a in addresses))
        for address, alive in zip(addresses, results, strict=True):
            processor = self.state.processors.get(address)
            if processor is None:
                continue  # deregistered while we probed
            if alive:
                processor.failures, processor.last_update = 0, time.time()
                continue
            processor.failures += 1
            if processor.failures >= self.probe_failures:
                log.info(
                    "dropping processor %s after %d failed probes", address, processor.failures
                )
                self.state.processors.pop(address, None)

    async def _probe(self, address: ProcessorAddress) -> bool:
        timeout = aiohttp.ClientTimeout(total=max(0.05, min(1.0, self.probe_interval)))
        try:
            async with self._client().get(f"{address.url}/debug", timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except asyncio.CancelledError:
            raise
        except Exception:
            return False

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("embedded core is not running")
        return self._session


# ---------------------------------------------------------------------------------------------
# a core on its own thread


class ThreadedCore:
    """An EmbeddedCore on a daemon thread with its own loop, for synchronous callers.

    ``start`` returns once both ports are bound (bind errors are raised here, in the caller);
    ``stop`` closes the ports and joins the thread. Read ``core.state`` only through
    :meth:`call`, which runs a function on the core's loop, where all its state lives.
    """

    def __init__(self, core: EmbeddedCore | None = None, **options: Any) -> None:
        if core is not None and options:
            raise TypeError("pass either an EmbeddedCore or its options, not both")
        self.core = core if core is not None else EmbeddedCore(**options)
        self._thread = LoopThread(name="nbproc-embedded-core")

    def start(self, timeout: float = 10.0) -> ThreadedCore:
        self._thread.start()
        try:
            self._thread.run(self.core.start, timeout=timeout)
        except BaseException:
            self._thread.stop()
            raise
        return self

    def stop(self, timeout: float = 2.0) -> None:
        if not self._thread.running:
            return
        with contextlib.suppress(TimeoutError):
            self._thread.run(self.core.stop, timeout=timeout)
        self._thread.stop(timeout)

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn()`` on the core's loop (where its state may be touched) and return its result."""

        async def on_loop() -> Any:
            return fn()

        return self._thread.run(on_loop, timeout=timeout)

    def __enter__(self) -> ThreadedCore:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def client_url(self) -> str:
        return self.core.client_url

    @property
    def processor_url(self) -> str:
        return self.core.processor_url

    @property
    def client_port(self) -> int:
        return self.core.client_port

    @property
    def processor_port(self) -> int:
        return self.core.processor_port


__all__ = [
    "CoreState",
    "EmbeddedCore",
    "MountState",
    "ProcessorState",
    "Refusal",
    "RunState",
    "ThreadedCore",
]
