"""The embedded core never answers 5xx and keeps serving, whatever it is sent.

Two generators: a deterministic corpus (every route and method, malformed JSON, every field of
every valid body deleted or replaced by values of the wrong type, mutated query strings), sent
concurrently over aiohttp; and hypothesis, driving a thread-hosted core over plain urllib.
"""

from __future__ import annotations

import asyncio
import copy
import io
import itertools
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbproc.core import EmbeddedCore, ThreadedCore
from nbproc.operator import OperatorClient
from nbproc.protocol import (
    CacheSave,
    ClusterExport,
    CoreAnswer,
    ExportConfig,
    LogLine,
    Mode,
    ModuleConfig,
    ModuleRegistration,
    MountRequest,
    ProcessorAddress,
    ProvisionRequest,
    RunConfig,
    Statistics,
    SupervisorReport,
)

HOST = "127.0.0.1"
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")


def _refused_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


REFUSED = ProcessorAddress(HOST, _refused_port())  # provisioning there fails at once
MODULE = ModuleConfig(
    "common",
    "1.0",
    clusters=(
        ClusterExport("Vec", True, ExportConfig()),
        ClusterExport("Feed", True, ExportConfig(mode=Mode.STREAM)),
    ),
)

# (endpoint, path) -> a valid body; mutations of it reach past the first type check
TEMPLATES: dict[tuple[str, str], Any] = {
    ("processor", "/processor"): REFUSED.to_json(),
    ("processor", "/module"): ModuleRegistration(REFUSED, MODULE).to_json(),
    ("processor", "/supervisor"): SupervisorReport(1, "active", Statistics(1, 2, 3)).to_json(),
    ("processor", "/log"): LogLine(1, "normal", "hello").to_json(),
    ("processor", "/cache"): CacheSave({"a": [1, 2]}, 1).to_json(),
    ("client", "/module"): MountRequest("common", True).to_json(),
    ("client", "/cluster"): MountRequest("common", True, "Vec").to_json(),
    ("client", "/config"): RunConfig.from_export("Vec.x", ExportConfig()).to_json(),
    ("client", "/supervisor"): ProvisionRequest("common", "Vec").to_json(),
}
QUERIES: dict[tuple[str, str], dict[str, str]] = {
    ("processor", "/processor"): REFUSED.query(),
    ("processor", "/module"): {**REFUSED.query(), "module": "common"},
    ("processor", "/cache"): {"key": "abc"},
    ("client", "/cluster"): {"module": "common"},
    ("client", "/config"): {"module": "common", "config": "Vec"},
    ("client", "/supervisor"): {"module": "common", "cluster": "Vec", "id": "1"},
    ("client", "/statistics"): {"module": "common", "cluster": "Vec"},
}
PATHS = {
    "processor": ["/processor", "/module", "/supervisor", "/log", "/cache", "/debug", "/x/y"],
    "client": [
        "/processor",
        "/module",
        "/cluster",
        "/config",
        "/supervisor",
        "/statistics",
        "/",
        "/%ff",
    ],
}
WEIRD: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**70,
    1e308,
    "",
    "x" * 300,
    "²",
    "\ud800",
    [],
    [1, "a"],
    {},
    {"a": {"b": None}},
]
RAW_BODIES: list[bytes] = [
    b"",
    b" ",
    b"{",
    b"}",
    b"null",
    b"[]",
    b"1",
    b'"s"',
    b"true",
    b"NaN",
    b'{"a": NaN}',
    b'{"port": Infinity}',
    b'{"id": -Infinity}',
    b"\xff\xfe\x00",
    b"\x00",
    b"[" * 50_000,
    b'{"a":' * 50_000,
    b'{"port": 1' + b"0" * 5000 + b"}",
    b'{"id": 1e999}',
    b'{"host": "\\ud800", "port": 1}',
    b'{"a": 1,}',
    b"{'single': 1}",
    json.dumps({"value": json.loads("[" * 900 + "]" * 900)}).encode(),
    b"x" * (1024 * 1024 + 10),
]


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every key/index path inside a JSON value."""
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        yield (*prefix, key)
        yield from _paths(child, (*prefix, key))


def _mutations(template: Any) -> Iterator[Any]:
    """The template with each field deleted, and with each field replaced by each WEIRD value."""
    for path in _paths(template):
        parent_path, key = path[:-1], path[-1]
        for replacement in [_DELETE, *WEIRD]:
            body = copy.deepcopy(template)
            parent = body
            for step in parent_path:
                parent = parent[step]
            if replacement is _DELETE:
                del parent[key]
            else:
                parent[key] = copy.deepcopy(replacement)
            yield body


_DELETE = object()


def _query_mutations(query: dict[str, str]) -> Iterator[dict[str, str]]:
    for key in query:
        yield {k: v for k, v in query.items() if k != key}
        for weird in ["", "x", "-1", "²", "9" * 5000, "%", " ", "1e3", "\x00", "0"]:
            yield {**query, key: weird}


def _encode(body: Any) -> bytes:
    return json.dumps(body).encode("utf-8", "surrogatepass")


def corpus() -> list[tuple[str, str, str, dict[str, str] | None, bytes | None]]:
    """(endpoint, method, path, query, body) for every request of the fuzz run."""
    cases: list[tuple[str, str, str, dict[str, str] | None, bytes | None]] = []
    for endpoint, paths in PATHS.items():
        for path, method in itertools.product(paths, METHODS):
            cases.append((endpoint, method, path, None, None))
            cases += [(endpoint, method, path, None, raw) for raw in RAW_BODIES[::3]]
    for (endpoint, path), template in TEMPLATES.items():
        for method in ("POST", "PUT"):
            cases += [(endpoint, method, path, None, raw) for raw in RAW_BODIES]
            cases += [(endpoint, method, path, None, _encode(b)) for b in _mutations(template)]
    for (endpoint, path), query in QUERIES.items():
        for method in ("GET", "DELETE", "POST", "PUT"):
            cases += [(endpoint, method, path, q, None) for q in _query_mutations(query)]
    return cases


async def _send(
    session: aiohttp.ClientSession, base: dict[str, str], case: tuple
) -> tuple[tuple, int, bytes]:
    endpoint, method, path, query, body = case
    data = io.BytesIO(body) if body is not None else None
    url = base[endpoint] + path
    async with session.request(method, url, params=query, data=data) as response:
        return case, response.status, await response.read()


async def _fake_processor() -> tuple[web.AppRunner, ProcessorAddress]:
    async def accept(request: web.Request) -> web.Response:
        run_id = (await request.json())["id"]
        return web.json_response(CoreAnswer.ok({"id": run_id}).to_json())

    app = web.Application()
    app.router.add_post("/supervisor", accept)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, HOST, 0).start()
    return runner, ProcessorAddress(HOST, runner.addresses[0][1])


def test_corpus_never_gets_5xx_and_core_keeps_serving() -> None:
    cases = corpus()
    assert len(cases) >= 1000

    async def body() -> None:
        async with EmbeddedCore(probe_interval=60, provision_timeout=0.5) as core:
            base = {"client": core.client_url, "processor": core.processor_url}
            async with aiohttp.ClientSession() as session:
                # a registered module, so that mutations reach the deeper rules too
                await session.post(base["processor"] + "/processor", json=REFUSED.to_json())
                registration = ModuleRegistration(REFUSED, MODULE).to_json()
                await session.post(base["processor"] + "/module", json=registration)
                await session.post(
                    base["client"] + "/supervisor", json={"module": "common", "cluster": "Vec"}
                )

                limit = asyncio.Semaphore(32)

                async def one(case: tuple) -> tuple[tuple, int, bytes]:
                    async with limit:
                        return await _send(session, base, case)

                results = await asyncio.gather(*(one(c) for c in cases))
                server_errors = [(c[:4], s, b[:200]) for c, s, b in results if s >= 500]
                assert server_errors == []
                for case, _status, raw in results:
                    if case[1] != "HEAD":
                        json.loads(raw)  # every answer is JSON, errors included
                assert {s for _, s, _ in results} >= {200, 400, 404, 405, 409, 413}
                assert core.internal_errors == 0

                await _still_serving(core, session)

    asyncio.run(asyncio.wait_for(body(), 50))


async def _still_serving(core: EmbeddedCore, session: aiohttp.ClientSession) -> None:
    runner, address = await _fake_processor()
    try:
        await session.post(core.processor_url + "/processor", json=address.to_json())
        module = ModuleConfig("after", clusters=(ClusterExport("Vec", True),))
        registration = ModuleRegistration(address, module).to_json()
        async with session.post(core.processor_url + "/module", json=registration) as response:
            assert response.status == 200
        operator = OperatorClient(core.client_url, session=session)
        run_id = await operator.provision("after", "Vec")
        assert (await operator.run(run_id)).status == "active"
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------
# hypothesis against a thread-hosted core


@pytest.fixture(scope="module")
def threaded_core() -> Iterator[ThreadedCore]:
    with ThreadedCore(probe_interval=60, provision_timeout=0.2) as threaded:
        _urlopen(
            threaded.processor_url + "/processor", "POST", json.dumps(REFUSED.to_json()).encode()
        )
        registration = ModuleRegistration(REFUSED, MODULE).to_json()
        _urlopen(threaded.processor_url + "/module", "POST", json.dumps(registration).encode())
        yield threaded
        assert threaded.core.internal_errors == 0


def _urlopen(url: str, method: str, body: bytes | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
ROUTES = sorted(TEMPLATES)


@st.composite
def mutated_body(draw: st.DrawFn) -> tuple[str, str, bytes]:
    """A valid body of some route with some of its fields replaced by arbitrary JSON."""
    endpoint, path = draw(st.sampled_from(ROUTES))
    body = copy.deepcopy(TEMPLATES[(endpoint, path)])
    paths = list(_paths(body))
    for target in draw(st.lists(st.sampled_from(paths), max_size=3)):
        parent = body
        try:
            for step in target[:-1]:
                parent = parent[step]
            parent[target[-1]] = draw(JSON)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier replacement removed this path
    return endpoint, path, json.dumps(body).encode()


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    case=mutated_body()
    | st.tuples(
        st.sampled_from(["client", "processor"]),
        st.sampled_from(sorted({p for paths in PATHS.values() for p in paths if "%" not in p})),
        st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())),
    ),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    query=st.dictionaries(
        st.sampled_from(["host", "port", "module", "cluster", "config", "id", "key"]),
        st.text(max_size=12),
        max_size=3,
    ),
)
def test_hypothesis_never_gets_5xx(
    threaded_core: ThreadedCore, case: tuple[str, str, bytes], method: str, query: dict[str, str]
) -> None:
    endpoint, path, body = case
    base = threaded_core.client_url if endpoint == "client" else threaded_core.processor_url
    url = base + path + ("?" + urllib.parse.urlencode(query) if query else "")
    status, raw = _urlopen(url, method, body if method in ("POST", "PUT") else None)
    assert status < 500, (status, raw[:300])
    json.loads(raw)
