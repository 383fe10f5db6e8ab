"""``python -m nbproc core`` and ``python -m nbproc serve`` as real processes over real HTTP."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import eventually, free_port, http

from nbproc.core import ThreadedCore

CLUSTER_FILE = textwrap.dedent(
    """
    import nbproc

    def extract(h, m, out):
        for i in range(int(m.get("n") or 40)):
            out.push({"i": i, "label": m.get("label")})

    def transform(h, m, item):
        return None if item["i"] % 10 == 0 else item

    def verify_tl(item):
        return item is not None

    nbproc.define("Vec", extract, transform, module="common", verify_tl=verify_tl)
    """
)


def notebook(cells: list[str]) -> str:
    return json.dumps(
        {
            "cells": [
                {
                    "cell_type": "code",
                    "metadata": {},
                    "source": c,
                    "outputs": [],
                    "execution_count": None,
                }
                for c in cells
            ],
            "metadata": {
                "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
            },
            "nbformat": 4,
            "nbformat_minor": 5,
        }
    )


NOTEBOOK_CELLS = [
    "%load_ext nbproc",
    "import time\n\ndef slow_square(x):\n    time.sleep(0.01)\n    return x * x\n",
    "%%cluster Squares --module nb --on-load CompleteAndPush\n"
    "def extract(h, m, out):\n    for i in range(20):\n        out.push(i)\n\n"
    "def transform(h, m, item):\n    return slow_square(item)\n",
    "%%cluster Words --module nb\n"
    "def extract(h, m, out):\n    for w in 'a bb ccc'.split():\n        out.push({'w': w, 'n': len(w)})\n",
    "%nbproc run Squares --wait",  # an operator action: skipped while serving
]


class Served:
    """A `python -m nbproc ...` child process, read line by line, stopped with SIGTERM."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nbproc", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []

    def wait_for_line(self, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match
        raise AssertionError(f"no line matching {pattern!r}; output so far:\n{''.join(self.lines)}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.lines.extend(self.proc.stdout.read().splitlines(keepends=True))
        self.proc.stdout.close()
        return code


def provision(client_url: str, module: str, cluster: str, metadata: dict | None = None) -> int:
    status, body, _ = http(
        "POST",
        f"{client_url}/supervisor",
        {"module": module, "cluster": cluster, "metadata": metadata or {}},
    )
    assert status == 200 and body["success"], body
    return body["data"]["id"]


def finished(client_url: str, run_id: int, timeout: float = 20) -> dict:
    def check():
        record = http("GET", f"{client_url}/supervisor?id={run_id}")[1]["data"]
        return record if record["status"] in ("completed", "crashed", "cancelled") else None

    return eventually(check, timeout=timeout, what=f"run {run_id} to finish")


def test_serve_py_with_embedded_core_round_trip(tmp_path: Path):
    path = tmp_path / "clusters.py"
    path.write_text(CLUSTER_FILE)
    served = Served("serve", str(path))
    try:
        client_url = served.wait_for_line(r"core client endpoint: (http://\S+)").group(1)
        served.wait_for_line("serving common/Vec")
        run_id = provision(client_url, "common", "Vec", {"n": "50", "label": "x"})
        record = finished(client_url, run_id)
        assert record["status"] == "completed"
        data = record["statistics"]["data"]
        assert (
            data["total-over-et"] == 50
            and data["total-processed"] == 45
            and data["total-dropped"] == 5
        )
        status, stats, _ = http("GET", f"{client_url}/statistics?module=common&cluster=Vec")
        assert (
            status == 200
            and len(stats) == 1
            and stats[0]["statistics"]["data"]["total-processed"] == 45
        )
    finally:
        code = served.stop()
    assert code == 0, "".join(served.lines)


def test_two_notebook_processors_share_one_core(tmp_path: Path):
    path = tmp_path / "pipelines.ipynb"
    path.write_text(notebook(NOTEBOOK_CELLS))
    with ThreadedCore(host="127.0.0.1") as core:
        servers = [
            Served(
                "serve", str(path), "--core", core.processor_url, "--core-client", core.client_url
            )
            for _ in range(2)
        ]
        try:
            for served in servers:
                served.wait_for_line(r"serving nb/Squares, nb/Words")
            assert any("skipped while serving" in line for line in servers[0].lines)

            def both_registered():
                entries = http("GET", f"{core.client_url}/processor")[1]["data"]
                return len([e for e in entries if "nb" in e["Modules"]]) == 2 and entries

            entries = eventually(both_registered, what="two processors registered")
            runs = [
                provision(core.client_url, "nb", name)
                for name in ("Squares", "Words", "Squares", "Words")
            ]
            records = [finished(core.client_url, run_id) for run_id in runs]
            assert [r["status"] for r in records] == ["completed"] * 4
            assert {r["processor"] for r in records} == {
                f"{e['Host']}:{e['Port']}" for e in entries
            }
            assert records[0]["statistics"]["data"]["total-processed"] == 20
            assert records[1]["statistics"]["data"]["total-processed"] == 3
        finally:
            codes = [served.stop() for served in servers]
        assert codes == [0, 0], [("".join(s.lines)) for s in servers]
        eventually(
            lambda: http("GET", f"{core.client_url}/processor")[1]["data"] == [],
            what="both deregistered",
        )


def test_core_command_serves_until_sigterm():
    client_port, processor_port = free_port(), free_port()
    served = Served(
        "core", "--client-port", str(client_port), "--processor-port", str(processor_port)
    )
    try:
        served.wait_for_line(rf"client endpoint http://127.0.0.1:{client_port}")
        assert http("GET", f"http://127.0.0.1:{client_port}/processor")[1] == {
            "success": True,
            "description": "",
            "data": [],
        }
    finally:
        assert served.stop() == 0


@pytest.mark.parametrize("command", [[], ["core"], ["serve"], ["demo"]])
def test_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "nbproc", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0 and "usage:" in result.stdout


def test_serve_reports_bad_files(tmp_path: Path):
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    broken = tmp_path / "broken.ipynb"
    broken.write_text(notebook(["%%cluster Bad\ndef transform(h, m, item):\n    return item\n"]))
    for path, words in (
        (tmp_path / "missing.py", "does not exist"),
        (empty, "defines no cluster"),
        (broken, "cell 1 failed"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "nbproc", "serve", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (path, result.stdout, result.stderr)
        assert words in result.stderr, (path, result.stderr)
