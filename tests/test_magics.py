"""The magics in an in-process IPython shell: options, errors, redefinition, help."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from support import eventually, http

import nbproc
from nbproc.protocol import Status

VEC = """
def extract(h, m, out):
    for i in range(int(m.get("n") or 5)):
        out.push({"x": i})

def transform(h, m, item):
    return {"x": item["x"] * 10}
"""


@pytest.fixture
def shell():
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "nbproc")
    try:
        yield ip
    finally:
        ip.run_line_magic("unload_ext", "nbproc")
        for name in (
            "extract",
            "transform",
            "load",
            "setup",
            "teardown",
            "verify_et",
            "verify_tl",
            "source",
        ):
            ip.user_ns.pop(name, None)


def core_clusters(module: str = "notebook") -> dict[str, dict]:
    proc = nbproc.current()
    _, body, _ = http("GET", f"{proc.core.client_url}/cluster?module={module}")
    return {c["Name"]: c for c in body["data"] or []}


def test_load_ext_starts_a_processor_with_an_embedded_core(shell, capsys):
    proc = nbproc.current()
    assert proc is not None and proc.embedded_core is not None
    assert proc.connection_state == "connected"
    shell.run_line_magic("load_ext", "nbproc")  # loading twice is harmless
    assert nbproc.current() is proc


def test_cluster_cell_registers_and_runs_through_the_core(shell, capsys):
    shell.run_cell_magic("cluster", "Vec --on-load WaitAndPush --t-functions 2", VEC)
    assert "registered" in capsys.readouterr().out
    eventually(lambda: "Vec" in core_clusters(), what="Vec at the core")
    run = shell.run_line_magic("nbproc", "run Vec --meta n=7 --wait --timeout 20")
    assert run.status == Status.COMPLETED
    assert sorted(run.result["x"]) == [0, 10, 20, 30, 40, 50, 60]
    result = shell.run_line_magic("nbproc", f"result {run.run_id}")
    assert len(result) == 7
    runs = shell.run_line_magic("nbproc", "runs")
    assert list(runs["status"])[:1] == ["completed"]
    assert run.config.t_channels == 2


def test_options_reach_the_export(shell):
    shell.run_cell_magic(
        "cluster",
        "Opt --module mod --mode batch --on-load CompleteAndPush --on-crash Restart --t-functions 3 "
        "--l-functions 2 --t-threshold 5 --t-growth 3 --l-threshold 7 --l-growth 4 --no-mount --version 2.1",
        VEC,
    )
    cluster = nbproc.get_processor().cluster("Opt", "mod")
    export = cluster.export().to_json()
    assert export["mount"] is False
    assert (
        export["config"]["on-load"] == "CompleteAndPush"
        and export["config"]["on-crash"] == "Restart"
    )
    assert export["config"]["static"] == {"t-functions": 3, "l-functions": 2}
    assert export["config"]["dynamic"]["t-function"] == {"threshold": 5, "growth-factor": 3}
    assert export["config"]["dynamic"]["l-function"] == {"threshold": 7, "growth-factor": 4}
    assert cluster.version == "2.1"
    clusters = eventually(lambda: core_clusters("mod"))
    assert clusters["Opt"]["Mounted"] is False


@pytest.mark.parametrize(
    ("line", "cell", "words"),
    [
        ("Bad", "def transform(h, m, item):\n    return item\n", "no extract"),
        (
            "Bad",
            "def extract(h, out):\n    pass\n",
            "extract must be callable as extract(h, m, out)",
        ),
        ("Bad", VEC + "\ndef load(batch):\n    return batch\n", "load must be callable"),
        ("Bad --mode sometimes", VEC, "mode must be one of"),
        ("Bad --on-load Later", VEC, "on_load must be one of"),
        ("Bad --t-functions 0", VEC, "t_functions must be an integer >= 1"),
        ("Bad --extract nowhere", VEC, "no such name"),
        ("Bad --t-functions x", VEC, "invalid int value"),
        (
            "Bad",
            "def extract(h, m, out):\n    pass\nraise RuntimeError('boom')\n",
            "the cell raised",
        ),
    ],
)
def test_errors_are_one_line_and_register_nothing(shell, line, cell, words):
    before = {c.key for c in nbproc.clusters()}
    with pytest.raises(UsageError) as info:
        shell.run_cell_magic("cluster", line, cell)
    assert words in str(info.value)
    assert "\n" not in str(info.value)
    assert {c.key for c in nbproc.clusters()} == before
    assert "Bad" not in core_clusters()


def test_stale_functions_from_other_cells_are_not_picked_up(shell):
    shell.run_cell("def transform(h, m, item):\n    return 'stale'\n")
    shell.run_cell_magic("cluster", "Fresh", "def extract(h, m, out):\n    out.push(1)\n")
    assert nbproc.get_processor().cluster("Fresh").transform is None
    shell.run_cell_magic(
        "cluster", "Picked --transform transform", "def extract(h, m, out):\n    out.push(1)\n"
    )
    assert nbproc.get_processor().cluster("Picked").transform is shell.user_ns["transform"]


def test_redefinition_keeps_running_runs_on_their_functions(shell):
    shell.run_cell_magic(
        "cluster",
        "Redef --on-load CompleteAndPush",
        "import threading\ngate = threading.Event()\n"
        "def extract(h, m, out):\n    gate.wait(10)\n    out.push(1)\n"
        "def transform(h, m, item):\n    return 'old'\n"
        "seen = []\ndef load(h, m, item):\n    seen.append(item)\n",
    )
    eventually(lambda: "Redef" in core_clusters())
    old_run = nbproc.run("Redef")
    eventually(lambda: nbproc.get_processor().engine.get(old_run) is not None)
    shell.run_cell_magic(
        "cluster",
        "Redef --on-load CompleteAndPush",
        "def transform(h, m, item):\n    return 'new'\n"
        "def extract(h, m, out):\n    out.push(1)\n"
        "def load(h, m, item):\n    seen.append(item)\n",
    )
    eventually(lambda: "Redef" in core_clusters())
    shell.user_ns["gate"].set()
    assert nbproc.get_processor().wait(old_run, timeout=10).status == Status.COMPLETED
    new_run = nbproc.run("Redef", wait=True, timeout=10)
    assert new_run.status == Status.COMPLETED
    assert sorted(shell.user_ns["seen"]) == ["new", "old"]


def test_help_is_available(shell):
    assert "--on-load" in nbproc.magics.NbprocMagics.cluster.__doc__
    assert "run" in nbproc.magics.NbprocMagics.nbproc.__doc__
    with pytest.raises(UsageError):
        shell.run_line_magic("nbproc", "frobnicate")


def test_nbproc_subcommands(shell, capsys):
    status = shell.run_line_magic("nbproc", "status")
    assert status["connection"] == "connected" and status["embedded_core"] is True
    shell.run_cell_magic("cluster", "Sub", VEC)
    eventually(lambda: "Sub" in core_clusters())
    shell.run_line_magic("nbproc", "unmount notebook Sub")
    eventually(lambda: core_clusters()["Sub"]["Mounted"] is False)
    with pytest.raises(Exception, match="mounted"):
        shell.run_line_magic("nbproc", "run Sub")
    shell.run_line_magic("nbproc", "mount notebook Sub")
    run = shell.run_line_magic("nbproc", "run Sub --wait --timeout 20")
    shell.run_line_magic("nbproc", f"logs {run.run_id}")
    with pytest.raises(UsageError, match="no run 999"):
        shell.run_line_magic("nbproc", "result 999")
    with pytest.raises(UsageError, match="a number"):
        shell.run_line_magic("nbproc", "cancel abc")
    with pytest.raises(UsageError, match="key=value"):
        shell.run_line_magic("nbproc", "run Sub --meta novalue")


def test_unload_stops_everything(shell):
    proc = nbproc.current()
    port = proc.address.port
    shell.run_line_magic("unload_ext", "nbproc")
    assert nbproc.current() is None and not proc.running
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    shell.run_line_magic("load_ext", "nbproc")  # the fixture unloads it again


def test_api_errors_in_nbproc_subcommands_are_one_line(shell):
    with pytest.raises(UsageError, match="no cluster 'Nope'"):
        shell.run_line_magic("nbproc", "run Nope")


def test_start_refuses_conflicting_options_while_running(shell):
    with pytest.raises(RuntimeError, match="already running"):
        nbproc.start("http://127.0.0.1:1")
    assert nbproc.start() is nbproc.current()
