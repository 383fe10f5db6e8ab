"""What a cluster is, in plain Python.

A :class:`Cluster` bundles the user's extract / transform / load callables (plus optional hooks)
with the export settings the core needs. It is immutable: redefining a cluster builds a new one,
so runs that already started keep the functions they started with.

This is the API that ``%%cluster`` and the ``.py`` files given to ``python -m nbproc serve`` use.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .protocol import (
    ChannelGrowth,
    ClusterExport,
    ExportConfig,
    Mode,
    OnCrash,
    OnLoad,
)

DEFAULT_MODULE = "notebook"


class _Drop:
    """Returned by a transform to drop the item (it counts in ``total-dropped``)."""

    _instance: _Drop | None = None

    def __new__(cls) -> _Drop:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "nbproc.DROP"

    def __reduce__(self) -> str:
        return "DROP"


DROP = _Drop()


class ClusterDefinitionError(ValueError):
    """A cluster cannot be built from what was given (bad signature, bad option, no extract)."""


# name -> (positional arguments it must accept, what to call it with, for the error message)
_SIGNATURES: dict[str, tuple[int, str]] = {
    "extract": (3, "extract(h, m, out)"),
    "transform": (3, "transform(h, m, item)"),
    "load": (3, "load(h, m, item_or_batch)"),
    "setup": (2, "setup(h, m)"),
    "teardown": (2, "teardown(h, m)"),
    "verify_et": (1, "verify_et(item)"),
    "verify_tl": (1, "verify_tl(item)"),
}
FUNCTION_ROLES = tuple(_SIGNATURES)


@dataclass(frozen=True)
class Cluster:
    """An extract-transform-load pipeline and the settings it is exported with.

    ``extract`` pushes items with ``out.push(item)`` or is a generator (``extract(h, m)`` or
    ``extract(h, m, out)``) that yields them. ``transform`` returns the new item or
    :data:`DROP`; ``load`` gets each item (``CompleteAndPush``) or the whole batch as a pandas
    DataFrame (``WaitAndPush``). Any of them may be ``async def``.
    """

    name: str
    extract: Callable[..., Any]
    transform: Callable[..., Any] | None = None
    load: Callable[..., Any] | None = None
    module: str = DEFAULT_MODULE
    mode: Mode = Mode.BATCH
    on_load: OnLoad = OnLoad.WAIT_AND_PUSH
    on_crash: OnCrash = OnCrash.DO_NOTHING
    t_functions: int = 1
    l_functions: int = 1
    t_threshold: int = 2
    t_growth: int = 2
    l_threshold: int = 2
    l_growth: int = 2
    max_t_functions: int = 16
    max_l_functions: int = 16
    max_restarts: int = 3
    setup: Callable[..., Any] | None = None
    teardown: Callable[..., Any] | None = None
    verify_et: Callable[..., Any] | None = None
    verify_tl: Callable[..., Any] | None = None
    mount: bool = True
    version: str = "0.1.0"

    def __post_init__(self) -> None:
        for name, enum in (("mode", Mode), ("on_load", OnLoad), ("on_crash", OnCrash)):
            object.__setattr__(self, name, _coerce_enum(name, getattr(self, name), enum))
        self._check_names()
        self._check_numbers()
        self._check_functions()

    # -- validation -----------------------------------------------------------------------
    def _check_names(self) -> None:
        for what in ("name", "module"):
            value = getattr(self, what)
            if not isinstance(value, str) or not value.strip():
                raise ClusterDefinitionError(
                    f"cluster {what} must be a non-empty string, got {value!r}"
                )
            if any(c in value for c in "?&#/ \t\n"):
                raise ClusterDefinitionError(
                    f"cluster {what} {value!r} must not contain spaces or ?&#/"
                )
        if any(c in self.name for c in ".:"):
            # a config named "Vec.fast" or "Vec:slow" runs cluster "Vec" (PROTOCOL.md section 2)
            raise ClusterDefinitionError(
                f"cluster name {self.name!r} must not contain '.' or ':' (they separate config "
                "variants: a config 'Vec.fast' runs cluster 'Vec')"
            )
        if not isinstance(self.version, str) or not self.version:
            raise ClusterDefinitionError(
                f"version must be a non-empty string, got {self.version!r}"
            )

    def _check_numbers(self) -> None:
        for what in (
            "t_functions",
            "l_functions",
            "t_threshold",
            "t_growth",
            "l_threshold",
            "l_growth",
            "max_t_functions",
            "max_l_functions",
        ):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ClusterDefinitionError(f"{what} must be an integer >= 1, got {value!r}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ClusterDefinitionError(
                f"max_restarts must be an integer >= 0, got {self.max_restarts!r}"
            )
        if self.max_t_functions < self.t_functions or self.max_l_functions < self.l_functions:
            raise ClusterDefinitionError(
                "max_t_functions / max_l_functions must be >= the starting counts"
            )

    def _check_functions(self) -> None:
        if self.extract is None:
            raise ClusterDefinitionError(f"cluster {self.name!r} needs an extract function")
        for role in FUNCTION_ROLES:
            fn = getattr(self, role)
            if fn is not None:
                check_signature(role, fn)

    # -- what the core sees -----------------------------------------------------------------
    def export_config(self) -> ExportConfig:
        return ExportConfig(
            mode=self.mode,
            on_crash=self.on_crash,
            on_load=self.on_load,
            t_functions=self.t_functions,
            l_functions=self.l_functions,
            t_growth=ChannelGrowth(self.t_threshold, self.t_growth),
            l_growth=ChannelGrowth(self.l_threshold, self.l_growth),
        )

    def export(self) -> ClusterExport:
        return ClusterExport(cluster=self.name, mount=self.mount, config=self.export_config())

    def replace(self, **changes: Any) -> Cluster:
        return dataclasses.replace(self, **changes)

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.name)


def _coerce_enum(what: str, value: Any, enum: type) -> Any:
    if isinstance(value, enum):
        return value
    for member in enum:
        if isinstance(value, str) and value.lower() == member.value.lower():
            return member
    allowed = " | ".join(m.value for m in enum)
    raise ClusterDefinitionError(f"{what} must be one of {allowed}, got {value!r}")


def check_signature(role: str, fn: Callable[..., Any]) -> None:
    """Fail at definition time, not at run time, when a function cannot take its arguments."""
    needed, shape = _SIGNATURES[role]
    if not callable(fn):
        raise ClusterDefinitionError(f"{role} must be callable, got {type(fn).__name__}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins and C functions: trust them
    counts = [needed]
    if role == "extract" and (inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)):
        counts = [2, 3]  # a generator extract may leave out ``out``
    for count in counts:
        try:
            sig.bind(*range(count))
            return
        except TypeError:
            continue
    name = getattr(fn, "__name__", role)
    raise ClusterDefinitionError(f"{role} must be callable as {shape}; {name}{sig} is not")


def is_async(fn: Callable[..., Any] | None) -> bool:
    return fn is not None and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))
