"""nbproc inside a real ipykernel (jupyter_client): the kernel's loop is never the server's."""

from __future__ import annotations

import json
import time

import pytest
from jupyter_client.manager import start_new_kernel
from support import eventually, http

from nbproc.core import ThreadedCore

pytestmark = pytest.mark.kernel


@pytest.fixture
def core():
    with ThreadedCore(host="127.0.0.1", probe_interval=0.5) as running:
        yield running


@pytest.fixture
def kernel(core, monkeypatch):
    monkeypatch.setenv("NBPROC_CORE", core.processor_url)
    monkeypatch.setenv("NBPROC_CORE_CLIENT", core.client_url)
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=60)
    try:
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def execute(kc, code: str, timeout: float = 60) -> str:
    """Run code in the kernel; return its stdout; fail on an error."""
    out: list[str] = []
    errors: list[str] = []

    def collect(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            errors.append("\n".join(content["traceback"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=collect)
    assert reply["content"]["status"] == "ok", "\n".join(errors)
    return "".join(out)


def kernel_value(kc, expression: str):
    text = execute(kc, f"import json as _j; print(_j.dumps({expression}))")
    return json.loads(text.strip().splitlines()[-1])


VEC_CELL = """%%cluster Vec --module common
def extract(h, m, out):
    for i in range(100):
        out.push({"x": i})

def transform(h, m, item):
    return {"x": item["x"] + 1}
"""


def processors(core):
    return http("GET", f"{core.client_url}/processor")[1]["data"]


def test_load_extension_answers_while_a_cell_is_busy(kernel, core):
    t0 = time.perf_counter()
    banner = execute(kernel, "%load_ext nbproc")
    load_time = time.perf_counter() - t0
    assert "nbproc processor at http://127.0.0.1:" in banner and core.processor_url in banner
    assert load_time < 2  # measured ~0.25 s; "well under a second" with slack for a busy CI
    execute(kernel, VEC_CELL)
    [entry] = eventually(lambda: processors(core), what="registration")
    processor_url = f"http://{entry['Host']}:{entry['Port']}"

    kernel.execute("import time; time.sleep(10)")  # the kernel's main thread is now busy
    time.sleep(0.5)
    t0 = time.perf_counter()
    assert http("GET", f"{processor_url}/debug", timeout=1)[0] == 200
    probe = time.perf_counter() - t0
    t0 = time.perf_counter()
    status, body, _ = http(
        "POST", f"{core.client_url}/supervisor", {"module": "common", "cluster": "Vec"}, timeout=2
    )
    provision = time.perf_counter() - t0
    assert status == 200, body
    run_id = body["data"]["id"]
    record = eventually(
        lambda: (
            (r := http("GET", f"{core.client_url}/supervisor?id={run_id}")[1]["data"])["status"]
            == "completed"
            and r
        ),
        timeout=8,
        what="completed while the cell sleeps",
    )
    assert probe < 1 and provision < 1, (probe, provision)
    assert record["statistics"]["data"]["total-processed"] == 100
    kernel.get_shell_msg(timeout=20)  # the sleeping cell's reply


def test_output_of_runs_does_not_land_in_the_running_cell(kernel, core):
    execute(kernel, "%load_ext nbproc")
    execute(
        kernel,
        "%%cluster Chatty\ndef extract(h, m, out):\n    print('from the run')\n    out.push(1)\n",
    )
    eventually(lambda: processors(core))
    kernel.execute("import time; time.sleep(3); print('cell done')")
    seen: list[str] = []
    status, body, _ = http(
        "POST", f"{core.client_url}/supervisor", {"module": "notebook", "cluster": "Chatty"}
    )
    run_id = body["data"]["id"]
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            msg = kernel.get_iopub_msg(timeout=1)
        except Exception:
            continue
        if msg["msg_type"] == "stream":
            seen.append(msg["content"]["text"])
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    assert "cell done" in "".join(seen)
    assert "from the run" not in "".join(seen)
    logs = kernel_value(kernel, f"[m for _, _, m in __import__('nbproc').logs({run_id})]")
    assert "from the run" in logs


def test_reload_ten_times_leaves_one_registration_one_socket_no_threads(kernel, core):
    execute(kernel, "%load_ext nbproc")
    execute(kernel, VEC_CELL)
    eventually(lambda: processors(core))
    probe = (
        "{'threads': sorted(t.name for t in __import__('threading').enumerate() if t.name.startswith('nbproc')),"
        " 'listening': len([c for c in __import__('psutil').Process().net_connections('tcp') if c.status == 'LISTEN'])}"
    )
    before = kernel_value(kernel, probe)
    for _ in range(10):
        execute(kernel, "%reload_ext nbproc")
        execute(kernel, VEC_CELL)
    after = kernel_value(kernel, probe)
    assert after == before
    entries = eventually(
        lambda: (p := processors(core)) and all("common" in e["Modules"] for e in p) and p
    )
    assert len(entries) == 1
    execute(kernel, "%unload_ext nbproc")
    gone = kernel_value(kernel, probe)
    assert gone["threads"] == [] and gone["listening"] == before["listening"] - 1
    eventually(lambda: processors(core) == [], what="deregistered on unload")
