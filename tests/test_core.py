"""The embedded core, over real HTTP on loopback: registration, configs, mounting, provisioning,
reports, logs, cache, probes and stream clusters. Fake processors are real aiohttp servers."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from nbproc.core import EmbeddedCore, ThreadedCore
from nbproc.operator import OperatorClient
from nbproc.protocol import (
    CacheEntry,
    CacheSave,
    ClusterExport,
    Contact,
    CoreAnswer,
    CoreError,
    ExportConfig,
    LogLine,
    Mode,
    ModuleConfig,
    ModuleRegistration,
    ProcessorAddress,
    RunConfig,
    RunRequest,
    Statistics,
    SupervisorReport,
    dumps,
)

HOST = "127.0.0.1"


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 30) -> Any:
    """Run one async test body on a fresh loop, with a hard ceiling so nothing hangs CI."""
    return asyncio.run(asyncio.wait_for(coro_fn(), timeout))


def export(name: str, mount: bool = True, mode: Mode = Mode.BATCH, t: int = 1) -> ClusterExport:
    return ClusterExport(name, mount, ExportConfig(mode=mode, t_functions=t))


def module(name: str = "common", *exports: ClusterExport, version: str = "1.0") -> ModuleConfig:
    exports = exports or (export("Vec"),)
    return ModuleConfig(name, version, Contact("me", "me@example.org"), tuple(exports))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class FakeProcessor:
    """A real aiohttp server standing in for a processor; records every run request body.

    ``mode``: ``ok`` answers 200, ``fail`` answers 500, ``slow`` answers after 3 s.
    ``before_answer`` runs inside the run request's handling (a run that finishes at once).
    """

    def __init__(
        self,
        mode: str = "ok",
        before_answer: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.mode = mode
        self.before_answer = before_answer
        self.bodies: list[dict[str, Any]] = []
        self.probes = 0
        self.received = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def address(self) -> ProcessorAddress:
        return ProcessorAddress(HOST, self.port)

    async def __aenter__(self) -> FakeProcessor:
        app = web.Application()
        app.router.add_post("/supervisor", self._supervisor)
        app.router.add_get("/debug", self._debug)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _debug(self, request: web.Request) -> web.Response:
        self.probes += 1
        return web.Response(text="ok", headers={"Connection": "close"})

    async def _supervisor(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.bodies.append(body)
        self.received.set()
        if self.before_answer is not None:
            await self.before_answer(body)
        if self.mode == "fail":
            return web.json_response(CoreAnswer.fail("nope").to_json(), status=500)
        if self.mode == "slow":
            await asyncio.sleep(3)
        return web.json_response(CoreAnswer.ok({"id": body["id"]}).to_json())


class Rig:
    """An embedded core, an HTTP session and an operator client, all closed on exit."""

    def __init__(self, **options: Any) -> None:
        self.core = EmbeddedCore(**{"probe_interval": 60.0, **options})

    async def __aenter__(self) -> Rig:
        await self.core.start()
        self.session = aiohttp.ClientSession()
        self.op = OperatorClient(self.core.client_url, session=self.session)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.op.close()
        await self.session.close()
        await self.core.stop()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, str] | None = None,
        client: bool = False,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        """A raw call to the core; returns (HTTP status, decoded JSON)."""
        base = self.core.client_url if client else self.core.processor_url
        data: Any = dumps(body) if body is not None else None
        if raw is not None:
            data = io.BytesIO(raw)  # aiohttp warns about large raw bytes bodies
        async with self.session.request(method, base + path, data=data, params=params) as resp:
            return resp.status, await resp.json(content_type=None)

    async def register(self, address: ProcessorAddress, *modules: ModuleConfig) -> None:
        status, answer = await self.call("POST", "/processor", address.to_json())
        assert (status, answer["success"]) == (200, True), answer
        for config in modules:
            body = ModuleRegistration(address, config).to_json()
            status, answer = await self.call("POST", "/module", body)
            assert (status, answer["success"]) == (200, True), answer

    async def report(self, run_id: int, status: str, statistics: Any = None) -> tuple[int, Any]:
        body = SupervisorReport(run_id, status).to_json()
        if statistics is None:
            del body["statistics"]
        else:
            body["statistics"] = statistics
        return await self.call("PUT", "/supervisor", body)


# ---------------------------------------------------------------------------------------------
# registration


def test_processor_registration_rules() -> None:
    async def body() -> None:
        async with Rig() as rig:
            address = ProcessorAddress(HOST, 5023)
            assert await rig.call("POST", "/processor", address.to_json()) == (
                200,
                {"success": True, "description": "", "data": None},
            )
            status, answer = await rig.call("POST", "/processor", address.to_json())
            assert status == 409 and answer["success"] is False
            # same host, other port: another processor
            other = ProcessorAddress(HOST, 5024)
            assert (await rig.call("POST", "/processor", other.to_json()))[0] == 200
            assert {(p.host, p.port) for p in await rig.op.processors()} == {
                (HOST, 5023),
                (HOST, 5024),
            }
            status, answer = await rig.call("POST", "/processor", {"host": HOST, "port": "5023"})
            assert status == 400 and "port" in answer["description"]
            status, answer = await rig.call("POST", "/processor", {"host": HOST, "port": 70000})
            assert status == 400 and "port" in answer["description"]
            # deleting something unknown: HTTP 200 with success:false, like the reference core
            params = {"host": HOST, "port": "6000"}
            status, answer = await rig.call("DELETE", "/processor", params=params)
            assert status == 200 and answer["success"] is False
            status, answer = await rig.call("DELETE", "/processor", params={"host": HOST})
            assert status == 400 and "port" in answer["description"]
            params = {"host": HOST, "port": "5024"}
            assert (await rig.call("DELETE", "/processor", params=params))[1]["success"]
            assert [p.port for p in await rig.op.processors()] == [5023]

    run(body)


def test_module_registration_rules() -> None:
    async def body() -> None:
        async with Rig() as rig:
            address = ProcessorAddress(HOST, 5023)
            unknown = ModuleRegistration(address, module()).to_json()
            status, answer = await rig.call("POST", "/module", unknown)
            assert status == 400 and "not registered" in answer["description"]

            await rig.register(address, module("common"))
            again = ModuleRegistration(address, module("common", version="2.0")).to_json()
            status, answer = await rig.call("POST", "/module", again)
            assert status == 409 and answer["success"] is False

            twins = module("twins", export("A"), export("A"))
            status, answer = await rig.call(
                "POST", "/module", ModuleRegistration(address, twins).to_json()
            )
            assert status == 400 and "duplicate" in answer["description"]

            # update = DELETE then POST
            params = {**address.query(), "module": "common"}
            assert (await rig.call("DELETE", "/module", params=params))[1]["success"]
            status, answer = await rig.call("DELETE", "/module", params=params)
            assert status == 200 and answer["success"] is False
            assert (await rig.call("POST", "/module", again))[0] == 200
            assert [(m.name, m.version) for m in await rig.op.modules()] == [("common", "2.0")]

            status, answer = await rig.call("POST", "/module", {"host": HOST, "port": 5023})
            assert status == 400 and "module" in answer["description"]

    run(body)


def test_clusters_key_and_exports_fallback() -> None:
    async def body() -> None:
        async with Rig() as rig:
            address = ProcessorAddress(HOST, 5023)
            await rig.register(address)
            only_exports = ModuleRegistration(address, module("doc", export("E"))).to_json()
            del only_exports["module"]["config"]["clusters"]
            assert (await rig.call("POST", "/module", only_exports))[0] == 200
            assert [c.name for c in await rig.op.clusters("doc")] == ["E"]

            both = ModuleRegistration(address, module("core", export("C"))).to_json()
            both["module"]["config"]["exports"] = [export("Ignored").to_json()]
            assert (await rig.call("POST", "/module", both))[0] == 200
            assert [c.name for c in await rig.op.clusters("core")] == ["C"]

            with pytest.raises(CoreError) as err:
                await rig.op.clusters("nope")
            assert err.value.status == 404

    run(body)


def test_processor_disappearing_removes_its_modules() -> None:
    async def body() -> None:
        async with Rig() as rig:
            a, b = ProcessorAddress(HOST, 5023), ProcessorAddress(HOST, 5024)
            await rig.register(a, module("common"), module("only-a"))
            await rig.register(b, module("common"))
            assert sorted(m.name for m in await rig.op.modules()) == ["common", "only-a"]
            listing = {p.port: sorted(p.modules) for p in await rig.op.processors()}
            assert listing == {5023: ["common", "only-a"], 5024: ["common"]}
            await rig.call("DELETE", "/processor", params=a.query())
            assert [m.name for m in await rig.op.modules()] == ["common"]

    run(body)


# ---------------------------------------------------------------------------------------------
# configs


def test_default_configs_stored_and_never_overwritten() -> None:
    async def body() -> None:
        async with Rig() as rig:
            address = ProcessorAddress(HOST, 5023)
            await rig.register(address, module("common", export("Vec", t=3)))
            expected = RunConfig.from_export("Vec", ExportConfig(t_functions=3)).to_json()
            params = {"module": "common", "config": "Vec"}
            # the bare config object, no envelope, like the reference core
            assert await rig.call("GET", "/config", params=params, client=True) == (200, expected)

            edited = RunConfig.parse({**expected, "start-with-n-t-channels": 7})
            await rig.op.put_config("common", edited)
            await rig.call("DELETE", "/processor", params=address.query())
            await rig.register(address, module("common", export("Vec", t=3)))
            assert (await rig.op.get_config("common", "Vec")).t_channels == 7

            fast = RunConfig("Vec.fast", t_channels=4)
            await rig.op.post_config("common", fast)
            with pytest.raises(CoreError) as err:
                await rig.op.post_config("common", fast)
            assert err.value.status == 409
            names = await rig.call("GET", "/config", params={"module": "common"}, client=True)
            assert [c["identifier"] for c in names[1]] == ["Vec", "Vec.fast"]

            await rig.op.delete_config("common", "Vec.fast")
            with pytest.raises(CoreError) as err:
                await rig.op.delete_config("common", "Vec.fast")
            assert err.value.status == 200  # success:false, HTTP 200
            with pytest.raises(CoreError) as err:
                await rig.op.get_config("common", "Vec.fast")
            assert err.value.status == 404

            status, answer = await rig.call(
                "POST", "/config", {"start-with-n-t-channels": 2}, {"module": "common"}, True
            )
            assert status == 400 and "identifier" in answer["description"]

    run(body)


# ---------------------------------------------------------------------------------------------
# mounting and provisioning


def test_provisioning_requires_module_and_cluster_mounted() -> None:
    async def body() -> None:
        async with Rig() as rig, FakeProcessor() as fake:
            await rig.register(fake.address, module("common", export("Vec", mount=False)))
            assert [m.mounted for m in await rig.op.modules()] == [False]
            assert [c.mounted for c in await rig.op.clusters("common")] == [False]
            with pytest.raises(CoreError) as err:
                await rig.op.provision("common", "Vec")
            assert err.value.status == 400 and "mounted" in err.value.description

            await rig.op.mount_module("common", True)
            with pytest.raises(CoreError):
                await rig.op.provision("common", "Vec")
            await rig.op.mount_cluster("common", "Vec", True)
            run_id = await rig.op.provision("common", "Vec")
            assert (await rig.op.run(run_id)).status == "active"

            await rig.op.mount_cluster("common", "Vec", False)
            with pytest.raises(CoreError):
                await rig.op.provision("common", "Vec")
            with pytest.raises(CoreError) as err:
                await rig.op.mount_cluster("common", "Nope", True)
            assert err.value.status == 404
            with pytest.raises(CoreError) as err:
                await rig.op.mount_module("nope", True)
            assert err.value.status == 404
            with pytest.raises(CoreError) as err:
                await rig.op.provision("common", "Nope")
            assert err.value.status == 404

    run(body)


def test_mount_true_export_mounts_module_at_once() -> None:
    async def body() -> None:
        async with Rig() as rig:
            address = ProcessorAddress(HOST, 5023)
            await rig.register(address, module("common", export("A", mount=False), export("B")))
            assert [m.mounted for m in await rig.op.modules()] == [True]
            mounted = {c.name: c.mounted for c in await rig.op.clusters("common")}
            assert mounted == {"A": False, "B": True}

    run(body)


def test_provision_sends_reference_shape_and_goes_active() -> None:
    async def body() -> None:
        async with Rig() as rig, FakeProcessor() as fake:
            await rig.register(fake.address, module("common", export("Vec", t=2)))
            run_id = await rig.op.provision("common", "Vec", metadata={"key": "value"})
            assert run_id == 1  # ids start at 1
            config = RunConfig.from_export("Vec", ExportConfig(t_functions=2))
            assert fake.bodies == [
                RunRequest("common", "Vec", 1, config, metadata={"key": "value"}).to_json()
            ]
            assert set(fake.bodies[0]) == {"module", "cluster", "config", "id", "metadata"}
            record = await rig.op.run(run_id)
            assert (record.status, record.processor, record.cluster) == (
                "active",
                str(fake.address),
                "Vec",
            )

            # the quirk: the request's "cluster" is the config name
            await rig.op.post_config("common", RunConfig("Vec.fast", t_channels=9))
            second = await rig.op.provision("common", "Vec", config="Vec.fast")
            assert second == 2
            assert fake.bodies[1]["cluster"] == "Vec.fast"
            assert fake.bodies[1]["config"] == {
                "identifier": "Vec.fast",
                "start-with-n-t-channels": 9,
            }
            record = await rig.op.run(second)
            assert (record.cluster, record.config) == ("Vec", "Vec.fast")
            assert [r.run_id for r in await rig.op.runs("common", "Vec")] == [1, 2]

            with pytest.raises(CoreError) as err:
                await rig.op.provision("common", "Vec", config="Vec.unknown")
            assert err.value.status == 404
            assert await rig.op.run(99) is None

    run(body)


@pytest.mark.parametrize("mode", ["fail", "slow", "gone"])
def test_provision_cancelled_when_processor_does_not_accept(mode: str) -> None:
    async def body() -> None:
        async with Rig() as rig, FakeProcessor(mode=mode) as fake:
            if mode == "gone":
                fake.port = free_port()  # nobody listens there
            await rig.register(fake.address, module())
            started = time.monotonic()
            run_id = await rig.op.provision("common", "Vec")
            elapsed = time.monotonic() - started
            assert (await rig.op.run(run_id)).status == "cancelled"
            if mode == "slow":  # the core waits ~2 s, no longer
                assert 1.8 < elapsed < 2.9

    run(body)


def test_fast_run_status_is_never_overwritten() -> None:
    async def body() -> None:
        async with Rig() as rig:

            async def finish_at_once(request: dict[str, Any]) -> None:
                status, answer = await rig.report(request["id"], "completed", {})
                assert (status, answer["success"]) == (200, True)

            async with FakeProcessor(before_answer=finish_at_once) as fake:
                await rig.register(fake.address, module())
                run_id = await rig.op.provision("common", "Vec")
                assert (await rig.op.run(run_id)).status == "completed"
                assert len(await rig.op.statistics("common", "Vec")) == 1

    run(body)


def test_round_robin_across_processors() -> None:
    async def body() -> None:
        async with Rig() as rig, FakeProcessor() as one, FakeProcessor() as two:
            await rig.register(one.address, module())
            await rig.register(two.address, module())
            ids = [await rig.op.provision("common", "Vec") for _ in range(4)]
            assert [b["id"] for b in one.bodies] == [ids[0], ids[2]]
            assert [b["id"] for b in two.bodies] == [ids[1], ids[3]]
            processors = [(await rig.op.run(i)).processor for i in ids]
            assert processors == [str(one.address), str(two.address)] * 2

    run(body)


# ---------------------------------------------------------------------------------------------
# reports, statistics, logs


def test_reports_and_statistics_records() -> None:
    async def body() -> None:
        async with Rig() as rig, FakeProcessor() as fake:
            await rig.register(fake.address, module())
            run_id = await rig.op.provision("common", "Vec")
            progress = Statistics(total_over_et=5).to_json()
            assert (await rig.report(run_id, "active", progress))[0] == 200
            assert (await rig.op.run(run_id)).statistics.total_over_et == 5
            assert await rig.op.statistics("common", "Vec") == []

            final = Statistics(total_processed=10, total_over_et=10, total_over_tl=10)
            status, answer = await rig.report(run_id, "completed", final.to_json())
            assert (status, answer["success"]) == (200, True)
            records = await rig.op.statistics("common", "Vec")
            assert len(records) == 1
            assert records[0].statistics.total_processed == 10
            assert records[0].elapsed_ns > 0 and records[0].timestamp > 1.7e9

            # bare list, like the reference core
            params = {"module": "common", "cluster": "Vec"}
            status, raw = await rig.call("GET", "/statistics", params=params, client=True)
            assert status == 200 and isinstance(raw, list) and raw[0]["elapsed"] > 0

            # the reference core crashes here; this one stores an empty statistics record
            other = await rig.op.provision("common", "Vec")
            status, answer = await rig.report(other, "crashed", None)
            assert (status, answer["success"]) == (200, True)
            status, answer = await rig.call(
                "PUT", "/supervisor", {"id": other, "status": "cancelled", "statistics": None}
            )
            assert (status, answer["success"]) == (200, True)
            records = await rig.op.statistics("common", "Vec")
            assert [r.statistics for r in records[1:]] == [Statistics(), Statistics()]

            status, answer = await rig.report(999, "completed", {})
            assert status == 200 and answer["success"] is False
            status, answer = await rig.report(run_id, "completed", {"data": [1]})
            assert status == 400 and "statistics.data" in answer["description"]

    run(body)


def test_log_only_while_active() -> None:
    async def body() -> None:
        async with Rig() as rig, FakeProcessor() as fake:
            await rig.register(fake.address, module())
            run_id = await rig.op.provision("common", "Vec")
            for level in ("normal", "warning", "fatal", "warn"):
                status, answer = await rig.call(
                    "POST", "/log", LogLine(run_id, level, "hi").to_json()
                )
                assert (status, answer["success"]) == (200, True)
            levels = [line.level for line in rig.core.state.runs[run_id].logs]
            assert levels == ["normal", "warning", "fatal", "normal"]

            await rig.report(run_id, "completed", {})
            status, answer = await rig.call(
                "POST", "/log", LogLine(run_id, "normal", "x").to_json()
            )
            assert status == 400 and "active" in answer["description"]
            status, _ = await rig.call("POST", "/log", LogLine(4242, "normal", "x").to_json())
            assert status == 400
            status, answer = await rig.call("POST", "/log", {"id": run_id, "level": "normal"})
            assert status == 400 and "message" in answer["description"]

    run(body)


# ---------------------------------------------------------------------------------------------
# cache


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_save_load_and_expiry() -> None:
    clock = FakeClock()

    async def body() -> None:
        async with Rig(clock=clock, default_cache_expiry_minutes=60) as rig:
            value = {"rows": [1, 2, 3], "name": "x"}
            body = {**CacheSave(value, 1).to_json(), "key": "mine"}
            status, answer = await rig.call("POST", "/cache", body)
            assert status == 200
            key = answer["data"]
            assert isinstance(key, str) and key != "mine"
            status, answer = await rig.call("GET", "/cache", params={"key": key})
            assert status == 200
            assert CacheEntry.parse(answer["data"]) == CacheEntry(key, value)

            default_key = (await rig.call("POST", "/cache", CacheSave("d", 0).to_json()))[1]["data"]
            clock.now += 61
            assert (await rig.call("GET", "/cache", params={"key": key}))[0] == 404
            clock.now += 58 * 60
            assert (await rig.call("GET", "/cache", params={"key": default_key}))[0] == 200
            clock.now += 2 * 60
            assert (await rig.call("GET", "/cache", params={"key": default_key}))[0] == 404

            assert (await rig.call("GET", "/cache", params={"key": "nope"}))[0] == 404
            assert (await rig.call("GET", "/cache"))[0] == 400
            status, answer = await rig.call("POST", "/cache", {"value": 1, "expiry": -1})
            assert status == 400 and "expiry" in answer["description"]
            assert (await rig.call("POST", "/cache", {"expiry": 1}))[0] == 400

    run(body)


def test_cache_expiry_with_the_real_clock() -> None:
    async def body() -> None:
        async with Rig() as rig:
            key = (await rig.call("POST", "/cache", CacheSave(1, 0.001).to_json()))[1]["data"]
            assert (await rig.call("GET", "/cache", params={"key": key}))[0] == 200
            await asyncio.sleep(0.1)  # 0.001 minutes = 60 ms
            assert (await rig.call("GET", "/cache", params={"key": key}))[0] == 404

    run(body)


# ---------------------------------------------------------------------------------------------
# probes and stream clusters


def test_probes_drop_a_dead_processor_but_keep_its_runs() -> None:
    async def body() -> None:
        async with Rig(probe_interval=0.05, probe_failures=3) as rig, FakeProcessor() as alive:
            dead = FakeProcessor()
            async with dead:
                await rig.register(dead.address, module("common"))
                await rig.register(alive.address, module("common"))
                run_id = await rig.op.provision("common", "Vec")
                assert (await rig.op.run(run_id)).processor == str(dead.address)
            # dead's server is gone now: three failed probes later it is dropped
            deadline = time.monotonic() + 5
            while len(await rig.op.processors()) > 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            processors = await rig.op.processors()
            assert [p.port for p in processors] == [alive.port]
            assert processors[0].status == "healthy"
            assert alive.probes >= 3
            assert (await rig.op.run(run_id)).status == "active"  # runs stay as they are
            second = await rig.op.provision("common", "Vec")
            assert (await rig.op.run(second)).processor == str(alive.address)

    run(body)


def test_stream_cluster_provisioned_on_registration_and_on_mount() -> None:
    async def body() -> None:
        async with Rig() as rig, FakeProcessor() as fake:
            stream = module(
                "live", export("Feed", mode=Mode.STREAM), export("Later", False, Mode.STREAM)
            )
            await rig.register(fake.address, stream)
            await asyncio.wait_for(fake.received.wait(), 2)
            assert len(fake.bodies) == 1
            request = RunRequest.parse(fake.bodies[0])
            assert (request.cluster, request.metadata, request.config.identifier) == (
                "Feed",
                {},
                "Feed",
            )
            record = await rig.op.wait_for_status(request.run_id, ["active"], timeout=2)
            assert record.cluster == "Feed"
            with pytest.raises(CoreError) as err:
                await rig.op.provision("live", "Feed")
            assert err.value.status == 400 and "Stream" in err.value.description

            fake.received.clear()
            await rig.op.mount_cluster("live", "Later", True)
            await asyncio.wait_for(fake.received.wait(), 2)
            assert [b["cluster"] for b in fake.bodies] == ["Feed", "Later"]
            await rig.op.mount_cluster("live", "Later", True)  # already running: no second run
            await asyncio.sleep(0.05)
            assert len(fake.bodies) == 2

    run(body)


# ---------------------------------------------------------------------------------------------
# HTTP edges and lifecycle


def test_http_edges_answer_json_and_never_500() -> None:
    async def body() -> None:
        async with Rig() as rig:
            status, answer = await rig.call("PUT", "/processor")
            assert status == 405 and answer["success"] is False
            assert (await rig.call("GET", "/nowhere"))[0] == 404
            assert (await rig.call("GET", "/nowhere", client=True))[0] == 404
            status, answer = await rig.call("POST", "/processor", raw=b"{not json")
            assert status == 400 and "malformed JSON" in answer["description"]
            status, answer = await rig.call("POST", "/processor", raw=b"[1, 2]")
            assert status == 400 and "object" in answer["description"]
            assert (await rig.call("POST", "/processor", raw=b""))[0] == 400
            assert (await rig.call("POST", "/processor", raw=b"[" * 100_000))[0] == 400
            assert (await rig.call("POST", "/cache", raw=b"x" * (1024 * 1024 + 1)))[0] == 413
            assert (await rig.call("GET", "/supervisor", params={"id": "x"}, client=True))[0] == 400
            assert rig.core.internal_errors == 0

    run(body)


def test_lifecycle_ports_and_restart() -> None:
    async def body() -> None:
        core = EmbeddedCore()
        with pytest.raises(RuntimeError):
            _ = core.client_url
        await core.start()
        assert core.client_url == f"http://{HOST}:{core.client_port}"
        assert core.processor_url == f"http://{HOST}:{core.processor_port}"
        assert core.client_port != core.processor_port
        port = core.client_port
        await core.stop()
        await core.stop()  # twice is fine
        with socket.socket() as sock:  # the port is free again
            sock.bind((HOST, port))

        with socket.socket() as taken:
            taken.bind((HOST, 0))
            taken.listen()
            busy = EmbeddedCore(processor_port=taken.getsockname()[1])
            with pytest.raises(OSError):
                await busy.start()

    run(body)


def test_threaded_core_for_synchronous_callers() -> None:
    before = threading.active_count()
    with ThreadedCore(probe_interval=60) as threaded:
        with urllib.request.urlopen(threaded.client_url + "/processor", timeout=5) as resp:
            assert CoreAnswer.parse(json.loads(resp.read())).data == []
        assert threaded.call(lambda: threaded.core.state.next_run_id) == 1
        port = threaded.processor_port
        started = time.monotonic()
    assert time.monotonic() - started < 2
    assert threading.active_count() == before
    with socket.socket() as sock:
        sock.bind((HOST, port))

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        with pytest.raises(OSError):
            ThreadedCore(client_port=taken.getsockname()[1]).start()
    assert threading.active_count() == before

    handle = EmbeddedCore(probe_interval=60).start_in_thread()
    try:
        assert handle.client_port > 0
    finally:
        handle.stop()


def test_unexpected_errors_become_logged_json_500(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with Rig() as rig:

            def broken(address: ProcessorAddress) -> None:
                raise ZeroDivisionError("a bug")

            rig.core.state.add_processor = broken  # type: ignore[method-assign]
            status, answer = await rig.call(
                "POST", "/processor", ProcessorAddress(HOST, 1).to_json()
            )
            assert status == 500 and answer == {
                "success": False,
                "description": "internal error: ZeroDivisionError",
                "data": None,
            }
            assert rig.core.internal_errors == 1
            assert (await rig.call("GET", "/processor", client=True))[0] == 200

    with caplog.at_level("ERROR", logger="nbproc.core"):
        run(body)
    assert "ZeroDivisionError" in caplog.text
