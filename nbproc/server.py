"""The processor's own HTTP server: what the core calls (PROTOCOL.md section 2).

Two routes. ``GET /debug`` is the core's liveness probe. ``POST /supervisor`` is a run request:
it is parsed strictly, resolved to a cluster, answered within milliseconds, and only *then*
handed on, because the reference core handles requests one at a time and a processor that calls
it back before answering stalls both.

The lifecycle follows aiohttp's ``web_runner``: ``AppRunner`` + ``TCPSite``, no ``run_app`` and no
signal handlers, so it can live on a loop inside a Jupyter kernel's thread.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from .cluster import Cluster
from .protocol import CoreAnswer, ProtocolError, RunRequest, dumps, loads

log = logging.getLogger("nbproc.server")

MAX_BODY_BYTES = 1024 * 1024


class UnknownCluster(LookupError):
    """The run request names a module or cluster this processor does not offer (-> 404)."""


class RunAcceptor(Protocol):
    def resolve(self, request: RunRequest) -> Cluster:
        """The cluster a run request means; raises UnknownCluster with a description."""

    def start_run(self, cluster: Cluster, request: RunRequest) -> object:
        """Start the run; called after the 200 answer has been written. Must not block."""


def answer(status: int, body: CoreAnswer, close: bool = False) -> web.Response:
    response = web.Response(
        status=status, text=dumps(body.to_json()), content_type="application/json"
    )
    if close:
        response.force_close()
    return response


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error a caller can see is the core's JSON envelope with a description; never a 500
    for bad input (and a 500 for our own bugs still says what happened)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        description = (
            exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        )
        response = answer(exc.status, CoreAnswer.fail(description))
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except ConnectionError:  # the caller hung up mid-request: nothing to answer, no bug
        log.debug("%s %s: the client went away", request.method, request.path)
        return answer(400, CoreAnswer.fail("the client closed the connection mid-request"))
    except Exception as exc:  # a bug of ours: say so, keep serving
        log.exception("internal error handling %s %s", request.method, request.path)
        return answer(500, CoreAnswer.fail(f"internal error: {type(exc).__name__}: {exc}"))


class ProcessorServer:
    """Serves the core's calls on ``host:port``; ``port=0`` picks a free port."""

    def __init__(self, acceptor: RunAcceptor, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._acceptor = acceptor
        self._runner: web.AppRunner | None = None

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[json_errors])
        app.router.add_get("/debug", self.debug)
        app.router.add_post("/supervisor", self.supervisor)
        return app

    async def start(self) -> int:
        """Bind and serve; returns the bound port. A bind error propagates to the caller."""
        runner = web.AppRunner(
            self.make_app(), handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        # backlog: a core (or a test) may open hundreds of connections at once; the default 128
        # drops SYNs past that and the kernel retries them a whole second later
        site = web.TCPSite(runner, self.host, self.requested_port, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = _bound_port(runner)
        return self.port

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- handlers ------------------------------------------------------------------------------
    async def debug(self, request: web.Request) -> web.Response:
        # The reference core never closes probe connections: close them ourselves.
        return answer(200, CoreAnswer.ok({"alive": True}), close=True)

    async def supervisor(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()  # over client_max_size -> 413 via json_errors
        try:
            run_request = RunRequest.parse(loads(body))
        except ProtocolError as exc:
            return answer(400, CoreAnswer.fail(f"bad run request: {exc}"))
        try:
            cluster = self._acceptor.resolve(run_request)
        except UnknownCluster as exc:
            return answer(404, CoreAnswer.fail(str(exc)))
        response = answer(200, CoreAnswer.ok({"id": run_request.run_id}))
        await response.prepare(request)
        await response.write_eof()  # the answer is on the wire before the run does anything
        self._acceptor.start_run(cluster, run_request)
        return response


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the server did not report a bound address")
