"""Provision latency at the processor, and many tiny runs through the embedded core.

    python bench/bench_provision.py [--concurrent 200] [--runs 1000]

1. Run requests POSTed to the processor's ``/supervisor`` from a *separate process* (as a core
   would send them; in-process load would measure GIL contention instead), request -> 200:
   one at a time (how the reference core sends them), and ``--concurrent`` at once (a burst,
   each on its own connection). Side by side: the same with the runs not started (the server
   path alone; the difference is the runs' threads and reports sharing the GIL and the loop),
   and the burst against a bare aiohttp server that only answers 200 (the floor this machine
   and aiohttp set).
2. ``--runs`` tiny runs provisioned through the embedded core's client endpoint: wall time and
   how many reached ``completed`` at the core (all must).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time

import aiohttp
from aiohttp import web

from nbproc.cluster import Cluster
from nbproc.core import ThreadedCore
from nbproc.loop import LoopThread
from nbproc.operator import OperatorClient
from nbproc.processor import Processor


def tiny_extract(h, m, out):
    out.push(1)


# -- the load generator (runs in a child process) ----------------------------------------------


async def _load(url: str, n: int, first_id: int, sequential: bool) -> list[float]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True)
    ) as session:

        async def one(run_id: int) -> float:
            body = json.dumps({"module": "bench", "cluster": "Tiny", "id": run_id, "metadata": {}})
            t0 = time.perf_counter()
            async with session.post(f"{url}/supervisor", data=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"answer {resp.status}")
            return time.perf_counter() - t0

        await asyncio.gather(*(one(first_id + i) for i in range(10)))  # warm up
        if sequential:
            return [await one(first_id + 10 + i) for i in range(n)]
        return list(await asyncio.gather(*(one(first_id + 10 + i) for i in range(n))))


def measure(url: str, n: int, first_id: int, sequential: bool) -> list[float]:
    mode = "seq" if sequential else "burst"
    out = subprocess.run(
        [sys.executable, __file__, "--load", url, str(n), str(first_id), mode],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


# -- the measurements ---------------------------------------------------------------------------------


def summary(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return f"p50 {p(0.5):7.2f} ms   p99 {p(0.99):7.2f} ms   max {ms[-1]:7.2f} ms"


async def _bare_server() -> tuple[web.AppRunner, int]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"success": True, "description": "", "data": {"id": 0}})

    app = web.Application()
    app.router.add_post("/supervisor", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def bare_baseline(n: int) -> list[float]:
    thread = LoopThread("bench-bare")
    thread.start()
    try:
        runner, port = thread.run(_bare_server)
        latencies = measure(f"http://127.0.0.1:{port}", n, 0, sequential=False)
        thread.run(runner.cleanup)
        return latencies
    finally:
        thread.stop()


async def tiny_runs(client_url: str, n: int) -> tuple[float, dict[str, int]]:
    async with OperatorClient(client_url) as op:
        t0 = time.perf_counter()
        ids = await asyncio.gather(*(op.provision("bench", "Tiny", "Tiny", {}) for _ in range(n)))
        statuses: dict[str, int] = {}
        for run_id in ids:
            record = await op.wait_for_status(
                run_id, {"completed", "crashed", "cancelled"}, timeout=120
            )
            statuses[record.status] = statuses.get(record.status, 0) + 1
        return time.perf_counter() - t0, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--runs", type=int, default=1000)
    args = parser.parse_args()
    # Requests sent straight to the processor are unknown to the core: their final reports are
    # refused there, and each would log a warning.
    logging.getLogger("nbproc.client").setLevel(logging.ERROR)
    with ThreadedCore(host="127.0.0.1") as core:
        proc = Processor(core.processor_url, core_client=core.client_url).start()
        try:
            proc.register(Cluster("Tiny", tiny_extract, module="bench"))
            # warm up: the first WaitAndPush run imports pandas (a one-time ~0.3 s GIL hold)
            asyncio.run(tiny_runs(core.client_url, 20))
            start_run = proc.start_run
            proc.start_run = lambda cluster, request: None  # the server path alone: no runs
            seq_alone = measure(proc.url, args.concurrent, 5_000_000, sequential=True)
            burst_alone = measure(proc.url, args.concurrent, 6_000_000, sequential=False)
            proc.start_run = start_run
            seq = measure(proc.url, args.concurrent, 10_000_000, sequential=True)
            time.sleep(1)
            burst = measure(proc.url, args.concurrent, 20_000_000, sequential=False)
            time.sleep(1)
            bare = bare_baseline(args.concurrent)
            print(
                f"run request -> 200 at the processor ({args.concurrent} requests, from another process):"
            )
            print(f"  one at a time (as the reference core)  {summary(seq)}")
            print(f"  {args.concurrent} at once (burst)              {summary(burst)}")
            print(f"  one at a time, runs not started        {summary(seq_alone)}")
            print(f"  burst, runs not started                {summary(burst_alone)}")
            print(f"  burst, bare aiohttp answering 200      {summary(bare)}")
            wall, statuses = asyncio.run(tiny_runs(core.client_url, args.runs))
            print(
                f"{args.runs} tiny runs through the embedded core: {wall:.2f} s ({args.runs / wall:.0f} runs/s)"
            )
            print(f"  final statuses at the core: {statuses}")
            ok = statuses.get("completed", 0) == args.runs
        finally:
            proc.stop()
    print("OK" if ok else "FAILED: not every run completed")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        url, n, first, mode = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        print(json.dumps(asyncio.run(_load(url, n, first, mode == "seq"))))
        sys.exit(0)
    sys.exit(main())
