"""The cluster.tools wire format, in one place.

Every JSON shape that crosses the wire between a processor and a core (``shared/PROTOCOL.md``)
is a dataclass here with a strict ``parse`` and a ``to_json``. Nothing else in nbproc builds
protocol JSON by hand, so that a quirk of the reference core is handled once.

Parsing is strict about types (``true`` is not a number, ``"1"`` is not an int) and every error
names the offending field with a dotted path, because the 400 a processor answers is often the
only thing an operator sees of a bad request.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import decimal
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# ---------------------------------------------------------------------------------------------
# vocabulary


class Status(StrEnum):
    CREATED = "created"
    ACTIVE = "active"
    COMPLETED = "completed"
    CRASHED = "crashed"
    CANCELLED = "cancelled"
    TERMINATED = "terminated"  # legacy, still terminal at the reference core

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {Status.COMPLETED, Status.CRASHED, Status.CANCELLED, Status.TERMINATED}
)


class Mode(StrEnum):
    BATCH = "Batch"
    STREAM = "Stream"


class OnLoad(StrEnum):
    COMPLETE_AND_PUSH = "CompleteAndPush"
    WAIT_AND_PUSH = "WaitAndPush"


class OnCrash(StrEnum):
    DO_NOTHING = "DoNothing"
    RESTART = "Restart"


class LogLevel(StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    FATAL = "fatal"


class ProtocolError(ValueError):
    """A JSON value does not have the shape the protocol requires.

    ``field`` is a dotted path (``config.start-with-n-t-channels``) so the description a server
    answers with points at the problem instead of at the whole body.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)


class CoreError(RuntimeError):
    """A core refused a call: a non-2xx HTTP status, or ``success: false`` in its answer.

    The reference core answers HTTP 200 with ``success: false`` for several failures, so callers
    that only looked at the status would miss them; this one exception covers both and carries
    the core's own description, which is usually the only useful explanation there is.
    """

    def __init__(self, call: str, status: int, description: str) -> None:
        self.call = call
        self.status = status
        self.description = description
        super().__init__(f"{call} -> HTTP {status}: {description or '(no description)'}")


# ---------------------------------------------------------------------------------------------
# JSON encoding: nothing leaves nbproc that is not strict JSON


def jsonable(value: Any, strict: bool = False) -> Any:
    """Turn ``value`` into plain JSON types.

    User code hands us numpy scalars, NaN, pandas Timestamps and the like; the reference core
    (Go's encoding/json) rejects NaN/Infinity, and Python's json module would happily emit them.
    NaN and infinities become ``null``; numpy/pandas scalars become their Python value;
    dates become ISO-8601 strings; bytes become base64; sets become lists. Anything else becomes
    ``str(value)``, or, with ``strict`` (values a user stores and expects back), a TypeError.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)  # also normalises IntEnum / bool subclasses
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "to_json") and callable(value.to_json) and dataclasses.is_dataclass(value):
        return jsonable(value.to_json(), strict)
    if isinstance(value, Mapping):
        return {
            k if isinstance(k, str) else str(jsonable(k, strict)): jsonable(v, strict)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, strict) for v in value]
    return _jsonable_foreign(value, strict)


def _jsonable_foreign(value: Any, strict: bool) -> Any:
    """Values from numpy, pandas, datetime and friends, without importing numpy or pandas."""
    module = type(value).__module__ or ""
    if module.startswith("pandas"):  # before datetime: pd.NaT is a datetime too
        return _jsonable_pandas(value, strict)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return jsonable(float(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if module.startswith("numpy") and hasattr(value, "tolist"):  # ndarray and numpy scalars
        return jsonable(value.tolist(), strict)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return _unknown(value, strict)


def _jsonable_pandas(value: Any, strict: bool) -> Any:
    import pandas as pd

    if value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, pd.Timedelta):
        return value.total_seconds()
    if isinstance(value, pd.DataFrame):
        return jsonable(value.to_dict(orient="records"), strict)
    if isinstance(value, (pd.Series, pd.Index)):
        return jsonable(value.tolist(), strict)
    return _unknown(value, strict)


def _unknown(value: Any, strict: bool) -> str:
    if strict:
        raise TypeError(
            f"a {type(value).__name__} cannot be sent as JSON (store plain data instead)"
        )
    return str(value)


def dumps(value: Any) -> str:
    """Strict JSON text for anything nbproc sends (``allow_nan=False`` as a last line of defence)."""
    return json.dumps(jsonable(value), allow_nan=False, separators=(",", ":"))


def loads(text: str | bytes) -> Any:
    """Parse JSON text, raising ProtocolError (not a bare ValueError) on malformed input."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("", f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("", "malformed JSON: nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise ProtocolError("", f"malformed JSON: {name} is not valid JSON")


# ---------------------------------------------------------------------------------------------
# strict field readers

_MISSING: Any = object()
MAX_CONFIG_NUMBER = 10_000  # worker counts, thresholds, growth factors: beyond this is a typo
MAX_RUN_ID = 2**63 - 1  # the reference core's ids are Go int64


def _path(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def expect_object(value: Any, where: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(where, f"expected a JSON object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def get_str(
    obj: dict, key: str, where: str = "", default: Any = _MISSING, nonempty: bool = False
) -> str:
    value = obj.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ProtocolError(_path(where, key), "missing (a string is required)")
        return default
    if not isinstance(value, str):
        raise ProtocolError(_path(where, key), f"expected a string, got {_kind(value)}")
    if nonempty and not value:
        raise ProtocolError(_path(where, key), "must not be empty")
    return value


def get_int(
    obj: dict,
    key: str,
    where: str = "",
    default: Any = _MISSING,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    value = obj.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ProtocolError(_path(where, key), "missing (an integer is required)")
        return default
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # 2.0 is an integer in JSON's eyes; 2.5 is not
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(_path(where, key), f"expected an integer, got {_kind(value)}")
    if minimum is not None and value < minimum:
        raise ProtocolError(_path(where, key), f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ProtocolError(_path(where, key), f"must be <= {maximum}, got {value}")
    return value


def get_bool(obj: dict, key: str, where: str = "", default: Any = _MISSING) -> bool:
    value = obj.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ProtocolError(_path(where, key), "missing (true or false is required)")
        return default
    if not isinstance(value, bool):
        raise ProtocolError(_path(where, key), f"expected true or false, got {_kind(value)}")
    return value


def get_enum(obj: dict, key: str, enum: type[StrEnum], where: str = "", default: Any = _MISSING):
    raw = get_str(obj, key, where, default=default)
    if raw is default and default is not _MISSING:
        return default
    try:
        return enum(raw)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum)
        raise ProtocolError(_path(where, key), f"{raw!r} is not one of {allowed}") from None


def get_str_map(obj: dict, key: str, where: str = "") -> dict[str, str]:
    """A map of strings, or null, or absent (all three are legal for run metadata)."""
    value = obj.get(key)
    if value is None:
        return {}
    here = _path(where, key)
    expect_object(value, here)
    for k, v in value.items():
        if not isinstance(v, str):
            raise ProtocolError(_path(here, k), f"expected a string, got {_kind(v)}")
    return dict(value)


# ---------------------------------------------------------------------------------------------
# the core's answer envelope


@dataclass
class CoreAnswer:
    """``{"success", "description", "data"}``: every core answer but GET /config and /statistics."""

    success: bool
    description: str = ""
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "description": self.description,
            "data": jsonable(self.data),
        }

    @classmethod
    def parse(cls, value: Any) -> CoreAnswer:
        obj = expect_object(value, "answer")
        return cls(
            success=get_bool(obj, "success", "answer"),
            description=get_str(obj, "description", "answer", default=""),
            data=obj.get("data"),
        )

    @classmethod
    def ok(cls, data: Any = None, description: str = "") -> CoreAnswer:
        return cls(True, description, data)

    @classmethod
    def fail(cls, description: str) -> CoreAnswer:
        return cls(False, description, None)


# ---------------------------------------------------------------------------------------------
# processor -> core: registration


@dataclass(frozen=True)
class ProcessorAddress:
    """``{"host", "port"}``: the exact pair identifies a processor at the core."""

    host: str
    port: int

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port}

    def query(self) -> dict[str, str]:
        return {"host": self.host, "port": str(self.port)}

    @classmethod
    def parse(cls, value: Any, where: str = "") -> ProcessorAddress:
        obj = expect_object(value, where)
        return cls(
            host=get_str(obj, "host", where, nonempty=True),
            port=get_int(obj, "port", where, minimum=1),
        )

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> ProcessorAddress:
        host = query.get("host", "")
        port = query.get("port", "")
        if not host:
            raise ProtocolError("host", "missing query parameter")
        # "²".isdigit() is True and int("²") fails; 5000 digits exceed int()'s limit
        if not (port.isascii() and port.isdigit()) or len(port) > 10:
            raise ProtocolError("port", f"expected an integer query parameter, got {port!r}")
        return cls(host, int(port))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ChannelGrowth:
    """When a channel holds more than ``threshold`` items, its stage grows N -> N * growth_factor."""

    threshold: int = 2
    growth_factor: int = 2

    def to_json(self) -> dict[str, int]:
        return {"threshold": self.threshold, "growth-factor": self.growth_factor}

    @classmethod
    def parse(cls, value: Any, where: str) -> ChannelGrowth:
        obj = expect_object(value, where)
        return cls(
            threshold=get_int(obj, "threshold", where, default=2, minimum=1),
            growth_factor=get_int(obj, "growth-factor", where, default=2, minimum=1),
        )


@dataclass(frozen=True)
class ExportConfig:
    """The ``config`` of a cluster export, as a processor registers it."""

    mode: Mode = Mode.BATCH
    on_crash: OnCrash = OnCrash.DO_NOTHING
    on_load: OnLoad = OnLoad.WAIT_AND_PUSH
    t_functions: int = 1
    l_functions: int = 1
    t_growth: ChannelGrowth = ChannelGrowth()
    l_growth: ChannelGrowth = ChannelGrowth()

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "on-crash": self.on_crash.value,
            "on-load": self.on_load.value,
            "static": {"t-functions": self.t_functions, "l-functions": self.l_functions},
            "dynamic": {
                "t-function": self.t_growth.to_json(),
                "l-function": self.l_growth.to_json(),
            },
        }

    @classmethod
    def parse(cls, value: Any, where: str = "config") -> ExportConfig:
        obj = expect_object(value, where)
        static = expect_object(obj.get("static") or {}, _path(where, "static"))
        dynamic = expect_object(obj.get("dynamic") or {}, _path(where, "dynamic"))
        dyn = _path(where, "dynamic")
        return cls(
            mode=get_enum(obj, "mode", Mode, where, default=Mode.BATCH),
            on_crash=get_enum(obj, "on-crash", OnCrash, where, default=OnCrash.DO_NOTHING),
            on_load=get_enum(obj, "on-load", OnLoad, where, default=OnLoad.WAIT_AND_PUSH),
            t_functions=get_int(
                static, "t-functions", _path(where, "static"), default=1, minimum=1
            ),
            l_functions=get_int(
                static, "l-functions", _path(where, "static"), default=1, minimum=1
            ),
            t_growth=ChannelGrowth.parse(dynamic.get("t-function") or {}, _path(dyn, "t-function")),
            l_growth=ChannelGrowth.parse(dynamic.get("l-function") or {}, _path(dyn, "l-function")),
        )


@dataclass(frozen=True)
class ClusterExport:
    cluster: str
    mount: bool = True
    config: ExportConfig = ExportConfig()

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "mount": self.mount, "config": self.config.to_json()}

    @classmethod
    def parse(cls, value: Any, where: str) -> ClusterExport:
        obj = expect_object(value, where)
        return cls(
            cluster=get_str(obj, "cluster", where, nonempty=True),
            mount=get_bool(obj, "mount", where, default=False),
            config=ExportConfig.parse(obj.get("config") or {}, _path(where, "config")),
        )


@dataclass(frozen=True)
class Contact:
    name: str = ""
    email: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "email": self.email}

    @classmethod
    def parse(cls, value: Any, where: str) -> Contact:
        if value is None:
            return cls()
        obj = expect_object(value, where)
        return cls(
            get_str(obj, "name", where, default=""), get_str(obj, "email", where, default="")
        )


@dataclass(frozen=True)
class ModuleConfig:
    name: str
    version: str = "0.1.0"
    contact: Contact = Contact()
    clusters: tuple[ClusterExport, ...] = ()

    def to_json(self) -> dict[str, Any]:
        exports = [c.to_json() for c in self.clusters]
        # The reference core reads "clusters"; the published doc says "exports": send both.
        return {
            "name": self.name,
            "version": self.version,
            "contact": self.contact.to_json(),
            "clusters": exports,
            "exports": exports,
        }

    @classmethod
    def parse(cls, value: Any, where: str = "module.config") -> ModuleConfig:
        obj = expect_object(value, where)
        key = "clusters" if obj.get("clusters") is not None else "exports"
        raw = obj.get(key)
        if raw is None:
            raw = []
        if not isinstance(raw, list):
            raise ProtocolError(_path(where, key), f"expected an array, got {_kind(raw)}")
        clusters = tuple(
            ClusterExport.parse(c, f"{_path(where, key)}[{i}]") for i, c in enumerate(raw)
        )
        return cls(
            name=get_str(obj, "name", where, nonempty=True),
            version=get_str(obj, "version", where, default=""),
            contact=Contact.parse(obj.get("contact"), _path(where, "contact")),
            clusters=clusters,
        )


@dataclass(frozen=True)
class ModuleRegistration:
    """Body of ``POST /module``."""

    processor: ProcessorAddress
    module: ModuleConfig

    def to_json(self) -> dict[str, Any]:
        return {**self.processor.to_json(), "module": {"config": self.module.to_json()}}

    @classmethod
    def parse(cls, value: Any) -> ModuleRegistration:
        obj = expect_object(value)
        module = expect_object(obj.get("module"), "module")
        return cls(ProcessorAddress.parse(obj), ModuleConfig.parse(module.get("config")))


# ---------------------------------------------------------------------------------------------
# core -> processor: the run request


@dataclass(frozen=True)
class RunConfig:
    """The named run configuration the core sends with a run request.

    Fields left ``None`` were not in the request and fall back to the cluster's own defaults
    (see :meth:`with_defaults`).
    """

    identifier: str = ""
    on_load: OnLoad | None = None
    on_crash: OnCrash | None = None
    t_channels: int | None = None
    l_channels: int | None = None
    et_threshold: int | None = None
    et_growth: int | None = None
    tl_threshold: int | None = None
    tl_growth: int | None = None

    _KEYS = (
        ("t_channels", "start-with-n-t-channels"),
        ("l_channels", "start-with-n-l-channels"),
        ("et_threshold", "et-channel-threshold"),
        ("et_growth", "et-channel-growth-factor"),
        ("tl_threshold", "tl-channel-threshold"),
        ("tl_growth", "tl-channel-growth-factor"),
    )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"identifier": self.identifier}
        if self.on_load is not None:
            out["on-load"] = self.on_load.value
        if self.on_crash is not None:
            out["on-crash"] = self.on_crash.value
        for attr, key in self._KEYS:
            if getattr(self, attr) is not None:
                out[key] = getattr(self, attr)
        return out

    @classmethod
    def parse(cls, value: Any, where: str = "config") -> RunConfig:
        obj = expect_object(value, where)
        ints = {
            attr: get_int(obj, key, where, default=None, minimum=1, maximum=MAX_CONFIG_NUMBER)
            for attr, key in cls._KEYS
        }
        return cls(
            identifier=get_str(obj, "identifier", where, default=""),
            on_load=get_enum(obj, "on-load", OnLoad, where, default=None),
            on_crash=get_enum(obj, "on-crash", OnCrash, where, default=None),
            **ints,
        )

    @classmethod
    def from_export(cls, identifier: str, export: ExportConfig) -> RunConfig:
        """The default config the core stores for an export (PROTOCOL.md section 1 mapping)."""
        return cls(
            identifier=identifier,
            on_load=export.on_load,
            on_crash=export.on_crash,
            t_channels=export.t_functions,
            l_channels=export.l_functions,
            et_threshold=export.t_growth.threshold,
            et_growth=export.t_growth.growth_factor,
            tl_threshold=export.l_growth.threshold,
            tl_growth=export.l_growth.growth_factor,
        )

    def with_defaults(self, export: ExportConfig) -> RunConfig:
        """Fill every field the request left out from the cluster's export config."""
        base = RunConfig.from_export(self.identifier, export)
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class RunRequest:
    """Body of ``POST /supervisor`` at a processor, in either of the two shapes that exist.

    The published doc sends ``supervisor`` and a config *name*; the reference core sends ``id``
    and a full config *object* (and puts the config name in ``cluster``).
    """

    module: str
    cluster: str
    run_id: int
    config: RunConfig | None = None
    config_name: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The reference core's shape (what the embedded core sends too)."""
        config: Any = self.config.to_json() if self.config is not None else self.config_name
        return {
            "module": self.module,
            "cluster": self.cluster,
            "config": config,
            "id": self.run_id,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def parse(cls, value: Any) -> RunRequest:
        obj = expect_object(value, "body")
        if "id" in obj and obj["id"] is not None:
            run_id = get_int(obj, "id", minimum=0, maximum=MAX_RUN_ID)
        elif "supervisor" in obj and obj["supervisor"] is not None:
            run_id = get_int(obj, "supervisor", minimum=0, maximum=MAX_RUN_ID)
        else:
            raise ProtocolError("id", "missing (the run id, as 'id' or 'supervisor')")
        raw_config = obj.get("config")
        config: RunConfig | None = None
        config_name = ""
        if isinstance(raw_config, dict):
            config = RunConfig.parse(raw_config)
            config_name = config.identifier
        elif isinstance(raw_config, str) or raw_config is None:
            config_name = raw_config or ""
        else:
            raise ProtocolError(
                "config", f"expected a config object or name, got {_kind(raw_config)}"
            )
        return cls(
            module=get_str(obj, "module", nonempty=True),
            cluster=get_str(obj, "cluster", nonempty=True),
            run_id=run_id,
            config=config,
            config_name=config_name,
            metadata=get_str_map(obj, "metadata"),
        )


def resolve_cluster_name(requested: str, available: list[str] | tuple[str, ...]) -> str | None:
    """Which cluster a run request means (PROTOCOL.md section 2).

    The reference core sends the *config name* as ``cluster``: take the name if the module has
    it, else the part before a ``.`` or ``:`` (``Vec.fast`` runs ``Vec``), else the module's only
    cluster. ``None`` when none of these applies.
    """
    if requested in available:
        return requested
    for sep in (".", ":"):
        head = requested.split(sep, 1)[0]
        if head != requested and head in available:
            return head
    if len(available) == 1:
        return available[0]
    return None


# ---------------------------------------------------------------------------------------------
# statistics and reports


@dataclass
class ChannelTiming:
    """How long items waited in one channel before a worker popped them (nanoseconds)."""

    min_ns: int = 0
    max_ns: int = 0
    mean_ns: int = 0
    median_ns: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "min-time-before-pop-ns": self.min_ns,
            "max-time-before-pop-ns": self.max_ns,
            "average-time-ns": self.mean_ns,
            "median-time-ns": self.median_ns,
        }

    @classmethod
    def parse(cls, value: Any, where: str) -> ChannelTiming:
        obj = expect_object(value or {}, where)
        return cls(
            min_ns=get_int(obj, "min-time-before-pop-ns", where, default=0),
            max_ns=get_int(obj, "max-time-before-pop-ns", where, default=0),
            mean_ns=get_int(obj, "average-time-ns", where, default=0),
            median_ns=get_int(obj, "median-time-ns", where, default=0),
        )


@dataclass
class Statistics:
    """The statistics object of PROTOCOL.md section 1 (all durations in integer nanoseconds)."""

    extract_routines: int = 0
    transform_routines: int = 0
    load_routines: int = 0
    et_threshold_breaches: int = 0
    tl_threshold_breaches: int = 0
    total_processed: int = 0
    total_over_et: int = 0
    total_over_tl: int = 0
    total_dropped: int = 0
    et_channel: ChannelTiming = field(default_factory=ChannelTiming)
    tl_channel: ChannelTiming = field(default_factory=ChannelTiming)
    max_total_ns: int = 0
    min_total_ns: int = 0
    avg_total_ns: int = 0
    med_total_ns: int = 0

    def to_json(self) -> dict[str, Any]:
        i = _as_int
        return {
            "threads": {
                "num-provisioned-extract-routines": i(self.extract_routines),
                "num-provisioned-transform-routes": i(self.transform_routines),
                "num-provisioned-load-routines": i(self.load_routines),
            },
            "channels": {
                "num-et-threshold-breaches": i(self.et_threshold_breaches),
                "num-tl-threshold-breaches": i(self.tl_threshold_breaches),
            },
            "data": {
                "total-processed": i(self.total_processed),
                "total-over-et": i(self.total_over_et),
                "total-over-tl": i(self.total_over_tl),
                "total-dropped": i(self.total_dropped),
            },
            "timing": {
                "et-channel": self.et_channel.to_json(),
                "tl-channel": self.tl_channel.to_json(),
                "max-total-time-ns": i(self.max_total_ns),
                "min-total-time-ns": i(self.min_total_ns),
                "avg-total-time-ns": i(self.avg_total_ns),
                "med-total-time-ns": i(self.med_total_ns),
            },
        }

    @classmethod
    def parse(cls, value: Any, where: str = "statistics") -> Statistics:
        """Lenient about missing sections (``{}`` is a legal statistics object), strict on types."""
        if value is None:
            return cls()
        obj = expect_object(value, where)
        threads = expect_object(obj.get("threads") or {}, _path(where, "threads"))
        channels = expect_object(obj.get("channels") or {}, _path(where, "channels"))
        data = expect_object(obj.get("data") or {}, _path(where, "data"))
        timing = expect_object(obj.get("timing") or {}, _path(where, "timing"))
        w = {k: _path(where, k) for k in ("threads", "channels", "data", "timing")}
        return cls(
            extract_routines=get_int(
                threads, "num-provisioned-extract-routines", w["threads"], default=0
            ),
            transform_routines=get_int(
                threads, "num-provisioned-transform-routes", w["threads"], default=0
            ),
            load_routines=get_int(
                threads, "num-provisioned-load-routines", w["threads"], default=0
            ),
            et_threshold_breaches=get_int(
                channels, "num-et-threshold-breaches", w["channels"], default=0
            ),
            tl_threshold_breaches=get_int(
                channels, "num-tl-threshold-breaches", w["channels"], default=0
            ),
            total_processed=get_int(data, "total-processed", w["data"], default=0),
            total_over_et=get_int(data, "total-over-et", w["data"], default=0),
            total_over_tl=get_int(data, "total-over-tl", w["data"], default=0),
            total_dropped=get_int(data, "total-dropped", w["data"], default=0),
            et_channel=ChannelTiming.parse(
                timing.get("et-channel"), _path(w["timing"], "et-channel")
            ),
            tl_channel=ChannelTiming.parse(
                timing.get("tl-channel"), _path(w["timing"], "tl-channel")
            ),
            max_total_ns=get_int(timing, "max-total-time-ns", w["timing"], default=0),
            min_total_ns=get_int(timing, "min-total-time-ns", w["timing"], default=0),
            avg_total_ns=get_int(timing, "avg-total-time-ns", w["timing"], default=0),
            med_total_ns=get_int(timing, "med-total-time-ns", w["timing"], default=0),
        )


def _as_int(value: Any) -> int:
    """Counters may arrive as numpy ints or floats from user-facing code; the wire wants ints."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return 0
    return int(number) if math.isfinite(number) else 0


@dataclass
class SupervisorReport:
    """Body of ``PUT /supervisor``: a run's progress or final report. Always carries statistics."""

    run_id: int
    status: str
    statistics: Statistics = field(default_factory=Statistics)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.run_id,
            "status": str(self.status),
            "statistics": self.statistics.to_json(),
        }

    @classmethod
    def parse(cls, value: Any) -> SupervisorReport:
        obj = expect_object(value, "body")
        stats = obj.get("statistics")
        return cls(
            run_id=get_int(obj, "id", minimum=0),
            status=get_str(obj, "status", nonempty=True),
            statistics=Statistics.parse(stats) if stats is not None else Statistics(),
        )


@dataclass
class LogLine:
    """Body of ``POST /log``."""

    run_id: int
    level: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.run_id, "level": str(self.level), "message": self.message}

    @classmethod
    def parse(cls, value: Any) -> LogLine:
        obj = expect_object(value, "body")
        level = get_str(obj, "level", default="normal")
        # The reference core counts unknown levels as normal ("warn" is not "warning").
        if level not in {lv.value for lv in LogLevel}:
            level = LogLevel.NORMAL.value
        return cls(get_int(obj, "id", minimum=0), level, get_str(obj, "message"))


@dataclass
class CacheSave:
    """Body of ``POST /cache``; the core answers with the generated key."""

    value: Any
    expiry_minutes: float = 0

    def to_json(self) -> dict[str, Any]:
        # strict: a value the user expects back must not silently come back as its repr
        return {"value": jsonable(self.value, strict=True), "expiry": jsonable(self.expiry_minutes)}

    @classmethod
    def parse(cls, value: Any) -> CacheSave:
        obj = expect_object(value, "body")
        if "value" not in obj:
            raise ProtocolError("value", "missing")
        expiry = obj.get("expiry", 0)
        if expiry is None:
            expiry = 0
        if isinstance(expiry, bool) or not isinstance(expiry, (int, float)) or expiry < 0:
            raise ProtocolError("expiry", f"expected a number of minutes >= 0, got {expiry!r}")
        return cls(obj["value"], expiry)


@dataclass
class CacheEntry:
    """``data`` of ``GET /cache?key=K``."""

    identifier: str
    data: Any

    def to_json(self) -> dict[str, Any]:
        return {"Identifier": self.identifier, "Data": jsonable(self.data)}

    @classmethod
    def parse(cls, value: Any) -> CacheEntry:
        obj = expect_object(value, "data")
        return cls(get_str(obj, "Identifier", "data"), obj.get("Data"))


# ---------------------------------------------------------------------------------------------
# client endpoint (operators)


@dataclass
class ProvisionRequest:
    """Body of ``POST /supervisor`` at the core's client endpoint."""

    module: str
    cluster: str
    config: str = ""
    metadata: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "cluster": self.cluster,
            "config": self.config or self.cluster,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def parse(cls, value: Any) -> ProvisionRequest:
        obj = expect_object(value, "body")
        return cls(
            module=get_str(obj, "module", nonempty=True),
            cluster=get_str(obj, "cluster", nonempty=True),
            config=get_str(obj, "config", default=""),
            metadata=get_str_map(obj, "metadata"),
        )


@dataclass
class ProvisionAnswer:
    cluster: str
    run_id: int

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "id": self.run_id}

    @classmethod
    def parse(cls, value: Any) -> ProvisionAnswer:
        obj = expect_object(value, "data")
        return cls(get_str(obj, "cluster", "data", default=""), get_int(obj, "id", "data"))


@dataclass
class RunRecord:
    """One run as the core records it (``GET /supervisor``)."""

    run_id: int
    status: str
    processor: str
    module: str
    cluster: str
    config: str
    statistics: Statistics | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.run_id,
            "status": self.status,
            "processor": self.processor,
            "module": self.module,
            "cluster": self.cluster,
            "config": self.config,
            "statistics": self.statistics.to_json() if self.statistics is not None else None,
        }

    @classmethod
    def parse(cls, value: Any) -> RunRecord:
        obj = expect_object(value, "run")
        stats = obj.get("statistics")
        return cls(
            run_id=get_int(obj, "id", "run"),
            status=get_str(obj, "status", "run", default=""),
            processor=get_str(obj, "processor", "run", default=""),
            module=get_str(obj, "module", "run", default=""),
            cluster=get_str(obj, "cluster", "run", default=""),
            config=get_str(obj, "config", "run", default=""),
            statistics=Statistics.parse(stats, "run.statistics") if stats else None,
        )


@dataclass
class StatisticsRecord:
    """One finished run's statistics (``GET /statistics``, a bare list at the reference core)."""

    timestamp: float
    elapsed_ns: int
    statistics: Statistics

    def to_json(self) -> dict[str, Any]:
        return {
            "timestamp": self.timestamp,
            "elapsed": self.elapsed_ns,
            "statistics": self.statistics.to_json(),
        }

    @classmethod
    def parse(cls, value: Any) -> StatisticsRecord:
        obj = expect_object(value, "record")
        ts = obj.get("timestamp", 0)
        return cls(
            timestamp=ts if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0,
            elapsed_ns=get_int(obj, "elapsed", "record", default=0),
            statistics=Statistics.parse(obj.get("statistics"), "record.statistics"),
        )


@dataclass
class ProcessorInfo:
    host: str
    port: int
    status: str
    last_update: float
    modules: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "Host": self.host,
            "Port": self.port,
            "Status": self.status,
            "LastUpdate": _iso(self.last_update),
            "Modules": list(self.modules),
        }

    @classmethod
    def parse(cls, value: Any) -> ProcessorInfo:
        obj = expect_object(value, "processor")
        modules = obj.get("Modules") or []
        return cls(
            host=get_str(obj, "Host", "processor"),
            port=get_int(obj, "Port", "processor"),
            status=get_str(obj, "Status", "processor", default=""),
            last_update=0.0,
            modules=[m if isinstance(m, str) else str(m) for m in modules]
            if isinstance(modules, list)
            else [],
        )


@dataclass
class ModuleInfo:
    name: str
    version: str
    contact: Contact
    mounted: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "Name": self.name,
            "Version": self.version,
            "Contact": self.contact.to_json(),
            "Mounted": self.mounted,
        }

    @classmethod
    def parse(cls, value: Any) -> ModuleInfo:
        obj = expect_object(value, "module")
        return cls(
            name=get_str(obj, "Name", "module"),
            version=get_str(obj, "Version", "module", default=""),
            contact=Contact.parse(_lower_keys(obj.get("Contact")), "module.Contact"),
            mounted=get_bool(obj, "Mounted", "module", default=False),
        )


@dataclass
class ClusterInfo:
    name: str
    mounted: bool
    mode: str

    def to_json(self) -> dict[str, Any]:
        return {"Name": self.name, "Mounted": self.mounted, "Mode": self.mode}

    @classmethod
    def parse(cls, value: Any) -> ClusterInfo:
        obj = expect_object(value, "cluster")
        return cls(
            name=get_str(obj, "Name", "cluster"),
            mounted=get_bool(obj, "Mounted", "cluster", default=False),
            mode=get_str(obj, "Mode", "cluster", default=""),
        )


@dataclass
class MountRequest:
    """Body of ``PUT /module`` (``cluster`` empty) or ``PUT /cluster`` at the client endpoint."""

    module: str
    mounted: bool
    cluster: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"module": self.module, "mounted": self.mounted}
        if self.cluster:
            out["cluster"] = self.cluster
        return out

    @classmethod
    def parse(cls, value: Any, need_cluster: bool) -> MountRequest:
        obj = expect_object(value, "body")
        return cls(
            module=get_str(obj, "module", nonempty=True),
            mounted=get_bool(obj, "mounted"),
            cluster=get_str(obj, "cluster", nonempty=True) if need_cluster else "",
        )


def _lower_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k).lower(): v for k, v in value.items()}
    return value


def _iso(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.UTC).isoformat().replace("+00:00", "Z")


def now_ns() -> int:
    return time.time_ns()
