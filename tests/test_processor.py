"""The processor over real HTTP: its routes, its lifecycle, and the round trip through a core."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
from support import eventually, free_port, http

from nbproc.cluster import Cluster
from nbproc.core import ThreadedCore
from nbproc.processor import CoreAddress, Processor
from nbproc.protocol import Status


def count_to(n: int, pause: float = 0.0):
    def extract(h, m, out):
        for i in range(n):
            if pause:
                time.sleep(pause)
            if not out.push({"i": i}):
                return

    return extract


@pytest.fixture
def core():
    with ThreadedCore(host="127.0.0.1") as running:
        yield running


@pytest.fixture
def processor(core):
    proc = Processor(core.processor_url, core_client=core.client_url, heartbeat=0.5).start()
    try:
        yield proc
    finally:
        proc.stop()


def core_run(core: ThreadedCore, run_id: int):
    status, body, _ = http("GET", f"{core.client_url}/supervisor?id={run_id}")
    assert status == 200, body
    return body["data"]


# -- routes ----------------------------------------------------------------------------------------


def test_debug_probe_closes_the_connection(processor):
    status, body, headers = http("GET", f"{processor.url}/debug")
    assert status == 200 and body["success"] is True
    assert headers.get("Connection", "").lower() == "close"


def test_both_request_shapes_are_accepted(processor):
    processor.register(Cluster("Vec", count_to(3), module="common"))
    doc_shape = {
        "module": "common",
        "cluster": "Vec",
        "config": "Vec",
        "supervisor": 7,
        "metadata": {"k": "v"},
    }
    core_shape = {
        "module": "common",
        "cluster": "Vec.fast",
        "config": {
            "identifier": "Vec.fast",
            "on-load": "CompleteAndPush",
            "on-crash": "DoNothing",
            "start-with-n-t-channels": 2,
            "start-with-n-l-channels": 1,
            "et-channel-threshold": 2,
            "et-channel-growth-factor": 2,
            "tl-channel-threshold": 2,
            "tl-channel-growth-factor": 2,
        },
        "id": 8,
        "metadata": None,
    }
    for body, run_id in ((doc_shape, 7), (core_shape, 8)):
        status, answer, _ = http("POST", f"{processor.url}/supervisor", body)
        assert status == 200, answer
        assert answer == {"success": True, "description": "", "data": {"id": run_id}}
    assert processor.wait(7, timeout=10).status == Status.COMPLETED
    run8 = processor.wait(8, timeout=10)
    assert run8.status == Status.COMPLETED
    assert run8.config.t_channels == 2 and run8.config.identifier == "Vec.fast"
    assert run8.statistics().transform_routines >= 2


def test_cluster_resolution_and_404s(processor):
    processor.register(Cluster("A", count_to(1), module="m"))
    processor.register(Cluster("B", count_to(1), module="m"))
    processor.register(Cluster("Only", count_to(1), module="solo"))
    cases = [
        ({"module": "nope", "cluster": "A", "id": 1}, 404, "unknown module"),
        ({"module": "m", "cluster": "C", "id": 2}, 404, "no cluster 'C'"),
        ({"module": "m", "cluster": "B:slow", "id": 3}, 200, None),
        ({"module": "solo", "cluster": "AnyConfigName", "id": 4}, 200, None),
    ]
    for body, expected, words in cases:
        status, answer, _ = http("POST", f"{processor.url}/supervisor", body)
        assert status == expected, answer
        if words:
            assert answer["success"] is False and words in answer["description"]
    assert processor.wait(3, timeout=10).name == "B"
    assert processor.wait(4, timeout=10).name == "Only"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"{not json", "malformed JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"module": "m", "cluster": "A"}', "id"),
        (b'{"module": 5, "cluster": "A", "id": 1}', "module"),
        (b'{"module": "m", "cluster": "A", "id": "1"}', "id"),
        (b'{"module": "m", "cluster": "A", "id": true}', "id"),
        (b'{"module": "m", "cluster": "A", "id": 1, "metadata": {"k": 1}}', "metadata.k"),
        (b'{"module": "m", "cluster": "A", "id": 1, "config": 3}', "config"),
        (
            b'{"module": "m", "cluster": "A", "id": 1, "config": {"start-with-n-t-channels": 0}}',
            "start-with-n-t-channels",
        ),
        (b'{"module": "m", "cluster": "A", "id": 1, "config": {"on-load": "Later"}}', "on-load"),
        (b'{"module": "m", "cluster": "A", "id": 1} trailing', "malformed JSON"),
        (b'{"module": "m", "cluster": "A", "id": NaN}', "NaN"),
    ],
)
def test_bad_requests_get_400_naming_the_problem(processor, raw, field):
    processor.register(Cluster("A", count_to(1), module="m"))
    status, answer, _ = http("POST", f"{processor.url}/supervisor", raw=raw)
    assert status == 400, answer
    assert answer["success"] is False and field in answer["description"]


def test_oversized_body_wrong_method_unknown_path(processor):
    status, answer, _ = http("POST", f"{processor.url}/supervisor", raw=b"x" * (1024 * 1024 + 10))
    assert status == 413 and answer["success"] is False
    status, answer, headers = http("GET", f"{processor.url}/supervisor")
    assert status == 405 and "POST" in headers.get("Allow", "")
    status, answer, _ = http("DELETE", f"{processor.url}/debug")
    assert status == 405
    status, answer, _ = http("GET", f"{processor.url}/nothing-here")
    assert status == 404 and answer["success"] is False


def test_answer_goes_out_before_the_run_starts(processor):
    """The reference core waits for the answer and serves nothing else meanwhile: a run that
    starts work (or calls the core) before the answer is written would stall it."""
    started = threading.Event()
    answered_at: list[float] = []

    def extract(h, m, out):
        started.set()
        out.push(1)

    processor.register(Cluster("Fast", extract, module="m"))
    t0 = time.perf_counter()
    status, _, _ = http(
        "POST", f"{processor.url}/supervisor", {"module": "m", "cluster": "Fast", "id": 1}
    )
    answered_at.append(time.perf_counter() - t0)
    assert status == 200
    assert started.wait(5)
    assert answered_at[0] < 1.0


# -- lifecycle -------------------------------------------------------------------------------------


def _nbproc_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("nbproc")}


@pytest.mark.filterwarnings("error::ResourceWarning")
def test_start_stop_twenty_times_leaks_nothing(core, recwarn):
    before = _nbproc_threads()
    ports = []
    for _ in range(20):
        proc = Processor(core.processor_url, core_client=core.client_url).start()
        ports.append(proc.address.port)
        proc.register(Cluster("Vec", count_to(2), module="m"))
        proc.stop()
        with socket.socket() as s:  # the port is free again at once
            s.bind(("127.0.0.1", ports[-1]))
    assert _nbproc_threads() == before
    unclosed = [w for w in recwarn if "Unclosed" in str(w.message)]
    assert not unclosed
    status, body, _ = http("GET", f"{core.client_url}/processor")
    assert body["data"] == [], "every processor deregistered itself"


def test_bind_error_is_raised_in_the_caller(core):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = _nbproc_threads()
        with pytest.raises(OSError):
            Processor(core.processor_url, port=port).start()
        assert _nbproc_threads() == before


def test_registered_port_is_the_bound_port(core, processor):
    processor.register(Cluster("Vec", count_to(1), module="common"))
    status, body, _ = http("GET", f"{core.client_url}/processor")
    [entry] = body["data"]
    assert entry["Host"] == "127.0.0.1" and entry["Port"] == processor.address.port
    assert "common" in entry["Modules"]


def test_core_address_defaults():
    assert CoreAddress.from_url("http://core:8137") == CoreAddress(
        "http://core:8137", "http://core:8136"
    )
    assert CoreAddress.from_url("core") == CoreAddress("http://core:8137", "http://core:8136")
    assert CoreAddress.from_url("http://h:9000", "http://h:9001").client_url == "http://h:9001"
    with pytest.raises(ValueError):
        CoreAddress.from_url("ftp://x")


# -- the round trip through the core -----------------------------------------------------------------


def test_provision_through_the_core_completes_with_counts(core, processor):
    processor.register(Cluster("Vec", count_to(250), lambda h, m, x: x, module="common"))
    status, body, _ = http(
        "POST",
        f"{core.client_url}/supervisor",
        {"module": "common", "cluster": "Vec", "metadata": {"a": "b"}},
    )
    assert status == 200 and body["success"], body
    run_id = body["data"]["id"]
    record = eventually(
        lambda: (r := core_run(core, run_id))["status"] == "completed" and r, what="completed"
    )
    assert record["statistics"]["data"]["total-processed"] == 250
    assert record["statistics"]["data"]["total-over-et"] == 250
    status, stats, _ = http("GET", f"{core.client_url}/statistics?module=common&cluster=Vec")
    assert status == 200 and isinstance(stats, list) and len(stats) == 1
    assert stats[0]["statistics"]["data"]["total-processed"] == 250


def test_redefinition_reregisters_the_module(core, processor):
    processor.register(Cluster("Vec", count_to(1), module="common"))
    processor.register(Cluster("Other", count_to(1), module="common", version="0.2.0"))

    def clusters():
        _, body, _ = http("GET", f"{core.client_url}/cluster?module=common")
        return sorted(c["Name"] for c in body["data"]) == ["Other", "Vec"]

    eventually(clusters, what="both clusters at the core")
    processor.unregister("Vec", "common")
    eventually(
        lambda: (
            [c["Name"] for c in http("GET", f"{core.client_url}/cluster?module=common")[1]["data"]]
            == ["Other"]
        )
    )


def test_logs_reach_the_core_before_the_final_report(core, processor):
    def extract(h, m, out):
        for i in range(3):
            h.log(f"line {i}")
            out.push(i)

    processor.register(Cluster("Talk", extract, module="m"))
    run_id = http("POST", f"{core.client_url}/supervisor", {"module": "m", "cluster": "Talk"})[1][
        "data"
    ]["id"]
    eventually(lambda: core_run(core, run_id)["status"] == "completed")
    logs = core.call(lambda: list(core.core.state.runs[run_id].logs))
    assert [line.message for line in logs if line.message.startswith("line")] == [
        "line 0",
        "line 1",
        "line 2",
    ]


def test_cache_round_trip_through_the_core(core, processor):
    seen = []

    def extract(h, m, out):
        key = h.save_to_cache({"token": [1, 2, 3]})
        seen.append(h.load_from_cache(key))
        out.push(1)

    processor.register(Cluster("Cache", extract, module="m"))
    run_id = http("POST", f"{core.client_url}/supervisor", {"module": "m", "cluster": "Cache"})[1][
        "data"
    ]["id"]
    eventually(lambda: core_run(core, run_id)["status"] == "completed")
    assert seen == [{"token": [1, 2, 3]}]


def test_core_restart_mid_run_reregisters_and_never_loses_silently(caplog):
    client_port, processor_port = free_port(), free_port()
    options = {"host": "127.0.0.1", "client_port": client_port, "processor_port": processor_port}
    first = ThreadedCore(**options).start()
    gate = threading.Event()

    def extract(h, m, out):
        out.push(1)
        gate.wait(20)
        out.push(2)

    proc = Processor(first.processor_url, core_client=first.client_url, heartbeat=0.3).start()
    second = None
    try:
        proc.register(Cluster("Slow", extract, module="m"))
        eventually(lambda: http("GET", f"{first.client_url}/cluster?module=m")[1]["data"])
        run_id = http("POST", f"{first.client_url}/supervisor", {"module": "m", "cluster": "Slow"})[
            1
        ]["data"]["id"]
        eventually(
            lambda: (
                proc.engine.get(run_id) is not None
                and proc.engine.get(run_id).status == Status.ACTIVE
            )
        )
        first.stop()
        second = ThreadedCore(**options).start()

        def registered_again():
            _, body, _ = http("GET", f"{second.client_url}/processor")
            return [
                p for p in body["data"] if p["Port"] == proc.address.port and "m" in p["Modules"]
            ]

        eventually(registered_again, timeout=15, what="re-registration with the new core")
        with caplog.at_level(logging.WARNING, logger="nbproc"):
            gate.set()
            run = proc.wait(run_id, timeout=10)
            assert run.status == Status.COMPLETED
            lost = eventually(
                lambda: [
                    r for r in caplog.records if f"run {run_id} ended completed" in r.getMessage()
                ],
                what="a log line naming the lost run",
            )
        assert "restarted" in lost[0].getMessage()
        assert any(f"run {run_id} ended completed" in message for _, _, message in run.logs)
        # the new core knows nothing of the old run, and nothing was written over a run of its own
        assert http("GET", f"{second.client_url}/supervisor?id={run_id}")[0] == 404
    finally:
        gate.set()
        proc.stop()
        first.stop()
        if second is not None:
            second.stop()


def test_a_core_that_is_down_at_start_is_joined_later():
    client_port, processor_port = free_port(), free_port()
    proc = Processor(
        f"http://127.0.0.1:{processor_port}",
        core_client=f"http://127.0.0.1:{client_port}",
        heartbeat=0.3,
    )
    proc.start(connect_timeout=0.3)
    try:
        assert proc.connection_state == "connecting"
        proc.register(Cluster("Vec", count_to(1), module="m"))
        with ThreadedCore(
            host="127.0.0.1", client_port=client_port, processor_port=processor_port
        ) as core:
            eventually(lambda: proc.connection_state == "connected", timeout=10)
            body = http("GET", f"{core.client_url}/module")[1]
            assert [m["Name"] for m in body["data"]] == ["m"]
    finally:
        proc.stop()


def test_fuzzed_run_requests_never_5xx(processor):
    """A generated corpus of 1,200 malformed bodies: only 4xx, and the server keeps serving."""
    import random

    processor.register(Cluster("A", count_to(1), module="m"))
    rng = random.Random(1234)
    values = [
        None,
        True,
        False,
        0,
        -1,
        1.5,
        2**70,
        "",
        "A",
        "m",
        [],
        {},
        [1],
        {"a": 1},
        "x" * 300,
        float("1e308"),
    ]
    keys = ["module", "cluster", "config", "id", "supervisor", "metadata", "identifier", ""]
    statuses = set()
    for i in range(1200):
        kind = i % 4
        if kind == 0:
            raw = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        elif kind == 1:
            body = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(0, 6))}
            raw = json.dumps(body).encode()
        elif kind == 2:
            body = {
                "module": "m",
                "cluster": "A",
                "id": rng.choice(values),
                "config": rng.choice(values + [{"start-with-n-t-channels": rng.choice(values)}]),
                "metadata": rng.choice(values),
            }
            raw = json.dumps(body).encode()
        else:
            raw = json.dumps(rng.choice(values)).encode()[: rng.randint(0, 20)]
        status, answer, _ = http("POST", f"{processor.url}/supervisor", raw=raw)
        statuses.add(status)
        assert status < 500, (raw, answer)
    assert statuses <= {200, 400, 404}
    assert http("GET", f"{processor.url}/debug")[0] == 200


# -- bad input from users and configs -------------------------------------------------------------


def test_a_config_asking_for_thousands_of_workers_is_capped(processor):
    threads = set()

    def transform(h, m, item):
        threads.add(threading.get_ident())
        time.sleep(0.001)
        return item

    processor.register(Cluster("Capped", count_to(50), transform, module="m", max_t_functions=4))
    body = {
        "module": "m",
        "cluster": "Capped",
        "id": 1,
        "config": {"start-with-n-t-channels": 5000},
    }
    assert http("POST", f"{processor.url}/supervisor", body)[0] == 200
    run = processor.wait(1, timeout=20)
    assert run.status == Status.COMPLETED
    assert run.statistics().transform_routines == 4 and len(threads) <= 4
    assert any("starting 4" in message for _, _, message in run.logs)
    too_many = {
        "module": "m",
        "cluster": "Capped",
        "id": 2,
        "config": {"start-with-n-t-channels": 10**9},
    }
    status, answer, _ = http("POST", f"{processor.url}/supervisor", too_many)
    assert status == 400 and "must be <= 10000" in answer["description"]


def test_python_api_input_errors_are_clear(processor):
    from nbproc.cluster import ClusterDefinitionError

    with pytest.raises(ClusterDefinitionError, match="must not contain '.'"):
        Cluster("Vec.fast", count_to(1))
    with pytest.raises(ClusterDefinitionError, match="version must be a non-empty string"):
        Cluster("Vec", count_to(1), version=123)
    processor.register(Cluster("Vec", count_to(1), module="m"))
    with pytest.raises(TypeError, match="metadata keys and values must be strings"):
        processor.provision("Vec", metadata={"n": 5})
    with pytest.raises(TypeError, match="mapping of strings"):
        processor.provision("Vec", metadata=[1])
    with pytest.raises(KeyError, match="no cluster 'Nope'"):
        processor.provision("Nope")


def test_cache_refuses_values_it_could_not_give_back(processor):
    errors = []

    def extract(h, m, out):
        class Thing:
            pass

        try:
            h.save_to_cache(Thing())
        except TypeError as exc:
            errors.append(str(exc))
        out.push(1)

    processor.register(Cluster("Cache2", extract, module="m"))
    run = processor.wait(processor.provision("Cache2"), timeout=10)
    assert run.status == Status.COMPLETED
    assert errors and "cannot be sent as JSON" in errors[0]


def test_wait_returns_once_the_core_has_the_final_status(core, processor):
    processor.register(Cluster("Quick", count_to(3), module="m"))
    for _ in range(10):
        run = processor.wait(processor.provision("Quick"), timeout=10)
        assert core_run(core, run.run_id)["status"] == "completed"


def test_a_run_reports_to_the_core_that_sent_it_even_after_a_switch(core):
    gate = threading.Event()

    def extract(h, m, out):
        gate.wait(20)
        out.push(1)

    with ThreadedCore(host="127.0.0.1") as other:
        proc = Processor(core.processor_url, core_client=core.client_url).start()
        try:
            proc.register(Cluster("Held", extract, module="m"))
            run_id = proc.provision("Held")
            eventually(lambda: proc.engine.get(run_id) is not None)
            proc.connect(other.processor_url, other.client_url)
            other_run = proc.provision("Held")  # the new core's run 1 shares the old run's id
            assert other_run == run_id
            gate.set()
            old_run = eventually(
                lambda: [
                    r
                    for r in proc.runs()
                    if r.run_id == run_id and r.done and r.reporter is not proc._client
                ]
            )
            assert old_run[0].status == Status.COMPLETED
            eventually(lambda: core_run(other, other_run)["status"] == "completed")
            assert core_run(core, run_id)["status"] == "active"  # the old core was left behind...
            assert any("had disconnected" in m for _, _, m in old_run[0].logs)  # ...and we say so
        finally:
            gate.set()
            proc.stop()


def test_connect_to_a_bad_url_keeps_the_current_core(core, processor):
    with pytest.raises(ValueError, match="not a core URL"):
        processor.connect("ftp://nowhere")
    assert (
        processor.connection_state == "connected"
        and processor.core.processor_url == core.processor_url
    )
