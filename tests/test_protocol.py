"""The wire models: strict parsing with named fields, and JSON that is always valid."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pandas as pd
import pytest

from nbproc.protocol import (
    ClusterExport,
    ExportConfig,
    ModuleConfig,
    ModuleRegistration,
    OnLoad,
    ProcessorAddress,
    ProtocolError,
    RunConfig,
    RunRequest,
    Statistics,
    SupervisorReport,
    dumps,
    jsonable,
    loads,
    resolve_cluster_name,
)


def test_module_registration_sends_clusters_and_exports():
    module = ModuleConfig("common", "1.0", clusters=(ClusterExport("Vec"),))
    body = ModuleRegistration(ProcessorAddress("localhost", 5023), module).to_json()
    config = body["module"]["config"]
    assert body["host"] == "localhost" and body["port"] == 5023
    assert config["clusters"] == config["exports"]
    assert config["clusters"][0]["config"]["static"] == {"t-functions": 1, "l-functions": 1}
    assert ModuleRegistration.parse(json.loads(dumps(body))) == ModuleRegistration(
        ProcessorAddress("localhost", 5023), module
    )


def test_published_export_example_round_trips():
    example = {
        "cluster": "Vec",
        "mount": True,
        "config": {
            "mode": "Batch",
            "on-crash": "DoNothing",
            "on-load": "WaitAndPush",
            "static": {"t-functions": 1, "l-functions": 1},
            "dynamic": {
                "t-function": {"threshold": 2, "growth-factor": 2},
                "l-function": {"threshold": 2, "growth-factor": 2},
            },
        },
    }
    assert ClusterExport.parse(example, "export").to_json() == example


def test_run_request_both_shapes():
    doc = RunRequest.parse(
        {
            "module": "common",
            "cluster": "Vec",
            "config": "Vec",
            "supervisor": 7,
            "metadata": {"key": "value"},
        }
    )
    assert (doc.run_id, doc.config, doc.config_name, doc.metadata) == (
        7,
        None,
        "Vec",
        {"key": "value"},
    )
    core = RunRequest.parse(
        {
            "module": "common",
            "cluster": "Vec",
            "config": {"identifier": "Vec", "on-load": "WaitAndPush", "start-with-n-t-channels": 3},
            "id": 7,
            "metadata": None,
        }
    )
    assert core.run_id == 7 and core.metadata == {}
    assert (
        core.config is not None
        and core.config.t_channels == 3
        and core.config.on_load == OnLoad.WAIT_AND_PUSH
    )
    filled = core.config.with_defaults(ExportConfig(t_functions=1, l_functions=4))
    assert (filled.t_channels, filled.l_channels, filled.et_threshold) == (3, 4, 2)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"module": "m", "cluster": "c"}, "id"),
        ({"module": "m", "cluster": "c", "id": True}, "id"),
        ({"module": "m", "cluster": "c", "id": 1.5}, "id"),
        ({"module": "", "cluster": "c", "id": 1}, "module"),
        ({"module": "m", "cluster": "c", "id": 1, "metadata": []}, "metadata"),
        ({"module": "m", "cluster": "c", "id": 1, "metadata": {"a": None}}, "metadata.a"),
        (
            {"module": "m", "cluster": "c", "id": 1, "config": {"et-channel-threshold": "2"}},
            "config.et-channel-threshold",
        ),
        (
            {"module": "m", "cluster": "c", "id": 1, "config": {"on-crash": "Explode"}},
            "config.on-crash",
        ),
    ],
)
def test_run_request_errors_name_the_field(body, field):
    with pytest.raises(ProtocolError) as info:
        RunRequest.parse(body)
    assert info.value.field == field
    assert field in str(info.value)


def test_cluster_resolution_rules():
    assert resolve_cluster_name("Vec", ["Vec", "Other"]) == "Vec"
    assert resolve_cluster_name("Vec.fast", ["Vec", "Other"]) == "Vec"
    assert resolve_cluster_name("Vec:slow", ["Vec", "Other"]) == "Vec"
    assert resolve_cluster_name("Anything", ["Only"]) == "Only"
    assert resolve_cluster_name("Nope", ["Vec", "Other"]) is None


def test_statistics_shape_and_parse_round_trip():
    stats = Statistics(
        transform_routines=2, total_processed=5, total_over_et=6, total_over_tl=5, total_dropped=1
    )
    body = stats.to_json()
    assert set(body) == {"threads", "channels", "data", "timing"}
    assert body["threads"]["num-provisioned-transform-routes"] == 2
    assert set(body["timing"]["et-channel"]) == {
        "min-time-before-pop-ns",
        "max-time-before-pop-ns",
        "average-time-ns",
        "median-time-ns",
    }
    assert Statistics.parse(body) == stats
    assert Statistics.parse({}) == Statistics()


def test_terminal_report_always_carries_statistics():
    assert SupervisorReport(3, "completed").to_json()["statistics"]["data"]["total-processed"] == 0


def test_numpy_and_pandas_values_become_valid_json():
    value = {
        "np_int": np.int64(3),
        "np_float": np.float32(1.5),
        "nan": float("nan"),
        "np_nan": np.float64("nan"),
        "inf": math.inf,
        "ts": pd.Timestamp("2013-01-01 05:00"),
        "nat": pd.NaT,
        "na": pd.NA,
        "arr": np.array([1, 2]),
        "date": dt.date(2013, 1, 2),
        "bytes": b"\x00\x01",
        "frame": pd.DataFrame({"a": [1.0, float("nan")]}),
        np.int64(5): "key",
    }
    text = dumps(value)
    parsed = json.loads(text)
    assert parsed["np_int"] == 3 and parsed["np_float"] == 1.5
    assert parsed["nan"] is None and parsed["np_nan"] is None and parsed["inf"] is None
    assert parsed["ts"] == "2013-01-01T05:00:00" and parsed["nat"] is None and parsed["na"] is None
    assert parsed["arr"] == [1, 2] and parsed["date"] == "2013-01-02"
    assert parsed["frame"] == [{"a": 1.0}, {"a": None}]
    assert parsed["5"] == "key"
    stats = Statistics(total_processed=np.int64(7), avg_total_ns=float("nan"))  # type: ignore[arg-type]
    assert json.loads(dumps(stats.to_json()))["data"]["total-processed"] == 7
    assert jsonable(stats)["timing"]["avg-total-time-ns"] == 0


def test_loads_rejects_nan_and_garbage():
    for text in ("NaN", '{"a": Infinity}', "{", b"\xff\xfe"):
        with pytest.raises(ProtocolError):
            loads(text)


def test_run_config_mapping_from_export():
    export = ExportConfig(t_functions=2, l_functions=3)
    config = RunConfig.from_export("Vec", export).to_json()
    assert config == {
        "identifier": "Vec",
        "on-load": "WaitAndPush",
        "on-crash": "DoNothing",
        "start-with-n-t-channels": 2,
        "start-with-n-l-channels": 3,
        "et-channel-threshold": 2,
        "et-channel-growth-factor": 2,
        "tl-channel-threshold": 2,
        "tl-channel-growth-factor": 2,
    }
    assert RunConfig.parse(config) == RunConfig.from_export("Vec", export)
