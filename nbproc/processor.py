"""A processor: the server the core calls, the client that calls the core, and the run engine.

:class:`Processor` is the one object the magics, the CLI and the Python API drive. It owns a
:class:`~nbproc.loop.LoopThread` on which its aiohttp server and core client live, so it keeps
answering the core while the caller (a notebook cell, say) is busy. Without a core URL it starts
an embedded core on loopback, so the full round trip works on a laptop or on Binder.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from .capture import install_output_routing
from .client import ConnectionState, CoreClient, CoreUnavailable
from .cluster import Cluster
from .engine import Engine, Run
from .loop import LoopThread
from .operator import OperatorClient
from .protocol import (
    Contact,
    LogLevel,
    Mode,
    ModuleConfig,
    ProcessorAddress,
    RunConfig,
    RunRecord,
    RunRequest,
    Status,
    resolve_cluster_name,
)
from .server import ProcessorServer, UnknownCluster

log = logging.getLogger("nbproc")

DEFAULT_CLIENT_PORT = 8136
DEFAULT_PROCESSOR_PORT = 8137
DEFAULT_CONTACT = Contact("nbproc", "")
FINAL_REPORT_GRACE = 5.0  # seconds ``wait`` gives the core to confirm a run's final report


@dataclass(frozen=True)
class CoreAddress:
    """Where a core listens: its processor endpoint (we register there) and its client endpoint
    (operators provision there)."""

    processor_url: str
    client_url: str

    @classmethod
    def from_url(cls, url: str, client_url: str | None = None) -> CoreAddress:
        """``url`` is the processor endpoint. Without a port it means the reference defaults
        (8137 processor, 8136 client); the client endpoint is the same host on 8136 unless given."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not a core URL: {url!r} (expected e.g. http://core-host:8137)")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        port = parts.port or DEFAULT_PROCESSOR_PORT
        processor = urlunsplit((parts.scheme, f"{host}:{port}", parts.path.rstrip("/"), "", ""))
        client = client_url or urlunsplit(
            (parts.scheme, f"{host}:{DEFAULT_CLIENT_PORT}", "", "", "")
        )
        return cls(processor.rstrip("/"), client.rstrip("/"))


class Processor:
    """A cluster.tools processor running in this Python process."""

    def __init__(
        self,
        core: str | None = None,
        *,
        core_client: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        max_active: int = 24,
        keep_results: int = 20,
        heartbeat: float = 3.0,
        contact: Contact = DEFAULT_CONTACT,
    ) -> None:
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or _advertised(host)
        self.contact = contact
        self._core_url = core
        self._core_client_url = core_client
        self._heartbeat = heartbeat
        self._loop = LoopThread("nbproc-processor")
        self._server = ProcessorServer(self, host, port)
        self._clusters: dict[tuple[str, str], Cluster] = {}
        self._lock = threading.RLock()
        self._engine_options = {"max_active": max_active, "keep_results": keep_results}
        self._engine: Engine | None = None
        self.embedded_core: Any = None
        self.core: CoreAddress | None = None
        self._client: CoreClient | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, connect_timeout: float = 5.0) -> Processor:
        """Bind the server (errors re-raised here), then connect to the core (or an embedded one)."""
        if self._started:
            return self
        self._loop.start()
        try:
            self._loop.run(self._server.start)
        except BaseException:
            self._loop.stop()
            raise
        install_output_routing()  # what runs print goes to their logs, in a kernel or not
        self._engine = Engine(self, **self._engine_options)
        self._started = True
        try:
            self.connect(self._core_url, self._core_client_url, timeout=connect_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Deregister, stop runs, release the port and join every thread (idempotent)."""
        if not self._started:
            return
        self._started = False
        try:
            self.engine.shutdown(timeout=2.0)
            if self._loop.running:
                self._disconnect_client()
                self._loop.run(self._server.stop, timeout=2.0)
        finally:
            self._loop.stop()
            self._stop_embedded_core()

    def __enter__(self) -> Processor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def engine(self) -> Engine:
        """The run engine (after ``stop`` it still answers for the runs it had)."""
        if self._engine is None:
            raise RuntimeError("the processor is not started (call .start() first)")
        return self._engine

    @property
    def running(self) -> bool:
        return self._started

    @property
    def address(self) -> ProcessorAddress:
        """What the core knows this processor as (the advertised host and the bound port)."""
        if self._server.port is None:
            raise RuntimeError("the processor is not started")
        return ProcessorAddress(self.advertise_host, self._server.port)

    @property
    def url(self) -> str:
        return ProcessorAddress(_advertised(self.host), self.address.port).url

    # -- the core ------------------------------------------------------------------------------------
    def connect(
        self, core: str | None = None, core_client: str | None = None, timeout: float = 5.0
    ) -> CoreAddress:
        """Connect to the core at ``core`` (its processor endpoint URL), or start an embedded core.

        Returns once registered, or after ``timeout`` seconds while retrying in the background
        (a core that is down now is not an error: the client keeps trying).
        """
        self._require_started()
        address = CoreAddress.from_url(core, core_client) if core else None  # bad URL: stay put
        self._disconnect_client()
        if address is not None:
            self._stop_embedded_core()
            self.core = address
        else:
            self.core = self._ensure_embedded_core()
        self._client = CoreClient(
            self.core.processor_url,
            self.address,
            self._module_configs,
            self._loop,
            heartbeat=self._heartbeat,
            on_lost_report=self._note_lost_report,
        )
        self._loop.run(self._client.start)
        connected = self._loop.run(self._client.wait_connected, timeout, timeout=timeout + 1)
        if not connected:
            log.warning(
                "nbproc: the core at %s does not answer yet (%s); retrying in the background",
                self.core.processor_url,
                self._client.last_error or "no answer",
            )
        return self.core

    def disconnect(self) -> None:
        """Deregister from the core and stop talking to it (runs already going finish locally)."""
        self._disconnect_client()
        self._stop_embedded_core()
        self.core = None

    @property
    def connection_state(self) -> str:
        return self._client.state if self._client is not None else ConnectionState.STOPPED

    def _disconnect_client(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop.running:
            self._loop.run(client.close, timeout=3.0)

    def _ensure_embedded_core(self) -> CoreAddress:
        from .core import ThreadedCore

        if self.embedded_core is None:
            self.embedded_core = ThreadedCore(host="127.0.0.1").start()
        return CoreAddress(self.embedded_core.processor_url, self.embedded_core.client_url)

    def _stop_embedded_core(self) -> None:
        core, self.embedded_core = self.embedded_core, None
        if core is not None:
            core.stop()

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("the processor is not started (call .start() first)")

    # -- clusters --------------------------------------------------------------------------------------
    def register(self, cluster: Cluster) -> Cluster:
        """Offer ``cluster`` to the core (replacing a cluster of the same module and name).

        Runs already going keep the functions they started with; a redefined Stream cluster's
        running stream is stopped, and the core starts the new one on re-registration.
        """
        with self._lock:
            previous = self._clusters.get(cluster.key)
            self._clusters[cluster.key] = cluster
        if previous is not None and previous.mode == Mode.STREAM:
            self._cancel_runs_of(previous)
        self._modules_changed()
        return cluster

    def unregister(self, name: str, module: str | None = None) -> Cluster:
        cluster = self.cluster(name, module)
        with self._lock:
            self._clusters.pop(cluster.key, None)
        if cluster.mode == Mode.STREAM:
            self._cancel_runs_of(cluster)
        self._modules_changed()
        return cluster

    def clusters(self) -> list[Cluster]:
        with self._lock:
            return list(self._clusters.values())

    def cluster(self, name: str, module: str | None = None) -> Cluster:
        """The registered cluster called ``name`` (in ``module``, or in the only module that has it)."""
        with self._lock:
            matches = [
                c for c in self._clusters.values() if c.name == name and module in (None, c.module)
            ]
        if not matches:
            where = f" in module {module!r}" if module else ""
            raise KeyError(f"no cluster {name!r}{where} is registered with this processor")
        if len(matches) > 1:
            modules = ", ".join(sorted(c.module for c in matches))
            raise KeyError(f"cluster {name!r} exists in several modules ({modules}): pass module=")
        return matches[0]

    def _module_configs(self) -> list[ModuleConfig]:
        with self._lock:
            clusters = list(self._clusters.values())
        by_module: dict[str, list[Cluster]] = {}
        for cluster in clusters:
            by_module.setdefault(cluster.module, []).append(cluster)
        return [
            ModuleConfig(
                name=module,
                version=max((c.version for c in members), key=_version_key),
                contact=self.contact,
                clusters=tuple(c.export() for c in sorted(members, key=lambda c: c.name)),
            )
            for module, members in sorted(by_module.items())
        ]

    def _modules_changed(self) -> None:
        """Tell the core now, so that "define, then run" in consecutive cells just works."""
        client = self._client
        if client is None or not self._loop.running:
            return
        if self._loop.in_loop_thread():
            client.modules_changed()
            return
        if not self._loop.run(client.sync_now, timeout=10):
            log.warning(
                "nbproc: the core at %s did not take the change yet (%s); retrying in the background",
                client.core_url,
                client.last_error or "not connected",
            )

    def _cancel_runs_of(self, cluster: Cluster) -> None:
        for run in self.engine.runs():
            if run.cluster is cluster and not run.done:
                run.cancel()

    # -- RunAcceptor (called on the loop by the server) ---------------------------------------------------
    def resolve(self, request: RunRequest) -> Cluster:
        with self._lock:
            names = [name for (module, name) in self._clusters if module == request.module]
            if not names:
                raise UnknownCluster(
                    f"unknown module {request.module!r}: this processor offers "
                    f"{sorted({m for m, _ in self._clusters}) or 'no modules'}"
                )
            name = resolve_cluster_name(request.cluster, names)
            if name is None:
                raise UnknownCluster(
                    f"module {request.module!r} has no cluster {request.cluster!r} "
                    f"(nor one named before a '.' or ':' in it); it has {sorted(names)}"
                )
            return self._clusters[(request.module, name)]

    def start_run(self, cluster: Cluster, request: RunRequest) -> Run:
        config = request.config or RunConfig(identifier=request.config_name or cluster.name)
        return self.engine.submit(
            cluster,
            request.run_id,
            config.with_defaults(cluster.export_config()),
            request.metadata,
            reporter=self._client,  # the core that sent it, whatever we connect to later
        )

    # -- RunReporter for runs that no core sent (none of its calls reach a core) -----------------------------
    def report(self, run_id: int, status: Status, statistics: Any, final: bool) -> None:
        pass

    def log(self, run_id: int, level: LogLevel, message: str) -> None:
        pass

    def cache_save(self, value: Any, expiry_minutes: float = 0) -> str:
        raise RuntimeError("this run has no core to cache values in")

    def cache_load(self, key: str) -> Any:
        raise RuntimeError("this run has no core to cache values in")

    def _note_lost_report(self, client: CoreClient, run_id: int, message: str) -> None:
        """Keep the warning with the run it is about (ids repeat across cores and restarts)."""
        for run in self.engine.runs():
            if run.run_id == run_id and run.reporter is client:
                run.note(LogLevel.WARNING, message)

    # -- operating through the core (what an operator would do) -------------------------------------------------
    def operator(self) -> OperatorClient:
        if self.core is None:
            raise RuntimeError("this processor is not connected to a core")
        return OperatorClient(self.core.client_url)

    def provision(
        self,
        name: str,
        module: str | None = None,
        config: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        """Ask the core to run cluster ``name``, as an operator would; returns the run id."""
        cluster = self.cluster(name, module)
        strings = _string_map(metadata)
        return self._operate(
            lambda op: op.provision(cluster.module, cluster.name, config or cluster.name, strings)
        )

    def wait(self, run_id: int, timeout: float | None = None) -> Run:
        """Wait until this processor's run ``run_id`` ends (it may still be queued at first)."""
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while (run := self.engine.get(run_id)) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not reach this processor in {timeout} s")
            time.sleep(0.01)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        run.wait(remaining)
        self._wait_final_delivered(run_id, deadline)
        return run

    def _wait_final_delivered(self, run_id: int, deadline: float | None) -> None:
        """So that the core's record already says what the run says when ``wait`` returns
        (bounded: a core that is away does not hold the caller)."""
        import time

        limit = time.monotonic() + FINAL_REPORT_GRACE
        if deadline is not None:
            limit = min(limit, deadline)
        client = self._client
        while client is not None and client.final_pending(run_id) and time.monotonic() < limit:
            time.sleep(0.005)

    def core_record(self, run_id: int) -> RunRecord | None:
        """The run as the core records it."""
        return self._operate(lambda op: op.run(run_id))

    def mount(self, module: str, cluster: str | None = None, mounted: bool = True) -> None:
        if cluster:
            self._operate(lambda op: op.mount_cluster(module, cluster, mounted))
        else:
            self._operate(lambda op: op.mount_module(module, mounted))

    def _operate(self, action: Any) -> Any:
        """Run an operator call on our loop (one short-lived session per call)."""

        async def call() -> Any:
            op = self.operator()
            try:
                return await action(op)
            finally:
                await op.close()

        self._require_started()
        try:
            return self._loop.run(call, timeout=30)
        except aiohttp.ClientError as exc:
            where = self.core.client_url if self.core else "the core"
            raise CoreUnavailable(
                f"cannot reach the core's client endpoint at {where}: {exc}"
            ) from None

    # -- local views ---------------------------------------------------------------------------------------
    def runs(self) -> list[Run]:
        return self.engine.runs()

    def get_run(self, run_id: int) -> Run:
        run = self.engine.get(run_id)
        if run is None:
            raise KeyError(f"no run {run_id} on this processor")
        return run

    def cancel(self, run_id: int) -> bool:
        return self.engine.cancel(run_id)

    def status(self) -> dict[str, Any]:
        runs = self.engine.runs()
        return {
            "processor": self.url if self._started else None,
            "core": self.core.processor_url if self.core else None,
            "core_client": self.core.client_url if self.core else None,
            "embedded_core": self.embedded_core is not None,
            "connection": self.connection_state,
            "clusters": [f"{c.module}/{c.name}" for c in self.clusters()],
            "active_runs": sum(1 for r in runs if r.status == Status.ACTIVE),
            "runs": len(runs),
        }

    def describe(self) -> str:
        """One line: where the processor and the core are."""
        core = self.core.processor_url if self.core else "no core"
        kind = "embedded core" if self.embedded_core is not None else "core"
        return f"nbproc processor at {self.url} -> {kind} {core} ({self.connection_state})"


def _string_map(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Run metadata is a map of strings on the wire: say so here, not in a 400 from the core."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of strings, got {type(metadata).__name__}")
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"metadata keys and values must be strings; not: {bad!r}")
    return dict(metadata)


def _advertised(host: str) -> str:
    """The host the core should call us on: a wildcard bind is not an address."""
    if host in ("0.0.0.0", "", "::"):
        return os.environ.get("NBPROC_ADVERTISE_HOST") or "127.0.0.1"
    return host


def _version_key(version: str) -> tuple[Any, ...]:
    parts: list[Any] = []
    for piece in version.replace("-", ".").split("."):
        parts.append((0, int(piece)) if piece.isdigit() else (1, piece))
    return tuple(parts)
