"""An async client for a core's *client endpoint*: what an operator (or a test) does to a core.

It works against both the embedded core and the reference core, which answer most calls with the
``{"success","description","data"}`` envelope but GET /config and GET /statistics with bare JSON
(PROTOCOL.md section 3). Every refusal, be it a non-2xx status or HTTP 200 with
``success: false``, raises :class:`~nbproc.protocol.CoreError` with the core's description.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import aiohttp

from .protocol import (
    ClusterInfo,
    CoreAnswer,
    CoreError,
    ModuleInfo,
    MountRequest,
    ProcessorInfo,
    ProtocolError,
    ProvisionAnswer,
    ProvisionRequest,
    RunConfig,
    RunRecord,
    StatisticsRecord,
    dumps,
    loads,
)

__all__ = ["CoreError", "OperatorClient"]


class OperatorClient:
    """Drive a core's client endpoint (default port 8136) over HTTP.

    Pass a ``session`` to share one; otherwise the client opens its own and :meth:`close`
    (or ``async with``) closes it.
    """

    def __init__(
        self, base_url: str, session: aiohttp.ClientSession | None = None, timeout: float = 10.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- runs ---------------------------------------------------------------------------------

    async def provision(
        self,
        module: str,
        cluster: str,
        config: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> int:
        """Ask the core to run ``module``/``cluster``; returns the run id."""
        body = ProvisionRequest(module, cluster, config or "", dict(metadata or {}))
        data = await self._call("POST", "/supervisor", body=body.to_json())
        return ProvisionAnswer.parse(data).run_id

    async def run(self, run_id: int) -> RunRecord | None:
        """The run's record, or None if the core does not know the id."""
        try:
            data = await self._call("GET", "/supervisor", params={"id": str(run_id)})
        except CoreError as exc:
            if exc.status in (200, 404):  # unknown id: 404 here, success:false elsewhere
                return None
            raise
        records = data if isinstance(data, list) else [data] if data else []
        found = [RunRecord.parse(r) for r in records]
        return next((r for r in found if r.run_id == run_id), None)

    async def runs(self, module: str, cluster: str) -> list[RunRecord]:
        data = await self._call("GET", "/supervisor", params={"module": module, "cluster": cluster})
        return [RunRecord.parse(r) for r in _as_list(data, "runs")]

    async def statistics(self, module: str, cluster: str) -> list[StatisticsRecord]:
        """Statistics of finished runs (a bare list at both cores)."""
        params = {"module": module, "cluster": cluster}
        data = await self._call("GET", "/statistics", params=params, bare=True)
        return [StatisticsRecord.parse(r) for r in _as_list(data, "statistics")]

    async def wait_for_status(
        self, run_id: int, statuses: Iterable[str], timeout: float = 10.0, interval: float = 0.05
    ) -> RunRecord:
        """Poll until the run's status is one of ``statuses``; TimeoutError names the last one."""
        wanted = {str(s) for s in statuses}
        deadline = time.monotonic() + timeout
        record = None
        while True:
            record = await self.run(run_id)
            if record is not None and record.status in wanted:
                return record
            if time.monotonic() >= deadline:
                last = record.status if record is not None else "unknown to the core"
                raise TimeoutError(
                    f"run {run_id} did not reach {sorted(wanted)} in {timeout} s (last: {last})"
                )
            await asyncio.sleep(interval)

    # -- processors, modules, clusters --------------------------------------------------------

    async def processors(self) -> list[ProcessorInfo]:
        data = await self._call("GET", "/processor")
        return [ProcessorInfo.parse(p) for p in _as_list(data, "processors")]

    async def modules(self) -> list[ModuleInfo]:
        data = await self._call("GET", "/module")
        return [ModuleInfo.parse(m) for m in _as_list(data, "modules")]

    async def clusters(self, module: str) -> list[ClusterInfo]:
        data = await self._call("GET", "/cluster", params={"module": module})
        return [ClusterInfo.parse(c) for c in _as_list(data, "clusters")]

    async def mount_module(self, module: str, mounted: bool = True) -> None:
        await self._call("PUT", "/module", body=MountRequest(module, mounted).to_json())

    async def mount_cluster(self, module: str, cluster: str, mounted: bool = True) -> None:
        body = MountRequest(module, mounted, cluster).to_json()
        await self._call("PUT", "/cluster", body=body)

    # -- configs ------------------------------------------------------------------------------

    async def get_config(self, module: str, config: str) -> RunConfig:
        params = {"module": module, "config": config}
        return RunConfig.parse(await self._call("GET", "/config", params=params, bare=True))

    async def post_config(self, module: str, config: RunConfig) -> None:
        """Create a named config (the embedded core refuses an existing name with 409)."""
        await self._call("POST", "/config", params={"module": module}, body=config.to_json())

    async def put_config(self, module: str, config: RunConfig) -> None:
        """Create or replace a named config."""
        await self._call("PUT", "/config", params={"module": module}, body=config.to_json())

    async def delete_config(self, module: str, config: str) -> None:
        await self._call("DELETE", "/config", params={"module": module, "config": config})

    # -- HTTP ---------------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        body: Any = None,
        bare: bool = False,
    ) -> Any:
        """One call; returns ``data`` of the envelope (or the bare value), raises CoreError."""
        call = f"{method} {path}"
        kwargs: dict[str, Any] = {"params": params, "timeout": self._timeout}
        if body is not None:
            kwargs["data"] = dumps(body)
            kwargs["headers"] = {"Content-Type": "application/json"}
        async with self._client().request(method, self.base_url + path, **kwargs) as response:
            status, text = response.status, await response.text()
        value = _parse_text(text)
        answer = _envelope(value)
        if not 200 <= status < 300:
            description = answer.description if answer else text.strip()[:500]
            raise CoreError(call, status, description or response.reason or "")
        if answer is not None and not answer.success:
            raise CoreError(call, status, answer.description)
        if bare and not (answer is not None and "data" in value):
            return value
        if answer is None:
            raise CoreError(call, status, f"answer is not the core's envelope: {text[:200]!r}")
        return answer.data

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session


def _parse_text(text: str) -> Any:
    try:
        return loads(text) if text.strip() else None
    except ProtocolError:
        return None


def _envelope(value: Any) -> CoreAnswer | None:
    """The envelope if ``value`` is one (a bare config object has no ``success``)."""
    if not isinstance(value, dict) or "success" not in value:
        return None
    try:
        return CoreAnswer.parse(value)
    except ProtocolError:
        return None


def _as_list(data: Any, what: str) -> list[Any]:
    if data is None:
        return []  # Go encodes an empty slice as null
    if not isinstance(data, list):
        raise ProtocolError(what, f"expected a list, got {type(data).__name__}")
    return data
